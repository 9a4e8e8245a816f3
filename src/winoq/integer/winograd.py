"""Integer Winograd F(m x m, 3 x 3) convs inside the integer-only graph.

The step reads the same activation codes a direct :class:`~winoq.integer.layers.IntConv2d` would
(one static scale ``S_in``) and returns an int32 accumulator at a per-output-channel scale, so the
graph requantizes it exactly like a direct conv's. Every stage is integer arithmetic:

1. zero-padded n x n tiles of the codes (n = m + 2);
2. input transform with the fixed-point ``Bq = round(S_B BT 2^kb)`` of the layer's learned
   (data-free) transform scales: ``V = rshift(Bq d, sb) Bq^T`` (``winograd.fixed_point``, the
   same rounding and shifts the compiled CPU kernel uses); or (``IntegerConfig.winograd_input_rows
   = "exact"``) the Toom-Cook rows as small integers, S_B folded into the per-tap scales;
3. V requantized per tap to int8 by a dyadic multiplier (one static scale per tap, calibrated);
4. per tap an integer GEMM over the input channels with int8 ``U`` (``S_G G g G^T S_G``, one
   symmetric scale per tap and output channel), int32 sums;
5. the sums requantized to int16 M by one dyadic multiplier per tap and output channel
   (``S_v[t] S_u[t, k] / S_m[k]``: every per-tap scale folds into this one requantization; M
   shares one static scale per output channel across taps so that the output transform can mix
   them);
6. output transform in int64 with ``Aq = round(AT (S_B S_G)^-1 2^ka)``, a rounding right shift
   ``so`` back into int32 range, plus the int32 bias.

``forward`` runs on the compiled step (:mod:`winoq.kernels.int_step`: VNNI int8 GEMMs, the same
integers) where it can, else in PyTorch int64 ops (:meth:`IntWinogradConv2d.forward_torch`, the
definition). The static scales of V and M are calibrated on the float model's inputs of the layer (quantized
with ``S_in``), V's with a clipping search (``IntegerConfig.winograd_v_clip``). ``simulate``
computes the same codes with float64 arithmetic only.

ONNX has no Winograd operator; :mod:`winoq.integer.onnx_export` refuses these steps with a message
(export a model converted with ``winograd=None``).
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..winograd.conv import transform_2d
from ..winograd.fixed_point import effective_bits, first_pass_shift, fixed, int_transform_bound, rshift
from .dyadic import dyadic_tensor, requantize, requantize_float

INT32_MAX = (1 << 31) - 1


_rshift_int = rshift  # t / 2^k rounded half away from zero on integer tensors (the kernel's rounding)


def _rshift_float(t: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`~winoq.winograd.fixed_point.rshift` in float64 (exact for integer values below 2^53: a power-of-two division is exact)."""
    if k == 0:
        return t
    half, s = float(1 << (k - 1)), float(1 << k)
    return torch.where(t >= 0, torch.floor((t + half) / s), -torch.floor((half - t) / s))


def _transform(q: torch.Tensor, mat: torch.Tensor, shift: int, rshift) -> torch.Tensor:
    """(..., n, n) -> (..., o, o): ``rshift(mat q, shift) mat^T`` in q's dtype."""
    t = rshift(torch.einsum("ai,...ij->...aj", mat, q), shift)
    return torch.einsum("...aj,bj->...ab", t, mat)


def learned_transforms(weight: torch.Tensor, bias: torch.Tensor, conv: nn.Conv2d, m: int, weight_bits: int,
                       scales: str, learn_steps: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(AT', G', BT') in float64 with the layer's data-free learned diagonal scales (``scales``:
    "learned" or "standard"), learned on the folded float weights by :func:`winoq.quantize`."""
    import winoq

    float_conv = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, 1, conv.padding, bias=True)
    with torch.no_grad():
        float_conv.weight.copy_(weight.float())
        float_conv.bias.copy_(bias.float())
    recipe = winoq.Recipe(weights=f"int{weight_bits}", activations="int8", winograd=m, scales=scales,
                          winograd_min_channels=None, learn_steps=learn_steps, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = winoq.quantize(float_conv, recipe, progress=False)
    with torch.no_grad():
        return layer.transforms(torch.float64, "cpu", fixed_point=False)


def winograd_multiplications(c: int, k: int, out_hw: tuple[int, int], m: int, r: int = 3) -> int:
    """General multiplications of F(m, r) per sample: (m + r - 1)^2 per m x m tile and channel pair."""
    th, tw = math.ceil(out_hw[0] / m), math.ceil(out_hw[1] / m)
    return th * tw * (m + r - 1) ** 2 * c * k


def _rshift_by(t: torch.Tensor, e: torch.Tensor, integer: bool) -> torch.Tensor:
    """``t / 2^e`` rounded half away from zero with a shift per element (``e >= 0`` broadcast)."""
    if integer:
        half = torch.where(e > 0, torch.bitwise_left_shift(torch.ones_like(e), (e - 1).clamp_min(0)), 0)
        return torch.where(t >= 0, (t + half) >> e, -((half - t) >> e))
    s = torch.exp2(e)
    half = torch.where(e > 0, s / 2, 0.0)
    return torch.where(t >= 0, torch.floor((t + half) / s), -torch.floor((half - t) / s))


def _bit_length(a: torch.Tensor, integer: bool, max_bits: int = 48) -> torch.Tensor:
    """Bits of non-negative integers ``a`` (0 for 0) by comparisons only: no float op, no division."""
    one = 1 if integer else 1.0
    n = torch.zeros_like(a)
    for k in range(max_bits):
        n = n + (a >= (one * (1 << k))).to(a.dtype)
    return n


class IntWinogradConv2d(nn.Module):
    """Integer Winograd conv step: int32 codes in, int32 accumulator at ``S_m 2^(so - 2 ka)`` out.

    ``v_group`` 0: V requantized per tap by static dyadic multipliers ``(vb, vc)``. ``v_group`` g > 0:
    V codes with a power-of-two scale per (sample, tile, group of g input channels, tap), the
    exponent from the integer bit length of the group's largest |V| (block floating point, as OCP
    MX formats share an exponent per block); each group's int32 tap sums are shifted back by
    their exponent and summed in int64, then shifted right by the static ``pre_shift``."""

    def __init__(self, name: str, m: int, r: int, padding, *, bq, sb: int, aq, so: int, u, v_range: int,
                 mb, mc, m_range: int, bias, vb=None, vc=None, v_group: int = 0, pre_shift: int = 0):
        super().__init__()
        self.name, self.m, self.r, self.padding = name, int(m), int(r), tuple(padding)
        self.sb, self.so, self.v_group, self.pre_shift = int(sb), int(so), int(v_group), int(pre_shift)
        self.v_range, self.m_range = int(v_range), int(m_range)
        t = u.shape[0]
        vb = torch.ones(t, dtype=torch.int64) if vb is None else vb
        vc = torch.ones(t, dtype=torch.int64) if vc is None else vc
        for n, v in (("bq", bq), ("aq", aq), ("u", u), ("vb", vb), ("vc", vc), ("mb", mb), ("mc", mc),
                     ("bias", bias)):
            self.register_buffer(n, v.to(torch.int64))
        self.wide = False  # the accumulator fits int32 by construction (``so``)
        self.kernel = "auto"  # "auto": the compiled step where it can run; "torch": forward_torch

    @property
    def n(self) -> int:
        return self.m + self.r - 1

    def set_direct_twin(self, conv: nn.Module, b: torch.Tensor, c: torch.Tensor) -> None:
        """The same layer as a direct integer conv (``conv``: an ``IntConv2d`` on the same input codes)
        and the dyadic rescale ``(b, c)`` of its accumulator to this step's accumulator scale: what an
        export without a Winograd operator runs instead (``direct_twin``)."""
        self.direct = conv
        self.register_buffer("direct_b", b.reshape(1, -1, 1, 1))
        self.register_buffer("direct_c", c.reshape(1, -1, 1, 1))

    def direct_twin(self, x: torch.Tensor) -> torch.Tensor:
        """The direct conv's accumulator rescaled to this step's scale (int32): close to, not equal to,
        ``forward(x)`` (different rounding)."""
        return requantize(self.direct(x), self.direct_b, self.direct_c).clamp(-INT32_MAX, INT32_MAX).to(torch.int32)

    def _tiles(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        ph, pw = self.padding
        h, w = x.shape[2:]
        oh, ow = h + 2 * ph - self.r + 1, w + 2 * pw - self.r + 1
        th, tw = math.ceil(oh / self.m), math.ceil(ow / self.m)
        xp = F.pad(x, (pw, pw + tw * self.m + self.r - 1 - (w + 2 * pw), ph, ph + th * self.m + self.r - 1 - (h + 2 * ph)))
        return xp.unfold(2, self.n, self.m).unfold(3, self.n, self.m).permute(0, 2, 3, 1, 4, 5), (oh, ow)

    @staticmethod
    def _ops(integer: bool):
        return ((torch.int64, requantize, _rshift_int) if integer else (torch.float64, requantize_float, _rshift_float))

    def input_transform(self, x: torch.Tensor, integer: bool = True) -> torch.Tensor:
        """Stages 1-2: V_int as (N, th, tw, C, taps)."""
        dt, _, rshift = self._ops(integer)
        tiles, _ = self._tiles(x.to(dt))
        return _transform(tiles, self.bq.to(dt), self.sb, rshift).reshape(*tiles.shape[:4], self.n * self.n)

    def tap_sums(self, v: torch.Tensor, integer: bool = True, shifted: bool = True) -> torch.Tensor:
        """Stages 3-4: the tap GEMMs of V codes and U, (N, th, tw, taps, K), at a static scale per tap
        and output channel (``shifted=False``: per-tile exponents, before ``pre_shift`` and its
        int32 saturation; for calibration)."""
        dt, req, rshift = self._ops(integer)
        if not self.v_group:
            qv = req(v, self.vb, self.vc).clamp(-self.v_range, self.v_range).to(dt)
            return torch.einsum("nyxct,tkc->nyxtk", qv, self.u.to(dt))
        nb, th, tw, c, taps = v.shape
        g = self.v_group
        j = math.ceil(c / g)
        vg = F.pad(v, (0, 0, 0, j * g - c)).reshape(nb, th, tw, j, g, taps)
        e = (_bit_length(vg.abs().amax(4), integer) - self.v_range.bit_length()).clamp_min(0)  # (N, th, tw, J, taps)
        qv = _rshift_by(vg, e[:, :, :, :, None, :], integer).clamp(-self.v_range, self.v_range)
        u = F.pad(self.u.to(dt), (0, j * g - c)).reshape(taps, -1, j, g)
        acc = torch.einsum("nyxjct,tkjc->nyxjtk", qv, u)
        scaled = acc * (torch.bitwise_left_shift(torch.ones_like(e), e) if integer else torch.exp2(e))[..., None]
        if not shifted:
            return scaled.sum(3)
        return rshift(scaled.sum(3), self.pre_shift).clamp(-INT32_MAX, INT32_MAX)

    def transformed_output(self, x: torch.Tensor, integer: bool = True) -> tuple[torch.Tensor, tuple[int, int]]:
        """Stages 1-6 before the final shift: (N, th, tw, K, m, m) int64 (or float64), and (OH, OW)."""
        dt, req, rshift = self._ops(integer)
        acc = self.tap_sums(self.input_transform(x, integer), integer)
        nb, th, tw, _, k = acc.shape
        qm = req(acc, self.mb, self.mc).clamp(-self.m_range, self.m_range).to(dt)
        qm = qm.reshape(nb, th, tw, self.n, self.n, k).permute(0, 1, 2, 5, 3, 4)
        ph, pw = self.padding
        out_hw = (x.shape[2] + 2 * ph - self.r + 1, x.shape[3] + 2 * pw - self.r + 1)
        return _transform(qm, self.aq.to(dt), 0, rshift), out_hw

    def _run(self, x: torch.Tensor, integer: bool) -> torch.Tensor:
        dt, _, rshift = self._ops(integer)
        y, (oh, ow) = self.transformed_output(x, integer)
        nb, th, tw, k = y.shape[:4]
        y = rshift(y, self.so) + self.bias.to(dt).view(k, 1, 1)
        y = y.permute(0, 3, 1, 4, 2, 5).reshape(nb, k, th * self.m, tw * self.m)[:, :, :oh, :ow]
        return y.to(torch.int32) if integer else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The int32 accumulator: on the compiled step (:mod:`winoq.kernels.int_step`, same integers)
        where it runs this layer and ``kernel`` is "auto", else :meth:`forward_torch`."""
        if self.kernel == "auto" and x.device.type == "cpu":
            from ..kernels import int_step

            if int_step.available() and int_step.cached_reason(self) is None:
                return int_step.forward(self, x)
        return self.forward_torch(x)

    def forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        """The definition in PyTorch int64 tensor ops."""
        return self._run(x, True)

    def simulate(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, False)

    def extra_repr(self) -> str:
        v = f"per tile and {self.v_group} channels (power of two)" if self.v_group else "static per tap"
        return f"{self.name}, F({self.m},{self.r}), out={self.u.shape[1]}, V int{self.v_range.bit_length() + 1} " \
               f"{v}, M int{self.m_range.bit_length() + 1}"


def _mse_clip_taps(v: torch.Tensor, amax: torch.Tensor, q: int, samples: int = 1 << 14) -> torch.Tensor:
    """Per tap (last dim of ``v``), the clipping value in [0.3, 1] x amax with least squared error."""
    gen = torch.Generator().manual_seed(0)
    flat = v.reshape(-1, v.shape[-1]).double()
    idx = torch.randint(0, flat.shape[0], (min(samples, flat.shape[0]),), generator=gen)
    vals = flat[idx]                                                # (S, T)
    best, best_err = amax.clone(), torch.full_like(amax, math.inf)
    for ratio in torch.linspace(0.3, 1.0, 36).tolist():
        s = (amax * ratio / q).clamp_min(1e-300)
        err = ((torch.round(vals / s).clamp(-q, q) * s - vals) ** 2).sum(0)
        better = err < best_err
        best, best_err = torch.where(better, amax * ratio, best), torch.where(better, err, best_err)
    return best


def _shift_to(amax: float, keep: int) -> int:
    """The right shift that brings a maximum ``amax`` down to at most 2^keep."""
    return max(0, math.ceil(math.log2(max(amax, 1.0))) - keep)


def _quantized_u(g: torch.Tensor, w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """U = G' w G'^T as (taps, K, C) codes with one symmetric scale per tap and output channel."""
    n = g.shape[0]
    u = transform_2d(g, w).reshape(w.shape[0], w.shape[1], n * n).permute(2, 0, 1)
    q = (1 << (bits - 1)) - 1
    amax = u.abs().amax(-1)
    s_u = torch.where(amax > 0, amax / q, torch.ones_like(amax))
    return torch.round(u / s_u[..., None]).clamp(-q, q).long(), s_u


def _static_v(name, v: torch.Tensor, q: int, clip: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Static per-tap V multipliers (b, c) from calibration V_int, and each tap's V_int units per code."""
    taps = v.shape[-1]
    amax = v.abs().reshape(-1, taps).amax(0).clamp_min(1.0)
    if clip == "mse":
        amax = _mse_clip_taps(v, amax, q)
    vb, vc = dyadic_tensor(q / amax, f"layer {name!r} (V requantization)")
    return vb, vc, 2.0 ** vc.double() / vb.double()


def _input_rows(bt: torch.Tensor, m: int, r: int, bits: int, in_max: int,
                rows: str = "fixed") -> tuple[torch.Tensor, int, torch.Tensor]:
    """The input transform's integer rows, its first-pass shift and the real value of one unit of
    V_int per tap. "fixed": ``round(BT' 2^kb)`` with its shift. "exact": ``BT' = diag(f) B_int``
    with ``B_int`` the Toom-Cook rows as coprime integers (F(4,3): entries 0, +-1, +-2, +-4, +-5),
    so the exact integer rows are used and ``f_a f_b`` goes into the tap's scale: no rounding of the
    learned S_B, and at F(2,3) / F(4,3) V_int fits int16 (the compiled step's lanes); but S_B then
    no longer shapes V's codes. "exact" rows that leave int32 (or transforms that are not scaled
    Toom-Cook rows) fall back to "fixed"."""
    from ..winograd.transforms import toom_cook

    b_int = torch.tensor(toom_cook(m, r).BT_integer_rows[0], dtype=torch.int64)
    f = (bt * b_int).sum(1) / (b_int * b_int).sum(1)
    if rows == "exact" and b_int.shape == bt.shape and torch.allclose(f[:, None] * b_int, bt, rtol=1e-12, atol=1e-15) \
            and int_transform_bound(b_int, 0, in_max) <= INT32_MAX:
        return b_int, 0, torch.outer(f, f).reshape(-1)
    kb = effective_bits(bt, bits, in_max)
    sb = first_pass_shift(bt, kb, in_max)
    return fixed(bt, kb), sb, torch.full((bt.shape[0] ** 2,), 2.0 ** (sb - 2 * kb), dtype=torch.float64)


def build_int_winograd(name: str, conv: nn.Conv2d, w: torch.Tensor, b: torch.Tensor, s_in: float, in_qmax: int,
                       calib_inputs: torch.Tensor, *, m: int, weight_bits: int, v_bits: int, m_bits: int,
                       transform_bits: int, scales: str, v_clip: str, learn_steps: int, seed: int,
                       v_group: int = 0, chunk: int = 16, input_rows: str = "fixed") -> tuple[IntWinogradConv2d, torch.Tensor, float]:
    """The integer Winograd step of ``conv`` (folded float64 ``w, b``) reading codes at ``s_in``;
    returns it, its accumulator scale (1, K, 1, 1) and the accumulator's worst-case |code|.
    ``calib_inputs``: the float model's inputs of this layer on calibration data. ``v_group``: 0
    for static per-tap V scales, g > 0 for power-of-two V scales per tile, tap and g channels."""
    r, kout, cin = conv.kernel_size[0], w.shape[0], w.shape[1]
    at, g, bt = learned_transforms(w, b, conv, m, weight_bits, scales, learn_steps, seed)
    bq, sb, tap_unit = _input_rows(bt, m, r, transform_bits, in_qmax + 1, input_rows)
    ka = transform_bits
    aq = fixed(at, ka)
    u_q, s_u = _quantized_u(g, w, weight_bits)                                  # (T, K, C), (T, K)
    qv_max, qm_max = (1 << (v_bits - 1)) - 1, (1 << (m_bits - 1)) - 1
    if qv_max * int(u_q.abs().max()) * min(cin, v_group or cin) > INT32_MAX:
        raise ValueError(f"layer {name!r}: {cin} input channels overflow the int32 tap sums")
    ones, zeros = torch.ones(1, dtype=torch.int64), torch.zeros(kout, dtype=torch.int64)
    fixed_args = dict(bq=bq, sb=sb, aq=aq, u=u_q, v_range=qv_max, m_range=qm_max, v_group=v_group)

    def step(mb=ones, mc=ones, so=0, bias=zeros, vb=None, vc=None, pre_shift=0):
        return IntWinogradConv2d(name, m, r, conv.padding, so=so, mb=mb, mc=mc, bias=bias, vb=vb, vc=vc,
                                 pre_shift=pre_shift, **fixed_args)

    qx = torch.round(calib_inputs.double() / s_in).clamp(-in_qmax, in_qmax).long()
    chunks = [qx[i:i + chunk] for i in range(0, len(qx), chunk)]
    probe = step()
    v = torch.cat([probe.input_transform(c) for c in chunks])                   # V_int (N, th, tw, C, T)
    if int(v.abs().max()) > INT32_MAX:
        raise ValueError(f"layer {name!r}: the integer input transform leaves int32")
    unit = s_in * tap_unit                                                      # real value of one V_int unit, per tap
    if v_group:  # the tap sums come out in V_int units (times U's scale), shifted right by pre_shift
        peak = max(float(probe.tap_sums(v[i:i + chunk], shifted=False).abs().max()) for i in range(0, len(v), chunk))
        pre_shift = _shift_to(peak, 30)
        probe, vb, vc, sum_unit = step(pre_shift=pre_shift), None, None, unit * 2.0 ** pre_shift
        sum_scale = sum_unit[:, None] * s_u                                     # (T, K)
    else:
        vb, vc, per_code = _static_v(name, v.double(), qv_max, v_clip)
        pre_shift, probe = 0, step(vb=vb, vc=vc)
        sum_scale = (unit * per_code)[:, None] * s_u
    # M: one static scale per output channel, shared by the taps (the output transform mixes them)
    amax_m = torch.zeros(kout, dtype=torch.float64)
    for i in range(0, len(v), chunk):
        mreal = probe.tap_sums(v[i:i + chunk]).double() * sum_scale
        amax_m = torch.maximum(amax_m, mreal.abs().amax(dim=(0, 1, 2, 3)))
    # a (nearly) dead output channel takes at least 1/256 of the layer's largest M scale: a tinier one
    # would underflow the dyadic range of the requantization that reads this accumulator
    floor = float(amax_m.max()) * 2.0 ** -8 if float(amax_m.max()) > 0 else 1.0
    s_m = amax_m.clamp_min(floor) / qm_max
    mb, mc = dyadic_tensor(sum_scale / s_m, f"layer {name!r} (M requantization)")
    # output: the int64 transform shifted right until its worst case (plus the bias) fits int32, and
    # its calibrated maximum is about 2^24 (the 8-bit requantization that reads it then needs a
    # shift of about 31 + 24 - 7 bits, well inside the dyadic range)
    l1 = float(aq.abs().sum(1).max())
    worst = qm_max * l1 * l1
    probe = step(mb, mc, vb=vb, vc=vc, pre_shift=pre_shift)
    y_max = max(float(probe.transformed_output(c)[0].abs().max()) for c in chunks)
    so = max(_shift_to(worst, 29), _shift_to(y_max, 24))
    s_acc = s_m * 2.0 ** (so - 2 * ka)
    b_q = torch.round(b / s_acc)
    bound = worst / 2 ** so + 1 + float(b_q.abs().max())
    if bound > INT32_MAX:
        raise ValueError(f"layer {name!r}: its bias does not fit the Winograd accumulator (max code "
                         f"{float(b_q.abs().max()):.3g}); its output range is tiny against the bias")
    return step(mb, mc, so, b_q.long(), vb, vc, pre_shift), s_acc.reshape(1, -1, 1, 1), bound
