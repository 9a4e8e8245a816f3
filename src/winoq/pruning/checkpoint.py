"""Save / load a (pruned or dense) UNetSeg with its shape, so it loads without the original.

The safetensors metadata holds the U-Net config (every conv's output width included) as
JSON; :func:`load_unet` rebuilds ``UNetSeg(config)`` at those widths and loads the tensors
strictly, so the round trip is bit-exact.
"""
from __future__ import annotations

import json
import os

import torch

from ..models.unet_seg import UNetConfig, UNetSeg, measured_widths

CONFIG_KEY = "winoq_unet_config"
INFO_KEY = "winoq_info"


def save_unet(model: UNetSeg, path: str | os.PathLike, info: dict | None = None,
              dtype: torch.dtype | None = None) -> None:
    """Write the weights (optionally cast to ``dtype``, e.g. float16) and the config as metadata."""
    from safetensors.torch import save_file

    if not isinstance(model, UNetSeg):
        raise TypeError(f"save_unet expects a UNetSeg, got {type(model).__name__}")
    config = model.config.with_widths(measured_widths(model))  # the widths it really has
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        state[k] = v.contiguous()
    meta = {CONFIG_KEY: json.dumps(config.to_dict()), INFO_KEY: json.dumps(info or {})}
    save_file(state, str(path), metadata=meta)


def read_unet_metadata(path: str | os.PathLike) -> tuple[UNetConfig, dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if CONFIG_KEY not in meta:
        raise ValueError(f"{path} has no {CONFIG_KEY!r} metadata; it was not written by "
                         f"winoq.pruning.save_unet (rebuild the model yourself and load_state_dict)")
    return UNetConfig.from_dict(json.loads(meta[CONFIG_KEY])), json.loads(meta.get(INFO_KEY, "{}"))


def load_unet(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> tuple[UNetSeg, dict]:
    """(model in eval mode, info dict) from a file written by :func:`save_unet`."""
    from safetensors.torch import load_file

    config, info = read_unet_metadata(path)
    model = UNetSeg(config)
    state = load_file(str(path))
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    return model.eval(), info
