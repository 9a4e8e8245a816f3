"""Result tables: plain text for the terminal, markdown files for reports.

A *row* is a dict with keys ``method`` (str), ``accuracy`` (top-1 %), ``drop``
(points below the float model, positive = worse), ``quantize_seconds`` and
``eval_seconds`` (None where not applicable); extra keys are ignored.
"""
from __future__ import annotations

import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping, Sequence

__all__ = ["TABLE_COLUMNS", "format_table", "markdown_table", "machine_info", "write_markdown_report"]

#: (row key, header, formatter)
TABLE_COLUMNS = (
    ("method", "method", str),
    ("accuracy", "top-1 %", lambda v: f"{v:.2f}"),
    ("drop", "drop vs FP (pts)", lambda v: f"{v:+.2f}"),
    ("quantize_seconds", "quantize s", lambda v: f"{v:.1f}"),
    ("eval_seconds", "eval s", lambda v: f"{v:.1f}"),
)


def _cells(rows: Sequence[Mapping]) -> tuple[list[str], list[list[str]]]:
    headers = [h for _, h, _ in TABLE_COLUMNS]
    body = [[("-" if row.get(key) is None else fmt(row[key])) for key, _, fmt in TABLE_COLUMNS]
            for row in rows]
    return headers, body


def format_table(rows: Sequence[Mapping]) -> str:
    """Plain aligned text table (method left-aligned, numbers right-aligned)."""
    headers, body = _cells(rows)
    widths = [max(len(c) for c in col) for col in zip(headers, *body)]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in body]
    return "\n".join(out)


def markdown_table(rows: Sequence[Mapping]) -> str:
    headers, body = _cells(rows)
    out = ["| " + " | ".join(headers) + " |",
           "|" + "|".join([":---"] + ["---:"] * (len(headers) - 1)) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(out)


def machine_info() -> dict:
    """Platform, Python/torch versions, threads and a UTC timestamp."""
    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count()
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": sys.version.split()[0], "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cpu_cores": cores, "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def _meta_lines(meta: Mapping, indent: str = "") -> list[str]:
    lines = []
    for key, value in meta.items():
        if isinstance(value, Mapping):
            lines.append(f"{indent}- **{key}**:")
            lines += _meta_lines(value, indent + "  ")
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
            lines.append(f"{indent}- **{key}**:")
            lines += [f"{indent}  - {v}" for v in value]
        else:
            lines.append(f"{indent}- **{key}**: {value}")
    return lines


def _layer_table(reports) -> list[str]:
    out = ["| layer | kind | detail | SQNR standard (dB) | closed form (dB) | learned (dB) |",
           "|:---|:---|:---|---:|---:|---:|"]
    for r in reports:
        cal = r.calibration or {}

        def f(key):
            return f"{cal[key]:.1f}" if key in cal else "-"

        out.append(f"| {r.name} | {r.kind} | {r.detail} | {f('sqnr_standard_db')} | "
                   f"{f('sqnr_closed_form_db')} | {f('sqnr_learned_db')} |")
    return out


def write_markdown_report(path: str | os.PathLike, rows: Sequence[Mapping], meta: Mapping,
                          images: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike] = (),
                          *, title: str = "winoq results", layers: Mapping[str, Sequence] | None = None,
                          sections: Mapping[str, Sequence[str]] | None = None) -> str:
    """Write a markdown report: the results table, ``meta`` (nested dicts become nested
    lists; put model, data, image count, recipes and ``machine_info()`` there), optional
    per-layer SQNR tables (``layers``: label -> list of ``LayerReport``), extra sections
    (``sections``: heading -> markdown lines) and links to
    ``images`` (paths, or caption -> path; written relative to the report when they
    sit beside it). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = [f"# {title}", "", markdown_table(rows), "",
             "top-1 %: accuracy on the evaluated images; drop: points below the float model "
             "(positive = worse); times are wall-clock seconds.", "", "## Setup", ""]
    parts += _meta_lines(meta)
    for heading, lines in (sections or {}).items():   # e.g. the deployment measurements
        parts += ["", f"## {heading}", "", *lines]
    if layers:
        for label, reports in layers.items():
            parts += ["", f"## Per-layer SQNR: {label}", "",
                      "SQNR of each quantized layer's output against the exact convolution, "
                      "on held-out random noise (no data).", ""]
            parts += _layer_table(reports)
    items = list(images.items()) if isinstance(images, Mapping) else [(Path(p).stem, p) for p in images]
    if items:
        parts += ["", "## Figures", ""]
        for caption, img in items:
            img = Path(img)
            try:
                link = img.resolve().relative_to(path.parent.resolve()).as_posix()
            except ValueError:
                link = img.as_posix()
            parts += [f"### {caption}", "", f"![{caption}]({link})", ""]
    path.write_text("\n".join(parts).rstrip() + "\n", encoding="utf-8")
    return str(path)
