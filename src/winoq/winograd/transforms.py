"""Toom-Cook Winograd transforms F(m, r), built exactly with rational arithmetic.

Convention (1-D correlation, the operation conv layers compute)::

    y[i] = sum_k d[i + k] g[k],   i < m,  len(d) = n = m + r - 1,  len(g) = r
    y    = AT @ ((G @ g) * (BT @ d))

Derivation: linear convolution ``s = g * h`` (length n) is evaluated by Toom-Cook
at n points (n - 1 finite ones and infinity): ``s = V^-1 ((V_r g) * (V_m h))``
with V_k the n x k evaluation ("Vandermonde") matrix. Correlation is the transpose
of convolution in ``h``, hence ``AT = V_m^T``, ``G = V_r`` and ``BT = V^-T``.
The free per-point factor ``f_i = |prod_{j != i} (p_i - p_j)|`` is moved from BT
into G (``G = diag(1/f) V_r``, ``BT = diag(f) V^-T``) so that BT is integral for
integer points, as in the usual published matrices.

2-D F(m x m, r x r) nests the 1-D transform on rows and columns::

    Y = AT [ (G g G^T) * (BT d B) ] A
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from functools import cached_property, lru_cache
from typing import Sequence

import torch

INF = "inf"

# Default finite points, in the order they are taken: small magnitudes first,
# reciprocals next, as is customary (they keep the transforms best conditioned).
_DEFAULT_POINTS: tuple[Fraction, ...] = tuple(
    Fraction(p)
    for p in (
        "0", "1", "-1", "2", "-2", "1/2", "-1/2", "3", "-3", "1/3", "-1/3",
        "3/2", "-3/2", "2/3", "-2/3", "4", "-4", "1/4", "-1/4",
    )
)
MAX_DEFAULT_N = len(_DEFAULT_POINTS) + 1


def default_points(n: int) -> tuple[Fraction, ...]:
    """The n - 1 finite default points for a transform with n taps."""
    if n - 1 > len(_DEFAULT_POINTS):
        raise ValueError(
            f"no default points for n = {n} taps (at most {MAX_DEFAULT_N}); pass points= explicitly"
        )
    return _DEFAULT_POINTS[: n - 1]


def _as_fraction(p) -> Fraction:
    if isinstance(p, float):
        # floats are accepted only when they are exact small rationals like 0.5
        frac = Fraction(p).limit_denominator(1 << 16)
        if float(frac) != p:
            raise ValueError(f"point {p!r} is not an exact small rational; pass a Fraction or a string like '1/3'")
        return frac
    try:
        return Fraction(p)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"point {p!r} is not a rational number (use int, Fraction or 'p/q')") from exc


def _inverse(mat: list[list[Fraction]]) -> list[list[Fraction]]:
    """Exact Gauss-Jordan inverse of a square Fraction matrix."""
    n = len(mat)
    aug = [row[:] + [Fraction(int(i == j)) for j in range(n)] for i, row in enumerate(mat)]
    for col in range(n):
        pivot = next((r for r in range(col, n) if aug[r][col] != 0), None)
        if pivot is None:
            raise ValueError("singular evaluation matrix (repeated points?)")
        aug[col], aug[pivot] = aug[pivot], aug[col]
        inv_p = 1 / aug[col][col]
        aug[col] = [v * inv_p for v in aug[col]]
        for r in range(n):
            if r != col and aug[r][col] != 0:
                factor = aug[r][col]
                aug[r] = [a - factor * b for a, b in zip(aug[r], aug[col])]
    return [row[n:] for row in aug]


def _evaluation_matrix(points: Sequence[Fraction], k: int) -> list[list[Fraction]]:
    """n x k matrix evaluating a degree k-1 polynomial at points, then at infinity."""
    rows = [[p**j for j in range(k)] for p in points]
    rows.append([Fraction(int(j == k - 1)) for j in range(k)])  # infinity: leading coefficient
    return rows


def _transpose(mat):
    return [list(col) for col in zip(*mat)]


def _to_tensor(mat) -> torch.Tensor:
    return torch.tensor([[float(v) for v in row] for row in mat], dtype=torch.float64)


@dataclass(frozen=True)
class ToomCook:
    """Exact Winograd transforms for F(m, r). Matrices are float64 tensors;
    the ``*_exact`` tuples keep the rationals they were rounded from."""

    m: int
    r: int
    points: tuple[Fraction, ...]
    AT_exact: tuple[tuple[Fraction, ...], ...]
    G_exact: tuple[tuple[Fraction, ...], ...]
    BT_exact: tuple[tuple[Fraction, ...], ...]

    @property
    def n(self) -> int:
        return self.m + self.r - 1

    @property
    def AT(self) -> torch.Tensor:
        return _to_tensor(self.AT_exact)

    @property
    def G(self) -> torch.Tensor:
        return _to_tensor(self.G_exact)

    @property
    def BT(self) -> torch.Tensor:
        return _to_tensor(self.BT_exact)

    @cached_property
    def BT_integer_rows(self) -> tuple[tuple[tuple[int, ...], ...], tuple[float, ...]]:
        """``(rows, factors)``: each row of BT as coprime integers and the factor that gives it back
        (``BT[i] = factors[i] * rows[i]``), exactly; what an integer input transform multiplies by."""
        rows, factors = [], []
        for row in self.BT_exact:
            d = math.lcm(*(f.denominator for f in row))
            ints = [int(f * d) for f in row]
            g = math.gcd(*ints)
            rows.append(tuple(i // g for i in ints))
            factors.append(g / d)
        return tuple(rows), tuple(factors)

    def multiplies_saved_2d(self) -> float:
        """Direct multiplies per output / Winograd multiplies per output (2-D)."""
        return (self.m * self.r) ** 2 / self.n**2

    def scaled(self, s_b: torch.Tensor, s_g: torch.Tensor) -> "ScaledTransforms":
        return ScaledTransforms.from_toom_cook(self, s_b, s_g)

    def report(self) -> dict:
        """Conditioning and per-row dynamic range of each transform."""
        out = {}
        for name, mat in (("AT", self.AT), ("G", self.G), ("BT", self.BT)):
            out[name] = {
                "cond": float(torch.linalg.cond(mat)),
                "row_l1": mat.abs().sum(1).tolist(),
                "row_max": mat.abs().amax(1).tolist(),
            }
        out["tap_range_2d"] = tap_range_2d(self.BT, self.G).tolist()
        return out


@lru_cache(maxsize=None)
def _toom_cook_cached(m: int, r: int, points: tuple[Fraction, ...]) -> ToomCook:
    n = m + r - 1
    size_v = _evaluation_matrix(points, n)
    v_inv = _inverse(size_v)
    scale = []
    for i, p in enumerate(points):
        f = Fraction(1)
        for j, q in enumerate(points):
            if j != i:
                f *= p - q
        scale.append(abs(f))
    scale.append(Fraction(1))  # infinity row
    g_mat = [[v / scale[i] for v in row] for i, row in enumerate(_evaluation_matrix(points, r))]
    bt_mat = [[v * scale[i] for v in row] for i, row in enumerate(_transpose(v_inv))]
    at_mat = _transpose(_evaluation_matrix(points, m))
    freeze = lambda mat: tuple(tuple(row) for row in mat)  # noqa: E731
    return ToomCook(m, r, points, freeze(at_mat), freeze(g_mat), freeze(bt_mat))


def toom_cook(m: int, r: int = 3, points: Sequence | None = None) -> ToomCook:
    """Build F(m, r). ``points``: the n - 1 finite interpolation points (infinity is
    always the last); default: 0, 1, -1, 2, -2, 1/2, -1/2, ..."""
    if not (isinstance(m, int) and isinstance(r, int)) or m < 1 or r < 1:
        raise ValueError(f"F(m, r) needs integers m >= 1 and r >= 1, got m={m!r}, r={r!r}")
    n = m + r - 1
    if points is None:
        pts = default_points(n)
    else:
        pts = tuple(_as_fraction(p) for p in points)
        if len(pts) != n - 1:
            raise ValueError(
                f"F({m},{r}) has n = {n} taps and needs {n - 1} finite points (infinity is added), got {len(pts)}"
            )
        if len(set(pts)) != len(pts):
            dup = sorted({str(p) for p in pts if pts.count(p) > 1})
            raise ValueError(f"interpolation points must be distinct; repeated: {', '.join(dup)}")
    return _toom_cook_cached(m, r, pts)


def tap_range_2d(bt: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Relative magnitude of each 2-D Winograd-domain tap of the Hadamard product
    for i.i.d. unit inputs and weights: ||BT_a|| ||BT_b|| ||G_a|| ||G_b|| (L2 norms).
    Its max/min ratio is the per-tap range spread that breaks shared-scale quantization."""
    row = bt.norm(dim=1) * g.norm(dim=1)
    return torch.outer(row, row)


@dataclass(frozen=True)
class ScaledTransforms:
    """Diagonally rescaled transforms: BT' = S_B BT, G' = S_G G, AT' = AT (S_B S_G)^-1.
    In exact arithmetic AT'((G' g) * (BT' d)) == AT((G g) * (BT d))."""

    AT: torch.Tensor
    G: torch.Tensor
    BT: torch.Tensor

    @classmethod
    def from_toom_cook(cls, tc: ToomCook, s_b: torch.Tensor, s_g: torch.Tensor) -> "ScaledTransforms":
        return cls(*apply_diagonal_scales(tc.AT, tc.G, tc.BT, s_b, s_g))


def apply_diagonal_scales(at, g, bt, s_b, s_g):
    """Return (AT (S_B S_G)^-1, S_G G, S_B BT); differentiable in s_b and s_g."""
    n = bt.shape[0]
    if s_b.shape != (n,) or s_g.shape != (n,):
        raise ValueError(f"scales must have shape ({n},), got {tuple(s_b.shape)} and {tuple(s_g.shape)}")
    return at / (s_b * s_g), s_g[:, None] * g, s_b[:, None] * bt
