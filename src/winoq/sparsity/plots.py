"""Plots of a sparsity search: the Pareto front with the baselines marked, per-layer bars."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from .search import Record, pareto

_MARKERS = {"dense": ("k", "s"), "uniform": ("tab:blue", "o"), "unaware": ("tab:orange", "^"),
            "greedy": ("tab:green", "D"), "hass": ("tab:red", "*")}


def plot_pareto(records: Mapping[str, Sequence[Record]], path: str | Path, title: str = "",
                highlight: Mapping[str, Record] | None = None) -> Path:
    """Accuracy vs images/s and vs images/s per DSP. ``records``: method -> allocated records
    (``design`` set); each method's points and Pareto front are drawn, ``highlight`` (label ->
    record) marks chosen designs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "throughput", "images/s"), (axes[1], "throughput_per_dsp", "images/s per DSP")):
        for method, recs in records.items():
            recs = [r for r in recs if r.design]
            if not recs:
                continue
            color, marker = _MARKERS.get(method, ("gray", "."))
            pts = [(r.design[key], r.accuracy) for r in recs]
            ax.scatter(*zip(*pts), s=14, alpha=0.35, color=color, marker=marker)
            front = pareto(pts)
            ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], color=color, marker=marker,
                    label=method, lw=1.2)
        for lab, r in (highlight or {}).items():
            ax.scatter([r.design[key]], [r.accuracy], s=120, facecolors="none", edgecolors="k", lw=1.5)
            ax.annotate(lab, (r.design[key], r.accuracy), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 accuracy on calibration images (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_layers(record: Record, path: str | Path, title: str = "") -> Path:
    """Per-conv weight / activation / product sparsity and per-engine DSP and BRAM of ``record``'s
    design, the bottleneck engine marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if not record.design:
        raise ValueError("plot_layers needs an allocated record (record.design is None)")
    fig, (top, bot) = plt.subplots(2, 1, figsize=(12, 7))
    names = [l["name"] for l in record.layers]
    x = np.arange(len(names))
    for i, (key, lab) in enumerate((("weight_sparsity", "weight"), ("activation_sparsity", "activation"),
                                    ("product_sparsity", "product"))):
        top.bar(x + (i - 1) * 0.27, [l[key] for l in record.layers], 0.27, label=lab)
    top.set_xticks(x, names, rotation=70, fontsize=7)
    top.set_ylabel("sparsity")
    top.legend(fontsize=8)
    eng = record.design["layers"]
    xe = np.arange(len(eng))
    bottleneck = record.design["bottleneck"]
    bot.bar(xe - 0.2, [e["dsp"] for e in eng], 0.4, label="DSP")
    bot.bar(xe + 0.2, [e["bram36"] for e in eng], 0.4, label="BRAM36")
    ax2 = bot.twinx()
    ax2.plot(xe, [e["cycles"] for e in eng], "k.-", lw=0.8, label="cycles / image")
    ax2.set_ylabel("cycles / image")
    b = next(i for i, e in enumerate(eng) if e["name"] == bottleneck)
    bot.axvspan(b - 0.5, b + 0.5, color="red", alpha=0.15, label=f"bottleneck: {bottleneck}")
    bot.set_xticks(xe, [e["name"] for e in eng], rotation=70, fontsize=7)
    bot.set_ylabel("resources")
    bot.legend(fontsize=8, loc="upper left")
    fig.suptitle(title or f"{record.method}: {record.design['throughput']:.0f} images/s, "
                          f"{record.design['dsp']} DSP, accuracy {record.accuracy:.2f}%")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
