"""Hutchinson estimates of each layer's Hessian trace, and HAWQ-V3 sensitivities."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..calibration import _calls

__all__ = ["TraceEstimate", "hutchinson_traces", "fisher_traces", "activation_traces", "activation_error",
           "weight_error", "sensitivities", "bits_of_choice"]


@dataclass(frozen=True)
class TraceEstimate:
    """Tr(H) of one layer's weight: the running mean of ``v^T H v`` over Rademacher ``v``."""

    trace: float
    stderr: float          # standard error of the mean (the estimate's spread)
    samples: int
    history: tuple[float, ...]  # running mean after each sample (convergence)

    @property
    def relative_spread(self) -> float:
        return self.stderr / abs(self.trace) if self.trace else math.inf


def _modules(model: nn.Module, layers: list[str], weights: bool) -> list[nn.Module]:
    """The modules named ``layers`` (with a weight when ``weights``), or a ValueError naming the first
    that is not there."""
    mods = dict(model.named_modules())
    missing = [l for l in layers if l not in mods or (weights and not hasattr(mods[l], "weight"))]
    if missing:
        raise ValueError(f"layer {missing[0]!r} is not a module{' with a weight' if weights else ''} in the model")
    return [mods[l] for l in layers]


def _batches(calib_data, max_samples: int):
    """(inputs, targets or None) with at most ``max_samples`` samples in total."""
    out, n = [], 0
    items = [calib_data] if isinstance(calib_data, torch.Tensor) else calib_data
    for item in items:
        if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], torch.Tensor):
            x, y = item
        else:
            (x,), _ = next(iter(_calls(item)))
            y = None
        x = x[: max_samples - n]
        out.append((x, None if y is None else y[: len(x)]))
        n += len(x)
        if n >= max_samples:
            break
    if not out:
        raise ValueError("calib_data is empty; pass a tensor of inputs or (input, target) batches")
    return out


def hutchinson_traces(model: nn.Module, layers: list[str], calib_data, *, tol: float = 0.02,
                      min_iters: int = 8, max_iters: int = 100, max_samples: int = 256,
                      seed: int = 0) -> dict[str, TraceEstimate]:
    """Hutchinson's estimator ``Tr(H_i) = E[v_i^T H_ii v_i]`` of the cross-entropy Hessian for the
    weight of each layer in ``layers`` (double backward; one Hessian-vector product per iteration
    serves every layer, as the ``v_i`` are independent). Targets are the labels of
    ``(input, target)`` batches, else the model's own predictions. Stops once every layer's running
    mean changes by less than ``tol`` (relative) between iterations, after ``min_iters``."""
    params = [m.weight for m in _modules(model, layers, weights=True)]
    batches = _batches(calib_data, max_samples)
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    sums = [[] for _ in layers]
    means = [0.0] * len(layers)
    try:
        grads_per_batch = []
        for x, y in batches:
            logits = model(x)
            target = y if y is not None else logits.argmax(1).detach()
            loss = F.cross_entropy(logits, target) * len(x) / sum(len(b[0]) for b in batches)
            grads_per_batch.append(torch.autograd.grad(loss, params, create_graph=True))
        for it in range(max_iters):
            vs = [torch.randint(0, 2, p.shape, generator=gen).to(p.dtype) * 2 - 1 for p in params]
            hv = [torch.zeros_like(p) for p in params]
            for grads in grads_per_batch:
                parts = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)
                hv = [a + b for a, b in zip(hv, parts)]
            old = list(means)
            for i, (v, h) in enumerate(zip(vs, hv)):
                sums[i].append(float((v * h).sum()))
                means[i] = sum(sums[i]) / len(sums[i])
            done = all(abs(m - o) <= tol * abs(m) for m, o in zip(means, old))
            if it + 1 >= min_iters and done:
                break
    finally:
        model.train(was_training)
    return {layer: _estimate(s) for layer, s in zip(layers, sums)}


def _class_weights(p: torch.Tensor, max_classes: int, gen: torch.Generator) -> list[tuple[int, torch.Tensor]]:
    """``[(class, weight per image)]`` so that ``sum weight * f(class)`` is ``E_{c ~ p} f(c)``: every
    class weighted by its probability when there are at most ``max_classes``, else ``max_classes``
    classes drawn from ``p`` per image (an unbiased Monte Carlo estimate: the exact sum would cost
    one backward pass per class, 1000 for an ImageNet model). ``p``: (N, classes)."""
    n, classes = p.shape
    if classes <= max_classes:
        return [(c, p[:, c]) for c in range(classes)]
    drawn = torch.multinomial(p.double(), max_classes, replacement=True, generator=gen)   # (N, max_classes)
    counts = torch.zeros(n, classes, dtype=torch.float64)
    counts.scatter_add_(1, drawn, torch.ones(drawn.shape, dtype=torch.float64))
    return [(int(c), counts[:, c].to(p.dtype) / max_classes) for c in drawn.unique()]


def fisher_traces(model: nn.Module, layers: list[str], calib_data, *, max_samples: int = 256,
                  max_classes: int = 16, seed: int = 0, **_ignored) -> dict[str, TraceEstimate]:
    """``Tr(F_i)`` of the Fisher information of the model's own predictive distribution for the
    weight of each layer: ``mean_x sum_c p(c|x) ||d log p(c|x) / dW_i||^2``, computed exactly per
    image (one forward, one backward per class). For softmax cross-entropy this Fisher equals the
    Gauss-Newton part of the Hessian that :func:`hutchinson_traces` estimates, and the whole Hessian
    of a model linear in the weight (tested), so it is the Hessian trace without the term
    ``sum (dL/dz) d2z/dW2``, which is small near a minimum and is what makes Hutchinson's estimates
    noisy or negative on a deep net (docs/results.md section 17: ResNet-56). It needs no random
    vectors and is never negative: its only noise is the choice of images, reported as the standard
    error over them. The labels of ``(input, target)`` batches are not used (the expectation is over
    the model's classes; over at most ``max_classes`` of them exactly, else over ``max_classes``
    classes drawn per image, see :func:`_class_weights`). ``_ignored``: Hutchinson's stopping
    options, so callers can switch estimators with the same arguments."""
    params = [m.weight for m in _modules(model, layers, weights=True)]
    images = torch.cat([x for x, _ in _batches(calib_data, max_samples)])
    was_training = model.training
    model.eval()
    per_image = [[] for _ in layers]
    gen = torch.Generator().manual_seed(seed)
    try:
        for x in images.split(1):
            logp = F.log_softmax(model(x), dim=-1)[0]
            weights = _class_weights(logp.detach().exp()[None], max_classes, gen)
            t = [0.0] * len(layers)
            for k, (c, wt) in enumerate(weights):
                grads = torch.autograd.grad(logp[c], params, retain_graph=k + 1 < len(weights))
                for i, g in enumerate(grads):
                    t[i] += float(wt[0]) * float((g.double() ** 2).sum())
            for i, v in enumerate(t):
                per_image[i].append(v)
    finally:
        model.train(was_training)
    return {layer: _estimate(s) for layer, s in zip(layers, per_image)}


def activation_traces(model: nn.Module, layers: list[str], calib_data, *, max_samples: int = 256,
                      keep: int = 1 << 15, max_classes: int = 16,
                      seed: int = 0) -> tuple[dict[str, TraceEstimate], dict[str, torch.Tensor]]:
    """Per layer: ``Tr(F_a)``, the Fisher trace of the model's predictive distribution with respect
    to the layer's *input activation* ``a`` (per image: ``sum_c p(c|x) ||d log p(c|x) / da||^2``;
    one backward per class serves every layer and image, as each image's ``a`` is its own), and up
    to ``keep`` of the activation's values, for its quantization error. ``Tr(F_a) * mse(a)`` is the
    activation's term of the sensitivity (HAWQ-V3's Omega counts only the weights, so it cannot
    tell W4A4 from W4A8). Classes as in :func:`fisher_traces` (``max_classes``)."""
    mods = dict(zip(layers, _modules(model, layers, weights=False)))
    images = torch.cat([x for x, _ in _batches(calib_data, max_samples)])
    acts: dict[str, torch.Tensor] = {}
    hooks = [mods[l].register_forward_pre_hook(lambda m, args, _l=l: acts.__setitem__(_l, args[0])) for l in layers]
    was_training = model.training
    model.eval()
    per_image = {l: [] for l in layers}
    values = {l: [] for l in layers}
    gen = torch.Generator().manual_seed(seed)
    try:
        for x in images.split(32):
            acts.clear()
            logp = F.log_softmax(model(x.clone().requires_grad_()), dim=-1)
            weights = _class_weights(logp.detach().exp(), max_classes, gen)
            t = {l: torch.zeros(len(x), dtype=torch.float64) for l in layers}
            for k, (c, wt) in enumerate(weights):
                grads = torch.autograd.grad(logp[:, c].sum(), [acts[l] for l in layers],
                                            retain_graph=k + 1 < len(weights))
                for l, g in zip(layers, grads):
                    t[l] += wt.double() * (g.double() ** 2).flatten(1).sum(1)
            for l in layers:
                per_image[l].extend(t[l].tolist())
                values[l].append(acts[l].detach().flatten())
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    kept = {}
    for l in layers:
        v = torch.cat(values[l])
        kept[l] = v[torch.randperm(len(v), generator=gen)[:keep]] if len(v) > keep else v
    return {l: _estimate(per_image[l]) for l in layers}, kept


def activation_error(values: torch.Tensor, bits: int, unsigned_max_bits: int = 4) -> float:
    """Mean squared error per element of quantizing ``values`` to ``bits`` as
    ``winoq.integer.convert`` does by default: one static scale, the calibrated max (8 bits and
    more) or the MSE-searched clipping (fewer), non-negative values on the unsigned grid up to
    ``unsigned_max_bits``."""
    from ..integer.convert import activation_grid

    v = values.double()
    amax = float(v.abs().max())
    if amax == 0:
        return 0.0
    s, qmin, qmax = activation_grid(v, amax, bits, bool(v.min() >= 0), unsigned_max_bits)
    return float(((torch.round(v / s).clamp(qmin, qmax) * s - v) ** 2).mean())


def _estimate(samples: list[float]) -> TraceEstimate:
    """Mean, its standard error and running means of per-sample trace values."""
    n = len(samples)
    mean = sum(samples) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in samples) / max(n - 1, 1))
    hist = tuple(sum(samples[:k + 1]) / (k + 1) for k in range(n))
    return TraceEstimate(mean, std / math.sqrt(n), n, hist)


def weight_error(w_folded: torch.Tensor, fold: torch.Tensor, bits: int) -> float:
    """``||W - Q_b(W)||^2`` in the space of the unfolded weight: the folded weight ``W' = fold W``
    is quantized as the integer conversion does (symmetric per output channel) and its error
    divided back by ``fold`` (the BN factor ``gamma / sigma`` per output channel)."""
    from ..integer.convert import _weight_scale

    s = _weight_scale(w_folded, bits, "auto")
    qmax = (1 << (bits - 1)) - 1
    shape = (-1,) + (1,) * (w_folded.ndim - 1)
    err = (torch.round(w_folded / s.reshape(shape)).clamp(-qmax, qmax) * s.reshape(shape) - w_folded)
    fold = fold.reshape(shape)
    # a channel with gamma = 0 outputs a constant whatever its weights: its error does not count
    scaled = torch.where(fold != 0, err / torch.where(fold != 0, fold, torch.ones_like(fold)), torch.zeros_like(err))
    return float((scaled ** 2).sum())


def bits_of_choice(choice) -> tuple[int, int]:
    """(weight bits, activation bits) of a choice: ``b`` (both, as HAWQ-V3) or a ``(w, a)`` pair."""
    return (choice, choice) if isinstance(choice, int) else (int(choice[0]), int(choice[1]))


def sensitivities(traces: dict[str, TraceEstimate], folded: dict[str, tuple[torch.Tensor, torch.Tensor]],
                  choices=(4, 8), activations: tuple[dict, dict] | None = None) -> dict[str, dict]:
    """``Omega_i(b) = Tr(H_i) / n_i * ||W_i - Q_b(W_i)||^2`` for each layer and choice (a bit width,
    or a ``(weight, activation)`` pair). ``activations``: ``activation_traces``' output; adds the
    activation term ``Tr(F_a,i) * mse(a_i, b_a)``, which choices that differ only in activation bits
    need (without it they would tie and the cheaper one would always win)."""
    pairs = [bits_of_choice(c) for c in choices]
    if activations is None and len({w for w, _ in pairs}) < len(set(pairs)):
        raise ValueError(f"choices {tuple(choices)} differ in activation bits alone: pass activations="
                         "activation_traces(...) (PlanConfig(activation_term=True)) so that Omega sees them")
    out = {}
    for layer, est in traces.items():
        w, fold = folded[layer]
        w_term = {wb: est.trace / w.numel() * weight_error(w, fold, wb) for wb, _ in pairs}
        a_term = {ab: 0.0 for _, ab in pairs}
        if activations is not None:
            act_tr, values = activations
            a_term = {ab: act_tr[layer].trace * activation_error(values[layer], ab) for ab in a_term}
        out[layer] = {c: w_term[wb] + a_term[ab] for c, (wb, ab) in zip(choices, pairs)}
    return out
