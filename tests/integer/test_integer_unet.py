"""Integer-only U-Nets: k x k stride-k transposed convs and skip concatenations in the integer
graph (bit-exact float64 twin, integer-only ops), exported to ONNX both ways."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from winoq.integer import IntegerConfig, IntegerConversionError, convert
from winoq.integer.layers import IntConcat, PixelShuffle
from winoq.models.unet_seg import UNetConfig, UNetSeg

from test_integer_convert import RecordOps, _random_bn  # noqa: E402 (same directory)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = _random_bn(UNetSeg(UNetConfig(depth=2, base_width=8)))
    x = torch.randn(6, 1, 32, 32)
    return model, x, convert(model, x, IntegerConfig(calib_samples=6))


def test_unet_converts_with_integer_upsampling_and_concatenation(unet):
    model, x, im = unet
    kinds = [type(s).__name__ for s in im.steps]
    assert kinds.count("PixelShuffle") == 2 and kinds.count("IntConcat") == 2
    assert [i.kind for i in im.layers].count("conv_transpose") == 2
    with torch.no_grad():
        ref, got = model(x), im(x)
    assert float(((got - ref) ** 2).sum() / (ref ** 2).sum()) < 1e-3
    q = im.quantize_input(x)
    assert torch.equal(im.simulate_codes(x), im.forward_integer(q).double())
    with RecordOps() as rec:
        im.forward_integer(q)
    assert not [op for op, ins, outs in rec.ops if any(d.is_floating_point for d in ins + outs)]


def test_transposed_conv_is_the_pixel_shuffle_of_a_1x1_conv():
    torch.manual_seed(0)
    up = nn.ConvTranspose2d(6, 4, 2, stride=2)
    w = up.weight.detach().permute(1, 2, 3, 0).reshape(16, 6, 1, 1)
    x = torch.randn(2, 6, 5, 7)
    y = torch.nn.functional.conv2d(x, w, up.bias.detach().repeat_interleave(4))
    assert torch.allclose(PixelShuffle(2, 4)(y), up(x), atol=1e-6)


@pytest.mark.parametrize("ops", ["integer", "qlinear"])
def test_unet_exports_to_onnx(unet, tmp_path, ops):
    pytest.importorskip("onnxruntime")
    from winoq.integer.onnx_export import export_onnx, run_onnx

    _, x, im = unet
    proto = export_onnx(im, tmp_path / "u.onnx", x[:1], ops=ops, calib=x)
    got, ref = run_onnx(tmp_path / "u.onnx", x[:3]), im(x[:3])
    if ops == "integer":
        assert torch.equal(got, ref)
    else:
        assert {"QLinearConv", "QLinearConcat"} <= {n.op_type for n in proto.graph.node}
        assert (got - ref).abs().max() <= 0.05 * ref.abs().max()


class _Cat(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim, self.a, self.b = dim, nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], self.dim)


@pytest.mark.parametrize("model,message", [
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.ConvTranspose2d(4, 4, 3, stride=2)), "only kernel = stride"),
    (_Cat(2), "only channels"),
])
def test_unsupported_upsampling_and_concatenation_are_named(model, message):
    with pytest.raises(IntegerConversionError, match=message):
        convert(model.eval(), torch.randn(2, 3, 8, 8), IntegerConfig(calib_samples=2))


def test_concat_of_unsigned_inputs_stays_unsigned():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()).eval()

    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = model, nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.head(torch.cat([self.a(x), self.b(x)], 1))

    im = convert(Both().eval(), torch.randn(4, 3, 8, 8), IntegerConfig(calib_samples=4, unsigned_max_bits=8))
    cat = next(s for s in im.steps if isinstance(s, IntConcat))
    assert (cat.qmin, cat.qmax) == (0, 255)
