"""Plots of a pruning study: Dice vs compression, latency vs compression, example overlays."""
from __future__ import annotations

import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def plot_dice_vs_ratio(rows: list[dict], dense_dice: float, path: str | os.PathLike, title: str = "") -> str:
    """One line per (criterion, schedule, allocation, fine-tuning steps): Dice against parameter and
    MAC compression. ``rows``: dicts with criterion, schedule, ratio_params, ratio_macs, dice
    (optionally allocation, finetune_steps)."""
    series = defaultdict(list)
    for r in rows:
        name = "/".join([r["criterion"], r["schedule"]] + ([r["allocation"]] if "allocation" in r else []))
        series[name + (f", {r['finetune_steps']} steps" if "finetune_steps" in r else "")].append(r)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, key, label in ((axes[0], "ratio_params", "parameter compression (x)"),
                           (axes[1], "ratio_macs", "MAC compression (x)")):
        for name, rs in sorted(series.items()):
            rs = sorted(rs, key=lambda r: r[key])
            ax.plot([r[key] for r in rs], [r["dice"] for r in rs], "o-", label=name)
        ax.axhline(dense_dice, color="k", lw=1, label="dense")
        ax.axhline(dense_dice * 0.96, color="k", lw=1, ls="--", label="dense - 4%")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test Dice")
    axes[1].legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def plot_latency_vs_ratio(rows: list[dict], path: str | os.PathLike, title: str = "") -> str:
    """``rows``: dicts with ratio_params and latency columns ``<runtime>_<threads>t_ms``."""
    rows = sorted(rows, key=lambda r: r["ratio_params"])
    keys = sorted({k for r in rows for k in r if k.endswith("_ms")})
    fig, ax = plt.subplots(figsize=(6, 4))
    for k in keys:
        pts = [(r["ratio_params"], r[k]) for r in rows if k in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=k[:-3])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameter compression (x)")
    ax.set_ylabel("latency per image (ms, median)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(title)
    return _save(fig, path)


def plot_overlays(image: torch.Tensor, truth: torch.Tensor, predictions: dict[str, torch.Tensor],
                  path: str | os.PathLike, title: str = "") -> str:
    """Image, ground truth and each prediction (mask in red over the image)."""
    img = image.float()
    img = img.mean(0) if img.shape[0] != 3 else img.permute(1, 2, 0)
    img = (img - img.min()) / (img.max() - img.min() + 1e-8)
    panels = [("image", None), ("ground truth", truth)] + list(predictions.items())
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.2))
    for ax, (name, mask) in zip(axes, panels):
        ax.imshow(img, cmap="gray" if img.dim() == 2 else None)
        if mask is not None:
            m = mask.reshape(mask.shape[-2:]).float().numpy()
            overlay = torch.zeros(*m.shape, 4).numpy()
            overlay[..., 0], overlay[..., 3] = 1.0, 0.45 * m
            ax.imshow(overlay)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title)
    return _save(fig, path)


def _save(fig, path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
