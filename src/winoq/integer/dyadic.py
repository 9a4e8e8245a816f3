"""Dyadic numbers b / 2^c for integer-only requantization (HAWQ-V3).

A real multiplier ``s`` (e.g. ``S_w S_in / S_out``) becomes ``b / 2^c`` with
``(m, e) = frexp(s)`` (``0.5 <= m < 1``), ``b = round(m 2^31)``, ``c = 31 - e``.
A mantissa that rounds up to ``b = 2^31`` does not fit int32: it is renormalized to
``(2^30, c - 1)``. ``requantize`` computes ``(z b + 2^(c-1)) >> c`` in int64 (round half up).
"""
from __future__ import annotations

import math

import torch

MANTISSA_BITS = 31
MAX_SHIFT = 62  # z * b fits int64 for |z| < 2^31 and b < 2^31; a shift of 63+ leaves only the sign
MIN_SHIFT = 1   # 2^(c-1) must be an integer


class DyadicRangeError(ValueError):
    """A multiplier whose dyadic form needs a shift outside [MIN_SHIFT, MAX_SHIFT]."""


def dyadic(scale: float, where: str = "a layer") -> tuple[int, int]:
    """``(b, c)`` with ``b / 2^c`` the dyadic approximation of ``scale > 0`` (see module doc)."""
    if not (scale > 0 and math.isfinite(scale)):
        raise DyadicRangeError(f"{where}: requantization scale {scale!r} is not a positive finite number")
    m, e = math.frexp(scale)
    b = round(m * (1 << MANTISSA_BITS))
    c = MANTISSA_BITS - e
    if b == 1 << MANTISSA_BITS:  # m rounded up to 1.0: renormalize so b fits int32
        b, c = b >> 1, c - 1
    if c > MAX_SHIFT:
        raise DyadicRangeError(
            f"{where}: requantization scale {scale:.3e} underflows the dyadic range (needs a shift of "
            f"{c} > {MAX_SHIFT} bits); its input or weight scale is tiny against its output scale: "
            f"check the calibration range of this layer or keep it in float")
    if c < MIN_SHIFT:
        raise DyadicRangeError(
            f"{where}: requantization scale {scale:.3e} overflows the dyadic range (shift {c} < {MIN_SHIFT}); "
            f"its output scale is tiny against its input: check the calibration range of this layer")
    return b, c


def dyadic_tensor(scales: torch.Tensor, where: str = "a layer") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element :func:`dyadic` of a float tensor; returns int64 tensors ``(b, c)`` of its shape."""
    flat = scales.detach().double().flatten().tolist()
    pairs = []
    for i, s in enumerate(flat):
        pairs.append(dyadic(s, where if len(flat) == 1 else f"{where} (channel {i})"))
    b = torch.tensor([p[0] for p in pairs], dtype=torch.int64).reshape(scales.shape)
    c = torch.tensor([p[1] for p in pairs], dtype=torch.int64).reshape(scales.shape)
    return b, c


def requantize(z: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``(z b + 2^(c-1)) >> c`` in int64 (arithmetic shift: floor, so ties round up).

    ``z b`` fits int64 (``|z| < 2^32``, ``b < 2^31``) but ``z b + 2^(c-1)`` may not, so the
    rounding is added to the remainder only: with ``z b = q 2^c + r`` (``0 <= r < 2^c``) the
    result is ``q + ((r + 2^(c-1)) >> c)``."""
    z = z.to(torch.int64)
    t = z * b
    q = torch.bitwise_right_shift(t, c)
    r = t - torch.bitwise_left_shift(q, c)
    half = torch.bitwise_left_shift(torch.ones_like(c), c - 1)
    return q + torch.bitwise_right_shift(r + half, c)


def requantize_float(z: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The same result as :func:`requantize`, computed in float64 only (the float simulation).

    ``z b`` can need 62 bits, more than float64 holds, so it is formed exactly as
    ``H 2^32 + L`` (``0 <= L < 2^32``) from 16-bit halves of ``z`` and ``b``, every partial
    product and sum below 2^53. Then ``floor((H 2^32 + L + 2^(c-1)) / 2^c)`` is
    ``H 2^(32-c) + floor((L + 2^(c-1)) / 2^c)`` for ``c <= 32`` and
    ``floor((H + 2^(c-33)) / 2^(c-32))`` for ``c >= 33`` (L / 2^32 < 1 cannot carry past a
    multiple of the integer ``2^(c-32)``). Exact for integer ``|z| < 2^32``, ``0 < b < 2^31`` and
    ``1 <= c <= 62``."""
    if int(c.max()) > MAX_SHIFT or int(c.min()) < MIN_SHIFT:
        raise ValueError(f"dyadic shifts must lie in [{MIN_SHIFT}, {MAX_SHIFT}], got [{int(c.min())}, {int(c.max())}]")
    two16, two32 = 65536.0, 4294967296.0
    z = z.to(torch.float64)
    bf, cf = b.to(torch.float64), c.to(torch.float64)
    zh = torch.floor(z / two16)
    zl = z - zh * two16                              # [0, 2^16)
    bh = torch.floor(bf / two16)
    bl = bf - bh * two16
    t1 = (zh * bl + zl * bh) * two16 + zl * bl       # |.| < 2^50: exact
    h1 = torch.floor(t1 / two32)
    low = t1 - h1 * two32                            # [0, 2^32)
    high = zh * bh + h1                              # |.| < 2^32
    small = torch.exp2(cf.clamp(max=32))
    res_small = high * torch.exp2(32 - cf.clamp(max=32)) + torch.floor((low + small / 2) / small)
    big = torch.exp2((cf - 32).clamp(min=0))
    res_big = torch.floor((high + torch.exp2((cf - 33).clamp(min=0))) / big)
    return torch.where(cf <= 32, res_small, res_big)
