"""Checks of a checkpoint's metadata (recipe and layer report) before ``winoq.load`` rebuilds
the model from it: a damaged or hand-edited file fails with one ``ValueError`` naming the file
and the problem, never a ``TypeError`` / ``KeyError`` from deep inside."""
from __future__ import annotations

import dataclasses
import json
import os

from torch import nn

from .recipe import Recipe


def _fail(path, problem: str) -> ValueError:
    return ValueError(f"{os.fspath(path)}: {problem}; write the checkpoint again with winoq.save")


def _json(path, meta: dict, key: str, kind: type):
    if key not in meta:
        raise _fail(path, f"metadata has no {key!r} entry")
    try:
        value = json.loads(meta[key])
    except (TypeError, json.JSONDecodeError) as exc:
        raise _fail(path, f"metadata {key!r} is not valid JSON ({exc})") from None
    if not isinstance(value, kind):
        raise _fail(path, f"metadata {key!r} must be a JSON {kind.__name__}, got {json.dumps(value)[:60]}")
    return value


def checked_metadata(path, meta: dict, model: nn.Module) -> tuple[Recipe, list[dict]]:
    """(recipe, report entries) of a checkpoint's metadata, checked against ``model``."""
    recipe = checked_recipe(path, meta)
    return recipe, checked_report(path, meta, model, recipe)


def checked_recipe(path, meta: dict) -> Recipe:
    """The recipe stored in the metadata, validated, and runnable on this machine."""
    from .kernels import resolve_kernel

    data = _json(path, meta, "recipe", dict)
    try:
        recipe = Recipe.from_json(json.dumps(data))
    except (ValueError, TypeError) as exc:
        raise _fail(path, f"invalid recipe ({exc})") from None
    try:
        resolve_kernel(recipe.kernel, None)
    except RuntimeError as exc:
        raise ValueError(f"{os.fspath(path)} was saved with kernel={recipe.kernel!r}, which cannot run on this "
                         f"machine: {exc}") from None
    return recipe


def checked_report(path, meta: dict, model: nn.Module, recipe: Recipe) -> list[dict]:
    """The per-layer report: a list of LayerReport fields, one entry per quantized layer of
    ``model`` (every nn.Conv2d / nn.Linear the recipe does not skip). An absent report (older
    files) is an empty list: the model's own plan then stands."""
    from .api import LayerReport
    from .quantize_checks import quantized_layer_names

    if "report" not in meta:
        return []
    report = _json(path, meta, "report", list)
    fields = {f.name for f in dataclasses.fields(LayerReport)}
    required = {f.name for f in dataclasses.fields(LayerReport) if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING}
    for i, entry in enumerate(report):
        if not isinstance(entry, dict):
            raise _fail(path, f"report entry {i} is not an object")
        unknown, missing = set(entry) - fields, required - set(entry)
        if unknown or missing:
            raise _fail(path, f"report entry {i} ({entry.get('name', '?')!r}) has "
                              + "; ".join(f"{what} fields {sorted(keys)}" for what, keys in
                                          (("unknown", unknown), ("missing", missing)) if keys))
    names, expected = [e["name"] for e in report], quantized_layer_names(model, recipe.skip)
    if set(names) != set(expected) or len(names) != len(set(names)):
        extra = sorted(set(names) - set(expected))
        absent = [n for n in expected if n not in names]
        raise _fail(path, f"the report does not match the model's layers (not in the model: {extra[:5]}, not in "
                          f"the report: {absent[:5]}, repeated: {sorted({n for n in names if names.count(n) > 1})[:5]})")
    return report
