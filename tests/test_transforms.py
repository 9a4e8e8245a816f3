"""Tests for winoq.winograd.transforms.

The reference used here is independent of the implementation: the transforms
are rebuilt from their closed forms (Vandermonde rows for AT and G, Lagrange
numerators for BT) with polynomial products in exact Fraction arithmetic, and
the Winograd identity is checked against a direct correlation written out in
Fractions."""
from __future__ import annotations

import math
import random
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from winoq.winograd.transforms import (
    MAX_DEFAULT_N,
    ScaledTransforms,
    apply_diagonal_scales,
    default_points,
    tap_range_2d,
    toom_cook,
)

SETTINGS = settings(max_examples=30, deadline=None)

# --------------------------------------------------------------------------- exact reference


def poly_mul(a: list[Fraction], b: list[Fraction]) -> list[Fraction]:
    out = [Fraction(0)] * (len(a) + len(b) - 1)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            out[i + j] += x * y
    return out


def poly_from_roots(roots) -> list[Fraction]:
    """Ascending coefficients of prod (x - root)."""
    poly = [Fraction(1)]
    for q in roots:
        poly = poly_mul(poly, [-q, Fraction(1)])
    return poly


def reference_transforms(m: int, r: int, points) -> tuple[list, list, list]:
    """AT (m x n), G (n x r), BT (n x n) from the closed forms, with the same
    per-point normalisation as the library: f_t = |prod_{s != t} (p_t - p_s)|
    divides the G row and multiplies the BT row (infinity row: f = 1)."""
    pts = [Fraction(p) for p in points]
    n = m + r - 1
    assert len(pts) == n - 1
    at = [[p**i for p in pts] + [Fraction(int(i == m - 1))] for i in range(m)]
    g, bt = [], []
    for t, p in enumerate(pts):
        others = [q for s, q in enumerate(pts) if s != t]
        c = math.prod((p - q for q in others), start=Fraction(1))
        f = abs(c)
        g.append([p**k / f for k in range(r)])
        # f_t * Lagrange basis L_t = sign(c) * prod_{s != t} (x - p_s), degree n - 2
        num = poly_from_roots(others)
        sign = 1 if c > 0 else -1
        bt.append([sign * v for v in num] + [Fraction(0)] * (n - len(num)))
    g.append([Fraction(int(k == r - 1)) for k in range(r)])
    bt.append(poly_from_roots(pts))  # vanishes on every finite point, leading coefficient 1
    return at, g, bt


def correlate_1d(d, g, m):
    return [sum(d[i + k] * g[k] for k in range(len(g))) for i in range(m)]


def winograd_1d_exact(tc, d, g):
    gg = [sum(row[k] * g[k] for k in range(tc.r)) for row in tc.G_exact]
    bd = [sum(row[j] * d[j] for j in range(tc.n)) for row in tc.BT_exact]
    prod = [a * b for a, b in zip(gg, bd)]
    return [sum(row[t] * prod[t] for t in range(tc.n)) for row in tc.AT_exact]


def as_lists(mat):
    return [list(row) for row in mat]


def to_float64(mat) -> torch.Tensor:
    return torch.tensor([[float(v) for v in row] for row in mat], dtype=torch.float64)


fractions = st.builds(Fraction, st.integers(-6, 6), st.integers(1, 4))
small_rationals = st.builds(Fraction, st.integers(-20, 20), st.integers(1, 7))


@st.composite
def problems(draw):
    m = draw(st.integers(1, 8))
    r = draw(st.integers(2, 5))
    n = m + r - 1
    pts = draw(st.lists(fractions, min_size=n - 1, max_size=n - 1, unique=True))
    return m, r, pts


# --------------------------------------------------------------------------- exactness


@SETTINGS
@given(problems(), st.data())
def test_random_points_match_closed_form_and_correlate_exactly(prob, data):
    m, r, pts = prob
    n = m + r - 1
    tc = toom_cook(m, r, pts)
    assert (tc.m, tc.r, tc.n) == (m, r, n)
    assert tc.points == tuple(pts)

    at, g, bt = reference_transforms(m, r, pts)
    assert as_lists(tc.AT_exact) == at
    assert as_lists(tc.G_exact) == g
    assert as_lists(tc.BT_exact) == bt

    # the float64 matrices are the exact ones, correctly rounded
    for name, ref in (("AT", at), ("G", g), ("BT", bt)):
        got = getattr(tc, name)
        assert got.dtype == torch.float64
        assert torch.equal(got, to_float64(ref)), name

    # complete check of the bilinear identity: sum_t AT[i,t] G[t,k] BT[t,j] == [j == i + k]
    for i in range(m):
        for k in range(r):
            for j in range(n):
                s = sum(tc.AT_exact[i][t] * tc.G_exact[t][k] * tc.BT_exact[t][j] for t in range(n))
                assert s == (1 if j == i + k else 0), (i, k, j, s)

    # and on random rational data
    d = data.draw(st.lists(small_rationals, min_size=n, max_size=n))
    w = data.draw(st.lists(small_rationals, min_size=r, max_size=r))
    assert winograd_1d_exact(tc, d, w) == correlate_1d(d, w, m)


def test_default_points_exist_and_are_exact_for_every_n_up_to_16():
    rng = random.Random(0)
    for n in range(2, 17):
        pts = default_points(n)
        assert len(pts) == n - 1
        assert len(set(pts)) == n - 1
        for r in range(1, n + 1):
            m = n - r + 1
            tc = toom_cook(m, r)
            assert tc.points == pts
            d = [Fraction(rng.randint(-9, 9), rng.randint(1, 5)) for _ in range(n)]
            w = [Fraction(rng.randint(-9, 9), rng.randint(1, 5)) for _ in range(r)]
            assert winograd_1d_exact(tc, d, w) == correlate_1d(d, w, m), (m, r)
    assert MAX_DEFAULT_N >= 16


def test_default_point_sets_of_common_tiles():
    f = Fraction
    assert set(toom_cook(2, 3).points) == {f(0), f(1), f(-1)}
    assert set(toom_cook(4, 3).points) == {f(0), f(1), f(-1), f(2), f(-2)}
    assert set(toom_cook(6, 3).points) == {f(0), f(1), f(-1), f(2), f(-2), f(1, 2), f(-1, 2)}
    assert len(toom_cook(6, 3).points) == 7


def test_f23_matrices():
    tc = toom_cook(2, 3)
    assert torch.equal(tc.BT, torch.tensor([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, -1, 0, 1]],
                                           dtype=torch.float64))
    assert torch.equal(tc.G, torch.tensor([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]],
                                          dtype=torch.float64))
    assert torch.equal(tc.AT, torch.tensor([[1, 1, 1, 0], [0, 1, -1, 1]], dtype=torch.float64))


def test_f43_matrices_match_published_up_to_row_signs():
    """Lavin & Gray's F(4,3); the sign of a point's factor may sit in G or BT."""
    f = Fraction
    bt_pub = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
              [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
    g_pub = [[f(1, 4), 0, 0], [f(-1, 6), f(-1, 6), f(-1, 6)], [f(-1, 6), f(1, 6), f(-1, 6)],
             [f(1, 24), f(1, 12), f(1, 6)], [f(1, 24), f(-1, 12), f(1, 6)], [0, 0, 1]]
    at_pub = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]
    tc = toom_cook(4, 3)
    assert as_lists(tc.AT_exact) == at_pub
    for t in range(6):
        matches = [s for s in (1, -1)
                   if list(tc.BT_exact[t]) == [s * v for v in bt_pub[t]]
                   and list(tc.G_exact[t]) == [s * v for v in g_pub[t]]]
        assert matches, f"row {t} differs from the published F(4,3)"
    # integer points: BT integral
    assert all(v.denominator == 1 for row in tc.BT_exact for v in row)


def test_multiplies_saved():
    assert toom_cook(2, 3).multiplies_saved_2d() == pytest.approx(36 / 16)
    assert toom_cook(4, 3).multiplies_saved_2d() == pytest.approx(4.0)
    assert toom_cook(6, 3).multiplies_saved_2d() == pytest.approx(324 / 64)


# --------------------------------------------------------------------------- argument checking


def test_point_spellings_are_equivalent():
    ref = toom_cook(2, 3, [Fraction(0), Fraction(1, 2), Fraction(-3)])
    assert toom_cook(2, 3, ["0", "1/2", "-3"]) == ref
    assert toom_cook(2, 3, [0, 0.5, -3]) == ref
    with pytest.raises(ValueError):
        toom_cook(2, 3, [0, math.pi, 1])  # not an exact small rational
    with pytest.raises(ValueError):
        toom_cook(2, 3, [0, "abc", 1])


@pytest.mark.parametrize("pts", [[0, 1, 1], ["1/2", 0, "2/4"], [0, 0.5, "1/2"]])
def test_repeated_points_raise(pts):
    with pytest.raises(ValueError, match="repeated"):
        toom_cook(2, 3, pts)


@pytest.mark.parametrize("pts", [[0, 1], [0, 1, -1, 2], []])
def test_wrong_number_of_points_raises(pts):
    with pytest.raises(ValueError):
        toom_cook(2, 3, pts)


@pytest.mark.parametrize("m,r", [(0, 3), (2, 0), (2.0, 3), (-1, 3)])
def test_bad_tile_sizes_raise(m, r):
    with pytest.raises(ValueError):
        toom_cook(m, r)


def test_no_default_points_beyond_the_table():
    with pytest.raises(ValueError, match="default points"):
        toom_cook(MAX_DEFAULT_N, 3)
    with pytest.raises(ValueError):
        default_points(MAX_DEFAULT_N + 1)


# --------------------------------------------------------------------------- diagonal scaling


def _winograd_1d(at, g, bt, d, w):
    return at @ ((g @ w) * (bt @ d))


def _winograd_2d(at, g, bt, d, w):
    return at @ ((g @ w @ g.T) * (bt @ d @ bt.T)) @ at.T


@SETTINGS
@given(st.sampled_from([(2, 3), (4, 3), (6, 3), (2, 5), (4, 5), (3, 2), (1, 4)]), st.integers(0, 2**31 - 1))
def test_diagonal_scales_leave_results_unchanged(mr, seed_):
    m, r = mr
    tc = toom_cook(m, r)
    n = tc.n
    gen = torch.Generator().manual_seed(seed_)
    s_b = torch.exp(torch.rand(n, generator=gen, dtype=torch.float64) * 4 - 2)
    s_g = torch.exp(torch.rand(n, generator=gen, dtype=torch.float64) * 4 - 2)
    at2, g2, bt2 = apply_diagonal_scales(tc.AT, tc.G, tc.BT, s_b, s_g)

    # explicit diagonal matrices
    torch.testing.assert_close(at2, tc.AT @ torch.diag(1 / (s_b * s_g)), rtol=1e-14, atol=0)
    torch.testing.assert_close(g2, torch.diag(s_g) @ tc.G, rtol=1e-14, atol=0)
    torch.testing.assert_close(bt2, torch.diag(s_b) @ tc.BT, rtol=1e-14, atol=0)

    d1 = torch.randn(n, generator=gen, dtype=torch.float64)
    w1 = torch.randn(r, generator=gen, dtype=torch.float64)
    direct = torch.stack([(d1[i:i + r] * w1).sum() for i in range(m)])
    y = _winograd_1d(tc.AT, tc.G, tc.BT, d1, w1)
    ys = _winograd_1d(at2, g2, bt2, d1, w1)
    torch.testing.assert_close(y, direct, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ys, y, rtol=1e-10, atol=1e-10)

    d2 = torch.randn(n, n, generator=gen, dtype=torch.float64)
    w2 = torch.randn(r, r, generator=gen, dtype=torch.float64)
    direct2 = torch.nn.functional.conv2d(d2[None, None], w2[None, None])[0, 0]
    y2 = _winograd_2d(at2, g2, bt2, d2, w2)
    torch.testing.assert_close(y2, direct2, rtol=1e-9, atol=1e-9)

    st_ = tc.scaled(s_b, s_g)
    assert isinstance(st_, ScaledTransforms)
    assert torch.equal(st_.AT, at2) and torch.equal(st_.G, g2) and torch.equal(st_.BT, bt2)


def test_diagonal_scales_are_differentiable_and_the_result_is_invariant():
    tc = toom_cook(4, 3)
    gen = torch.Generator().manual_seed(3)
    s_b = (torch.rand(6, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    s_g = (torch.rand(6, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    d = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    w = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    at2, g2, bt2 = apply_diagonal_scales(tc.AT, tc.G, tc.BT, s_b, s_g)
    # the matrices depend on the scales...
    gb = torch.autograd.grad(bt2.abs().sum(), s_b, retain_graph=True)[0]
    assert gb.abs().min() > 0
    # ...the result does not
    y = _winograd_2d(at2, g2, bt2, d, w)
    gsb, gsg = torch.autograd.grad((y * torch.randn(y.shape, generator=gen, dtype=torch.float64)).sum(), (s_b, s_g))
    assert gsb.abs().max() < 1e-10 and gsg.abs().max() < 1e-10


def test_diagonal_scales_shape_checked():
    tc = toom_cook(2, 3)
    with pytest.raises(ValueError):
        apply_diagonal_scales(tc.AT, tc.G, tc.BT, torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError):
        apply_diagonal_scales(tc.AT, tc.G, tc.BT, torch.ones(4), torch.ones(4, 1))


# --------------------------------------------------------------------------- report


@pytest.mark.parametrize("m,r", [(2, 3), (4, 3), (6, 3), (4, 5)])
def test_report(m, r):
    tc = toom_cook(m, r)
    rep = tc.report()
    assert set(rep) >= {"AT", "G", "BT", "tap_range_2d"}
    for name, exact in (("AT", tc.AT_exact), ("G", tc.G_exact), ("BT", tc.BT_exact)):
        entry = rep[name]
        arr = np.array([[float(v) for v in row] for row in exact])
        assert entry["cond"] == pytest.approx(np.linalg.cond(arr), rel=1e-9)
        assert entry["cond"] >= 1.0
        assert entry["row_l1"] == pytest.approx([float(sum(abs(v) for v in row)) for row in exact], rel=1e-15)
        assert entry["row_max"] == pytest.approx([float(max(abs(v) for v in row)) for row in exact], rel=1e-15)
        assert len(entry["row_l1"]) == len(exact)
    # tap range: outer product of per-tap ||BT_a|| ||G_a||
    row = [math.sqrt(float(sum(v * v for v in b))) * math.sqrt(float(sum(v * v for v in g)))
           for b, g in zip(tc.BT_exact, tc.G_exact)]
    expected = np.outer(row, row)
    got = np.array(rep["tap_range_2d"])
    assert got.shape == (tc.n, tc.n)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert np.linalg.matrix_rank(got, tol=1e-9 * got.max()) == 1


def test_tap_range_spread_grows_with_the_tile():
    spread = []
    for m in (2, 4, 6):
        t = torch.tensor(toom_cook(m, 3).report()["tap_range_2d"])
        spread.append(float(t.max() / t.min()))
    assert spread[0] < spread[1] < spread[2]


def test_tap_range_2d_is_an_outer_product():
    gen = torch.Generator().manual_seed(1)
    bt = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    g = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    t = tap_range_2d(bt, g)
    for a in range(5):
        for b in range(5):
            expect = bt[a].norm() * bt[b].norm() * g[a].norm() * g[b].norm()
            assert float(t[a, b]) == pytest.approx(float(expect), rel=1e-12)
    torch.testing.assert_close(t, t.T)
