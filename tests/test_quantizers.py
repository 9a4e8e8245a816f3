"""Tests for winoq.quantizers: granularity and scale selection against a manual
per-element loop, fake quantization (grid, idempotence, monotonicity, STE and
LSQ gradients), asymmetric schemes, the integer form and the quantizer modules."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from winoq import quantizers
from winoq.formats import parse
from winoq.quantizers import (
    DynamicQuantizer,
    Granularity,
    QTensor,
    StaticQuantizer,
    compute_scale,
    dequantize,
    fake_quantize,
    fake_quantize_weight,
    per_channel,
    per_group,
    per_tensor,
    quantize,
)

SETTINGS = settings(max_examples=40, deadline=None)

INT_FORMATS = ["int8", "int4", "int4n", "int2", "uint8", "uint4"]
FP_FORMATS = ["fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1", "fp4_e3m0"]
ALL_FORMATS = INT_FORMATS + FP_FORMATS


def bounds(fmt) -> tuple[float, float]:
    """The clamping range of the codes: [qmin, qmax] for integers, +-max_value for floats."""
    if not fmt.is_float:
        return float(fmt.qmin), float(fmt.qmax)
    return (-fmt.max_value if fmt.signed else 0.0), fmt.max_value


def randn(shape, seed, dtype=torch.float64, heavy=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=dtype)
    if heavy:  # a few large outliers
        x = x * torch.where(torch.rand(shape, generator=gen, dtype=dtype) < 0.03, 20.0, 1.0)
    return x


# --------------------------------------------------------------------------- manual reference


def scale_ids(shape, gran: Granularity) -> np.ndarray:
    """For every element, the key of the scale it uses (object array), by the
    documented rule, computed one element at a time."""
    ndim = len(shape)
    axis = gran.axis % ndim
    ids = np.empty(shape, dtype=object)
    for idx in itertools.product(*(range(s) for s in shape)):
        if gran.kind == "tensor":
            key = ()
        elif gran.kind == "channel":
            key = (idx[axis],)
        else:
            g = min(gran.group_size, shape[axis])
            shared = {d % ndim for d in gran.shared_dims}
            key = tuple(idx[d] for d in range(ndim) if d != axis and d not in shared) + (idx[axis] // g,)
        ids[idx] = key
    return ids


def manual_stat(x: torch.Tensor, gran: Granularity, fn) -> torch.Tensor:
    """fn(1-D tensor of the elements sharing a scale) broadcast back to x's shape."""
    ids = scale_ids(tuple(x.shape), gran)
    out = torch.empty_like(x)
    flat_ids = ids.reshape(-1)
    flat_x = x.reshape(-1)
    flat_out = out.view(-1)
    for key in set(flat_ids.tolist()):
        mask = torch.tensor([k == key for k in flat_ids])
        flat_out[mask] = fn(flat_x[mask])
    return out


@st.composite
def tensors_and_grans(draw, min_dims=1):
    ndim = draw(st.integers(min_dims, 3))
    shape = tuple(draw(st.lists(st.integers(1, 7), min_size=ndim, max_size=ndim)))
    kind = draw(st.sampled_from(["tensor", "channel", "group"]))
    axis = draw(st.integers(-ndim, ndim - 1))
    if kind == "tensor":
        gran = per_tensor()
    elif kind == "channel":
        gran = per_channel(axis)
    else:
        gs = draw(st.integers(1, 9))
        shared = tuple(draw(st.lists(st.integers(0, ndim - 1), max_size=ndim, unique=True)))
        gran = Granularity("group", axis=axis, group_size=gs, shared_dims=shared)
    seed = draw(st.integers(0, 2**31 - 1))
    return randn(shape, seed, heavy=draw(st.booleans())), gran


# --------------------------------------------------------------------------- scales


@SETTINGS
@given(tensors_and_grans(), st.sampled_from(["int8", "int4", "fp8_e4m3", "fp4_e2m1"]))
def test_minmax_scales_match_manual_loop(xg, fmt):
    x, gran = xg
    scale, zp = compute_scale(x, fmt, gran)
    assert zp is None
    expected = manual_stat(x, gran, lambda v: v.abs().max()) / parse(fmt).max_value
    full = scale.expand_as(x)
    torch.testing.assert_close(full, expected, rtol=1e-15, atol=0)


def test_scale_shapes():
    x = randn((4, 6, 3, 5), 0)
    assert compute_scale(x, "int8", per_tensor())[0].shape == (1, 1, 1, 1)
    assert compute_scale(x, "int8", per_channel(0))[0].shape == (4, 1, 1, 1)
    assert compute_scale(x, "int8", per_channel(-1))[0].shape == (1, 1, 1, 5)
    s = compute_scale(x, "int8", per_group(4, axis=1, shared_dims=(2, 3)))[0]
    assert s.shape[:2] == (4, 6) and s.shape[2:] in ((1, 1),)
    # the two groups along axis 1: [0:4] and the ragged [4:6]
    assert torch.equal(s[:, 0], s[:, 3]) and torch.equal(s[:, 4], s[:, 5])


def test_ragged_last_group_scale_is_its_own_tail():
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(3, 10, generator=gen, dtype=torch.float64) * 0.1
    x[:, 2] = 5.0   # dominates the first group
    x[:, 9] = -0.7  # the tail [8:10] has its own range
    s = compute_scale(x, "int8", per_group(4, axis=1))[0].expand_as(x)
    torch.testing.assert_close(s[:, 8], x[:, 8:10].abs().amax(1) / 127, rtol=1e-15, atol=0)
    torch.testing.assert_close(s[:, 9], torch.full((3,), 0.7 / 127, dtype=torch.float64), rtol=1e-15, atol=0)
    torch.testing.assert_close(s[:, 0], torch.full((3,), 5.0 / 127, dtype=torch.float64), rtol=1e-15, atol=0)
    # group_size >= axis length: one group for the whole axis
    for gs in (10, 11, 1000):
        s = compute_scale(x, "int8", per_group(gs, axis=1))[0].expand_as(x)
        torch.testing.assert_close(s, (x.abs().amax(1, keepdim=True) / 127).expand_as(x), rtol=1e-15, atol=0)


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
def test_percentile_and_mse_never_exceed_minmax(fmt):
    x = randn((6, 64), 3, heavy=True)
    for gran in (per_tensor(), per_channel(0), per_group(16, axis=1)):
        s_mm = compute_scale(x, fmt, gran)[0]
        s_pc = compute_scale(x, fmt, gran, method="percentile", percentile=99.0)[0]
        s_mse = compute_scale(x, fmt, gran, method="mse")[0]
        assert (s_pc <= s_mm * (1 + 1e-12)).all()
        assert (s_mse <= s_mm * (1 + 1e-12)).all()
        assert (s_mse >= s_mm * 0.3 * (1 - 1e-12)).all()
        assert (s_pc < s_mm).any()  # the outliers really are clipped

        def err(s):
            e = (fake_quantize(x, fmt, s) - x) ** 2
            return manual_stat(e, gran, lambda v: v.sum())

        e_mm, e_mse = err(s_mm), err(s_mse)
        assert (e_mse <= e_mm * (1 + 1e-9) + 1e-300).all()
        # and it is the best of the documented search grid of clipping ratios
        for ratio in np.linspace(0.3, 1.0, 40)[::7]:
            assert (e_mse <= err(s_mm * ratio) * (1 + 1e-6) + 1e-300).all()


@pytest.mark.parametrize("q", [50.0, 90.0, 99.99])
def test_percentile_matches_quantile_of_each_divisible_group(q):
    x = randn((3, 12), 4)
    gran = per_group(4, axis=1)
    s = compute_scale(x, "int8", gran, method="percentile", percentile=q)[0].expand_as(x)
    expected = manual_stat(x, gran, lambda v: torch.quantile(v.abs(), q / 100)) / 127
    torch.testing.assert_close(s, expected, rtol=1e-12, atol=0)


def test_percentile_of_ragged_last_group_uses_only_its_elements():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]], dtype=torch.float64)
    s = compute_scale(x, "int8", per_group(2, axis=1), method="percentile", percentile=50)[0].expand_as(x)
    # groups [1, 2], [3, 4], [5]: medians 1.5, 3.5, 5 (not the median of [5, 0] with the padding)
    torch.testing.assert_close(s * 127, torch.tensor([[1.5, 1.5, 3.5, 3.5, 5.0]], dtype=torch.float64))
    # and against the manual loop on a ragged 3-D case
    x = randn((2, 7, 3), 8, heavy=True)
    gran = per_group(3, axis=1, shared_dims=(2,))
    s = compute_scale(x, "int8", gran, method="percentile", percentile=80)[0].expand_as(x)
    expected = manual_stat(x, gran, lambda v: torch.quantile(v.abs(), 0.8)) / 127
    torch.testing.assert_close(s, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse", "asymmetric"])
def test_per_channel_scales_of_a_1d_tensor(method):
    """Per-channel of a 1-D tensor is one scale per element (reduce dims empty)."""
    x = torch.tensor([1.5, -0.3, 0.02], dtype=torch.float64)
    if method == "asymmetric":
        s, zp = compute_scale(x, "int8", per_channel(0), symmetric=False)
        torch.testing.assert_close(s, x.abs() / 255, rtol=1e-12, atol=0)
    else:
        s, _ = compute_scale(x, "int8", per_channel(0), method=method)
        torch.testing.assert_close(s, x.abs() / 127, rtol=1e-12, atol=0)
    assert s.shape == (3,)
    torch.testing.assert_close(fake_quantize(x, "int8", s, zp if method == "asymmetric" else None), x,
                               rtol=1e-12, atol=0)


def test_scale_argument_errors():
    x = randn((4, 4), 0)
    with pytest.raises(ValueError):
        compute_scale(x, "int8", method="max")
    for p in (0.0, -1.0, 100.5):
        with pytest.raises(ValueError, match="percentile"):
            compute_scale(x, "int8", method="percentile", percentile=p)
    with pytest.raises(ValueError, match="asymmetric"):
        compute_scale(x, "fp8_e4m3", symmetric=False)
    with pytest.raises(ValueError):
        Granularity("row")
    with pytest.raises(ValueError):
        Granularity("group")
    with pytest.raises(ValueError):
        per_group(0)


def test_all_zero_tensor_gives_zeros_not_nan():
    x = torch.zeros(2, 5)
    for method in ("minmax", "percentile", "mse"):
        s, _ = compute_scale(x, "int8", per_channel(0), method=method)
        assert (s > 0).all()
        y = fake_quantize(x, "int8", s)
        assert torch.equal(y, x)


# --------------------------------------------------------------------------- fake quantization


@SETTINGS
@given(st.sampled_from(ALL_FORMATS), st.integers(0, 2**31 - 1), st.floats(1e-3, 1e3))
def test_fake_quantize_grid_nearest_idempotent_monotone(fmt_name, seed, scale_val):
    fmt = parse(fmt_name)
    x = randn((200,), seed) * scale_val * fmt.max_value * 1.5  # some of it clips
    scale = torch.tensor(scale_val, dtype=torch.float64)
    y = fake_quantize(x, fmt, scale)
    grid = fmt.grid()
    # on the scaled grid
    codes = y / scale
    dist = (codes[:, None] - grid[None, :]).abs().min(1).values
    assert (dist <= 1e-9 * codes.abs().clamp_min(1)).all()
    # the nearest grid point to the (clipped) input
    best = (x[:, None] - grid[None, :] * scale).abs().min(1).values
    assert ((y - x).abs() <= best * (1 + 1e-9) + 1e-12 * scale).all()
    if not fmt.is_float:
        inside = (x / scale >= fmt.qmin) & (x / scale <= fmt.qmax)
        assert ((y - x).abs()[inside] <= scale / 2 * (1 + 1e-12)).all()
    # idempotent
    assert torch.equal(fake_quantize(y, fmt, scale), y)
    # monotone
    order = torch.argsort(x)
    assert (torch.diff(y[order]) >= 0).all()
    # bounded by the format's range
    lo, hi = bounds(fmt)
    assert (y <= hi * scale * (1 + 1e-12)).all() and (y >= lo * scale * (1 + 1e-12)).all()
    assert float(y.max()) == hi * float(scale) and float(y.min()) == lo * float(scale)  # both ends reached


@SETTINGS
@given(st.sampled_from(ALL_FORMATS), st.integers(0, 2**31 - 1), st.booleans())
def test_fake_quantize_same_values_with_and_without_autograd(fmt_name, seed, asymmetric):
    fmt = parse(fmt_name)
    x = randn((64,), seed) * fmt.max_value * 0.1
    x[0], x[1] = float("inf"), -float("inf")
    scale = torch.tensor(0.07, dtype=torch.float64)
    zp = None
    if asymmetric and not fmt.is_float:
        zp = torch.tensor(float((fmt.qmin + fmt.qmax) // 2), dtype=torch.float64)
    plain = fake_quantize(x, fmt, scale, zp)
    xg = x.clone().requires_grad_()
    tracked = fake_quantize(xg, fmt, scale, zp)
    assert torch.equal(plain, tracked.detach())
    st_ = scale.clone().requires_grad_()
    assert torch.equal(plain, fake_quantize(x, fmt, st_, zp).detach())
    with torch.no_grad():
        assert torch.equal(plain, fake_quantize(xg, fmt, scale, zp))


@SETTINGS
@given(tensors_and_grans(min_dims=2), st.sampled_from(["int8", "int4", "fp8_e4m3", "fp4_e2m1"]))
def test_fake_quantize_dynamic_equals_compute_scale_path(xg, fmt):
    fqd = getattr(quantizers, "fake_quantize_dynamic", None)
    if fqd is None:
        pytest.skip("no fake_quantize_dynamic in this version")
    x, gran = xg
    expected = fake_quantize(x, fmt, compute_scale(x, fmt, gran)[0])
    torch.testing.assert_close(fqd(x, fmt, gran), expected, rtol=1e-15, atol=0)


@SETTINGS
@given(tensors_and_grans(), st.sampled_from(ALL_FORMATS))
def test_fake_quantize_with_computed_scales(xg, fmt):
    x, gran = xg
    s, _ = compute_scale(x, fmt, gran)
    y = fake_quantize(x, fmt, s)
    f = parse(fmt)
    if f.signed:  # minmax never clips a signed format: error within half a local step
        if not f.is_float:
            assert ((y - x).abs() <= s / 2 * (1 + 1e-12)).all()
        # the element that sets each scale is represented exactly (max_value is on the grid)
        amax = manual_stat(x, gran, lambda v: v.abs().max())
        hit = x.abs() == amax
        torch.testing.assert_close(y[hit].abs(), amax[hit], rtol=1e-14, atol=0)
    assert torch.equal(fake_quantize_weight(x, fmt, gran), y)


@pytest.mark.parametrize("fmt", ["int8", "int4", "uint4", "fp8_e4m3", "fp4_e2m1"])
def test_ste_gradient(fmt):
    f = parse(fmt)
    scale = torch.tensor(0.05, dtype=torch.float64)
    lo, hi = bounds(f)
    # values strictly inside and strictly outside the range, none on a boundary
    x = torch.cat([torch.linspace(lo + 0.01, hi - 0.01, 101, dtype=torch.float64),
                   torch.tensor([hi + 0.7, hi * 3, lo - 0.7, lo - 50], dtype=torch.float64)]) * scale
    x.requires_grad_()
    fake_quantize(x, fmt, scale).sum().backward()
    expected = torch.cat([torch.ones(101, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)])
    assert torch.equal(x.grad, expected)


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8_e4m3", "fp4_e2m1"])
def test_lsq_scale_gradient(fmt):
    f = parse(fmt)
    x = randn((300,), 11) * f.max_value * 0.025
    s = torch.full((300,), 0.015, dtype=torch.float64, requires_grad=True)
    fake_quantize(x, fmt, s).sum().backward()
    u = (x / s).detach()
    lo, hi = bounds(f)
    inside = (u > lo) & (u < hi)
    rounded = f.round(u)
    torch.testing.assert_close(s.grad[inside], (rounded - u)[inside], rtol=1e-12, atol=1e-12)
    assert (u > hi).any() and (u < lo).any()
    torch.testing.assert_close(s.grad[u > hi], torch.full_like(u[u > hi], hi), rtol=0, atol=0)
    torch.testing.assert_close(s.grad[u < lo], torch.full_like(u[u < lo], lo), rtol=0, atol=0)
    # a per-tensor scale accumulates the sum
    st_ = torch.tensor(0.015, dtype=torch.float64, requires_grad=True)
    fake_quantize(x, fmt, st_).sum().backward()
    torch.testing.assert_close(st_.grad, s.grad.sum(), rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- asymmetric


@SETTINGS
@given(tensors_and_grans(), st.sampled_from(["int8", "int4", "uint8", "uint4", "int2"]), st.floats(-3, 3))
def test_asymmetric_round_trip(xg, fmt, shift):
    x, gran = xg
    x = x + shift
    f = parse(fmt)
    s, zp = compute_scale(x, fmt, gran, symmetric=False)
    assert zp is not None
    assert torch.equal(zp, zp.round())
    assert (zp >= f.qmin).all() and (zp <= f.qmax).all()
    y = fake_quantize(x, fmt, s, zp)
    assert ((y - x).abs() <= s / 2 * (1 + 1e-9) + 1e-12).all()
    # the range endpoints (clamped to include 0) define the scale
    hi = manual_stat(x, gran, lambda v: v.max().clamp_min(0))
    lo = manual_stat(x, gran, lambda v: v.min().clamp_max(0))
    torch.testing.assert_close(s.expand_as(x), ((hi - lo) / (f.qmax - f.qmin)).clamp_min(1e-30), rtol=1e-12, atol=0)
    # zero is exactly representable
    z = fake_quantize(torch.zeros_like(x), fmt, s, zp)
    assert torch.equal(z, torch.zeros_like(x))
    qt = quantize(x, fmt, s, zp)
    assert qt.codes.dtype == torch.int32
    assert int(qt.codes.min()) >= f.qmin and int(qt.codes.max()) <= f.qmax
    assert torch.equal(qt.dequantize(), y)


# --------------------------------------------------------------------------- integer form


@SETTINGS
@given(tensors_and_grans(), st.sampled_from(ALL_FORMATS))
def test_qtensor_matches_fake_quantize(xg, fmt):
    x, gran = xg
    f = parse(fmt)
    s, _ = compute_scale(x, fmt, gran)
    s = s * 0.7  # make some of it clip
    qt = quantize(x, fmt, s)
    assert isinstance(qt, QTensor) and qt.fmt == f
    if f.is_float:
        assert qt.codes.is_floating_point()
        assert torch.isin(qt.codes, f.grid().to(qt.codes.dtype)).all()
    else:
        assert qt.codes.dtype == torch.int32
        assert int(qt.codes.min()) >= f.qmin and int(qt.codes.max()) <= f.qmax
    y = fake_quantize(x, fmt, s)
    assert torch.equal(qt.dequantize(), y)
    assert torch.equal(dequantize(qt), y)


def test_quantize_does_not_track_gradients():
    x = torch.randn(5, requires_grad=True)
    qt = quantize(x, "int8", torch.tensor(0.1))
    assert not qt.codes.requires_grad


# --------------------------------------------------------------------------- modules


def test_dynamic_quantizer():
    x = randn((2, 8, 3, 3), 5)
    gran = per_group(4, axis=1, shared_dims=(2, 3))
    dq = DynamicQuantizer("int4", gran)
    s, _ = compute_scale(x, "int4", gran)
    assert torch.equal(dq(x), fake_quantize(x, "int4", s))
    y = DynamicQuantizer("int8", gran, method="mse")(x)
    assert torch.equal(y, fake_quantize(x, "int8", compute_scale(x, "int8", gran, method="mse")[0]))


def test_static_quantizer_minmax_observe_and_freeze():
    gran = per_channel(1)
    q = StaticQuantizer("int8", gran)
    b1, b2 = randn((2, 4, 3, 3), 1), randn((3, 4, 3, 3), 2) * 3
    assert q(b1) is b1  # observing: pass-through
    assert q(b2) is b2
    expected = torch.maximum(b1.abs().amax((0, 2, 3)), b2.abs().amax((0, 2, 3)))
    torch.testing.assert_close(q.amax.reshape(-1), expected, rtol=0, atol=0)
    q.freeze()
    assert not q.observing
    x = randn((1, 4, 3, 3), 3) * 5
    scale = (expected / 127).view(1, 4, 1, 1)
    torch.testing.assert_close(q.scale.reshape(-1), scale.reshape(-1), rtol=1e-15, atol=0)
    assert torch.equal(q(x), fake_quantize(x, "int8", q.scale))
    assert "amax" in q.state_dict()


def test_static_quantizer_reduces_the_batch_dim():
    gran = per_group(2, axis=1, shared_dims=(2, 3))  # per sample and channel group
    q = StaticQuantizer("int8", gran)
    b1, b2 = randn((4, 4, 2, 2), 1), randn((2, 4, 2, 2), 2)
    q(b1)
    q(b2)
    both = torch.cat([b1, b2])
    expected = torch.stack([both[:, 0:2].abs().amax(), both[:, 2:4].abs().amax()])
    amax = q.amax.expand(1, 4, 1, 1).reshape(-1)
    torch.testing.assert_close(amax, expected.repeat_interleave(2), rtol=0, atol=0)


def test_static_quantizer_percentile_running_mean():
    q = StaticQuantizer("int8", per_tensor(), method="percentile")
    b1, b2, b3 = (randn((2, 50), s, heavy=True) for s in (1, 2, 3))
    for b in (b1, b2, b3):
        q(b)
    expected = sum(torch.quantile(b.abs().reshape(-1), 0.9999) for b in (b1, b2, b3)) / 3
    torch.testing.assert_close(q.amax.reshape(()), expected, rtol=1e-12, atol=0)


def test_static_quantizer_learnable_scale():
    q = StaticQuantizer("int8", per_tensor(), learnable=True)
    q(randn((4, 16), 1))
    q.freeze()
    assert isinstance(q.log_scale, torch.nn.Parameter)
    assert any(p is q.log_scale for p in q.parameters())
    torch.testing.assert_close(q.scale, (q.amax / 127), rtol=1e-12, atol=0)
    x = randn((4, 16), 2) * 2  # clips: gradient wrt the scale is non-zero
    loss = ((q(x) - x) ** 2).sum()
    loss.backward()
    assert q.log_scale.grad is not None and float(q.log_scale.grad.abs().sum()) > 0
    before = q.scale.detach().clone()
    opt = torch.optim.SGD([q.log_scale], lr=1e-3)
    opt.step()
    assert not torch.equal(q.scale.detach(), before)


def test_static_quantizer_freeze_without_data_raises():
    q = StaticQuantizer("int8")
    with pytest.raises(RuntimeError, match="calibration"):
        q.freeze()
    assert q.observing
