"""`winoq prune` end to end on a tiny synthetic Sunnybrook-style folder."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_seg_data import make_sunnybrook  # noqa: E402

from winoq.cli import main  # noqa: E402
from winoq.models.unet_seg import UNetConfig, UNetSeg  # noqa: E402
from winoq.pruning import load_unet, save_unet  # noqa: E402


def test_prune_command_writes_a_smaller_loadable_unet(tmp_path, capsys):
    root = make_sunnybrook(tmp_path / "sb", n=4, size=16)
    make_sunnybrook(tmp_path / "sb", n=2, size=16, split="test")
    torch.manual_seed(0)
    save_unet(UNetSeg(UNetConfig(depth=2, base_width=8)), tmp_path / "dense.safetensors",
              {"dataset": "sunnybrook", "args": {"size": 16}})
    out = tmp_path / "pruned.safetensors"
    rc = main(["prune", "--weights", str(tmp_path / "dense.safetensors"), "--out", str(out), "--ratio", "5",
               "--dataset", "sunnybrook", "--data-root", str(root), "--criterion", "taylor",
               "--schedule", "iterative", "--stages", "2", "--finetune-steps", "2", "--eval",
               "--onnx", str(tmp_path / "p.onnx")])
    assert rc == 0
    text = capsys.readouterr().out
    summary = json.loads(text[:text.rindex("}") + 1])
    assert summary["ratio_params"] >= 5 * 0.95 and 0 <= summary["dice"] <= 1
    model, info = load_unet(out)
    assert list(model.config.widths) == summary["widths"] and info["prune"]["criterion"] == "taylor"
    assert (tmp_path / "p.onnx").is_file()


def test_prune_command_uniform_allocation_with_a_floor(tmp_path, capsys):
    torch.manual_seed(0)
    save_unet(UNetSeg(UNetConfig(depth=2, base_width=8)), tmp_path / "dense.safetensors")
    out = tmp_path / "pruned.safetensors"
    rc = main(["prune", "--weights", str(tmp_path / "dense.safetensors"), "--out", str(out), "--ratio", "6",
               "--allocation", "uniform", "--min-filters", "2"])
    assert rc == 0
    model, info = load_unet(out)
    assert info["prune"]["allocation"] == "uniform" and info["prune"]["min_filters"] == 2
    dense = UNetConfig(depth=2, base_width=8).resolved_widths()
    fracs = [w / d for w, d in zip(model.config.widths, dense)]
    assert min(model.config.widths) >= 2 and max(fracs) - min(fracs) <= 1 / 8 + 1e-9   # one common fraction
    assert info["ratio_params"] >= 6


def test_prune_command_unreachable_ratio(tmp_path, capsys):
    save_unet(UNetSeg(UNetConfig(depth=1, base_width=2)), tmp_path / "d.safetensors")
    rc = main(["prune", "--weights", str(tmp_path / "d.safetensors"), "--out", str(tmp_path / "p.safetensors"),
               "--ratio", "1000"])
    assert rc != 0
    assert "not reachable" in capsys.readouterr().err


def test_prune_command_refuses_to_overwrite_its_input_and_a_bad_ratio(tmp_path, capsys):
    dense = tmp_path / "d.safetensors"
    save_unet(UNetSeg(UNetConfig(depth=1, base_width=2)), dense)
    before = dense.read_bytes()
    assert main(["prune", "--weights", str(dense), "--out", str(dense), "--ratio", "2"]) == 2
    assert "is the input file" in capsys.readouterr().err and dense.read_bytes() == before
    assert main(["prune", "--weights", str(dense), "--out", str(tmp_path / "p.safetensors"), "--ratio", "0"]) == 2
    err = capsys.readouterr().err
    assert "target_ratio must be >= 1" in err and "Traceback" not in err


def test_prune_command_exports_an_int8_onnx_and_reports_its_dice(tmp_path, capsys):
    import onnx
    import pytest

    pytest.importorskip("onnxruntime")
    root = make_sunnybrook(tmp_path / "sb", n=4, size=16)
    make_sunnybrook(tmp_path / "sb", n=2, size=16, split="test")
    torch.manual_seed(0)
    save_unet(UNetSeg(UNetConfig(depth=2, base_width=8)), tmp_path / "dense.safetensors",
              {"dataset": "sunnybrook", "args": {"size": 16}})
    rc = main(["prune", "--weights", str(tmp_path / "dense.safetensors"), "--out", str(tmp_path / "p.safetensors"),
               "--ratio", "3", "--dataset", "sunnybrook", "--data-root", str(root), "--eval",
               "--int8-onnx", str(tmp_path / "p8.onnx")])
    assert rc == 0
    text = capsys.readouterr().out
    summary = json.loads(text[:text.rindex("}") + 1])
    assert 0 <= summary["int8_dice"] <= 1 and summary["int8_onnx"].endswith("p8.onnx")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "p8.onnx")).graph.node}
    assert {"QLinearConv", "QLinearConcat"} <= ops


def test_prune_command_int8_onnx_needs_a_dataset(tmp_path, capsys):
    save_unet(UNetSeg(UNetConfig(depth=1, base_width=4)), tmp_path / "d.safetensors")
    rc = main(["prune", "--weights", str(tmp_path / "d.safetensors"), "--out", str(tmp_path / "p.safetensors"),
               "--ratio", "2", "--int8-onnx", str(tmp_path / "p8.onnx")])
    assert rc == 2 and "--int8-onnx need --dataset" in capsys.readouterr().err
