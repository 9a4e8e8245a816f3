"""The compiled steps of integer graphs (winoq.kernels.int_graph) against their definitions:
IntConv2d.forward_torch, Requantize.forward and IntAdd.forward, bit for bit on every
instruction-set build; the fallbacks and the errors."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from winoq.integer.layers import IntAdd, IntConv2d, Requantize
from winoq.kernels import int_graph

ISAS = ["portable", "avx2"] + (["avx512-vnni"] if int_graph.isa() == "avx512-vnni" else [])
needs_build = pytest.mark.skipif(not int_graph.available(), reason="the compiled kernels could not be built here")


def random_conv(c, k, ks=3, stride=1, pad=1, seed=0, w_max=127, bias_max=100000) -> IntConv2d:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randint(-w_max, w_max + 1, (k, c, ks, ks), generator=gen)
    b = torch.randint(-bias_max, bias_max + 1, (k,), generator=gen)
    return IntConv2d("t", w, b, nn.Conv2d(c, k, ks, stride, pad), wide=False)


def codes(shape, seed=1, lo=-127, hi=127, dtype=torch.int32):
    return torch.randint(lo, hi + 1, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int64).to(dtype)


def multipliers(k, seed=2, per_channel=True):
    gen = torch.Generator().manual_seed(seed)
    n = k if per_channel else 1
    b = torch.randint(2**29, 2**31 - 1, (n,), generator=gen)
    c = torch.randint(20, 34, (n,), generator=gen)
    return (b.reshape(1, -1, 1, 1), c.reshape(1, -1, 1, 1)) if per_channel else (b[0], c[0])


def channels_last_int8(x):
    return x.to(torch.int8).contiguous(memory_format=torch.channels_last)


SHAPES = [  # c, k, kernel, stride, pad, (h, w)
    (16, 16, 3, 1, 1, (9, 7)), (3, 16, 3, 1, 1, (8, 8)), (40, 70, 3, 2, 1, (11, 12)), (64, 128, 1, 2, 0, (8, 8)),
    (13, 33, 5, 1, 2, (10, 9)), (8, 48, 3, 1, 0, (6, 6)), (32, 64, 1, 1, 0, (5, 3)), (24, 40, 7, 2, 3, (13, 13)),
    (16, 32, 3, 3, 1, (10, 11)), (20, 16, 3, 1, 1, (1, 1)),
    # packed rows (C not a multiple of 4, fewer steps than quads per tap): a ResNet stem, 1 and 6 channels
    (3, 64, 7, 2, 3, (21, 18)), (1, 16, 3, 1, 1, (9, 8)), (6, 16, 5, 2, 2, (11, 10)),
]


@needs_build
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("c, k, ks, s, p, hw", SHAPES)
def test_conv_equals_definition(isa, c, k, ks, s, p, hw):
    step = random_conv(c, k, ks, s, p)
    x = codes((2, c, *hw))
    ref = step.forward_torch(x)
    y = int_graph.conv(step, x, isa=isa)
    assert y.dtype == torch.int32 and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, ref)
    assert torch.equal(int_graph.conv(step, channels_last_int8(x), isa=isa), ref)  # int8 channels-last input
    assert torch.equal(int_graph.conv(step, x.to(torch.int8), isa=isa), ref)        # int8 NCHW
    assert torch.equal(int_graph.conv(step, x.contiguous(memory_format=torch.channels_last), isa=isa), ref)
    assert torch.equal(int_graph.conv(step, x.transpose(2, 3).contiguous().transpose(2, 3), isa=isa), ref)  # strided


@needs_build
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("c, k, ks, s, p, hw", SHAPES[:6])
def test_fused_requantize_and_add(isa, c, k, ks, s, p, hw):
    step = random_conv(c, k, ks, s, p, bias_max=5000)
    x = codes((2, c, *hw))
    acc = step.forward_torch(x)
    b, cc = multipliers(k)
    rq = Requantize(b, cc, -127, 127)
    y = int_graph.conv(step, x, int_graph.Epilogue(b, cc, -127, 127), isa=isa)
    assert y.dtype == torch.int8 and torch.equal(y.int(), rq(acc))
    ob, oc = multipliers(k, seed=5, per_channel=False)
    add = IntAdd(b, cc, ob, oc, 0, 127)  # the conv as the add's first input, ReLU clamp
    epi = int_graph.Epilogue(b, cc, 0, 127, ob, oc)
    for other in (codes(acc.shape, seed=7), codes(acc.shape, seed=8, lo=-2**20, hi=2**20)):  # codes, an accumulator
        o = other.to(torch.int8) if int(other.abs().max()) < 128 else other
        y = int_graph.conv(step, x, epi, other=o, isa=isa)
        assert torch.equal(y.int(), add(acc, other))
        assert torch.equal(int_graph.requantize(acc, epi, other=o, isa=isa).int(), add(acc, other))


@needs_build
def test_conv_two_threads_and_row_jobs():
    step = random_conv(48, 64, 3, 1, 1)
    x = codes((3, 48, 13, 11))
    ref = step.forward_torch(x)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for rows in (0, 1, 2, 5):
            assert torch.equal(int_graph.conv(step, x, rows=rows), ref)
    finally:
        torch.set_num_threads(threads)


@needs_build
@pytest.mark.parametrize("isa", ISAS)
def test_row_jobs_every_epilogue(isa):
    # output rows per parallel job shorter than, equal to and longer than an image's 13: every epilogue
    step = random_conv(20, 40, 3, 1, 1, bias_max=5000)
    x = codes((3, 20, 13, 6))
    acc = step.forward_torch(x)
    b, c = multipliers(40)
    ob, oc = multipliers(40, seed=5, per_channel=False)
    other = codes(acc.shape, seed=7).to(torch.int8)
    add = IntAdd(b, c, ob, oc, 0, 127)(acc, other.int())
    fx = torch.randn(3, 20, 13, 6, generator=torch.Generator().manual_seed(1)) * 4
    scale = torch.rand(40, generator=torch.Generator().manual_seed(2)) * 1e-3
    fref = float_conv_reference(step, fx, 20.0, scale)
    for rows in (1, 4, 5, 13, 14, 40):
        assert torch.equal(int_graph.conv(step, x, isa=isa, rows=rows), acc)
        y = int_graph.conv(step, x, int_graph.Epilogue(b, c, 0, 127, ob, oc), other=other, isa=isa, rows=rows)
        assert torch.equal(y.int(), add)
        assert torch.equal(int_graph.conv_float(step, fx, 20.0, scale, isa=isa, rows=rows), fref)


@needs_build
@settings(max_examples=25, deadline=None)
@given(c=st.integers(1, 40), k=st.integers(1, 70), ks=st.sampled_from([1, 3, 5]), s=st.sampled_from([1, 2]),
       h=st.integers(1, 12), w=st.integers(1, 12), n=st.integers(1, 3), seed=st.integers(0, 1000))
def test_conv_any_shape(c, k, ks, s, h, w, n, seed):
    step = random_conv(c, k, ks, s, ks // 2, seed=seed)
    x = codes((n, c, h, w), seed=seed)
    ref = step.forward_torch(x)
    b, cc = multipliers(k, seed=seed)
    for isa in ISAS:
        assert torch.equal(int_graph.conv(step, x, isa=isa), ref)
        assert torch.equal(int_graph.conv(step, channels_last_int8(x), isa=isa), ref)
        assert torch.equal(int_graph.conv(step, x, int_graph.Epilogue(b, cc, -8, 7), isa=isa).int(),
                           Requantize(b, cc, -8, 7)(ref))


@needs_build
def test_extreme_codes_and_shifts():
    """Codes at -128 / 127, weights at +-127, and shifts up to 62: every int64 step exact."""
    step = random_conv(64, 16, 3, 1, 1, w_max=127, bias_max=2**20)
    x = torch.full((1, 64, 5, 5), -128, dtype=torch.int32)
    x[..., ::2] = 127
    acc = step.forward_torch(x)
    b = torch.full((1, 16, 1, 1), 2**31 - 1)
    for c in (1, 31, 45, 62):
        cc = torch.full((1, 16, 1, 1), c)
        for isa in ISAS:
            assert torch.equal(int_graph.conv(step, x, int_graph.Epilogue(b, cc, -128, 127), isa=isa).int(),
                               Requantize(b, cc, -128, 127)(acc))


@needs_build
def test_intconv_forward_uses_the_kernel_for_codes_only():
    step = random_conv(16, 16)
    x = codes((1, 16, 6, 6))
    assert step.compiled()
    assert step(x).is_contiguous(memory_format=torch.channels_last)  # the kernel's layout
    assert torch.equal(step(x), step.forward_torch(x))
    wide = codes((1, 16, 6, 6), lo=0, hi=255)  # 8-bit unsigned codes: not int8, PyTorch runs it
    assert torch.equal(step(wide), step.forward_torch(wide))
    step.kernel = "torch"
    assert not step.compiled()


@needs_build
def test_errors():
    step = random_conv(8, 16)
    with pytest.raises(RuntimeError, match="8-bit input codes"):
        int_graph.conv(step, codes((1, 8, 4, 4), lo=0, hi=300))
    with pytest.raises(ValueError, match="does not fit"):
        int_graph.Epilogue(torch.tensor(2**30), torch.tensor(31), 0, 255)
    with pytest.raises(ValueError, match="both ob and oc"):
        int_graph.Epilogue(torch.tensor(2**30), torch.tensor(31), 0, 127, ob=torch.tensor(1))
    epi = int_graph.Epilogue(torch.tensor(2**30), torch.tensor(31), 0, 127)
    with pytest.raises(ValueError, match="added value"):
        int_graph.conv(step, codes((1, 8, 4, 4)), epi, other=codes((1, 16, 4, 4)))
    with pytest.raises(ValueError, match="int8 codes or an int32"):
        int_graph.requantize(codes((1, 16, 4, 4), dtype=torch.int64), epi)
    with pytest.raises(ValueError, match="channels"):
        int_graph.conv(step, codes((1, 8, 4, 4)), int_graph.Epilogue(torch.ones(3, dtype=torch.int64) * 2**30,
                                                                     torch.full((3,), 31), 0, 127))
    wide = IntConv2d("w", torch.ones(4, 4, 3, 3), torch.zeros(4), nn.Conv2d(4, 4, 3), wide=True)
    assert "int64" in int_graph.conv_unsupported_reason(wide)
    with pytest.raises(ValueError, match="int64"):
        int_graph.conv(wide, codes((1, 4, 5, 5)))
    grouped = IntConv2d("g", torch.ones(4, 2, 3, 3), torch.zeros(4), nn.Conv2d(4, 4, 3, groups=2), wide=False)
    assert "groups" in int_graph.conv_unsupported_reason(grouped)
    assert not grouped.compiled()


def test_without_a_compiler(no_compiler):
    no_compiler(int_graph)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not int_graph.available()
    assert any("could not be built" in str(w.message) for w in caught)
    step = random_conv(8, 16)
    x = codes((1, 8, 5, 5))
    assert not step.compiled()
    assert torch.equal(step(x), step.forward_torch(x))  # the PyTorch definition runs
    with pytest.raises(RuntimeError, match="setup.sh"):
        int_graph.conv(step, x)


@needs_build
@pytest.mark.parametrize("stride", [(2, 1), (1, 2), (3, 2)])
def test_unequal_strides(stride):
    gen = torch.Generator().manual_seed(3)
    w = torch.randint(-127, 128, (32, 12, 3, 3), generator=gen)
    step = IntConv2d("s", w, torch.zeros(32), nn.Conv2d(12, 32, 3, stride, 1), wide=False)
    x = codes((2, 12, 13, 11))
    for isa in ISAS:
        assert torch.equal(int_graph.conv(step, x, isa=isa), step.forward_torch(x))


def test_wrong_objects_are_named():
    from winoq.integer import compile_model

    with pytest.raises(ValueError, match="not an IntConv2d"):
        int_graph.conv(nn.Conv2d(1, 1, 1), torch.zeros(1, 1, 2, 2, dtype=torch.int8))
    with pytest.raises(TypeError, match="IntegerModel"):
        compile_model(nn.Conv2d(1, 1, 1))


# ----------------------------------------------------------------------------- float input and output
def float_conv_reference(step, x, inv, scale):
    """conv_float's definition: codes clamp(round(x * inv)), the integer conv, times the scale."""
    q = torch.round(x * torch.tensor(inv, dtype=torch.float32)).clamp(-128, 127).to(torch.int32)
    return step.forward_torch(q).float() * scale.view(1, -1, 1, 1)


FLOAT_SHAPES = [  # c, k, kernel, stride, pad, (h, w): rows shorter than, equal to and past 16 pixels
    (16, 16, 3, 1, 1, (9, 7)), (3, 17, 3, 1, 1, (8, 16)), (40, 70, 3, 2, 1, (11, 17)), (64, 32, 1, 1, 0, (5, 33)),
    (13, 33, 5, 1, 2, (10, 9)), (16, 32, 3, 3, 1, (10, 11)), (1, 3, 3, 1, 1, (28, 28)),
]


@needs_build
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("c, k, ks, s, p, hw", FLOAT_SHAPES)
def test_conv_float_equals_definition(isa, c, k, ks, s, p, hw):
    step = random_conv(c, k, ks, s, p, w_max=127, bias_max=1000)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, c, *hw, generator=gen) * 4
    inv, scale = 20.0, torch.rand(k, generator=gen) * 1e-3
    ref = float_conv_reference(step, x, inv, scale)
    for layout in (x, x.contiguous(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3)):
        y = int_graph.conv_float(step, layout, inv, scale, isa=isa)
        assert y.dtype == torch.float32 and y.is_contiguous() and torch.equal(y, ref)


@needs_build
@pytest.mark.parametrize("isa", ISAS)
def test_conv_float_rounds_ties_to_even_and_clamps(isa):
    step = random_conv(4, 16, 1, 1, 0)
    # x * inv lands exactly on .5 (ties: to even, as torch.round), beyond +-128, and at the infinities
    vals = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 127.5, 130.0, -127.5, -128.5, -300.0,
                         float("inf"), float("-inf"), 3.49, -3.51]) / 4
    x = vals.repeat(2, 4, 20, 1)[:, :, :, :16]
    scale = torch.ones(16)
    y = int_graph.conv_float(step, x, 4.0, scale, isa=isa)
    assert torch.equal(y, float_conv_reference(step, x, 4.0, scale))
    q = torch.round(vals * 4).clamp(-128, 127)
    assert q.tolist()[:12] == [0, 2, 2, -0, -2, -2, 126, 127, 127, -128, -128, -128]


@needs_build
def test_conv_float_errors():
    step = random_conv(4, 8)
    with pytest.raises(ValueError, match="float32 input"):
        int_graph.conv_float(step, torch.zeros(1, 4, 5, 5, dtype=torch.float64), 1.0, torch.ones(8))
    with pytest.raises(ValueError, match="one float32 scale per output channel"):
        int_graph.conv_float(step, torch.zeros(1, 4, 5, 5), 1.0, torch.ones(7))
    with pytest.raises(ValueError, match="conv_float"):
        int_graph.conv(step, torch.zeros(1, 4, 5, 5), isa="portable")


@needs_build
def test_conv_float_two_threads():
    step = random_conv(32, 48, 3, 1, 1)
    x = torch.randn(3, 32, 12, 20, generator=torch.Generator().manual_seed(0))
    scale = torch.rand(48)
    ref = float_conv_reference(step, x, 10.0, scale)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert torch.equal(int_graph.conv_float(step, x, 10.0, scale), ref)
    finally:
        torch.set_num_threads(threads)


@needs_build
@pytest.mark.parametrize("isa", ISAS)
def test_quantize_input_equals_the_integer_models_definition(isa):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 17, 19, generator=gen) * 3
    x[0, 0, 0, :8] = torch.tensor([0.125, 0.375, 0.625, -0.125, -0.375, 31.875, 40.0, -40.0])  # ties at scale 1/4
    x[1, 2, 3, :5] = torch.tensor([float("inf"), -float("inf"), 3e38, -3e38, 1e-40])
    # quotients by 0.1 close to half-integers (float32 inputs: about 1e-8 away); the exact ties above (scale
    # 1/4) take the kernel's division path
    x[1, 0, 0, :] = (torch.arange(19, dtype=torch.float64) + 0.5).mul(0.1).float()
    for scale, qmax in ((0.25, 31), (0.0371, 127), (1e-3, 127), (0.1, 127), (1 / 3, 127)):
        ref = torch.round(x.double() / scale).clamp(-qmax, qmax).to(torch.int32)
        for layout in (x, x.contiguous(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3)):
            y = int_graph.quantize_input(layout, scale, qmax, isa=isa)
            assert y.dtype == torch.int8 and y.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(y.to(torch.int32), ref)
    with pytest.raises(ValueError, match="float32"):
        int_graph.quantize_input(x.double(), 0.1, 127)


@needs_build
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("c, k, s, p, hw", [(64, 3, 2, 1, (12, 12)), (3, 3, 2, 1, (7, 9)), (130, 2, 2, 0, (6, 5)),
                                            (65, (3, 2), (2, 1), (1, 0), (8, 7)), (1, 5, 1, 2, (5, 5)),
                                            (16, 3, 3, 1, (1, 1))])
def test_max_pool_equals_torch(isa, c, k, s, p, hw):
    x = codes((2, c, *hw), lo=-128, hi=127, dtype=torch.int8)
    pair = lambda v: (v, v) if isinstance(v, int) else v  # noqa: E731
    ref = torch.nn.functional.max_pool2d(x.int(), k, s, p)
    for layout in (x, x.contiguous(memory_format=torch.channels_last)):
        y = int_graph.max_pool(layout, pair(k), pair(s), pair(p), isa=isa)
        assert y.dtype == torch.int8 and y.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(y.int(), ref)


@needs_build
def test_max_pool_errors():
    x = codes((1, 4, 6, 6), dtype=torch.int8)
    with pytest.raises(ValueError, match="int8"):
        int_graph.max_pool(x.int(), (2, 2), (2, 2), (0, 0))
    with pytest.raises(RuntimeError, match="padding"):
        int_graph.max_pool(x, (2, 2), (2, 2), (2, 2))
