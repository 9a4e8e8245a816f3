"""Figures for reports (matplotlib, Agg backend: no display needed).

``plot_layer_sqnr``   per-layer SQNR of the quantized Winograd layers on noise,
                      standard Toom-Cook transforms vs closed-form vs learned scales.
``plot_tap_ranges``   per-tap dynamic range (log10 of max |.| per Winograd tap) of
                      V = BT d B, U = G g G^T and M = sum_c U * V for one layer,
                      standard transforms vs learned scales.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # before pyplot: file output only, works without a display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .winograd.conv import extract_tiles, hadamard, transform_2d  # noqa: E402

__all__ = ["plot_layer_sqnr", "plot_tap_ranges", "tap_ranges"]

_SERIES = (  # calibration key, legend label, colour
    ("sqnr_standard_db", "standard transforms", "#c44e52"),
    ("sqnr_closed_form_db", "closed-form scales", "#dd8452"),
    ("sqnr_learned_db", "learned scales", "#4c72b0"),
)


def _calibrated(reports) -> list:
    return [r for r in reports if getattr(r, "kind", None) == "winograd"
            and all(k in (r.calibration or {}) for k, _, _ in _SERIES)]


def plot_layer_sqnr(reports_by_label: Mapping[str, Sequence], path: str | os.PathLike) -> str:
    """Grouped bars of each Winograd layer's SQNR (dB, on held-out random noise),
    one panel per label (e.g. ``{"F(4,3)": report, "F(6,3)": report}`` where each report
    is the ``winoq_report`` of a model quantized with ``scales="learned"``: its layers
    carry the SQNR with standard, closed-form and learned scales). Layers without those
    numbers are skipped. Returns the PNG path."""
    labels = list(reports_by_label)
    if not labels:
        raise ValueError("plot_layer_sqnr needs at least one labelled report")
    fig, axes = plt.subplots(len(labels), 1, figsize=(11, 3.6 * len(labels) + 0.6), squeeze=False)
    for ax, label in zip(axes[:, 0], labels):
        layers = _calibrated(reports_by_label[label])
        ax.set_title(f"{label}: per-layer SQNR of the quantized Winograd output (held-out noise input)",
                     fontsize=11)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.grid(axis="y", alpha=0.3)
        ax.set_ylabel("SQNR (dB, higher is better)")
        if not layers:
            ax.text(0.5, 0.5, "no per-layer SQNR recorded (quantize with scales='learned')",
                    ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            continue
        width = 0.8 / len(_SERIES)
        xs = range(len(layers))
        for j, (key, name, colour) in enumerate(_SERIES):
            vals = [float(r.calibration[key]) for r in layers]
            offs = [x + (j - (len(_SERIES) - 1) / 2) * width for x in xs]
            bars = ax.bar(offs, vals, width, label=name, color=colour)
            if key != "sqnr_closed_form_db":  # label the two ends of the comparison
                for b, v in zip(bars, vals):
                    ax.annotate(f"{v:.0f}", (b.get_x() + b.get_width() / 2, v),
                                xytext=(0, 2 if v >= 0 else -9), textcoords="offset points",
                                ha="center", fontsize=7)
        std = [float(r.calibration["sqnr_standard_db"]) for r in layers]
        lrn = [float(r.calibration["sqnr_learned_db"]) for r in layers]
        ax.text(0.01, 0.97, f"mean: standard {sum(std) / len(std):.1f} dB -> learned {sum(lrn) / len(lrn):.1f} dB",
                transform=ax.transAxes, va="top", fontsize=9,
                bbox=dict(boxstyle="round", facecolor="white", alpha=0.8, edgecolor="0.8"))
        ax.set_xticks(list(xs))
        ax.set_xticklabels([r.name for r in layers], rotation=30, ha="right", fontsize=8)
        lo, hi = min(0.0, *std, *lrn), max(0.0, *std, *lrn)
        pad = 0.12 * (hi - lo or 1.0)
        ax.set_ylim(lo - pad, hi + 2 * pad)
        ax.legend(loc="upper right", fontsize=8, ncol=3)
    fig.tight_layout()
    return save_figure(fig, path)


@torch.no_grad()
def tap_ranges(layer, x: torch.Tensor | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """log10 of the largest |value| of each Winograd tap (n x n tensors) for V = BT d B,
    U = G g G^T and M = sum_c U * V, computed in float64 with the layer's own (scaled)
    transforms and without quantization. ``x`` defaults to Gaussian noise
    (4 images of 8 x 8 output tiles)."""
    if x is None:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn((4, layer.in_channels, 8 * layer.m, 8 * layer.m), generator=gen)
    x = x.double()
    _, g, bt = layer.transforms(torch.float64, x.device)
    xp = layer.pad_input(x)
    tiles = extract_tiles(xp, layer.m, layer.kernel_size, layer.output_hw(xp))
    v = transform_2d(bt, tiles)
    u = transform_2d(g, layer.weight.detach().double())
    mprod = hadamard(u, v, layer.groups)

    def per_tap(t):
        return t.abs().flatten(0, -3).amax(0).clamp_min(1e-30).log10()

    return {"V": per_tap(v), "U": per_tap(u), "M": per_tap(mprod)}


def plot_tap_ranges(qlayer_standard, qlayer_learned, path: str | os.PathLike, *, title: str | None = None,
                    seed: int = 0) -> str:
    """Heatmaps of the per-tap range (log10 max |.|) of V, U and M for one quantized
    Winograd layer with standard transforms (left) and learned scales (right), on the
    same Gaussian noise input. Each row shares one colour scale; a panel's title gives
    its spread (largest / smallest tap maximum): with one shared scale per tile, taps far
    below the largest get few quantization levels. Returns the PNG path."""
    if qlayer_standard.tc.n != qlayer_learned.tc.n or qlayer_standard.in_channels != qlayer_learned.in_channels:
        raise ValueError("plot_tap_ranges needs two versions of the same layer (same F(m, r) and channels)")
    gen = torch.Generator().manual_seed(seed)
    lay = qlayer_standard
    x = torch.randn((4, lay.in_channels, 8 * lay.m, 8 * lay.m), generator=gen)
    sides = {"standard transforms": tap_ranges(qlayer_standard, x), "learned scales": tap_ranges(qlayer_learned, x)}
    rows = (("V", "V = BT d B  (transformed input tile)"),
            ("U", "U = G g G^T  (transformed weights)"),
            ("M", "M = sum_c U * V  (Winograd-domain product)"))
    n = lay.tc.n
    fig, axes = plt.subplots(len(rows), 2, figsize=(10.5, 4.3 * len(rows) + 0.8), squeeze=False)
    small = n > 6
    for i, (key, row_name) in enumerate(rows):
        vals = [side[key] for side in sides.values()]
        vmin = min(float(v.min()) for v in vals)
        vmax = max(float(v.max()) for v in vals)
        for j, (side_name, side) in enumerate(sides.items()):
            ax = axes[i, j]
            data = side[key].float().numpy()
            im = ax.imshow(data, cmap="viridis", vmin=vmin, vmax=vmax)
            spread = float(side[key].max() - side[key].min())
            ax.set_title(f"{key}, {side_name}\nspread max/min = 10^{spread:.1f} = {_ratio(spread)}",
                         fontsize=10)
            ax.set_xticks(range(n))
            ax.set_yticks(range(n))
            ax.tick_params(labelsize=7)
            mid = (vmin + vmax) / 2
            for a in range(n):
                for b in range(n):
                    ax.text(b, a, f"{data[a, b]:.1f}", ha="center", va="center", fontsize=6.5 if small else 8,
                            color="black" if data[a, b] > mid else "white")
            if j == 0:
                ax.set_ylabel(row_name, fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="log10 max |value|")
    head = title or f"Per-tap ranges of a F({lay.m},{lay.kernel_size}) layer on Gaussian noise"
    fig.suptitle(head + "\n(log10 of the largest |value| of each tap, before quantization)", fontsize=12)
    fig.tight_layout()
    return save_figure(fig, path)


def _ratio(log10_spread: float) -> str:
    r = 10 ** log10_spread
    if r < 10:
        return f"{r:.1f}x"
    return f"{r:,.0f}x" if r < 1e5 else f"{r:.1e}x"


def save_figure(fig, path, dpi: int = 110) -> str:
    """Write ``fig`` to ``path`` and close it; returns the name matplotlib wrote (``path.png`` when
    ``path`` has no suffix)."""
    path = Path(path) if Path(path).suffix else Path(f"{path}.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return str(path)
