"""The compiled integer Winograd step (winoq.kernels.int_step) against its definition,
IntWinogradConv2d.forward_torch: bit for bit on every instruction-set build, ragged shapes, wide
sums, rounding shifts, and the fallbacks."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from winoq.integer.winograd import IntWinogradConv2d, build_int_winograd
from winoq.kernels import int_step
from winoq.winograd.fixed_point import effective_bits, first_pass_shift, fixed
from winoq.winograd.transforms import toom_cook

ISAS = ["portable", "avx2"] + (["avx512-vnni"] if int_step.isa() == "avx512-vnni" else [])
needs_build = pytest.mark.skipif(not int_step.available(), reason="the compiled step could not be built here")


def random_step(c: int, k: int, m: int, g: int = 32, seed: int = 0, pre_shift: int = 0, so: int = 16,
                u_max: int = 127, rows: str = "exact", shifts: tuple[int, int] = (40, 50)) -> IntWinogradConv2d:
    """A step with random codes and multipliers: exact integer input rows, or ("fixed") randomly
    scaled 10-bit fixed-point rows with their first-pass shift; 10-bit scaled output rows; M's dyadic
    shifts c drawn from ``shifts`` (inclusive)."""
    gen = torch.Generator().manual_seed(seed)
    tc = toom_cook(m, 3)
    n = m + 2
    scale = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    b_int, sb = torch.tensor(tc.BT_integer_rows[0], dtype=torch.int64), 0
    if rows == "fixed":
        bt = tc.BT.double() * scale[:, None]
        kb = effective_bits(bt, 10, 128)
        b_int, sb = fixed(bt, kb), first_pass_shift(bt, kb, 128)
    aq = fixed(tc.AT.double() * scale, 10)
    u = torch.randint(-u_max, u_max + 1, (n * n, k, c), generator=gen)
    mb = torch.randint(2**29, 2**31 - 1, (n * n, k), generator=gen)
    mc = torch.randint(shifts[0], shifts[1] + 1, (n * n, k), generator=gen)
    bias = torch.randint(-5000, 5000, (k,), generator=gen)
    l1 = int(aq.abs().sum(1).max())
    so = max(so, ((2**15 - 1) * l1 * l1).bit_length() - 30)  # the worst output inside int32, as the builder does
    return IntWinogradConv2d("t", m, 3, (1, 1), bq=b_int, sb=sb, aq=aq, so=so, u=u, v_range=127, mb=mb, mc=mc,
                             m_range=2**15 - 1, bias=bias, v_group=g, pre_shift=pre_shift)


def codes(nb: int, c: int, h: int, w: int, seed: int = 1, lo: int = -127) -> torch.Tensor:
    return torch.randint(lo, 128, (nb, c, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)


def check(step, x, isa, chunk=0):
    y = int_step.forward(step, x, isa=isa, chunk=chunk)
    ref = step.forward_torch(x)
    assert y.dtype == torch.int32 and y.shape == ref.shape
    assert torch.equal(y, ref), f"{isa}: {int((y.long() - ref.long()).abs().max())} off"


@needs_build
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m, c, k, hw, g", [(2, 16, 16, (8, 8), 32), (4, 40, 24, (9, 7), 32), (4, 64, 70, (11, 12), 64),
                                             (6, 48, 33, (13, 10), 32), (6, 32, 32, (6, 6), 16), (4, 24, 8, (5, 9), 8)])
def test_random_steps_match_the_definition(isa, m, c, k, hw, g):
    step = random_step(c, k, m, g)
    check(step, codes(2, c, *hw), isa)
    check(step, codes(2, c, *hw), isa, chunk=5)  # chunks of 5 tiles: ragged GEMM blocks in every chunk


@needs_build
@pytest.mark.parametrize("isa", ISAS)
def test_rounding_shifts_and_wide_sums(isa):
    step = random_step(96, 40, 6, pre_shift=3, so=18)  # F(6,3): int32 lanes; 96 channels of +-127 codes: int64 sums
    assert int_step.wide_sums(step) and int_step.lanes(step) == 32
    check(step, codes(1, 96, 14, 14), isa)
    narrow = random_step(64, 32, 4, pre_shift=2, u_max=20)
    assert not int_step.wide_sums(narrow) and int_step.lanes(narrow) == 16
    check(narrow, codes(2, 64, 10, 10), isa)


@needs_build
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shifts", [(33, 33), (62, 62), (33, 62), (20, 40), (31, 32)])
def test_m_requantization_at_every_shift(isa, shifts):
    # M's dyadic shift c across its range (up to dyadic.MAX_SHIFT = 62): small c pushes most M codes into
    # the clamp, c = 62 rounds nearly every one to 0
    step = random_step(64, 40, 4, seed=sum(shifts), shifts=shifts)
    check(step, codes(2, 64, 10, 10), isa)
    check(step, codes(1, 64, 9, 11, lo=-128), isa)


@needs_build
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m", [2, 4, 6])
def test_fixed_point_rows_with_a_first_pass_shift(isa, m):
    step = random_step(40, 36, m, rows="fixed", seed=m)
    assert int_step.lanes(step) == 32 and int(step.bq.abs().max()) > 100
    check(step, codes(2, 40, 11, 9), isa)
    if m == 6:
        assert step.sb > 0  # F(6,3)'s 10-bit rows need the shift to stay inside int32


@needs_build
@settings(max_examples=12, deadline=None)
@given(m=st.sampled_from([2, 4, 6]), c=st.integers(1, 70), k=st.integers(1, 40), h=st.integers(1, 13),
       w=st.integers(1, 13), nb=st.integers(1, 3), seed=st.integers(0, 1000), pre=st.integers(0, 4),
       rows=st.sampled_from(["exact", "fixed"]))
def test_property_any_shape_matches(m, c, k, h, w, nb, seed, pre, rows):
    step = random_step(c, k, m, seed=seed, pre_shift=pre, rows=rows)
    x = codes(nb, c, h, w, seed=seed)
    for isa in ISAS:
        check(step, x, isa)


@needs_build
def test_int8_channels_last_and_int32_inputs_agree():
    step = random_step(32, 32, 4)
    x = codes(2, 32, 12, 12)
    ref = step.forward_torch(x)
    for xin in (x, x.to(torch.int8), x.to(torch.int8).contiguous(memory_format=torch.channels_last),
                x.contiguous(memory_format=torch.channels_last)):
        assert torch.equal(int_step.forward(step, xin), ref)


@needs_build
def test_two_threads_match():
    step = random_step(64, 48, 4, seed=3)
    x = codes(3, 64, 16, 16)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        check(step, x, ISAS[-1], chunk=7)
    finally:
        torch.set_num_threads(old)


@needs_build
def test_codes_outside_int8_are_refused():
    step = random_step(16, 16, 4)
    x = codes(1, 16, 6, 6)
    x[0, 3, 2, 2] = 300
    with pytest.raises(RuntimeError, match="8-bit input codes"):
        int_step.forward(step, x)


@needs_build
def test_a_built_layer_runs_compiled_inside_forward_and_equals_torch():
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 40, 3, padding=1)
    calib = torch.randn(4, 32, 12, 12).relu()
    s_in = float(calib.abs().max()) / 127
    for m, rows in ((2, "exact"), (4, "exact"), (6, "exact"), (4, "fixed"), (6, "fixed")):
        step, _, _ = build_int_winograd("l", conv, conv.weight.detach().double(), conv.bias.detach().double(), s_in, 127,
                                        calib, m=m, weight_bits=8, v_bits=8, m_bits=16, transform_bits=10,
                                        scales="learned", v_clip="minmax", learn_steps=1, seed=0, v_group=32,
                                        input_rows=rows)
        if rows == "exact":
            assert step.sb == 0 and int(step.bq.abs().max()) == {2: 1, 4: 5, 6: 21}[m]  # the Toom-Cook integers
        assert int_step.cached_reason(step) is None
        x = torch.round(torch.randn(2, 32, 12, 12).relu() / s_in).clamp(-127, 127).to(torch.int32)
        y = step(x)
        assert y.is_contiguous(memory_format=torch.channels_last)  # the compiled step's layout
        assert torch.equal(y, step.forward_torch(x))


def test_an_output_that_could_leave_int32_runs_in_torch():
    step = random_step(8, 8, 6, rows="fixed")
    step.so = 0
    assert "leaves int32" in int_step.unsupported_reason(step)


def test_static_v_scales_run_in_torch_with_a_reason():
    step = random_step(16, 16, 4, g=32)
    step.v_group = 0
    step.register_buffer("vb", torch.full((36,), 1 << 30))
    step.register_buffer("vc", torch.full((36,), 38))
    assert "static per-tap V scales" in int_step.unsupported_reason(step)
    x = codes(1, 16, 8, 8)
    assert torch.equal(step(x), step.forward_torch(x))  # forward falls back, same integers
    if int_step.available():
        with pytest.raises(ValueError, match="static per-tap"):
            int_step.forward(step, x)


def test_missing_extension_warns_once_and_steps_run_in_torch(no_compiler):
    no_compiler(int_step)
    step = random_step(16, 16, 4)
    x = codes(1, 16, 8, 8)
    with pytest.warns(RuntimeWarning, match="winograd_int_step kernel could not be built.*Ninja"):
        y = step(x)
    assert torch.equal(y, step.forward_torch(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step(x)
    assert not int_step.available() and int_step.isa() is None
