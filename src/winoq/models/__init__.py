"""Model zoo: the embedded Fashion-MNIST ResNet, CIFAR ResNets, torchvision-style ResNets.

``get_model(name, weights=None)`` builds any of them by name::

    get_model("fmnist-resnet")                       # committed pretrained weights
    get_model("cifar-resnet20", weights="shared")    # ../shared pretrained checkpoint
    get_model("resnet50", weights="r50.pth")         # torchvision state dict file
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from .cifar_resnet import (
    CIFAR_RESNET_DEPTHS,
    CifarBasicBlock,
    CifarResNet,
    LambdaShortcut,
    cifar_resnet,
    cifar_resnet20,
    cifar_resnet32,
    cifar_resnet44,
    cifar_resnet56,
    default_shared_dirs,
    find_cifar_resnet_checkpoint,
    load_cifar_resnet,
)
from .fmnist import FmnistResNet, fmnist_metadata, fmnist_resnet, load_default_fmnist_model
from .resnet import BasicBlock, Bottleneck, ResNet, cifar_resnet18, resnet18, resnet34, resnet50

__all__ = [
    "CIFAR_RESNET_DEPTHS",
    "CifarBasicBlock",
    "CifarResNet",
    "LambdaShortcut",
    "cifar_resnet",
    "cifar_resnet20",
    "cifar_resnet32",
    "cifar_resnet44",
    "cifar_resnet56",
    "default_shared_dirs",
    "find_cifar_resnet_checkpoint",
    "load_cifar_resnet",
    "FmnistResNet",
    "fmnist_metadata",
    "fmnist_resnet",
    "load_default_fmnist_model",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "cifar_resnet18",
    "resnet18",
    "resnet34",
    "resnet50",
    "MODEL_NAMES",
    "get_model",
    "load_state_dict_file",
]

_BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "fmnist-resnet": fmnist_resnet,
    "cifar-resnet20": cifar_resnet20,
    "cifar-resnet32": cifar_resnet32,
    "cifar-resnet44": cifar_resnet44,
    "cifar-resnet56": cifar_resnet56,
    "cifar-resnet18": cifar_resnet18,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
}

MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``weights_only=True``).

    A ``{"state_dict": ...}`` (or ``{"model": ...}``) wrapper is unwrapped and a
    DataParallel ``module.`` prefix stripped.  Unsafe pickle is never used.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except SafetensorError as e:  # truncated or not a safetensors file at all
            raise RuntimeError(f"{path} is not a readable safetensors file ({e}); it may be truncated: "
                               "copy or download it again") from e
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError) as e:
            raise RuntimeError(f"could not load {path} with torch.load(weights_only=True): {e}. "
                               f"Save a plain state dict (or use .safetensors); unsafe pickle "
                               f"loading is deliberately not attempted.") from e
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RuntimeError(f"{path} does not hold a state dict of tensors")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in state.items()}


def get_model(name: str = "fmnist-resnet", weights: str | os.PathLike | None = None
              ) -> nn.Module:
    """Build a model by name, in eval mode.

    Names: ``fmnist-resnet`` (committed pretrained weights by default),
    ``cifar-resnet{20,32,44,56}``, ``cifar-resnet18``, ``resnet{18,34,50}``.
    Without ``weights`` every model but ``fmnist-resnet`` is randomly initialised.
    ``weights`` is a path to a ``.safetensors`` file or a torch state dict file (loaded
    with ``weights_only=True``) and is loaded strictly; for ``cifar-resnet{20..56}`` the
    string ``"shared"`` loads the pretrained checkpoint from the shared folder
    (see :func:`load_cifar_resnet`).  Unknown names raise ``ValueError``.
    """
    key = name.lower().replace("_", "-")
    if key not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    if weights is None:
        if key == "fmnist-resnet":
            return load_default_fmnist_model()
        return _BUILDERS[key]().eval()
    if str(weights) == "shared":
        if key.startswith("cifar-resnet") and int(key[len("cifar-resnet"):]) in CIFAR_RESNET_DEPTHS:
            return load_cifar_resnet(int(key[len("cifar-resnet"):]))
        raise ValueError(f"weights='shared' is only available for cifar-resnet20/32/44/56, "
                         f"not {name!r}")
    model = _BUILDERS[key]()
    model.load_state_dict(load_state_dict_file(weights), strict=True)
    return model.eval()
