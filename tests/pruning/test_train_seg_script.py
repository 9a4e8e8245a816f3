"""scripts/train_seg.py on a tiny synthetic Sunnybrook-style folder: training from scratch and
continuing from earlier weights (--init) with the training history kept in the metadata."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_seg_data import make_chase, make_sunnybrook  # noqa: E402

from winoq.pruning import load_unet  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_seg.py"


def _data(tmp_path):
    root = make_sunnybrook(tmp_path / "sb", n=4, size=16)
    make_sunnybrook(tmp_path / "sb", n=2, size=16, split="test")
    return root


def test_init_continues_from_the_given_weights_and_keeps_the_history(tmp_path, load_file_module):
    root, train_seg = _data(tmp_path), load_file_module(SCRIPT, "train_seg_script")
    first = tmp_path / "first.safetensors"
    train_seg.main(["--dataset", "sunnybrook", "--root", str(root), "--size", "16", "--depth", "2",
                    "--base-width", "4", "--steps", "3", "--batch-size", "2", "--out", str(first)])
    model0, info0 = load_unet(first)
    assert info0["train"]["steps"] == 3 and "previous" not in info0

    second = tmp_path / "second.safetensors"
    # --depth / --base-width disagree with the init file: its config wins
    train_seg.main(["--dataset", "sunnybrook", "--root", str(root), "--size", "16", "--depth", "3",
                    "--base-width", "8", "--steps", "2", "--batch-size", "2", "--lr", "1e-3", "--seed", "1",
                    "--init", str(first), "--out", str(second)])
    model1, info1 = load_unet(second)
    assert model1.config.to_dict() == model0.config.to_dict()
    assert [p["train"]["steps"] for p in info1["previous"]] == [3]
    assert info1["previous"][0]["test_dice"] == info0["test_dice"] and info1["total_steps"] == 5
    # it trained from the loaded weights: changed, but only by two Adam steps of 1e-3 (a fresh
    # initialisation with seed 1 would be far away)
    s0, s1 = model0.state_dict(), model1.state_dict()
    convs = [k for k in s0 if k.endswith("weight") and s0[k].dim() == 4]
    assert any(not torch.equal(s0[k], s1[k]) for k in convs)
    assert max((s0[k] - s1[k]).abs().max().item() for k in convs) < 5e-3

    third = tmp_path / "third.safetensors"   # a second continuation appends to the history
    train_seg.main(["--dataset", "sunnybrook", "--root", str(root), "--size", "16", "--steps", "1",
                    "--batch-size", "2", "--init", str(second), "--out", str(third)])
    _, info2 = load_unet(third)
    assert [p["train"]["steps"] for p in info2["previous"]] == [3, 2] and info2["total_steps"] == 6


def test_init_with_other_input_channels_is_refused(tmp_path, load_file_module):
    root, train_seg = _data(tmp_path), load_file_module(SCRIPT, "train_seg_script")
    first = tmp_path / "gray.safetensors"
    train_seg.main(["--dataset", "sunnybrook", "--root", str(root), "--size", "16", "--depth", "2",
                    "--base-width", "4", "--steps", "1", "--batch-size", "2", "--out", str(first)])
    chase = make_chase(tmp_path / "ch", n=2, wh=(36, 30))
    make_chase(tmp_path / "ch", n=1, wh=(36, 30), split="test")
    with pytest.raises(ValueError, match="input channels"):
        train_seg.main(["--dataset", "chase", "--root", str(chase), "--downscale", "1", "--patch", "8",
                        "--steps", "1", "--init", str(first), "--out", str(tmp_path / "x.safetensors")])
