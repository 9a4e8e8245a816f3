"""The committed >= 1000x-pruned U-Nets (benchmarks/weights; docs/results.md sections 23 and 26): each
loads with its own widths, is over 1000x smaller than its 31 M-parameter parent, and (slow, needs
../shared) still segments within 4% of the parent's Dice: the left ventricle on Sunnybrook (1010x),
the retinal vessels on CHASE_DB1 (1116x)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from winoq.models.unet_seg import UNetSeg, count_params
from winoq.pruning import evaluate, load_unet

WEIGHTS = Path(__file__).resolve().parents[2] / "benchmarks" / "weights"
MODELS = {  # file: (parent parameters, test-set loader arguments, input size of the smoke test)
    "unet_sunnybrook_pruned_1010x.safetensors": (31_036_481, {"size": 128, "crop": 128}, 128),
    "unet_chase_pruned_1116x.safetensors": (31_037_633, {"downscale": 3}, 96),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_pruned_model_loads_and_is_over_1000x_smaller_than_its_parent(name):
    parent_params, _, size = MODELS[name]
    model, info = load_unet(WEIGHTS / name)
    parent = UNetSeg(dataclasses.replace(model.config, widths=None))
    assert count_params(parent) == info["dense"]["params"] == parent_params
    assert count_params(parent) / count_params(model) >= 1000
    with torch.no_grad():
        y = model.eval()(torch.randn(2, model.config.in_channels, size, size))
    assert y.shape == (2, 1, size, size) and torch.isfinite(y).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_pruned_model_keeps_its_dice_on_the_test_images(name):
    from winoq.data.segmentation import load_segmentation

    model, info = load_unet(WEIGHTS / name)
    try:
        test = load_segmentation(info["dataset"], "test", **MODELS[name][1])
    except FileNotFoundError as e:
        pytest.skip(f"../shared/data for {info['dataset']} not found: {e}")
    dice = evaluate(model, test)["dice"]
    assert dice == pytest.approx(info["dice"], abs=1e-4)
    assert dice >= 0.96 * info["dense"]["test_dice"]
