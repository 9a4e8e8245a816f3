"""The fixed-point integer pipeline of a fully quantized Winograd conv: its one definition.

With learned diagonal scales the transforms ``BT' = S_B BT`` and ``AT' = AT (S_B S_G)^-1``
are not integer matrices, so integer hardware runs them as k-bit fixed point:
``Bq = round(BT' 2^k)``, ``Aq = round(AT' 2^k)`` (round half away from zero), except BT'
when V has one scale per tap: then S_B moves into that scale and ``Bq`` is the exact integer
Toom-Cook rows (step 2). Every other
step is defined here too, so that the compiled kernel (``winoq.kernels.cpu``) and the
pure-PyTorch twin :func:`reference_forward` compute the same integers and the same float32
values bit for bit (every float step is one IEEE operation in a fixed order, no FMA):

1. input codes ``qx = clamp(rha(x * rx))``, ``rx = Q_in / amax`` per (sample, tile, channel)
   (a tensor: one value per sample, tile and input channel group, the amax over the tile's
   n x n pixels; or one per sample and group expanded over the tiles), real scale ``sx = amax / Q_in``;
   with zero points (``StageGranularity.zero_point``) ``lo = min(x_min, 0)``, ``hi = max(x_max, 0)``,
   ``rx = (qmax - qmin) / (hi - lo)``, ``sx = (hi - lo) / (qmax - qmin)``,
   ``zp = clamp(rha(qmin - lo * rx), qmin, qmax)`` and ``qx = clamp(rha(x * rx), qmin - zp, qmax - zp)``
   (the code minus its zero point: up to qmax - qmin in magnitude, what the transform's int32
   bounds are planned for);
2. input transform per n x n tile in int32: ``T = rshift(Bq d, s)``, ``V = T Bq^T``
   (real ``V = V_int sx 2^(s - 2k)``; s, the smallest shift after the first pass that keeps
   the second inside int32, is 0 for F(2,3) and F(4,3)). With V per tap (the default) ``Bq``
   is instead the exact integer Toom-Cook rows (:func:`exact_input_rows`, k = 0) and the
   learned S_B goes into V's per-tap scale: real ``V[a, b] = V_int[a, b] sx f_a f_b 2^s``
   (``Plan.v_factor``); F(2,3) and F(4,3) then fit int16 lanes;
3. V codes, one scale per (sample, tile, channel group) and per tap
   (``winograd_input_scales="tapwise"``, the default) or shared by the taps: ``amax = max |V_int|``, ``qv = clamp(rha(float(V_int) * (Q_v / amax)))``,
   real scale ``sv = (amax / Q_v) * sx * v_factor``; with zero points as in step 1 on the
   integers ``V_int``: ``den = float(hi - lo)``, ``rv = (qmax - qmin) / den``,
   ``zv = clamp(rha(qmin - float(lo) * rv))``, ``qv = clamp(rha(float(V_int) * rv), qmin - zv, qmax - zv)``,
   ``sv = (den / (qmax - qmin)) * sx * v_factor`` (``v_factor``: step 2's real factor of the tap);
4. per tap and channel group an int8 GEMM over the group's channels, int32 sums;
5. ``M = sum_j float(acc_j) * (sv_j * su_j)`` (float32, groups in order): the per-group
   (V x U) scales folded into the one requantization of M;
6. M codes per (sample, tile, output channel group), shared by the taps:
   ``qm = clamp(rha(M * (Q_m / amax_M)))``;
7. output transform in int32 like step 2 with ``Aq`` (in int64 with no shift when M is wider than
   8 bits, see :func:`wide_m`); ``y = float(Y_int) * s_out + bias``,
   ``s_out = (amax_M / Q_m) * 2^(s - 2k)``.

``rha`` is round half away from zero, computed exactly in float32 (and ``rshift`` its integer
counterpart). The transformed weights U are quantized once, in
float64, exactly as the layer's other paths do it (``compute_scale`` of the layer).
The differentiable emulation uses the same rounded matrices (:func:`rounded_transforms`,
through ``QuantWinogradConv2d.transforms`` when the layer's kernel is ``"cpu"``).
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch

from ..quantizers import compute_scale, quantize
from .conv import conv_padding, transform_2d

# chosen by measurement (benchmarks/kernels_cpu.py --accuracy, docs/results.md): at 10 bits the
# layers' SQNR is that of the float-transform emulation to <= 0.15 dB where no first-pass shift is
# needed; 8 bits lose up to 0.4 dB, 6 bits up to 10 dB
DEFAULT_TRANSFORM_BITS = 10
_INT32 = 2**31 - 1


def rha(t: torch.Tensor) -> torch.Tensor:
    """Round half away from zero, in t's float dtype, exactly: ``f = floor(|t|)`` plus one when
    ``|t| - f >= 0.5`` (that difference is exact), with t's sign. (``floor(|t| + 0.5)`` would
    round 0.49999997 up: the sum rounds to 1.0 in float32.)"""
    a = t.abs()
    f = torch.floor(a)
    return (f + (a - f >= 0.5).to(t.dtype)).copysign(t)


def rshift(t: torch.Tensor, k: int) -> torch.Tensor:
    """Integer ``t / 2^k`` rounded half away from zero (integer tensors)."""
    if k == 0:
        return t
    half = 1 << (k - 1)
    return torch.where(t >= 0, (t + half) >> k, -((half - t) >> k))


def fixed(mat: torch.Tensor, k: int) -> torch.Tensor:
    """``mat`` as k-bit fixed point: integers ``rha(mat 2^k)`` (int64)."""
    return rha(mat.double() * 2.0**k).long()


def int_transform_bound(mq: torch.Tensor, k: int, in_max: int) -> int:
    """Worst |value| of the two-pass integer transform of codes bounded by ``in_max``."""
    l1 = int(mq.abs().sum(1).max())
    first = l1 * in_max
    return l1 * ((first + (1 << k >> 1)) >> k if k else first)


def effective_bits(mat: torch.Tensor, bits: int, in_max: int = 128) -> int:
    """The largest k <= ``bits`` whose two-pass transform stays inside int32."""
    for k in range(bits, -1, -1):
        if int_transform_bound(fixed(mat, k), k, in_max) <= _INT32:
            return k
    raise ValueError("transform too large for int32 arithmetic even at 0 fractional bits")


def first_pass_shift(mat: torch.Tensor, k: int, in_max: int = 128) -> int:
    """The smallest right shift after the first pass that keeps the second inside int32
    (0 when it fits unshifted: rounding the first pass to whole codes costs ~4 dB)."""
    mq = fixed(mat, k)
    for s in range(0, k + 1):
        if int_transform_bound(mq, s, in_max) <= _INT32:
            return s
    raise ValueError("transform too large for int32 arithmetic")


def wide_m(layer) -> bool:
    """M codes wider than 8 bits (``winograd_output_format="int16"``, the default): the output
    transform then runs in int64 at the full ``bits`` with no first-pass shift (a 16-bit M times
    10-bit coefficients overflows int32 in the first pass of F(6,3))."""
    f = layer.formats.output
    return f is not None and not f.is_float and (f.qmax > 127 or f.qmin < -128)


def rounded_transforms(at: torch.Tensor, bt: torch.Tensor, bits: int,
                       wide_output: bool = False, exact_input: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(AT', BT') rounded to the fixed point the integer kernel uses (same dtype); ``wide_output``:
    the layer's M is wider than 8 bits (:func:`wide_m`); ``exact_input``: the kernel runs BT'
    exactly (:func:`exact_input_rows`), so it stays unrounded."""
    ka = bits if wide_output else effective_bits(at, bits)
    if exact_input:
        bt_q = bt
    else:
        kb = effective_bits(bt, bits)
        bt_q = fixed(bt, kb).to(bt.dtype) / 2.0**kb
    return fixed(at, ka).to(at.dtype) / 2.0**ka, bt_q


def exact_input_rows(layer) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(B_int, f)`` with ``BT' = diag(f) B_int`` and B_int the Toom-Cook rows as coprime integers
    (e.g. F(4,3): entries 0, +-1, +-2, +-4, +-5), when V is quantized per tap; else None.

    With one V scale per tap a positive factor per tap cancels in V's codes, so the kernel
    transforms with the exact integers (no fixed-point rounding of S_B BT) and folds
    ``f_a f_b`` into V's per-tap scale. A shared V scale (or free PAW transforms) cannot
    absorb per-tap factors: those keep the k-bit fixed-point BT', as do interpolation points
    whose integer rows would overflow int32 (e.g. 0, +-1/2, +-1/4, +-1/8: entries up to 4096)."""
    fin = layer.formats.input
    if layer.free_transforms is not None or not layer.granularity.v.keeps("tap") or fin is None or fin.is_float:
        return None  # (a float input stage never reaches the integer pipeline: the layer runs emulated)
    rows, factors = layer.tc.BT_integer_rows
    b_int = torch.tensor(rows, dtype=torch.int64)
    if int_transform_bound(b_int, 0, input_code_bound(layer)) > _INT32:
        return None
    s_b = layer.log_sb.detach().exp().double().cpu()  # exp in the parameter's dtype, as transforms() takes it
    f = torch.tensor(factors, dtype=torch.float64) * s_b
    return b_int, f


# ----------------------------------------------------------------------------- what runs where
def unsupported_reason(layer) -> str | None:
    """Why the fixed-point pipeline cannot run ``layer`` (None when it can)."""
    fm = layer.formats
    for name, f in (("input", fm.input), ("winograd_input", fm.winograd_input), ("weight", fm.weight),
                    ("output", fm.output)):
        widest = 2**15 if name == "output" else 2**7  # M: up to int16 (the output transform runs in int64)
        if f is None or f.is_float or not f.signed or f.qmin < -widest or f.qmax > widest - 1:
            need = "int2..int16" if name == "output" else "int2..int8"
            return f"the {name} stage is {getattr(f, 'name', 'float')}; the fixed-point kernel needs signed {need}"
    if layer.scale_mode != "shared":
        return "scale_mode 'tapwise' needs float rescaling inside the transforms"
    gr = layer.granularity
    if gr.input_mode == "block":
        return ("input scales per m x m pixel block (Recipe(activation_granularity='block')); the fixed-point "
                "kernel quantizes the input per tile ('fine', the default) or per sample ('sample')")
    if layer.m + layer.kernel_size - 1 > 8:
        return f"{layer.m + layer.kernel_size - 1}x{layer.m + layer.kernel_size - 1} tiles (the kernel holds at most 8x8)"
    if layer.padding_mode != "zeros":
        return f"padding_mode {layer.padding_mode!r} (only 'zeros')"
    if layer.act_ranges is not None:
        return "static activation ranges (the fixed-point kernel computes dynamic scales)"
    if not _groups_nest(layer.in_channels, layer.groups, layer.group_size):
        return (f"channel groups of {layer.group_size} over {layer.in_channels} inputs straddle the conv's "
                f"{layer.groups} groups (V sums each group in integers under one input scale)")
    return None


def _groups_nest(c: int, groups: int, group_size: int | None) -> bool:
    """Does every channel group of V (inside a conv group) lie inside one group of the input's
    per-(sample, channel group) scales (groups of ``group_size`` over all channels)?"""
    gs_in = c if group_size is None else min(group_size, c)
    cg = c // groups
    gs_v = cg if group_size is None else min(group_size, cg)
    ch = torch.arange(c)
    v_id = (ch // cg) * (cg + 1) + (ch % cg) // gs_v
    in_id = ch // gs_in
    lo = torch.full((int(v_id.max()) + 1,), c).scatter_reduce(0, v_id, in_id, "amin")
    hi = torch.full_like(lo, -1).scatter_reduce(0, v_id, in_id, "amax")
    return bool((lo[v_id] == hi[v_id]).all())


# ----------------------------------------------------------------------------- the plan (weights)
@dataclass
class Plan:
    """Everything that depends on the layer only: fixed-point transforms, U codes and scales."""

    key: tuple
    kb: int                 # fractional bits of Bq (0 for exact integer rows, see exact_input_rows)
    ka: int                 # fractional bits of Aq
    sb: int                 # right shift after the first pass of the input transform
    sa: int                 # the same for the output transform
    bq: torch.Tensor        # (n, n) int32
    aq: torch.Tensor        # (m, n) int32
    u: torch.Tensor         # (taps, K, Cg) int8 codes
    su: torch.Tensor        # (taps, K, J) float32 U scales (tap-shared ones expanded)
    gs: int                 # V channel-group length within a conv group
    nj: int                 # V channel groups per conv group
    gsm: int                # M channel-group length over K
    v_factor: torch.Tensor = None  # (taps,) float32: real V = V_int * sx * v_factor[tap] (2^(sb - 2kb), or f_a f_b 2^sb)
    input16: bool = False   # the input transform fits int16 lanes (exact integer rows, no first-pass shift)
    packed: object = None   # the compiled kernel's packing of u (winoq.kernels.cpu)


_PLANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _key(layer, bits) -> tuple:
    ft = layer.free_transforms
    tracked = [layer.weight, layer.log_sb, layer.log_sg] + ([] if ft is None else list(ft.parameters()))
    lu = layer.learned_u
    return (bits, tuple((t.data_ptr(), t._version) for t in tracked), None if lu is None else (lu.data_ptr(), lu._version),
            layer.group_size, layer.granularity.u, layer.granularity.input.zero_point, layer.granularity.v.keeps("tap"),
            layer.formats, layer.groups)


def _ratios(q: float, den: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q / den, den / q)`` per element, the multiplier 0 where ``den`` is 0: each one IEEE
    division (``q`` as a tensor: ``q / t`` with a Python ``q`` computes ``q * (1 / t)``)."""
    qt = torch.full_like(den, q)
    return torch.where(den > 0, qt / den, torch.zeros_like(den)), den / qt


def input_code_bound(layer) -> int:
    """The largest |input code| the integer input transform sees: 128 for symmetric int8 codes,
    qmax - qmin (255) for codes minus a zero point."""
    f = layer.formats.input
    if layer.granularity.input.zero_point:
        return f.qmax - f.qmin
    return max(f.qmax, -f.qmin)


def transform_bits(layer) -> int:
    return getattr(layer, "transform_bits", None) or DEFAULT_TRANSFORM_BITS


@torch.no_grad()
def plan(layer) -> Plan:
    """The layer's fixed-point transforms and weight codes, cached until its weights or scales change."""
    bits = transform_bits(layer)
    key = _key(layer, bits)
    hit = _PLANS.get(layer)
    if hit is not None and hit.key == key:
        return hit
    at, g, bt = layer.transforms(torch.float64, "cpu", fixed_point=False)
    in_max = input_code_bound(layer)
    n = bt.shape[0]
    exact = exact_input_rows(layer)
    if exact is None:  # k-bit fixed point BT'
        kb = effective_bits(bt, bits, in_max)
        sb = first_pass_shift(bt, kb, in_max)
        bq = fixed(bt, kb)
        v_factor = torch.full((n * n,), 2.0 ** (sb - 2 * kb), dtype=torch.float32)
    else:  # exact integer rows, their factors in V's per-tap scale
        bq, f = exact
        kb, sb = 0, first_pass_shift(bq.double(), 0, in_max)
        v_factor = (torch.outer(f, f) * 2.0**sb).reshape(-1).float()
    input16 = exact is not None and sb == 0 and int_transform_bound(bq, 0, in_max) <= 2**15 - 1
    if wide_m(layer):  # exact-integer output transform (int64 here, float64 lanes in the kernel): no shift
        ka, sa = bits, 0
        fm_out = layer.formats.output
        if int_transform_bound(fixed(at, ka), 0, max(fm_out.qmax, -fm_out.qmin)) > 2**53:
            raise ValueError(f"the output transform of {fm_out.name} M codes at {ka} fractional bits exceeds 2^53, "
                             "which the kernel's float64 lanes hold exactly; use fewer transform_bits")
    else:
        ka = effective_bits(at, bits)
        sa = first_pass_shift(at, ka)
    fm = layer.formats
    u = transform_2d(g, layer.weight.detach().double().cpu()) if layer.learned_u is None \
        else layer.learned_u.detach().double().cpu()
    su_full = compute_scale(u, fm.weight, layer._weight_gran())[0]
    codes = quantize(u, fm.weight, su_full).codes  # (K, Cg, n, n)
    k, cg, n, _ = codes.shape
    gs = cg if layer.group_size is None else min(layer.group_size, cg)
    nj = math.ceil(cg / gs)
    su = su_full.expand(k, cg, n, n)[:, ::gs][:, :nj]  # (K, J, n, n): each group's scale
    su = su.permute(2, 3, 0, 1).reshape(n * n, k, nj).float().contiguous()
    gsm = k if layer.group_size is None else min(layer.group_size, k)
    p = Plan(key, kb, ka, sb, sa, bq.int(), fixed(at, ka).int(),
             codes.permute(2, 3, 0, 1).reshape(n * n, k, cg).to(torch.int8).contiguous(), su, gs, nj, gsm,
             v_factor, input16)
    _PLANS[layer] = p
    return p


# ----------------------------------------------------------------------------- activations
def tile_grid(layer, h: int, w: int) -> tuple[tuple[int, int, int, int], tuple[int, int], int, int]:
    """(F.pad spec, output size, tile rows, tile columns) of an input of size h x w."""
    r, m = layer.kernel_size, layer.m
    pad = conv_padding(layer.padding, r)
    oh, ow = h + pad[2] + pad[3] - r + 1, w + pad[0] + pad[1] - r + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"input {(h, w)} after padding {pad} is smaller than the {r}x{r} kernel")
    return pad, (oh, ow), math.ceil(oh / m), math.ceil(ow / m)


def padded_tiles(layer, x: torch.Tensor, pad, th: int, tw: int) -> torch.Tensor:
    """The overlapping n x n input tiles, (N, th, tw, C, n, n) float32 (zero padding included)."""
    h, w = x.shape[2:]
    m, r = layer.m, layer.kernel_size
    n = m + r - 1
    xp = torch.nn.functional.pad(x.float(), (pad[0], pad[1] + tw * m + r - 1 - (w + pad[0] + pad[1]),
                                             pad[2], pad[3] + th * m + r - 1 - (h + pad[2] + pad[3])))
    return xp.unfold(2, n, m).unfold(3, n, m).permute(0, 2, 3, 1, 4, 5)


def input_group_size(layer, c: int) -> int:
    """Channels per input scale (groups over all ``c`` input channels)."""
    return c if layer.group_size is None else min(layer.group_size, c)


def input_scales(layer, x: torch.Tensor, th: int, tw: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input multipliers ``rx``, scales ``sx`` and zero points ``zp`` as (N, th, tw, C) float32
    tensors, from the layer's input granularity: one per sample, tile and channel group, over the
    tile's n x n pixels (``activation_granularity="fine"``, the default), or per sample and
    channel group over all pixels, expanded over the tiles ("sample"). Symmetric:
    ``rx = Q / amax``, ``sx = amax / Q``, ``zp = 0``; with zero points see step 1 above."""
    nb, c, h, w = x.shape
    fmt = layer.formats.input
    gs = input_group_size(layer, c)
    ng = math.ceil(c / gs)
    if layer.granularity.input_mode == "tile":
        pad = tile_grid(layer, h, w)[0]
        t = padded_tiles(layer, x.detach(), pad, th, tw)
        lo, hi = t.amin(dim=(-1, -2)), t.amax(dim=(-1, -2))  # (N, th, tw, C)
    else:
        xf = x.detach().float()
        lo, hi = xf.amin(dim=(2, 3))[:, None, None, :], xf.amax(dim=(2, 3))[:, None, None, :]  # (N, 1, 1, C)

    def per_group(a, reduce):
        lead = a.shape[:-1]
        a = torch.nn.functional.pad(a, (0, ng * gs - c)).reshape(*lead, ng, gs)
        return reduce(a).repeat_interleave(gs, -1)[..., :c]

    zero = torch.zeros((), dtype=torch.float32)
    if layer.granularity.input.zero_point:
        lo = per_group(torch.minimum(lo, zero), lambda a: a.amin(-1))
        hi = per_group(torch.maximum(hi, zero), lambda a: a.amax(-1))
        rx, sx = _ratios(float(fmt.qmax - fmt.qmin), hi - lo)
        zp = rha(float(fmt.qmin) - lo * rx).clamp_(fmt.qmin, fmt.qmax)
    else:
        a = per_group(torch.maximum(lo.abs(), hi.abs()), lambda t: t.amax(-1))
        rx, sx = _ratios(float(fmt.max_value), a)
        zp = torch.zeros_like(a)
    return tuple(t.expand(nb, th, tw, c) for t in (rx, sx, zp))


def check_scale_nesting(layer, sx: torch.Tensor, p: Plan, zp: torch.Tensor | None = None) -> None:
    """V sums channels in integers, so the input scale (and zero point) must be one value across
    each V group."""
    nb, th, tw, c = sx.shape
    cg = c // layer.groups
    for t in (sx,) if zp is None else (sx, zp):
        s = t.reshape(nb, th, tw, layer.groups, cg)
        if not torch.equal(s[..., :: p.gs].repeat_interleave(p.gs, -1)[..., :cg], s):
            raise ValueError("the input scales vary inside a channel group of V; the fixed-point kernel needs the "
                             "input's channel groups to contain V's (group_size dividing C / groups)")


# ----------------------------------------------------------------------------- the PyTorch twin
def _int_transform(q: torch.Tensor, mq: torch.Tensor, k: int) -> torch.Tensor:
    """(..., n, n) int64 tiles -> (..., o, o): rshift(mq q, k) mq^T."""
    t = rshift(torch.einsum("ai,...ij->...aj", mq.long(), q), k)
    return torch.einsum("...aj,bj->...ab", t, mq.long())


@torch.no_grad()
def reference_forward(layer, x: torch.Tensor, rx: torch.Tensor | None = None,
                      sx: torch.Tensor | None = None, return_codes: bool = False, zp: torch.Tensor | None = None):
    """The fixed-point pipeline in PyTorch integer / float32 tensor ops (bit for bit what the
    compiled kernel returns). ``rx``, ``sx``, ``zp``: (N, th, tw, C) input multipliers, scales and
    zero points (default: :func:`input_scales`; a given ``rx`` without ``zp``: no zero points)."""
    why = unsupported_reason(layer)
    if why is not None:
        raise ValueError(f"fixed-point kernel: {why}")
    layer.check_input(x)
    fm = layer.formats
    p = plan(layer)
    nb, c, h, w = x.shape
    m, r = layer.m, layer.kernel_size
    n = m + r - 1
    pad, out_hw, th, tw = tile_grid(layer, h, w)
    if rx is None:
        rx, sx, zp = input_scales(layer, x, th, tw)
    elif zp is None:
        zp = torch.zeros_like(rx)
    check_scale_nesting(layer, sx, p, zp)
    G = layer.groups
    cg, K = c // G, layer.out_channels
    kg = K // G
    # 1. input codes, tile by tile (N, th, tw, C, n, n)
    tiles = padded_tiles(layer, x, pad, th, tw)
    qmin_i, qmax_i = fm.input.qmin, fm.input.qmax
    zpc = zp.float()[..., None, None]
    qx = torch.minimum(torch.maximum(rha(tiles * rx.float()[..., None, None]), qmin_i - zpc), qmax_i - zpc).long()
    # 2. input transform
    v = _int_transform(qx, p.bq, p.sb)  # (N, th, tw, C, n, n) int64
    assert int(v.abs().max()) <= _INT32
    # 3. V codes per (sample, tile, V group)
    vg = v.reshape(nb, th, tw, G, cg, n * n)
    vg = torch.nn.functional.pad(vg, (0, 0, 0, p.nj * p.gs - cg)).reshape(nb, th, tw, G, p.nj, p.gs, n * n)
    vf = fm.winograd_input
    per_tap = layer.granularity.v.keeps("tap")
    sxg = sx.float().reshape(nb, th, tw, G, cg)[..., :: p.gs][..., : p.nj, None]
    if layer.granularity.v.zero_point:  # [lo, hi] (holding 0) over qmax - qmin steps, integer zero point
        lo, hi = vg.amin(dim=-2).clamp_max(0), vg.amax(dim=-2).clamp_min(0)  # (N, th, tw, G, J, taps) int64
        if not per_tap:
            lo, hi = lo.amin(-1, keepdim=True).expand_as(lo), hi.amax(-1, keepdim=True).expand_as(hi)
        rv, sv0 = _ratios(float(vf.qmax - vf.qmin), (hi - lo).float())
        zv = rha(float(vf.qmin) - lo.float() * rv).clamp_(vf.qmin, vf.qmax)[..., None, :]
        low, high = vf.qmin - zv, vf.qmax - zv
    else:
        den = vg.abs().amax(dim=-2).float()  # (N, th, tw, G, J, taps)
        if not per_tap:  # one V scale shared by the taps
            den = den.amax(-1, keepdim=True).expand_as(den)
        rv, sv0 = _ratios(float(vf.max_value), den)
        low, high = torch.tensor(float(vf.qmin)), torch.tensor(float(vf.qmax))
    sv = sv0 * sxg * p.v_factor  # (the dynamic scales are plain min-max: no clipping)
    qv = torch.minimum(torch.maximum(rha(vg.float() * rv[..., None, :]), low), high).long()  # (N,th,tw,G,J,gs,taps)
    # 4-5. per tap and group int GEMM, scaled sum over groups
    uq = p.u.long().reshape(n * n, G, kg, cg)
    uq = torch.nn.functional.pad(uq, (0, p.nj * p.gs - cg)).reshape(n * n, G, kg, p.nj, p.gs)
    su = p.su.reshape(n * n, G, kg, p.nj)
    mf = torch.zeros(nb, th, tw, n * n, G, kg, dtype=torch.float32)
    accs = []
    for j in range(p.nj):
        acc = torch.einsum("nyxgct,tgkc->nyxtgk", qv[..., j, :, :], uq[..., j, :])
        assert int(acc.abs().max()) <= _INT32
        accs.append(acc)
        f = sv[..., j, :].transpose(-1, -2)[..., None] * su[None, None, None, :, :, :, j]  # (N,th,tw,taps,G,kg)
        mf = mf + acc.float() * f
    mf = mf.reshape(nb, th, tw, n * n, K)
    # 6. M codes per (sample, tile, output channel group)
    mfmt = fm.output
    ngm = math.ceil(K / p.gsm)
    mg = torch.nn.functional.pad(mf.abs(), (0, ngm * p.gsm - K)).reshape(nb, th, tw, n * n, ngm, p.gsm)
    amax_m = mg.amax(dim=(3, 5)).repeat_interleave(p.gsm, -1)[..., :K]  # (N, th, tw, K)
    rm, so = _ratios(float(mfmt.max_value), amax_m.float())
    so = so * 2.0 ** (p.sa - 2 * p.ka)
    qm = rha(mf * rm[:, :, :, None, :]).clamp_(mfmt.qmin, mfmt.qmax).long()
    # 7. output transform, scale, bias
    qm = qm.reshape(nb, th, tw, n, n, K).permute(0, 1, 2, 5, 3, 4)  # (N, th, tw, K, n, n)
    yi = _int_transform(qm, p.aq, p.sa)  # (N, th, tw, K, m, m) int64 (the kernel: int32, or int64 for a wide M)
    assert int(yi.abs().max()) <= (2**53 if wide_m(layer) else _INT32)
    y = yi.float() * so[..., None, None]
    if layer.bias is not None:
        y = y + layer.bias.detach().float().view(1, 1, 1, K, 1, 1)
    y = y.permute(0, 3, 1, 4, 2, 5).reshape(nb, K, th * m, tw * m)[:, :, : out_hw[0], : out_hw[1]]
    if return_codes:
        return y, {"qx": qx, "v": v, "qv": qv, "acc": accs, "m": mf, "qm": qm}
    return y
