"""Block-wise reconstruction of learned weight rounding (BRECQ, Li et al., ICLR 2021).

Layer-wise AdaRound (:mod:`winoq.algorithms.adaround`) matches each layer's output
on its own; BRECQ learns the rounding of all the layers of a *block* (a residual
block, a transformer block: a few layers that depend on each other) together, so
that the block's output is reproduced best and the layers can compensate each
other's rounding errors:

* :func:`find_blocks` picks the blocks: the largest submodules holding between 2
  and ``max_layers`` convs / linears; the remaining layers are *loose* (left to
  layer-wise rounding);
* :func:`capture_block_io` records each block's inputs (positional and keyword
  arguments) and outputs on the float model;
* :func:`reconstruct_block` gives every quantized layer of the block an
  :class:`~winoq.algorithms.adaround.AdaRoundWeight` (Winograd layers on their
  transformed weights ``U = G' g G'^T``), runs the quantized block with the soft
  weights in place of the layers' own rounding, and minimises the distance to the
  float block's output plus the annealed rounding regulariser; the hard weights are
  then written into the layers as ``winoq.quantize`` does for layer-wise rounding
  (``learned_u`` for Winograd layers, ``weight`` for direct ones).
"""
from __future__ import annotations

import time
from contextlib import ExitStack, contextmanager
from typing import Callable, NamedTuple

import torch
from torch import nn

from ..calibration import batch_size, tensors_in
from .adaround import (AdaRoundWeight, _beta_at, check_schedule, layer_weight_format, reconstruction_loss,
                       set_rounded_weight, weight_view)

__all__ = ["BlockCall", "find_blocks", "capture_block_io", "reconstruct_block"]


class BlockCall(NamedTuple):
    """One recorded call of a block: its positional and keyword arguments and its output."""

    args: tuple
    kwargs: dict
    output: object


# ----------------------------------------------------------------------------- blocks
def _is_layer(mod: nn.Module) -> bool:
    """A conv or linear layer, float or quantized (Winograd layers are no nn.Conv2d)."""
    from ..winograd.conv import WinogradConv2d

    return isinstance(mod, (nn.Conv2d, nn.Linear, WinogradConv2d))


def _count_layers(mod: nn.Module) -> int:
    return sum(1 for m in mod.modules() if _is_layer(m))


def find_blocks(model: nn.Module, max_layers: int = 4) -> tuple[list[str], list[str]]:
    """``(blocks, loose_layers)``: names of the non-overlapping submodules to
    reconstruct jointly, and of the layers inside none of them.

    Walking the module tree top-down, a submodule (not the root, not itself a layer)
    whose subtree holds between 2 and ``max_layers`` convs / linears is a block and
    is not descended into. The same names come out for the float model and its
    quantized copy."""
    if not isinstance(max_layers, int) or max_layers < 2:
        raise ValueError(f"max_layers must be an int >= 2 (a block holds at least 2 layers), got {max_layers!r}")
    blocks: list[str] = []
    loose: list[str] = []

    def visit(mod: nn.Module, prefix: str) -> None:
        for name, child in mod.named_children():
            full = f"{prefix}{name}"
            if _is_layer(child):
                loose.append(full)
                continue
            n = _count_layers(child)
            if 2 <= n <= max_layers:
                blocks.append(full)
            elif n > 0:
                visit(child, f"{full}.")

    visit(model, "")
    return blocks, loose


# ----------------------------------------------------------------------------- recording
def _detach(obj):
    """Tensors detached and cloned (safe from later in-place ops), containers rebuilt, the rest as is."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_detach(o) for o in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_detach(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _detach(v) for k, v in obj.items()}
    return obj


def _batch_size(call: BlockCall) -> int:
    """Samples in one call: dim 0 of its first tensor argument (else of its output)."""
    return batch_size(call.args, call.kwargs, call.output)


def _truncate(obj, batch: int, keep: int):
    """``obj`` with every tensor whose dim 0 is ``batch`` cut to its first ``keep`` rows."""
    if isinstance(obj, torch.Tensor):
        return obj[:keep] if obj.ndim > 0 and obj.shape[0] == batch else obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_truncate(o, batch, keep) for o in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_truncate(o, batch, keep) for o in obj)
    if isinstance(obj, dict):
        return {k: _truncate(v, batch, keep) for k, v in obj.items()}
    return obj


def capture_block_io(model: nn.Module, block_names: list[str], run_model: Callable[[nn.Module], None],
                     max_samples: int = 32) -> dict[str, list[BlockCall]]:
    """Inputs and outputs of the named blocks of the float ``model``.

    ``run_model(model)`` runs the model on the calibration data (the caller loops
    over its batches there); it runs under ``torch.no_grad()``. Returns, per block
    name, the list of its calls as :class:`BlockCall` ``(args, kwargs, output)``
    with tensors detached; once ``max_samples`` samples (dim 0) are stored for a
    block its further calls are not kept (the call that crosses the limit is cut
    to it: every tensor whose dim 0 is that call's batch size)."""
    if not isinstance(max_samples, int) or max_samples < 1:
        raise ValueError(f"max_samples must be a positive int, got {max_samples!r}")
    calls: dict[str, list[BlockCall]] = {n: [] for n in block_names}
    stored = dict.fromkeys(block_names, 0)
    pending: dict[str, list[tuple]] = {n: [] for n in block_names}
    hooks = []

    def pre_hook(name):
        def hook(mod, args, kwargs):
            pending[name].append((_detach(args), _detach(kwargs)) if stored[name] < max_samples else None)
        return hook

    def post_hook(name):
        def hook(mod, args, kwargs, output):
            inputs = pending[name].pop()
            if inputs is None or stored[name] >= max_samples:
                return
            call = BlockCall(inputs[0], inputs[1], _detach(output))
            n = _batch_size(call)
            keep = min(n, max_samples - stored[name])
            if keep < n:
                call = BlockCall(*(_truncate(part, n, keep) for part in call))
            calls[name].append(call)
            stored[name] += keep
        return hook

    try:
        for n in block_names:
            mod = model.get_submodule(n)
            hooks.append(mod.register_forward_pre_hook(pre_hook(n), with_kwargs=True))
            hooks.append(mod.register_forward_hook(post_hook(n), with_kwargs=True))
        with torch.no_grad():
            run_model(model)
    finally:
        for h in hooks:
            h.remove()
    return calls


# ----------------------------------------------------------------------------- reconstruction
def _rounded_layers(qblock: nn.Module) -> list[tuple[str, nn.Module, object]]:
    """``(name, layer, weight format)`` of the quantized layers of ``qblock`` whose weights are quantized."""
    from ..modules import QuantConv2d, QuantLinear
    from ..winograd.quantized import QuantWinogradConv2d

    return [(name, mod, layer_weight_format(mod)) for name, mod in qblock.named_modules()
            if isinstance(mod, (QuantWinogradConv2d, QuantConv2d, QuantLinear)) and layer_weight_format(mod) is not None]


def _soft_weight(layer: nn.Module) -> AdaRoundWeight:
    """The AdaRound weight of ``layer`` in the domain its quantizer works on, at its own scale."""
    view = weight_view(layer)
    return AdaRoundWeight(view.weight, view.fmt, view.scale())


@contextmanager
def _block_state(qblock: nn.Module):
    """Evaluation mode, frozen parameters and emulated Winograd kernels for the duration;
    everything restored afterwards."""
    from ..winograd.quantized import QuantWinogradConv2d

    modes = [(m, m.training) for m in qblock.modules()]
    grads = [(p, p.requires_grad) for p in qblock.parameters()]
    kernels = [(m, m.kernel) for m in qblock.modules() if isinstance(m, QuantWinogradConv2d)]
    try:
        qblock.eval()
        for p, _ in grads:
            p.requires_grad_(False)
        for m, _ in kernels:
            m.kernel = "emulated"
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, req in grads:
            p.requires_grad_(req)
        for m, kernel in kernels:
            m.kernel = kernel


@contextmanager
def _soft_weights(layers: list[tuple[str, nn.Module, object]], adas: list[AdaRoundWeight]):
    """Each layer's quantized weights replaced by its soft AdaRound weight (``weights_replaced_by``)."""
    with ExitStack() as stack:
        for (_, layer, _), ada in zip(layers, adas):
            stack.enter_context(layer.weights_replaced_by(lambda ada=ada: ada(hard=False)))
        yield


@contextmanager
def _nearest(layers: list[tuple[str, nn.Module, object]]):
    """Winograd layers without their learned weights for the duration (their own nearest rounding)."""
    saved = [(layer, layer.learned_u) for _, layer, _ in layers if getattr(layer, "learned_u", None) is not None]
    try:
        for layer, _ in saved:
            layer.learned_u = None
        yield
    finally:
        for layer, u in saved:
            layer.learned_u = u


def _call_loss(qblock: nn.Module, call: BlockCall) -> torch.Tensor:
    """reconstruction_loss of the block's output against the recorded one (summed over output tensors)."""
    out = tensors_in(qblock(*call.args, **call.kwargs))
    ref = tensors_in(call.output)
    if len(out) != len(ref) or not out:
        raise ValueError(f"the block returns {len(out)} tensors but {len(ref)} were recorded; record the "
                         "calls on the float model of the same architecture")
    return sum(reconstruction_loss(o, r.to(o.dtype)) for o, r in zip(out, ref))


def _full_loss(qblock: nn.Module, calls: list[BlockCall]) -> float:
    """Loss over every recorded call, weighted by its number of samples."""
    total, count = 0.0, 0
    with torch.no_grad():
        for call in calls:
            n = _batch_size(call)
            total += float(_call_loss(qblock, call)) * n
            count += n
    return total / max(1, count)


def _check_args(calls, iters, lr, beta, warmup, reg_weight) -> None:
    if not isinstance(calls, (list, tuple)) or not calls:
        raise ValueError("calls must be a non-empty list of recorded block calls (see capture_block_io)")
    check_schedule(iters, lr, beta, warmup, reg_weight)


def _train(qblock, calls, adas, iters, lr, beta, warmup, reg_weight, seed, label) -> None:
    """Adam on the AdaRound variables, one recorded call per step (shuffled order, every call once per pass)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    opt = torch.optim.Adam([ada.V for ada in adas], lr=lr)
    order: list[int] = []
    with torch.enable_grad():
        for step in range(iters):
            if not order:
                order = torch.randperm(len(calls), generator=gen).tolist()
            loss = _call_loss(qblock, calls[order.pop()])
            b = _beta_at(step, iters, warmup, beta)
            if b is not None and reg_weight > 0:
                loss = loss + reg_weight * sum(ada.regularizer(b) for ada in adas)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"block reconstruction of {label!r}: non-finite loss at step {step}; "
                                         "lower lr or check the recorded calls")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def reconstruct_block(qblock: nn.Module, calls: list[BlockCall], iters: int = 300, lr: float = 1e-2,
                      beta: tuple[float, float] = (20.0, 2.0), warmup: float = 0.2, reg_weight: float = 0.01,
                      seed: int = 0, name: str | None = None) -> dict:
    """Learn the rounding of every quantized layer of ``qblock`` jointly, so that the
    quantized block reproduces the float block's recorded outputs; the hard weights
    are written into the layers (Winograd: ``learned_u``; direct: ``weight``).

    ``calls``: the float block's calls (:func:`capture_block_io`). Each step runs the
    block on one call with the soft weights and minimises :func:`reconstruction_loss`
    to the recorded output plus ``reg_weight`` times the layers' regularisers (``beta``
    annealed after ``warmup * iters`` steps, as in ``learn_rounding``). The block runs
    in eval mode with its own parameters frozen; modes, ``requires_grad`` flags and
    kernels are restored afterwards. ``name`` labels error messages.

    Returns ``{"layers", "loss_nearest", "loss_learned", "iters", "seconds"}``: the
    number of layers rounded and the full-data block losses with the layers' own
    round-to-nearest (before any change) and with the learned rounding."""
    _check_args(calls, iters, lr, beta, warmup, reg_weight)
    start = time.perf_counter()
    label = name or type(qblock).__name__
    layers = _rounded_layers(qblock)
    with _block_state(qblock):
        with _nearest(layers):
            loss_nearest = _full_loss(qblock, calls)
        if not layers:
            return {"layers": 0, "loss_nearest": loss_nearest, "loss_learned": loss_nearest, "iters": 0,
                    "seconds": time.perf_counter() - start}
        adas = [_soft_weight(layer) for _, layer, _ in layers]
        with _soft_weights(layers, adas):
            _train(qblock, calls, adas, iters, lr, beta, warmup, reg_weight, seed, label)
        with torch.no_grad():
            for (_, layer, _), ada in zip(layers, adas):
                set_rounded_weight(layer, ada(hard=True).to(layer.weight.dtype), ada.scale)
        loss_learned = _full_loss(qblock, calls)
    return {"layers": len(layers), "loss_nearest": loss_nearest, "loss_learned": loss_learned, "iters": iters,
            "seconds": time.perf_counter() - start}
