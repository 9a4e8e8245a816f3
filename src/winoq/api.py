"""The public entry points: ``quantize``, ``save``, ``load``.

``quantize`` is a module swap followed by a calibration pipeline:
  1. plan: every nn.Conv2d becomes a fully quantized Winograd conv when eligible
     (square kernel > 1, stride 1, dilation 1, and ``recipe.winograd`` set) or a
     directly quantized conv; every nn.Linear a quantized linear.
  2. calibrate the Winograd layers' transforms: nothing ("standard", "tapwise"),
     data-free noise ("learned", the default: no example input needed) or
     calibration data ("paw-fsq").
"""
from __future__ import annotations

import copy
import fnmatch
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .modules import QuantConv2d, QuantLinear
from .recipe import Recipe
from .winograd.conv import winograd_ineligibility
from .winograd.quantized import QuantWinogradConv2d, StageFormats
from .winograd.scales import ScaleLearningConfig, learn_layer_scales, learn_shared_scales


@dataclass
class LayerReport:
    name: str
    kind: str                  # "winograd", "direct", "linear"
    detail: str                # F(m,r) or why the conv stays direct
    calibration: dict = field(default_factory=dict)
    int32: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- checks
def check_finite(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            bad = int((~torch.isfinite(p)).sum())
            raise ValueError(f"parameter {name!r} has {bad} NaN/Inf values; fix or reload the weights before quantizing")


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


# ----------------------------------------------------------------------------- module swap
def _swap_modules(qmodel: nn.Module, recipe: Recipe) -> list[tuple[LayerReport, nn.Module]]:
    fmts = StageFormats(recipe.activations, recipe.activations, recipe.weights, recipe.activations)
    scale_mode = "tapwise" if recipe.scales == "tapwise" else "shared"
    plan = []
    for name, mod in list(qmodel.named_modules()):
        if isinstance(mod, (QuantWinogradConv2d, QuantConv2d, QuantLinear)):
            raise ValueError(f"module {name!r} is already quantized; pass the float model to winoq.quantize")
        if isinstance(mod, (nn.Conv2d, nn.Linear)) and any(fnmatch.fnmatchcase(name, p) for p in recipe.skip):
            continue  # kept in float on request
        if isinstance(mod, nn.Conv2d):
            why = "winograd off" if recipe.winograd is None else winograd_ineligibility(mod)
            if why is None:
                new = QuantWinogradConv2d.from_conv(mod, recipe.winograd, recipe.points, formats=fmts,
                                                    group_size=recipe.group_size, scale_mode=scale_mode)
                new.weight_tapwise = recipe.winograd_weight_scales == "tapwise"
                new.kernel = recipe.kernel
                rep = LayerReport(name, "winograd", f"F({recipe.winograd},{mod.kernel_size[0]})",
                                  int32=new.int32_report())
            else:
                new = QuantConv2d.from_conv(mod, recipe.weights, recipe.activations, recipe.group_size)
                rep = LayerReport(name, "direct", why)
        elif isinstance(mod, nn.Linear):
            new = QuantLinear.from_linear(mod, recipe.weights, recipe.activations, recipe.group_size)
            rep = LayerReport(name, "linear", "direct")
        else:
            continue
        _replace(qmodel, name, new)
        plan.append((rep, new))
    return plan


def quantize(model: nn.Module, recipe: Recipe | None = None, *, calib_data=None, progress: bool = True,
             calibrate: bool = True) -> nn.Module:
    """Return a quantized copy of ``model`` (``model`` itself is untouched).

    calib_data: only for ``scales="paw-fsq"``: a tensor of inputs or an iterable of
    batches (tensors or (input, target) tuples). ``calibrate=False`` only builds the
    structure (used by ``load``). The result has ``winoq_recipe`` and
    ``winoq_report`` (a list of ``LayerReport``) attributes."""
    recipe = recipe or Recipe()
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a winoq.Recipe, got {type(recipe).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_finite(model)
    torch.manual_seed(recipe.seed)
    qmodel = copy.deepcopy(model).eval()
    plan = _swap_modules(qmodel, recipe)
    qmodel.eval()  # the swapped-in layers are new modules: put them in eval mode too
    wino = [(rep, mod) for rep, mod in plan if rep.kind == "winograd"]
    if recipe.winograd is not None and not wino:
        warnings.warn("the model has no Winograd-eligible conv (square kernel > 1, stride 1, dilation 1): "
                      "every layer is quantized directly", stacklevel=2)
    if not plan:
        warnings.warn("the model has no nn.Conv2d or nn.Linear layer: nothing was quantized", stacklevel=2)
    if calibrate and wino:
        _calibrate(model, qmodel, wino, recipe, calib_data, progress)
    if calibrate and recipe.rounding == "learned":
        _learn_rounding(model, plan, recipe, calib_data, progress)
    qmodel.winoq_recipe = recipe
    qmodel.winoq_report = [rep for rep, _ in plan]
    return qmodel


def set_kernel(qmodel: nn.Module, kernel: str) -> nn.Module:
    """Switch every Winograd layer of a quantized model to ``kernel`` (see ``winoq.kernels``)."""
    from .kernels import resolve_kernel

    resolve_kernel(kernel, None if kernel != "triton" else "cuda")  # validate the name early
    for mod in qmodel.modules():
        if isinstance(mod, QuantWinogradConv2d):
            mod.kernel = kernel
    return qmodel


def _calibrate(model, qmodel, wino, recipe: Recipe, calib_data, progress: bool) -> None:
    cfg = ScaleLearningConfig(steps=recipe.learn_steps, lr=recipe.learn_lr, noise=recipe.noise, seed=recipe.seed,
                              optimizer=recipe.learn_optimizer, loss=recipe.learn_loss)
    if recipe.scales == "learned":
        if recipe.shared_scales:
            info = learn_shared_scales([m for _, m in wino], cfg)
            for rep, _ in wino:
                rep.calibration = {"shared": True, **{k: v for k, v in info.items() if k == "seconds"}}
            return
        bar = tqdm(wino, desc="learning transform scales (data-free)", disable=not progress, unit="layer")
        for i, (rep, mod) in enumerate(bar):
            rep.calibration = learn_layer_scales(mod, ScaleLearningConfig(**{**cfg.__dict__, "seed": recipe.seed + i}))
            bar.set_postfix_str(f"{rep.name}: {rep.calibration['sqnr_standard_db']:.1f} -> "
                                f"{rep.calibration['sqnr_learned_db']:.1f} dB")
            if not all(torch.isfinite(torch.tensor(rep.calibration["s_b"] + rep.calibration["s_g"]))):
                raise FloatingPointError(f"non-finite transform scales learned for layer {rep.name!r}")
    elif recipe.scales == "paw-fsq":
        from .algorithms.paw import learn_paw_fsq

        inputs = capture_inputs(model, [rep.name for rep, _ in wino], calib_data, recipe)
        bar = tqdm(wino, desc="PAW+FSQ on calibration data", disable=not progress, unit="layer")
        for rep, mod in bar:
            rep.calibration = learn_paw_fsq(mod, inputs[rep.name], seed=recipe.seed)


def _learn_rounding(model, plan, recipe: Recipe, calib_data, progress: bool) -> None:
    """AdaRound-style rounding of every quantized layer's weights on its float-model inputs."""
    from .algorithms.adaround import round_layer_weight

    if calib_data is None:
        raise ValueError("rounding='learned' learns on calibration inputs: pass calib_data=(a tensor or batches "
                         "of model inputs), or use rounding='nearest' for the data-free path")
    inputs = capture_inputs(model, [rep.name for rep, _ in plan], calib_data, recipe, max_samples=32)
    bar = tqdm(plan, desc="learning weight rounding", disable=not progress, unit="layer")
    for i, (rep, mod) in enumerate(bar):
        fmt = mod.formats.weight if isinstance(mod, QuantWinogradConv2d) else mod.weight_format
        if fmt is None:
            continue
        wq, info = round_layer_weight(mod, inputs[rep.name], "learned", iters=recipe.rounding_iters,
                                      seed=recipe.seed + i)
        with torch.no_grad():
            if isinstance(mod, QuantWinogradConv2d):
                mod.learned_u = wq.detach().clone()
            else:
                mod.weight.copy_(wq)
        rep.calibration["rounding"] = info


def _batches(calib_data) -> Iterable[torch.Tensor]:
    if isinstance(calib_data, torch.Tensor):
        yield calib_data
        return
    for item in calib_data:
        yield item[0] if isinstance(item, (tuple, list)) else item


def capture_inputs(model: nn.Module, names: list[str], calib_data, recipe: Recipe, max_samples: int = 64) -> dict:
    """Inputs of the named layers of the float model on calibration data."""
    if calib_data is None:
        warnings.warn("scales='paw-fsq' learns on calibration data and none was given: using Gaussian noise "
                      "inputs instead (pass calib_data=... for the published baseline)", stacklevel=3)
        gen = torch.Generator().manual_seed(recipe.seed)
        return {n: torch.randn((16, model.get_submodule(n).in_channels, 24, 24), generator=gen) for n in names}
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda mod, args, n=n: seen[n].append(args[0].detach())) for n in names]
    try:
        count = 0
        with torch.no_grad():
            for batch in _batches(calib_data):
                model(batch)
                count += batch.shape[0]
                if count >= max_samples:
                    break
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v)[:max_samples] for n, v in seen.items()}


# ----------------------------------------------------------------------------- save / load
_FORMAT = "winoq-1"


def save(qmodel: nn.Module, path: str | os.PathLike) -> None:
    """Write the quantized model's tensors (safetensors) with its recipe as metadata."""
    from safetensors.torch import save_file

    recipe = getattr(qmodel, "winoq_recipe", None)
    if recipe is None:
        raise ValueError("save() takes a model returned by winoq.quantize (it has no winoq_recipe)")
    tensors = {k: v.detach().contiguous().clone() for k, v in qmodel.state_dict().items()}
    meta = {"format": _FORMAT, "recipe": recipe.to_json(),
            "report": json.dumps([r.__dict__ for r in qmodel.winoq_report], default=str)}
    tmp = f"{os.fspath(path)}.tmp"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)  # never leave a half-written checkpoint in place of a good one


def load(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Rebuild a quantized model saved by ``save``. ``model`` is the float
    architecture (its weights are replaced by the checkpoint's, a copy is returned)."""
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({exc}); "
                         "expected a checkpoint written by winoq.save") from exc
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{path} is a safetensors file but not a winoq checkpoint (metadata format="
                         f"{meta.get('format')!r}); write it with winoq.save")
    recipe = Recipe.from_json(meta["recipe"])
    qmodel = quantize(model, recipe, calibrate=False, progress=False)
    for name, mod in qmodel.named_modules():
        if isinstance(mod, QuantWinogradConv2d) and f"{name}.free_transforms.AT" in tensors:
            mod.set_free_transforms(mod.tc.AT, mod.tc.G, mod.tc.BT)
        if isinstance(mod, QuantWinogradConv2d) and f"{name}.learned_u" in tensors:
            mod.learned_u = torch.empty_like(tensors[f"{name}.learned_u"])
    try:
        missing, unexpected = qmodel.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"{path} does not match this model ({str(exc).splitlines()[-1].strip()}); "
                         "pass the same float architecture that was quantized") from exc
    if missing or unexpected:
        raise ValueError(f"{path} does not match this model: missing {missing[:5]}, unexpected {unexpected[:5]}; "
                         "pass the same float architecture that was quantized")
    report = json.loads(meta.get("report", "[]"))
    qmodel.winoq_report = [LayerReport(**r) for r in report] if report else qmodel.winoq_report
    return qmodel
