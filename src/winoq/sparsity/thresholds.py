"""Per-layer weight and activation thresholds, fixed-point quantization and the sparsity they give.

Knobs (HASS, Yu et al., FPL 2024), per conv layer:

* ``tau_w``: ``w := 0`` where ``|w| < tau_w`` (absolute threshold on the conv's float weights);
* ``tau_a``: the ReLU feeding the conv becomes ``x [x > tau_a]``.  It is applied to the conv's
  input: a conv whose input is never negative on the calibration data is *ReLU-fed* (then
  ``x [x > tau] == ReLU_tau(z)`` exactly for ``x = ReLU(z)``, ``tau >= 0``). Other convs (the
  first conv on normalised images) take no activation threshold and keep their input's natural
  sparsity. The threshold acts on what the conv engine reads; a residual branch that forks off
  the same ReLU keeps the unthresholded values.

Both are combined with the project's fixed-point quantization (``bits`` 8 or 16, or ``None`` for
float): weights symmetric per output channel (``winoq.quantizers``, scale from the unthresholded
weights), conv inputs per tensor with a static scale from the calibration data (unsigned for
ReLU-fed inputs). Values that round to zero count as zeros: quantization adds sparsity too.

Measured per conv on calibration data (:class:`LayerStats`): weight, activation and product
sparsity and, per input channel ``c``, the histogram ``hist[c, j]`` of the probability that a
``k x k`` window holds ``j`` non-zero products ``w[f, c] * x[c]`` (over images, output positions
and filters ``f``; zero padding counts as zero activations) -- the input of the sparse conv
engine model in :mod:`winoq.sparsity.accelerator`.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..formats import IntFormat
from ..quantizers import compute_scale, fake_quantize, per_channel

SUPPORTED_BITS = (8, 16, None)


def _check_tau(kind: str, name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{kind}[{name!r}] = {value} is out of range: thresholds must be finite and >= 0")
    return value


@dataclass(frozen=True)
class SparsityConfig:
    """Per-layer thresholds (layer name -> value; absent layers: 0) and the fixed-point width.

    ``tau_w`` / ``tau_a`` are stored as sorted tuples of ``(name, value)`` so the config is
    hashable; pass dicts. ``bits``: 8, 16 or ``None`` (float)."""

    tau_w: Mapping[str, float] | tuple = field(default_factory=dict)
    tau_a: Mapping[str, float] | tuple = field(default_factory=dict)
    bits: int | None = 8

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS} (fixed point 8 or 16 bit, None = float), got {self.bits!r}")
        for attr in ("tau_w", "tau_a"):
            items = dict(getattr(self, attr)).items()
            object.__setattr__(self, attr, tuple(sorted((str(k), _check_tau(attr, k, v)) for k, v in items)))

    def w(self, name: str) -> float:
        return dict(self.tau_w).get(name, 0.0)

    def a(self, name: str) -> float:
        return dict(self.tau_a).get(name, 0.0)

    @classmethod
    def uniform(cls, layers, tau_w: float, tau_a: float, bits: int | None = 8) -> "SparsityConfig":
        """One ``tau_w`` for every conv and one ``tau_a`` for every ReLU-fed conv of ``layers``."""
        return cls({l.name: tau_w for l in layers},
                   {l.name: tau_a for l in layers if l.relu_fed}, bits)


@dataclass(frozen=True)
class ConvInfo:
    """A conv layer the thresholds act on: name, module and whether its input is ReLU-fed."""

    name: str
    module: nn.Conv2d
    relu_fed: bool
    max_abs_weight: float
    input_scale: float | None  # static per-tensor activation scale (None when bits is None)


@dataclass
class LayerStats:
    """Sparsity of one conv on the calibration images (fractions of zeros in [0, 1])."""

    name: str
    weight_sparsity: float
    activation_sparsity: float
    product_sparsity: float
    hist: torch.Tensor  # [C_in, k*k + 1] float64, rows sum to 1
    macs: int            # dense multiply-accumulates per image

    def as_dict(self) -> dict:
        return {"name": self.name, "weight_sparsity": self.weight_sparsity,
                "activation_sparsity": self.activation_sparsity, "product_sparsity": self.product_sparsity,
                "macs": self.macs, "hist_mean": self.hist.mean(0).tolist()}


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def _iter_batches(x: torch.Tensor, batch: int) -> Iterator[torch.Tensor]:
    for i in range(0, len(x), batch):
        yield x[i:i + batch]


def probe_convs(model: nn.Module, x: torch.Tensor, bits: int | None, batch: int = 256) -> list[ConvInfo]:
    """Which convs are ReLU-fed (input never negative on ``x``) and their static input scales."""
    convs = conv_layers(model)
    if not convs:
        raise ValueError("the model has no nn.Conv2d layer: nothing to sparsify")
    mins = {n: math.inf for n, _ in convs}
    amax = {n: 0.0 for n, _ in convs}
    hooks = []
    for name, conv in convs:
        def hook(mod, inp, name=name):
            mins[name] = min(mins[name], float(inp[0].min()))
            amax[name] = max(amax[name], float(inp[0].abs().max()))
        hooks.append(conv.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for xb in _iter_batches(x, batch):
                model(xb)
    finally:
        for h in hooks:
            h.remove()
    infos = []
    for name, conv in convs:
        relu_fed = mins[name] >= 0
        scale = None
        if bits is not None:
            fmt = IntFormat(bits, signed=not relu_fed)
            scale = max(amax[name], 1e-12) / fmt.max_value
        infos.append(ConvInfo(name, conv, relu_fed, float(conv.weight.detach().abs().max()), scale))
    return infos


def check_config(cfg: SparsityConfig, infos: list[ConvInfo]) -> None:
    """Errors for thresholds naming unknown layers, activation thresholds on convs that are not
    ReLU-fed, and weight thresholds that would zero a whole layer."""
    by_name = {i.name: i for i in infos}
    unknown = [n for n, _ in cfg.tau_w + cfg.tau_a if n not in by_name]
    if unknown:
        raise ValueError(f"thresholds for unknown conv layers {sorted(set(unknown))}; the convs are {list(by_name)}")
    not_relu = [n for n, v in cfg.tau_a if v > 0 and not by_name[n].relu_fed]
    if not_relu:
        raise ValueError(f"activation thresholds on convs whose input is not ReLU-fed (it takes negative values): "
                         f"{not_relu}; set tau_a to 0 there")
    for n, v in cfg.tau_w:
        if v >= by_name[n].max_abs_weight:
            raise ValueError(f"tau_w[{n!r}] = {v} is out of range: it is >= the layer's largest |w| "
                             f"({by_name[n].max_abs_weight:.4g}) and would zero the whole layer")


def sparse_weight(info: ConvInfo, tau_w: float, bits: int | None) -> torch.Tensor:
    """The conv's weight after the threshold and (when ``bits``) fixed-point quantization."""
    w = info.module.weight.detach()
    kept = torch.where(w.abs() < tau_w, torch.zeros_like(w), w)
    if bits is None:
        return kept
    scale, _ = compute_scale(w, IntFormat(bits), per_channel(0))  # scale from the unthresholded weight
    return fake_quantize(kept, IntFormat(bits), scale)


def sparse_input(info: ConvInfo, x: torch.Tensor, tau_a: float, bits: int | None) -> torch.Tensor:
    """The conv's input after the activation threshold and fixed-point quantization."""
    if info.relu_fed and tau_a > 0:
        x = x * (x > tau_a)
    if bits is None:
        return x
    fmt = IntFormat(bits, signed=not info.relu_fed)
    return fake_quantize(x, fmt, torch.tensor(info.input_scale, dtype=x.dtype))


def window_histogram(x: torch.Tensor, w: torch.Tensor, conv: nn.Conv2d) -> tuple[torch.Tensor, float]:
    """Counts ``[C_in, k*k + 1]`` of windows with ``j`` non-zero products, and the number of
    non-zero products, for input ``x`` [N, C, H, W] and weight ``w`` [F, C, kh, kw] (groups=1).

    Each (image, output position, filter, input channel) is one window of ``kh*kw`` products.
    For ``kh*kw <= 9`` the windows are counted by their zero patterns (a histogram of the
    ``2^(kh kw)`` activation patterns per channel times one of the weight patterns, paired by
    the popcount of their AND); larger kernels count every window directly."""
    if w.shape[2] * w.shape[3] <= MAX_PATTERN_TAPS:
        return _histogram_by_patterns(x, w, conv)
    return _histogram_direct(x, w, conv)


MAX_PATTERN_TAPS = 9


def _activation_masks(x: torch.Tensor, w: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """[C, N*L, t] non-zero masks of the input windows (padding counts as zero)."""
    n, c = x.shape[:2]
    kh, kw = w.shape[2:]
    cols = F.unfold((x != 0).to(torch.float32), (kh, kw), dilation=conv.dilation, padding=conv.padding,
                    stride=conv.stride)  # [N, C*t, L]
    length = cols.shape[-1]
    return cols.view(n, c, kh * kw, length).permute(1, 0, 3, 2).reshape(c, n * length, kh * kw)


def _histogram_direct(x, w, conv):
    c, f, t = x.shape[1], w.shape[0], w.shape[2] * w.shape[3]
    a = _activation_masks(x, w, conv)
    wm = (w != 0).to(torch.float32).permute(1, 2, 3, 0).reshape(c, t, f)      # [C, t, F]
    counts = torch.bmm(a, wm).round().to(torch.int64)                          # [C, N*L, F]
    offsets = (torch.arange(c) * (t + 1)).view(c, 1, 1)
    hist = torch.bincount((counts + offsets).flatten(), minlength=c * (t + 1)).view(c, t + 1)
    return hist.to(torch.float64), float(counts.sum())


_POPCOUNT_TABLES: dict[int, torch.Tensor] = {}


def _popcount_of_and(t: int) -> torch.Tensor:
    """[2^t, 2^t] popcount(a & b), cached per tap count."""
    if t not in _POPCOUNT_TABLES:
        codes = torch.arange(1 << t)
        bits = (codes.view(-1, 1) >> torch.arange(t)) & 1                        # [2^t, t]
        _POPCOUNT_TABLES[t] = (bits.to(torch.float64) @ bits.to(torch.float64).T).to(torch.int64)
    return _POPCOUNT_TABLES[t]


def _histogram_by_patterns(x, w, conv):
    c, f, kh, kw = w.shape[1], w.shape[0], w.shape[2], w.shape[3]
    t = kh * kw
    powers = (2 ** torch.arange(t)).to(torch.float32)
    # each window's zero pattern as a t-bit code: a depthwise conv of the non-zero mask with
    # weights 2^tap (exact in float32 for t <= 9; taps ordered as in unfold)
    code_kernel = powers.view(1, 1, kh, kw).expand(c, 1, kh, kw)
    a_codes = F.conv2d((x != 0).to(torch.float32), code_kernel, stride=conv.stride, padding=conv.padding,
                       dilation=conv.dilation, groups=c)
    a_codes = a_codes.round().to(torch.int64).transpose(0, 1).reshape(c, -1)                 # [C, N*L]
    w_codes = ((w != 0).to(torch.float32).permute(1, 0, 2, 3).reshape(c, f, t) @ powers).round().to(torch.int64)
    size = 1 << t
    offsets = (torch.arange(c) * size).view(c, 1)
    ha = torch.bincount((a_codes + offsets).flatten(), minlength=c * size).view(c, size).to(torch.float64)
    hw = torch.bincount((w_codes + offsets).flatten(), minlength=c * size).view(c, size).to(torch.float64)
    table = _popcount_of_and(t)
    hist = torch.stack([((ha @ (table == j).to(torch.float64)) * hw).sum(1) for j in range(t + 1)], 1)
    nz = float((hist * torch.arange(t + 1, dtype=torch.float64)).sum())
    return hist, nz


@dataclass
class _Collector:
    n_stats: int
    seen: dict = field(default_factory=dict)   # name -> images counted
    hist: dict = field(default_factory=dict)
    nz_products: dict = field(default_factory=dict)
    zeros_act: dict = field(default_factory=dict)
    numel_act: dict = field(default_factory=dict)
    weight_sparsity: dict = field(default_factory=dict)


@contextmanager
def sparsified(model: nn.Module, infos: list[ConvInfo], cfg: SparsityConfig,
               collector: _Collector | None = None):
    """Within the block, ``model``'s convs use thresholded, quantized weights and inputs; the
    float weights are put back afterwards. With ``collector``, window histograms are gathered on
    the first ``collector.n_stats`` images."""
    check_config(cfg, infos)
    saved, hooks = [], []
    try:
        for info in infos:
            conv = info.module
            if conv.groups != 1:
                raise ValueError(f"conv {info.name} has groups={conv.groups}: only groups=1 convs can be sparsified")
            w = sparse_weight(info, cfg.w(info.name), cfg.bits)
            saved.append((conv, conv.weight.data))
            if collector is not None:
                collector.weight_sparsity[info.name] = float((w == 0).to(torch.float64).mean())
            conv.weight.data = w
            hooks.append(conv.register_forward_pre_hook(_make_hook(info, cfg, w, collector)))
        yield
    finally:
        for h in hooks:
            h.remove()
        for conv, data in saved:
            conv.weight.data = data


def _make_hook(info: ConvInfo, cfg: SparsityConfig, w: torch.Tensor, col: _Collector | None):
    tau_a = cfg.a(info.name)

    def hook(mod, inp):
        x = sparse_input(info, inp[0], tau_a, cfg.bits)
        if col is not None:
            room = col.n_stats - col.seen.get(info.name, 0)
            if room > 0:
                xs = x[:room]
                hist, nz = window_histogram(xs, w, mod)
                name = info.name
                col.seen[name] = col.seen.get(name, 0) + len(xs)
                col.hist[name] = col.hist.get(name, 0) + hist
                col.nz_products[name] = col.nz_products.get(name, 0.0) + nz
                col.zeros_act[name] = col.zeros_act.get(name, 0) + int((xs == 0).sum())
                col.numel_act[name] = col.numel_act.get(name, 0) + xs.numel()
        return (x,) + tuple(inp[1:])

    return hook


@dataclass
class Evaluation:
    """Accuracy (top-1, %) of a sparsified model and its per-conv sparsity."""

    accuracy: float
    layers: dict[str, LayerStats]

    def mac_weighted_product_sparsity(self) -> float:
        total = sum(s.macs for s in self.layers.values())
        return sum(s.product_sparsity * s.macs for s in self.layers.values()) / total


class Evaluator:
    """Runs a model with a :class:`SparsityConfig` on labelled calibration images.

    Accuracy uses all of ``x``; the sparsity statistics the first ``n_stats`` images (default: all). ``bits`` fixes the fixed-point width of every config."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, bits: int | None = 8,
                 n_stats: int | None = None, batch: int = 256):
        if len(x) != len(y) or len(x) == 0:
            raise ValueError(f"need as many labels as calibration images (got {len(x)} images, {len(y)} labels)")
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
        self.model, self.x, self.y, self.bits = model.eval(), x, y, bits
        self.n_stats = len(x) if n_stats is None else max(1, min(n_stats, len(x)))
        self.batch = batch
        self.infos = probe_convs(model, x, bits, batch)
        self.names = [i.name for i in self.infos]
        self.relu_fed = {i.name: i.relu_fed for i in self.infos}
        self.max_abs_weight = {i.name: i.max_abs_weight for i in self.infos}

    def config(self, tau_w: Mapping[str, float] | None = None, tau_a: Mapping[str, float] | None = None) -> SparsityConfig:
        return SparsityConfig(tau_w or {}, tau_a or {}, self.bits)

    def uniform(self, tau_w: float, tau_a: float) -> SparsityConfig:
        return SparsityConfig.uniform(self.infos, tau_w, tau_a, self.bits)

    def evaluate(self, cfg: SparsityConfig) -> Evaluation:
        if cfg.bits != self.bits:
            raise ValueError(f"config has bits={cfg.bits} but the evaluator was built for bits={self.bits}")
        col = _Collector(self.n_stats)
        correct = 0
        with torch.no_grad(), sparsified(self.model, self.infos, cfg, col):
            for xb, yb in zip(_iter_batches(self.x, self.batch), _iter_batches(self.y, self.batch)):
                correct += int((self.model(xb).argmax(1) == yb).sum())
        return Evaluation(100.0 * correct / len(self.y), self._stats(col))

    def _stats(self, col: _Collector) -> dict[str, LayerStats]:
        out = {}
        for info in self.infos:
            name = info.name
            hist = col.hist[name]
            windows = float(hist.sum())
            taps = hist.shape[1] - 1
            out[name] = LayerStats(
                name=name,
                weight_sparsity=col.weight_sparsity[name],
                activation_sparsity=col.zeros_act[name] / col.numel_act[name],
                product_sparsity=1.0 - col.nz_products[name] / (windows * taps),
                hist=hist / hist.sum(1, keepdim=True),
                macs=int(windows * taps / col.seen[name]))
        return out
