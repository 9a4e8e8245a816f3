"""Tests for winoq.winograd.quantized (the fully quantized Winograd layer) and
winoq.winograd.scales (data-free learning of the diagonal transform scales)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from winoq.winograd.quantized import QuantWinogradConv2d, StageFormats
from winoq.winograd.scales import ScaleLearningConfig, learn_layer_scales, sqnr_db
from winoq.winograd.transforms import toom_cook

FLOAT = StageFormats(None, None, None, None)


def rel_err(y, ref) -> float:
    return float((y - ref).detach().norm() / ref.detach().norm())


def make_layer(c, k, m, groups=1, group_size=32, scale_mode="shared", formats=StageFormats(), padding=1,
               bias=True, seed=0, r=3):
    gen = torch.Generator().manual_seed(seed)
    layer = QuantWinogradConv2d(c, k, r, m, padding=padding, bias=bias, groups=groups, formats=formats,
                                group_size=group_size, scale_mode=scale_mode).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen, dtype=torch.float64))
        if bias:
            layer.bias.copy_(torch.randn(k, generator=gen, dtype=torch.float64))
    return layer


def rand_input(shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --------------------------------------------------------------------------- exactness without quantization


@pytest.mark.parametrize("m", [2, 4, 6])
@pytest.mark.parametrize("groups,c,k", [(1, 5, 6), (2, 6, 4), (4, 4, 8)])
def test_float_formats_equal_conv2d(m, groups, c, k):
    layer = make_layer(c, k, m, groups=groups, formats=FLOAT)
    x = rand_input((1, c, 9, 11))
    ref = F.conv2d(x, layer.weight, layer.bias, padding=1, groups=groups)
    assert rel_err(layer(x), ref) < 1e-10


@pytest.mark.parametrize("m", [2, 4, 6])
def test_diagonal_scales_keep_the_float_layer_exact(m):
    layer = make_layer(6, 6, m, groups=2, formats=FLOAT)
    n = layer.tc.n
    gen = torch.Generator().manual_seed(m)
    s_b = torch.exp(torch.rand(n, generator=gen, dtype=torch.float64) * 4 - 2)
    s_g = torch.exp(torch.rand(n, generator=gen, dtype=torch.float64) * 4 - 2)
    layer.set_diagonal_scales(s_b, s_g)
    torch.testing.assert_close(layer.log_sb.exp(), s_b, rtol=1e-14, atol=0)
    at, g, bt = layer.transforms(torch.float64, "cpu")
    assert not torch.allclose(bt, layer.tc.BT)  # the scales are really applied
    x = rand_input((1, 6, 10, 7))
    ref = F.conv2d(x, layer.weight, layer.bias, padding=1, groups=2)
    assert rel_err(layer(x), ref) < 1e-10


def test_free_transforms_start_exact_and_are_parameters():
    layer = make_layer(4, 4, 4, formats=FLOAT)
    tc = layer.tc
    layer.set_free_transforms(tc.AT, tc.G, tc.BT)
    assert {n for n, _ in layer.named_parameters()} >= {"free_transforms.AT", "free_transforms.G", "free_transforms.BT"}
    x = rand_input((1, 4, 8, 8))
    assert rel_err(layer(x), F.conv2d(x, layer.weight, layer.bias, padding=1)) < 1e-10
    with torch.no_grad():
        layer.free_transforms["G"][1, 0] += 0.1  # no longer the exact transform
    assert rel_err(layer(x), F.conv2d(x, layer.weight, layer.bias, padding=1)) > 1e-4


def test_from_float64_conv_keeps_float64():
    gen = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen, dtype=torch.float64))
    layer = QuantWinogradConv2d.from_conv(conv, 4, formats=FLOAT)
    x = rand_input((1, 4, 9, 9))
    assert layer.weight.dtype == torch.float64
    assert rel_err(layer(x), conv(x)) < 1e-10


def test_from_conv_copies_weights(seed):
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    layer = QuantWinogradConv2d.from_conv(conv, 4, group_size=2, scale_mode="tapwise")
    assert torch.equal(layer.weight, conv.weight) and torch.equal(layer.bias, conv.bias)
    assert (layer.groups, layer.group_size, layer.scale_mode, layer.m) == (2, 2, "tapwise", 4)
    assert torch.equal(layer.log_sb, torch.zeros(6)) and not layer.log_sb.requires_grad
    with pytest.raises(ValueError):
        QuantWinogradConv2d.from_conv(nn.Conv2d(4, 4, 3, stride=2), 4)


# --------------------------------------------------------------------------- forward vs integer twin


CASES = [
    # (c, k, groups, group_size)
    (6, 6, 1, 3),      # group size divides the channels
    (6, 4, 1, 4),      # ragged last group
    (6, 6, 1, None),   # one group for all channels
    (6, 6, 1, 32),     # group larger than the channels
    (8, 6, 2, 2),      # conv groups, dividing
    (8, 6, 2, 3),      # conv groups, ragged inside each conv group
    (4, 4, 4, 32),     # depthwise
    (3, 6, 3, 1),      # depthwise with channel multiplier
]


# Exact agreement needs inputs free of exact rounding ties. With the input stage
# quantized, V = BT d B is a small-integer combination of codes sharing one scale,
# so V / s_V often lands exactly on k + 1/2 and the two float evaluation orders
# round it differently; likewise M when each M scale covers a single product
# (one input channel per conv group), and V of a single channel in a tile that is
# mostly zero padding. Those stages are left in float (and tiles whole) here; the
# input stage is checked on its own below and the tie case in an xfail test.
NO_TIES = StageFormats(None, "int8", "int8", "int8")
NO_TIES_DEPTHWISE = StageFormats(None, "int8", "int8", None)


# every case in both scale modes, the tile sizes rotated over the cases
INTEGER_CASES = [case + (m, mode) for i, case in enumerate(CASES)
                 for m, mode in (((2, 4, 6)[i % 3], "shared"), ((6, 2, 4)[i % 3], "tapwise"))]


@pytest.mark.parametrize("c,k,groups,group_size,m,scale_mode", INTEGER_CASES)
def test_forward_integer_matches_forward(c, k, groups, group_size, m, scale_mode):
    formats = NO_TIES_DEPTHWISE if c == groups else NO_TIES
    layer = make_layer(c, k, m, groups=groups, group_size=group_size, scale_mode=scale_mode, seed=c * k + m,
                       formats=formats)
    hw = 8 if m == 4 else 6
    x = rand_input((2, c, hw, hw), seed=m)  # whole tiles: no tile is mostly padding (rank-1 V, ties)
    y = layer(x)
    yi = layer.forward_integer(x)
    assert yi.dtype == torch.float64 and yi.shape == y.shape
    assert rel_err(yi, y) < 1e-9
    err = rel_err(y, F.conv2d(x, layer.weight, layer.bias, padding=1, groups=groups))
    if c == groups and scale_mode == "tapwise":
        assert err < 1e-12  # one channel per group and a scale per tap: every value is its group's max
    else:
        assert err > 1e-6  # quantization did happen


@pytest.mark.parametrize("c,k,groups,group_size", [(6, 6, 1, 3), (6, 4, 1, 4), (8, 6, 2, 3), (6, 6, 1, None)])
def test_forward_integer_matches_forward_full_int8(c, k, groups, group_size):
    """All four stages int8 (seeds without exact ties)."""
    layer = make_layer(c, k, 4, groups=groups, group_size=group_size, seed=c * k + 4)
    x = rand_input((2, c, 7, 9), seed=4)
    assert rel_err(layer.forward_integer(x), layer(x)) < 1e-9


@pytest.mark.xfail(strict=True, reason="forward and forward_integer round exact ties of V/s_V and M/s_M "
                                       "differently (float evaluation order), so they differ by whole codes")
def test_forward_integer_matches_forward_on_ties():
    layer = make_layer(3, 6, 2, groups=3, group_size=1, seed=20)
    x = rand_input((2, 3, 7, 9), seed=2)
    assert rel_err(layer.forward_integer(x), layer(x)) < 1e-9


@pytest.mark.parametrize("group_size", [2, 4, None])
@pytest.mark.parametrize("scale_mode", ["shared", "tapwise"])
def test_input_stage_is_per_sample_and_channel_group(group_size, scale_mode):
    layer = make_layer(6, 4, 4, group_size=group_size, scale_mode=scale_mode,
                       formats=StageFormats("int8", None, None, None))
    layer.activation_granularity = "sample"
    x = rand_input((2, 6, 9, 8))
    xq = _fq_groups(x, 1, group_size, (2, 3))
    assert not torch.allclose(xq, x)
    ref = F.conv2d(xq, layer.weight, layer.bias, padding=1)
    assert rel_err(layer(x), ref) < 1e-10


def test_forward_integer_with_diagonal_scales_and_mixed_formats():
    layer = make_layer(6, 6, 4, group_size=4, formats=StageFormats("int8", "int6", "int4", "int8"))
    gen = torch.Generator().manual_seed(9)
    layer.set_diagonal_scales(torch.rand(6, generator=gen) + 0.5, torch.rand(6, generator=gen) + 0.5)
    x = rand_input((1, 6, 8, 8))
    assert rel_err(layer.forward_integer(x), layer(x)) < 1e-9


def test_forward_integer_needs_integer_formats():
    layer = make_layer(4, 4, 2, formats=StageFormats("int8", "fp8_e4m3", "int8", "int8"))
    with pytest.raises(ValueError, match="integer"):
        layer.forward_integer(rand_input((1, 4, 6, 6)))
    layer = make_layer(4, 4, 2, formats=StageFormats("int8", "int8", None, "int8"))
    with pytest.raises(ValueError, match="integer"):
        layer.forward_integer(rand_input((1, 4, 6, 6)))


def test_bad_scale_mode():
    with pytest.raises(ValueError, match="scale_mode"):
        QuantWinogradConv2d(4, 4, 3, 2, scale_mode="per-tap")


# --------------------------------------------------------------------------- independent reference


def _fq_groups(t: torch.Tensor, axis: int, gs: int | None, reduce: tuple[int, ...], fmt_max=127.0, qmin=-128):
    """Symmetric int fake quantization of t, one scale per group of ``gs`` along
    ``axis`` (the last one shorter) and per index of every dim not in ``reduce``,
    written with explicit slicing."""
    out = torch.empty_like(t)
    size = t.shape[axis]
    step = size if gs is None else gs
    for start in range(0, size, step):
        sl = [slice(None)] * t.ndim
        sl[axis] = slice(start, min(start + step, size))
        part = t[tuple(sl)]
        amax = part.abs().amax(dim=(axis,) + reduce, keepdim=True)
        s = (amax / fmt_max).clamp_min(1e-30)
        out[tuple(sl)] = torch.clamp(torch.round(part / s), qmin, fmt_max) * s
    return out


def reference_quant_winograd(layer: QuantWinogradConv2d, x: torch.Tensor) -> torch.Tensor:
    """The documented int8 pipeline for groups == 1, one tile at a time (the
    input stage int8 or float, the other stages int8)."""
    assert layer.groups == 1
    tc, m, r, gs = layer.tc, layer.m, layer.kernel_size, layer.group_size
    n = m + r - 1
    at, g, bt = (t.double() for t in layer.transforms(torch.float64, "cpu"))
    tap = layer.scale_mode == "shared"
    nb, c, h, w = x.shape
    kk = layer.out_channels
    xq = x if layer.formats.input is None else _fq_groups(x, 1, gs, (2, 3))  # per sample and channel group
    p = layer.padding
    xp = F.pad(xq, (p, p, p, p))
    oh, ow = xp.shape[2] - r + 1, xp.shape[3] - r + 1
    th, tw = math.ceil(oh / m), math.ceil(ow / m)
    xp = F.pad(xp, (0, tw * m + r - 1 - xp.shape[3], 0, th * m + r - 1 - xp.shape[2]))
    u = torch.einsum("ai,kcij,bj->kcab", g, layer.weight.double(), g)
    uq = _fq_groups(u, 1, gs, (2, 3) if tap else ())
    y = torch.zeros(nb, kk, th * m, tw * m, dtype=torch.float64)
    for i in range(nb):
        for ty in range(th):
            for tx in range(tw):
                d = xp[i, :, ty * m:ty * m + n, tx * m:tx * m + n]
                v = torch.einsum("ai,cij,bj->cab", bt, d, bt)
                vq = _fq_groups(v, 0, gs, (1, 2) if tap else ())
                mm = torch.einsum("kcab,cab->kab", uq, vq)
                mq = _fq_groups(mm, 0, gs, (1, 2) if tap else ())
                y[i, :, ty * m:(ty + 1) * m, tx * m:(tx + 1) * m] = torch.einsum("ai,kij,bj->kab", at, mq, at)
    y = y[:, :, :oh, :ow]
    return y + layer.bias.double().view(1, -1, 1, 1)


@pytest.mark.parametrize("m,group_size,scale_mode", [(2, 4, "tapwise"), (4, 3, "shared"), (4, 3, "tapwise"),
                                                     (6, None, "shared"), (6, 32, "tapwise")])
def test_forward_matches_independent_reference(m, group_size, scale_mode):
    layer = make_layer(6, 5, m, group_size=group_size, scale_mode=scale_mode, seed=m, formats=NO_TIES)
    gen = torch.Generator().manual_seed(11)
    layer.set_diagonal_scales(torch.rand(layer.tc.n, generator=gen) + 0.5,
                              torch.rand(layer.tc.n, generator=gen) + 0.5)
    x = rand_input((1, 6, 7, 10), seed=3)
    ref = reference_quant_winograd(layer, x)
    assert rel_err(layer(x), ref) < 1e-9
    assert rel_err(layer.forward_integer(x), ref) < 1e-9


def test_tapwise_beats_shared_at_large_tiles():
    x = rand_input((2, 8, 12, 12))
    errs = {}
    for mode in ("shared", "tapwise"):
        layer = make_layer(8, 8, 6, scale_mode=mode)
        errs[mode] = rel_err(layer(x), F.conv2d(x, layer.weight, layer.bias, padding=1))
    assert errs["tapwise"] < errs["shared"] / 10


def test_error_grows_with_the_tile_under_shared_scales():
    x = rand_input((2, 8, 12, 12))
    errs = [rel_err(layer(x), F.conv2d(x, layer.weight, layer.bias, padding=1))
            for layer in (make_layer(8, 8, m) for m in (2, 4, 6))]
    assert errs[0] < errs[1] < errs[2]
    assert errs[0] < 0.05


# --------------------------------------------------------------------------- int32 report


def _lcm_den(mat) -> int:
    return math.lcm(*(v.denominator for row in mat for v in row))


@pytest.mark.parametrize("m,c", [(2, 8), (4, 64), (6, 8), (6, 64)])
def test_int32_report_int8_g32(m, c):
    layer = QuantWinogradConv2d(c, 8, 3, m, padding=1, group_size=32)
    rep = layer.int32_report()
    assert set(rep) == {"input_transform", "hadamard_group_sum", "output_transform"}
    tc = toom_cook(m, 3)

    def worst_transform(mat):
        den = _lcm_den(mat)
        return float(max(sum(abs(v * den) for v in row) for row in mat) ** 2 * 127)

    expected = {
        "input_transform": worst_transform(tc.BT_exact),
        "hadamard_group_sum": float(min(32, c) * 127 * 127),
        "output_transform": worst_transform(tc.AT_exact),
    }
    for key, val in expected.items():
        assert rep[key]["worst_abs"] == pytest.approx(val, rel=1e-12), key
        assert rep[key]["fits_int32"] is True
        assert rep[key]["bits"] == math.ceil(math.log2(val + 1)) + 1
        assert rep[key]["bits"] <= 32


def test_int32_report_flags_overflow():
    layer = QuantWinogradConv2d(64, 8, 3, 6, padding=1, group_size=None,
                                formats=StageFormats("int16", "int16", "int16", "int16"))
    rep = layer.int32_report()
    assert rep["hadamard_group_sum"]["fits_int32"] is False  # 64 * 32767^2
    assert rep["output_transform"]["fits_int32"] is False
    assert rep["output_transform"]["bits"] > 32
    assert QuantWinogradConv2d(4, 4, 3, 2, formats=FLOAT).int32_report() == {}


# --------------------------------------------------------------------------- data-free scale learning


def test_learn_layer_scales_improves_f63_and_keeps_exactness(seed):
    conv = nn.Conv2d(8, 8, 3, padding=1)
    layer = QuantWinogradConv2d.from_conv(conv, 6)
    res = learn_layer_scales(layer, ScaleLearningConfig(steps=5, batch=2, tiles=3))
    assert {"sqnr_standard_db", "sqnr_closed_form_db", "sqnr_learned_db", "alpha", "s_b", "s_g"} <= set(res)
    assert res["sqnr_learned_db"] > res["sqnr_standard_db"] + 10
    assert res["sqnr_learned_db"] >= res["sqnr_closed_form_db"] - 1e-9
    s_b, s_g = torch.tensor(res["s_b"]), torch.tensor(res["s_g"])
    assert torch.isfinite(s_b).all() and (s_b > 0).all() and (s_g > 0).all()
    torch.testing.assert_close(layer.log_sb.exp().double(), s_b.double(), rtol=1e-6, atol=0)
    assert not torch.allclose(s_b, torch.ones_like(s_b))
    # learning touched only the scales, and left them frozen
    assert torch.equal(layer.weight, conv.weight)
    assert not layer.log_sb.requires_grad and layer.weight.requires_grad

    # on a fresh input the quantized layer is really better
    x = torch.randn(2, 8, 12, 12, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = conv(x)
        learned = sqnr_db(layer(x), ref)
        plain = QuantWinogradConv2d.from_conv(conv, 6)
        assert learned > sqnr_db(plain(x), ref) + 10

    # the learned scales leave the unquantized layer exact
    exact = QuantWinogradConv2d(8, 8, 3, 6, padding=1, formats=FLOAT).double()
    exact.load_state_dict(layer.state_dict())
    xd = x.double()
    with torch.no_grad():
        ref64 = F.conv2d(xd, conv.weight.double(), conv.bias.double(), padding=1)
        assert rel_err(exact(xd), ref64) < 1e-10


def test_wide_layers_learn_on_an_output_channel_subset():
    torch.manual_seed(3)
    conv = nn.Conv2d(16, 48, 3, padding=1)
    full = QuantWinogradConv2d.from_conv(conv, 6)
    sub = QuantWinogradConv2d.from_conv(conv, 6)
    cfg = dict(steps=3, batch=1, tiles=3)
    info_full = learn_layer_scales(full, ScaleLearningConfig(max_out_channels=None, **cfg))
    info_sub = learn_layer_scales(sub, ScaleLearningConfig(max_out_channels=12, **cfg))
    assert info_full["out_channels_learned_on"] == 48 and info_sub["out_channels_learned_on"] == 12
    # the layer keeps all of its channels and weights; only its scales changed
    assert sub.out_channels == 48 and torch.equal(sub.weight, conv.weight) and torch.equal(sub.bias, conv.bias)
    assert not torch.allclose(sub.log_sb, torch.zeros_like(sub.log_sb))
    x = torch.randn(2, 16, 12, 12, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = conv(x)
        s_full, s_sub = sqnr_db(full(x), ref), sqnr_db(sub(x), ref)
        s_std = sqnr_db(QuantWinogradConv2d.from_conv(conv, 6)(x), ref)
    assert s_sub > s_std + 10 and abs(s_sub - s_full) < 1.5


def test_scale_learning_config_validation():
    with pytest.raises(ValueError):
        ScaleLearningConfig(max_out_channels=0)
    with pytest.raises(ValueError):
        ScaleLearningConfig(noise="pink")
    with pytest.raises(ValueError):
        ScaleLearningConfig(steps=-1)
    with pytest.raises(ValueError):
        ScaleLearningConfig(batch=0)


def test_inference_reuses_transformed_weights_until_they_change():
    layer = make_layer(4, 4, 4, seed=3)
    x = rand_input((1, 4, 9, 9))
    with torch.no_grad():
        y1 = layer(x)
        assert layer._u_cache is not None
        y2 = layer(x)
        assert torch.equal(y1, y2)
        layer.weight.mul_(2.0)  # in-place change: the cache must notice
        y3 = layer(x)
    assert not torch.allclose(y1, y3)
    with torch.no_grad():
        layer.weight.div_(2.0)
        torch.testing.assert_close(layer(x), y1, rtol=0, atol=1e-12)


@pytest.mark.parametrize("fmt,dtype", [("int8", torch.int8), ("int4", torch.int8), ("fp8_e4m3", torch.float8_e4m3fn),
                                       ("fp4_e2m1", torch.float8_e4m3fn), ("fp8_e5m2", torch.float32),
                                       ("int16", torch.float32)])
def test_inference_cache_keeps_u_compact_and_exact(fmt, dtype):
    torch.manual_seed(2)
    conv = nn.Conv2d(6, 5, 3, padding=1)
    layer = QuantWinogradConv2d.from_conv(conv, 4, formats=StageFormats(weight=fmt))
    layer.set_diagonal_scales(torch.rand(6) + 0.5, torch.rand(6) + 0.5)
    x = torch.randn(2, 6, 9, 9)
    y_grad = layer(x)  # gradients on: no cache, plain fake quantization
    with torch.no_grad():
        y1, y2 = layer(x), layer(x)
    assert layer._u_cache[1].dtype == dtype
    assert torch.equal(y1, y2) and torch.equal(y1, y_grad.detach())
    layer.cache_u = False
    del layer._u_cache
    with torch.no_grad():
        assert torch.equal(layer(x), y1) and not hasattr(layer, "_u_cache")


def test_shared_scales_start_like_the_per_layer_closed_form_and_help_every_layer():
    from winoq.winograd.scales import learn_shared_scales

    torch.manual_seed(4)
    convs = [nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)]
    layers = [QuantWinogradConv2d.from_conv(c, 6) for c in convs]
    info = learn_shared_scales(layers, ScaleLearningConfig(steps=2, batch=1, tiles=3))
    assert info["alpha"] in ScaleLearningConfig().alphas
    assert torch.equal(layers[0].log_sb, layers[1].log_sb) and torch.equal(layers[0].log_sg, layers[1].log_sg)
    x = torch.randn(2, 8, 12, 12, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for conv, layer in zip(convs, layers):
            ref = conv(x)
            assert sqnr_db(layer(x), ref) > sqnr_db(QuantWinogradConv2d.from_conv(conv, 6)(x), ref) + 10
