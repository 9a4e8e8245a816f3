"""The public entry points: ``quantize``, ``save``, ``load``.

``quantize`` is a module swap followed by a calibration pipeline:
  1. plan: every nn.Conv2d becomes a fully quantized Winograd conv when eligible
     (square kernel > 1, stride 1, dilation 1, and ``recipe.winograd`` set) and where it
     pays (``Recipe.winograd_min_channels``, ``winograd_kernels``, ``force_winograd``) or a
     directly quantized conv; every nn.Linear a quantized linear.
  2. calibrate the Winograd layers' transforms: nothing ("standard", "tapwise"),
     data-free noise ("learned", the default: no example input needed) or
     calibration data ("paw-fsq");
  3. optionally, on calibration data: the weights' minifloat split (``format_search``),
     learned rounding layer- or block-wise (``rounding``, ``reconstruction``), then static
     activation ranges (``activation_ranges="static"``).
"""
from __future__ import annotations

import contextlib
import copy
import fnmatch
import json
import os
import re
import warnings
from dataclasses import dataclass, field
import torch
from torch import nn
from tqdm.auto import tqdm

from .batchnorm import fold_batchnorm
from .calibration import capture_layer_inputs, check_calibration_data
from .checkpoint_checks import checked_metadata
from .quantize_checks import check_kernel_here, check_unsigned_formats, emulated_kernels
from .modules import QuantConv2d, QuantLinear
from .recipe import Recipe
from .winograd.conv import winograd_choice, winograd_ineligibility
from .granularity import apply_recipe as apply_granularity
from .distributed import assign_layers, layer_cost, shard, share_learned_scales
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
    if not name:  # the root itself (a bare nn.Conv2d / nn.Linear): quantize() returns ``new``
        return
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


# ----------------------------------------------------------------------------- module swap
def _swap_modules(qmodel: nn.Module, recipe: Recipe, saved_tiles: dict | None = None) -> list[tuple[LayerReport, nn.Module]]:
    """Swap every conv / linear for its quantized module. ``saved_tiles`` (``load``): {conv name:
    output tile, or None for direct} as a checkpoint's report says, taken over the recipe's rules
    so that a file written under older rules (e.g. a 5x5 conv as F(6,5)) rebuilds as it was saved."""
    scale_mode = "tapwise" if recipe.scales == "tapwise" else "shared"
    plan = []
    _check_plan_names(qmodel, recipe)
    for name, mod in list(qmodel.named_modules()):
        if isinstance(mod, (QuantWinogradConv2d, QuantConv2d, QuantLinear)):
            raise ValueError(f"module {name!r} is already quantized; pass the float model to winoq.quantize")
        if isinstance(mod, (nn.Conv2d, nn.Linear)) and any(fnmatch.fnmatchcase(name, p) for p in recipe.skip):
            continue  # kept in float on request
        choice = recipe.plan_for(name)
        w_fmt, a_fmt = choice.get("weights", recipe.weights), choice.get("activations", recipe.activations)
        fmts = StageFormats(a_fmt, a_fmt, w_fmt, recipe.winograd_output_format or a_fmt)
        if isinstance(mod, nn.Conv2d):
            m, detail = _winograd_tile(name, mod, recipe)
            if saved_tiles is not None and name in saved_tiles:
                m, detail = saved_tiles[name]
            if m is not None:
                new = QuantWinogradConv2d.from_conv(mod, m, recipe.points, formats=fmts,
                                                    group_size=recipe.group_size, scale_mode=scale_mode)
                new.weight_tapwise = recipe.winograd_weight_scales == "tapwise"
                new.input_tapwise = recipe.winograd_input_scales == "tapwise"
                new.kernel = recipe.kernel
                rep = LayerReport(name, "winograd", detail, int32=new.int32_report())
            else:
                new = QuantConv2d.from_conv(mod, w_fmt, a_fmt, recipe.group_size)
                rep = LayerReport(name, "direct", detail)
        elif isinstance(mod, nn.Linear):
            new = QuantLinear.from_linear(mod, w_fmt, a_fmt, recipe.group_size)
            rep = LayerReport(name, "linear", "direct")
        else:
            continue
        _replace(qmodel, name, new)
        plan.append((rep, new))
    _warn_large_kernels_direct(plan, recipe)
    return plan


def _check_plan_names(model: nn.Module, recipe: Recipe) -> None:
    """Every layer a ``layer_plan`` names is a conv / linear of the model, and a planned tile fits it."""
    mods = dict(model.named_modules())
    for name, choices in recipe.layer_plan:
        mod = mods.get(name)
        if not isinstance(mod, (nn.Conv2d, nn.Linear)):
            layers = [n for n, m in mods.items() if isinstance(m, (nn.Conv2d, nn.Linear))]
            raise ValueError(f"layer_plan names {name!r}, which is not a conv or linear of this model "
                             f"(its layers: {', '.join(layers[:8])}{' ...' if len(layers) > 8 else ''})")
        tile = dict(choices).get("winograd")
        if tile is not None:
            why = winograd_ineligibility(mod)
            if why is not None:
                raise ValueError(f"layer_plan[{name!r}] asks for Winograd F({tile},k) but this layer cannot run as "
                                 f"Winograd: {why}")


def _winograd_tile(name: str, conv: nn.Conv2d, recipe: Recipe) -> tuple[int | None, str]:
    """(output tile or None, report detail) of one conv under the recipe's Winograd rules (a
    ``layer_plan`` tile first)."""
    choice = recipe.plan_for(name)
    if "winograd" in choice:
        m = choice["winograd"]
        return (None, "direct (layer_plan)") if m is None else (m, f"F({m},{conv.kernel_size[0]}) (layer_plan)")
    if recipe.winograd is None:
        return None, "winograd off"
    min_channels, label = recipe.min_winograd_channels
    forced = any(fnmatch.fnmatchcase(name, p) for p in recipe.force_winograd)
    return winograd_choice(conv, recipe.winograd, min_channels=min_channels, kernels=recipe.winograd_kernels,
                           forced=forced, min_channels_label=label)


def _warn_large_kernels_direct(plan, recipe: Recipe) -> None:
    """Eligible convs kept direct for their kernel size are worth a word: the user may have expected
    Winograd (and before this rule they silently ran as inaccurate F(m,5) / F(m,7))."""
    kept = [rep.name for rep, _ in plan if rep.kind == "direct" and rep.detail.endswith("(winograd_kernels)")]
    if kept:
        sizes = sorted({int(r.detail.split("x")[0]) for r, _ in plan if r.name in kept})
        warnings.warn(f"{len(kept)} stride-1 conv(s) with {'/'.join(f'{k}x{k}' for k in sizes)} kernels (e.g. "
                      f"{kept[0]!r}) stay direct: F({recipe.winograd},{sizes[0]}) is inaccurate when quantized. Pass "
                      f"winograd_kernels=(3, {', '.join(map(str, sizes))}) for Winograd with the same transform size "
                      f"as F({recipe.winograd},3) (see Recipe.describe())", stacklevel=3)


def quantize(model: nn.Module, recipe: Recipe | None = None, *, calib_data=None, progress: bool = True,
             calibrate: bool = True, _saved_tiles: dict | None = None) -> nn.Module:
    """Return a quantized copy of ``model`` (``model`` itself is untouched).

    calib_data: only for the steps that learn on data (``scales="paw-fsq"``,
    ``rounding="learned"``, ``activation_ranges="static"``, ``format_search="output"``):
    any form ``winoq.calibration`` accepts (a tensor, batches, dicts of keyword inputs, a
    ``winoq.diffusion.CalibrationSet``, a function ``run(model)``); a recipe that needs it
    fails before any work without it. ``calibrate=False`` only builds the
    structure (used by ``load``). The result has ``winoq_recipe`` and
    ``winoq_report`` (a list of ``LayerReport``) attributes."""
    recipe = recipe or Recipe()
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a winoq.Recipe, got {type(recipe).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_finite(model)
    check_kernel_here(recipe.kernel, model)
    if calibrate:
        _check_calib_data(recipe, calib_data)
        if recipe.uses_calibration_data:
            check_calibration_data(model, calib_data)  # wrong shapes fail before any work
        check_unsigned_formats(model, recipe)
    qmodel = copy.deepcopy(model).eval()
    folded = fold_batchnorm(qmodel) if recipe.fold_batchnorm else []
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):  # the new layers' throw-away init must not move the global RNGs
        plan = _swap_modules(qmodel, recipe, _saved_tiles)
    qmodel = next((mod for rep, mod in plan if rep.name == ""), qmodel)  # a bare layer is its own root
    apply_granularity(qmodel, recipe)
    qmodel.eval()  # the swapped-in layers are new modules: put them in eval mode too
    wino = [(rep, mod) for rep, mod in plan if rep.kind == "winograd"]
    if recipe.winograd is not None and not wino:
        warnings.warn("no conv runs as Winograd (eligible: square kernel > 1, stride 1, dilation 1; and the rules "
                      f"{recipe.winograd_rule()!r}): every layer is quantized directly; the report says why",
                      stacklevel=2)
    if not plan:
        warnings.warn("the model has no nn.Conv2d or nn.Linear layer: nothing was quantized", stacklevel=2)
    with emulated_kernels(qmodel):  # calibration always runs the emulated (differentiable) kernel
        if calibrate and wino:
            _calibrate(model, qmodel, wino, recipe, calib_data, progress)
        if calibrate and recipe.format_search != "off":
            _search_formats(model, plan, recipe, calib_data, progress)
        if calibrate and recipe.rounding == "learned":
            _learn_rounding(model, qmodel, plan, recipe, calib_data, progress)
        if calibrate and recipe.activation_ranges == "static":
            _calibrate_static_ranges(qmodel, plan, calib_data, progress)
    for rep, mod in wino:
        rep.int32 = mod.int32_report()  # after learning: the transforms as they will run
    _note_folded(plan, folded)
    qmodel.winoq_recipe = recipe
    qmodel.winoq_report = [rep for rep, _ in plan]
    return qmodel


def _note_folded(plan, folded: list[tuple[str, str]]) -> None:
    """Each conv's report names the BatchNorm folded into it."""
    bn_of = dict(folded)
    for rep, _ in plan:
        if rep.name in bn_of:
            rep.calibration["folded_batchnorm"] = bn_of[rep.name]


def set_kernel(qmodel: nn.Module, kernel: str) -> nn.Module:
    """Switch every Winograd layer of a quantized model to ``kernel`` (see ``winoq.kernels``)."""
    from .kernels import resolve_kernel

    resolve_kernel(kernel, None if kernel != "triton" else "cuda")  # validate the name early
    layers = [mod for mod in qmodel.modules() if isinstance(mod, QuantWinogradConv2d)]
    with_zp = sum(mod.granularity.input.zero_point and mod.act_ranges is None for mod in layers)
    if with_zp and kernel in ("int-cpu", "triton", "auto"):
        raise ValueError(f"{with_zp} Winograd layers quantize their input with zero points "
                         f"(Recipe.activation_zero_point), which kernel {kernel!r} does not implement; quantize with "
                         "Recipe(activation_zero_point=False) for it, or use kernel 'cpu' or 'emulated'")
    static = 0
    for mod in layers:
        mod.kernel = kernel
        static += mod.act_ranges is not None
    if static and kernel != "emulated":
        warnings.warn(f"{static} Winograd layers have static activation ranges, which only the emulated kernel "
                      f"implements: they keep running emulated (the {kernel!r} kernels compute dynamic scales)",
                      stacklevel=2)
    return qmodel


def _calibrate(model, qmodel, wino, recipe: Recipe, calib_data, progress: bool) -> None:
    cfg = ScaleLearningConfig(steps=recipe.learn_steps, lr=recipe.learn_lr, noise=recipe.noise, seed=recipe.seed,
                              optimizer=recipe.learn_optimizer, loss=recipe.learn_loss,
                              max_out_channels=recipe.learn_max_channels)
    if recipe.scales == "learned":
        if recipe.shared_scales:
            info = learn_shared_scales([m for _, m in wino], cfg)
            for rep, _ in wino:
                rep.calibration = {"shared": True, **{k: v for k, v in info.items() if k == "seconds"}}
            return
        # layers are independent (seed = recipe.seed + index): under winoq.distributed each rank learns its share
        rank, world = shard()
        owners = assign_layers([layer_cost(m, cfg.max_out_channels) for _, m in wino], world)
        mine = [(i, rep, mod) for i, ((rep, mod), owner) in enumerate(zip(wino, owners)) if owner == rank]
        bar = tqdm(mine, desc="learning transform scales (data-free)", disable=not progress or rank != 0,
                   unit="layer")
        infos = {}
        for i, rep, mod in bar:
            with _naming_layer(rep.name):
                infos[i] = learn_layer_scales(mod, ScaleLearningConfig(**{**cfg.__dict__, "seed": recipe.seed + i}))
            bar.set_postfix_str(f"{rep.name}: {infos[i]['sqnr_standard_db']:.1f} -> "
                                f"{infos[i]['sqnr_learned_db']:.1f} dB")
            if not all(torch.isfinite(torch.tensor(infos[i]["s_b"] + infos[i]["s_g"]))):
                raise FloatingPointError(f"non-finite transform scales learned for layer {rep.name!r}")
        infos = share_learned_scales([m for _, m in wino], infos)
        for i, (rep, _) in enumerate(wino):
            rep.calibration = infos[i]
    elif recipe.scales == "paw-fsq":
        from .algorithms.paw import learn_paw_fsq

        inputs = capture_inputs(model, [rep.name for rep, _ in wino], calib_data, recipe)
        bar = tqdm(wino, desc="PAW+FSQ on calibration data", disable=not progress, unit="layer")
        for rep, mod in bar:
            with _naming_layer(rep.name):
                rep.calibration = learn_paw_fsq(mod, inputs[rep.name], seed=recipe.seed)


@contextlib.contextmanager
def _naming_layer(name: str):
    """Non-finite values while calibrating a layer stop the run with the layer's name."""
    try:
        yield
    except FloatingPointError as err:
        raise FloatingPointError(f"calibration stopped at layer {name!r}: {err}") from err


def _check_calib_data(recipe: Recipe, calib_data) -> None:
    """Fail before any work when the recipe needs calibration data and none was given;
    warn when data is given to a recipe that never looks at it."""
    if calib_data is not None:
        if not recipe.uses_calibration_data:
            warnings.warn("calib_data is ignored: this recipe is data-free (it learns on calibration data only with "
                          "rounding='learned', activation_ranges='static', format_search='output' or "
                          "scales='paw-fsq')", stacklevel=3)
        return
    if recipe.rounding == "learned":
        raise ValueError("rounding='learned' learns on calibration inputs: pass calib_data=(a tensor or batches "
                         "of model inputs), or use rounding='nearest' for the data-free path")
    if recipe.format_search == "output":
        raise ValueError("format_search='output' compares layer outputs on calibration inputs: pass calib_data=..., "
                         "or use format_search='weight' for the data-free choice")
    if recipe.activation_ranges == "static":
        raise ValueError("activation_ranges='static' calibrates the ranges on inputs: pass calib_data=(a tensor or "
                         "batches of model inputs; for a diffusion UNet winoq.diffusion.calibration_inputs(...)), "
                         "or use activation_ranges='dynamic' for the data-free path")


def _search_formats(model, plan, recipe: Recipe, calib_data, progress: bool) -> None:
    """Per-layer minifloat split of the weights (``Recipe.format_search``)."""
    from .algorithms.adaround import layer_weight_format
    from .algorithms.format_search import choose_layer_format, set_layer_weight_format

    plan = [(rep, mod) for rep, mod in plan if layer_weight_format(mod) is not None]
    inputs = {}
    if recipe.format_search == "output":
        inputs = capture_inputs(model, [rep.name for rep, _ in plan], calib_data, recipe, max_samples=recipe.calib_samples)
    for rep, mod in tqdm(plan, desc="choosing weight formats", disable=not progress, unit="layer"):
        fmt, table = choose_layer_format(mod, inputs.get(rep.name))
        set_layer_weight_format(mod, fmt)
        rep.calibration["weight_format"] = fmt.name
        rep.calibration["format_errors"] = dict(table)


def _calibrate_static_ranges(qmodel, plan, calib_data, progress: bool) -> None:
    """Static activation ranges: observe the max per channel group over the calibration
    data, then pick each stage's clipping ratio by quantization MSE (two passes)."""
    from .calibration import run_calibration
    from .quantizers import StaticRanges

    for rep, mod in plan:
        mod.act_ranges = StaticRanges()
        mod.act_ranges.layer_name = rep.name
    for mode in tqdm(("observe", "search"), desc="static activation ranges", disable=not progress, unit="pass"):
        for _, mod in plan:
            mod.act_ranges.mode = mode
        run_calibration(qmodel, calib_data)
    for rep, mod in plan:
        if not any(True for _ in mod.act_ranges.buffers()):
            raise ValueError(f"layer {rep.name!r} never ran on the calibration data, so it has no static range; "
                             "pass calib_data that exercises the whole model")
        rep.calibration["static_clip_ratios"] = mod.act_ranges.freeze()
    zero = [rep.name for rep, mod in plan if not bool(getattr(mod.act_ranges, "amax_input", torch.ones(1)).any())]
    if zero:  # every input of these layers would quantize to 0 (e.g. all-zero calibration data)
        raise ValueError(f"the static input range of layer(s) {', '.join(map(repr, zero[:5]))}"
                         f"{' and %d more' % (len(zero) - 5) if len(zero) > 5 else ''} is zero: their inputs were 0 "
                         "on every calibration sample, so every input would quantize to 0; pass calib_data with "
                         "real model inputs (not all zeros)")


def _learn_rounding(model, qmodel, plan, recipe: Recipe, calib_data, progress: bool) -> None:
    """AdaRound-style rounding of the quantized weights on float-model inputs: every layer
    on its own ("layer"), or the layers of each block together ("block", BRECQ) with the
    layers outside any block done one by one."""
    in_block = _reconstruct_blocks(model, qmodel, plan, recipe, calib_data, progress) \
        if recipe.reconstruction == "block" else {}
    _learn_layer_rounding(model, [(r, m) for r, m in plan if r.name not in in_block], recipe, calib_data, progress)


def _learn_layer_rounding(model, plan, recipe: Recipe, calib_data, progress: bool) -> None:
    from .algorithms.adaround import layer_weight_format, round_layer_weight, set_rounded_weight, weight_view

    plan = [(rep, mod) for rep, mod in plan if layer_weight_format(mod) is not None]
    if not plan:
        return
    inputs = capture_inputs(model, [rep.name for rep, _ in plan], calib_data, recipe, max_samples=recipe.calib_samples)
    bar = tqdm(plan, desc="learning weight rounding", disable=not progress, unit="layer")
    for i, (rep, mod) in enumerate(bar):
        scale = weight_view(mod).scale()  # the step the rounding lands on (kept for the checkpoint)
        with _naming_layer(rep.name):
            wq, info = round_layer_weight(mod, inputs[rep.name], "learned", iters=recipe.rounding_iters,
                                          seed=recipe.seed + i)
        set_rounded_weight(mod, wq, scale)
        rep.calibration["rounding"] = info


def _reconstruct_blocks(model, qmodel, plan, recipe: Recipe, calib_data, progress: bool) -> dict[str, str]:
    """Block-wise reconstruction; returns the layers it rounded (layer name -> block name)."""
    from .algorithms.block_reconstruction import capture_block_io, find_blocks, reconstruct_block
    from .calibration import run_calibration

    in_block = {}
    for b in find_blocks(model)[0]:
        in_block.update({rep.name: b for rep, _ in plan if rep.name.startswith(b + ".")})
    blocks = list(dict.fromkeys(in_block.values()))  # the blocks that hold planned layers, in model order
    calls = capture_block_io(model, blocks, lambda m: run_calibration(m, calib_data, max_samples=recipe.calib_samples),
                             max_samples=recipe.calib_samples)
    bar = tqdm(blocks, desc="block reconstruction of the rounding", disable=not progress, unit="block")
    for i, name in enumerate(bar):
        info = reconstruct_block(qmodel.get_submodule(name), calls[name], iters=recipe.rounding_iters,
                                 seed=recipe.seed + i, name=name)
        for rep, _ in plan:
            if in_block.get(rep.name) == name:
                rep.calibration["rounding"] = {**info, "block": name}
    return in_block


def capture_inputs(model: nn.Module, names: list[str], calib_data, recipe: Recipe, max_samples: int = 64) -> dict:
    """Inputs of the named layers of the float model on calibration data (``winoq.calibration``
    lists the accepted forms); Gaussian noise for PAW+FSQ when no data is given."""
    if calib_data is None:
        warnings.warn("scales='paw-fsq' learns on calibration data and none was given: using Gaussian noise "
                      "inputs instead (pass calib_data=... for the published baseline)", stacklevel=3)
        gen = torch.Generator().manual_seed(recipe.seed)
        return {n: torch.randn((16, model.get_submodule(n).in_channels, 24, 24), generator=gen) for n in names}
    return capture_layer_inputs(model, names, calib_data, max_samples)


# ----------------------------------------------------------------------------- save / load
def _apply_saved_formats(qmodel, report: list[dict]) -> None:
    """Per-layer weight formats chosen by the format search (kept in the saved report)."""
    from .algorithms.format_search import set_layer_weight_format

    for r in report:
        fmt = (r.get("calibration") or {}).get("weight_format")
        if fmt is not None:
            set_layer_weight_format(qmodel.get_submodule(r["name"]), fmt)


def save(qmodel: nn.Module, path: str | os.PathLike, *, winograd_weights: str = "codes") -> None:
    """Write the quantized model as it would be deployed (safetensors, format ``winoq-2``,
    ``winoq.checkpoint``): weight codes and scales (int8 / packed int4 / float8 / grid indices),
    Winograd layers' transformed weights U as codes and scales with their learned transform
    scales, biases, static ranges and float layers as they are; the recipe and report as metadata.

    U has (m+2)^2 / 9 times the elements of a 3x3 weight (4x at F(4,3), 7.1x at F(6,3)), so its
    int8 codes outweigh float32 3x3 weights from F(4,3) on: ``winograd_weights="float"`` stores
    the Winograd layers' float weights instead (U is recomputed when loading, bit for bit the same)."""
    from safetensors.torch import save_file

    from .checkpoint import FORMAT, deployable_tensors

    recipe = getattr(qmodel, "winoq_recipe", None)
    if recipe is None:
        raise ValueError("save() takes a model returned by winoq.quantize (it has no winoq_recipe)")
    tensors, table = deployable_tensors(qmodel, winograd_weights)
    meta = {"format": FORMAT, "recipe": recipe.to_json(), "codes": json.dumps(table),
            "report": json.dumps([r.__dict__ for r in qmodel.winoq_report], default=str)}
    tmp = f"{os.fspath(path)}.tmp"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)  # never leave a half-written checkpoint in place of a good one


def _check_format(meta: dict, path) -> None:
    """Refuse files that are not winoq checkpoints, or of a format this winoq does not read."""
    from .checkpoint import FORMAT, LEGACY_FORMATS

    fmt = meta.get("format")
    if fmt != FORMAT and fmt not in LEGACY_FORMATS:
        if isinstance(fmt, str) and fmt.startswith("winoq-"):
            raise ValueError(f"{path} is a winoq checkpoint of format {fmt!r}, which this winoq does not read "
                             f"(it reads {', '.join((FORMAT, *LEGACY_FORMATS))}); upgrade winoq or re-save it")
        raise ValueError(f"{path} is a safetensors file but not a winoq checkpoint (metadata format="
                         f"{fmt!r}); write it with winoq.save")


def _legacy_recipe(recipe: Recipe, meta: dict) -> Recipe:
    """Files of the float format (``winoq-1``) predate BatchNorm folding: they load unfolded."""
    from .checkpoint import LEGACY_FORMATS

    if meta.get("format") in LEGACY_FORMATS and "fold_batchnorm" not in json.loads(meta["recipe"]):
        return recipe.replace(fold_batchnorm=False)
    return recipe


def _drop_dead_clip(qmodel: nn.Module, tensors: dict, path) -> None:
    """Files written while Winograd layers had a ``clip`` buffer (always 1: min-max scales) load
    into layers without it; a clip other than 1 would change the results, so it is refused."""
    expected = qmodel.state_dict()
    for key in [k for k in tensors if k.endswith(".clip") and k not in expected]:
        if not bool((tensors[key] == 1).all()):
            raise ValueError(f"{path} clips Winograd-domain scales ({key} = {tensors[key].tolist()}), which this winoq "
                             "no longer implements; re-quantize the model")
        del tensors[key]


def _tiles_of_report(report) -> dict | None:
    """{conv name: (tile or None, detail)} of a saved report: what each conv was when it was saved."""
    if not report:
        return None
    tiles = {}
    for entry in report:
        if entry.get("kind") == "winograd":
            found = re.match(r"F\((\d+),(\d+)\)", entry.get("detail", ""))
            if found:
                tiles[entry["name"]] = (int(found.group(1)), entry["detail"])
        elif entry.get("kind") == "direct":
            tiles[entry["name"]] = (None, entry.get("detail", "direct"))
    return tiles


def load(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Rebuild a quantized model saved by ``save`` from the file and the float architecture
    ``model`` (its weights are not used: a freshly constructed model gives the same outputs, bit
    for bit; ``model`` itself is untouched). Reads ``winoq-2`` files and the older float ``winoq-1``."""
    from safetensors import safe_open

    from .checkpoint import codes_table, decode_into, finish_decoding, key_prefix

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({exc}); "
                         "expected a checkpoint written by winoq.save") from exc
    _check_format(meta, path)
    recipe, report = checked_metadata(path, meta, model)
    recipe = _legacy_recipe(recipe, meta)
    qmodel = quantize(model, recipe, calibrate=False, progress=False, _saved_tiles=_tiles_of_report(report))
    pending = decode_into(qmodel, tensors, codes_table(meta, path), path)
    _drop_dead_clip(qmodel, tensors, path)
    static_ranges: dict[str, dict] = {}  # layer name -> {buffer name: shape}
    for key, value in tensors.items():
        owner, sep, buffer = key.partition(".act_ranges.")
        if sep:
            static_ranges.setdefault(owner, {})[buffer] = value.shape
    for name, mod in qmodel.named_modules():
        if isinstance(mod, QuantWinogradConv2d) and f"{key_prefix(name)}free_transforms.AT" in tensors:
            mod.set_free_transforms(mod.tc.AT, mod.tc.G, mod.tc.BT)
        if isinstance(mod, QuantWinogradConv2d) and f"{key_prefix(name)}learned_u" in tensors:
            mod.learned_u = torch.empty_like(tensors[f"{key_prefix(name)}learned_u"], device=mod.weight.device)
        if name in static_ranges and isinstance(mod, (QuantWinogradConv2d, QuantConv2d, QuantLinear)):
            from .quantizers import StaticRanges

            mod.act_ranges = StaticRanges()
            mod.act_ranges.allocate(static_ranges[name])
    try:
        missing, unexpected = qmodel.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"{path} does not match this model ({str(exc).splitlines()[-1].strip()}); "
                         "pass the same float architecture that was quantized") from exc
    if missing or unexpected:
        raise ValueError(f"{path} does not match this model: missing {missing[:5]}, unexpected {unexpected[:5]}; "
                         "pass the same float architecture that was quantized")
    _apply_saved_formats(qmodel, report)  # before the saved scales are attached: a new format drops them
    finish_decoding(pending)
    qmodel.winoq_report = [LayerReport(**r) for r in report] if report else qmodel.winoq_report
    return qmodel
