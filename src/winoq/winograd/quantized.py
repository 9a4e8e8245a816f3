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
The spatial input x has one scale per tile and channel group by default (quantized
after tile extraction, so each overlapping tile is an integer tile for the integer input
transform); ``activation_granularity="sample"`` gives it one scale per sample and group over
all pixels, ``"block"`` one per m x m pixel block (emulated only). Every stage's
granularity is described in :mod:`winoq.granularity`.

The transforms are the Toom-Cook ones with learnable diagonal scales
(BT' = S_B BT, G' = S_G G, AT' = AT (S_B S_G)^-1), so the layer computes the
exact convolution in full precision whatever the scales; or, for the PAW
baseline, fully learned matrices (``set_free_transforms``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import nn

from ..formats import parse
from ..granularity import (WINO_INPUT, WINO_INPUT_BLOCKS, WINO_M, WINO_M_LAST, WINO_TILES, WINO_TILES_LAST, WINO_U,
                           WinogradGranularity)
from ..modules import WeightView, quantize_activation, replaced_quantized_weight
from ..quantizers import Granularity, compute_scale, fake_quantize, fake_quantize_dynamic, quantize
from .conv import (WinogradConv2d, extract_tiles, hadamard_taps_first, stitch_taps_first, stitch_tiles,
                   tiles_taps_first, transform_2d, transform_taps_first)
from .transforms import apply_diagonal_scales

# fixed-point fractional bits of non-rational (learned) transform coefficients in the int32 report
FRACTION_BITS = 10


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
        self.weight_tapwise = False
        self.input_tapwise = False  # V per tap as well (free in an integer pipeline; see winoq.granularity)
        self.activation_granularity = "fine"  # winoq.granularity.ACTIVATION_CHOICES: the spatial input's scales
        self.activation_zero_point = False  # the spatial input's scales with zero points (Recipe.input_zero_points)
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
            from .fixed_point import exact_input_rows, rounded_transforms, transform_bits, wide_m

            at_q, bt_q = rounded_transforms(mats[0].detach(), mats[2].detach(), transform_bits(self), wide_m(self),
                                            exact_input_rows(self) is not None)
            # straight-through: the rounded values forward, the scales' gradients as before
            mats = (mats[0] + (at_q - mats[0]).detach(), mats[1], mats[2] + (bt_q - mats[2]).detach())
        return tuple(t.to(device=device, dtype=dtype) for t in mats)

    # ---------------------------------------------------------------- granularity
    @property
    def granularity(self) -> WinogradGranularity:
        """Where the scales of x, V, U and M live (read by every kernel)."""
        return WinogradGranularity.make(self.group_size, self.activation_granularity, self.scale_mode == "tapwise",
                                        self.weight_tapwise, self.input_tapwise, self.activation_zero_point)

    def _input_gran(self) -> Granularity:
        """The spatial input's granularity on (N, C, H, W) where no tiles are formed (the
        data-free reference output): per sample and channel group over all pixels when the
        layer quantizes x so, else per sample, pixel and group (the finest input)."""
        stage = self.granularity.input
        if self.granularity.input_mode != "sample":
            stage = type(stage)(stage.group_size, ("sample", "pixel"), stage.zero_point)
        return stage.granularity(WINO_INPUT)

    def _per_conv_group(self, v: torch.Tensor, fn) -> torch.Tensor:
        """Apply ``fn`` to V viewed as (N, groups, C/groups, ...) so that channel
        groups never straddle two conv groups (each integer sum stays in one)."""
        nb, c = v.shape[:2]
        out = fn(v.reshape(nb, self.groups, c // self.groups, *v.shape[2:]))
        return out.reshape(v.shape)

    def _weight_gran(self) -> Granularity:
        """Transformed weights U (K, C/groups, n, n): per output channel and input-channel
        group, shared by the taps unless tap-wise; per output channel when group_size is None."""
        return self.granularity.u.granularity(WINO_U)

    def _static(self, stage: str) -> bool:
        r = self.act_ranges
        return r is not None and (r.stages is None or stage in r.stages)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Input stage on (N, C, H, W) before padding, for the per-sample (and static) scales."""
        gr = self.granularity.input
        if self.granularity.input_mode == "sample" or self._static("input"):
            return quantize_activation(self, "input", x, self.formats.input, gr.granularity(WINO_INPUT),
                                       gr.static_keep(WINO_INPUT), zero_point=gr.zero_point)
        return x

    def quantize_padded_input(self, xp: torch.Tensor) -> torch.Tensor:
        """Block mode: x (padded) with one scale per sample, channel group and m x m pixel block
        of the tile grid (a tile straddles up to 4 blocks: not an integer-transformable tile)."""
        fmt = self.formats.input
        if fmt is None or self.granularity.input_mode != "block" or self._static("input"):
            return xp
        m = self.m
        nb, c, h, w = xp.shape
        hb, wb = -(-h // m), -(-w // m)
        xb = torch.nn.functional.pad(xp, (0, wb * m - w, 0, hb * m - h)).reshape(nb, c, hb, m, wb, m)
        gr = self.granularity.input
        xb = fake_quantize_dynamic(xb, fmt, gr.granularity(WINO_INPUT_BLOCKS), zero_point=gr.zero_point)
        return xb.reshape(nb, c, hb * m, wb * m)[:, :, :h, :w]

    def quantize_tiles(self, tiles: torch.Tensor, layout: tuple[str, ...]) -> torch.Tensor:
        """Tile mode: each (overlapping) tile of the input, with one scale per tile and channel
        group. ``tiles`` is (n*n, C, N, th, tw) or (N, C, th, tw, n, n); ``layout`` names its dims
        once split per conv group (WINO_TILES or WINO_TILES_LAST)."""
        fmt = self.formats.input
        if fmt is None or self.granularity.input_mode != "tile" or self._static("input"):
            return tiles
        cdim = layout.index("channel")
        shape = tiles.shape
        t = tiles.reshape(*shape[: cdim - 1], self.groups, shape[cdim - 1] // self.groups, *shape[cdim:])
        gr = self.granularity.input
        return fake_quantize_dynamic(t, fmt, gr.granularity(layout), zero_point=gr.zero_point).reshape(shape)

    @staticmethod
    def _fq(x, fmt, gran, zero_point: bool = False):
        return x if fmt is None else fake_quantize_dynamic(x, fmt, gran, zero_point=zero_point)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before the unused per-layer clipping buffer was removed carry a
        # `clip` entry (always ones): nothing reads it, so it is dropped instead of refused
        state_dict.pop(prefix + "clip", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---------------------------------------------------------------- forward
    def quantized_weight(self, g: torch.Tensor) -> torch.Tensor:
        if self.learned_u is not None:
            return self.learned_u.to(g.dtype)
        key = None
        if self.cache_u and not torch.is_grad_enabled():  # inference: reuse U while weights and scales are unchanged
            tracked = [self.weight, self.log_sb, self.log_sg]
            if self.free_transforms is not None:
                tracked += list(self.free_transforms.parameters())
            key = (tuple((id(t), t._version) for t in tracked), g.dtype, g.device,
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
        scale, _ = compute_scale(u.detach(), fmt, self._weight_gran())
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
        fm, gr = self.formats, self.granularity
        xp = self.quantize_padded_input(self.pad_input(self.quantize_input(x)))
        out_hw = self.output_hw(xp)
        tiles = tiles_taps_first(xp, self.m, self.kernel_size, out_hw)  # (n*n, C, N, th, tw)
        v = transform_taps_first(bt, self.quantize_tiles(tiles, WINO_TILES))
        taps, c = v.shape[:2]
        # channel groups within each conv group; one scale per (group, sample, tile), shared by the taps
        v = v.reshape(taps, self.groups, c // self.groups, *v.shape[2:])
        v = quantize_activation(self, "v", v, fm.winograd_input, gr.v.granularity(WINO_TILES), gr.v.static_keep(WINO_TILES),
                                zero_point=gr.v.zero_point)
        v = v.reshape(taps, c, *v.shape[3:])
        mprod = hadamard_taps_first(self.quantized_weight(g), v, self.groups)  # (n*n, K, N, th, tw)
        mprod = quantize_activation(self, "m", mprod, fm.output, gr.m.granularity(WINO_M), gr.m.static_keep(WINO_M))
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
        gr = self.granularity
        at, g, bt = self.transforms(torch.float64, x.device)
        xp = self.quantize_padded_input(self.pad_input(self.quantize_input(x)))
        out_hw = self.output_hw(xp)
        tiles = self.quantize_tiles(extract_tiles(xp, self.m, self.kernel_size, out_hw), WINO_TILES_LAST)
        v = transform_2d(bt, tiles)
        sym, gran_v = not gr.v.zero_point, gr.v.granularity(WINO_TILES_LAST)

        def v_params(t, i):  # V's scale (i = 0) or zero point (1) per conv group, expanded to its shape
            return compute_scale(t, fm.winograd_input, gran_v, symmetric=sym)[i].expand(t.shape)

        sv = self._per_conv_group(v, lambda t: v_params(t, 0))
        zv = None if sym else self._per_conv_group(v, lambda t: v_params(t, 1))
        qv = quantize(v, fm.winograd_input, sv, zv)
        u = transform_2d(g, self.weight.double()) if self.learned_u is None else self.learned_u.double()
        qu = quantize(u, fm.weight, compute_scale(u, fm.weight, self._weight_gran())[0])
        mprod = self._integer_hadamard(qu, qv)
        mprod = self._fq(mprod, fm.output, gr.m.granularity(WINO_M_LAST))
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
                codes = qv.codes if qv.zero_point is None else qv.codes - qv.zero_point  # the value's integer
                cv, cu = codes[:, cs][:, sub].long(), qu.codes[ks, sub].long()
                acc = torch.einsum("kcab,nctuab->nktuab", cu, cv)  # int64 sums within the group
                sv = _pick_scale(qv.scale, qv.codes.shape)[:, cs][:, sub][:, :1]  # (N,1,th,tw,n|1,n|1)
                su = _pick_scale(qu.scale, qu.codes.shape)[ks, sub][:, :1]  # (K/G,1,n|1,n|1)
                out[:, ks] += acc.double() * sv * su.squeeze(1)[None, :, None, None]
        return out

    # ---------------------------------------------------------------- learned rounding, format search
    def rounding_format(self):
        """The format of the transformed weights U (None: they stay float)."""
        return self.formats.weight

    @torch.no_grad()
    def rounding_target(self) -> WeightView:
        """U = G' g G'^T with the current transform scales: what learned rounding and the format
        search work on, with the layer's own scale granularity."""
        w = self.weight.detach()
        _, g, _ = self.transforms(w.dtype, w.device)
        return WeightView(transform_2d(g, w), self.formats.weight, self._weight_gran(),
                          getattr(self, "weight_method", "minmax"))

    @torch.no_grad()
    def set_rounded_weight(self, u_q: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        """Transformed weights already on the grid (step ``scale``) become ``learned_u``, used as given."""
        self.learned_u = u_q.detach().clone()
        self.learned_u_scale = None if scale is None else scale.detach().clone()

    def set_weight_format(self, fmt) -> None:
        import dataclasses

        self.formats = dataclasses.replace(self.formats, weight=parse(fmt))
        self.__dict__.pop("_u_cache", None)

    def rounding_inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.weight.dtype).detach()

    def rounding_layer_fn(self):
        """``fn(x, u)``: the full quantized pipeline with U replaced by ``u`` (used as given)."""
        def fn(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
            with self.weights_replaced_by(lambda: u):
                return self(x)
        return fn

    @torch.no_grad()
    def rounding_reference(self, x: torch.Tensor) -> torch.Tensor:
        from .scales import reference_output

        return reference_output(self, x)

    def expected_input(self) -> str:
        return f"(N, {self.in_channels}, H, W)"

    def accepts_input(self, x: torch.Tensor) -> bool:
        return x.ndim == 4 and x.shape[1] == self.in_channels

    def weights_replaced_by(self, fn):
        """For the duration, the quantized transformed weights are ``fn()`` (used as given) and no
        gradient reaches the layer's own parameters (bias, transforms)."""
        return replaced_quantized_weight(self, lambda g: fn().to(g.dtype))

    # ---------------------------------------------------------------- reports
    def int32_report(self, frac_bits: int = FRACTION_BITS) -> dict:
        """Worst-case accumulator magnitudes of the integer pipeline as it runs the current
        (possibly learned) transforms, and whether they fit int32.

        Input transform: the learned row scales S_B fold into V's requantization multiplier,
        so the integer transform is the base B^T (Toom-Cook, or the free PAW matrix) in integer
        form. Output transform: M's codes share one scale per tile, so A^T' = A^T (S_B S_G)^-1
        itself runs in integers, in integer form. :func:`integer_form` gives that form (exact
        small rationals, else fixed point with ``frac_bits`` fractional bits)."""
        fm = self.formats
        at, _, _ = self.transforms(torch.float64, "cpu")
        base_bt = (self.free_transforms["BT"] if self.free_transforms is not None else self.tc.BT).detach()
        cg = self.in_channels // self.groups
        gsz = cg if self.group_size is None else min(self.group_size, cg)
        worst = {}
        if fm.input is not None and not fm.input.is_float:
            bti, _ = integer_form(base_bt.double().cpu(), frac_bits)
            worst["input_transform"] = float(bti.abs().sum(1).max() ** 2 * fm.input.max_value)
        if fm.winograd_input is not None and fm.weight is not None and not fm.weight.is_float:
            worst["hadamard_group_sum"] = float(gsz * fm.winograd_input.max_value * fm.weight.max_value)
        if fm.output is not None and not fm.output.is_float:
            ati, _ = integer_form(at, frac_bits)
            worst["output_transform"] = float(ati.abs().sum(1).max() ** 2 * fm.output.max_value)
        return {k: {"worst_abs": v, "bits": math.ceil(math.log2(v + 1)) + 1, "fits_int32": v < 2**31}
                for k, v in worst.items()}

    def extra_repr(self) -> str:
        fm = self.formats
        names = [getattr(f, "name", "float") for f in (fm.input, fm.winograd_input, fm.weight, fm.output)]
        return super().extra_repr() + f", stages(in,V,U,M)={names}, group_size={self.group_size}, {self.scale_mode}, input per {self.granularity.input_mode}"


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


def integer_form(mat: torch.Tensor, frac_bits: int = FRACTION_BITS) -> tuple[torch.Tensor, int]:
    """``(round(d * mat), d)``: the integer matrix an integer pipeline multiplies by, and its
    denominator. Small rationals (Toom-Cook transforms) are exact with their least common
    denominator d <= 2**frac_bits; anything else (learned scales) is fixed point, d = 2**frac_bits."""
    limit = 1 << frac_bits
    den = 1
    for v in mat.flatten().tolist():
        f = Fraction(v).limit_denominator(limit)
        if abs(float(f) - v) > 1e-12 * max(1.0, abs(v)):
            den = limit
            break
        den = den * f.denominator // math.gcd(den, f.denominator)
        if den > limit:
            den = limit
            break
    return (mat * den).round(), den
