"""``winoq mixed``: plan table, JSON, plot and integer ONNX from a tiny ImageFolder."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from winoq.cli import main


def test_mixed_command_writes_plan_plot_and_onnx(tmp_path, capsys):
    pytest.importorskip("onnx")
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    rc = main(["mixed", "--model", "cifar-resnet20", "--calib-data", str(tmp_path / "imgs"), "--calib-images", "4",
               "--trace-iters", "2", "--budget", "size", "--r", "0.25", "--out", str(tmp_path / "plan.json"),
               "--plot", str(tmp_path / "plan.png"), "--onnx", str(tmp_path / "m.onnx")])
    assert rc in (0, None)
    out = capsys.readouterr().out
    assert "layer1.0.conv1" in out and "bits" in out and "ILP" in out
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["bits"]["conv1"] == 8 and plan["totals"]["size"] <= plan["budget"] * (1 + 1e-9)
    assert (tmp_path / "plan.png").stat().st_size > 1000 and (tmp_path / "m.onnx").stat().st_size > 1000
