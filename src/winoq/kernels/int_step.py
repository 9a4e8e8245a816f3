"""The compiled integer Winograd step of integer-only graphs (the fast path of
:class:`winoq.integer.winograd.IntWinogradConv2d`).

It computes exactly what the step's PyTorch forward computes (int8 codes in, int32 accumulator
out), the way a fast int8 kernel does (``csrc/winograd_int_step.cpp``): the input transform in
int16 lanes (int32 for F(6,3)), V codes in block floating point (a power-of-two exponent per tile,
tap and group of input channels: integer shifts, no float rescale), one int32 sum per tap over
all input channels with VNNI ``vpdpbusd`` (each group's sum shifted by its exponent), the
dyadic requantization of M, and the exact output transform. Static per-tap V scales
(``winograd_v_scales="static"``) and layers whose worst case would leave the kernel's integer
ranges run the PyTorch forward (same integers, slower): :func:`unsupported_reason` says why.

Built like the ``"cpu"`` kernel (:func:`winoq.kernels.cpu.compile_extension`): JIT with ninja into
``$WINOQ_EXT_DIR``, by ``bash setup.sh`` on a fresh machine; without a compiler it warns once and
the steps run in PyTorch.
"""
from __future__ import annotations

import torch

from ..winograd.fixed_point import int_transform_bound
from . import cpu

_SOURCES = ("winograd_int_step.cpp", "winograd_int_step_portable.h", "cpu_isa.h")
_STATE: dict = {}
_INT32 = 2**31 - 1


def load(verbose: bool = False):
    return cpu.compile_extension("winograd_int_step", _SOURCES, _STATE,
                                 "integer Winograd steps run their PyTorch forward", verbose)


def available() -> bool:
    return load() is not None


def isa() -> str | None:
    """Instruction set the compiled step picks on this CPU ("avx512-vnni", "avx2", "portable")."""
    mod = load()
    return None if mod is None else mod.best_isa()


def lanes(step) -> int:
    """Bits of the lanes the input transform runs in: 16 when every value fits int16, else 32."""
    return 16 if step.sb == 0 and int_transform_bound(step.bq, 0, 128) <= 2**15 - 1 else 32


def unsupported_reason(step) -> str | None:
    """Why the compiled step cannot run ``step`` (None when it can)."""
    if step.v_group == 0:
        return "static per-tap V scales (winograd_v_scales='static'); the compiled step takes V per tile ('tile')"
    if step.n not in (4, 6, 8):
        return f"F({step.m},{step.r}): the compiled step runs 4x4, 6x6 and 8x8 tiles"
    if step.v_group % 4:
        return f"V groups of {step.v_group} channels (the compiled step needs a multiple of 4)"
    if step.v_range > 127 or step.m_range > 2**15 - 1:
        return "V wider than 8 bits or M wider than 16 bits"
    if int_transform_bound(step.bq, step.sb, 128) > _INT32:
        return "the input transform leaves int32"
    y_max = int_transform_bound(step.aq, 0, step.m_range)
    if y_max >= 2**53:
        return "its output transform leaves the 2^53 the kernel's float64 lanes hold exactly"
    if (y_max >> step.so) + 1 + int(step.bias.abs().max()) > _INT32:
        return "its worst-case output leaves int32 (build_int_winograd chooses the final shift so that it cannot)"
    return None


def wide_sums(step) -> bool:
    """Can a tap's sum of shifted group sums leave int32 (then the kernel keeps it in int64)? Each
    code times 2^e is at most |V_int| + 2^(e-1) <= V_max + 2^(e_max-1)."""
    v_max = int_transform_bound(step.bq, step.sb, 128)
    e_max = max(0, v_max.bit_length() - step.v_range.bit_length())
    per_code = min(step.v_range << e_max, v_max + (1 << e_max >> 1))
    return per_code * int(step.u.abs().sum(-1).max()) > _INT32


def _best_isa(mod) -> str:
    if "isa" not in _STATE:
        _STATE["isa"] = mod.best_isa()
    return _STATE["isa"]


def _vector_isa(step, isa: str, lanes16: bool) -> str:
    """The requested instruction set, or "portable" where the vector path's shapes do not fit."""
    g = step.v_group
    fits = g % 32 == 0 and g <= 128 if lanes16 else g % 16 == 0 and g <= 64
    return isa if fits or isa == "portable" else "portable"


def _key(step) -> tuple:
    return tuple((t.data_ptr(), t._version) for t in (step.u, step.mb, step.mc, step.bias, step.aq, step.bq)) + \
        (step.v_group, step.v_range, step.m_range, step.sb, step.so, step.pre_shift)


def cached_reason(step) -> str | None:
    """:func:`unsupported_reason`, computed once per set of buffers (it reads all of U)."""
    return cpu.cached_on(step, "_compiled_reason", _key(step), lambda: unsupported_reason(step))


def _prepared(step, mod) -> tuple:
    """The packed U, the per-(tap, output channel) tables and the shifts, cached until the buffers change."""
    return cpu.cached_on(step, "_compiled", _key(step), lambda: _tables(step, mod))


def _tables(step, mod) -> tuple:
    taps, k, _ = step.u.shape
    up, uoff, upad = mod.pack(step.u.to(torch.int8), step.v_group)
    mb, mc, half = cpu.dyadic_lanes(step.mb, step.mc, (taps, k), uoff.shape[-1])
    bias = torch.nn.functional.pad(step.bias.to(torch.int32), (0, uoff.shape[-1] - k))
    shifts = [step.sb, int(lanes(step) == 16), step.pre_shift, step.so, int(wide_sums(step))]
    return up, uoff, upad, mb, mc, half, bias, step.bq.to(torch.int32), step.aq.to(torch.int64), shifts


@torch.no_grad()
def forward(step, x: torch.Tensor, isa: str = "", chunk: int = 0) -> torch.Tensor:
    """The step's int32 accumulator (N, K, OH, OW), channels-last, from 8-bit codes ``x`` (int8 or
    int32, any layout). ``isa``: force "avx512-vnni", "avx2" or "portable"; ``chunk``: tiles per
    parallel job (0: by the layer's size)."""
    why = cached_reason(step)
    if why is not None:
        raise ValueError(f"compiled integer Winograd step: {why}")
    mod = load()
    if mod is None:
        return step.forward_torch(x)
    up, uoff, upad, mb, mc, half, bias, bq, aq, shifts = _prepared(step, mod)
    ph, pw = step.padding
    oh, ow = x.shape[2] + 2 * ph - step.r + 1, x.shape[3] + 2 * pw - step.r + 1
    isa = _vector_isa(step, isa or _best_isa(mod), bool(shifts[1]))  # shifts[1]: int16 lanes, from the cache
    return mod.forward(x, [step.m, step.n, ph, pw, oh, ow], bq,
                       [step.v_group, step.v_range, step.v_range.bit_length()],
                       shifts,
                       up, uoff, upad, mb, mc, half, step.m_range, aq, bias, isa, chunk)
