"""Integer-only conversion: dyadic arithmetic, integer-only proof, bit-exact float simulation, models."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from winoq.integer import DyadicRangeError, IntegerConfig, IntegerConversionError, convert, dyadic, requantize
from winoq.integer.dyadic import requantize_float
from winoq.models import cifar_resnet20, fmnist_resnet, resnet18


def _random_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


class RecordOps(TorchDispatchMode):
    """Records every aten op with the dtypes of its tensor inputs and outputs."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat_in = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        flat_out = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        self.ops.append((str(func), [t.dtype for t in flat_in], [t.dtype for t in flat_out]))
        return out


# ----------------------------------------------------------------------------- dyadic numbers
@given(st.floats(min_value=1e-9, max_value=1e6, allow_nan=False))
def test_dyadic_is_the_rounded_mantissa(scale):
    b, c = dyadic(scale)
    assert 2 ** 30 <= b < 2 ** 31
    m, e = math.frexp(scale)
    assert b / 2 ** c == pytest.approx(scale, rel=2 ** -30)
    assert (b, c) == (round(m * 2 ** 31), 31 - e) or (b, c) == (2 ** 30, 30 - e)


def test_dyadic_renormalizes_a_mantissa_rounding_to_2_31():
    scale = math.ldexp(1 - 2 ** -40, -3)  # mantissa just below 1: rounds to 2^31
    assert round(math.frexp(scale)[0] * 2 ** 31) == 2 ** 31
    b, c = dyadic(scale)
    assert (b, c) == (2 ** 30, 31 - math.frexp(scale)[1] - 1)
    assert b / 2 ** c == scale * (1 + 2 ** -40) or abs(b / 2 ** c - scale) < 1e-12 * scale


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-2 ** 32 + 1, 2 ** 32 - 1), min_size=1, max_size=8),
       st.integers(1, 2 ** 31 - 1), st.integers(1, 62))
@example(zs=[4_294_963_665], b=2_147_483_398, c=62)   # z b + 2^(c-1) passes int64: the rounding goes to the remainder
def test_float_simulation_is_exact_for_every_shift(zs, b, c):
    """Shifts up to 62 occur (a channel with tiny weights); the float64 twin must stay exact there."""
    z = torch.tensor(zs, dtype=torch.int64)
    exact = [(zi * b + (1 << (c - 1))) >> c for zi in zs]
    assert requantize(z, torch.tensor(b), torch.tensor(c)).tolist() == exact
    assert requantize_float(z, torch.tensor(b), torch.tensor(c)).tolist() == [float(e) for e in exact]


def test_dyadic_underflow_names_the_layer():
    with pytest.raises(DyadicRangeError, match="layer1.conv.*underflows"):
        dyadic(1e-25, "layer1.conv")


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(-2 ** 31 + 1, 2 ** 31 - 1), min_size=1, max_size=20),
       st.floats(min_value=1e-9, max_value=10.0))
def test_requantize_rounds_half_up_and_float_simulation_agrees(zs, scale):
    b, c = dyadic(scale)
    z = torch.tensor(zs, dtype=torch.int64)
    bt, ct = torch.tensor(b), torch.tensor(c)
    out = requantize(z, bt, ct)
    exact = [(zi * b + (1 << (c - 1))) >> c for zi in zs]  # python ints: exact
    assert out.tolist() == exact
    assert requantize_float(z, bt, ct).tolist() == [float(e) for e in exact]


# ----------------------------------------------------------------------------- integer-only
def _tiny_cifar():
    torch.manual_seed(0)
    return _random_bn(cifar_resnet20())


def test_forward_integer_uses_no_floating_point_op():
    model = _tiny_cifar()
    x = torch.randn(8, 3, 32, 32)
    im = convert(model, x)
    q = im.quantize_input(x)
    with im.kernels("torch"), RecordOps() as rec:  # the definition: every step in aten ops
        z = im.forward_integer(q)
    with RecordOps() as rec_compiled:  # the compiled convs (integer C++ kernels) and the aten ops around them
        z_compiled = im.forward_integer(q)
    assert len(rec.ops) > 50 and any("convolution" in op for op, _, _ in rec.ops)
    for ops in (rec.ops, rec_compiled.ops):
        floating = [(op, i, o) for op, i, o in ops if any(d.is_floating_point for d in i + o)]
        assert not floating, f"floating-point ops between input quantization and dequantization: {floating[:5]}"
        assert not any("div" in op for op, _, _ in ops)
    assert torch.equal(z_compiled, z)
    assert torch.equal(im.dequantize(z), im(x))


def test_integer_model_matches_float_simulation_bit_for_bit():
    model = _tiny_cifar()
    x = torch.randn(6, 3, 32, 32)
    for cfg in (IntegerConfig(), IntegerConfig(weight_bits=4, act_bits=4, rounding_iters=5)):
        im = convert(model, x, cfg)
        codes = im.forward_integer(im.quantize_input(x))
        assert torch.equal(codes.double(), im.simulate_codes(x))


def test_w8a8_close_to_float_and_unsigned_4bit_relu():
    model = _tiny_cifar()
    x = torch.randn(16, 3, 32, 32)
    ref = model(x).detach()
    im = convert(model, x)
    assert (im(x) - ref).abs().max() < 0.08 * ref.abs().max()
    im4 = convert(model, x, IntegerConfig(weight_bits=4, act_bits=4, weight_rounding="nearest"))
    ranges = {(s.qmin, s.qmax) for s in im4.steps if hasattr(s, "qmin")}
    assert (0, 15) in ranges  # 4-bit post-ReLU activations: unsigned, zero point 0
    assert (0, 127) in {(s.qmin, s.qmax) for s in im.steps if hasattr(s, "qmin")}


def test_bn_folding_matches_float64_conv_bn():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 36, 4))
    _random_bn(model)
    x = torch.randn(32, 3, 6, 6)
    im = convert(model, x, IntegerConfig(weight_bits=12, act_bits=12, first_last_8bit=False))
    ref = model.double()(x.double())
    assert (im(x).double() - ref).abs().max() < 5e-3 * ref.abs().max()


@pytest.mark.parametrize("build,shape", [
    (lambda: fmnist_resnet(), (1, 28, 28)),
    (lambda: resnet18(), (3, 32, 32)),
])
def test_fmnist_and_torchvision_named_resnets_convert(build, shape):
    torch.manual_seed(0)
    model = _random_bn(build())
    x = torch.randn(4, *shape)
    im = convert(model, x, IntegerConfig(calib_samples=4))
    ref = model(x).detach()
    assert (im(x) - ref).abs().max() < 0.1 * ref.abs().max()
    assert torch.equal(im.forward_integer(im.quantize_input(x)).double(), im.simulate_codes(x))
    assert any(i.name.endswith("downsample.0") for i in im.layers)


def test_mixed_layer_bits_are_applied():
    model = _tiny_cifar()
    x = torch.randn(4, 3, 32, 32)
    im = convert(model, x, IntegerConfig(layer_bits={"layer1.0.conv1": 4}))
    bits = {i.name: (i.weight_bits, i.act_bits) for i in im.layers}
    assert bits["layer1.0.conv1"] == (4, 4) and bits["layer1.0.conv2"] == (8, 8)
    assert bits["conv1"] == (8, 8) and bits["linear"] == (8, 8)


# ----------------------------------------------------------------------------- bad input
class DataDependent(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.gate = DataDependent()

    def forward(self, x):
        return self.gate(self.conv(x))


def test_untraceable_model_names_the_module_and_the_leaf_fix():
    with pytest.raises(IntegerConversionError, match=r"'gate'.*leaf_modules=\('gate',\)"):
        convert(Untraceable(), torch.randn(2, 1, 5, 5))
    # marked as a leaf it traces, and the unsupported op is then named
    with pytest.raises(IntegerConversionError, match="gate.*DataDependent.*not supported"):
        convert(Untraceable(), torch.randn(2, 1, 5, 5), leaf_modules=("gate",))


class TwoBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.tiny = nn.Conv2d(1, 2, 3, bias=False)
        self.big = nn.Conv2d(1, 2, 3, bias=False)
        with torch.no_grad():
            self.tiny.weight.mul_(1e-30)

    def forward(self, x):
        return (self.tiny(x) + self.big(x)).flatten(1)


def test_scale_ratio_underflow_names_the_layer():
    with pytest.raises(DyadicRangeError, match="residual add 'add'.*underflows the dyadic range"):
        convert(TwoBranches(), torch.randn(2, 1, 5, 5))


def test_learned_rounding_below_8_bits_beats_nearest_and_stays_integer():
    torch.manual_seed(0)
    model = _random_bn(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                     nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                     nn.Flatten(), nn.Linear(16 * 64, 5)))
    x = torch.randn(32, 3, 8, 8)
    ref = model(x).detach()
    cfg = dict(weight_bits=4, act_bits=8, first_last_8bit=False, layer_calib_samples=32)
    near = convert(model, x, IntegerConfig(weight_rounding="nearest", **cfg))
    learned = convert(model, x, IntegerConfig(rounding_iters=60, **cfg))  # "auto": learned below 8 bits
    err = lambda im: float(((im(x) - ref) ** 2).sum() / (ref ** 2).sum())  # noqa: E731
    assert err(learned) < err(near)
    w = [s.weight for s in learned.steps if hasattr(s, "weight") and isinstance(s.weight, torch.Tensor)]
    assert all(int(t.abs().max()) <= 7 for t in w)
    assert any(not torch.equal(a, b) for a, b in zip(w, [s.weight for s in near.steps if hasattr(s, "weight")]))
    assert torch.equal(learned.forward_integer(learned.quantize_input(x)).double(), learned.simulate_codes(x))
    with pytest.raises(ValueError, match="weight_rounding"):
        IntegerConfig(weight_rounding="ada")
