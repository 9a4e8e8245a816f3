"""Triton kernels for the fully quantized group-wise Winograd conv (GPU; optional).

Three kernels; ``P = N * th * tw`` tile columns, taps-first intermediates with the
channels innermost (coalesced):

(a) ``_input_kernel``: gathers the n x n tiles straight from ``x`` (NCHW or
    channels_last, any float dtype; zero padding by masks), quantizes them to the
    input codes, applies the input transform as one small GEMM with
    ``kron(den BT, den BT)`` (integers: exact in an fp16 x fp16 -> fp32 dot; a
    tf32x3 dot for non-integral transforms), scales by ``s_x / den^2`` and the
    diagonal scales, takes ``max |V|`` per (sample, tile, channel group) and writes
    the int8 codes of V ``(taps, P, C)`` and the scales ``(groups, P)``;
(b) ``_gemm_kernel``: per tap, an int8 x int8 -> int32 ``tl.dot`` for every channel
    group (int32 accumulation inside the group), each group's sums times
    (V scale x U scale) added in fp32: ``M (taps, P, K)``;
(c) ``_output_kernel``: per output-channel group and tile block, ``max |M|`` over
    the taps and channels, the int codes of M, the output transform
    ``kron(AT', AT')`` (tf32x3 dot), times the M scale, plus bias, stored into
    ``y (N, K, H, W)`` in x's dtype and memory format.

The input stage's scales (one max per sample and channel group of x, or, with per-tile
input scales -- the default, see :mod:`winoq.granularity` -- one per tile and channel group
within a conv group) are a torch reduction before (a). (a) and (b) are compiled without FMA contraction so that they
round like the separate torch operations of :mod:`winoq.kernels.int_cpu`: on the
same input both produce the same int8 codes for V and M.

``triton`` is optional (not a dependency of winoq). The kernels run on CUDA
tensors, or on CPU tensors under the Triton interpreter when ``TRITON_INTERPRET=1``
was set before triton was imported -- how ``tests/test_kernels.py`` checks them.
All variants also compile for sm_90 without a GPU (``triton.compile`` with
``GPUTarget("cuda", 90, 32)``; ptxas reports no register spills for the
integral F(4,3) / F(6,3) paths at the block sizes used).

Scope: ``QuantWinogradConv2d`` with zero padding, ``scale_mode="shared"``, integer
formats whose codes fit int8 for V and U, an integer (or no) input and output
format, input scales per sample or per tile (not per pixel block). Anything else raises ``NotImplementedError`` naming ``"emulated"``.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch

from ..granularity import ALL
from ..quantizers import compute_scale, quantize
from ..winograd.conv import conv_padding, transform_2d
from . import SYMMETRIC_ONLY

_MIN_SCALE = 1e-30


try:  # optional dependency
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = tl = None


def _jit(fn):
    return fn if triton is None else triton.jit(fn)


def interpreted() -> bool:
    """True when the kernels run under the Triton interpreter (TRITON_INTERPRET=1 was set
    before triton was imported: triton.language's own helpers are interpreted only then)."""
    return triton is not None and type(_input_kernel).__name__ == "InterpretedFunction"


# ============================================================================= kernels
# Rounding is round-half-to-even without libdevice (the interpreter has none):
# r = floor(u), f = u - r (exact for |u| < 2^23), then r + 1 when f > 0.5 or
# (f == 0.5 and r is odd) -- torch.round's rule.
@_jit
def _input_kernel(
    x_ptr, sx_ptr, rowf_ptr, wtap_ptr, kt_ptr, v_ptr, sv_ptr,
    C, H, W, TW, T, PT, PL, P, CG, GS, J, NGRP, SXN, SXC, SXH, SXW, SCN, SCT,
    in_qmin, in_qmax, v_qmin, v_qmax,
    N_TAP: tl.constexpr, M_OUT: tl.constexpr, TAPS: tl.constexpr, TAPS_PAD: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, NCHUNK: tl.constexpr, NPASS: tl.constexpr,
    QUANT_INPUT: tl.constexpr, FP16_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """(a) tiles of x -> input codes -> V = B d B^T (one small GEMM) -> int8 codes of V
    (taps, P, C) with one scale per (sample, tile, channel group): sv (groups, P). The input
    scale of a row (tile, channel) is at ``sx + n * SCN + t * SCT + c`` (SCT = 0: per sample)."""
    pid0 = tl.program_id(0)
    n = pid0 // NGRP
    gid = pid0 % NGRP
    gi = gid // J
    j = gid % J
    c_start = gi * CG + j * GS
    c_len = tl.minimum(GS, CG - j * GS)
    ROWS: tl.constexpr = BLOCK_C * BLOCK_T

    q = tl.arange(0, TAPS_PAD)
    qa = q // N_TAP
    qb = q % N_TAP
    qmask = q < TAPS
    kt = tl.load(kt_ptr + q[:, None] * TAPS_PAD + q[None, :])  # (in tap, out tap), zero padded
    if FP16_DOT:
        kt = kt.to(tl.float16)
    wtap = tl.load(wtap_ptr + q)  # 0 on the padded taps

    r = tl.arange(0, ROWS)  # rows: (tile, channel), channel fastest (coalesced for channels_last x)
    rl_c = r % BLOCK_C
    rl_t = r // BLOCK_C
    t = tl.program_id(1) * BLOCK_T + rl_t
    tmask = t < T
    ti = t // TW
    tj = t % TW
    h = ti[:, None] * M_OUT + qa[None, :] - PT
    w = tj[:, None] * M_OUT + qb[None, :] - PL
    hw_ok = (h >= 0) & (h < H) & (w >= 0) & (w < W) & qmask[None, :]

    amax = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for pas in tl.static_range(NPASS):  # two passes (max, then codes) when the group spans chunks
        for ch in range(NCHUNK):
            cl = ch * BLOCK_C + rl_c
            c = c_start + cl
            rmask = (cl < c_len) & tmask
            xv = tl.load(x_ptr + n * SXN + c[:, None] * SXC + h * SXH + w * SXW,
                         mask=rmask[:, None] & hw_ok, other=0.0).to(tl.float32)
            if QUANT_INPUT:
                s = tl.load(sx_ptr + n * SCN + t * SCT + c, mask=rmask, other=1.0)
                u = xv / s[:, None]
                fl = tl.floor(u)
                fr = u - fl
                up = (fr > 0.5) | ((fr == 0.5) & ((fl - 2.0 * tl.floor(fl * 0.5)) != 0.0))
                d = tl.minimum(tl.maximum(fl + up.to(tl.float32), in_qmin), in_qmax)
            else:
                d = xv
            if FP16_DOT:  # integer codes times an integer transform: exact products, fp32 sums
                v = tl.dot(d.to(tl.float16), kt, out_dtype=tl.float32)
            else:
                v = tl.dot(d, kt, input_precision=DOT_PRECISION)
            rowf = tl.load(rowf_ptr + n * SCN + t * SCT + c, mask=rmask, other=0.0)
            vf = v * (rowf[:, None] * wtap[None, :])  # the real V: s_x / den^2 and the diagonal scales
            if pas == 0:
                va = tl.where(rmask[:, None] & qmask[None, :], tl.abs(vf), 0.0)
                va = tl.reshape(va, (BLOCK_T, BLOCK_C, TAPS_PAD))
                amax = tl.maximum(amax, tl.max(tl.max(va, axis=2), axis=1))
            if pas == NPASS - 1:
                sv = tl.maximum(amax / v_qmax, 1e-30)  # (BLOCK_T,)
                svr = tl.reshape(tl.broadcast_to(sv[:, None], (BLOCK_T, BLOCK_C)), (ROWS,))
                if ch == 0:
                    tl.store(sv_ptr + gid * P + n * T + t, svr, mask=tmask & (rl_c == 0))
                u = vf / svr[:, None]
                fl = tl.floor(u)
                fr = u - fl
                up = (fr > 0.5) | ((fr == 0.5) & ((fl - 2.0 * tl.floor(fl * 0.5)) != 0.0))
                code = tl.minimum(tl.maximum(fl + up.to(tl.float32), v_qmin), v_qmax)
                tl.store(v_ptr + (q[None, :] * P + n * T + t[:, None]) * C + c[:, None], code.to(tl.int8),
                         mask=rmask[:, None] & qmask[None, :])


@_jit
def _gemm_kernel(
    u_ptr, v_ptr, su_ptr, sv_ptr, m_ptr,
    K, C, CG, KG, P, GS, J, NKB, SU_TAP_STRIDE,
    BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_CK: tl.constexpr,
):
    """(b) per tap: M[p, k] = sum over channel groups j of
    (int32 sum_{c in j} U[k, c] V[c, p]) * sv[j, p] * su[k, j]; M is (taps, P, K)."""
    tap = tl.program_id(0)
    gi = tl.program_id(1) // NKB
    kb = tl.program_id(1) % NKB
    kl = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = kl < KG
    k = gi * KG + kl
    p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < P
    cc = tl.arange(0, BLOCK_CK)
    out = tl.zeros((BLOCK_K, BLOCK_P), dtype=tl.float32)
    for j in range(J):
        glen = tl.minimum(GS, CG - j * GS)
        acc = tl.zeros((BLOCK_K, BLOCK_P), dtype=tl.int32)
        for c0 in range(0, GS, BLOCK_CK):
            cl = c0 + cc
            cm = cl < glen
            u = tl.load(u_ptr + (tap * K + k[:, None]) * CG + j * GS + cl[None, :],
                        mask=kmask[:, None] & cm[None, :], other=0)
            v = tl.load(v_ptr + (tap * P + p[None, :]) * C + gi * CG + j * GS + cl[:, None],
                        mask=cm[:, None] & pmask[None, :], other=0)
            acc += tl.dot(u, v, out_dtype=tl.int32)  # int32 sums inside the channel group
        su = tl.load(su_ptr + tap * SU_TAP_STRIDE + k * J + j, mask=kmask, other=0.0)
        sv = tl.load(sv_ptr + (gi * J + j) * P + p, mask=pmask, other=0.0)
        out += (acc.to(tl.float32) * sv[None, :]) * su[:, None]
    tl.store(m_ptr + (tap * P + p[None, :]) * K + k[:, None], out, mask=kmask[:, None] & pmask[None, :])


@_jit
def _output_kernel(
    m_ptr, at_ptr, bias_ptr, y_ptr, mq_ptr,
    K, P, T, TW, OH, OW, GSM, SYN, SYK, SYH, SYW, inv_qmax, m_qmin, m_qmax,
    M_OUT: tl.constexpr, M2: tl.constexpr, M2_PAD: tl.constexpr, TAPS: tl.constexpr, TAPS_PAD: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, NCHUNK: tl.constexpr, NPASS: tl.constexpr,
    QUANT_M: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_MQ: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """(c) per output-channel group and tile block: max |M| over taps and channels, M codes,
    y = AT' Mq A' times the M scale, plus bias, into y (strided, NCHW or channels_last)."""
    jm = tl.program_id(0)
    k_start = jm * GSM
    g_len = tl.minimum(GSM, K - k_start)
    COLS: tl.constexpr = BLOCK_P * BLOCK_K
    col = tl.arange(0, COLS)  # columns: (tile, channel), channel fastest
    cl_k = col % BLOCK_K
    cl_p = col // BLOCK_K
    pl = tl.program_id(1) * BLOCK_P + cl_p
    pmask = pl < P
    q = tl.arange(0, TAPS_PAD)
    qmask = q < TAPS
    o = tl.arange(0, M2_PAD)
    at = tl.load(at_ptr + o[:, None] * TAPS_PAD + q[None, :])  # (out tap, tap), zero padded

    n = pl // T
    t = pl % T
    ti = t // TW
    tj = t % TW
    hh = ti[None, :] * M_OUT + (o // M_OUT)[:, None]
    ww = tj[None, :] * M_OUT + (o % M_OUT)[:, None]

    amax = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for pas in tl.static_range(NPASS):
        for ch in range(NCHUNK):
            kl = ch * BLOCK_K + cl_k
            k = k_start + kl
            cmask = (kl < g_len) & pmask
            mptr = (q[:, None] * P + pl[None, :]) * K + k[None, :]
            mm = tl.load(m_ptr + mptr, mask=qmask[:, None] & cmask[None, :], other=0.0)  # (TAPS_PAD, COLS)
            if QUANT_M:
                if pas == 0:
                    ma = tl.reshape(tl.max(tl.abs(mm), axis=0), (BLOCK_P, BLOCK_K))
                    amax = tl.maximum(amax, tl.max(ma, axis=1))
                if pas == NPASS - 1:
                    sm = tl.maximum(amax * inv_qmax, 1e-30)
                    smc = tl.reshape(tl.broadcast_to(sm[:, None], (BLOCK_P, BLOCK_K)), (COLS,))
                    u = mm / smc[None, :]
                    fl = tl.floor(u)
                    fr = u - fl
                    up = (fr > 0.5) | ((fr == 0.5) & ((fl - 2.0 * tl.floor(fl * 0.5)) != 0.0))
                    mq = tl.minimum(tl.maximum(fl + up.to(tl.float32), m_qmin), m_qmax)
                    if STORE_MQ:
                        tl.store(mq_ptr + mptr, mq, mask=qmask[:, None] & cmask[None, :])
                    y = tl.dot(at, mq, input_precision=DOT_PRECISION) * smc[None, :]  # (M2_PAD, COLS)
            else:
                y = tl.dot(at, mm, input_precision=DOT_PRECISION)
            if pas == NPASS - 1:
                if HAS_BIAS:
                    y += tl.load(bias_ptr + k, mask=cmask, other=0.0)[None, :]
                omask = (o[:, None] < M2) & cmask[None, :] & (hh < OH) & (ww < OW)
                yptr = y_ptr + n[None, :] * SYN + k[None, :] * SYK + hh * SYH + ww * SYW
                tl.store(yptr, y.to(y_ptr.dtype.element_ty), mask=omask)


# ============================================================================= host side
def unsupported_reason(layer) -> str | None:
    from ..winograd.quantized import QuantWinogradConv2d

    if not isinstance(layer, QuantWinogradConv2d):
        return f"{type(layer).__name__} is not a QuantWinogradConv2d"
    fm = layer.formats
    if layer.scale_mode != "shared" or layer.granularity.v.keeps("tap"):
        return ("Winograd-domain scales per tap (scales='tapwise' or winograd_input_scales='tapwise'; the Triton "
                "kernels implement V and M scales shared by the taps)")
    for name, f in (("winograd_input", fm.winograd_input), ("weight", fm.weight)):
        if f is None or f.is_float or f.qmin < -128 or f.qmax > 127:
            return f"the {name} stage is {getattr(f, 'name', 'float')}; the kernels need integer codes that fit int8"
    for name, f in (("input", fm.input), ("output", fm.output)):
        if f is not None and f.is_float:
            return f"the {name} stage is {f.name}; the kernels handle integer (or unquantized) {name}s"
    if layer.padding_mode != "zeros":
        return f"padding_mode {layer.padding_mode!r} (the kernels pad with zeros)"
    if layer.granularity.input_mode == "block":
        return "input scales per pixel block (a tile straddles blocks: no integer input transform)"
    if layer.granularity.input.zero_point:
        return SYMMETRIC_ONLY
    return None


# Kernels (a) and (b) decide integer codes: no fused multiply-adds there, so that their
# float steps round like the separate torch ops of int_cpu (identical codes).
_NO_FMA = {"enable_fp_fusion": False}
# Float dots (the output transform; the input transform when not integral): three tf32
# passes give ~fp32 accuracy on tensor cores ("ieee" compiles to spilling FMA loops).
_FLOAT_DOT = "tf32x3"
# Block sizes and warps were chosen so that ptxas reports no register spills for sm_90
# (checked with triton.compile(..., target=GPUTarget("cuda", 90, 32)) and cuobjdump):
# 128-row tiles in (a) and (c), 64 x 64 in (b), 8 warps each.


def _pow2(v: int, lo: int = 1) -> int:
    return max(lo, 1 << max(0, math.ceil(math.log2(max(v, 1)))))


def _common_denominator(mat: torch.Tensor, limit: int = 1 << 12) -> int | None:
    for d in range(1, limit + 1):
        s = mat * d
        if torch.equal(s, s.round()):
            return d
    return None


@dataclass
class Prepared:
    key: tuple
    u8: torch.Tensor       # (taps, K, cg) int8
    su: torch.Tensor       # (taps|1, K, J) float32
    su_tap_stride: int
    kt: torch.Tensor       # (TAPS_PAD, TAPS_PAD) float32: kron(B, B)^T, B = den*BT (integral) or BT'
    wtap: torch.Tensor     # (TAPS_PAD,) float32: kron(s_b, s_b) for the integral form, else 1
    den: int
    integral: bool
    fp16_dot: bool
    at: torch.Tensor       # (M2_PAD, TAPS_PAD) float32: kron(AT', AT')
    gs: int
    nj: int


_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def prepare(layer, device) -> Prepared:
    ft = layer.free_transforms
    key = (str(device), layer.weight._version, layer.weight.data_ptr(), layer.log_sb._version,
           layer.log_sg._version, None if ft is None else tuple((k, p._version) for k, p in ft.items()),
           layer.formats, layer.groups, layer.granularity.u)
    hit = _CACHE.get(layer)
    if hit is not None and hit.key == key:
        return hit
    fm = layer.formats
    with torch.no_grad():
        at, g, bt = layer.transforms(torch.float64, layer.weight.device)
        u = transform_2d(g, layer.weight.double())
        su_full = compute_scale(u, fm.weight, layer._weight_gran())[0]
        codes = quantize(u, fm.weight, su_full).codes  # (K, cg, n, n)
    k, cg, n, _ = codes.shape
    taps = n * n
    gs = cg if layer.group_size is None else min(layer.group_size, cg)
    nj = math.ceil(cg / gs)
    u8 = codes.reshape(k, cg, taps).permute(2, 0, 1).contiguous().to(torch.int8)
    firsts = torch.arange(nj) * gs
    s = su_full[:, firsts.to(su_full.device)]  # (K, J, n|1, n|1)
    tapwise_u = s.shape[-1] != 1
    su = (s.reshape(k, nj, taps).permute(2, 0, 1) if tapwise_u else s.reshape(1, k, nj)).contiguous().float()
    taps_pad = _pow2(taps, 16)
    m = layer.m
    m2_pad = _pow2(m * m, 16)
    base_bt = ft["BT"].detach().double() if ft is not None else layer.tc.BT.to(bt.device)
    s_b = layer.log_sb.detach().exp().double().to(bt.device)
    den = _common_denominator(base_bt) if fm.input is not None else None
    integral = den is not None
    if integral:
        kron = torch.kron(base_bt * den, base_bt * den)
        wtap = torch.kron(s_b, s_b)
        fp16_dot = bool(kron.abs().max() <= 2048) and max(-fm.input.qmin, fm.input.qmax) <= 2048
    else:
        kron = torch.kron(bt, bt)
        wtap = torch.ones(taps, dtype=torch.float64, device=bt.device)
        fp16_dot = False
    kt = torch.zeros(taps_pad, taps_pad, dtype=torch.float64, device=bt.device)
    kt[:taps, :taps] = kron.t()
    wt = torch.zeros(taps_pad, dtype=torch.float64, device=bt.device)
    wt[:taps] = wtap
    atp = torch.zeros(m2_pad, taps_pad, dtype=torch.float64, device=bt.device)
    atp[: m * m, :taps] = torch.kron(at, at)
    prep = Prepared(key, u8.to(device), su.to(device), 0 if su.shape[0] == 1 else k * nj,
                    kt.float().to(device), wt.float().to(device), den or 1, integral, fp16_dot,
                    atp.float().to(device), gs, nj)
    _CACHE[layer] = prep
    return prep


def _tile_input_scales(layer, x: torch.Tensor, pad, th: int, tw: int) -> torch.Tensor:
    """(N, T, C) float32 scale of each tile's input per channel group within a conv group
    (same expression as fake_quantize_dynamic, as int_cpu computes it)."""
    fmt = layer.formats.input
    nb, c, h, w = x.shape
    m, n = layer.m, layer.m + layer.kernel_size - 1
    xa = torch.nn.functional.pad(x.float().abs(), (pad[0], tw * m + n - m - w - pad[0], pad[2], th * m + n - m - h - pad[2]))
    amax = torch.nn.functional.max_pool2d(xa, n, stride=m)  # (N, C, th, tw): max |x| of each tile
    g = layer.groups
    cg = c // g
    gs = min(layer.group_size or ALL, cg)
    nj = math.ceil(cg / gs)
    a = torch.nn.functional.pad(amax.reshape(nb, g, cg, th * tw), (0, 0, 0, nj * gs - cg))
    a = a.reshape(nb, g, nj, gs, th * tw).amax(3)  # (N, G, J, T)
    s = (a * (1.0 / fmt.max_value)).clamp_min(_MIN_SCALE).repeat_interleave(gs, dim=2)[:, :, :cg]
    return s.reshape(nb, c, th * tw).transpose(1, 2).contiguous()


def _input_scales(layer, x: torch.Tensor) -> torch.Tensor:
    """(N, C) float32 scale of the input stage (same expression as fake_quantize_dynamic)."""
    fmt = layer.formats.input
    nb, c = x.shape[:2]
    flat = x.reshape(nb, c, -1)
    amax_c = torch.maximum(flat.amax(-1), flat.amin(-1).neg()).float()
    gs_in = c if layer.group_size is None else min(layer.group_size, c)
    nin = math.ceil(c / gs_in)
    amax_g = torch.nn.functional.pad(amax_c, (0, nin * gs_in - c)).reshape(nb, nin, gs_in).amax(-1)
    s_g = (amax_g * (1.0 / fmt.max_value)).clamp_min(_MIN_SCALE)
    return s_g.repeat_interleave(gs_in, dim=1)[:, :c].contiguous()


@torch.no_grad()
def forward(layer, x: torch.Tensor, *, return_codes: bool = False,
            block_t: int | None = None, block_k: int = 64, block_p: int = 64):
    """Fully quantized Winograd conv of ``layer`` with the Triton kernels (CUDA tensors;
    CPU tensors under the Triton interpreter). Returns y ((N, K, H_out, W_out), x's
    float dtype and memory format) and, with ``return_codes``,
    the int8 codes of V, the scales of V, M before requantization and M's codes."""
    why = unsupported_reason(layer)
    if why is not None:
        raise NotImplementedError(f"triton kernel: {why}; use kernel='emulated'")
    if triton is None:
        raise RuntimeError("kernel 'triton' needs the 'triton' package (pip install triton); "
                           "kernel 'emulated' works everywhere")
    layer.check_input(x)
    if x.device.type != "cuda" and not interpreted():
        raise RuntimeError(f"the Triton kernels need CUDA tensors (got {x.device}); CPU tensors run only under the "
                           "Triton interpreter, i.e. with TRITON_INTERPRET=1 set before triton is imported")
    k_in, k_gemm, k_out = _input_kernel, _gemm_kernel, _output_kernel
    fm = layer.formats
    dev = x.device
    prep = prepare(layer, dev)
    nb, c, h, w = x.shape
    r, m = layer.kernel_size, layer.m
    n = m + r - 1
    taps = n * n
    taps_pad = prep.kt.shape[0]
    k = layer.out_channels
    G = layer.groups
    cg, kg = c // G, k // G
    gs, nj = prep.gs, prep.nj
    pad = conv_padding(layer.padding, r)
    oh, ow = h + pad[2] + pad[3] - r + 1, w + pad[0] + pad[1] - r + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"input {(h + pad[2] + pad[3], w + pad[0] + pad[1])} after padding is smaller than the kernel")
    th, tw = math.ceil(oh / m), math.ceil(ow / m)
    t_count = th * tw
    p = nb * t_count
    vfmt, ofmt = fm.winograd_input, fm.output

    quant_in = fm.input is not None
    per_tile = quant_in and layer.granularity.input_mode == "tile"
    if per_tile:
        sx = _tile_input_scales(layer, x, pad, th, tw)  # (N, T, C)
        rowf = (sx / prep.den**2) if prep.integral else sx
        in_q = (float(fm.input.qmin), float(fm.input.qmax))
    elif quant_in:
        sx = _input_scales(layer, x)
        rowf = (sx / prep.den**2) if prep.integral else sx
        in_q = (float(fm.input.qmin), float(fm.input.qmax))
    else:
        sx = torch.ones(nb, c, dtype=torch.float32, device=dev)
        rowf = sx
        in_q = (0.0, 0.0)
    rowf = rowf.float().contiguous()

    v8 = torch.empty(taps, p, c, dtype=torch.int8, device=dev)
    sv = torch.empty(G * nj, p, dtype=torch.float32, device=dev)
    block_c = min(_pow2(gs), 64)
    bt_ = block_t or max(1, (128 if taps <= 36 else 64) // block_c)  # 128 rows spill at 8x8 taps
    nchunk = math.ceil(gs / block_c)
    grid_a = (nb * G * nj, math.ceil(t_count / bt_))
    k_in[grid_a](x, sx, rowf, prep.wtap, prep.kt, v8, sv,
                 c, h, w, tw, t_count, pad[2], pad[0], p, cg, gs, nj, G * nj, *x.stride(),
                 t_count * c if per_tile else c, c if per_tile else 0,
                 in_q[0], in_q[1], float(vfmt.qmin), float(vfmt.qmax),
                 N_TAP=n, M_OUT=m, TAPS=taps, TAPS_PAD=taps_pad, BLOCK_C=block_c, BLOCK_T=bt_, NCHUNK=nchunk,
                 NPASS=2 if nchunk > 1 else 1, QUANT_INPUT=quant_in, FP16_DOT=prep.fp16_dot and quant_in,
                 DOT_PRECISION=_FLOAT_DOT, num_warps=8, **_NO_FMA)

    mprod = torch.empty(taps, p, k, dtype=torch.float32, device=dev)
    bk = min(block_k, _pow2(kg, 16))
    bp = min(block_p, _pow2(p, 16))
    bck = max(32, min(64, _pow2(gs)))
    nkb = math.ceil(kg / bk)
    grid_b = (taps, G * nkb, math.ceil(p / bp))
    k_gemm[grid_b](prep.u8, v8, prep.su, sv, mprod, k, c, cg, kg, p, gs, nj, nkb, prep.su_tap_stride,
                   BLOCK_K=bk, BLOCK_P=bp, BLOCK_CK=bck, num_warps=8, **_NO_FMA)

    out_dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    fmt = torch.channels_last if (x.is_contiguous(memory_format=torch.channels_last)
                                  and not x.is_contiguous()) else torch.contiguous_format
    y = torch.empty(nb, k, oh, ow, dtype=out_dtype, device=dev, memory_format=fmt)
    gsm = k if layer.group_size is None else min(layer.group_size, k)
    bko = min(_pow2(gsm), 32)
    bpo = max(1, 128 // bko)
    nchunk_m = math.ceil(gsm / bko)
    quant_m = ofmt is not None
    mq = torch.empty(taps, p, k, dtype=torch.float32, device=dev) if (return_codes and quant_m) else mprod
    bias = layer.bias.detach().float().contiguous() if layer.bias is not None else mprod
    cq = float(1.0 / (ofmt.max_value if quant_m else 1.0))
    grid_c = (math.ceil(k / gsm), math.ceil(p / bpo))
    k_out[grid_c](mprod, prep.at, bias, y, mq, k, p, t_count, tw, oh, ow, gsm, *y.stride(), cq,
                  float(ofmt.qmin) if quant_m else 0.0, float(ofmt.qmax) if quant_m else 0.0,
                  M_OUT=m, M2=m * m, M2_PAD=prep.at.shape[0], TAPS=taps, TAPS_PAD=taps_pad,
                  BLOCK_K=bko, BLOCK_P=bpo, NCHUNK=nchunk_m, NPASS=2 if (quant_m and nchunk_m > 1) else 1,
                  QUANT_M=quant_m, HAS_BIAS=layer.bias is not None, STORE_MQ=bool(return_codes and quant_m),
                  DOT_PRECISION=_FLOAT_DOT, num_warps=8)
    if return_codes:
        return y, {"v": v8, "sv": sv, "m": mprod, "mq": mq if quant_m else None}
    return y
