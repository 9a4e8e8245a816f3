"""A small DDPM UNet for 28x28 (or any size divisible by 2**(levels-1)) images.

Architecture (Ho et al. 2020, scaled down): 3x3 conv stem; per resolution level
``num_res_blocks`` residual blocks (GroupNorm -> SiLU -> 3x3 conv, time embedding
added after the first conv, GroupNorm -> SiLU -> dropout -> 3x3 conv, 1x1 conv skip
when the width changes) and a stride-2 3x3 conv down-sampler; a middle of
ResBlock / self-attention / ResBlock; a mirrored decoder that concatenates the
encoder skips (``num_res_blocks + 1`` blocks per level, nearest-neighbour 2x
up-sampling followed by a 3x3 conv); GroupNorm -> SiLU -> 3x3 conv head.
Self-attention (single head, 1x1 conv q/k/v/out) runs at the resolutions listed in
``attn_levels`` (default: the lowest, 7x7 for 28x28 inputs: no padding needed).

Time: sinusoidal embedding of t (width ``base``) -> Linear -> SiLU -> Linear
(width ``4 * base``). Optional class conditioning: an ``nn.Embedding`` of
``num_classes + 1`` rows added to the time embedding; the last row is the null
class used for classifier-free guidance (labels equal to ``num_classes``, or
``None``, mean unconditional).

Every 3x3 conv is stride 1 (Winograd-eligible) except the down-samplers.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["UNetConfig", "DDPMUNet", "timestep_embedding"]


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 1
    out_channels: int = 1
    base: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attn_levels: tuple[int, ...] = (2,)   # level indices (0 = full resolution) with self-attention
    groups: int = 8                       # GroupNorm groups
    dropout: float = 0.0
    num_classes: int | None = None        # None: unconditional
    image_size: int = 28

    def __post_init__(self):
        object.__setattr__(self, "channel_mults", tuple(int(c) for c in self.channel_mults))
        object.__setattr__(self, "attn_levels", tuple(int(c) for c in self.attn_levels))
        if self.base < 1 or not self.channel_mults or self.num_res_blocks < 1:
            raise ValueError("base, channel_mults and num_res_blocks must be positive / non-empty")
        for m in self.channel_mults:
            if (self.base * m) % self.groups:
                raise ValueError(f"width {self.base * m} is not divisible by groups={self.groups}")
        if any(not 0 <= a < len(self.channel_mults) for a in self.attn_levels):
            raise ValueError(f"attn_levels {self.attn_levels} outside 0..{len(self.channel_mults) - 1}")
        if self.image_size % (2 ** (len(self.channel_mults) - 1)):
            raise ValueError(f"image_size {self.image_size} is not divisible by 2**{len(self.channel_mults) - 1}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [N, dim] of (possibly fractional) timesteps t [N]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, tdim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(tdim, cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions (1x1 conv projections)."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        attn = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(c), dim=-1)
        out = torch.einsum("bij,bcj->bci", attn, v).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList()
        self.attns = nn.ModuleList()


class DDPMUNet(nn.Module):
    """Noise-prediction UNet: ``forward(x [N,C,H,W], t [N] or scalar, y [N] or None) -> eps``."""

    def __init__(self, config: UNetConfig | None = None, **kwargs):
        super().__init__()
        cfg = config or UNetConfig(**kwargs)
        self.config = cfg
        base, g = cfg.base, cfg.groups
        tdim = 4 * base
        self.time_mlp = nn.Sequential(nn.Linear(base, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.class_emb = nn.Embedding(cfg.num_classes + 1, tdim) if cfg.num_classes else None
        self.conv_in = nn.Conv2d(cfg.in_channels, base, 3, padding=1)

        widths = [base * m for m in cfg.channel_mults]
        skips = [base]
        ch = base
        self.down = nn.ModuleList()
        for i, w in enumerate(widths):
            lvl = _Level()
            for _ in range(cfg.num_res_blocks):
                lvl.blocks.append(ResBlock(ch, w, tdim, g, cfg.dropout))
                lvl.attns.append(AttnBlock(w, g) if i in cfg.attn_levels else nn.Identity())
                ch = w
                skips.append(ch)
            lvl.sample = Downsample(ch) if i < len(widths) - 1 else nn.Identity()
            if i < len(widths) - 1:
                skips.append(ch)
            self.down.append(lvl)

        self.mid1 = ResBlock(ch, ch, tdim, g, cfg.dropout)
        self.mid_attn = AttnBlock(ch, g)
        self.mid2 = ResBlock(ch, ch, tdim, g, cfg.dropout)

        self.up = nn.ModuleList()
        for i, w in reversed(list(enumerate(widths))):
            lvl = _Level()
            for _ in range(cfg.num_res_blocks + 1):
                lvl.blocks.append(ResBlock(ch + skips.pop(), w, tdim, g, cfg.dropout))
                lvl.attns.append(AttnBlock(w, g) if i in cfg.attn_levels else nn.Identity())
                ch = w
            lvl.sample = Upsample(ch) if i > 0 else nn.Identity()
            self.up.append(lvl)

        self.norm_out = nn.GroupNorm(g, ch)
        self.conv_out = nn.Conv2d(ch, cfg.out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @property
    def num_classes(self) -> int | None:
        return self.config.num_classes

    def embed(self, t: torch.Tensor, y: torch.Tensor | None, n: int, device) -> torch.Tensor:
        t = torch.as_tensor(t, device=device)
        if t.ndim == 0:
            t = t.expand(n)
        emb = self.time_mlp(timestep_embedding(t, self.config.base))
        if self.class_emb is not None:
            if y is None:
                y = torch.full((n,), self.config.num_classes, dtype=torch.long, device=device)
            emb = emb + self.class_emb(torch.as_tensor(y, device=device).long())
        return emb

    def forward(self, x: torch.Tensor, t, y: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"expected x of shape [N, {cfg.in_channels}, H, W], got {tuple(x.shape)}")
        if x.shape[-1] % (2 ** (len(cfg.channel_mults) - 1)) or x.shape[-2] % (2 ** (len(cfg.channel_mults) - 1)):
            raise ValueError(f"H and W must be divisible by {2 ** (len(cfg.channel_mults) - 1)}, got {tuple(x.shape[-2:])}")
        emb = self.embed(t, y, x.shape[0], x.device)
        h = self.conv_in(x)
        hs = [h]
        for lvl in self.down:
            for block, attn in zip(lvl.blocks, lvl.attns):
                h = attn(block(h, emb))
                hs.append(h)
            if not isinstance(lvl.sample, nn.Identity):
                h = lvl.sample(h)
                hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for lvl in self.up:
            for block, attn in zip(lvl.blocks, lvl.attns):
                h = attn(block(torch.cat([h, hs.pop()], dim=1), emb))
            h = lvl.sample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
