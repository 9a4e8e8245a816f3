"""Deployable checkpoints: the quantized weights as the codes and scales that would run.

Format ``winoq-2`` (safetensors; the recipe, the layer report and a ``codes`` table as JSON
metadata). For every quantized layer the file holds, instead of float weights:

* direct convs / linears: ``<layer>.weight.codes`` and ``<layer>.weight.scale``;
* Winograd convs: ``<layer>.u.codes`` and ``<layer>.u.scale``, the transformed weights
  ``U = G' g G'^T`` exactly as the layer uses them (nearest or learned rounding), plus the
  learned ``log_sb`` / ``log_sg`` (or the PAW+FSQ free transforms) that the other stages need.

Codes are stored in the narrowest form that holds the grid exactly: signed integers of up to
8 bits as ``int8`` (up to 4 bits packed two per byte, two's complement, first element in the low
nibble), OCP FP8 E4M3 / E5M2 as ``float8_e4m3fn`` / ``float8_e5m2``, other formats with at most
256 values (minifloats, unsigned) as ``uint8`` indices into ``fmt.grid()`` (at most 16 values:
packed two per byte); wider integers as ``int16``. Scales keep the model's dtype (so a loaded
model is bit-identical) in their compact shape: one per output channel and channel group
(``axis`` / ``group_size`` in the table say how they expand), one per tap as well for tap-wise
Winograd weights. Biases, static activation ranges, layers kept in float and every other
module's tensors are stored as they are.

``save`` checks every layer: the codes times the scales must give, bit for bit, the weights the
layer computes with (and a loaded layer must compute the same). A layer that fails the check
(none known) is stored in float with a warning.
"""
from __future__ import annotations

import json
import math
import warnings

import torch
from torch import nn

from .formats import IntFormat, parse
from .modules import QuantConv2d, QuantLinear
from .quantizers import _MIN_SCALE, Granularity, _from_groups, _to_groups, compute_scale, fake_quantize
from .winograd.conv import transform_2d
from .winograd.quantized import QuantWinogradConv2d

FORMAT = "winoq-2"
LEGACY_FORMATS = ("winoq-1",)  # float weights + recipe: still loaded


# ----------------------------------------------------------------------------- codes <-> bytes
def _pack4(nibbles: torch.Tensor) -> torch.Tensor:
    flat = nibbles.flatten().to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def key_prefix(name: str) -> str:
    """State-dict key prefix of the module ``name`` ("" for the root: a bare quantized layer)."""
    return f"{name}." if name else ""


def _unpack4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    out = torch.stack([packed & 0xF, packed >> 4], dim=1).flatten()
    return out[:numel]


def encode_codes(q: torch.Tensor, fmt) -> tuple[torch.Tensor, str]:
    """Grid values ``q`` of ``fmt`` as ``(stored tensor, encoding name)``, exactly."""
    fmt = parse(fmt)
    q = q.detach().cpu()
    if isinstance(fmt, IntFormat) and fmt.signed and fmt.bits <= 8:
        if fmt.bits <= 4:
            return _pack4(q.to(torch.int16) & 0xF), "int4x2"
        return q.to(torch.int8), "int8"
    native = getattr(fmt, "_native_dtype", lambda: None)()
    if native is not None:
        return q.to(native), str(native).removeprefix("torch.")
    grid = fmt.grid()
    if grid.numel() <= 256:
        idx = torch.searchsorted(grid, q.double().contiguous()).clamp_max(grid.numel() - 1)
        if not torch.equal(grid[idx], q.double()):
            raise ValueError(f"values off the {fmt.name} grid cannot be stored as its codes")
        return (_pack4(idx), "grid4x2") if grid.numel() <= 16 else (idx.to(torch.uint8), "grid8")
    if isinstance(fmt, IntFormat) and fmt.bits <= 16 and fmt.signed:
        return q.to(torch.int16), "int16"
    return q.to(torch.float32), "float32"


def decode_codes(stored: torch.Tensor, encoding: str, fmt, shape, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`encode_codes`: the grid values in ``dtype`` and ``shape``."""
    fmt = parse(fmt)
    numel = math.prod(shape)
    if encoding == "int4x2":
        v = _unpack4(stored, numel).to(torch.int16)
        q = torch.where(v >= 8, v - 16, v)
    elif encoding in ("int8", "int16", "float32", "float8_e4m3fn", "float8_e5m2"):
        q = stored.flatten()
    elif encoding in ("grid8", "grid4x2"):
        idx = (stored.flatten() if encoding == "grid8" else _unpack4(stored, numel)).long()
        grid = fmt.grid()
        if idx.numel() and int(idx.max()) >= grid.numel():
            raise ValueError(f"code {int(idx.max())} is outside the {grid.numel()} values of {fmt.name}")
        q = grid[idx]
    else:
        raise ValueError(f"unknown code encoding {encoding!r} in the checkpoint; it was written by a newer winoq")
    if q.numel() != numel:
        raise ValueError(f"{q.numel()} codes stored for a tensor of shape {list(shape)}")
    return q.to(dtype).reshape(shape)


# ----------------------------------------------------------------------------- scales
def _group_dims(gran: Granularity, ndim: int) -> tuple[int, ...]:
    """Dims of the grouped view (``_to_groups``) that one scale spans."""
    axis = gran.axis % ndim
    return tuple(sorted([d if d < axis else d + 1 for d in gran.reduce_dims(ndim)] + [axis + 1]))


def compact_scale(scale: torch.Tensor, gran: Granularity, shape) -> torch.Tensor:
    """One value per scale group (``scale`` broadcastable to ``shape``, constant in each group)."""
    full = scale.expand(shape)
    if gran.kind != "group":
        return full.amax(dim=gran.reduce_dims(len(shape)), keepdim=True) if gran.reduce_dims(len(shape)) else full
    grouped, _ = _to_groups(full, gran.axis, gran.group_size)  # zero padding never wins the max of scales > 0
    return grouped.amax(dim=_group_dims(gran, len(shape)), keepdim=True)


def expand_scale(compact: torch.Tensor, axis: int | None, group_size: int | None, shape) -> torch.Tensor:
    """The per-element scale of a tensor of ``shape`` from its compact scales."""
    if axis is None:
        return compact.expand(shape)
    grouped, size = _to_groups(torch.empty(shape, dtype=compact.dtype, device=compact.device), axis, group_size)
    return _from_groups(compact.expand(grouped.shape), axis, size)


# ----------------------------------------------------------------------------- one layer
def _layer_scale(layer: nn.Module, w: torch.Tensor, gran: Granularity, fmt) -> torch.Tensor:
    """The scale the layer applies to ``w``, exactly as its forward computes it."""
    if isinstance(layer, QuantWinogradConv2d):
        given = getattr(layer, "learned_u_scale", None) if layer.learned_u is not None else None
        if given is not None and given.shape == w.shape:
            return given
        return compute_scale(w, fmt, gran, getattr(layer, "weight_method", "minmax"))[0]
    if getattr(layer, "weight_scale", None) is not None:
        return layer.weight_scale
    if gran.kind != "group":  # fake_quantize_dynamic: compute_scale, then times the clip ratio 1.0
        return compute_scale(w, fmt, gran)[0] * 1.0
    grouped, size = _to_groups(w, gran.axis, gran.group_size)  # fake_quantize_dynamic's grouped scale
    scale = (grouped.abs().amax(dim=_group_dims(gran, w.ndim), keepdim=True) * (1.0 / fmt.max_value)).clamp_min(_MIN_SCALE)
    return _from_groups(scale.expand(grouped.shape), gran.axis, size)


@torch.no_grad()
def _used_weight(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, Granularity]:
    """(the quantized weights the layer computes with, the float tensor they come from, granularity)."""
    if isinstance(layer, QuantWinogradConv2d):
        dtype = layer.weight.dtype
        _, g, _ = layer.transforms(dtype, layer.weight.device)
        src = layer.learned_u.to(dtype) if layer.learned_u is not None else transform_2d(g, layer.weight.to(dtype))
        return layer.quantized_weight(g), src, layer._weight_gran()
    return layer.quantized_weight(), layer.weight.detach(), layer.weight_gran()


@torch.no_grad()
def encode_layer(layer: nn.Module) -> tuple[dict[str, torch.Tensor], dict] | None:
    """``(tensors, table entry)`` of a quantized layer's weights as codes and scales, or None
    when they cannot be stored exactly that way (then they are stored in float)."""
    fmt = layer.rounding_format()
    if fmt is None:
        return None
    used, src, gran = _used_weight(layer)
    scale = _layer_scale(layer, src, gran, fmt).expand(src.shape)
    q = fmt.round(src / scale)
    compact = compact_scale(scale, gran, src.shape)
    axis = gran.axis if gran.kind == "group" else None
    full = expand_scale(compact, axis, gran.group_size, src.shape)
    decoded = q * full
    reloaded = decoded if isinstance(layer, QuantWinogradConv2d) else fake_quantize(decoded, fmt, full)
    if not (torch.equal(decoded, used) and torch.equal(reloaded, used)):
        return None
    codes, encoding = encode_codes(q, fmt)
    part = "u" if isinstance(layer, QuantWinogradConv2d) else "weight"
    entry = {"part": part, "encoding": encoding, "shape": list(src.shape), "format": fmt.name, "axis": axis,
             "group_size": gran.group_size if axis is not None else None}
    return {"codes": codes, "scale": compact.detach().contiguous().clone()}, entry


def _quantized_layers(qmodel: nn.Module):
    for name, mod in qmodel.named_modules():
        if isinstance(mod, (QuantConv2d, QuantLinear, QuantWinogradConv2d)):
            yield name, mod


WINOGRAD_WEIGHTS = ("codes", "float")


def deployable_tensors(qmodel: nn.Module, winograd_weights: str = "codes") -> tuple[dict[str, torch.Tensor], dict]:
    """Every tensor of the checkpoint and the ``codes`` table (layer name -> entry).
    ``winograd_weights="float"`` keeps the Winograd layers' float weights g instead of their U
    codes (U is then recomputed on loading, as the layer computes it)."""
    if winograd_weights not in WINOGRAD_WEIGHTS:
        raise ValueError(f"winograd_weights={winograd_weights!r} is not valid; choose 'codes' (U as int / float8 "
                         "codes and scales, what runs) or 'float' (the float 3x3 weights, smaller at F(6,3))")
    state = {k: v.detach() for k, v in qmodel.state_dict().items()}
    table, fallback = {}, []
    for name, mod in _quantized_layers(qmodel):
        if winograd_weights == "float" and isinstance(mod, QuantWinogradConv2d):
            continue
        enc = encode_layer(mod)
        if enc is None:
            if mod.rounding_format() is not None:
                fallback.append(name)
            continue
        tensors, entry = enc
        for key in ("weight", "learned_u", "weight_scale"):
            state.pop(f"{key_prefix(name)}{key}", None)
        state[f"{key_prefix(name)}{entry['part']}.codes"] = tensors["codes"]
        state[f"{key_prefix(name)}{entry['part']}.scale"] = tensors["scale"]
        table[name] = entry
    if fallback:
        warnings.warn(f"{len(fallback)} layers ({', '.join(fallback[:3])}) are stored with float weights: their "
                      "quantized weights are not codes times scales bit for bit", stacklevel=3)
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, table


# ----------------------------------------------------------------------------- loading
def decode_into(qmodel: nn.Module, tensors: dict[str, torch.Tensor], table: dict, where: str) -> list:
    """Replace the codes / scales in ``tensors`` by the tensors ``load_state_dict`` expects;
    returns the work to finish after loading (``finish_decoding``)."""
    pending = []
    for name, entry in table.items():
        try:
            mod = qmodel.get_submodule(name)
        except AttributeError:
            mod = None
        part = entry.get("part")
        want = QuantWinogradConv2d if part == "u" else (QuantConv2d, QuantLinear)
        if not isinstance(mod, want):
            raise ValueError(f"{where} does not match this model: it stores the quantized weights of {name!r}, "
                             f"which this model does not quantize that way; pass the same float architecture "
                             "that was quantized")
        try:
            codes, compact = tensors.pop(f"{key_prefix(name)}{part}.codes"), tensors.pop(f"{key_prefix(name)}{part}.scale")
            shape = tuple(entry["shape"])
            entry["encoding"], entry["format"], entry["axis"], entry["group_size"]  # noqa: B018 - all present
        except KeyError as exc:
            raise ValueError(f"{where} is damaged: the quantized weights of {name!r} lack {exc}; re-save the "
                             "model with winoq.save") from None
        expected = tuple(mod.weight.shape) if part == "weight" else (mod.out_channels, mod.in_channels // mod.groups,
                                                                     mod.tc.n, mod.tc.n)
        if shape != expected:
            raise ValueError(f"{where} does not match this model: {name!r} has weights of shape {list(shape)} "
                             f"there and {list(expected)} here; pass the same float architecture that was quantized")
        dtype, device = mod.weight.dtype, mod.weight.device
        q = decode_codes(codes, entry["encoding"], entry["format"], shape, dtype).to(device)
        full = expand_scale(compact.to(device=device, dtype=dtype), entry["axis"], entry["group_size"], shape)
        value = q * full
        if part == "weight":
            tensors[f"{key_prefix(name)}weight"] = value
        else:
            tensors[f"{key_prefix(name)}learned_u"] = value
            mod.learned_u = torch.empty_like(value)
            tensors[f"{key_prefix(name)}weight"] = mod.weight.detach().clone()  # replaced after loading (needs the transforms)
        pending.append((mod, part, full))
    return pending


@torch.no_grad()
def finish_decoding(pending: list) -> None:
    """After ``load_state_dict``: direct layers keep their saved scales; Winograd layers get
    float weights g = pinv(G') U pinv(G')^T (the least-squares inverse of their U, so that the
    layer stays a consistent conv; it computes with U as loaded)."""
    for mod, part, full in pending:
        if part == "weight":
            mod.weight_scale = full
            continue
        _, g, _ = mod.transforms(torch.float64, mod.weight.device)
        pinv = torch.linalg.pinv(g)
        mod.weight.copy_(transform_2d(pinv, mod.learned_u.double()).to(mod.weight.dtype))
        mod.learned_u_scale = full


def codes_table(meta: dict, where) -> dict:
    """The ``codes`` table of the metadata (layer name -> entry)."""
    try:
        table = json.loads(meta.get("codes", "{}"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where} is damaged: its 'codes' metadata is not JSON ({exc}); re-save the model") from None
    if not isinstance(table, dict) or not all(isinstance(e, dict) for e in table.values()):
        raise ValueError(f"{where} is damaged: its 'codes' metadata is not a table of layers; re-save the model")
    return table
