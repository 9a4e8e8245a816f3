"""``winoq deploy``: integer-only model -> ONNX for onnxruntime's int8 kernels, with accuracy, size and
speed against the float model, from a tiny ImageFolder."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from winoq.cli import main

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def _images(tmp_path, per_class=4):
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    return str(tmp_path / "imgs")


def _deploy(tmp_path, *extra):
    return main(["deploy", "--model", "cifar-resnet20", "--data", _images(tmp_path), "--calib-images", "4",
                 "--n-images", "4", "--batch", "2", "--reps", "1", "--out", str(tmp_path / "m.onnx"),
                 "--report", str(tmp_path / "r.json"), *extra])


def test_deploy_writes_a_fused_int8_onnx_and_reports_accuracy_size_speed(tmp_path, capsys):
    assert _deploy(tmp_path) == 0
    out = capsys.readouterr().out
    assert "integer-only" in out and "int8 onnxruntime" in out and "4.0x smaller" in out
    ops = {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert "QLinearConv" in ops and "ConvInteger" not in ops
    r = json.loads((tmp_path / "r.json").read_text())
    assert set(r["ms_per_batch"]) == {"float torch", "float onnxruntime", "winoq int8 kernels", "int8 onnxruntime"}
    assert "winoq int8 kernels" in out
    assert all(v > 0 for v in r["ms_per_batch"].values())
    assert 0 <= r["top1"]["onnx_same_prediction_as_integer"] <= 100 and r["batch"] == 2


def test_deploy_exact_exports_the_bit_exact_graph(tmp_path, capsys):
    assert _deploy(tmp_path, "--exact") == 0
    ops = {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert "ConvInteger" in ops and "QLinearConv" not in ops
    # the exact graph reproduces the integer model: every prediction agrees
    assert json.loads((tmp_path / "r.json").read_text())["top1"]["onnx_same_prediction_as_integer"] == 100.0


@pytest.mark.parametrize("extra,message", [
    (["--out", "model.bin"], "give a .onnx file name"),
    (["--plan", "nonexistent.json"], "not a plan written by `winoq mixed --out`"),
    (["--batch", "0"], "--batch must be >= 1"),
])
def test_deploy_bad_input_is_one_line_error(tmp_path, capsys, extra, message):
    rc = _deploy(tmp_path, *extra)
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err


def test_deploy_applies_a_mixed_precision_plan(tmp_path, capsys):
    from winoq.integer import layer_names
    from winoq.mixed_precision.planner import Plan
    from winoq.models import cifar_resnet20

    names = layer_names(cifar_resnet20())
    bits = {n: (4 if n == "layer2.0.conv1" else 8) for n in names}
    plan = Plan(bits=bits, budget_kind="size", r=0.5, budget=1.0, totals={}, sensitivity={n: {8: 0.0} for n in names})
    (tmp_path / "plan.json").write_text(plan.to_json())
    assert _deploy(tmp_path, "--plan", str(tmp_path / "plan.json")) == 0
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    init = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    peaks = [int(np.abs(init[n.input[3]]).max()) for n in graph.node if n.op_type == "QLinearConv"]
    # conv1 and the 6 convs of layer1 come first: the 4-bit layer's codes lie in [-7, 7], the others use int8
    assert len(peaks) == len(names) - 1 and peaks[7] <= 7 and all(p > 7 for i, p in enumerate(peaks) if i != 7)


def test_demo_deployment_step_writes_the_int8_model_and_its_measurements(tmp_path, monkeypatch):
    """The demo's last step (no dataset needed here: random images, held-out calibration)."""
    import torch

    from winoq.commands import demo, quantize
    from winoq.models import load_default_fmnist_model

    monkeypatch.setattr(quantize, "_calibration_images", lambda *a, **k: None)
    g = torch.Generator().manual_seed(0)
    x, held_out = torch.randn(16, 1, 28, 28, generator=g), torch.randn(8, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (16,), generator=g)
    d = demo._deploy(load_default_fmnist_model(), x, y, held_out, tmp_path)
    assert (tmp_path / "model_int8.onnx").stat().st_size > 10_000 and d["calibration_images"] == 8
    assert set(d["ms_per_batch"]) == {"float torch", "float onnxruntime", "winoq int8 kernels", "int8 onnxruntime"}
    lines = demo._deploy_lines(d)
    assert "4.0x smaller" in lines[1] and "int8 onnxruntime" in lines[2] and "winoq int8 kernels" in lines[2]
