"""Fully quantized group-wise Winograd convolution.

Stages (each with its own number format)::

    x --Q_in--> tiles d --BT'dB'--> V --Q_V--> (x) <--Q_U-- U = G' g G'^T
                                              |
                         sum over channels in integers (per group of g channels)
                                              v
                     M --Q_M--> AT' M A' --> y (+ bias)

Because the transforms run in integer arithmetic on hardware, all n x n taps of
a tile share one scale (per sample, tile and channel group): ``scale_mode =
"shared"``, the paper's setting. ``"tapwise"`` gives every tap its own scale
(the tap-wise baseline; it needs floating-point rescaling inside the transforms).

The transforms are the Toom-Cook ones with learnable diagonal scales
(BT' = S_B BT, G' = S_G G, AT' = AT (S_B S_G)^-1), so the layer computes the
exact convolution in full precision whatever the scales; or, for the PAW
baseline, fully learned matrices (``set_free_transforms``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..formats import parse
from ..modules import quantize_activation
from ..quantizers import Granularity, compute_scale, fake_quantize, fake_quantize_dynamic, quantize
from .conv import (WinogradConv2d, extract_tiles, hadamard_taps_first, stitch_taps_first, stitch_tiles,
                   tiles_taps_first, transform_2d, transform_taps_first)
from .transforms import apply_diagonal_scales


@dataclass(frozen=True)
class StageFormats:
    """Number format of each stage; ``None`` leaves a stage in float."""

    input: object = "int8"     # spatial input x
    winograd_input: object = "int8"   # V = BT d B
    weight: object = "int8"    # U = G g G^T
    output: object = "int8"    # M, the Winograd-domain result before AT . A

    def parsed(self) -> "StageFormats":
        return StageFormats(*(None if f is None else parse(f) for f in
                              (self.input, self.winograd_input, self.weight, self.output)))


class QuantWinogradConv2d(WinogradConv2d):
    """Winograd conv with every stage fake-quantized (and an exact integer twin,
    :meth:`forward_integer`)."""

    def __init__(self, *args, formats: StageFormats = StageFormats(), group_size: int | None = 32,
                 scale_mode: str = "shared", **kwargs):
        super().__init__(*args, **kwargs)
        if scale_mode not in ("shared", "tapwise"):
            raise ValueError(f"scale_mode {scale_mode!r} unknown; use 'shared' or 'tapwise'")
        self.formats = formats.parsed()
        self.group_size = group_size
        self.scale_mode = scale_mode
        n = self.tc.n
        self.log_sb = nn.Parameter(torch.zeros(n), requires_grad=False)
        self.log_sg = nn.Parameter(torch.zeros(n), requires_grad=False)
        self.free_transforms: nn.ParameterDict | None = None
        # Clipping of the dynamic Winograd-domain scales (fraction of each group's max), chosen
        # data-free with the transform scales; 1.0 = plain min-max.
        self.register_buffer("clip", torch.ones(2))  # (V, M)
        self.weight_method = "minmax"
        self.weight_tapwise = False
        self.kernel = "emulated"  # see winoq.kernels: "emulated", "int-cpu", "triton", "auto"
        self.register_buffer("learned_u", None)  # transformed weights already on the grid (learned rounding)
        self.act_ranges = None  # StaticRanges when activation ranges are static (calibrated), else dynamic
        # keep the quantized transformed weights between inference calls (int8 / float8 codes: about
        # (n/r)^2 bytes per conv weight, 3.5 GiB for an SD-1.5 UNet at F(6,3)); False recomputes them
        self.cache_u = True
        # fractional bits of the fixed-point transforms of the "cpu" kernel (None: fixed_point.DEFAULT_TRANSFORM_BITS)
        self.transform_bits = None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, m: int, points=None, **kwargs) -> "QuantWinogradConv2d":
        base = WinogradConv2d.from_conv(conv, m, points)
        layer = cls(base.in_channels, base.out_channels, base.kernel_size, m, base.padding,
                    base.bias is not None, base.groups, base.padding_mode, points, **kwargs)
        layer.to(device=conv.weight.device, dtype=conv.weight.dtype)  # before copying: keep float64 exact
        layer.load_state_dict(base.state_dict(), strict=False)
        return layer

    # ---------------------------------------------------------------- transforms
    def set_diagonal_scales(self, s_b: torch.Tensor, s_g: torch.Tensor) -> None:
        with torch.no_grad():  # copy_ keeps the parameters' own dtype and device
            self.log_sb.copy_(torch.as_tensor(s_b, dtype=torch.float64).log())
            self.log_sg.copy_(torch.as_tensor(s_g, dtype=torch.float64).log())

    def set_free_transforms(self, at: torch.Tensor, g: torch.Tensor, bt: torch.Tensor) -> None:
        """Replace the Toom-Cook transforms by free (learnable) matrices (PAW baseline);
        the diagonal scales still apply on top (the factorized scales of FSQ)."""
        self.free_transforms = nn.ParameterDict(
            {"AT": nn.Parameter(at.detach().double().clone()), "G": nn.Parameter(g.detach().double().clone()),
             "BT": nn.Parameter(bt.detach().double().clone())})

    def transforms(self, dtype, device, fixed_point: bool | None = None):
        """(AT', G', BT'); with ``fixed_point`` (default: when the kernel is the fixed-point
        "cpu" one) AT' and BT' rounded as that kernel runs them (winograd.fixed_point)."""
        if fixed_point is None:
            fixed_point = self.kernel == "cpu"
        if self.free_transforms is not None:
            ft = self.free_transforms
            base = (ft["AT"], ft["G"], ft["BT"])
        else:
            base = (self.tc.AT.to(device), self.tc.G.to(device), self.tc.BT.to(device))
        mats = apply_diagonal_scales(*base, self.log_sb.exp(), self.log_sg.exp())
        if fixed_point:
            from .fixed_point import rounded_transforms, transform_bits

            at_q, bt_q = rounded_transforms(mats[0].detach(), mats[2].detach(), transform_bits(self))
            # straight-through: the rounded values forward, the scales' gradients as before
            mats = (mats[0] + (at_q - mats[0]).detach(), mats[1], mats[2] + (bt_q - mats[2]).detach())
        return tuple(t.to(device=device, dtype=dtype) for t in mats)

    # ---------------------------------------------------------------- granularity
    def _act_gran(self, ndim: int, tap_dims: tuple[int, ...], axis: int = 1) -> Granularity:
        """Activations: one scale per sample (dim 0), per tile, per channel group;
        shared by the taps (``tap_dims``) unless tap-wise."""
        shared = () if self.scale_mode == "tapwise" else tap_dims
        size = (1 << 30) if self.group_size is None else self.group_size  # None: all channels share
        return Granularity("group", axis=axis, group_size=size, shared_dims=shared)

    def _input_gran(self) -> Granularity:
        """Spatial input: one scale per sample and channel group over all pixels
        (what an integer input transform needs, tap-wise or not)."""
        return Granularity("group", axis=1, group_size=self.group_size or (1 << 30), shared_dims=(2, 3))

    def _per_conv_group(self, v: torch.Tensor, fn) -> torch.Tensor:
        """Apply ``fn`` to V viewed as (N, groups, C/groups, ...) so that channel
        groups never straddle two conv groups (each integer sum stays in one)."""
        nb, c = v.shape[:2]
        out = fn(v.reshape(nb, self.groups, c // self.groups, *v.shape[2:]))
        return out.reshape(v.shape)

    def _weight_gran(self) -> Granularity:
        """Transformed weights U (K, C/groups, n, n): per output channel and input-channel
        group, shared by the taps unless tap-wise; per output channel when group_size is None."""
        shared = () if (self.scale_mode == "tapwise" or self.weight_tapwise) else (2, 3)
        size = (1 << 30) if self.group_size is None else self.group_size
        return Granularity("group", axis=1, group_size=size, shared_dims=shared)

    @staticmethod
    def _fq(x, fmt, gran, clip=1.0):
        return x if fmt is None else fake_quantize_dynamic(x, fmt, gran, clip_ratio=clip)

    # ---------------------------------------------------------------- forward
    def quantized_weight(self, g: torch.Tensor) -> torch.Tensor:
        if self.learned_u is not None:
            return self.learned_u.to(g.dtype)
        key = None
        if self.cache_u and not torch.is_grad_enabled():  # inference: reuse U while weights and scales are unchanged
            tracked = [self.weight, self.log_sb, self.log_sg]
            if self.free_transforms is not None:
                tracked += list(self.free_transforms.parameters())
            key = (tuple((id(t), t._version) for t in tracked), g.dtype, g.device, self.weight_method,
                   self.weight_tapwise, self.formats.weight, self.group_size, self.scale_mode)
            cached = getattr(self, "_u_cache", None)
            if cached is not None and cached[0] == key:
                return cached[1] if cached[2] is None else cached[1].to(g.dtype) * cached[2]
            self.__dict__.pop("_u_cache", None)  # free the stale copy before building the new one
        u = transform_2d(g, self.weight.to(g.dtype))
        fmt = self.formats.weight
        if fmt is None:
            if key is not None:
                self._u_cache = (key, u, None)
            return u
        scale, _ = compute_scale(u.detach(), fmt, self._weight_gran(), self.weight_method)
        if key is None:
            return fake_quantize(u, fmt, scale)
        # inference: keep U as grid values in the narrowest dtype that holds them exactly (int8 /
        # float8 instead of float32: U is (n/r)^2 ~ 7x the conv weight, GBs for an SD UNet);
        # q * scale is bit for bit what fake_quantize returns
        q = fmt.round(u / scale)
        self._u_cache = (key, _compact(q, fmt), scale)
        return q * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The kernel chosen by ``self.kernel`` (``winoq.kernels``); the emulated one
        whenever gradients are needed (learning scales, rounding) or the activation
        ranges are static (the integer kernels compute their scales on the fly)."""
        if (self.kernel == "emulated" or self.training or self.act_ranges is not None
                or (torch.is_grad_enabled() and self._needs_grad(x))):
            return self.forward_emulated(x)
        from ..kernels import winograd_forward

        return winograd_forward(self, x, self.kernel)

    def _needs_grad(self, x: torch.Tensor) -> bool:
        learnable = [self.log_sb, self.log_sg]
        if self.free_transforms is not None:
            learnable += list(self.free_transforms.parameters())
        return x.requires_grad or any(p.requires_grad for p in learnable)

    def forward_emulated(self, x: torch.Tensor) -> torch.Tensor:
        """Fake quantization in floating point: runs anywhere, differentiable."""
        self.check_input(x)
        at, g, bt = self.transforms(x.dtype, x.device)
        fm = self.formats
        tap_keep = (0,) if self.scale_mode == "tapwise" else ()
        x = quantize_activation(self, "input", x, fm.input, self._input_gran(), (1,))
        xp = self.pad_input(x)
        out_hw = self.output_hw(xp)
        v = transform_taps_first(bt, tiles_taps_first(xp, self.m, self.kernel_size, out_hw))  # (n*n, C, N, th, tw)
        taps, c = v.shape[:2]
        # channel groups within each conv group; one scale per (group, sample, tile), shared by the taps
        v = v.reshape(taps, self.groups, c // self.groups, *v.shape[2:])
        v = quantize_activation(self, "v", v, fm.winograd_input, self._act_gran(v.ndim, (0,), axis=2), (1, 2) + tap_keep,
                                self.clip[0])
        v = v.reshape(taps, c, *v.shape[3:])
        mprod = hadamard_taps_first(self.quantized_weight(g), v, self.groups)  # (n*n, K, N, th, tw)
        mprod = quantize_activation(self, "m", mprod, fm.output, self._act_gran(mprod.ndim, (0,), axis=1), (1,) + tap_keep,
                                    self.clip[1])
        y = stitch_taps_first(transform_taps_first(at, mprod), out_hw)
        return y if self.bias is None else y + self.bias.to(y.dtype).view(1, -1, 1, 1)

    # ---------------------------------------------------------------- integer twin
    @torch.no_grad()
    def forward_integer(self, x: torch.Tensor) -> torch.Tensor:
        """Same result as :meth:`forward`, computed the way integer hardware would:
        integer codes for V and U, their products summed in int64 within each channel
        group, then scaled and summed across groups in float64. Integer formats only.

        The two paths evaluate V and M in a different floating-point order, so where a value
        lands exactly on a rounding tie (k + 1/2 steps; common with depthwise groups of one
        channel or tiles that are mostly zero padding) they may pick neighbouring codes.
        Elsewhere they agree to float64 rounding (tests: < 1e-9 relative)."""
        fm = self.formats
        for f in (fm.winograd_input, fm.weight):
            if f is None or f.is_float:
                raise ValueError("forward_integer needs integer formats for the Winograd input and weight stages")
        if self.act_ranges is not None:
            raise ValueError("forward_integer computes dynamic activation scales; this layer has static ranges "
                             "(activation_ranges='static'): use forward() / the emulated kernel")
        x = x.double()
        at, g, bt = self.transforms(torch.float64, x.device)
        x = self._fq(x, fm.input, self._input_gran())
        xp = self.pad_input(x)
        out_hw = self.output_hw(xp)
        v = transform_2d(bt, extract_tiles(xp, self.m, self.kernel_size, out_hw))
        sv = self._per_conv_group(v, lambda t: (compute_scale(t, fm.winograd_input, self._act_gran(7, (5, 6), axis=2))[0]
                                                * self.clip[0].double()).expand(t.shape))
        qv = quantize(v, fm.winograd_input, sv)
        u = transform_2d(g, self.weight.double()) if self.learned_u is None else self.learned_u.double()
        qu = quantize(u, fm.weight, compute_scale(u, fm.weight, self._weight_gran(), self.weight_method)[0])
        mprod = self._integer_hadamard(qu, qv)
        mprod = self._fq(mprod, fm.output, self._act_gran(6, (4, 5)), self.clip[1].double())
        y = stitch_tiles(transform_2d(at, mprod), out_hw)
        return y if self.bias is None else y + self.bias.double().view(1, -1, 1, 1)

    def _integer_hadamard(self, qu, qv) -> torch.Tensor:
        nb, c, th, tw, n, _ = qv.codes.shape
        k, cg = qu.codes.shape[:2]
        gsz = cg if self.group_size is None else min(self.group_size, cg)
        out = torch.zeros(nb, k, th, tw, n, n, dtype=torch.float64)
        for gi in range(self.groups):
            cs = slice(gi * cg, (gi + 1) * cg)
            ks = slice(gi * (k // self.groups), (gi + 1) * (k // self.groups))
            for start in range(0, cg, gsz):
                sub = slice(start, min(start + gsz, cg))
                cv, cu = qv.codes[:, cs][:, sub].long(), qu.codes[ks, sub].long()
                acc = torch.einsum("kcab,nctuab->nktuab", cu, cv)  # int64 sums within the group
                sv = _pick_scale(qv.scale, qv.codes.shape)[:, cs][:, sub][:, :1]  # (N,1,th,tw,n|1,n|1)
                su = _pick_scale(qu.scale, qu.codes.shape)[ks, sub][:, :1]  # (K/G,1,n|1,n|1)
                out[:, ks] += acc.double() * sv * su.squeeze(1)[None, :, None, None]
        return out

    # ---------------------------------------------------------------- reports
    def int32_report(self) -> dict:
        """Worst-case accumulator magnitudes of the integer pipeline, and whether they fit int32."""
        fm = self.formats
        at, g, bt = self.transforms(torch.float64, "cpu")
        cg = self.in_channels // self.groups
        gsz = cg if self.group_size is None else min(self.group_size, cg)
        worst = {}
        if fm.input is not None and not fm.input.is_float:
            # BT applied in integers after scaling its rows to integers (denominators cleared)
            den = _common_denominator(bt)
            worst["input_transform"] = float((bt * den).abs().sum(1).max() ** 2 * fm.input.max_value)
        if fm.winograd_input is not None and fm.weight is not None and not fm.weight.is_float:
            worst["hadamard_group_sum"] = float(gsz * fm.winograd_input.max_value * fm.weight.max_value)
        if fm.output is not None and not fm.output.is_float:
            den = _common_denominator(at)
            worst["output_transform"] = float((at * den).abs().sum(1).max() ** 2 * fm.output.max_value)
        return {k: {"worst_abs": v, "bits": math.ceil(math.log2(v + 1)) + 1, "fits_int32": v < 2**31}
                for k, v in worst.items()}

    def extra_repr(self) -> str:
        fm = self.formats
        names = [getattr(f, "name", "float") for f in (fm.input, fm.winograd_input, fm.weight, fm.output)]
        return super().extra_repr() + f", stages(in,V,U,M)={names}, group_size={self.group_size}, {self.scale_mode}"


def _compact(q: torch.Tensor, fmt) -> torch.Tensor:
    """``q`` (values of ``fmt``'s grid) in int8 / float8 when that dtype holds them exactly."""
    if not fmt.is_float and fmt.bits <= 8 and fmt.signed:
        return q.to(torch.int8)
    if fmt.is_float and fmt.bits <= 8:
        narrow = q.to(torch.float8_e4m3fn)
        if torch.equal(narrow.to(q.dtype), q):
            return narrow
    return q


def _pick_scale(scale: torch.Tensor, shape) -> torch.Tensor:
    return scale.expand(shape) if scale.dim() == len(shape) else scale


def _common_denominator(mat: torch.Tensor, limit: int = 1 << 12) -> int:
    """Smallest d <= limit with d * mat integral (the transforms are rationals)."""
    for d in range(1, limit + 1):
        scaled = mat * d
        if torch.allclose(scaled, scaled.round(), atol=1e-9):
            return d
    return limit
