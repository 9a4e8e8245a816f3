"""Calibration data: what ``winoq.quantize(..., calib_data=...)`` accepts, and how
the model is called on it.

Accepted forms (every algorithm that needs data goes through :func:`model_calls`):

* a tensor: one batch, the model is called as ``model(tensor)``;
* a re-iterable collection of batches (a list, a DataLoader; not a generator, since
  calibration may pass over the data several times), each a tensor (``model(batch)``), a ``(input, target)``
  tuple or list as a classifier DataLoader yields (``model(input)``: only the first
  element is an input), or a dict (``model(**batch)``) for models with several
  inputs, e.g. ``{"sample": x, "timestep": t, "encoder_hidden_states": c}``;
* a ``winoq.diffusion.CalibrationSet`` (UNet inputs ``x_t, t, y`` sampled uniformly
  over timesteps): the model is called as ``model(x, t)`` or ``model(x, t, y)``;
* a function ``run(model)`` that calls the model on its calibration inputs itself.

A call that fails (wrong shape, wrong number of channels, missing inputs) raises a
ValueError naming the batch, its shapes and the accepted forms.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

FORMS = ("a tensor of model inputs; an iterable of batches (tensors, (input, target) tuples, or dicts of "
         "keyword inputs); a winoq.diffusion.CalibrationSet; or a function run(model)")


def tensors_in(obj) -> list[torch.Tensor]:
    """Every tensor in ``obj`` (nested tuples, lists and dicts), in order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in tensors_in(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in tensors_in(o)]
    return []


def batch_size(*parts) -> int:
    """Samples in a model call: dim 0 of the first tensor (not a scalar) in ``parts``, else 1."""
    return next((int(t.shape[0]) for t in tensors_in(parts) if t.ndim > 0), 1)


def _as_call(item) -> tuple[tuple, dict]:
    if isinstance(item, torch.Tensor):
        return (item,), {}
    if isinstance(item, dict):
        return (), dict(item)
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
        return (item[0],), {}
    raise ValueError(f"calibration batch of type {type(item).__name__} is not understood; calib_data must be {FORMS}")


def _calls(calib_data) -> Iterator[tuple[tuple, dict]]:
    if isinstance(calib_data, torch.Tensor):
        yield (calib_data,), {}
        return
    if hasattr(calib_data, "batches") and hasattr(calib_data, "t"):  # diffusion CalibrationSet
        for x, t, y in calib_data.batches():
            yield ((x, t) if y is None else (x, t, y)), {}
        return
    if isinstance(calib_data, (str, bytes)) or not hasattr(calib_data, "__iter__"):
        raise ValueError(f"calib_data of type {type(calib_data).__name__} is not understood; it must be {FORMS}")
    for item in calib_data:
        yield _as_call(item)


def _describe(args, kwargs) -> str:
    def shape(v):
        return f"tensor{tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__
    parts = [shape(a) for a in args] + [f"{k}={shape(v)}" for k, v in kwargs.items()]
    return ", ".join(parts)


def run_calibration(model: nn.Module, calib_data, max_samples: int | None = None) -> int:
    """Call ``model`` on the calibration batches (no gradients) until ``max_samples``
    samples have been seen; returns the number of samples."""
    if calib_data is None:
        raise ValueError(f"no calibration data given; calib_data must be {FORMS}")
    if callable(calib_data) and not isinstance(calib_data, nn.Module) and not hasattr(calib_data, "__iter__"):
        with torch.no_grad():
            calib_data(model)
        return -1
    count = 0
    with torch.no_grad():
        for i, (args, kwargs) in enumerate(_calls(calib_data)):
            try:
                model(*args, **kwargs)
            except (RuntimeError, TypeError, ValueError) as err:
                raise ValueError(f"the model failed on calibration batch {i} ({_describe(args, kwargs)}): "
                                 f"{str(err).splitlines()[0]}; calib_data must hold inputs the model accepts, "
                                 f"as {FORMS}") from err
            count += batch_size(args, kwargs)
            if max_samples is not None and count >= max_samples:
                break
    if count == 0:
        if iter(calib_data) is calib_data:
            raise ValueError("calib_data is a one-shot iterator and is used up (calibration may pass over the data "
                             "several times): pass a list of batches or a DataLoader instead")
        raise ValueError(f"calib_data held no batch; it must be {FORMS}")
    return count


def check_calibration_data(model: nn.Module, calib_data) -> None:
    """Run the float model on the first calibration batch, so that data of the wrong shape
    fails before any calibration work (a function is not probed: that would run it all).
    One-shot iterators (generators) are refused: calibration may pass over the data
    several times."""
    if calib_data is None or isinstance(calib_data, (str, bytes)):
        return
    if hasattr(calib_data, "__iter__") and not isinstance(calib_data, torch.Tensor) and iter(calib_data) is calib_data:
        raise ValueError("calib_data is a one-shot iterator (e.g. a generator), but calibration may pass over the "
                         "data several times: pass a list of batches or a DataLoader instead")
    if isinstance(calib_data, torch.Tensor) or hasattr(calib_data, "__iter__"):
        run_calibration(model, calib_data, max_samples=1)


def capture_layer_inputs(model: nn.Module, names: list[str], calib_data, max_samples: int = 64) -> dict:
    """First positional input of each named submodule of ``model`` on the calibration data
    (at most ``max_samples`` samples each)."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda mod, args, n=n: seen[n].append(args[0].detach())) for n in names]
    try:
        run_calibration(model, calib_data, max_samples)
    finally:
        for h in hooks:
            h.remove()
    missing = [n for n, v in seen.items() if not v]
    if missing:
        raise ValueError(f"layers {missing[:5]} never ran on the calibration data; check that calib_data "
                         "exercises the whole model")
    return {n: torch.cat(v)[:max_samples] for n, v in seen.items()}

