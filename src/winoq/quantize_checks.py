"""Checks ``winoq.quantize`` runs before any work, and the emulated-kernel switch of calibration.

Unsigned formats (``uint*``) clamp every negative value to 0, silently. What ``quantize`` does:
  * unsigned weights: refused when a layer to quantize has a negative weight (conv and linear
    weights almost always do), naming the layer;
  * unsigned activations with Winograd: refused, since the Winograd-domain stages (V = B^T x B
    and the Hadamard product M) are signed whatever the layer's input;
  * unsigned activations on direct layers: a warning. They are right only where every input is
    non-negative (after a ReLU), which cannot be told without running the model: the first conv on
    normalized images, convs after a residual add or after SiLU / GELU lose their negative inputs.
"""
from __future__ import annotations

import contextlib
import fnmatch
import warnings

from torch import nn

from .formats import parse


def check_kernel_here(kernel: str, model: nn.Module) -> None:
    """``Recipe.kernel`` must run on this machine: fail before any calibration, not in the middle."""
    from .kernels import resolve_kernel

    try:
        resolve_kernel(kernel, None)
    except RuntimeError as exc:
        raise ValueError(f"Recipe(kernel={kernel!r}) cannot run on this machine: {exc}") from None


def _quantized_layers(model: nn.Module, skip: tuple[str, ...]):
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)) and not any(fnmatch.fnmatchcase(name, p) for p in skip):
            yield name, mod


def quantized_layer_names(model: nn.Module, skip: tuple[str, ...]) -> list[str]:
    """The float model's layers ``quantize`` swaps (every nn.Conv2d and nn.Linear not skipped)."""
    return [name for name, _ in _quantized_layers(model, skip)]


def _signed_twin(fmt) -> str:
    return repr(f"int{fmt.bits}") if not fmt.is_float else "a signed format"


def check_unsigned_formats(model: nn.Module, recipe) -> None:
    """Refuse or warn about unsigned weight / activation formats (see the module docstring)."""
    weights, acts = parse(recipe.weights), parse(recipe.activations)
    if not weights.signed:
        for name, mod in _quantized_layers(model, recipe.skip):
            neg = int((mod.weight < 0).sum())
            if neg:
                raise ValueError(f"weights={recipe.weights!r} is unsigned, but layer {name or '(the model)'!r} has "
                                 f"{neg} negative weights of {mod.weight.numel()}: they would all become 0; use "
                                 f"{_signed_twin(weights)}")
    if acts.signed or not any(True for _ in _quantized_layers(model, recipe.skip)):
        return
    if recipe.winograd is not None:
        raise ValueError(f"activations={recipe.activations!r} is unsigned, but the Winograd stages V = B^T x B and M "
                         "are signed whatever the input (negatives would become 0); use "
                         f"{_signed_twin(acts)}, or winograd=None")
    warnings.warn(f"activations={recipe.activations!r} is unsigned: every negative layer input becomes 0. That is "
                  "right only after a ReLU; the first layer on normalized images, layers after a residual add or "
                  f"after SiLU/GELU lose their negative inputs (use {_signed_twin(acts)} there)", stacklevel=3)


@contextlib.contextmanager
def emulated_kernels(qmodel: nn.Module):
    """Within the block every layer with a ``kernel`` switch runs the emulated kernel (calibration
    needs its gradients and its static-range hooks); afterwards each gets its own kernel back."""
    from .kernels import KERNELS

    saved = [(mod, mod.kernel) for mod in qmodel.modules()
             if isinstance(getattr(mod, "kernel", None), str) and mod.kernel in KERNELS]
    for mod, _ in saved:
        mod.kernel = "emulated"
    try:
        yield
    finally:
        for mod, kernel in saved:
            mod.kernel = kernel
