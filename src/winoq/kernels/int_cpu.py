"""Integer CPU path of :class:`~winoq.winograd.quantized.QuantWinogradConv2d`.

Computes what :meth:`QuantWinogradConv2d.forward_integer` computes, the way an
integer kernel does, in the taps-first layout ``(n*n, C, P)``, ``P = N*th*tw``:

1. input ``x`` -> integer codes: with per-tile input scales (the default, see
   :mod:`winoq.granularity`) each overlapping tile is cut out and gets its own scale per
   channel group; with per-sample scales one ``s_x`` per (sample, channel group) is used and
   the codes are written straight into the zero-padded buffer;
2. input transform in integers: ``BT`` (without the learned diagonal scales) times
   its common denominator ``den`` is an integer matrix (den = 1 for F(2,3) and
   F(4,3), 4 for F(6,3)), so ``V_int = (den BT) d (den BT)^T`` is an integer
   transform of integer codes. It runs as a stride-m convolution with the n*n taps
   as output channels (no tile copy), in float32, which is exact here: every partial
   sum is an integer below ``row_l1(den BT)^2 * 128 < 2^24`` (checked; float64 past
   that). PyTorch has no CPU int32 convolution, and ``_int_mm`` on gathered tiles
   measured slower than this;
3. requantization of V to int8 codes, one scale per (sample, tile, channel group),
   shared by the taps. The real V is ``V_int * s_x / den^2 * s_b[a] s_b[b]``: without
   learned diagonal scales (and with the input's channel groups nesting in V's),
   ``max |V|`` is taken on ``V_int`` itself and the code is ``V_int / (max|V_int| /
   qmax)``; otherwise V_int is first multiplied by its per (tap, channel,
   sample) factor (one pass) and the maximum taken on the real V;
4. per tap and channel group an int8 x int8 -> int32 GEMM (``torch._int_mm``, which
   runs on CPU with VNNI), or the same integer GEMM done exactly in float32
   (``gemm="float"``, the default: a group sum is at most ``group * 127^2 < 2^24``,
   and one batched float32 matmul measured as fast as, or faster than, the many
   small ``_int_mm`` calls);
5. each group's int32 sums times (V scale x U scale), summed over the groups;
6. requantization of M (the layer's output stage); the output transform ``AT' Mq A'``
   runs on the codes (``AT'`` carries the diagonal scales, so it is a float GEMM) and
   the M scale and the bias are applied to the m*m outputs while stitching them.

V is computed in floating point from the (fake-)quantized input instead when step 2
cannot be integral: a float or absent input format, free (PAW) transforms
without a small common denominator, or per-block input scales (a tile straddles
blocks). Steps 3-6 are the same.

Agreement with ``forward_integer`` (float64 throughout): identical integer codes
except where a value lies on (or, with ``dtype=float32``, within float32 rounding
of) a rounding tie, which ``forward_integer`` breaks with its own float64 noise;
with ``dtype=float64`` and integer-valued inputs the outputs agree to ~1e-15.
See ``tests/test_kernels.py`` for the tolerances.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field

import torch

from ..granularity import WINO_M, WINO_TILES
from ..quantizers import compute_scale, fake_quantize_dynamic, quantize
from ..winograd.conv import conv_padding, tiles_taps_first, transform_2d
from . import SYMMETRIC_ONLY

_MIN_SCALE = 1e-30  # quantizers' floor on scales
_F32_EXACT = 1 << 24  # integers below this are exact in float32, and so are their sums
_DEN_LIMIT = 1 << 12


# ----------------------------------------------------------------------------- checks
def unsupported_reason(layer) -> str | None:
    """Why ``layer`` cannot run on the integer path, or None when it can."""
    from ..winograd.quantized import QuantWinogradConv2d

    if not isinstance(layer, QuantWinogradConv2d):
        return f"{type(layer).__name__} is not a QuantWinogradConv2d"
    fm = layer.formats
    for name, f in (("winograd_input", fm.winograd_input), ("weight", fm.weight)):
        if f is None or f.is_float:
            return (f"the {name} stage is {getattr(f, 'name', 'float')}; the integer path needs integer "
                    "formats for V and U (use kernel='emulated')")
    if layer.granularity.input.zero_point:
        return SYMMETRIC_ONLY
    return None


def _int8_codes(fmt) -> bool:
    return fmt is not None and not fmt.is_float and fmt.qmin >= -128 and fmt.qmax <= 127


def _common_denominator(mat: torch.Tensor) -> int | None:
    """Smallest d <= 4096 with d * mat integral, or None."""
    for d in range(1, _DEN_LIMIT + 1):
        scaled = mat * d
        if torch.equal(scaled, scaled.round()):
            return d
    return None


def _needs_clamp(fmt) -> bool:
    """Symmetric scales map max |t| to qmax: only a range shorter on the negative side than
    qmax can leave codes outside [qmin, qmax]."""
    return fmt.qmin > -fmt.max_value


def _group_bounds(size: int, group: int | None) -> tuple[int, int]:
    """(group length, number of groups) of an axis of ``size`` cut into ``group``s."""
    gs = size if group is None else min(group, size)
    return gs, math.ceil(size / gs)


# ----------------------------------------------------------------------------- prepared weights
@dataclass
class Prepared:
    """Everything that depends on the layer only (weights, transforms), cached."""

    key: tuple
    dtype: torch.dtype
    groups: int
    cg: int            # input channels per conv group
    kg: int            # output channels per conv group
    gs: int            # channel-group length of V / U within a conv group
    nj: int            # channel groups per conv group
    u8: list | None    # [gi][j] -> (taps, kg, len_j) int8 codes
    uf: list           # [gi][j] -> (taps, kg, len_j) codes in `dtype` (exact)
    su: torch.Tensor   # (G, J, taps|1, kg, 1) weight scales
    bt_int: torch.Tensor | None  # kron(den BT, den BT) (taps, taps) in the GEMM dtype, when integral
    bt_dtype: torch.dtype | None
    den: int
    tap_w: torch.Tensor | None   # (taps,) kron(s_b, s_b) when the diagonal scales are not all 1
    bt_float: torch.Tensor       # kron(BT', BT') in `dtype`
    at_float: torch.Tensor       # kron(AT', AT') in `dtype`
    aligned: dict = field(default_factory=dict)  # (C, input group) -> do V's channel groups nest in the input's?


_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _layer_key(layer, dtype, device) -> tuple:
    ft = layer.free_transforms
    ftk = None if ft is None else tuple((k, p._version, p.data_ptr()) for k, p in ft.items())
    return (dtype, str(device), layer.weight._version, layer.weight.data_ptr(), layer.log_sb._version,
            layer.log_sg._version, layer.log_sb.data_ptr(), layer.log_sg.data_ptr(), ftk, layer.formats, layer.groups,
            layer.granularity.u, id(layer.learned_u))


def prepare(layer, dtype: torch.dtype = torch.float32) -> Prepared:
    """Weight codes and scales (exactly those of ``forward_integer``) and the
    integer transforms; cached per layer until its weights or scales change."""
    device = layer.weight.device
    key = _layer_key(layer, dtype, device)
    hit = _CACHE.get(layer)
    if hit is not None and hit.key == key:
        return hit
    fm = layer.formats
    with torch.no_grad():
        at, g, bt = layer.transforms(torch.float64, device)
        # U as the layer computes with it: learned rounding / a loaded checkpoint give it directly
        u = transform_2d(g, layer.weight.double()) if layer.learned_u is None else layer.learned_u.double()
        su_full = compute_scale(u, fm.weight, layer._weight_gran())[0]
        qu = quantize(u, fm.weight, su_full)
    codes = qu.codes  # int32 (K, cg, n, n)
    k, cg, n, _ = codes.shape
    taps = n * n
    groups = layer.groups
    kg = k // groups
    gs, nj = _group_bounds(cg, layer.group_size)
    tapwise_u = su_full.shape[-1] != 1 or su_full.shape[-2] != 1  # (K, cg, 1, 1) when shared by the taps
    u8, uf, su = ([] if _int8_codes(fm.weight) else None), [], []
    for gi in range(groups):
        ks = slice(gi * kg, (gi + 1) * kg)
        row8, rowf, rows = [], [], []
        for j in range(nj):
            cs = slice(j * gs, min((j + 1) * gs, cg))
            blk = codes[ks, cs].reshape(kg, -1, taps).permute(2, 0, 1).contiguous()  # (taps, kg, len)
            rowf.append(blk.to(dtype))
            if u8 is not None:
                row8.append(blk.to(torch.int8))
            s = su_full[ks, cs.start]  # (kg, n|1, n|1): the group's scale (first channel)
            s = s.reshape(kg, -1).t() if tapwise_u else s.reshape(1, kg)  # (taps|1, kg)
            rows.append(s)
        uf.append(rowf)
        if u8 is not None:
            u8.append(row8)
        su.append(torch.stack(rows))  # (J, taps|1, kg)
    su_t = torch.stack(su).unsqueeze(-1).to(dtype)  # (G, J, taps|1, kg, 1)

    # input transform: integral form of the *unscaled* BT, diagonal scales applied to V afterwards
    base_bt = layer.free_transforms["BT"].detach().double() if layer.free_transforms is not None \
        else layer.tc.BT.to(device)
    s_b = layer.log_sb.detach().exp().double().to(device)
    den = _common_denominator(base_bt) if fm.input is not None and not fm.input.is_float else None
    bt_int, bt_dtype = None, None
    if den is not None:
        bti = base_bt * den
        worst = float(bti.abs().sum(1).max()) ** 2 * max(abs(fm.input.qmin), fm.input.qmax)
        bt_dtype = dtype if (dtype == torch.float64 or worst < _F32_EXACT) else torch.float64
        if worst < 2**52:
            bt_int = torch.kron(bti, bti).to(bt_dtype)
    tap_w = None if bool((s_b == 1).all()) else torch.kron(s_b, s_b).to(dtype)
    prep = Prepared(key, dtype, groups, cg, kg, gs, nj, u8, uf, su_t, bt_int, bt_dtype, den or 1, tap_w,
                    torch.kron(bt, bt).to(dtype), torch.kron(at, at).to(dtype))
    _CACHE[layer] = prep
    return prep


# ----------------------------------------------------------------------------- helpers
def _group_amax(a: torch.Tensor, groups: int, cg: int, gs: int, tapwise: bool) -> torch.Tensor:
    """a: (taps, groups*cg, P) -> max |a| per (taps|1, groups, J, P), channel groups of
    ``gs`` within each conv group (the last one shorter when gs does not divide cg)."""
    taps, _, p = a.shape
    a = a.reshape(taps, groups, cg, p)
    full, rem = divmod(cg, gs)

    def red(t, dim):  # max |t| without a full-size temporary
        return torch.maximum(t.amax(dim=dim), t.amin(dim=dim).neg())

    parts = []
    if full:
        parts.append(red(a[:, :, : full * gs].reshape(taps, groups, full, gs, p), 3))
    if rem:
        parts.append(red(a[:, :, full * gs:], 2).unsqueeze(2))
    r = parts[0] if len(parts) == 1 else torch.cat(parts, 2)  # (taps, G, J, P)
    return r if tapwise else r.amax(0, keepdim=True)


def _per_channel(s: torch.Tensor, cg: int, gs: int) -> torch.Tensor:
    """(T, G, J, P) per-group values -> (T, G*cg, P) per channel."""
    t, g, _, p = s.shape
    return s.repeat_interleave(gs, dim=2)[:, :, :cg].reshape(t, g * cg, p)


def _padding(layer, h: int, w: int) -> tuple[tuple[int, int, int, int], tuple[int, int], tuple[int, int]]:
    """F.pad spec of the layer, the output size, and the extra zeros (right, bottom) that
    complete the last tile row/column (what ``extract_tiles`` adds)."""
    r, m = layer.kernel_size, layer.m
    pad = conv_padding(layer.padding, r)
    hp, wp = h + pad[2] + pad[3], w + pad[0] + pad[1]
    oh, ow = hp - r + 1, wp - r + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"input {(hp, wp)} after padding is smaller than the {r}x{r} kernel")
    th, tw = math.ceil(oh / m), math.ceil(ow / m)
    return pad, (oh, ow), (tw * m + r - 1 - wp, th * m + r - 1 - hp)


def _input_codes(layer, x: torch.Tensor, dtype, pad, extra):
    """Codes of the input stage (a float tensor holding integers), already padded
    (layer padding, then zeros completing the last tiles), and the per (N, C) scale."""
    fmt = layer.formats.input
    nb, c, h, w = x.shape
    flat = x.reshape(nb, c, -1)
    amax_c = torch.maximum(flat.amax(-1), flat.amin(-1).neg()).to(dtype)  # (N, C); aminmax is slower
    gs_in, nin = _group_bounds(c, layer.group_size)
    padded = torch.nn.functional.pad(amax_c, (0, nin * gs_in - c))
    amax_g = padded.reshape(nb, nin, gs_in).amax(-1)  # (N, groups)
    # same expression as fake_quantize_dynamic (clip 1): amax * (1 / qmax)
    s_g = (amax_g * (1.0 / fmt.max_value)).clamp_min(_MIN_SCALE)
    s_c = s_g.repeat_interleave(gs_in, dim=1)[:, :c]  # (N, C)
    s4 = s_c[:, :, None, None]
    if layer.padding_mode == "zeros":  # quantize straight into the zero-padded buffer
        l, _, t, _ = pad
        buf = torch.zeros(nb, c, h + pad[2] + pad[3] + extra[1], w + pad[0] + pad[1] + extra[0], dtype=dtype)
        torch.div(x.to(dtype), s4, out=buf[:, :, t:t + h, l:l + w])
    else:
        buf = _pad_extra(layer.pad_input(x.to(dtype) / s4), extra)
    buf.round_()
    if fmt.qmin > -fmt.max_value:  # |x / s| <= qmax by construction; clamp only for a short negative side
        buf.clamp_(fmt.qmin, fmt.qmax)
    return buf, s_c, gs_in


def _pad_extra(xp: torch.Tensor, extra) -> torch.Tensor:
    return torch.nn.functional.pad(xp, (0, extra[0], 0, extra[1])) if any(extra) else xp


def _stitch(y, m, k, nb, th, tw, out_hw, scale, bias):
    """(m*m, K*N*th*tw) output tiles -> (N, K, H_out, W_out), times ``scale`` (1, K, P)
    and plus ``bias`` on the way (one pass)."""
    yp = y.reshape(m, m, k, nb, th, tw).permute(3, 2, 4, 0, 5, 1)  # (N, K, th, m, tw, m)
    out = torch.empty(nb, k, th * m, tw * m, dtype=y.dtype)
    ov = out.view(nb, k, th, m, tw, m)
    if scale is not None:
        sp = scale.reshape(k, nb, th, tw).permute(1, 0, 2, 3)[:, :, :, None, :, None]
        if bias is not None:
            torch.addcmul(bias.view(1, k, 1, 1, 1, 1), yp, sp, out=ov)
        else:
            torch.mul(yp, sp, out=ov)
    elif bias is not None:
        torch.add(yp, bias.view(1, k, 1, 1, 1, 1), out=ov)
    else:
        ov.copy_(yp)
    return out[:, :, : out_hw[0], : out_hw[1]]


def _input_transform(xpe: torch.Tensor, kron: torch.Tensor, m: int, r: int, out_hw) -> torch.Tensor:
    """V = kron(B, B) applied to every n x n tile (stride m) of the padded input:
    (N, C, H, W) -> (taps, C, N*th*tw). float32: as a strided conv with the taps as
    output channels (no tile copy); otherwise tiles + GEMM."""
    nb, c = xpe.shape[:2]
    taps = kron.shape[0]
    n = math.isqrt(taps)
    if xpe.dtype == torch.float32:
        w = kron.reshape(taps, 1, n, n)
        v = torch.nn.functional.conv2d(xpe.reshape(nb * c, 1, *xpe.shape[2:]), w, stride=m)
        t = v.shape[-2] * v.shape[-1]
        return v.reshape(nb, c, taps, t).permute(2, 1, 0, 3).reshape(taps, c, nb * t)
    tiles = tiles_taps_first(xpe, m, r, out_hw)
    return torch.matmul(kron, tiles.reshape(taps, -1)).reshape(taps, c, -1)


def _v_groups_align(layer, c: int, gs_in: int, prep: Prepared) -> bool:
    """True when every channel group of V lies inside one channel group of the input stage."""
    ch = torch.arange(c)
    in_gid = ch // gs_in
    v_gid = (ch // prep.cg) * prep.nj + (ch % prep.cg) // prep.gs
    first = torch.full((int(v_gid.max()) + 1,), -1, dtype=torch.long)
    first.scatter_reduce_(0, v_gid, in_gid, "amin", include_self=False)
    last = torch.full_like(first, -1).scatter_reduce_(0, v_gid, in_gid, "amax", include_self=False)
    return bool((first == last).all())


def _tile_transform(layer, x: torch.Tensor, prep: Prepared, pad, extra, out_hw, dtype) -> torch.Tensor:
    """Per-tile input scales: cut the overlapping tiles (taps, C, N, th, tw), take one scale
    per (tile, channel group within a conv group) (same expression as fake_quantize_dynamic),
    integer codes, the integer transform ``kron(den B^T, den B^T)``, then the real V:
    ``V_int * s_tile / den^2`` times the diagonal scales -> (taps, C, P)."""
    fmt = layer.formats.input
    m, r = layer.m, layer.kernel_size
    xp = _pad_extra(layer.pad_input(x.to(prep.bt_dtype)), extra)
    tiles = tiles_taps_first(xp, m, r, out_hw)  # (taps, C, N, th, tw)
    taps, c = tiles.shape[:2]
    g = layer.groups
    gs_in, nin = _group_bounds(c // g, layer.group_size)
    amax = _group_amax(tiles.reshape(taps, c, -1), g, c // g, gs_in, False)  # (1, G, J, P)
    s_t = _per_channel((amax * (1.0 / fmt.max_value)).clamp_min_(_MIN_SCALE), c // g, gs_in)  # (1, C, P)
    q = tiles.reshape(taps, c, -1).div(s_t).round_()
    if _needs_clamp(fmt):
        q.clamp_(fmt.qmin, fmt.qmax)
    v = torch.matmul(prep.bt_int, q.reshape(taps, -1)).reshape(taps, c, -1).to(dtype)  # exact integers
    f = s_t.to(dtype) / prep.den**2
    if prep.tap_w is not None:
        f = f * prep.tap_w.view(taps, 1, 1)
    return v.mul_(f)


# ----------------------------------------------------------------------------- forward
@torch.no_grad()
def forward(layer, x: torch.Tensor, *, gemm: str = "auto", dtype: torch.dtype = torch.float32,
            return_codes: bool = False):
    """Integer-arithmetic forward of a QuantWinogradConv2d (CPU).

    ``gemm``: ``"int_mm"`` (int8 x int8 -> int32 ``torch._int_mm``, one call per tap and
    channel group), ``"float"`` (the same integer GEMM done exactly in ``dtype``, one
    batched matmul per channel group), ``"auto"`` (``"float"`` while its sums are exact,
    else int_mm: on one CPU thread the batched float32 GEMM measured as fast or faster). ``dtype``: floating type of the scales and the non-integer stages
    (float64 reproduces ``forward_integer`` to ~1e-15). Returns y in ``dtype``
    (and, with ``return_codes``, a dict of the integer intermediates)."""
    why = unsupported_reason(layer)
    if why is not None:
        raise ValueError(f"int-cpu kernel: {why}")
    if x.device.type != "cpu":
        raise ValueError(f"int-cpu kernel runs on CPU tensors, got {x.device}; use kernel='triton' or 'emulated'")
    if gemm not in ("auto", "int_mm", "float"):
        raise ValueError(f"gemm {gemm!r} unknown; use 'auto', 'int_mm' or 'float'")
    layer.check_input(x)
    fm = layer.formats
    prep = prepare(layer, dtype)
    int8_ok = prep.u8 is not None and _int8_codes(fm.winograd_input)
    gs_f = prep.gs * fm.winograd_input.max_value * fm.weight.max_value
    if gemm == "auto":  # measured (benchmarks/kernels_cpu.py): the exact float32 GEMM is never slower
        gemm = "float" if (dtype == torch.float64 or gs_f < _F32_EXACT or not int8_ok) else "int_mm"
    if gemm == "int_mm" and not int8_ok:
        raise ValueError("gemm='int_mm' needs V and U formats whose codes fit int8")
    if gemm == "float" and dtype == torch.float32 and gs_f >= _F32_EXACT:
        dtype_gemm = torch.float64  # group sums would not be exact in float32
    else:
        dtype_gemm = dtype
    tap_v, tap_m = layer.granularity.v.keeps("tap"), layer.granularity.m.keeps("tap")
    G, cg, gs, nj, kg = prep.groups, prep.cg, prep.gs, prep.nj, prep.kg
    nb, c = x.shape[:2]
    r, m = layer.kernel_size, layer.m
    taps = (m + r - 1) ** 2
    vfmt = fm.winograd_input
    mode = layer.granularity.input_mode

    # ---- 1-2: input codes and transform
    integral = prep.bt_int is not None and mode != "block"
    pad, out_hw, extra = _padding(layer, *x.shape[2:])
    th, tw = math.ceil(out_hw[0] / m), math.ceil(out_hw[1] / m)
    p = nb * th * tw
    if integral and mode == "tile":
        uniform = False
        v = _tile_transform(layer, x, prep, pad, extra, out_hw, dtype)
    elif integral:
        q, s_c, gs_in = _input_codes(layer, x, prep.bt_dtype, pad, extra)
        s_c = s_c.to(dtype)  # codes may be float64 (wide transforms), scales follow `dtype`
        if prep.tap_w is not None:
            uniform = False
        else:
            if (c, gs_in) not in prep.aligned:
                prep.aligned[(c, gs_in)] = _v_groups_align(layer, c, gs_in, prep)
            uniform = prep.aligned[(c, gs_in)]
        v = _input_transform(q, prep.bt_int, m, r, out_hw).to(dtype)  # exact integers
        del q
        if not uniform:  # real V = V_int * s_x / den^2 * (s_b x s_b): one multiplier per (tap, channel, sample)
            f = (s_c / prep.den**2).t().reshape(1, c, nb, 1)
            if prep.tap_w is not None:
                f = f * prep.tap_w.view(taps, 1, 1, 1)
            v = v.reshape(taps, c, nb, th * tw).mul_(f).reshape(taps, c, p)
    else:
        uniform = False
        xp = _pad_extra(layer.quantize_padded_input(layer.pad_input(layer.quantize_input(x.to(dtype)))), extra)
        if mode == "tile" and fm.input is not None:
            tiles = layer.quantize_tiles(tiles_taps_first(xp, m, r, out_hw), WINO_TILES)  # (taps, C, N, th, tw)
            v = torch.matmul(prep.bt_float, tiles.reshape(taps, -1)).reshape(taps, c, p)
        else:
            v = _input_transform(xp, prep.bt_float, m, r, out_hw)

    # ---- 3: requantize V (scale from max |V| per (sample, tile, channel group))
    amax = _group_amax(v, G, cg, gs, tap_v)  # (taps|1, G, J, P)
    sv_code = (amax / vfmt.max_value).clamp_min_(_MIN_SCALE)  # in units of v
    v.div_(_per_channel(sv_code, cg, gs))
    v.round_()  # integer codes; |v / sv| <= qmax, so clamping is only needed for a short negative side
    if _needs_clamp(vfmt):
        v.clamp_(vfmt.qmin, vfmt.qmax)
    if uniform:  # scale of the real V: times s_x / den^2 of the group
        s_grp = s_c.reshape(nb, G, cg)[:, :, :: gs][:, :, :nj]  # (N, G, J): any channel of the group
        sv = sv_code.reshape(-1, G, nj, nb, th * tw) * (s_grp.permute(1, 2, 0) / prep.den**2)[None, :, :, :, None]
        sv = sv.reshape(-1, G, nj, p)
    else:
        sv = sv_code
    codes = {"v": v} if return_codes else None

    # ---- 4-5: integer GEMM per tap and channel group, scaled and summed over groups
    if gemm == "int_mm":
        v8 = v.to(torch.int8)
        acc = torch.empty(G, nj, taps, kg, p, dtype=torch.int32)
        for gi in range(G):
            for j in range(nj):
                c0 = gi * cg + j * gs
                c1 = gi * cg + min((j + 1) * gs, cg)
                uj = prep.u8[gi][j]
                for t in range(taps):
                    torch._int_mm(uj[t], v8[t, c0:c1], out=acc[gi, j, t])
        del v8
    else:
        vg = v if dtype_gemm == dtype else v.to(dtype_gemm)
        acc = torch.empty(G, nj, taps, kg, p, dtype=dtype_gemm)
        for gi in range(G):
            for j in range(nj):
                c0 = gi * cg + j * gs
                c1 = gi * cg + min((j + 1) * gs, cg)
                torch.matmul(prep.uf[gi][j].to(dtype_gemm), vg[:, c0:c1], out=acc[gi, j])
    if return_codes:
        codes["acc"] = acc
    del v
    svt = sv.reshape(sv.shape[0], G, nj, p).permute(1, 2, 0, 3).unsqueeze(3)  # (G, J, taps|1, 1, P)
    mprod = None
    for j in range(nj):  # same order as forward_integer: (acc * sv) * su, summed group by group
        term = torch.mul(acc[:, j], svt[:, j]).mul_(prep.su[:, j])  # (G, taps, kg, P); int32 * float -> float
        mprod = term if mprod is None else mprod.add_(term)
    del acc
    k = G * kg
    mprod = mprod.reshape(taps, k, p) if G == 1 else mprod.permute(1, 0, 2, 3).reshape(taps, k, p)

    # ---- 6: requantize M, output transform, bias
    post_scale = None  # (1, K, P) scale applied after the output transform (shared M scales)
    if fm.output is not None:
        if fm.output.is_float:
            mprod = fake_quantize_dynamic(mprod.reshape(taps, k, nb, th, tw), fm.output,
                                          layer.granularity.m.granularity(WINO_M)).reshape(taps, k, p)
        else:
            ofmt = fm.output
            gs_m, _ = _group_bounds(k, layer.group_size)
            amax_m = _group_amax(mprod, 1, k, gs_m, tap_m)  # (taps|1, 1, Jm, P)
            # same expression as fake_quantize_dynamic: amax * (1 / qmax)
            sm = (amax_m * (1.0 / ofmt.max_value)).clamp_min_(_MIN_SCALE)
            sm_c = _per_channel(sm, k, gs_m)
            mq = mprod.div_(sm_c).round_()
            if _needs_clamp(ofmt):
                mq.clamp_(ofmt.qmin, ofmt.qmax)
            if return_codes:
                codes["m"] = mq.clone()
            if tap_m:
                mprod = mq.mul_(sm_c)
            else:  # the taps share the scale: transform the codes, scale the (fewer) outputs
                mprod, post_scale = mq, sm_c
    y = torch.matmul(prep.at_float, mprod.reshape(taps, -1))  # (m*m, K*P)
    bias = None if layer.bias is None else layer.bias.detach().to(dtype)
    y = _stitch(y, m, k, nb, th, tw, out_hw, post_scale, bias)
    return (y, codes) if return_codes else y
