"""Quantizers: granularity (per-tensor / per-channel / group-wise), scale
selection (min-max, percentile, MSE search), fake quantization with
straight-through gradients, learnable (LSQ-style) scales, the integer form, and
static / dynamic activation quantizers.

Every quantizer in winoq, whatever the algorithm, goes through these functions,
so a format (``winoq.formats``) and a granularity mean the same thing everywhere.

Granularity is described by :class:`Granularity`:

* ``"tensor"``: one scale for the whole tensor.
* ``"channel"``: one scale per index of ``axis``; every other dim shares it.
* ``"group"``: ``axis`` is cut into consecutive groups of ``group_size``; one
  scale per group *and* per index of every dim not listed in ``shared_dims``.
  When ``group_size`` does not divide the axis, the last group is shorter
  (it holds the remaining ``size % group_size`` elements); when ``group_size``
  is at least the axis size, the whole axis is one group.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from .formats import FloatFormat, IntFormat, parse

Method = Literal["minmax", "percentile", "mse"]
_MIN_SCALE = 1e-30


@dataclass(frozen=True)
class Granularity:
    kind: Literal["tensor", "channel", "group"] = "tensor"
    axis: int = 0
    group_size: int | None = None
    shared_dims: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.kind not in ("tensor", "channel", "group"):
            raise ValueError(f"granularity kind {self.kind!r} unknown; use 'tensor', 'channel' or 'group'")
        if self.kind == "group" and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise ValueError(f"group granularity needs group_size >= 1, got {self.group_size!r}")

    def reduce_dims(self, ndim: int) -> tuple[int, ...]:
        """Dims (other than the group axis) that share one scale."""
        axis = self.axis % ndim
        if self.kind == "tensor":
            return tuple(range(ndim))
        if self.kind == "channel":
            return tuple(d for d in range(ndim) if d != axis)
        return tuple(sorted({d % ndim for d in self.shared_dims} - {axis}))


def per_tensor() -> Granularity:
    return Granularity("tensor")


def per_channel(axis: int = 0) -> Granularity:
    return Granularity("channel", axis=axis)


def per_group(group_size: int, axis: int = 1, shared_dims: tuple[int, ...] = ()) -> Granularity:
    return Granularity("group", axis=axis, group_size=group_size, shared_dims=shared_dims)


# ----------------------------------------------------------------------------- group views
def _to_groups(x: torch.Tensor, axis: int, group_size: int, pad_value: float = 0.0) -> tuple[torch.Tensor, int]:
    """View ``x`` with ``axis`` split into (num_groups, group_size), padding the
    ragged last group with ``pad_value``. Returns the grouped tensor and the original size."""
    axis = axis % x.ndim
    size = x.shape[axis]
    g = min(group_size, size)
    pad = (-size) % g
    if pad:
        pad_spec = [0, 0] * (x.ndim - axis - 1) + [0, pad]
        x = torch.nn.functional.pad(x, pad_spec, value=pad_value)
    shape = x.shape[:axis] + (x.shape[axis] // g, g) + x.shape[axis + 1 :]
    return x.reshape(shape), size


def _from_groups(xg: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    axis = axis % (xg.ndim - 1)
    shape = xg.shape[:axis] + (xg.shape[axis] * xg.shape[axis + 1],) + xg.shape[axis + 2 :]
    return xg.reshape(shape).narrow(axis, 0, size)


def reduce_over(x: torch.Tensor, gran: Granularity, fn, pad_value: float = 0.0) -> torch.Tensor:
    """Apply a reduction ``fn(t, dims) -> t`` (keepdim) over each scale's elements;
    the result broadcasts back to ``x``'s shape. ``pad_value`` fills the ragged last
    group (0 is neutral for max |x| and sums; NaN for NaN-aware statistics)."""
    if gran.kind != "group":
        dims = gran.reduce_dims(x.ndim)
        if not dims:  # one scale per element (per-channel of a 1-D tensor)
            return fn(x.unsqueeze(-1), (x.ndim,)).squeeze(-1)
        return fn(x, dims)
    axis = gran.axis % x.ndim
    xg, size = _to_groups(x, axis, gran.group_size, pad_value)
    dims = [d if d < axis else d + 1 for d in gran.reduce_dims(x.ndim)] + [axis + 1]
    red = fn(xg, tuple(sorted(dims)))
    red = red.expand(*[xg.shape[d] if d == axis + 1 else red.shape[d] for d in range(xg.ndim)])
    return _from_groups(red, axis, size)


def _amax(t, dims):
    return t.abs().amax(dim=dims, keepdim=True)


# ----------------------------------------------------------------------------- STE rounding
def ste(x: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    """Value of ``rounded``, gradient of ``x`` (straight-through estimator)."""
    if not (x.requires_grad and torch.is_grad_enabled()):
        return rounded  # inference: skip the two extra full-size ops
    return x + (rounded - x).detach()


def _bounds(fmt) -> tuple[float, float]:
    if fmt.is_float:
        return (-fmt.max_value if fmt.signed else 0.0), fmt.max_value
    return float(fmt.qmin), float(fmt.qmax)


def fake_quantize(x: torch.Tensor, fmt, scale: torch.Tensor, zero_point: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize ``x`` on ``fmt``'s grid with step ``scale``.

    Rounding is straight-through; clipping passes no gradient to clipped elements.
    Written as ``scale * round(clamp(x / scale))`` so the gradient with respect
    to ``scale`` is the LSQ one (``round(u) - u`` inside the range, the bound outside)."""
    fmt = parse(fmt)
    u = x / scale
    if zero_point is not None:
        u = u + zero_point
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad):
        lo, hi = _bounds(fmt)
        u = torch.clamp(u, lo, hi)
        q = ste(u, fmt.round(u))
    else:
        q = fmt.round(u)  # every format's round saturates to its range
    if zero_point is not None:
        q = q - zero_point
    return q * scale


# ----------------------------------------------------------------------------- scale choice
def compute_scale(
    x: torch.Tensor,
    fmt,
    gran: Granularity = Granularity(),
    method: Method = "minmax",
    symmetric: bool = True,
    percentile: float = 99.99,
    mse_grid: int = 40,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point when asymmetric) broadcastable to ``x``.

    ``minmax`` maps the largest magnitude to the format's largest value;
    ``percentile`` clips at that percentile of |x|; ``mse`` searches clipping
    ratios in [0.3, 1] of the max and keeps, per scale, the one with least error."""
    fmt = parse(fmt)
    x = x.detach()
    if not symmetric:
        if fmt.is_float:
            raise ValueError(f"asymmetric quantization needs an integer format, not {fmt.name}; use symmetric=True")
        return _asymmetric_scale(x, fmt, gran)
    if method == "minmax":
        amax = reduce_over(x, gran, _amax)
    elif method == "percentile":
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        q = percentile / 100.0
        amax = reduce_over(x, gran, lambda t, d: _quantile_abs(t, d, q), pad_value=float("nan"))
    elif method == "mse":
        return _mse_scale(x, fmt, gran, mse_grid), None
    else:
        raise ValueError(f"scale method {method!r} unknown; use 'minmax', 'percentile' or 'mse'")
    return (amax / fmt.max_value).clamp_min(_MIN_SCALE), None


def _quantile_abs(t: torch.Tensor, dims, q: float) -> torch.Tensor:
    keep = [d for d in range(t.ndim) if d not in dims]
    perm = keep + list(dims)
    flat = t.abs().permute(perm).reshape(*[t.shape[d] for d in keep], -1)
    val = torch.nanquantile(flat.double(), q, dim=-1).to(t.dtype)  # NaN: padding of a ragged group
    shape = [1 if d in dims else t.shape[d] for d in range(t.ndim)]
    return val.reshape(shape)


def _mse_scale(x, fmt, gran, steps: int) -> torch.Tensor:
    amax = reduce_over(x, gran, _amax).clamp_min(_MIN_SCALE)
    best_err, best_scale = None, None
    for ratio in torch.linspace(0.3, 1.0, steps).tolist():
        scale = amax * ratio / fmt.max_value
        err = reduce_over((fake_quantize(x, fmt, scale) - x) ** 2, gran, lambda t, d: t.sum(dim=d, keepdim=True))
        if best_err is None:
            best_err, best_scale = err, scale
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
    return best_scale


def _asymmetric_scale(x, fmt: IntFormat, gran):
    xmax = reduce_over(x, gran, lambda t, d: t.amax(dim=d, keepdim=True))
    xmin = reduce_over(x, gran, lambda t, d: t.amin(dim=d, keepdim=True))
    return _affine_params(xmin, xmax, fmt)


def _affine_params(xmin: torch.Tensor, xmax: torch.Tensor, fmt: IntFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point mapping [min(xmin, 0), max(xmax, 0)] onto [qmin, qmax]
    (0 stays exactly representable: zero padding and ReLU zeros cost no error)."""
    xmax, xmin = xmax.clamp_min(0), xmin.clamp_max(0)
    scale = ((xmax - xmin) / (fmt.qmax - fmt.qmin)).clamp_min(_MIN_SCALE)
    zero_point = torch.clamp(torch.round(fmt.qmin - xmin / scale), fmt.qmin, fmt.qmax)
    return scale, zero_point


# ----------------------------------------------------------------------------- integer form
@dataclass
class QTensor:
    """Integer form of a quantized tensor: ``value = (codes - zero_point) * scale``.
    For float formats ``codes`` hold the format's (exactly representable) values."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    fmt: IntFormat | FloatFormat

    def dequantize(self) -> torch.Tensor:
        codes = self.codes.to(self.scale.dtype)
        if self.zero_point is not None:
            codes = codes - self.zero_point
        return codes * self.scale


def quantize(x: torch.Tensor, fmt, scale: torch.Tensor, zero_point: torch.Tensor | None = None) -> QTensor:
    fmt = parse(fmt)
    lo, hi = _bounds(fmt)
    u = x.detach() / scale
    if zero_point is not None:
        u = u + zero_point
    q = fmt.round(torch.clamp(u, lo, hi))
    codes = q if fmt.is_float else q.to(torch.int32)
    return QTensor(codes, scale, zero_point, fmt)


def dequantize(qt: QTensor) -> torch.Tensor:
    return qt.dequantize()


# ----------------------------------------------------------------------------- modules
class DynamicQuantizer(nn.Module):
    """Scales computed from each input (per call); needs no calibration data."""

    def __init__(self, fmt, gran: Granularity = Granularity(), method: Method = "minmax"):
        super().__init__()
        self.fmt = parse(fmt)
        self.gran = gran
        self.method = method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, zp = compute_scale(x, self.fmt, self.gran, self.method)
        return fake_quantize(x, self.fmt, scale, zp)

    def extra_repr(self) -> str:
        return f"{self.fmt.name}, {self.gran.kind}, dynamic"


class StaticQuantizer(nn.Module):
    """Scales fixed after calibration. While ``observing`` it records the running
    range of what it sees (max of |x| per scale, or a mean of per-batch
    percentiles) and passes inputs through unquantized; ``freeze()`` ends it.
    ``learnable=True`` makes the (log) scale a parameter trained with LSQ gradients."""

    def __init__(self, fmt, gran: Granularity = Granularity(), method: Method = "minmax", learnable: bool = False):
        super().__init__()
        self.fmt = parse(fmt)
        self.gran = gran
        self.method = method
        self.learnable = learnable
        self.observing = True
        self.register_buffer("amax", torch.zeros(()))
        self._batches = 0
        self.log_scale: nn.Parameter | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self._observe(x)
            return x
        return fake_quantize(x, self.fmt, self.scale)

    def _observe(self, x: torch.Tensor) -> None:
        if self.method == "minmax":
            amax = reduce_over(x.detach(), self.gran, _amax)
        else:
            amax = compute_scale(x, self.fmt, self.gran, self.method)[0] * self.fmt.max_value
        # Reduce the batch dim too when it is not shared, so ranges are input-size independent.
        amax = amax.amax(dim=0, keepdim=True) if amax.ndim and amax.shape[0] > 1 else amax
        if self._batches == 0 or self.amax.shape != amax.shape:
            self.amax = amax.clone()
        elif self.method == "minmax":
            self.amax = torch.maximum(self.amax, amax)
        else:  # running mean of clipped ranges (percentile / MSE are per-batch statistics)
            self.amax = self.amax + (amax - self.amax) / (self._batches + 1)
        self._batches += 1

    def freeze(self) -> "StaticQuantizer":
        if self._batches == 0:
            raise RuntimeError("StaticQuantizer.freeze() before any calibration batch; run calibration data through it first")
        self.observing = False
        if self.learnable:
            self.log_scale = nn.Parameter(torch.log(self.amax.clamp_min(_MIN_SCALE) / self.fmt.max_value))
        return self

    @property
    def scale(self) -> torch.Tensor:
        if self.log_scale is not None:
            return self.log_scale.exp()
        return (self.amax / self.fmt.max_value).clamp_min(_MIN_SCALE)

    def extra_repr(self) -> str:
        return f"{self.fmt.name}, {self.gran.kind}, static, observing={self.observing}"


def fake_quantize_dynamic(x: torch.Tensor, fmt, gran: Granularity, method: Method = "minmax",
                          clip_ratio: float | torch.Tensor = 1.0, zero_point: bool = False) -> torch.Tensor:
    """Fake-quantize ``x`` with scales computed from ``x`` itself: symmetric, or with
    ``zero_point=True`` asymmetric (each scale's [min, max], widened to hold 0, spread over
    the integer format's whole range with an integer zero point, as ``compute_scale(...,
    symmetric=False)``: a post-SiLU / post-ReLU input gets all 256 codes of int8 instead of
    about half).

    Same result as ``fake_quantize(x, fmt, *compute_scale(x, fmt, gran, method))``
    but works in the grouped view, so the scales are never expanded to x's size
    (this is the hot path of every dynamic activation quantizer). ``clip_ratio``
    < 1 clips each group at that fraction of its max (saturating the few largest; symmetric only)."""
    fmt = parse(fmt)
    if zero_point:
        if fmt.is_float:
            raise ValueError(f"zero points need an integer format, not {fmt.name}")
        if gran.kind != "group":
            return fake_quantize(x, fmt, *compute_scale(x, fmt, gran, symmetric=False))
    elif gran.kind != "group" or method != "minmax":
        scale, _ = compute_scale(x, fmt, gran, method)
        return fake_quantize(x, fmt, scale * clip_ratio)
    axis = gran.axis % x.ndim
    xg, size = _to_groups(x, axis, gran.group_size)
    dims = tuple(sorted([d if d < axis else d + 1 for d in gran.reduce_dims(x.ndim)] + [axis + 1]))
    if zero_point:  # the padding of a ragged group is 0, which the range holds anyway
        scale, zp = _affine_params(xg.detach().amin(dim=dims, keepdim=True), xg.detach().amax(dim=dims, keepdim=True), fmt)
        return _from_groups(fake_quantize(xg, fmt, scale, zp), axis, size)
    scale = (xg.detach().abs().amax(dim=dims, keepdim=True) * (clip_ratio / fmt.max_value)).clamp_min(_MIN_SCALE)
    return _from_groups(fake_quantize(xg, fmt, scale), axis, size)


def fake_quantize_weight(w: torch.Tensor, fmt, gran: Granularity, method: Method = "minmax") -> torch.Tensor:
    """Fake-quantize a weight tensor with scales from itself."""
    scale, zp = compute_scale(w, fmt, gran, method)
    return fake_quantize(w, fmt, scale, zp)


# ----------------------------------------------------------------------------- static activation ranges
CLIP_RATIOS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)


class StaticRanges(nn.Module):
    """Static activation scales of one layer (Q-Diffusion style): one scale per channel
    group for each named stage, shared by every sample, position (and Winograd tile /
    tap), fixed after calibration, so they cover every timestep of a diffusion model.

    Calibration runs the data through the layer twice:

    1. ``mode = "observe"``: record max |x| per group over all batches;
    2. ``mode = "search"``: accumulate, per stage, the squared quantization error of
       each clipping ratio in ``CLIP_RATIOS`` (of the observed max);

    then :meth:`freeze` keeps the ratio with the least error (per stage). While
    observing or searching the values pass through unquantized (the float model's
    activations define the ranges). The stage scales are buffers (saved with the model).
    """

    def __init__(self):
        super().__init__()
        self.mode = "observe"
        self.layer_name = ""  # for error messages
        self.stages: set[str] | None = None  # stages that use the static scales (None: all); others stay dynamic
        self.ratios: dict[str, float] = {}
        self._errors: dict[str, torch.Tensor] = {}

    def forward(self, stage: str, x: torch.Tensor, fmt, axis: int, group_size: int | None,
                keep: tuple[int, ...]) -> torch.Tensor:
        fmt = parse(fmt)
        axis = axis % x.ndim
        xg, size = _to_groups(x, axis, group_size or (1 << 30))
        keep_g = {k % x.ndim for k in keep} | {axis}
        dims = tuple(d for d in range(xg.ndim) if (d if d <= axis else d - 1) not in keep_g or d == axis + 1)
        key = f"amax_{stage}"
        if self.mode == "observe":
            amax = xg.detach().abs().amax(dim=dims, keepdim=True)
            if not torch.isfinite(amax).all():
                raise FloatingPointError(f"non-finite activations at the {stage!r} stage of layer {self.layer_name!r} "
                                         "during calibration; check the model and calibration inputs")
            old = getattr(self, key, None)
            self.register_buffer(key, amax if old is None else torch.maximum(old, amax))
            return x
        amax = getattr(self, key, None)
        if amax is None:
            raise RuntimeError(f"static range of stage {stage!r} was never calibrated; run calibration data first")
        if self.mode == "search":
            errs = torch.stack([(fake_quantize(xg.detach(), fmt, (amax * r / fmt.max_value).clamp_min(_MIN_SCALE))
                                 - xg.detach()).pow(2).sum() for r in CLIP_RATIOS])
            self._errors[stage] = self._errors.get(stage, 0) + errs.double()
            return x
        scale = (amax.to(x.dtype) / fmt.max_value).clamp_min(_MIN_SCALE)
        return _from_groups(fake_quantize(xg, fmt, scale), axis, size)

    def freeze(self) -> dict[str, float]:
        """Apply the best clipping ratio of each stage to its scale; returns the ratios."""
        for stage, errs in self._errors.items():
            r = CLIP_RATIOS[int(torch.argmin(errs))]
            key = f"amax_{stage}"
            self.register_buffer(key, getattr(self, key) * r)
            self.ratios[stage] = r
        self._errors = {}
        self.mode = "frozen"
        return dict(self.ratios)

    def allocate(self, shapes: dict[str, torch.Size]) -> None:
        """Empty buffers of the given shapes (before loading a saved state dict)."""
        for key, shape in shapes.items():
            self.register_buffer(key, torch.empty(shape))
        self.mode = "frozen"

    def extra_repr(self) -> str:
        stages = [k[5:] for k, _ in self.named_buffers()]
        return f"stages={stages}, mode={self.mode}"
