"""A dataflow (layer-pipelined, fpgaConvNet-style) FPGA accelerator model with sparse conv engines.

Every layer of the network has its own engine; images stream through the pipeline, so the
throughput is set by the slowest layer (the *bottleneck*) and resources only pay where they
shorten it. Written here rather than taken from the ``fpgaconvnet-model`` package: its every
release pins ``onnxruntime==1.7.0``, which has no wheel for the Python this project supports
(3.11+), so ``pip install fpgaconvnet-model`` fails to resolve.

Equations (cycles per image; ``ceil`` written ``⌈⌉``; factors divide the channel counts):

* conv (``C`` in, ``F`` out channels, ``k x k`` kernel, output ``H x W``; folding ``fine`` in
  ``1..k*k``, ``coarse_in | C``, ``coarse_out | F``)::

      workload  = H W (C / coarse_in) (F / coarse_out)
      window    = sum_j ⌈j / fine⌉ ws[j]        (j = 0: 1 cycle, or 0 with window skipping)
      cycles    = max(workload * window, stream)
      stream    = max(H_in W_in C / coarse_in, H W F / coarse_out)

  ``ws[j]`` is the probability of ``j`` non-zero products in a window, averaged over input
  channels (the lanes are decoupled by FIFOs, so their mean rate counts). A dense engine has
  ``ws[k*k] = 1``: ``window = ⌈k*k / fine⌉``.
  ``DSP = ⌈fine coarse_in coarse_out * p⌉`` with ``p = 1/2`` for operands of <= 8 bit (two
  multiplications packed per DSP48) and 1 otherwise.
* linear (``C`` in, ``F`` out; a 1x1 conv on one pixel, dense): ``cycles = max((C/coarse_in)
  (F/coarse_out), C/coarse_in)``, ``DSP = ⌈coarse_in coarse_out p⌉``.
* pooling (max / average, global included; ``C`` channels, input ``H_in x W_in``):
  ``cycles = H_in W_in C / coarse`` (one input word per lane per cycle), no DSP.
* elementwise (residual add; ``C`` channels, ``H x W``): ``cycles = H W C / coarse``, no DSP.

On-chip memory (BRAM36 blocks, 36 Kbit, configurable as 32Kx1 ... 512x72): a conv keeps all its
weights on chip in ``coarse_in coarse_out`` memories of width ``fine * bits`` and depth
``(C/coarse_in)(F/coarse_out)⌈k*k/fine⌉``; a ``k x k`` sliding window needs ``(k-1)`` line
buffers per ``coarse_in`` lane of depth ``W_in C / coarse_in``; linear weights as a conv with
``k = 1``; pooling windows as conv line buffers. Memories of at most
:data:`LUTRAM_MAX_BITS` bits go to distributed RAM (no BRAM). Not modelled: the FIFO that
buffers a residual branch, LUTs/FFs, off-chip bandwidth (all weights are on chip).

Pipeline throughput = ``clock / max(cycles)`` images/s; latency (one image, upper bound) =
``sum(cycles) / clock``.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

LUTRAM_MAX_BITS = 2048
BRAM36_SHAPES = ((1, 32768), (2, 16384), (4, 8192), (9, 4096), (18, 2048), (36, 1024), (72, 512))
KINDS = ("conv", "linear", "pool", "eltwise")


@dataclass(frozen=True)
class Platform:
    """An FPGA board: DSP slices, BRAM36 blocks, clock of the design (MHz)."""

    name: str
    dsp: int
    bram36: int
    clock_mhz: float

    def __post_init__(self):
        if self.dsp < 1 or self.bram36 < 1 or self.clock_mhz <= 0:
            raise ValueError(f"platform {self.name}: dsp, bram36 and clock_mhz must be positive")


PLATFORMS: dict[str, Platform] = {
    "zcu102": Platform("ZCU102", dsp=2520, bram36=912, clock_mhz=200.0),
    "u250": Platform("U250", dsp=12288, bram36=2688, clock_mhz=250.0),
}


def get_platform(name: str | Platform) -> Platform:
    if isinstance(name, Platform):
        return name
    key = str(name).strip().lower()
    if key not in PLATFORMS:
        raise ValueError(f"unknown platform {name!r}; known platforms: {', '.join(PLATFORMS)}")
    return PLATFORMS[key]


@dataclass(frozen=True)
class LayerSpec:
    """One engine of the pipeline (shapes per image)."""

    name: str
    kind: str
    c_in: int
    c_out: int
    h_in: int
    w_in: int
    h_out: int
    w_out: int
    k: int = 1          # kernel side (conv, pool)
    bits: int = 8

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"layer {self.name}: kind {self.kind!r} unknown; use one of {KINDS}")
        if min(self.c_in, self.c_out, self.h_in, self.w_in, self.h_out, self.w_out, self.k) < 1:
            raise ValueError(f"layer {self.name}: shapes must be positive")

    @property
    def taps(self) -> int:
        return self.k * self.k if self.kind == "conv" else 1

    @property
    def macs(self) -> int:
        if self.kind == "conv":
            return self.h_out * self.w_out * self.c_in * self.c_out * self.taps
        return self.c_in * self.c_out if self.kind == "linear" else 0


@dataclass(frozen=True)
class Folding:
    """Parallelism of one engine; pool/eltwise use ``coarse_in`` as their lane count."""

    fine: int = 1
    coarse_in: int = 1
    coarse_out: int = 1


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def dense_histogram(taps: int) -> list[float]:
    return [0.0] * taps + [1.0]


def window_cycles(ws: Sequence[float], fine: int, skip_zero_windows: bool = False) -> float:
    """Expected cycles of one window: ``sum_j ⌈j/fine⌉ ws[j]``, an all-zero window 1 cycle (0 when
    skipped)."""
    if fine < 1:
        raise ValueError(f"fine must be >= 1, got {fine}")
    zero = 0.0 if skip_zero_windows else 1.0
    return ws[0] * zero + sum(math.ceil(j / fine) * p for j, p in enumerate(ws) if j > 0)


def layer_cycles(spec: LayerSpec, fold: Folding, ws: Sequence[float] | None = None,
                 skip_zero_windows: bool = False) -> float:
    """Cycles per image of one engine (see the module docstring)."""
    ci, co = fold.coarse_in, fold.coarse_out
    if spec.kind == "conv":
        workload = spec.h_out * spec.w_out * (spec.c_in / ci) * (spec.c_out / co)
        win = window_cycles(ws if ws is not None else dense_histogram(spec.taps), fold.fine, skip_zero_windows)
        stream = max(spec.h_in * spec.w_in * spec.c_in / ci, spec.h_out * spec.w_out * spec.c_out / co)
        return max(workload * win, stream)
    if spec.kind == "linear":
        return max((spec.c_in / ci) * (spec.c_out / co), spec.c_in / ci)
    if spec.kind == "pool":
        return spec.h_in * spec.w_in * spec.c_in / ci
    return spec.h_out * spec.w_out * spec.c_out / ci  # eltwise


def layer_dsp(spec: LayerSpec, fold: Folding) -> int:
    if spec.kind not in ("conv", "linear"):
        return 0
    per = 0.5 if spec.bits <= 8 else 1.0
    fine = fold.fine if spec.kind == "conv" else 1
    return math.ceil(fine * fold.coarse_in * fold.coarse_out * per)


def bram36(depth: int, width_bits: int) -> int:
    """BRAM36 blocks for one memory of ``depth`` words of ``width_bits`` (0 when small enough for
    distributed RAM): the cheapest of the block's aspect ratios."""
    if depth <= 0 or depth * width_bits <= LUTRAM_MAX_BITS:
        return 0
    return min(math.ceil(width_bits / w) * math.ceil(depth / d) for w, d in BRAM36_SHAPES)


def layer_bram(spec: LayerSpec, fold: Folding) -> int:
    ci, co = fold.coarse_in, fold.coarse_out
    if spec.kind == "conv":
        depth = (spec.c_in // ci) * (spec.c_out // co) * math.ceil(spec.taps / fold.fine)
        weights = ci * co * bram36(depth, fold.fine * spec.bits)
        lines = ci * (spec.k - 1) * bram36(spec.w_in * spec.c_in // ci, spec.bits) if spec.k > 1 else 0
        return weights + lines
    if spec.kind == "linear":
        return ci * co * bram36((spec.c_in // ci) * (spec.c_out // co), spec.bits)
    if spec.kind == "pool" and spec.k > 1 and spec.h_out > 1:
        return ci * (spec.k - 1) * bram36(spec.w_in * spec.c_in // ci, spec.bits)
    return 0


def _channels(spec: LayerSpec) -> tuple[int, int]:
    """Channel counts the coarse factors must divide."""
    return (spec.c_in, spec.c_out) if spec.kind in ("conv", "linear") else (spec.c_in, 1)


@dataclass(frozen=True)
class Design:
    """An allocated pipeline: per-layer folding, cycles, DSP and BRAM, and the totals."""

    platform: Platform
    layers: tuple[LayerSpec, ...]
    folding: tuple[Folding, ...]
    cycles: tuple[float, ...]
    dsp_per_layer: tuple[int, ...]
    bram_per_layer: tuple[int, ...]
    dsp_budget: int

    @property
    def dsp(self) -> int:
        return sum(self.dsp_per_layer)

    @property
    def bram(self) -> int:
        return sum(self.bram_per_layer)

    @property
    def bottleneck(self) -> str:
        return self.layers[max(range(len(self.cycles)), key=self.cycles.__getitem__)].name

    @property
    def throughput(self) -> float:
        """Images per second."""
        return self.platform.clock_mhz * 1e6 / max(self.cycles)

    @property
    def latency_s(self) -> float:
        return sum(self.cycles) / (self.platform.clock_mhz * 1e6)

    @property
    def throughput_per_dsp(self) -> float:
        return self.throughput / max(self.dsp, 1)

    def summary(self) -> dict:
        return {"platform": self.platform.name, "throughput": self.throughput, "dsp": self.dsp,
                "bram36": self.bram, "throughput_per_dsp": self.throughput_per_dsp, "latency_s": self.latency_s,
                "bottleneck": self.bottleneck, "dsp_budget": self.dsp_budget,
                "layers": [{"name": s.name, "kind": s.kind, "fine": f.fine, "coarse_in": f.coarse_in,
                            "coarse_out": f.coarse_out, "cycles": c, "dsp": d, "bram36": b}
                           for s, f, c, d, b in zip(self.layers, self.folding, self.cycles,
                                                    self.dsp_per_layer, self.bram_per_layer)]}


def _axis_values(spec: LayerSpec, fold: Folding) -> list[list[Folding]]:
    """Per parallelism axis, the foldings beyond ``fold`` in increasing order (fine: +1 up to
    ``k*k``; coarse: the next divisors of the channel counts)."""
    c_in, c_out = _channels(spec)
    axes = []
    if spec.kind == "conv":
        axes.append([replace(fold, fine=f) for f in range(fold.fine + 1, spec.taps + 1)])
    axes.append([replace(fold, coarse_in=d) for d in divisors(c_in) if d > fold.coarse_in])
    if spec.kind in ("conv", "linear"):
        axes.append([replace(fold, coarse_out=d) for d in divisors(c_out) if d > fold.coarse_out])
    return [a for a in axes if a]


def _next_values(spec: LayerSpec, fold: Folding, ws, skip: bool) -> list[Folding]:
    """Per axis, the least-parallel folding beyond ``fold`` that takes fewer cycles (a dense
    ``fine`` of 4 is no faster than 3 on a 3x3 window: ``⌈9/4⌉ = ⌈9/3⌉``, so step to 5)."""
    now = layer_cycles(spec, fold, ws, skip)
    out = []
    for values in _axis_values(spec, fold):
        nxt = next((f for f in values if layer_cycles(spec, f, ws, skip) < now), None)
        if nxt is not None:
            out.append(nxt)
    return out


def allocate(layers: Sequence[LayerSpec], platform: str | Platform,
             histograms: Mapping[str, Sequence[float]] | None = None, dsp_fraction: float = 1.0,
             skip_zero_windows: bool = False, best_per_dsp: bool = False) -> Design:
    """Greedy fpgaConvNet-style allocation: start every engine at folding 1, then repeatedly give the
    bottleneck engine the next faster folding along one axis (fine, coarse_in, coarse_out) with the
    largest cycle reduction per added DSP that fits the budget (``dsp_fraction`` of the platform's DSPs, all its BRAM); stop when the
    bottleneck cannot be sped up. ``histograms``: conv name -> ``ws`` (mean over input channels);
    convs without one are dense engines. ``best_per_dsp``: return the state along this path with
    the most images/s per DSP instead of the last (the best design of any smaller DSP budget)."""
    plat = get_platform(platform)
    if not 0 < dsp_fraction <= 1:
        raise ValueError(f"dsp_fraction must be in (0, 1], got {dsp_fraction}")
    if not layers:
        raise ValueError("no layers to allocate")
    hists = dict(histograms or {})
    budget = int(plat.dsp * dsp_fraction)
    fold = [Folding() for _ in layers]
    ws = [hists.get(s.name) if s.kind == "conv" else None for s in layers]
    cyc = [layer_cycles(s, f, w, skip_zero_windows) for s, f, w in zip(layers, fold, ws)]
    dsp = [layer_dsp(s, f) for s, f in zip(layers, fold)]
    bram = [layer_bram(s, f) for s, f in zip(layers, fold)]
    if sum(dsp) > budget or sum(bram) > plat.bram36:
        raise ValueError(f"the smallest design ({sum(dsp)} DSP, {sum(bram)} BRAM36) does not fit {plat.name} "
                         f"({budget} DSP at dsp_fraction={dsp_fraction}, {plat.bram36} BRAM36)")
    def snapshot():
        return Design(plat, tuple(layers), tuple(fold), tuple(cyc), tuple(dsp), tuple(bram), budget)

    best_state = snapshot()
    while True:
        b = max(range(len(layers)), key=cyc.__getitem__)
        best = None
        for cand in _next_values(layers[b], fold[b], ws[b], skip_zero_windows):
            c = layer_cycles(layers[b], cand, ws[b], skip_zero_windows)
            d, m = layer_dsp(layers[b], cand), layer_bram(layers[b], cand)
            if c >= cyc[b] or sum(dsp) - dsp[b] + d > budget or sum(bram) - bram[b] + m > plat.bram36:
                continue
            gain = (cyc[b] - c) / max(d - dsp[b], 0.5)
            if best is None or gain > best[0]:
                best = (gain, cand, c, d, m)
        if best is None:
            break
        _, fold[b], cyc[b], dsp[b], bram[b] = best
        if best_per_dsp and (plat.clock_mhz * 1e6 / max(cyc)) / max(sum(dsp), 1) > best_state.throughput_per_dsp:
            best_state = snapshot()
    return best_state if best_per_dsp else snapshot()


# ----------------------------------------------------------------------------- mapping a model
_FREE_FUNCTIONS = {F.relu, torch.relu, F.pad, torch.flatten, F.dropout, operator.getitem, getattr,
                   F.batch_norm, torch.Tensor.flatten, F.relu6, F.hardtanh}
_FREE_METHODS = {"flatten", "view", "reshape", "relu", "size", "contiguous", "squeeze", "unsqueeze", "dim"}
_FREE_MODULES = (nn.ReLU, nn.ReLU6, nn.BatchNorm2d, nn.BatchNorm1d, nn.Identity, nn.Flatten, nn.Dropout)
_POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_POOL_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
_ADD_FUNCTIONS = {operator.add, torch.add, operator.iadd}


def _shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def map_model(model: nn.Module, example: torch.Tensor, bits: int = 8) -> list[LayerSpec]:
    """The pipeline's engines of ``model`` (traced with ``torch.fx`` on ``example`` [1, C, H, W]):
    convs (groups=1), linears, pools and residual adds; ReLU, batch norm (folded), padding,
    slicing and reshapes cost nothing. Anything else is an error naming every such layer."""
    from torch.fx import symbolic_trace
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        gm = symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 -- fx raises many kinds
        raise ValueError(f"cannot trace the model with torch.fx to map it onto the accelerator: {exc}") from exc
    ShapeProp(gm).propagate(example[:1])
    modules = dict(gm.named_modules())
    specs, unmapped = [], []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        out = _shape(node)
        src = node.args[0] if node.args and hasattr(node.args[0], "meta") else None
        inp = _shape(src) if src is not None else None
        name = node.target if node.op == "call_module" else node.name
        if node.op == "call_module":
            mod = modules[node.target]
            if isinstance(mod, nn.Conv2d) and mod.groups == 1 and len(inp) == 4:
                specs.append(LayerSpec(name, "conv", inp[1], out[1], inp[2], inp[3], out[2], out[3],
                                       k=_square_kernel(name, mod.kernel_size), bits=bits))
            elif isinstance(mod, nn.Linear):
                specs.append(LayerSpec(name, "linear", mod.in_features, mod.out_features, 1, 1, 1, 1, bits=bits))
            elif isinstance(mod, _POOL_MODULES) and len(inp) == 4:
                specs.append(_pool_spec(name, inp, out, bits))
            elif not isinstance(mod, _FREE_MODULES):
                unmapped.append(f"{name} ({type(mod).__name__}{', groups=%d' % mod.groups if isinstance(mod, nn.Conv2d) else ''})")
        elif node.op == "call_function":
            if node.target in _POOL_FUNCTIONS and inp is not None and len(inp) == 4:
                specs.append(_pool_spec(name, inp, out, bits))
            elif node.target in _ADD_FUNCTIONS and all(hasattr(a, "meta") for a in node.args[:2]) and out is not None:
                c = out[1] if len(out) > 1 else 1
                h, w = (out[2], out[3]) if len(out) == 4 else (1, 1)
                specs.append(LayerSpec(name, "eltwise", c, c, h, w, h, w, bits=bits))
            elif node.target not in _FREE_FUNCTIONS and not (node.target in _ADD_FUNCTIONS):
                unmapped.append(f"{name} ({getattr(node.target, '__name__', node.target)})")
        elif node.op == "call_method" and node.target not in _FREE_METHODS:
            unmapped.append(f"{name} (.{node.target}())")
    if unmapped:
        raise ValueError(f"the accelerator model cannot map these layers: {', '.join(unmapped)}; supported: conv2d "
                         f"(groups=1, square kernel), linear, max/avg pooling, residual add, relu, batch norm, "
                         f"padding, slicing, reshapes")
    return specs


def _square_kernel(name: str, ks) -> int:
    if ks[0] != ks[1]:
        raise ValueError(f"the accelerator model cannot map layer {name}: kernel {tuple(ks)} is not square")
    return ks[0]


def _pool_spec(name: str, inp, out, bits: int) -> LayerSpec:
    k = max(1, inp[2] // max(out[2], 1))
    return LayerSpec(name, "pool", inp[1], out[1], inp[2], inp[3], out[2], out[3], k=k, bits=bits)
