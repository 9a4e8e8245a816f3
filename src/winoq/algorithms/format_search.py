"""Choice of the minifloat format for a weight tensor at a given bit width.

At ``bits`` total bits (one sign bit), the exponent / mantissa split ExMy
(``E + M = bits - 1``) trades range for resolution: for Gaussian-like weights at
4 bits, e2m1 beats e3m0 (and usually e1m2, a uniform grid, except for small
groups whose max is close to the bulk). :func:`search_fp_format` tries the splits
(and optionally exponent biases) and keeps the one with the least quantization
error of the weight, or of the layer output when ``layer_fn`` and ``inputs`` are
given. The split is chosen per tensor; the scales follow the granularity
(one per tensor, channel or group).

Scaling (``scaling``):

* ``"max"`` (default): the scale maps the largest magnitude of each scale group to
  the format's ``max_value`` (``compute_scale`` with ``method``). A different
  exponent bias multiplies the whole grid by a power of two, which the scale
  absorbs exactly, so with this scaling the bias never changes the result: only
  the split matters (the default bias is kept).
* ``"none"``: no scale (scale 1, per tensor): the exponent bias alone places the
  format's range, as for formats applied without scaling. Biases are then
  searched around the one whose range just covers ``max|w|``; with
  ``saturate=False`` a candidate whose largest value is below ``max|w|`` is
  rejected, and when none is left a ValueError says how to fix it.

Candidates are ``FloatFormat(E, M, bias=..., special="finite")`` (every code a
finite number, the OCP MX convention for narrow formats).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from ..formats import FloatFormat, parse
from ..quantizers import Granularity, compute_scale, fake_quantize

__all__ = ["fp_splits", "search_fp_format", "choose_layer_format", "set_layer_weight_format", "METRICS", "SCALINGS", "MIN_BITS", "MAX_BITS"]

METRICS = ("mse", "mae")
SCALINGS = ("max", "none")
MIN_BITS, MAX_BITS = 3, 8


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an int in {MIN_BITS}..{MAX_BITS} (sign + exponent + mantissa of a minifloat), "
                         f"got {bits!r}; for 2 bits use an integer format (int2), above 8 bits use int or fp16/bf16")
    return bits


def fp_splits(bits: int) -> list[tuple[int, int]]:
    """Every ExMy split of a signed ``bits``-bit minifloat: (E, bits - 1 - E) for E >= 1."""
    _check_bits(bits)
    return [(e, bits - 1 - e) for e in range(1, bits)]


def _default_bias(exp_bits: int) -> int:
    return (1 << (exp_bits - 1)) - 1


def _base_formats(bits: int, candidates) -> list[FloatFormat]:
    """Parse the candidates into FloatFormats of ``bits`` bits (signed)."""
    if candidates is None:
        return [FloatFormat(e, m, special="finite") for e, m in fp_splits(bits)]
    if isinstance(candidates, (str, FloatFormat)) or (
            isinstance(candidates, tuple) and candidates and all(isinstance(v, int) for v in candidates)):
        candidates = [candidates]  # one candidate given bare
    out = []
    for c in candidates:
        if isinstance(c, tuple):
            if len(c) != 2 or not all(isinstance(v, int) for v in c):
                raise ValueError(f"candidate {c!r}: give (exp_bits, man_bits), a format name or a FloatFormat")
            fmt = FloatFormat(c[0], c[1], special="finite")
        else:
            fmt = parse(c)
        if not fmt.is_float:
            raise ValueError(f"candidate {fmt.name} is an integer format; search_fp_format chooses between minifloats")
        if not fmt.signed:
            raise ValueError(f"candidate {fmt.name} is unsigned; weights need a signed format")
        if fmt.bits != bits:
            raise ValueError(f"candidate {fmt.name} has {fmt.bits} bits, not the requested {bits}; "
                             f"valid splits for {bits} bits: {', '.join(f'e{e}m{m}' for e, m in fp_splits(bits))}")
        out.append(fmt)
    if not out:
        raise ValueError("candidates is empty; pass None to try every split")
    return out


def _with_bias(fmt: FloatFormat, bias: int) -> FloatFormat | None:
    try:
        return FloatFormat(fmt.exp_bits, fmt.man_bits, bias=bias, signed=fmt.signed,
                           subnormals=fmt.subnormals, special=fmt.special)
    except ValueError:  # outside the float32 range: not a usable candidate
        return None


def search_fp_format(w: torch.Tensor, bits: int, gran: Granularity = Granularity(), candidates=None,
                     biases: Iterable[int] | None = None, metric: str = "mse", *,
                     layer_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                     inputs: torch.Tensor | None = None, scaling: str = "max", method: str = "minmax",
                     saturate: bool = True, return_table: bool = False):
    """Best minifloat format of ``bits`` bits for ``w``: returns ``(fmt, scale, err)``
    (and the table ``[(fmt.name, err), ...]`` of every candidate tried when
    ``return_table``).

    gran: granularity of the scales (the split is one per tensor).
    candidates: None (every split ExMy, E >= 1) or an iterable of (E, M) pairs,
        format names or FloatFormats of ``bits`` bits.
    biases: exponent-bias *offsets* from each candidate's own bias to try (None:
        no offset with ``scaling="max"``, where the bias is absorbed by the scale;
        a range around the bias that just covers ``max|w|`` with ``scaling="none"``).
    metric: "mse" (mean squared error) or "mae" (mean absolute error) of the
        weight, or of ``layer_fn(inputs, w_q)`` against ``layer_fn(inputs, w)``
        when ``layer_fn`` and ``inputs`` are given.
    scaling, method, saturate: see the module docstring; ``method`` is the
        ``compute_scale`` method of ``scaling="max"`` ("minmax", "percentile", "mse").
    ``scale`` is broadcastable to ``w`` (a 0-dim one for ``scaling="none"``).
    """
    bits = _check_bits(bits)
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.numel() == 0:
        raise ValueError("w must be a non-empty floating-point tensor")
    w = w.detach()
    if not bool(torch.isfinite(w).all()):
        raise ValueError("w has NaN/Inf values; fix the weights before choosing a format")
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r} unknown; use one of {', '.join(map(repr, METRICS))}")
    if scaling not in SCALINGS:
        raise ValueError(f"scaling {scaling!r} unknown; use one of {', '.join(map(repr, SCALINGS))}")
    if not isinstance(gran, Granularity):
        raise ValueError(f"gran must be a winoq.quantizers.Granularity, got {type(gran).__name__}")
    if scaling == "none" and gran.kind != "tensor":
        raise ValueError("scaling='none' applies no scale at all, so gran must be per-tensor "
                         "(use scaling='max' for per-channel or group-wise scales)")
    if (layer_fn is None) != (inputs is None):
        raise ValueError("pass both layer_fn and inputs to measure the layer-output error, or neither for the weight error")

    if metric == "mse":
        def dist(a, b):
            return float((a - b).double().pow(2).mean())
    else:
        def dist(a, b):
            return float((a - b).double().abs().mean())

    if layer_fn is None:
        def error(wq):
            return dist(wq, w)
    else:
        with torch.no_grad():
            ref = layer_fn(inputs, w)

        def error(wq):
            with torch.no_grad():
                return dist(layer_fn(inputs, wq), ref)

    amax = float(w.abs().max())
    offsets = None if biases is None else [int(b) for b in biases]
    if offsets is not None and not offsets:
        raise ValueError("biases is empty; pass None for the default")
    table: list[tuple[str, float]] = []
    best = None
    rejected = []
    for base in _base_formats(bits, candidates):
        if scaling == "max":
            offs = offsets if offsets is not None else [0]
        elif offsets is not None:
            offs = offsets
        else:
            # offset d multiplies the range by 2^-d; d_fit is the largest offset that still covers amax
            d_fit = math.floor(math.log2(base.max_value / amax)) if amax > 0 else 0
            offs = range(d_fit - 2, d_fit + 3)
        for d in offs:
            fmt = _with_bias(base, base.bias + d)
            if fmt is None:
                continue
            if scaling == "max":
                scale, _ = compute_scale(w, fmt, gran, method)
            else:
                if not saturate and fmt.max_value < amax:
                    rejected.append(fmt)
                    continue
                scale = torch.ones((), dtype=w.dtype, device=w.device)
            with torch.no_grad():
                err = error(fake_quantize(w, fmt, scale))
            table.append((fmt.name, err))
            if best is None or err < best[2]:
                best = (fmt, scale, err)
    if best is None:
        if rejected:
            top = max(rejected, key=lambda f: f.max_value)
            raise ValueError(
                f"no {bits}-bit candidate can represent max|w| = {amax:g} without saturation (largest tried: "
                f"{top.name} with max {top.max_value:g}); allow saturation (saturate=True), pass smaller bias offsets "
                f"(biases=...), more exponent bits or bits, or use scaling='max'")
        raise ValueError("no usable candidate: every split/bias combination is outside the float32 range; "
                         "pass smaller bias offsets (biases=...)")
    return (*best, table) if return_table else best


def choose_layer_format(layer, inputs: torch.Tensor | None = None, candidates=None):
    """Best minifloat split for a quantized layer's weights at the bit width of its
    current weight format: by weight MSE (``inputs`` None, data-free) or by the MSE
    of the layer output on ``inputs``. Winograd layers are searched on their
    transformed weights U with their own scale granularity. Returns ``(fmt, table)``;
    the layer is not modified."""
    from .adaround import layer_weight_format, rounding_problem, weight_view

    try:
        fmt = layer_weight_format(layer)
    except ValueError:
        raise ValueError(f"format search supports winoq's quantized layers, got {type(layer).__name__}") from None
    if fmt is None or not fmt.is_float:
        raise ValueError(f"format search chooses between minifloat splits; this layer's weights are "
                         f"{getattr(fmt, 'name', 'float')}: use an fp weight format (e.g. 'fp4_e2m1')")
    view = weight_view(layer)
    w, gran, kw = view.weight, view.gran, {}
    if inputs is not None:
        prob = rounding_problem(layer, inputs)
        w, kw = prob.weight, {"layer_fn": prob.layer_fn, "inputs": prob.inputs}
    best, _, _, table = search_fp_format(w, fmt.bits, gran, candidates, return_table=True, **kw)
    return best, table


def set_layer_weight_format(layer, fmt) -> None:
    """Give a quantized layer another weight format (its cached quantized weights are dropped)."""
    from .adaround import _quantized_layer

    _quantized_layer(layer).set_weight_format(fmt)
