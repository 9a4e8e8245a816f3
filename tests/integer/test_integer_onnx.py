"""ONNX export of the integer-only model, run in onnxruntime, equals the project's output bit for bit."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from winoq.integer import IntegerConfig, convert  # noqa: E402
from winoq.integer.onnx_export import OPSET, export_onnx, run_onnx  # noqa: E402
from winoq.models import cifar_resnet20, resnet18  # noqa: E402


def _bn(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


MODELS = [(cifar_resnet20, (8, 8)), (cifar_resnet20, (4, 4)), (resnet18, (8, 8))]


def _converted(build, bits, n):
    """(calibration inputs, integer model) of a randomly initialised ``build()`` at ``bits``."""
    torch.manual_seed(0)
    model = _bn(build())
    x = torch.randn(n, 3, 32, 32)
    return x, convert(model, x, IntegerConfig(weight_bits=bits[0], act_bits=bits[1], calib_samples=n, rounding_iters=5))


@pytest.mark.parametrize("build,bits", MODELS)
def test_onnxruntime_matches_integer_model_bit_for_bit(tmp_path, build, bits):
    x, im = _converted(build, bits, 4)
    proto = export_onnx(im, tmp_path / "m.onnx", x)
    ops = {n.op_type for n in proto.graph.node}
    assert {"ConvInteger", "MatMulInteger", "BitShift"} <= ops and "Conv" not in ops
    assert proto.opset_import[0].version == OPSET >= 13
    x2 = torch.randn(3, 3, 32, 32)  # other inputs, other batch size
    assert torch.equal(run_onnx(tmp_path / "m.onnx", x2), im(x2))


# ----------------------------------------------------------------------------- fast export (QLinearConv)
@pytest.mark.parametrize("build,bits", MODELS)
def test_qlinear_export_runs_the_integer_program_on_fused_int8_ops(tmp_path, build, bits):
    x, im = _converted(build, bits, 8)
    proto = export_onnx(im, tmp_path / "q.onnx", x[:1], ops="qlinear", calib=x)
    ops = [n.op_type for n in proto.graph.node]
    convs = sum(type(s).__name__ == "IntConv2d" for s in im.steps)
    assert ops.count("QLinearConv") == convs and "ConvInteger" not in ops and "Conv" not in ops
    assert ops.count("QLinearAdd") == sum(type(s).__name__ == "IntAdd" for s in im.steps) > 0
    x2 = torch.randn(5, 3, 32, 32)
    ref, got = im(x2), run_onnx(tmp_path / "q.onnx", x2)
    # float32 requantization and 8-bit residual branches: close to the integer model (often equal)
    assert (got - ref).abs().max() <= 0.1 * ref.abs().max()
    assert torch.corrcoef(torch.stack([got.flatten(), ref.flatten()]))[0, 1] > 0.99


def test_qlinear_export_keeps_the_exact_path_where_it_cannot_fuse(tmp_path):
    """A conv whose accumulator is the model output has no requantization to fuse: it stays a
    ConvInteger (bit-exact), and the graph still equals the integer model there."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)).eval()
    x = torch.randn(4, 3, 16, 16)
    im = convert(model, x, IntegerConfig(calib_samples=4))
    proto = export_onnx(im, tmp_path / "q.onnx", x[:1], ops="qlinear")
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QLinearConv") == 1 and ops.count("ConvInteger") == 1
    ref, got = im(x), run_onnx(tmp_path / "q.onnx", x)
    assert (got - ref).abs().max() <= 0.02 * ref.abs().max()


@pytest.mark.parametrize("ops", ["integer", "qlinear"])
def test_unsigned_8bit_codes_enter_the_int8_ops_with_zero_point_0(tmp_path, ops):
    """Post-ReLU codes on the full unsigned grid (up to 255) must not be shifted by 128 into uint8 nor
    max-pooled as int8 (both wrapped: wrong logits)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 8, 3, padding=1),
                          nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(8, 3, 16, 16)
    im = convert(model, x, IntegerConfig(calib_samples=8, unsigned_max_bits=8))
    assert any(getattr(s, "qmax", 0) == 255 for s in im.steps)
    export_onnx(im, tmp_path / "m.onnx", x[:1], ops=ops)
    got = run_onnx(tmp_path / "m.onnx", x)
    if ops == "integer":
        assert torch.equal(got, im(x))
    else:
        assert (got - im(x)).abs().max() <= 0.02 * im(x).abs().max()


def test_export_rejects_an_unknown_ops_choice(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    x = torch.randn(2, 3, 8, 8)
    im = convert(model, x, IntegerConfig(calib_samples=2))
    with pytest.raises(ValueError, match="ops must be 'integer'"):
        export_onnx(im, tmp_path / "m.onnx", x, ops="fast")
