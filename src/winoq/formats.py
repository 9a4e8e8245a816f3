"""Number formats used as quantization targets.

Two families are provided, both immutable (frozen dataclasses, hashable):

``IntFormat``
    Two's-complement (``signed=True``) or unsigned integers of 2..16 bits.  A
    tensor that has already been divided by its scale (and shifted by a zero
    point, for asymmetric schemes) is mapped onto integer *codes* in
    ``[qmin, qmax]`` by ``round``: round half to even (``torch.round``), then
    clamp.  ``narrow=True`` drops the most negative code so the range is
    symmetric, e.g. ``int8n`` is ``[-127, 127]`` instead of ``[-128, 127]``.
    ``max_value`` (= ``qmax``) is the magnitude a symmetric scale maps the
    largest input to.

``FloatFormat``
    Generic ExMy minifloat: an optional sign bit, ``exp_bits`` exponent bits and
    ``man_bits`` mantissa bits.  With exponent field ``e`` and mantissa field
    ``m`` a code decodes to

    * ``e == 0`` (subnormal): ``(-1)^s * 2^(1 - bias) * m / 2^M``;
    * ``e >= 1`` (normal):    ``(-1)^s * 2^(e - bias) * (1 + m / 2^M)``.

    ``bias`` defaults to ``2^(E-1) - 1``.  ``special`` says which codes are not
    finite numbers:

    * ``"ieee"``: the all-ones exponent is reserved for inf/NaN (``fp8_e5m2``);
    * ``"ocp_e4m3"``: only the all-ones exponent with all-ones mantissa is NaN,
      the rest of the top binade is finite (OCP ``fp8_e4m3``, max 448);
    * ``"finite"``: every code is a finite number (OCP MX ``fp6``/``fp4``).

    With ``subnormals=False`` the ``e == 0`` codes are read as zero (flush to
    zero) and values below the smallest normal round to the nearer of ``0`` and
    ``min_normal`` (exact halfway goes to zero).

Rounding (``FloatFormat.round``) is round-to-nearest, ties-to-even, where "even"
means the neighbour whose magnitude bit pattern is even -- the even mantissa
code when ``man_bits >= 1``; for ``man_bits == 0`` formats this is the even
exponent field.  Values beyond the largest finite value saturate to
``+-max_value`` (infinities too); NaN stays NaN; negative inputs to unsigned
formats give zero.  Inputs are processed in float64 (exactly: every format is
required to be exactly representable in float32) and returned in the input
dtype.  ``round`` is a plain forward operation; callers add straight-through
estimators themselves.

``grid()`` lists every finite representable value (float64, sorted, unique;
``-0`` and ``+0`` are one value).

``parse(name)`` turns a name into a format (case-insensitive):

* ``int{b}`` / ``uint{b}`` for ``b`` in 2..16, ``int{b}n`` for narrow range;
* the named float formats in ``NAMED_FORMATS`` (``fp8_e4m3``, ``fp8_e4m3_finite``,
  ``fp8_e5m2``, ``fp6_e3m2``, ``fp6_e2m3``, ``fp4_e2m1``, ``fp4_e3m0``);
* generic ``fp{total}_e{E}m{M}`` with ``E + M + 1 == total``: default bias,
  subnormals, and ``special="finite"`` (the MX convention for narrow formats).
  Optional suffixes, in this order, select other variants: ``_ieee`` / ``_ocp``
  / ``_finite``, ``_b{bias}``, ``_nosub``; a leading ``u`` (``ufp{total}_...``,
  ``E + M == total``) means unsigned.  ``FloatFormat.name`` produces exactly
  these names, so ``parse(fmt.name) == fmt``.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from typing import ClassVar

import torch

__all__ = [
    "Format",
    "IntFormat",
    "FloatFormat",
    "parse",
    "NAMED_FORMATS",
    "fp8_e4m3",
    "fp8_e4m3_fn480",
    "fp8_e4m3_finite",
    "fp8_e5m2",
    "fp6_e3m2",
    "fp6_e2m3",
    "fp4_e2m1",
    "fp4_e3m0",
]

_SPECIALS = ("ieee", "ocp_e4m3", "finite")
_SPECIAL_TAG = {"ieee": "ieee", "ocp_e4m3": "ocp", "finite": "finite"}
_TAG_SPECIAL = {v: k for k, v in _SPECIAL_TAG.items()}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _as_tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(x)


# --------------------------------------------------------------------------- integers


@dataclass(frozen=True)
class IntFormat:
    """Integer format with ``bits`` bits (2..16); see the module docstring."""

    bits: int
    signed: bool = True
    narrow: bool = False

    is_float: ClassVar[bool] = False

    def __post_init__(self):
        if not _is_int(self.bits):
            raise ValueError(f"IntFormat.bits must be an int, got {self.bits!r}")
        if not 2 <= self.bits <= 16:
            raise ValueError(f"IntFormat.bits must be in 2..16, got {self.bits}")
        if not isinstance(self.signed, bool) or not isinstance(self.narrow, bool):
            raise ValueError("IntFormat.signed and IntFormat.narrow must be bools")
        if self.narrow and not self.signed:
            raise ValueError("narrow range only applies to signed integer formats")

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        return -(1 << (self.bits - 1)) + (1 if self.narrow else 0)

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def max_value(self) -> float:
        """Largest magnitude used for symmetric scaling (``float(qmax)``)."""
        return float(self.qmax)

    @property
    def name(self) -> str:
        return f"{'' if self.signed else 'u'}int{self.bits}{'n' if self.narrow else ''}"

    def grid(self) -> torch.Tensor:
        """All representable values, float64, ascending."""
        return torch.arange(self.qmin, self.qmax + 1, dtype=torch.float64)

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """Round half to even, then clamp to ``[qmin, qmax]``; same dtype as ``x``."""
        return torch.clamp(torch.round(_as_tensor(x)), self.qmin, self.qmax)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes (``torch.int32``) of ``round(x)``; NaN input is an error."""
        q = self.round(x)
        if q.is_floating_point() and bool(torch.isnan(q).any()):
            raise ValueError(f"cannot encode NaN as {self.name}")
        return q.to(torch.int32)

    def __str__(self) -> str:
        return self.name


# --------------------------------------------------------------------------- minifloats


def _pow2(k: torch.Tensor) -> torch.Tensor:
    """Exact ``2.0 ** k`` (float64) for integer ``k`` in [-1022, 1023], built from bits."""
    return ((k.to(torch.int64) + 1023) << 52).contiguous().view(torch.float64)


@dataclass(frozen=True)
class FloatFormat:
    """Generic ExMy minifloat; see the module docstring for the conventions."""

    exp_bits: int
    man_bits: int
    bias: int | None = None
    signed: bool = True
    subnormals: bool = True
    special: str = "ieee"
    name_override: str | None = field(default=None, compare=False)

    is_float: ClassVar[bool] = True

    def __post_init__(self):
        E, M = self.exp_bits, self.man_bits
        if not _is_int(E) or E < 1:
            raise ValueError(f"FloatFormat.exp_bits must be an int >= 1, got {E!r}")
        if not _is_int(M) or M < 0:
            raise ValueError(f"FloatFormat.man_bits must be an int >= 0, got {M!r}")
        if not isinstance(self.signed, bool) or not isinstance(self.subnormals, bool):
            raise ValueError("FloatFormat.signed and FloatFormat.subnormals must be bools")
        total = E + M + int(self.signed)
        if not 2 <= total <= 16:
            raise ValueError(f"FloatFormat total bits (sign + exponent + mantissa) must be in 2..16, got {total}")
        if self.special not in _SPECIALS:
            raise ValueError(f"FloatFormat.special must be one of {_SPECIALS}, got {self.special!r}")
        if self.bias is None:
            object.__setattr__(self, "bias", (1 << (E - 1)) - 1)
        elif not _is_int(self.bias):
            raise ValueError(f"FloatFormat.bias must be an int or None, got {self.bias!r}")
        if self.name_override is not None and not isinstance(self.name_override, str):
            raise ValueError("FloatFormat.name_override must be a str or None")
        e_top, _ = self._top_code()
        if e_top < 1:
            raise ValueError(
                f"e{E}m{M} with special={self.special!r} has no finite normal values "
                "(the top exponent is reserved); use more exponent bits or special='finite'"
            )
        if e_top - self.bias > 127 or self._min_exponent() < -149:
            raise ValueError(
                f"e{E}m{M} with bias {self.bias} has values outside the float32 range "
                "(largest exponent must be <= 127, smallest >= -149)"
            )

    # ---- derived constants
    def _top_code(self) -> tuple[int, int]:
        """(exponent field, mantissa field) of the largest finite value."""
        E, M = self.exp_bits, self.man_bits
        e_all, m_all = (1 << E) - 1, (1 << M) - 1
        if self.special == "finite":
            return e_all, m_all
        if self.special == "ocp_e4m3" and M >= 1:
            return e_all, m_all - 1
        return e_all - 1, m_all  # ieee, or ocp with no mantissa bits (whole top binade is NaN)

    def _min_exponent(self) -> int:
        """Exponent of the smallest positive value."""
        emin = 1 - self.bias
        return emin - self.man_bits if (self.subnormals and self.man_bits > 0) else emin

    @property
    def bits(self) -> int:
        """Total storage bits (sign + exponent + mantissa)."""
        return self.exp_bits + self.man_bits + int(self.signed)

    @property
    def max_value(self) -> float:
        """Largest finite value."""
        e, m = self._top_code()
        return math.ldexp((1 << self.man_bits) + m, e - self.bias - self.man_bits)

    @property
    def min_normal(self) -> float:
        return math.ldexp(1.0, 1 - self.bias)

    @property
    def min_subnormal(self) -> float:
        """Smallest positive value (equals ``min_normal`` without subnormals or mantissa bits)."""
        return math.ldexp(1.0, self._min_exponent())

    @property
    def name(self) -> str:
        if self.name_override is not None:
            return self.name_override
        named = _NAMED_BY_FORMAT.get(self)
        if named is not None:
            return named
        base = f"{'' if self.signed else 'u'}fp{self.bits}_e{self.exp_bits}m{self.man_bits}"
        parts = [base]
        if self.special != "finite" or base in NAMED_FORMATS:
            parts.append(_SPECIAL_TAG[self.special])
        if self.bias != (1 << (self.exp_bits - 1)) - 1:
            parts.append(f"b{self.bias}")
        if not self.subnormals:
            parts.append("nosub")
        return "_".join(parts)

    def __str__(self) -> str:
        return self.name

    # ---- values
    def grid(self) -> torch.Tensor:
        """All finite representable values: float64, ascending, unique, exact."""
        return _float_grid(self).clone()

    def _native_dtype(self):
        """torch's float8 dtype with exactly this grid (OCP E4M3 / IEEE-style E5M2), if any."""
        if not (self.signed and self.subnormals):
            return None
        if (self.exp_bits, self.man_bits, self.bias, self.max_value) == (4, 3, 7, 448.0):
            return torch.float8_e4m3fn
        if (self.exp_bits, self.man_bits, self.bias, self.max_value) == (5, 2, 15, 57344.0):
            return torch.float8_e5m2
        return None

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """Round to the nearest representable value (ties to even, saturating, NaN kept).

        Works for any floating dtype (computed exactly in float64, returned in the
        input dtype); integer input is promoted to the default float dtype.  The
        result carries no gradient.
        """
        x = _as_tensor(x).detach()
        if not x.is_floating_point():
            x = x.to(torch.get_default_dtype())
        native = self._native_dtype()
        if native is not None and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
            # same grid, ties to even and subnormals as torch's float8 cast, which is exact from
            # these dtypes; clamping first gives the saturation torch's cast lacks (NaN stays NaN)
            return torch.clamp(x, -self.max_value, self.max_value).to(native).to(x.dtype)
        out_dtype = x.dtype
        xd = x.to(torch.float64)
        M = self.man_bits
        emin = 1 - self.bias
        maxv = self.max_value

        a = xd.abs() if self.signed else xd.clamp(min=0.0)
        # everything at or beyond max_value rounds to max_value; clamping also tames inf
        a = torch.nan_to_num(torch.clamp(a, max=2.0 * maxv), nan=0.0)
        e = torch.clamp(torch.frexp(a).exponent.to(torch.int64) - 1, min=emin)  # floor(log2 a), >= emin
        shift = e - M  # quantum (ulp) of a's binade is 2**shift
        y = a * _pow2(-shift)  # exact: scaling by a power of two
        lo = torch.floor(y)
        frac = y - lo
        # magnitude code of `lo * 2**shift`: (e - emin) * 2**M + lo (covers subnormals, e == emin)
        code_lo = (e - emin) * (1 << M) + lo.to(torch.int64)
        up = (frac > 0.5) | ((frac == 0.5) & ((code_lo & 1) == 1))
        v = torch.clamp((lo + up.to(lo.dtype)) * _pow2(shift), max=maxv)
        if not self.subnormals:
            mn = self.min_normal
            flushed = torch.where(a > 0.5 * mn, torch.full_like(a, mn), torch.zeros_like(a))
            v = torch.where(a < mn, flushed, v)
        if self.signed:
            v = torch.copysign(v, xd)
        v = torch.where(torch.isnan(xd), xd, v)
        return v.to(out_dtype)


def _decode_all(fmt: FloatFormat) -> list[float]:
    """Values of every finite non-negative magnitude code, in code order."""
    E, M = fmt.exp_bits, fmt.man_bits
    e_all, m_all = (1 << E) - 1, (1 << M) - 1
    out = []
    for e in range(1 << E):
        for m in range(1 << M):
            if fmt.special == "ieee" and e == e_all:
                continue
            if fmt.special == "ocp_e4m3" and e == e_all and m == m_all:
                continue
            if e == 0:
                v = math.ldexp(m, 1 - fmt.bias - M) if fmt.subnormals else 0.0
            else:
                v = math.ldexp((1 << M) + m, e - fmt.bias - M)
            out.append(v)
    return out


@functools.lru_cache(maxsize=None)
def _float_grid(fmt: FloatFormat) -> torch.Tensor:
    pos = sorted(set(_decode_all(fmt)))
    vals = ([-v for v in reversed(pos) if v != 0.0] if fmt.signed else []) + pos
    return torch.tensor(vals, dtype=torch.float64)


Format = IntFormat | FloatFormat


# --------------------------------------------------------------------------- named formats

#: OCP FP8 E4M3: bias 7, max 448, min subnormal 2**-9; only S.1111.111 is NaN, no inf.
fp8_e4m3 = FloatFormat(4, 3, special="ocp_e4m3", name_override="fp8_e4m3")
#: Finite-only E4M3 variant (no NaN/inf codes at all): bias 7, max 480.
fp8_e4m3_fn480 = FloatFormat(4, 3, special="finite", name_override="fp8_e4m3_finite")
fp8_e4m3_finite = fp8_e4m3_fn480
#: OCP FP8 E5M2 (IEEE-like): bias 15, max 57344, min subnormal 2**-16.
fp8_e5m2 = FloatFormat(5, 2, special="ieee", name_override="fp8_e5m2")
#: OCP MX FP6 E3M2: bias 3, max 28, all codes finite.
fp6_e3m2 = FloatFormat(3, 2, special="finite", name_override="fp6_e3m2")
#: OCP MX FP6 E2M3: bias 1, max 7.5, all codes finite.
fp6_e2m3 = FloatFormat(2, 3, special="finite", name_override="fp6_e2m3")
#: OCP MX FP4 E2M1: bias 1, values {0, 0.5, 1, 1.5, 2, 3, 4, 6} and negatives.
fp4_e2m1 = FloatFormat(2, 1, special="finite", name_override="fp4_e2m1")
#: FP4 E3M0 (not in the OCP MX spec; same conventions as its MX siblings): default
#: bias 3, all codes finite; exponent field 0 is zero, so the values are
#: {0, 0.25, 0.5, 1, 2, 4, 8, 16} and negatives.
fp4_e3m0 = FloatFormat(3, 0, special="finite", name_override="fp4_e3m0")

NAMED_FORMATS: dict[str, FloatFormat] = {
    f.name: f for f in (fp8_e4m3, fp8_e4m3_fn480, fp8_e5m2, fp6_e3m2, fp6_e2m3, fp4_e2m1, fp4_e3m0)
}
_ALIASES: dict[str, FloatFormat] = {"fp8_e4m3fn": fp8_e4m3, "fp8_e4m3_fn480": fp8_e4m3_fn480}
_NAMED_BY_FORMAT: dict[FloatFormat, str] = {f: n for n, f in NAMED_FORMATS.items()}

_INT_RE = re.compile(r"(u?)int(\d+)(n?)")
_FP_RE = re.compile(r"(u?)fp(\d+)_e(\d+)m(\d+)(?:_(ieee|ocp|finite))?(?:_b(-?\d+))?(_nosub)?")

_VALID_FORMS = (
    "int{2..16}, uint{2..16}, int{2..16}n (narrow signed range), "
    + ", ".join(list(NAMED_FORMATS) + list(_ALIASES))
    + ", or generic fp{total}_e{E}m{M} with E+M+1 == total (all codes finite, default bias), "
    "optionally suffixed _ieee|_ocp|_finite, _b{bias}, _nosub, or prefixed u (unsigned, E+M == total)"
)


def parse(name: str | IntFormat | FloatFormat) -> IntFormat | FloatFormat:
    """Format from a name (see the module docstring); format objects are returned unchanged."""
    if isinstance(name, (IntFormat, FloatFormat)):
        return name
    if not isinstance(name, str):
        raise TypeError(f"expected a format name or format object, got {type(name).__name__}")
    key = name.strip().lower()
    if key in NAMED_FORMATS:
        return NAMED_FORMATS[key]
    if key in _ALIASES:
        return _ALIASES[key]
    m = _INT_RE.fullmatch(key)
    if m:
        bits = int(m.group(2))
        if not 2 <= bits <= 16:
            raise ValueError(f"bad integer format {name!r}: bits must be in 2..16")
        if m.group(1) and m.group(3):
            raise ValueError(f"bad integer format {name!r}: narrow range only applies to signed formats")
        return IntFormat(bits, signed=not m.group(1), narrow=bool(m.group(3)))
    m = _FP_RE.fullmatch(key)
    if m:
        unsigned, total, E, M = bool(m.group(1)), int(m.group(2)), int(m.group(3)), int(m.group(4))
        if E + M + (0 if unsigned else 1) != total:
            need = "E+M" if unsigned else "E+M+1"
            raise ValueError(f"bad float format {name!r}: {need} must equal the total bits {total}")
        special = _TAG_SPECIAL[m.group(5)] if m.group(5) else "finite"
        bias = int(m.group(6)) if m.group(6) is not None else None
        try:
            return FloatFormat(E, M, bias=bias, signed=not unsigned, subnormals=not m.group(7), special=special)
        except ValueError as err:
            raise ValueError(f"bad float format {name!r}: {err}") from None
    raise ValueError(f"unknown number format {name!r}; valid forms: {_VALID_FORMS}")
