"""Winograd convolution layer F(m x m, r x r) for stride-1, dilation-1 convs.

The pipeline is split into the three stages that quantization later hooks into:
``input_transform`` (BT d B on n x n tiles), ``hadamard`` (products of the
transformed weights and inputs summed over input channels: one batched matmul
per tap) and ``output_transform`` (AT M A, then tiles are stitched back).
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .transforms import toom_cook


# ----------------------------------------------------------------------------- eligibility
def winograd_ineligibility(conv: nn.Module) -> str | None:
    """Why ``conv`` cannot run as Winograd, or None when it can."""
    if not isinstance(conv, nn.Conv2d):
        return f"{type(conv).__name__} is not an nn.Conv2d"
    kh, kw = conv.kernel_size
    if kh != kw:
        return f"kernel {kh}x{kw} is not square"
    if kh == 1:
        return "1x1 kernel (Winograd saves nothing)"
    if conv.stride != (1, 1):
        return f"stride {conv.stride} (Winograd needs stride 1)"
    if conv.dilation != (1, 1):
        return f"dilation {conv.dilation} (Winograd needs dilation 1)"
    return None


def is_winograd_eligible(conv: nn.Module) -> bool:
    return winograd_ineligibility(conv) is None


def tile_for_kernel(m3: int, kernel: int) -> int | None:
    """Output tile of an r x r kernel with the same transform size n = m3 + 2 as F(m3, 3), or None
    when no tile m >= 2 fits. Quantized error grows with n, not with m: one 64-channel layer, W8A8 g32,
    learned scales, relative squared error on noise (docs/results.md): F(4,3) 2.0e-2 ~ F(2,5) 2.6e-2
    (n = 6); F(6,3) 7.7e-2 ~ F(4,5) 7.1e-2, F(2,7) 1.2e-1 (n = 8); F(6,5) (n = 10) 1.4e2."""
    m = m3 + 3 - kernel
    return m if m >= 2 else None


def winograd_choice(conv: nn.Module, m3: int, *, min_channels: int | None, kernels: tuple[int, ...],
                    forced: bool = False, min_channels_label: str | None = None) -> tuple[int | None, str]:
    """(output tile, detail) for an eligible-or-not conv under the recipe's rules: the tile when the
    conv runs as Winograd (detail "F(m,r)"), else None and why it stays direct. ``forced`` skips the
    channel and kernel-size rules (not the eligibility); ``min_channels_label`` names the threshold
    in the detail (e.g. "group size 32")."""
    why = winograd_ineligibility(conv)
    if why is not None:
        return None, why
    r = conv.kernel_size[0]
    if not forced:
        if r not in kernels:
            return None, (f"{r}x{r} kernel: only {'/'.join(f'{k}x{k}' for k in kernels) or 'no'} kernels run as "
                          "Winograd (winograd_kernels)")
        if min_channels is not None:
            for side, c in (("input", conv.in_channels), ("output", conv.out_channels)):
                if c < min_channels:
                    return None, f"{c} {side} channels < {min_channels_label or f'winograd_min_channels={min_channels}'}"
    m = tile_for_kernel(m3, r)
    if m is None:
        return None, f"{r}x{r} kernel: no output tile >= 2 with the {m3 + 2}x{m3 + 2} transforms of F({m3},3)"
    return m, f"F({m},{r})" + (" (forced)" if forced else "")


# ----------------------------------------------------------------------------- tiling
def conv_padding(conv_padding, kernel: int) -> tuple[int, int, int, int]:
    """F.pad spec (left, right, top, bottom) equal to a conv's padding argument."""
    if conv_padding == "valid":
        return (0, 0, 0, 0)
    if conv_padding == "same":
        total = kernel - 1  # stride 1, dilation 1: PyTorch puts the extra pixel right/bottom
        return (total // 2, total - total // 2, total // 2, total - total // 2)
    ph, pw = (conv_padding, conv_padding) if isinstance(conv_padding, int) else conv_padding
    return (pw, pw, ph, ph)


def extract_tiles(x: torch.Tensor, m: int, r: int, out_hw: tuple[int, int]) -> torch.Tensor:
    """(N, C, H, W) padded input -> (N, C, th, tw, n, n) overlapping tiles (a strided
    view after zero-padding the ragged bottom/right edge)."""
    n = m + r - 1
    th, tw = math.ceil(out_hw[0] / m), math.ceil(out_hw[1] / m)
    need_h, need_w = th * m + r - 1, tw * m + r - 1
    x = F.pad(x, (0, need_w - x.shape[-1], 0, need_h - x.shape[-2]))
    return x.unfold(2, n, m).unfold(3, n, m)


def stitch_tiles(y: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """(N, K, th, tw, m, m) output tiles -> (N, K, H_out, W_out)."""
    nb, k, th, tw, m, _ = y.shape
    y = y.permute(0, 1, 2, 4, 3, 5).reshape(nb, k, th * m, tw * m)
    return y[:, :, : out_hw[0], : out_hw[1]]


def transform_2d(mat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """mat @ X @ mat^T on the last two dims of x, as one GEMM with kron(mat, mat)
    (several times faster on CPU than two small batched matmuls)."""
    rows, cols = mat.shape
    kron = torch.kron(mat, mat)  # (rows^2, cols^2): vec(mat X mat^T) = kron(mat, mat) vec(X)
    y = torch.matmul(x.reshape(-1, cols * cols), kron.transpose(0, 1))
    return y.reshape(*x.shape[:-2], rows, rows)


def hadamard(u: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """Winograd-domain products summed over input channels.

    u: (K, C/groups, n, n) transformed weights; v: (N, C, th, tw, n, n) transformed
    tiles. Returns (N, K, th, tw, n, n). One (K/groups x C/groups) matmul per tap."""
    nb, c, th, tw, n, _ = v.shape
    k = u.shape[0]
    ug = u.reshape(groups, k // groups, c // groups, n * n).permute(3, 0, 1, 2)  # (taps, G, K/G, C/G)
    vg = v.reshape(nb, groups, c // groups, th * tw, n * n).permute(4, 1, 2, 0, 3)  # (taps, G, C/G, N, T)
    vg = vg.reshape(n * n, groups, c // groups, nb * th * tw)
    mg = torch.matmul(ug, vg)  # (taps, G, K/G, N*T)
    return mg.reshape(n, n, k, nb, th, tw).permute(3, 2, 4, 5, 0, 1)


# ---- taps-first layout: (n*n, C, N, th, tw). Every stage is then one plain GEMM
# (kron'd transforms, per-tap channel matmuls) and only tiling and stitching copy.
def tiles_taps_first(xp: torch.Tensor, m: int, r: int, out_hw: tuple[int, int]) -> torch.Tensor:
    """Padded input (N, C, H, W) -> tiles (n*n, C, N, th, tw)."""
    t = extract_tiles(xp, m, r, out_hw)  # (N, C, th, tw, n, n) view
    nb, c, th, tw, n, _ = t.shape
    return t.permute(4, 5, 1, 0, 2, 3).reshape(n * n, c, nb, th, tw)


def transform_taps_first(mat: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Apply mat . X . mat^T to every tile of a taps-first tensor."""
    rows = mat.shape[0]
    y = torch.matmul(torch.kron(mat, mat), t.reshape(t.shape[0], -1))
    return y.reshape(rows * rows, *t.shape[1:])


def hadamard_taps_first(u: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """u: (K, C/groups, n, n); v: (n*n, C, N, th, tw) -> M: (n*n, K, N, th, tw)."""
    taps, c = v.shape[:2]
    k = u.shape[0]
    ug = u.reshape(groups, k // groups, c // groups, taps).permute(3, 0, 1, 2)  # small: weights
    vg = v.reshape(taps, groups, c // groups, -1)
    return torch.matmul(ug, vg).reshape(taps, k, *v.shape[2:])


def stitch_taps_first(y: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """(m*m, K, N, th, tw) output tiles -> (N, K, H_out, W_out)."""
    mm, k, nb, th, tw = y.shape
    m = math.isqrt(mm)
    y = y.reshape(m, m, k, nb, th, tw).permute(3, 2, 4, 0, 5, 1).reshape(nb, k, th * m, tw * m)
    return y[:, :, : out_hw[0], : out_hw[1]]


class WinogradConv2d(nn.Module):
    """A stride-1 conv computed with Winograd F(m x m, r x r) transforms.

    Same parameters and result as the ``nn.Conv2d`` it was made from (float64:
    relative error < 1e-10 for F(2,3), F(4,3), F(6,3))."""

    def __init__(self, in_channels, out_channels, kernel_size: int, m: int, padding=0,
                 bias: bool = True, groups: int = 1, padding_mode: str = "zeros", points=None):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"channels ({in_channels}, {out_channels}) must be divisible by groups={groups}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.m, self.groups = kernel_size, m, groups
        self.padding, self.padding_mode = padding, padding_mode
        self.tc = toom_cook(m, kernel_size, points)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, m: int, points=None) -> "WinogradConv2d":
        why = winograd_ineligibility(conv)
        if why is not None:
            raise ValueError(f"cannot make a Winograd conv from {conv}: {why}. "
                             "Keep it as a direct conv (winoq.winograd.is_winograd_eligible tells beforehand).")
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size[0], m, conv.padding,
                    conv.bias is not None, conv.groups, conv.padding_mode, points)
        layer.to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(conv.weight)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer

    # ---- the pieces subclasses reuse
    def pad_input(self, x: torch.Tensor) -> torch.Tensor:
        pad = conv_padding(self.padding, self.kernel_size)
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        return F.pad(x, pad, mode=mode) if any(pad) else x

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__} expects (N, {self.in_channels}, H, W) input, got {tuple(x.shape)}")

    def output_hw(self, xp: torch.Tensor) -> tuple[int, int]:
        r = self.kernel_size
        h, w = xp.shape[-2] - r + 1, xp.shape[-1] - r + 1
        if h < 1 or w < 1:
            raise ValueError(f"input {tuple(xp.shape[-2:])} after padding is smaller than the {r}x{r} kernel")
        return h, w

    def transforms(self, dtype, device):
        tc = self.tc
        return (tc.AT.to(device, dtype), tc.G.to(device, dtype), tc.BT.to(device, dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        at, g, bt = self.transforms(x.dtype, x.device)
        xp = self.pad_input(x)
        out_hw = self.output_hw(xp)
        v = transform_taps_first(bt, tiles_taps_first(xp, self.m, self.kernel_size, out_hw))
        u = transform_2d(g, self.weight)
        y = stitch_taps_first(transform_taps_first(at, hadamard_taps_first(u, v, self.groups)), out_hw)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, F({self.m}x{self.m}, {self.kernel_size}x{self.kernel_size}), "
                f"padding={self.padding}, groups={self.groups}, bias={self.bias is not None}")


def winograd_or_direct(conv: nn.Conv2d, m: int) -> nn.Module:
    """Winograd version of ``conv`` when eligible, else ``conv`` itself with a warning."""
    why = winograd_ineligibility(conv)
    if why is None:
        return WinogradConv2d.from_conv(conv, m)
    warnings.warn(f"{conv} stays a direct conv: {why}", stacklevel=2)
    return conv
