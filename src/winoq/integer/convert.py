"""Conversion of a traced float model to an integer-only :class:`IntegerModel` (HAWQ-V3).

``convert(model, calib_data, config)``:

1. trace with ``torch.fx`` (an untraceable op raises an error naming it and the
   ``leaf_modules=`` fix);
2. run the float model on ``calib_data`` and record every node's range (static calibration);
3. walk the graph: fold each BatchNorm into its conv (``W' = gamma W / sigma``,
   ``b' = (b - mu) gamma / sigma + beta``), quantize weights symmetric per output channel,
   biases to int32 at ``S_w S_in``; activations are requantized by dyadic multipliers where an
   op needs codes; residual adds scale each branch by its own dyadic multiplier; global
   average pooling is an integer sum and a rounding shift; the output is dequantized once.

Activations: symmetric, ``[-(2^(b-1)-1), 2^(b-1)-1]``; post-ReLU activations of at most
``config.unsigned_max_bits`` bits are unsigned ``[0, 2^b - 1]`` with zero point 0 (4-bit, as in
HAWQ-V3); an activation's bits are the largest input bits of the layers reading it.

3x3 stride-1 convs run as integer Winograd F(m, 3) (:mod:`winoq.integer.winograd`: fixed-point
transforms with data-free learned scales, static per-tap V scales, int16 M) when
``config.winograd`` or ``config.winograd_layers`` asks for it; every other conv is a direct
integer conv (:func:`convert_conv`).
"""
from __future__ import annotations

import math
import operator
import sys
import traceback
from dataclasses import dataclass, field
from typing import Mapping

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..calibration import _calls
from . import layers as L
from .dyadic import dyadic_tensor
from .model import IntegerModel, LayerInfo
from .winograd import build_int_winograd, winograd_multiplications

__all__ = ["IntegerConfig", "IntegerConversionError", "convert", "trace", "layer_names"]


class IntegerConversionError(ValueError):
    """The model has an op or a layout the integer-only conversion cannot express."""


@dataclass(frozen=True)
class IntegerConfig:
    """How to convert a model to integer-only inference.

    weight_bits / act_bits: defaults for every conv / linear (weights; the activation it reads).
    layer_bits: per-layer overrides ``{name: bits}`` (weights and input activation) or
        ``{name: (weight_bits, act_bits)}``, e.g. a mixed-precision plan.
    first_last_8bit: keep the first and last layers at 8 bit (HAWQ-V3) unless layer_bits names them.
    unsigned_max_bits: post-ReLU activations of at most this many bits use the unsigned grid.
    act_clip: "minmax" (calibrated max) or "mse" (clipping ratio with least squared error on the
        calibration values); "auto": minmax at 8 bit and above, mse below.
    weight_clip: the same choice for each output channel's weight scale.
    calib_samples: at most this many calibration samples are run.
    winograd: output tile m of integer Winograd F(m, 3) for every eligible conv (3x3, stride 1,
        dilation 1, one group, at least ``winograd_min_channels`` input and output channels);
        None (default): every conv direct.
    winograd_layers: per-layer overrides ``{name: m or None}`` (None: direct), e.g. a joint
        tile + bits plan; a named layer skips the channel rule but must be eligible.
    winograd_min_channels: convs with fewer input or output channels stay direct (the 3-channel
        image conv: little compute, most of the error).
    winograd_v_scales: "tile" (default): V codes with a power-of-two scale per sample, tile, tap and
        group of ``winograd_group_size`` input channels, the exponent from the integer bit length
        of the group's largest |V| (block floating point: integer ops only); "static": one
        calibrated scale per tap (dyadic requantization).
    winograd_group_size: input channels per V exponent ("tile").
    winograd_v_clip: clipping of the static per-tap V scales, "mse" or "minmax".
    winograd_m_bits: bits of M before the output transform (int16 by default).
    winograd_scales: the transforms' diagonal scales, "learned" (data-free) or "standard".
    transform_bits: fractional bits of the fixed-point transforms.
    winograd_input_rows: the integer input transform: "fixed": ``round(S_B BT 2^kb)``, the learned
        S_B inside V's codes; "exact": the Toom-Cook rows as small integers with S_B in the per-tap
        scales (int16 lanes at F(2,3) / F(4,3) in the compiled step, no rounded S_B); "auto"
        (default): exact at F(2,3) and F(4,3), fixed at F(6,3), as measured (docs/results.md
        section 30: ResNet-20 F(4,3) exact 81.5 vs fixed 81.0, F(6,3) exact 77.4 vs fixed 78.7).
    layer_calib_samples: calibration samples whose full layer inputs are kept, for V and M's static
        scales and for learned rounding.
    weight_rounding: "nearest", "learned" (AdaRound: each weight rounded up or down to reproduce the
        layer's float output on the calibration inputs, ``winoq.algorithms.adaround``), or "auto"
        (default): learned below 8 bits, nearest at 8 bits and above.
    rounding_iters: optimisation steps of the learned rounding per layer.
    """

    weight_bits: int = 8
    act_bits: int = 8
    layer_bits: Mapping[str, int | tuple[int, int]] = field(default_factory=dict)
    first_last_8bit: bool = True
    unsigned_max_bits: int = 4
    act_clip: str = "auto"
    weight_clip: str = "auto"
    calib_samples: int = 256
    winograd: int | None = None
    winograd_layers: Mapping[str, int | None] = field(default_factory=dict)
    winograd_min_channels: int = 16
    winograd_v_scales: str = "tile"
    winograd_group_size: int = 32
    winograd_v_clip: str = "minmax"
    winograd_m_bits: int = 16
    winograd_scales: str = "learned"
    transform_bits: int = 10
    winograd_input_rows: str = "auto"
    layer_calib_samples: int = 64
    weight_rounding: str = "auto"
    rounding_iters: int = 300
    learn_steps: int = 20
    seed: int = 0

    def __post_init__(self):
        for name, b in (("weight_bits", self.weight_bits), ("act_bits", self.act_bits)):
            if not (isinstance(b, int) and 2 <= b <= 16):
                raise ValueError(f"{name} must be an int in [2, 16], got {b!r}")
        for k, v in dict(self.layer_bits).items():
            pair = v if isinstance(v, tuple) else (v, v)
            if len(pair) != 2 or not all(isinstance(b, int) and 2 <= b <= 16 for b in pair):
                raise ValueError(f"layer_bits[{k!r}] must be bits in [2, 16] or a (weight, act) pair, got {v!r}")
        for name, v in (("act_clip", self.act_clip), ("weight_clip", self.weight_clip)):
            if v not in ("auto", "minmax", "mse"):
                raise ValueError(f"{name} must be 'auto', 'minmax' or 'mse', got {v!r}")
        if self.calib_samples < 1:
            raise ValueError(f"calib_samples must be >= 1, got {self.calib_samples}")
        tiles = [self.winograd] + list(dict(self.winograd_layers).values())
        if any(t is not None and not (isinstance(t, int) and not isinstance(t, bool) and 2 <= t <= 6) for t in tiles):
            raise ValueError(f"Winograd tiles must be None or an int m in [2, 6] (F(m,3) uses (m+2)x(m+2) tiles of at "
                             f"most 8x8), got winograd={self.winograd!r}, winograd_layers={dict(self.winograd_layers)!r}")
        if self.winograd_v_scales not in ("tile", "static"):
            raise ValueError(f"winograd_v_scales must be 'tile' or 'static', got {self.winograd_v_scales!r}")
        if self.winograd_input_rows not in ("auto", "fixed", "exact"):
            raise ValueError(f"winograd_input_rows must be 'auto', 'fixed' or 'exact', got {self.winograd_input_rows!r}")
        if self.winograd_v_clip not in ("mse", "minmax"):
            raise ValueError(f"winograd_v_clip must be 'mse' or 'minmax', got {self.winograd_v_clip!r}")
        if self.weight_rounding not in ("auto", "nearest", "learned"):
            raise ValueError(f"weight_rounding must be 'auto', 'nearest' or 'learned', got {self.weight_rounding!r}")
        if self.winograd_scales not in ("learned", "standard"):
            raise ValueError(f"winograd_scales must be 'learned' or 'standard', got {self.winograd_scales!r}")
        for name, v, lo, hi in (("winograd_m_bits", self.winograd_m_bits, 8, 16), ("transform_bits", self.transform_bits, 4, 12),
                                ("winograd_min_channels", self.winograd_min_channels, 1, 1 << 20),
                                ("winograd_group_size", self.winograd_group_size, 1, 1 << 20),
                                ("layer_calib_samples", self.layer_calib_samples, 1, 1 << 20),
                                ("learn_steps", self.learn_steps, 0, 1 << 20),
                                ("rounding_iters", self.rounding_iters, 1, 1 << 20)):
            if not (isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi):
                raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {v!r}")

    def learned_rounding(self, weight_bits: int) -> bool:
        return self.weight_rounding == "learned" or (self.weight_rounding == "auto" and weight_bits < 8)

    def input_rows(self, tile: int) -> str:
        """The input transform's rows of an F(tile, 3) layer ("auto": exact up to F(4,3))."""
        if self.winograd_input_rows != "auto":
            return self.winograd_input_rows
        return "exact" if tile <= 4 else "fixed"

    def tile_of(self, name: str, conv: nn.Module) -> int | None:
        """The Winograd tile of layer ``name`` (None: direct); raises for a named ineligible layer."""
        from ..winograd.conv import winograd_ineligibility

        why = winograd_ineligibility(conv)
        if why is None and getattr(conv, "groups", 1) != 1:
            why = f"groups={conv.groups} (the integer Winograd layer takes ungrouped convs)"
        if why is None and conv.kernel_size[0] != 3:
            why = f"{conv.kernel_size[0]}x{conv.kernel_size[0]} kernel (integer Winograd is F(m, 3))"
        overrides = dict(self.winograd_layers)
        if name in overrides:
            if overrides[name] is not None and why is not None:
                raise ValueError(f"winograd_layers[{name!r}]: this layer cannot run as Winograd: {why}")
            return overrides[name]
        if self.winograd is None or why is not None:
            return None
        if min(conv.in_channels, conv.out_channels) < self.winograd_min_channels:
            return None
        return self.winograd

    def bits_of(self, name: str, first_or_last: bool) -> tuple[int, int]:
        v = dict(self.layer_bits).get(name)
        if v is not None:
            return v if isinstance(v, tuple) else (v, v)
        if first_or_last and self.first_last_8bit:
            return 8, 8
        return self.weight_bits, self.act_bits


# ----------------------------------------------------------------------------- tracing
class _Tracer(fx.Tracer):
    def __init__(self, leaves):
        super().__init__()
        self.leaves = set(leaves)
        self.stack: list[str] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaves or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self.stack.append(self.path_of_module(m))
        out = super().call_module(m, forward, args, kwargs)
        self.stack.pop()
        return out


def _user_frame(tb) -> str:
    """The last traceback frame outside torch: the line of model code that failed."""
    where = ""
    for frame in traceback.extract_tb(tb):
        if "/torch/" not in frame.filename.replace("\\", "/"):
            where = f"{frame.filename}:{frame.lineno}: {frame.line}"
    return where


def trace(model: nn.Module, leaf_modules=()) -> fx.GraphModule:
    """``torch.fx`` trace of ``model``; on failure an error naming the module, the line of code
    and the fix (mark that module as a leaf with ``leaf_modules=("name",)``)."""
    tracer = _Tracer(leaf_modules)
    try:
        graph = tracer.trace(model)
    except Exception as e:  # fx raises TraceError, TypeError, RuntimeError ... for untraceable code
        mod = tracer.stack[-1] if tracer.stack else ""
        line = _user_frame(sys.exc_info()[2])
        fix = (f"mark it as a leaf with leaf_modules=({mod!r},) (a leaf must then be an op the integer "
               f"conversion supports)" if mod else "rewrite the model's forward without data-dependent control flow")
        raise IntegerConversionError(
            f"torch.fx cannot trace {'module ' + repr(mod) if mod else 'the model'} "
            f"({type(e).__name__}: {e}) at {line or 'unknown location'}; {fix}") from e
    return fx.GraphModule(model, graph)


# ----------------------------------------------------------------------------- op kinds
_FUNCS = {
    F.relu: "relu", torch.relu: "relu", torch.relu_: "relu",
    operator.add: "add", torch.add: "add", operator.iadd: "add",
    torch.flatten: "flatten", F.adaptive_avg_pool2d: "avgpool", operator.getitem: "slice",
    F.pad: "pad", F.max_pool2d: "maxpool", torch.cat: "cat",
}
_METHODS = {"relu": "relu", "relu_": "relu", "add": "add", "add_": "add", "flatten": "flatten"}
_MODULES = ((nn.Conv2d, "conv"), (nn.ConvTranspose2d, "convt"), (nn.BatchNorm2d, "bn"), (nn.ReLU, "relu"), (nn.Linear, "linear"),
            (nn.AdaptiveAvgPool2d, "avgpool"), (nn.MaxPool2d, "maxpool"), (nn.Flatten, "flatten"),
            (nn.Identity, "identity"), (nn.Dropout, "identity"))
_PASS = {"relu", "maxpool", "slice", "pad", "flatten", "identity", "bn", "cat"}
_LAYERS = ("conv", "linear", "convt")
_LAYER_TYPES = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


def _unsupported(node: fx.Node, what: str) -> IntegerConversionError:
    return IntegerConversionError(
        f"op {node.name!r} ({what}) is not supported by the integer-only conversion; supported: conv2d, "
        f"batch_norm after a conv, transposed conv with kernel = stride, relu, add, channel concatenation, "
        f"linear, global average pool, max pool, slicing, zero pad, flatten")


def _kind(node: fx.Node, modules: dict) -> str:
    if node.op in ("placeholder", "output"):
        return node.op
    if node.op == "call_module":
        mod = modules[node.target]
        for cls, k in _MODULES:
            if isinstance(mod, cls):
                return k
        raise _unsupported(node, f"module {node.target!r} of type {type(mod).__name__}")
    if node.op == "call_function" and node.target in _FUNCS:
        return _FUNCS[node.target]
    if node.op == "call_method" and node.target in _METHODS:
        return _METHODS[node.target]
    raise _unsupported(node, f"{node.op} {getattr(node.target, '__name__', node.target)}")


def layer_names(model: nn.Module, leaf_modules=()) -> list[str]:
    """Names of the convs (transposed ones too) and linears in execution order (the layers a bit
    plan assigns)."""
    gm = trace(model, leaf_modules)
    mods = dict(gm.named_modules())
    return [n.target for n in gm.graph.nodes if n.op == "call_module" and isinstance(mods[n.target], _LAYER_TYPES)]


def winograd_tiles(gm: fx.GraphModule, config: IntegerConfig) -> dict[str, int]:
    """``{conv name: m}`` of the convs that run as integer Winograd F(m, 3)."""
    mods = dict(gm.named_modules())
    convs = {n.target: mods[n.target] for n in gm.graph.nodes
             if n.op == "call_module" and isinstance(mods[n.target], nn.Conv2d)}
    unknown = sorted(set(dict(config.winograd_layers)) - set(convs))
    if unknown:
        raise ValueError(f"winograd_layers names {unknown}, which are not convs of this model; its convs: {sorted(convs)}")
    tiles = {name: config.tile_of(name, conv) for name, conv in convs.items()}
    return {k: v for k, v in tiles.items() if v is not None}


def rounding_inputs(gm: fx.GraphModule, config: IntegerConfig, tiles: Mapping[str, int]) -> set[str]:
    """Names of the nodes whose values feed a direct layer with learned rounding (kept in full)."""
    mods = dict(gm.named_modules())
    layers = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(mods[n.target], _LAYER_TYPES)]
    ends = {layers[0], layers[-1]} if layers else set()
    return {n.args[0].name for n in layers
            if n.target not in tiles and config.learned_rounding(config.bits_of(n.target, n in ends)[0])}


# ----------------------------------------------------------------------------- calibration
class _Recorder(fx.Interpreter):
    """Runs the float graph and keeps, per node, the largest |value| and a random sample of values."""

    def __init__(self, gm, sample: int = 1 << 15, keep=(), keep_samples: int = 64):
        super().__init__(gm)
        self.keep, self.keep_samples = set(keep), keep_samples
        self.full: dict[str, list[torch.Tensor]] = {}
        self.amax: dict[str, float] = {}
        self.vmin: dict[str, float] = {}
        self.samples: dict[str, list[torch.Tensor]] = {}
        self.sample = sample
        self.gen = torch.Generator().manual_seed(0)

    def run_node(self, n):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            d = out.detach()
            self.amax[n.name] = max(self.amax.get(n.name, 0.0), float(d.abs().max()))
            self.vmin[n.name] = min(self.vmin.get(n.name, math.inf), float(d.min()))
            flat = d.flatten()
            idx = torch.randint(0, flat.numel(), (min(self.sample, flat.numel()),), generator=self.gen)
            self.samples.setdefault(n.name, []).append(flat[idx].float())
            if n.name in self.keep:  # the whole value: the float inputs of an integer Winograd layer
                have = sum(len(t) for t in self.full.get(n.name, []))
                if have < self.keep_samples:
                    self.full.setdefault(n.name, []).append(d[: self.keep_samples - have].clone())
        return out


def _calibrate(gm: fx.GraphModule, calib_data, max_samples: int, keep=(), keep_samples: int = 64) -> _Recorder:
    rec = _Recorder(gm, keep=keep, keep_samples=keep_samples)
    seen = 0
    with torch.no_grad():
        for args, kwargs in _calls(calib_data):
            if kwargs or len(args) != 1:
                raise IntegerConversionError("calib_data for integer conversion must give one input tensor per batch")
            x = args[0][: max_samples - seen]
            rec.run(x)
            seen += len(x)
            if seen >= max_samples:
                break
    if seen == 0:
        raise IntegerConversionError("calib_data is empty; pass a tensor of inputs or batches of them")
    return rec


def _mse_clip(values: torch.Tensor, amax: float, qmin: int, qmax: int) -> float:
    """Clipping value in [0.3, 1] x amax with least squared error on ``values``."""
    best, best_err = amax, math.inf
    for ratio in torch.linspace(0.3, 1.0, 36).tolist():
        s = amax * ratio / qmax
        err = float(((torch.round(values / s).clamp(qmin, qmax) * s - values) ** 2).sum())
        if err < best_err:
            best, best_err = amax * ratio, err
    return best


# ----------------------------------------------------------------------------- conversion state
@dataclass
class _QVal:
    """An integer value of the program: ``real = code * scale``."""

    id: int
    scale: torch.Tensor          # float64: () for activations, (1, C, 1, 1) / (1, C) for accumulators
    is_acc: bool
    qmin: int = 0
    qmax: int = 0
    bound: float = 0.0           # largest possible |code| (for overflow checks)


def activation_grid(values: torch.Tensor | list[torch.Tensor], amax: float, bits: int, unsigned: bool,
                    unsigned_max_bits: int, clip: str = "auto") -> tuple[float, int, int]:
    """(scale, qmin, qmax) of an activation's static grid: the calibrated ``amax``, or with ``clip``
    "mse" ("auto": below 8 bits) the clipping with least squared error on ``values`` (a tensor, or
    sampled pieces, joined only then); non-negative values on the unsigned grid up to
    ``unsigned_max_bits``. The integer conversion and the mixed-precision planner's activation term
    both read this rule."""
    qmin, qmax = _act_range(bits, unsigned, unsigned_max_bits)
    if (clip == "mse" or (clip == "auto" and bits < 8)) and amax > 0:
        amax = _mse_clip(torch.cat(values) if isinstance(values, list) else values, amax, qmin, qmax)
    return (amax / qmax if amax > 0 else 1.0), qmin, qmax


def _act_range(bits: int, unsigned: bool, unsigned_max_bits: int) -> tuple[int, int]:
    if unsigned and bits <= unsigned_max_bits:
        return 0, (1 << bits) - 1
    q = (1 << (bits - 1)) - 1
    return (0 if unsigned else -q), q


def _fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``W' = gamma W / sigma``, ``b' = (b - mu) gamma / sigma + beta`` in float64."""
    w = conv.weight.detach().double()
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    if bn is None:
        return w, b
    sigma = torch.sqrt(bn.running_var.double() + bn.eps)
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(sigma)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(sigma)
    w = w * (gamma / sigma).reshape(-1, *([1] * (w.ndim - 1)))
    return w, (b - bn.running_mean.double()) * gamma / sigma + beta


def _weight_scale(w: torch.Tensor, bits: int, clip: str) -> torch.Tensor:
    """Symmetric per-output-channel scale (float64, one per channel); an all-zero channel gets 1."""
    qmax = (1 << (bits - 1)) - 1
    flat = w.reshape(w.shape[0], -1)
    amax = flat.abs().amax(1)
    if clip == "mse" or (clip == "auto" and bits < 8):
        best = amax.clone()
        best_err = torch.full_like(amax, math.inf)
        for ratio in torch.linspace(0.3, 1.0, 36).tolist():
            s = (amax * ratio / qmax).clamp_min(1e-300)
            err = ((torch.round(flat / s[:, None]).clamp(-qmax, qmax) * s[:, None] - flat) ** 2).sum(1)
            better = err < best_err
            best = torch.where(better, amax * ratio, best)
            best_err = torch.where(better, err, best_err)
        amax = best
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax))


def _learned_codes(module: nn.Module, w: torch.Tensor, b: torch.Tensor, s_w: torch.Tensor, bits: int,
                   inputs: torch.Tensor, x: _QVal, iters: int) -> torch.Tensor:
    """Weight codes by learned rounding (AdaRound) on the layer's calibration inputs, as the integer
    layer sees them (quantized at ``x``'s scale), against the float layer's output."""
    from ..algorithms.adaround import learn_rounding
    from ..formats import parse

    if isinstance(module, nn.Conv2d):
        def fn(inp, weight):
            return F.conv2d(inp, weight, b.float(), module.stride, module.padding, module.dilation, module.groups)
    else:
        def fn(inp, weight):
            return F.linear(inp, weight, b.float())
    scale = float(x.scale)
    seen = (torch.round(inputs.double() / scale).clamp(x.qmin, x.qmax) * scale).float()
    wf = w.float()
    with torch.no_grad():
        target = fn(inputs.float(), wf)
    shape = (-1,) + (1,) * (w.ndim - 1)
    w_q = learn_rounding(wf, parse(f"int{bits}"), s_w.float().reshape(shape), fn, seen, target, iters=iters)
    qmax = (1 << (bits - 1)) - 1
    return torch.round(w_q.double() / s_w.reshape(shape)).clamp(-qmax, qmax)


def convert_conv(name: str, module: nn.Module, w: torch.Tensor, b: torch.Tensor, x: _QVal, bits: int,
                 clip: str, inputs: torch.Tensor | None = None, rounding_iters: int = 300
                 ) -> tuple[nn.Module, torch.Tensor, float]:
    """One conv / linear with folded float64 ``w, b`` reading codes ``x``: returns the integer
    step, its accumulator scale (per output channel) and the accumulator's worst-case |code|.
    ``inputs``: the layer's float calibration inputs, to learn the weights' rounding (else nearest)."""
    s_w = _weight_scale(w, bits, clip)
    qmax = (1 << (bits - 1)) - 1
    shape = (-1,) + (1,) * (w.ndim - 1)
    if inputs is None:
        w_q = torch.round(w / s_w.reshape(shape)).clamp(-qmax, qmax)
    else:
        w_q = _learned_codes(module, w, b, s_w, bits, inputs, x, rounding_iters)
    s_acc = s_w * float(x.scale)
    b_q = torch.round(b / s_acc)
    if float(b_q.abs().max()) > L.INT32_MAX:
        raise IntegerConversionError(f"layer {name!r}: its bias does not fit int32 at scale S_w*S_in "
                                     f"(max |bias code| {float(b_q.abs().max()):.3g}); its input scale is too fine")
    x_abs = max(abs(x.qmin), abs(x.qmax))
    bound = float((w_q.abs().reshape(w.shape[0], -1).sum(1) * x_abs + b_q.abs()).max())
    if bound >= 2 ** 32:
        raise IntegerConversionError(f"layer {name!r}: its accumulator can reach {bound:.3g}, beyond the 2^32 "
                                     f"the dyadic requantization multiplies in int64")
    wide = bound > L.INT32_MAX
    if isinstance(module, nn.Conv2d):
        step = L.IntConv2d(name, w_q, b_q, module, wide)
        s_acc = s_acc.reshape(1, -1, 1, 1)
    else:
        step = L.IntLinear(name, w_q, b_q, wide)
        s_acc = s_acc.reshape(1, -1)
    return step, s_acc, bound


class _Builder:
    def __init__(self, gm: fx.GraphModule, rec: _Recorder, config: IntegerConfig):
        self.gm, self.rec, self.cfg = gm, rec, config
        self.mods = dict(gm.named_modules())
        self.nodes = list(gm.graph.nodes)
        self.kinds = {n: _kind(n, self.mods) for n in self.nodes}
        layer_nodes = [n for n in self.nodes if self.kinds[n] in _LAYERS]
        if not layer_nodes:
            raise IntegerConversionError("the model has no conv or linear layer to convert")
        ends = {layer_nodes[0], layer_nodes[-1]}
        self.layer_bits = {n: config.bits_of(n.target, n in ends) for n in layer_nodes}
        self.tiles = winograd_tiles(gm, config)
        self.steps: list[nn.Module] = []
        self.program: list[tuple[tuple[int, ...], int]] = []
        self.env: dict[fx.Node, _QVal] = {}
        self.act_cache: dict[fx.Node, _QVal] = {}
        self.unsigned: dict[fx.Node, bool] = {}
        self.next_id = 1
        self.infos: list[LayerInfo] = []

    # -- helpers
    def _emit(self, step: nn.Module, ins: tuple[_QVal, ...], scale, is_acc, qmin=0, qmax=0, bound=0.0) -> _QVal:
        v = _QVal(self.next_id, scale, is_acc, qmin, qmax, bound if is_acc else max(abs(qmin), abs(qmax)))
        self.next_id += 1
        self.steps.append(step)
        self.program.append((tuple(i.id for i in ins), v.id))
        return v

    def value_bits(self, node: fx.Node) -> int:
        """Largest input-activation bits of the layers that read ``node`` (through pass-through ops)."""
        bits, todo, seen = [], list(node.users), set()
        while todo:
            u = todo.pop()
            if u in seen:
                continue
            seen.add(u)
            k = self.kinds[u]
            if k in _LAYERS:
                bits.append(self.layer_bits[u][1])
            elif k in _PASS:
                todo.extend(u.users)
        return max(bits) if bits else self.cfg.act_bits

    def _scale_for(self, node: fx.Node, bits: int, unsigned: bool) -> tuple[torch.Tensor, int, int]:
        amax = self.rec.amax.get(node.name)
        if amax is None:
            raise IntegerConversionError(f"op {node.name!r} was not reached on calib_data; cannot calibrate it")
        scale, qmin, qmax = activation_grid(self.rec.samples[node.name], amax, bits, unsigned,
                                            self.cfg.unsigned_max_bits, self.cfg.act_clip)
        return torch.tensor(scale, dtype=torch.float64), qmin, qmax

    def requant_to(self, node: fx.Node, src: list[_QVal], unsigned: bool, where: str, make) -> _QVal:
        """Requantize the values ``src`` to ``node``'s calibrated range; ``make(b_c_pairs, qmin, qmax)``
        builds the step from one dyadic multiplier per source."""
        scale, qmin, qmax = self._scale_for(node, self.value_bits(node), unsigned)
        pairs = [dyadic_tensor(s.scale / scale, where) for s in src]
        return self._emit(make(pairs, qmin, qmax), tuple(src), scale, False, qmin, qmax)

    def act(self, node: fx.Node) -> _QVal:
        """``node`` as activation codes (requantizing an accumulator once, cached)."""
        v = self.env[node]
        if not v.is_acc:
            return v
        if node not in self.act_cache:
            self.act_cache[node] = self.requant_to(
                node, [v], False, f"requantization after {node.name!r}",
                lambda p, lo, hi: L.Requantize(p[0][0], p[0][1], lo, hi))
        return self.act_cache[node]

    def relu_after(self, node: fx.Node) -> fx.Node | None:
        users = list(node.users)
        return users[0] if len(users) == 1 and self.kinds[users[0]] == "relu" else None

    # -- node handlers
    def build(self) -> IntegerModel:
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise IntegerConversionError(f"integer conversion needs a model with one input, got {len(placeholders)}")
        inp = placeholders[0]
        bits = self.value_bits(inp)
        scale, _, qmax = self._scale_for(inp, max(bits, 8) if self.cfg.first_last_8bit else bits, False)
        self.env[inp] = _QVal(0, scale, False, -qmax, qmax, qmax)
        self.input_scale, self.input_qmax = float(scale), qmax
        for node in self.nodes:
            if node in self.env or node.op == "placeholder":
                continue
            getattr(self, "_" + self.kinds[node])(node)
        return IntegerModel(self.input_scale, self.input_qmax, self.steps, self.program,
                            self.out_val.id, self.out_val.scale, self.infos)

    def _layer(self, node: fx.Node):
        mod = self.mods[node.target]
        users = list(node.users)
        bn = None
        if isinstance(mod, nn.Conv2d) and len(users) == 1 and self.kinds[users[0]] == "bn":
            bn = self.mods[users[0].target]
        w, b = _fold_bn(mod, bn)
        x = self.act(node.args[0])
        wb, ab = self.layer_bits[node]
        tile = self.tiles.get(node.target)
        out_numel = self.rec_shape_numel(users[0] if bn is not None else node)
        if tile is None:
            inputs = None
            if self.cfg.learned_rounding(wb):
                inputs = torch.cat(self.rec.full[node.args[0].name])
            step, s_acc, bound = convert_conv(node.target, mod, w, b, x, wb, self.cfg.weight_clip, inputs,
                                              self.cfg.rounding_iters)
            macs, algorithm = out_numel * w[0].numel(), "direct"
        else:
            step, s_acc, bound = self._winograd(node, mod, w, b, x, wb, ab, tile)
            out_hw = self.out_hw[(users[0] if bn is not None else node).name]
            macs, algorithm = winograd_multiplications(w.shape[1], w.shape[0], out_hw, tile), f"F({tile},3)"
        v = self._emit(step, (x,), s_acc, True, bound=bound)
        self.infos.append(LayerInfo(node.target, "conv" if isinstance(mod, nn.Conv2d) else "linear", wb,
                                    self.value_bits(node.args[0]), int(macs), int(w.numel()), bn is not None,
                                    step.wide, algorithm))
        self.env[node] = v
        self.unsigned[node] = False
        if bn is not None:
            self.env[users[0]] = v
            self.unsigned[users[0]] = False

    def _winograd(self, node, mod, w, b, x: _QVal, wb: int, ab: int, tile: int):
        cfg = self.cfg
        inputs = torch.cat(self.rec.full[node.args[0].name])
        step, s_acc, bound = build_int_winograd(
            node.target, mod, w, b, float(x.scale), max(abs(x.qmin), abs(x.qmax)), inputs, m=tile, weight_bits=wb,
            v_bits=ab, m_bits=cfg.winograd_m_bits, transform_bits=cfg.transform_bits, scales=cfg.winograd_scales,
            v_clip=cfg.winograd_v_clip, learn_steps=cfg.learn_steps, seed=cfg.seed,
            v_group=cfg.winograd_group_size if cfg.winograd_v_scales == "tile" else 0,
            input_rows=cfg.input_rows(tile))
        # the direct integer conv of the same layer, rescaled to the Winograd accumulator's scale: what
        # an export to a format without a Winograd operator (ONNX) runs in its place
        direct, s_direct, _ = convert_conv(node.target, mod, w, b, x, wb, cfg.weight_clip)
        rb, rc = dyadic_tensor(s_direct / s_acc, f"layer {node.target!r} (direct twin rescale)")
        step.set_direct_twin(direct, rb, rc)
        return step, s_acc, bound

    def rec_shape_numel(self, node: fx.Node) -> int:
        """Output elements per sample (channels x spatial), from the recorded shape."""
        return self.shapes[node.name]

    _conv = _linear = _layer

    def _convt(self, node: fx.Node):
        """A k x k stride-k transposed conv (U-Net upsampling) as an integer 1x1 conv to ``C_out k^2``
        channels, requantized to the node's range, then a pixel shuffle of the codes."""
        mod = self.mods[node.target]
        k = mod.kernel_size[0]
        if (mod.kernel_size != (k, k) or mod.stride != (k, k) or mod.padding != (0, 0) or mod.output_padding != (0, 0)
                or mod.dilation != (1, 1) or mod.groups != 1):
            raise _unsupported(node, f"transposed conv {node.target!r} with kernel {mod.kernel_size}, stride "
                                     f"{mod.stride}, padding {mod.padding} (only kernel = stride, no padding, one group)")
        cin, cout = mod.in_channels, mod.out_channels
        w = mod.weight.detach().double().permute(1, 2, 3, 0).reshape(cout * k * k, cin, 1, 1)  # (c, i, j) major
        b = (mod.bias.detach().double() if mod.bias is not None else torch.zeros(cout, dtype=torch.float64))
        b = b.repeat_interleave(k * k)
        conv = nn.Conv2d(cin, cout * k * k, 1)
        x = self.act(node.args[0])
        wb, _ = self.layer_bits[node]
        inputs = torch.cat(self.rec.full[node.args[0].name]) if self.cfg.learned_rounding(wb) else None
        step, s_acc, bound = convert_conv(node.target, conv, w, b, x, wb, self.cfg.weight_clip, inputs,
                                          self.cfg.rounding_iters)
        acc = self._emit(step, (x,), s_acc, True, bound=bound)
        self.infos.append(LayerInfo(node.target, "conv_transpose", wb, self.value_bits(node.args[0]),
                                    int(self.rec_shape_numel(node) * cin), int(mod.weight.numel()), False, step.wide))
        codes = self.requant_to(node, [acc], False, f"requantization after {node.name!r}",
                                lambda p, lo, hi: L.Requantize(p[0][0], p[0][1], lo, hi))
        self.env[node] = self._emit(L.PixelShuffle(k, cout), (codes,), codes.scale, False, codes.qmin, codes.qmax)
        self.unsigned[node] = False

    def _cat(self, node: fx.Node):
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, fx.Node) for t in tensors):
            raise _unsupported(node, "concatenation of something other than a list of tensors")
        if dim not in (1, -3):
            raise _unsupported(node, f"concatenation along dim {dim} (only channels, dim 1 of NCHW)")
        srcs = [self.act(t) for t in tensors]
        unsigned = all(self.unsigned.get(t, False) for t in tensors)
        self.env[node] = self.requant_to(node, srcs, unsigned, f"concatenation {node.name!r}",
                                         lambda p, lo, hi: L.IntConcat(p, lo, hi))
        self.unsigned[node] = unsigned

    def _bn(self, node):
        raise IntegerConversionError(f"BatchNorm {node.target!r} does not directly follow a conv with no other "
                                     f"users; it cannot be folded")

    def _relu(self, node):
        src = node.args[0]
        v = self.env[src]
        if v.is_acc:  # ReLU fused into the requantization: clamp at the zero point
            self.env[node] = self.requant_to(node, [v], True, f"requantization of {node.name!r}",
                                              lambda p, lo, hi: L.Requantize(p[0][0], p[0][1], lo, hi))
        else:
            self.env[node] = self._emit(L.ClampMin(), (v,), v.scale, False, max(v.qmin, 0), v.qmax)
        self.unsigned[node] = True

    def _add(self, node):
        a, b = node.args[0], node.args[1] if len(node.args) > 1 else None
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or node.kwargs:
            raise _unsupported(node, "add of a constant or with alpha")
        relu = self.relu_after(node)
        out = relu or node
        srcs = [self.env[a], self.env[b]]
        v = self.requant_to(out, srcs, relu is not None, f"residual add {node.name!r}",
                            lambda p, lo, hi: L.IntAdd(p[0][0], p[0][1], p[1][0], p[1][1], lo, hi))
        self.env[node] = v
        self.unsigned[node] = relu is not None
        if relu is not None:
            self.env[relu] = v
            self.unsigned[relu] = True

    def _avgpool(self, node):
        size = node.args[1] if node.op == "call_function" else self.mods[node.target].output_size
        if size not in (1, (1, 1), [1, 1]):
            raise _unsupported(node, f"adaptive average pool to {size} (only global pooling, output 1x1)")
        x = self.act(node.args[0])
        n = self.spatial[node.args[0].name]
        unsigned = self.unsigned.get(node.args[0], False)
        scale, qmin, qmax = self._scale_for(node, self.value_bits(node), unsigned)
        bb, cc = dyadic_tensor(x.scale / (n * scale), f"average pool {node.name!r}")
        self.env[node] = self._emit(L.IntGlobalAvgPool(bb, cc, qmin, qmax), (x,), scale, False, qmin, qmax)
        self.unsigned[node] = unsigned

    def _passthrough(self, node, step):
        x = self.act(node.args[0])
        self.env[node] = self._emit(step, (x,), x.scale, False, x.qmin, x.qmax)
        self.unsigned[node] = self.unsigned.get(node.args[0], False)

    def _maxpool(self, node):
        if node.op == "call_module":
            m = self.mods[node.target]
            args = (m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
        else:
            sig = ["kernel_size", "stride", "padding", "dilation", "ceil_mode"]
            defaults = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False}
            vals = dict(zip(sig, node.args[1:]), **node.kwargs)
            args = tuple(vals.get(k, defaults.get(k)) for k in sig)
        self._passthrough(node, L.MaxPool(*args))

    def _slice(self, node):
        idx = node.args[1]
        items = idx if isinstance(idx, tuple) else (idx,)
        if not all(isinstance(i, (slice, int)) or i is Ellipsis for i in items):
            raise _unsupported(node, f"indexing with {idx!r}")
        if any(isinstance(i, slice) and any(isinstance(p, fx.Node) for p in (i.start, i.stop, i.step)) for i in items):
            raise _unsupported(node, "slicing with traced bounds")
        self._passthrough(node, L.Slice(idx))

    def _pad(self, node):
        mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
        value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
        if mode != "constant" or value not in (None, 0, 0.0):
            raise _unsupported(node, f"pad mode={mode!r} value={value!r} (only zero padding)")
        self._passthrough(node, L.ZeroPad(node.args[1]))

    def _flatten(self, node):
        if node.op == "call_module":
            m = self.mods[node.target]
            start, end = m.start_dim, m.end_dim
        else:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        self._passthrough(node, L.Flatten(start, end))

    def _identity(self, node):
        self.env[node] = self.env[node.args[0]]
        self.unsigned[node] = self.unsigned.get(node.args[0], False)

    def _output(self, node):
        out = node.args[0]
        if not isinstance(out, fx.Node):
            raise _unsupported(node, "a model output that is not a single tensor")
        self.out_val = self.env[out]


class _Shapes(fx.Interpreter):
    """Per-node output elements per sample and spatial size (one sample)."""

    def __init__(self, gm):
        super().__init__(gm)
        self.numel, self.spatial, self.hw = {}, {}, {}

    def run_node(self, n):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.numel[n.name] = out[0].numel() if out.ndim else 1
            if out.ndim == 4:
                self.spatial[n.name] = out.shape[2] * out.shape[3]
                self.hw[n.name] = (out.shape[2], out.shape[3])
        return out


def convert(model: nn.Module, calib_data, config: IntegerConfig | None = None, *,
            leaf_modules=()) -> IntegerModel:
    """Integer-only version of ``model`` (eval mode; ``model`` is not modified).

    ``calib_data``: a tensor of inputs or an iterable of batches (``(input, target)`` pairs allowed)
    on which the activation ranges are calibrated. ``leaf_modules``: module names ``torch.fx`` must
    not trace into."""
    config = config or IntegerConfig()
    was_training = model.training
    model.eval()
    try:
        gm = trace(model, leaf_modules)
        tiles = winograd_tiles(gm, config)
        keep = {n.args[0].name for n in gm.graph.nodes if n.op == "call_module" and n.target in tiles}
        keep |= rounding_inputs(gm, config, tiles)
        rec = _calibrate(gm, calib_data, config.calib_samples, keep, config.layer_calib_samples)
        b = _Builder(gm, rec, config)
        first = next(iter(_calls(calib_data)))[0][0][:1]
        shapes = _Shapes(gm)
        with torch.no_grad():
            shapes.run(first)
        b.shapes, b.spatial, b.out_hw = shapes.numel, shapes.spatial, shapes.hw
        return b.build().eval()
    finally:
        model.train(was_training)
