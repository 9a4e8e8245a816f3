"""Learned rounding of weights (AdaRound, Nagel et al., ICML 2020) on any number grid.

Round-to-nearest picks, for each weight independently, the closer of its two
neighbouring grid values. AdaRound instead learns, per weight, whether to round
down or up so that the *layer output* on calibration inputs is reproduced best:

* every weight ``w`` (in units of its scale, ``u = w / scale``) lies between two
  neighbouring representable values ``lo <= u <= hi`` of the format's grid
  (:func:`neighbours`; integer grids are uniform, minifloat grids are not);
* a continuous variable ``V`` per weight gives the soft value
  ``scale * (lo + h(V) * (hi - lo))`` with the rectified sigmoid
  ``h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``, ``zeta = 1.1``,
  ``gamma = -0.1``; ``V`` starts where ``h(V)`` is the fractional position of ``u``,
  so the soft weight starts equal to the float weight;
* ``V`` minimises the layer's reconstruction error plus
  ``reg_weight * sum(1 - |2 h(V) - 1| ** beta)``, a regulariser that pushes every
  ``h`` to 0 or 1 as ``beta`` is annealed from 20 to 2 (after a warm-up without it);
* finally ``h >= 0.5`` rounds up, otherwise down: the weights lie exactly on
  ``scale * grid``.

The layer is a function ``layer_fn(x, w)`` of its input and candidate weights, so
the same code serves direct convolutions, linear layers and Winograd-domain
weights ``U = G g G^T`` (then ``layer_fn`` runs the Winograd pipeline with ``U``
replaced; :func:`rounding_problem` builds it for a ``QuantWinogradConv2d``).

Weights outside the format's range (clipped by the scale) saturate: both
neighbours are the bound, and nothing is learned for them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import FloatFormat, IntFormat, parse

__all__ = [
    "ROUNDING_MODES",
    "ZETA",
    "GAMMA",
    "neighbours",
    "rectified_sigmoid",
    "AdaRoundWeight",
    "learn_rounding",
    "RoundingProblem",
    "rounding_problem",
    "check_schedule",
    "WeightView",
    "weight_view",
    "layer_weight_format",
    "set_rounded_weight",
    "round_layer_weight",
    "reconstruction_loss",
    "winograd_layer_fn",
    "lies_on_grid",
]

ROUNDING_MODES = ("nearest", "learned")
ZETA = 1.1
GAMMA = -0.1


def _grid_format(fmt) -> IntFormat | FloatFormat:
    """The parsed format, or a ValueError when it has no finite grid to round onto."""
    if isinstance(fmt, str):
        fmt = parse(fmt)
    if not isinstance(fmt, (IntFormat, FloatFormat)) or not callable(getattr(fmt, "grid", None)):
        raise ValueError(f"learned rounding needs a number format with a finite grid (winoq.formats.IntFormat or "
                         f"FloatFormat, or a name such as 'int4' / 'fp4_e2m1'), got {fmt!r}")
    return fmt


# ----------------------------------------------------------------------------- grid neighbours
def neighbours(w_scaled: torch.Tensor, fmt) -> tuple[torch.Tensor, torch.Tensor]:
    """The two representable values of ``fmt`` around each element of ``w_scaled``.

    Returns ``(lo, hi)`` (same dtype and shape as ``w_scaled``) with
    ``lo <= w_scaled <= hi`` and no grid value strictly in between. An element
    exactly on the grid gets ``lo == hi == value``; elements beyond the range
    saturate (``lo == hi == `` the nearer bound). NaN is an error.
    """
    fmt = _grid_format(fmt)
    u = torch.as_tensor(w_scaled)
    if not u.is_floating_point():
        u = u.to(torch.get_default_dtype())
    if bool(torch.isnan(u).any()):
        raise ValueError("neighbours: the scaled weights contain NaN; fix the weights or the scale")
    ud = u.detach().to(torch.float64)
    if isinstance(fmt, IntFormat):
        lo = torch.clamp(torch.floor(ud), fmt.qmin, fmt.qmax)
        hi = torch.clamp(torch.ceil(ud), fmt.qmin, fmt.qmax)
    else:
        grid = fmt.grid().to(ud.device)
        # number of grid values <= u; the grid is sorted, unique and holds one zero
        idx = torch.searchsorted(grid, ud.contiguous(), right=True)
        last = grid.numel() - 1
        lo = grid[torch.clamp(idx - 1, 0, last)]
        hi = grid[torch.clamp(idx, 0, last)]
        below = idx == 0  # u < smallest value: saturate at the bottom
        lo = torch.where(below, grid[0], lo)
        on_grid = lo == ud
        hi = torch.where(on_grid | (idx > last), lo, hi)
        hi = torch.where(below, grid[0], hi)
    return lo.to(u.dtype), hi.to(u.dtype)


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """``h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


# ----------------------------------------------------------------------------- the soft weight
class AdaRoundWeight(nn.Module):
    """Soft-rounded weight ``scale * (lo + h(V) * (hi - lo))`` with a learnable ``V``.

    ``weight``: the float weights; ``fmt``: a format (or its name); ``scale``: the
    quantization step, broadcastable to ``weight`` (positive). Only ``V`` is a
    parameter; ``lo``, ``hi`` (grid units) and ``scale`` are buffers.
    """

    def __init__(self, weight: torch.Tensor, fmt, scale: torch.Tensor):
        super().__init__()
        self.fmt = _grid_format(fmt)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise ValueError(f"weight must be a floating-point tensor, got {type(weight).__name__}")
        weight = weight.detach()
        scale = torch.as_tensor(scale, dtype=weight.dtype, device=weight.device).detach()
        try:
            torch.broadcast_shapes(scale.shape, weight.shape)
        except RuntimeError:
            raise ValueError(f"scale of shape {tuple(scale.shape)} does not broadcast to the weight shape "
                             f"{tuple(weight.shape)}; pass one scale per group (keepdim shape)") from None
        if torch.broadcast_shapes(scale.shape, weight.shape) != weight.shape:
            raise ValueError(f"scale of shape {tuple(scale.shape)} would enlarge the weight shape {tuple(weight.shape)}")
        if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
            raise ValueError("scale must be finite and positive everywhere")
        if not bool(torch.isfinite(weight).all()):
            raise ValueError("weight has NaN/Inf values; fix the weights before learning the rounding")
        u = weight / scale
        # values within a few ulps of a grid value (e.g. each group's max, mapped onto max_value by a
        # max-based scale up to float rounding) are on the grid: never flip them, so the scale that
        # the layer recomputes from the learned weights is the same one
        near = self.fmt.round(u)
        u = torch.where((u - near).abs() <= 4 * torch.finfo(u.dtype).eps * near.abs(), near, u)
        lo, hi = neighbours(u, self.fmt)
        free = hi > lo
        frac = torch.where(free, (u - lo) / torch.where(free, hi - lo, torch.ones_like(hi)), torch.zeros_like(u))
        frac = frac.clamp(0.0, 1.0)
        # h(V) = frac  <=>  sigmoid(V) = (frac - gamma) / (zeta - gamma), always in [1/12, 11/12]
        p = (frac - GAMMA) / (ZETA - GAMMA)
        self.V = nn.Parameter(torch.log(p) - torch.log1p(-p))
        self.register_buffer("lo", lo)
        self.register_buffer("hi", hi)
        self.register_buffer("scale", scale)
        self.register_buffer("free", free)

    def h(self) -> torch.Tensor:
        return rectified_sigmoid(self.V)

    def forward(self, hard: bool = False) -> torch.Tensor:
        if hard:
            q = torch.where(self.V.detach() >= 0, self.hi, self.lo)  # h(V) >= 0.5 <=> V >= 0
            return self.scale * q
        return self.scale * (self.lo + self.h() * (self.hi - self.lo))

    def codes(self) -> torch.Tensor:
        """Hard values in grid units (exact grid values of the format)."""
        return torch.where(self.V.detach() >= 0, self.hi, self.lo)

    def regularizer(self, beta: float) -> torch.Tensor:
        """``sum(1 - |2 h - 1| ** beta)`` over the weights that have a choice (``lo < hi``)."""
        h = self.h()
        term = 1.0 - (2.0 * h - 1.0).abs().pow(beta)
        return (term * self.free).sum()

    def undecided_fraction(self, tol: float = 1e-3) -> float:
        """Fraction of the free weights whose ``h`` is not yet within ``tol`` of 0 or 1."""
        n = int(self.free.sum())
        if n == 0:
            return 0.0
        h = self.h().detach()
        und = (h > tol) & (h < 1 - tol) & self.free
        return float(und.sum()) / n

    def extra_repr(self) -> str:
        return f"{self.fmt.name}, shape={tuple(self.V.shape)}"


# ----------------------------------------------------------------------------- learning
def reconstruction_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over dim 1 (channels / features) and averaged over the rest."""
    err = (out - target).pow(2)
    return err.sum(1).mean() if err.ndim > 1 else err.mean()


def _beta_at(step: int, iters: int, warmup: float, beta: tuple[float, float]) -> float | None:
    """None during warm-up, then linear decay from beta[0] to beta[1]."""
    start = int(warmup * iters)
    if step < start:
        return None
    rel = (step - start) / max(1, iters - start)
    return beta[1] + (beta[0] - beta[1]) * max(0.0, 1.0 - rel)


def check_schedule(iters, lr, beta, warmup, reg_weight) -> None:
    """Validate the optimisation schedule shared by layer-wise and block-wise learned rounding."""
    if not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")
    if not lr > 0 or not reg_weight >= 0:
        raise ValueError(f"lr must be > 0 and reg_weight >= 0, got lr={lr!r}, reg_weight={reg_weight!r}")
    if len(beta) != 2 or not beta[0] >= beta[1] > 0:
        raise ValueError(f"beta must be (start, end) with start >= end > 0, got {beta!r}")
    if not 0 <= warmup < 1:
        raise ValueError(f"warmup must be a fraction in [0, 1), got {warmup!r}")


def _check_learning_args(weight, inputs, target, iters, lr, beta, warmup, reg_weight, batch):
    if not isinstance(inputs, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise ValueError("inputs and target must be tensors of shape (N, ...) with the same N")
    if inputs.ndim < 1 or target.ndim < 1 or inputs.shape[0] != target.shape[0] or inputs.shape[0] < 1:
        raise ValueError(f"inputs {tuple(inputs.shape)} and target {tuple(target.shape)} must be (N, ...) with the "
                         "same number N >= 1 of samples in dim 0 (target = layer_fn(inputs, float weight))")
    check_schedule(iters, lr, beta, warmup, reg_weight)
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")


def learn_rounding(weight: torch.Tensor, fmt, scale: torch.Tensor,
                   layer_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                   inputs: torch.Tensor, target: torch.Tensor, iters: int = 500, lr: float = 1e-2,
                   beta: tuple[float, float] = (20.0, 2.0), warmup: float = 0.2, reg_weight: float = 0.01,
                   batch: int = 32, seed: int = 0, return_info: bool = False):
    """Learn the rounding of ``weight`` on ``fmt``'s grid (step ``scale``) by layer-wise
    reconstruction; returns the hard quantized weights (on ``scale * grid`` exactly).

    ``layer_fn(x, w)`` computes the layer output for inputs ``x`` and candidate
    weights ``w`` (differentiably in ``w``); ``target`` is the output to match,
    usually ``layer_fn(inputs, weight)``. The loss per step, on a random batch of
    ``batch`` samples (dim 0), is :func:`reconstruction_loss` plus ``reg_weight``
    times the regulariser, whose ``beta`` is annealed linearly from ``beta[0]`` to
    ``beta[1]`` after the first ``warmup * iters`` steps (no regulariser before).

    ``return_info=True`` returns ``(weight_q, info)`` with the full-data losses of
    round-to-nearest and of the learned rounding and the undecided fraction.
    """
    _check_learning_args(weight, inputs, target, iters, lr, beta, warmup, reg_weight, batch)
    ada = AdaRoundWeight(weight, fmt, scale)
    with torch.no_grad():
        try:
            probe = layer_fn(inputs[:1], weight.detach())
        except RuntimeError as err:
            raise ValueError(f"layer_fn(inputs[:1], weight) failed for inputs of shape {tuple(inputs.shape)} and "
                             f"weight {tuple(weight.shape)}: {err}; inputs must be (N, ...) as the layer takes "
                             "them (N samples in dim 0)") from err
    if not isinstance(probe, torch.Tensor) or probe.shape[1:] != target.shape[1:]:
        got = tuple(probe.shape) if isinstance(probe, torch.Tensor) else type(probe).__name__
        raise ValueError(f"layer_fn(inputs[:1], weight) gives {got} but target has shape {tuple(target.shape)}: "
                         f"expected target of shape (N, {', '.join(map(str, got[1:])) if isinstance(got, tuple) else '...'})")
    inputs, target = inputs.detach(), target.detach()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n = inputs.shape[0]
    bsz = min(batch, n)
    opt = torch.optim.Adam([ada.V], lr=lr)
    with torch.enable_grad():
        for step in range(iters):
            idx = torch.randperm(n, generator=gen)[:bsz].to(inputs.device) if bsz < n else None
            x, t = (inputs, target) if idx is None else (inputs[idx], target[idx])
            loss = reconstruction_loss(layer_fn(x, ada(hard=False)), t)
            b = _beta_at(step, iters, warmup, beta)
            if b is not None and reg_weight > 0:
                loss = loss + reg_weight * ada.regularizer(b)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"learned rounding: non-finite loss at step {step}; lower lr or check the inputs")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        w_q = ada(hard=True).to(weight.dtype)
    if not return_info:
        return w_q
    with torch.no_grad():
        nearest = ada.scale * ada.fmt.round(weight.detach() / ada.scale)
        info = {
            "loss_nearest": float(_full_loss(layer_fn, inputs, target, nearest, bsz)),
            "loss_learned": float(_full_loss(layer_fn, inputs, target, w_q, bsz)),
            "undecided": ada.undecided_fraction(),
            "flipped": float(((w_q != nearest) & ada.free).sum()) / max(1, int(ada.free.sum())),
            "iters": iters,
        }
    return w_q, info


def _full_loss(layer_fn, inputs, target, w, bsz) -> torch.Tensor:
    """reconstruction_loss over every sample (in chunks, equal to one big batch)."""
    total, count = 0.0, 0
    for s in range(0, inputs.shape[0], bsz):
        x, t = inputs[s:s + bsz], target[s:s + bsz]
        total = total + reconstruction_loss(layer_fn(x, w), t) * x.shape[0]
        count += x.shape[0]
    return total / count


# ----------------------------------------------------------------------------- layers
@dataclass
class RoundingProblem:
    """What :func:`learn_rounding` needs for one quantized layer."""

    weight: torch.Tensor        # float weights in the domain that is quantized (U for Winograd)
    fmt: IntFormat | FloatFormat
    scale: torch.Tensor
    layer_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    inputs: torch.Tensor        # what layer_fn takes (activation-quantized inputs for direct layers)
    target: torch.Tensor


@dataclass
class WeightView:
    """A quantized layer's weights in the domain its quantizer works on (the transformed
    ``U = G' g G'^T`` of a Winograd layer, with its current transform scales), with the
    format, scale granularity and scale method the layer itself uses."""

    weight: torch.Tensor
    fmt: IntFormat | FloatFormat
    gran: object
    method: str

    def scale(self) -> torch.Tensor:
        from ..quantizers import compute_scale

        return compute_scale(self.weight, self.fmt, self.gran, self.method)[0]


def layer_weight_format(layer: nn.Module):
    """The weight format of a winoq quantized layer (None: its weights stay float)."""
    from ..modules import QuantConv2d, QuantLinear
    from ..winograd.quantized import QuantWinogradConv2d

    if isinstance(layer, QuantWinogradConv2d):
        return layer.formats.weight
    if isinstance(layer, (QuantConv2d, QuantLinear)):
        return layer.weight_format
    raise ValueError(f"expected QuantConv2d, QuantLinear or QuantWinogradConv2d, got {type(layer).__name__}")


@torch.no_grad()
def weight_view(layer: nn.Module) -> WeightView:
    """:class:`WeightView` of a quantized layer whose weights are quantized."""
    from ..modules import weight_granularity
    from ..winograd.conv import transform_2d
    from ..winograd.quantized import QuantWinogradConv2d

    fmt = layer_weight_format(layer)
    w = layer.weight.detach()
    if isinstance(layer, QuantWinogradConv2d):
        _, g, _ = layer.transforms(w.dtype, w.device)
        return WeightView(transform_2d(g, w), fmt, layer._weight_gran(), "minmax")
    return WeightView(w, fmt, weight_granularity(layer.group_size, w.ndim), "minmax")


@torch.no_grad()
def set_rounded_weight(layer: nn.Module, w_q: torch.Tensor) -> None:
    """Put weights already on the grid into the layer: a Winograd layer keeps them as its
    ``learned_u`` (used as given), a direct layer as its weight."""
    from ..winograd.quantized import QuantWinogradConv2d

    if isinstance(layer, QuantWinogradConv2d):
        layer.learned_u = w_q.detach().clone()
    else:
        layer.weight.copy_(w_q)


def _expected_input(layer) -> str:
    from ..modules import QuantLinear

    if isinstance(layer, QuantLinear):
        return f"(N, ..., {layer.in_features})"
    return f"(N, {layer.in_channels}, H, W)"


def rounding_problem(layer: nn.Module, inputs: torch.Tensor) -> RoundingProblem:
    """Weights, format, scale, ``layer_fn`` and target of a ``QuantConv2d``,
    ``QuantLinear`` or ``QuantWinogradConv2d`` on calibration ``inputs``.

    The target is the layer's full-precision result on its *quantized* input (the
    direct layers' activation quantizer; the Winograd layer's spatial input
    quantizer, then the exact convolution), so the rounding compensates the
    weight error and, for Winograd, part of the Winograd-domain activation error.
    Winograd weights are the transformed ``U = G' g G'^T`` (with the layer's
    current transform scales: learn the rounding *after* the transform scales).
    """
    from ..modules import QuantConv2d, QuantLinear
    from ..winograd.quantized import QuantWinogradConv2d

    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
        raise ValueError(f"calibration inputs must be a float tensor of shape {_expected_input(layer)}")
    if isinstance(layer, QuantWinogradConv2d):
        fmt = layer.formats.weight
        if fmt is None:
            raise ValueError("this Winograd layer keeps its weights in float (formats.weight is None): nothing to round")
        if inputs.ndim != 4 or inputs.shape[1] != layer.in_channels:
            raise ValueError(f"calibration inputs for this Winograd layer must have shape {_expected_input(layer)}, "
                             f"got {tuple(inputs.shape)}")
        from ..winograd.scales import reference_output

        x = inputs.to(layer.weight.dtype).detach()
        view = weight_view(layer)
        with torch.no_grad():
            target = reference_output(layer, x)
        return RoundingProblem(view.weight, fmt, view.scale(), winograd_layer_fn(layer), x, target)
    if isinstance(layer, (QuantConv2d, QuantLinear)):
        fmt = layer.weight_format
        if fmt is None:
            raise ValueError("this layer keeps its weights in float (weight_format is None): nothing to round")
        w = layer.weight.detach()
        linear = isinstance(layer, QuantLinear)
        if linear:
            if inputs.ndim < 2 or inputs.shape[-1] != layer.in_features:
                raise ValueError(f"calibration inputs for this linear layer must have shape {_expected_input(layer)}, "
                                 f"got {tuple(inputs.shape)}")
        elif inputs.ndim != 4 or inputs.shape[1] != layer.in_channels:
            raise ValueError(f"calibration inputs for this conv must have shape {_expected_input(layer)}, "
                             f"got {tuple(inputs.shape)}")
        x = inputs.to(w.dtype).detach()
        with torch.no_grad():
            x = layer.quantize_input(x, dynamic=True)
        scale = weight_view(layer).scale()
        bias = None if layer.bias is None else layer.bias.detach()  # no gradient reaches the layer's parameters
        if linear:
            def layer_fn(xb, wb):
                return F.linear(xb, wb, bias)
        else:
            def layer_fn(xb, wb):
                return layer._conv_forward(xb, wb, bias)
        with torch.no_grad():
            target = layer_fn(x, w)
        return RoundingProblem(w, fmt, scale, layer_fn, x, target)
    raise ValueError(f"learned rounding supports QuantConv2d, QuantLinear and QuantWinogradConv2d, "
                     f"got {type(layer).__name__}")


def winograd_layer_fn(layer: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``fn(x, u)``: the layer's full quantized Winograd pipeline on ``x`` with the
    Winograd-domain weights replaced by ``u`` (shape (K, C/groups, n, n), used as
    given, not re-quantized)."""

    def fn(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        # shadow the bound method on this instance only, for the duration of the call, and keep
        # gradients away from the layer's own parameters (bias, transforms): only u is learned
        saved = [(p, p.requires_grad) for p in layer.parameters()]
        for p, _ in saved:
            p.requires_grad_(False)
        layer.quantized_weight = lambda g: u.to(g.dtype)
        try:
            return layer(x)
        finally:
            del layer.quantized_weight
            for p, req in saved:
                p.requires_grad_(req)

    return fn


def round_layer_weight(layer: nn.Module, inputs: torch.Tensor, rounding: str = "learned", **kwargs):
    """Quantized weights of ``layer`` (in the domain its quantizer works on) with the
    chosen rounding: ``"nearest"`` (what the layer does by itself) or ``"learned"``
    (:func:`learn_rounding` on ``inputs``; ``kwargs`` go to it). Returns
    ``(weight_q, info)``; the layer itself is not modified."""
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"rounding mode {rounding!r} unknown; use one of {', '.join(map(repr, ROUNDING_MODES))}")
    prob = rounding_problem(layer, inputs)
    if rounding == "nearest":
        with torch.no_grad():
            wq = prob.scale * prob.fmt.round(prob.weight / prob.scale)
            loss = float(reconstruction_loss(prob.layer_fn(prob.inputs, wq), prob.target))
        return wq, {"loss_nearest": loss, "loss_learned": loss, "undecided": 0.0, "flipped": 0.0, "iters": 0}
    kwargs.setdefault("return_info", True)
    if not kwargs["return_info"]:
        raise ValueError("round_layer_weight always returns (weight_q, info); do not pass return_info=False")
    return learn_rounding(prob.weight, prob.fmt, prob.scale, prob.layer_fn, prob.inputs, prob.target, **kwargs)


def lies_on_grid(w_q: torch.Tensor, fmt, scale: torch.Tensor) -> bool:
    """True when every element of ``w_q`` is ``scale * v`` for a grid value ``v``."""
    fmt = _grid_format(fmt)
    q = fmt.round(w_q / scale)
    return bool(torch.equal(scale * q, w_q)) and math.isfinite(float(q.abs().max()))
