"""A plain U-Net for 2-D segmentation with configurable depth, width and normalisation.

Every conv's output width is explicit in :class:`UNetConfig` (``widths``), so a network whose
filters were removed by structured pruning is rebuilt from its config alone: the widths of a
pruned model are recorded, and ``UNetSeg(config)`` gives the smaller network with the same
module names, into which the pruned weights load strictly.

Layout (``depth`` downsamplings, ``depth + 1`` resolution levels)::

    enc.{i}.conv1 / conv2     i = 0..depth-1, two 3x3 convs per level, then 2x2 max pool
    bottleneck.conv1 / conv2  at the lowest resolution
    dec.{j}.up                j = 0..depth-1, 2x2 transposed conv (stride 2), upsampling
    dec.{j}.conv1 / conv2     3x3 convs on cat(skip, upsampled)
    head                      1x1 conv to ``out_channels`` logits
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

NORMS = ("batch", "instance", "none")


def width_slots(depth: int) -> tuple[str, ...]:
    """The names of the convs whose output width is a free parameter, in config order."""
    enc = [f"enc.{i}.{c}" for i in range(depth) for c in ("conv1", "conv2")]
    mid = ["bottleneck.conv1", "bottleneck.conv2"]
    dec = [f"dec.{j}.{c}" for j in range(depth) for c in ("up", "conv1", "conv2")]
    return tuple(enc + mid + dec)


def default_widths(depth: int, base_width: int) -> tuple[int, ...]:
    """Classic U-Net widths: base_width * 2**level, halved again on the way up."""
    enc = [base_width * 2 ** i for i in range(depth) for _ in range(2)]
    mid = [base_width * 2 ** depth] * 2
    dec = [base_width * 2 ** (depth - 1 - j) for j in range(depth) for _ in range(3)]
    return tuple(enc + mid + dec)


@dataclass(frozen=True)
class UNetConfig:
    """Shape of a :class:`UNetSeg`.

    ``widths`` (one per entry of :func:`width_slots`) overrides ``base_width``; a pruned
    network carries its own widths here.  ``norm``: ``"batch"``, ``"instance"`` (affine) or
    ``"none"``.  Inputs must have height and width divisible by ``2**depth``.
    """
    in_channels: int = 1
    out_channels: int = 1
    depth: int = 3
    base_width: int = 32
    norm: str = "batch"
    widths: tuple[int, ...] | None = None

    def __post_init__(self):
        for name in ("in_channels", "out_channels", "depth", "base_width"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"UNetConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.norm not in NORMS:
            raise ValueError(f"UNetConfig.norm must be one of {NORMS}, got {self.norm!r}")
        if self.widths is not None:
            widths = tuple(int(w) for w in self.widths)
            need = len(width_slots(self.depth))
            if len(widths) != need:
                raise ValueError(f"UNetConfig.widths has {len(widths)} entries; depth {self.depth} "
                                 f"needs {need} (one per conv in width_slots({self.depth}))")
            if min(widths) < 1:
                raise ValueError(f"UNetConfig.widths must all be >= 1, got {widths}")
            object.__setattr__(self, "widths", widths)

    def resolved_widths(self) -> tuple[int, ...]:
        return self.widths if self.widths is not None else default_widths(self.depth, self.base_width)

    def width_map(self) -> dict[str, int]:
        return dict(zip(width_slots(self.depth), self.resolved_widths()))

    def with_widths(self, widths) -> "UNetConfig":
        return replace(self, widths=tuple(int(w) for w in widths))

    def to_dict(self) -> dict:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels, "depth": self.depth,
                "base_width": self.base_width, "norm": self.norm, "widths": list(self.resolved_widths())}

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        known = {"in_channels", "out_channels", "depth", "base_width", "norm", "widths"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown UNetConfig keys {sorted(unknown)}; known: {sorted(known)}")
        d = dict(d)
        if d.get("widths") is not None:
            d["widths"] = tuple(d["widths"])
        return cls(**d)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    return nn.Identity()


class ConvBlock(nn.Module):
    """conv3x3 - norm - ReLU - conv3x3 - norm - ReLU."""

    def __init__(self, cin: int, mid: int, cout: int, norm: str):
        super().__init__()
        bias = norm == "none"   # a bias before a norm layer is redundant
        self.conv1 = nn.Conv2d(cin, mid, 3, padding=1, bias=bias)
        self.norm1 = _norm(norm, mid)
        self.conv2 = nn.Conv2d(mid, cout, 3, padding=1, bias=bias)
        self.norm2 = _norm(norm, cout)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.act(self.norm1(self.conv1(x)))
        return self.act(self.norm2(self.conv2(x)))


class UpBlock(nn.Module):
    """2x transposed-conv upsampling, concatenation with the skip, then a ConvBlock."""

    def __init__(self, cin: int, skip: int, up: int, mid: int, cout: int, norm: str):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, up, 2, stride=2)
        block = ConvBlock(skip + up, mid, cout, norm)
        # flat names (dec.j.conv1) keep the width slots readable
        self.conv1, self.norm1, self.conv2, self.norm2, self.act = (
            block.conv1, block.norm1, block.conv2, block.norm2, block.act)

    def forward(self, x, skip):
        x = torch.cat([skip, self.up(x)], dim=1)
        x = self.act(self.norm1(self.conv1(x)))
        return self.act(self.norm2(self.conv2(x)))


class UNetSeg(nn.Module):
    """U-Net returning per-pixel logits of shape (N, out_channels, H, W)."""

    def __init__(self, config: UNetConfig | None = None, **kwargs):
        super().__init__()
        if config is None:
            config = UNetConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a UNetConfig or keyword arguments, not both")
        self.config = config
        w = config.width_map()
        d = config.depth
        self.enc = nn.ModuleList()
        cin = config.in_channels
        for i in range(d):
            self.enc.append(ConvBlock(cin, w[f"enc.{i}.conv1"], w[f"enc.{i}.conv2"], config.norm))
            cin = w[f"enc.{i}.conv2"]
        self.bottleneck = ConvBlock(cin, w["bottleneck.conv1"], w["bottleneck.conv2"], config.norm)
        cin = w["bottleneck.conv2"]
        self.dec = nn.ModuleList()
        for j in range(d):
            skip = w[f"enc.{d - 1 - j}.conv2"]
            self.dec.append(UpBlock(cin, skip, w[f"dec.{j}.up"], w[f"dec.{j}.conv1"], w[f"dec.{j}.conv2"],
                                    config.norm))
            cin = w[f"dec.{j}.conv2"]
        self.head = nn.Conv2d(cin, config.out_channels, 1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        m = 2 ** self.config.depth
        # under torch.jit / torch.fx tracing the shapes are symbolic (an fx Proxy is not a Tensor)
        if not torch.jit.is_tracing() and isinstance(x, torch.Tensor) and (x.shape[-1] % m or x.shape[-2] % m):
            raise ValueError(f"UNetSeg(depth={self.config.depth}) needs height and width divisible by {m}, "
                             f"got {tuple(x.shape[-2:])}; pad or resize the input")
        skips = []
        for block in self.enc:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for block, skip in zip(self.dec, reversed(skips)):
            x = block(x, skip)
        return self.head(x)


def measured_widths(model: UNetSeg) -> tuple[int, ...]:
    """The output widths a (possibly pruned) UNetSeg actually has, in width_slots order."""
    return tuple(model.get_submodule(name).out_channels for name in width_slots(model.config.depth))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
