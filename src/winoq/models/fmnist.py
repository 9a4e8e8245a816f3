"""A small ResNet for Fashion-MNIST (1x28x28), with committed pretrained weights.

Architecture (defaults): stem 3x3 conv 1->16 + BN + ReLU; three stages of BasicBlocks
(torchvision-style names: conv1/bn1/conv2/bn2/downsample.0/.1) with widths 16/32/64 at
28x28, 14x14 and 7x7; the first block of stages 2 and 3 has stride 2 and a 1x1 conv + BN
downsample; global average pool; ``fc`` to 10 classes.  All other convs are 3x3 stride 1,
the Winograd targets.  Input: images in [0, 1] standardized with mean 0.2860 / std 0.3530
(:func:`winoq.data.fashion_mnist_tensors`).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Sequence

import torch
import torch.nn as nn

from .resnet import BasicBlock, conv1x1, conv3x3

__all__ = [
    "FMNIST_WEIGHTS",
    "FMNIST_METADATA",
    "FmnistResNet",
    "fmnist_resnet",
    "load_default_fmnist_model",
    "fmnist_metadata",
]

FMNIST_WEIGHTS = "fmnist_resnet.safetensors"
FMNIST_METADATA = "fmnist_resnet.json"

DEFAULT_WIDTHS = (16, 32, 64)
DEFAULT_BLOCKS = (1, 1, 2)


class FmnistResNet(nn.Module):
    def __init__(self, widths: Sequence[int] = DEFAULT_WIDTHS,
                 blocks: Sequence[int] = DEFAULT_BLOCKS, num_classes: int = 10,
                 in_channels: int = 1):
        super().__init__()
        if len(widths) != len(blocks) or not widths:
            raise ValueError(f"widths {widths} and blocks {blocks} must be non-empty and "
                             f"of equal length")
        self.widths = tuple(int(w) for w in widths)
        self.blocks = tuple(int(b) for b in blocks)
        self.conv1 = conv3x3(in_channels, self.widths[0])
        self.bn1 = nn.BatchNorm2d(self.widths[0])
        self.relu = nn.ReLU(inplace=True)
        inplanes = self.widths[0]
        for i, (w, n) in enumerate(zip(self.widths, self.blocks)):
            stride = 1 if i == 0 else 2
            layers = []
            for j in range(n):
                s = stride if j == 0 else 1
                down = None
                if s != 1 or inplanes != w:
                    down = nn.Sequential(conv1x1(inplanes, w, s), nn.BatchNorm2d(w))
                layers.append(BasicBlock(inplanes, w, s, down))
                inplanes = w
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():  # zero-init the last BN of each residual branch
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(len(self.widths)):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def config(self) -> dict:
        return {"widths": list(self.widths), "blocks": list(self.blocks),
                "num_classes": self.fc.out_features, "in_channels": self.conv1.in_channels}


def fmnist_resnet(widths: Sequence[int] = DEFAULT_WIDTHS, blocks: Sequence[int] = DEFAULT_BLOCKS,
                  num_classes: int = 10) -> FmnistResNet:
    """Randomly initialised Fashion-MNIST ResNet (default: the committed architecture)."""
    return FmnistResNet(widths, blocks, num_classes)


def _asset(name: str):
    return resources.files("winoq").joinpath("assets", name)


def fmnist_metadata() -> dict:
    """Training metadata of the committed weights (seed, epochs, measured accuracy, ...)."""
    return json.loads(_asset(FMNIST_METADATA).read_text(encoding="utf-8"))


def load_default_fmnist_model() -> FmnistResNet:
    """The committed pretrained Fashion-MNIST ResNet, in eval mode (safetensors, no pickle)."""
    from safetensors.torch import load as st_load

    res = _asset(FMNIST_WEIGHTS)
    if not res.is_file():
        raise FileNotFoundError(f"packaged weights winoq/assets/{FMNIST_WEIGHTS} are missing; "
                                f"reinstall winoq or run scripts/train_fmnist.py")
    state = st_load(res.read_bytes())
    try:
        cfg = fmnist_metadata().get("config", {})
    except FileNotFoundError:
        cfg = {}
    model = FmnistResNet(cfg.get("widths", DEFAULT_WIDTHS), cfg.get("blocks", DEFAULT_BLOCKS),
                         cfg.get("num_classes", 10), cfg.get("in_channels", 1))
    model.load_state_dict(state, strict=True)
    return model.eval()
