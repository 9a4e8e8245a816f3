"""The committed 1010x-pruned Sunnybrook U-Net (benchmarks/weights, docs/results.md section 23): it loads
with its own widths, is 1010x smaller than its 31 M-parameter parent, and (slow, needs ../shared)
still segments the left ventricle within 4% of the parent's Dice."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from winoq.models.unet_seg import UNetConfig, UNetSeg, count_params
from winoq.pruning import evaluate, load_unet

WEIGHTS = Path(__file__).resolve().parents[2] / "benchmarks" / "weights" / "unet_sunnybrook_pruned_1010x.safetensors"


def test_the_pruned_model_loads_and_is_over_1000x_smaller_than_its_parent():
    model, info = load_unet(WEIGHTS)
    parent = UNetSeg(UNetConfig(depth=model.config.depth, base_width=model.config.base_width))
    assert count_params(parent) == info["dense"]["params"] == 31_036_481
    assert count_params(parent) / count_params(model) >= 1000
    with torch.no_grad():
        y = model.eval()(torch.randn(2, 1, 128, 128))
    assert y.shape == (2, 1, 128, 128) and torch.isfinite(y).all()


@pytest.mark.slow
def test_the_pruned_model_keeps_its_dice_on_the_sunnybrook_test_slices():
    from winoq.data.segmentation import load_segmentation

    try:
        test = load_segmentation("sunnybrook", "test", size=128, crop=128)
    except FileNotFoundError as e:
        pytest.skip(f"../shared/data/sunnybrook_lv not found: {e}")
    model, info = load_unet(WEIGHTS)
    dice = evaluate(model, test)["dice"]
    assert dice == pytest.approx(info["dice"], abs=1e-4)
    assert dice >= 0.96 * info["dense"]["test_dice"]
