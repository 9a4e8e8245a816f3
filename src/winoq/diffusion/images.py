"""Image helpers: [-1, 1] samples to uint8, grids, side-by-side panels, PNG output (Pillow)."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

__all__ = ["to_unit", "to_uint8", "make_grid", "save_grid", "save_panels"]


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] (clamped)."""
    return ((x.float() + 1) / 2).clamp(0, 1)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (to_unit(x) * 255).round().to(torch.uint8)


def make_grid(x: torch.Tensor, nrow: int = 10, pad: int = 2, value: int = 255) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> uint8 HxW (C=1) or HxWx3 grid with ``nrow`` images per row."""
    if x.ndim != 4:
        raise ValueError(f"expected [N, C, H, W], got {tuple(x.shape)}")
    n, c, h, w = x.shape
    ncol = max(1, min(nrow, n))
    rows = max(1, -(-n // ncol))
    img = to_uint8(x).permute(0, 2, 3, 1).numpy()
    grid = np.full((rows * (h + pad) + pad, ncol * (w + pad) + pad, c), value, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, ncol)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = img[i]
    return grid[..., 0] if c == 1 else grid


def _upscale(a: np.ndarray, scale: int) -> np.ndarray:
    return a.repeat(scale, 0).repeat(scale, 1) if scale > 1 else a


def save_grid(x: torch.Tensor, path: str | os.PathLike, nrow: int = 10, scale: int = 2) -> None:
    from PIL import Image

    Image.fromarray(_upscale(make_grid(x, nrow), scale)).save(os.fspath(path))


def save_panels(panels: Sequence[tuple[str, torch.Tensor]], path: str | os.PathLike, nrow: int = 8,
                scale: int = 2, columns: int | None = None) -> None:
    """Several grids, each with its title above it, ``columns`` panels per row (default: all in one row)."""
    from PIL import Image, ImageDraw

    grids = [_upscale(make_grid(x, nrow), scale) for _, x in panels]
    cols = max(1, min(columns or len(grids), len(grids)))
    title_h, gap = 16, 12
    cell_w = max(g.shape[1] for g in grids)
    cell_h = max(g.shape[0] for g in grids) + title_h
    rows = -(-len(grids) // cols)
    canvas = Image.new("L", (cols * cell_w + gap * (cols - 1), rows * cell_h + gap * (rows - 1)), 255)
    draw = ImageDraw.Draw(canvas)
    for i, ((title, _), g) in enumerate(zip(panels, grids)):
        r, c = divmod(i, cols)
        x0, y0 = c * (cell_w + gap), r * (cell_h + gap)
        canvas.paste(Image.fromarray(g), (x0, y0 + title_h))
        draw.text((x0 + 2, y0 + 2), title, fill=0)
    canvas.save(os.fspath(path))
