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


@pytest.mark.parametrize("build,bits", [(cifar_resnet20, (8, 8)), (cifar_resnet20, (4, 4)), (resnet18, (8, 8))])
def test_onnxruntime_matches_integer_model_bit_for_bit(tmp_path, build, bits):
    torch.manual_seed(0)
    model = _bn(build())
    x = torch.randn(4, 3, 32, 32)
    im = convert(model, x, IntegerConfig(weight_bits=bits[0], act_bits=bits[1], calib_samples=4, rounding_iters=5))
    proto = export_onnx(im, tmp_path / "m.onnx", x)
    ops = {n.op_type for n in proto.graph.node}
    assert {"ConvInteger", "MatMulInteger", "BitShift"} <= ops and "Conv" not in ops
    assert proto.opset_import[0].version == OPSET >= 13
    x2 = torch.randn(3, 3, 32, 32)  # other inputs, other batch size
    assert torch.equal(run_onnx(tmp_path / "m.onnx", x2), im(x2))
