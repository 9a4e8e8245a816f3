"""Data-free learning of the diagonal transform scales S_B and S_G.

Only the 2n numbers of diag(S_B) and diag(S_G) are learned (S_A = (S_B S_G)^-1
keeps the full-precision result exact). The inputs are random noise, never data:
the loss is the error of the fully quantized Winograd output against the exact
convolution of the same (input-quantized) noise.

Starting point (closed form, beyond the paper): the per-tap RMS of the transformed
noise V and of the transformed weights U are fitted by separable profiles
rho_B[a] rho_B[b] and rho_G[a] rho_G[b]; S = rho^-alpha equalizes the taps
(alpha = 1) or part of the way. The best alpha on a noise batch is kept, then a
short Adam fine-tune on fresh noise polishes it.
"""
from __future__ import annotations

import copy
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .conv import extract_tiles, transform_2d
from .quantized import QuantWinogradConv2d


NOISES = ("gaussian", "uniform", "halfnormal")
OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}
LOSSES = ("mse", "l1")


@dataclass(frozen=True)
class ScaleLearningConfig:
    steps: int = 20           # Adam steps after the closed-form start (0: closed form only)
    lr: float = 0.02
    noise: str = "gaussian"   # or "uniform"
    batch: int = 4            # noise images per step
    tiles: int = 8            # tiles per side of a noise image
    seed: int = 0
    alphas: tuple[float, ...] = (0.75, 1.0)  # full balancing (1.0) measured best on every layer tried
    optimizer: str = "adam"   # or "sgd"
    loss: str = "mse"         # relative squared error, or "l1" (relative absolute error)
    max_out_channels: int | None = 256  # learn on a random subset of this many output channels (None: all)

    def __post_init__(self):
        if self.noise not in NOISES:
            raise ValueError(f"noise {self.noise!r} unknown; use one of {', '.join(NOISES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r} unknown; use one of {', '.join(OPTIMIZERS)}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss {self.loss!r} unknown; use one of {', '.join(LOSSES)}")
        if self.steps < 0 or self.lr <= 0 or self.batch < 1 or self.tiles < 1:
            raise ValueError("steps must be >= 0 and lr, batch, tiles positive")
        if self.max_out_channels is not None and self.max_out_channels < 1:
            raise ValueError(f"max_out_channels must be a positive int or None, got {self.max_out_channels!r}")


def noise_batch(layer: QuantWinogradConv2d, cfg: ScaleLearningConfig, gen: torch.Generator) -> torch.Tensor:
    """Random images of ``cfg.tiles`` output tiles per side (for 'same' padding), drawn in
    float32 (the same draws whatever the layer's dtype) and cast to the layer's dtype."""
    shape = (cfg.batch, layer.in_channels, cfg.tiles * layer.m, cfg.tiles * layer.m)
    if cfg.noise == "gaussian":
        x = torch.randn(shape, generator=gen)
    elif cfg.noise == "halfnormal":  # non-negative, like the output of a ReLU
        x = torch.randn(shape, generator=gen).abs()
    else:
        x = torch.rand(shape, generator=gen) * 2 - 1
    return x.to(device=layer.weight.device, dtype=layer.weight.dtype)


def learning_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the scales are learned in: float64 for float64 layers, float32 otherwise
    (fp16 / bf16 lack the range and precision of the relative-error loss and its gradients)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def in_learning_dtype(layer: QuantWinogradConv2d) -> QuantWinogradConv2d:
    """The layer itself when it already has its learning dtype, else a copy in that dtype
    (the scales learned on it are copied back; the layer keeps its own dtype)."""
    dtype = learning_dtype(layer.weight.dtype)
    if layer.weight.dtype == dtype:
        return layer
    cache = layer.__dict__.pop("_u_cache", None)
    try:
        return copy.deepcopy(layer).to(dtype)
    finally:
        if cache is not None:
            layer._u_cache = cache


def reference_output(layer: QuantWinogradConv2d, x: torch.Tensor) -> torch.Tensor:
    """Exact conv of the input as the layer's first stage quantizes it."""
    fm = layer.formats
    xq = layer._fq(x, fm.input, layer._input_gran(), layer.granularity.input.zero_point)
    xp = layer.pad_input(xq)
    return F.conv2d(xp, layer.weight, layer.bias, groups=layer.groups)


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return (y - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-30)


def training_loss(y: torch.Tensor, ref: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    if kind == "l1":
        return (y - ref).abs().sum() / ref.abs().sum().clamp_min(1e-30)
    return relative_error(y, ref)


def sqnr_db(y: torch.Tensor, ref: torch.Tensor) -> float:
    return -10 * math.log10(max(float(relative_error(y.detach(), ref.detach())), 1e-30))


def separable_profile(t: torch.Tensor) -> torch.Tensor:
    """Fit rms(t[..., a, b]) ~ rho[a] rho[b] in the log domain (least squares)."""
    rms = t.detach().double().pow(2).flatten(0, -3).mean(0).sqrt().clamp_min(1e-12)
    logr = rms.log()
    row = logr.mean(1)
    return (row - logr.mean() / 2).exp()


@torch.no_grad()
def closed_form_scales(layer: QuantWinogradConv2d, x: torch.Tensor, alpha: float):
    tc = layer.tc
    xp = layer.pad_input(x.double())
    tiles = extract_tiles(xp, layer.m, layer.kernel_size, layer.output_hw(xp))
    rho_b = separable_profile(transform_2d(tc.BT, tiles))
    rho_g = separable_profile(transform_2d(tc.G, layer.weight.detach().double()))
    return rho_b.pow(-alpha), rho_g.pow(-alpha)


def output_channel_subset(layer: QuantWinogradConv2d, cfg: ScaleLearningConfig) -> QuantWinogradConv2d:
    """The layer itself, or (wide layers, ``groups == 1``) a copy restricted to a random
    subset of ``cfg.max_out_channels`` output channels. S_B and S_G are shared by every
    output channel and the loss averages over them, so a subset estimates the same
    objective at a fraction of the cost (the transformed weights U dominate it)."""
    k = cfg.max_out_channels
    if k is None or layer.groups != 1 or layer.out_channels <= k:
        return layer
    gen = torch.Generator().manual_seed(cfg.seed + 7919)
    idx = torch.randperm(layer.out_channels, generator=gen)[:k].sort().values
    cache = layer.__dict__.pop("_u_cache", None)
    try:
        proxy = copy.deepcopy(layer)
    finally:
        if cache is not None:
            layer._u_cache = cache
    proxy.weight = torch.nn.Parameter(layer.weight.detach()[idx].clone(), requires_grad=False)
    if layer.bias is not None:
        proxy.bias = torch.nn.Parameter(layer.bias.detach()[idx].clone(), requires_grad=False)
    proxy.out_channels = k
    return proxy


def learn_layer_scales(layer: QuantWinogradConv2d, cfg: ScaleLearningConfig = ScaleLearningConfig()) -> dict:
    """Learn S_B, S_G of one layer on noise. Returns SQNR (dB, on held-out noise)
    with standard scales, after the closed form, after fine-tuning, and seconds
    (measured on the output channels learned on: see :func:`output_channel_subset`)."""
    proxy = output_channel_subset(layer, cfg)
    proxy = proxy.to(learning_dtype(layer.weight.dtype)) if proxy is not layer else in_learning_dtype(layer)
    info = _learn_layer_scales(proxy, cfg)
    if proxy is not layer:
        layer.set_diagonal_scales(proxy.log_sb.detach().exp(), proxy.log_sg.detach().exp())
    info["out_channels_learned_on"] = proxy.out_channels
    return info


def _learn_layer_scales(layer: QuantWinogradConv2d, cfg: ScaleLearningConfig) -> dict:
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed)
    layer.set_diagonal_scales(torch.ones(layer.tc.n), torch.ones(layer.tc.n))
    held_out = noise_batch(layer, cfg, gen)
    with torch.no_grad():
        ref_held = reference_output(layer, held_out)
        out_held = layer(held_out)
        if not (torch.isfinite(ref_held).all() and torch.isfinite(out_held).all()):
            raise FloatingPointError("non-finite output on noise inputs (weights too large for the working dtype?)")
        sqnr_before = sqnr_db(out_held, ref_held)
        probe = noise_batch(layer, cfg, gen)
        ref_probe = reference_output(layer, probe)
        best = None
        for alpha in cfg.alphas:
            s_b, s_g = closed_form_scales(layer, probe, alpha)
            layer.set_diagonal_scales(s_b, s_g)
            err = float(relative_error(layer(probe), ref_probe))
            if best is None or err < best[0]:
                best = (err, alpha, s_b, s_g)
        layer.set_diagonal_scales(best[2], best[3])
        sqnr_closed = sqnr_db(layer(held_out), ref_held)
    if cfg.steps:
        _finetune(layer, cfg, gen)
    with torch.no_grad():
        sqnr_after = sqnr_db(layer(held_out), ref_held)
        if sqnr_after < sqnr_closed:  # keep the better of the two on held-out noise
            layer.set_diagonal_scales(best[2], best[3])
            sqnr_after = sqnr_closed
    return {"sqnr_standard_db": sqnr_before, "sqnr_closed_form_db": sqnr_closed, "sqnr_learned_db": sqnr_after,
            "alpha": best[1], "seconds": time.perf_counter() - start,
            "s_b": layer.log_sb.exp().tolist(), "s_g": layer.log_sg.exp().tolist()}


@contextmanager
def training_only(layer: torch.nn.Module, params: list[torch.nn.Parameter]):
    """Within the block only ``params`` need gradients (the layer's weights stay frozen);
    afterwards every parameter's flag is as before and ``params`` are frozen."""
    saved = [(p, p.requires_grad) for p in layer.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, req in saved:
            p.requires_grad_(req)
        for p in params:
            p.requires_grad_(False)


def _finetune(layer: QuantWinogradConv2d, cfg: ScaleLearningConfig, gen: torch.Generator) -> None:
    params = [layer.log_sb, layer.log_sg]
    opt = OPTIMIZERS[cfg.optimizer](params, lr=cfg.lr)
    with training_only(layer, params):
        for _ in range(cfg.steps):
            x = noise_batch(layer, cfg, gen)
            with torch.no_grad():
                ref = reference_output(layer, x)
            loss = training_loss(layer(x), ref, cfg.loss)
            if not torch.isfinite(loss):
                raise FloatingPointError("non-finite loss while learning the transform scales")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def learn_shared_scales(layers: list[QuantWinogradConv2d], cfg: ScaleLearningConfig = ScaleLearningConfig()) -> dict:
    """The paper's shared variant: one S_B, S_G for all layers of the same F(m, r),
    learned on the sum of the layers' relative errors."""
    if not layers:
        return {}
    n = layers[0].tc.n
    if any(l.tc.n != n or l.tc.points != layers[0].tc.points for l in layers):
        raise ValueError("shared scales need layers with the same F(m, r) and points")
    start = time.perf_counter()
    originals, layers = layers, [in_learning_dtype(l) for l in layers]
    gen = torch.Generator().manual_seed(cfg.seed)
    log_sb = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    log_sg = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    # closed-form start, as per layer: the geometric mean of the layers' balancing profiles raised
    # to the alpha (of cfg.alphas) with the least summed error on a probe batch
    with torch.no_grad():
        sbs, sgs = zip(*(closed_form_scales(l, noise_batch(l, cfg, gen), 1.0) for l in layers))
        mean_b, mean_g = torch.stack(sbs).log().mean(0), torch.stack(sgs).log().mean(0)
        probes = [(l, x, reference_output(l, x)) for l in layers for x in [noise_batch(l, cfg, gen)]]
        best = None
        for alpha in cfg.alphas:
            err = sum(float(relative_error(_forward_with(l, mean_b * alpha, mean_g * alpha, x), ref))
                      for l, x, ref in probes)
            if best is None or err < best[0]:
                best = (err, alpha)
        log_sb.copy_(mean_b * best[1])
        log_sg.copy_(mean_g * best[1])
    opt = OPTIMIZERS[cfg.optimizer]([log_sb, log_sg], lr=cfg.lr)
    for _ in range(cfg.steps):
        loss = 0.0
        for layer in layers:
            x = noise_batch(layer, cfg, gen)
            with torch.no_grad():
                ref = reference_output(layer, x)
            loss = loss + training_loss(_forward_with(layer, log_sb, log_sg, x), ref, cfg.loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for layer in originals:
        layer.set_diagonal_scales(log_sb.detach().exp(), log_sg.detach().exp())
    return {"seconds": time.perf_counter() - start, "alpha": best[1], "s_b": log_sb.exp().tolist(),
            "s_g": log_sg.exp().tolist()}


def _forward_with(layer, log_sb, log_sg, x):
    saved = layer.log_sb, layer.log_sg
    try:
        del layer.log_sb, layer.log_sg
        layer.log_sb, layer.log_sg = log_sb, log_sg  # plain tensors: gradient flows to the shared ones
        return layer(x)
    finally:
        del layer.log_sb, layer.log_sg
        layer.log_sb, layer.log_sg = saved
