"""CIFAR-10 ResNet-20/32/44/56 (He et al. 2016, CIFAR variant, option-A shortcuts).

Module and parameter names match the pretrained checkpoints in
``shared/models/cifar10-resnet/resnet{20,32,44,56}-*.th`` (after stripping the
``module.`` prefix that DataParallel added).  Input: RGB in [0, 1], normalized with
mean (0.485, 0.456, 0.406) / std (0.229, 0.224, 0.225) (see
:func:`winoq.data.cifar_transform`).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "CIFAR_RESNET_DEPTHS",
    "CifarBasicBlock",
    "LambdaShortcut",
    "CifarResNet",
    "cifar_resnet",
    "cifar_resnet20",
    "cifar_resnet32",
    "cifar_resnet44",
    "cifar_resnet56",
    "default_shared_dirs",
    "find_cifar_resnet_checkpoint",
    "load_cifar_resnet",
]

CIFAR_RESNET_DEPTHS = (20, 32, 44, 56)


class LambdaShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad ``planes // 4`` channels on each side."""

    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"pad_channels={self.pad}"


class CifarBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = LambdaShortcut(planes)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, num_blocks: tuple[int, int, int], num_classes: int = 10):
        super().__init__()
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(32, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(64, num_blocks[2], stride=2)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(CifarBasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def cifar_resnet(depth: int = 20, num_classes: int = 10) -> CifarResNet:
    """Randomly initialised CIFAR ResNet of ``depth`` in (20, 32, 44, 56) (``6n + 2``)."""
    if depth not in CIFAR_RESNET_DEPTHS:
        raise ValueError(f"CIFAR ResNet depth must be one of {CIFAR_RESNET_DEPTHS}, got {depth}")
    n = (depth - 2) // 6
    return CifarResNet((n, n, n), num_classes)


def cifar_resnet20(num_classes: int = 10) -> CifarResNet:
    return cifar_resnet(20, num_classes)


def cifar_resnet32(num_classes: int = 10) -> CifarResNet:
    return cifar_resnet(32, num_classes)


def cifar_resnet44(num_classes: int = 10) -> CifarResNet:
    return cifar_resnet(44, num_classes)


def cifar_resnet56(num_classes: int = 10) -> CifarResNet:
    return cifar_resnet(56, num_classes)


def _repo_root() -> Path:
    # src/winoq/models/cifar_resnet.py -> repository root
    return Path(__file__).resolve().parents[3]


def default_shared_dirs() -> list[Path]:
    """Where the shared data/model folder is looked for, in order: ``$WINOQ_SHARED``,
    ``../shared`` relative to the working directory, ``../shared`` next to the repo."""
    dirs = []
    env = os.environ.get("WINOQ_SHARED")
    if env:
        dirs.append(Path(env))
    dirs.append(Path.cwd() / ".." / "shared")
    dirs.append(_repo_root().parent / "shared")
    out: list[Path] = []
    for d in dirs:
        d = d.resolve()
        if d not in out:
            out.append(d)
    return out


def find_cifar_resnet_checkpoint(depth: int, shared_dir: str | os.PathLike | None = None) -> Path:
    """Locate ``resnet{depth}-*.th`` under ``<shared>/models/cifar10-resnet`` (or directly in
    ``shared_dir``).  Raises ``FileNotFoundError`` listing every place searched."""
    if depth not in CIFAR_RESNET_DEPTHS:
        raise ValueError(f"CIFAR ResNet depth must be one of {CIFAR_RESNET_DEPTHS}, got {depth}")
    roots = [Path(shared_dir)] if shared_dir is not None else default_shared_dirs()
    searched = []
    for root in roots:
        for d in (root / "models" / "cifar10-resnet", root):
            searched.append(str(d))
            hits = sorted(d.glob(f"resnet{depth}-*.th")) if d.is_dir() else []
            if hits:
                return hits[0]
    raise FileNotFoundError(
        f"no checkpoint matching resnet{depth}-*.th found; looked in: {', '.join(searched)}. "
        f"Pass path=... or shared_dir=..., or set WINOQ_SHARED to the shared folder "
        f"(the one holding models/cifar10-resnet/).")


def _strip_prefix(state_dict: dict, prefix: str = "module.") -> dict:
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def load_cifar_resnet(depth: int = 20, path: str | os.PathLike | None = None,
                      shared_dir: str | os.PathLike | None = None) -> CifarResNet:
    """Pretrained CIFAR-10 ResNet in eval mode.

    The checkpoint is ``path`` if given, else found by :func:`find_cifar_resnet_checkpoint`.
    It is read with ``torch.load(..., weights_only=True)``; unsafe pickle is never used.
    """
    path = Path(path) if path is not None else find_cifar_resnet_checkpoint(depth, shared_dir)
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR ResNet checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError) as e:
        raise RuntimeError(
            f"could not load {path} with torch.load(weights_only=True): {e}. The file should "
            f"hold only tensors and numbers; it is corrupt or not a CIFAR ResNet checkpoint "
            f"(unsafe pickle loading is deliberately not attempted).") from e
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise RuntimeError(f"{path} does not contain a state dict (got {type(ckpt).__name__})")
    model = cifar_resnet(depth)
    model.load_state_dict(_strip_prefix(state), strict=True)
    return model.eval()
