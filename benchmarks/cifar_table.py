"""CIFAR-10 accuracy table: CIFAR ResNets from ../shared, every method at the same bits.

    python benchmarks/cifar_table.py --models 20 56 --n-images 2000 --out benchmarks/out/cifar_table.json

Rows: FP; direct conv (per-channel and group-wise); Winograd F(4,3), F(6,3) with
standard scales, learned (data-free) scales, PAW+FSQ (calibration data: training-free
images from a fixed shuffle of the test set, disjoint from the evaluated ones) and
tap-wise scales; for W8A8, W6A6 and W4A8. Results are appended to the JSON as they
come (a rerun skips finished rows), then printed as a markdown table.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_cifar_args, cifar_setup, dump_json, load_json, machine, quantize_timed, top1  # noqa: E402

import winoq  # noqa: E402
from winoq.models import load_cifar_resnet  # noqa: E402

BITS = {"W8A8": ("int8", "int8"), "W6A6": ("int6", "int6"), "W4A8": ("int4", "int8")}


def configs(tiles, bits, methods, points=None):
    for b in bits:
        w, a = BITS[b]
        yield f"{b} direct per-channel", winoq.Recipe(weights=w, activations=a, group_size=None, winograd=None)
        yield f"{b} direct g32", winoq.Recipe(weights=w, activations=a, winograd=None)
        for m in tiles:
            for s in methods:
                scales, *flags = s.split("+")  # e.g. "learned+tapwise-weights+learned-rounding"
                unknown = set(flags) - {"tapwise-weights", "learned-rounding"}
                if unknown:
                    raise SystemExit(f"unknown method suffix {sorted(unknown)}; use +tapwise-weights, +learned-rounding")
                shared = scales == "learned-shared"  # one S_B, S_G for every layer (the paper's variant)
                label = f"{b} F({m},3) {s}" + (f" points {' '.join(points)}" if points else "")
                yield label, winoq.Recipe(weights=w, activations=a, winograd=m, scales="learned" if shared else scales,
                                          points=points, shared_scales=shared,
                                          rounding="learned" if "learned-rounding" in flags else "nearest",
                                          winograd_weight_scales="tapwise" if "tapwise-weights" in flags else "shared")


def scale_spread(qmodel) -> dict:
    """Per transform row: mean and std across layers of the learned log S_B and log S_G."""
    out = {}
    for key in ("s_b", "s_g"):
        logs = torch.tensor([r.calibration[key] for r in qmodel.winoq_report if key in r.calibration]).log()
        out[key] = {"layers": len(logs), "mean": logs.mean(0).tolist(), "std_across_layers": logs.std(0).tolist()}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=int, nargs="+", default=[20, 56])
    ap.add_argument("--tiles", type=int, nargs="+", default=[4, 6])
    ap.add_argument("--bits", nargs="+", default=list(BITS), choices=list(BITS))
    ap.add_argument("--methods", nargs="+", default=["standard", "learned", "learned+tapwise-weights", "paw-fsq", "tapwise"],
                    help="standard, learned, learned-shared (one set of scales for all layers), paw-fsq, tapwise; "
                         "suffixes +tapwise-weights, +learned-rounding (on the calibration images)")
    ap.add_argument("--points", type=str.split, default=None,
                    help="interpolation points in one string, e.g. '0 1 -1 1/2 -1/2' (default: Toom-Cook's)")
    ap.add_argument("--no-direct", action="store_true", help="skip the direct-conv rows")
    add_cifar_args(ap, n_images=2000, calib_images=64, out="benchmarks/out/cifar_table.json")
    args = ap.parse_args(argv)
    x, y, calib = cifar_setup(args)
    results = load_json(args.out)
    results["machine"] = machine()
    results["n_images"] = args.n_images
    for depth in args.models:
        model = load_cifar_resnet(depth)
        rows = results.setdefault(f"resnet{depth}", {})
        if "FP" not in rows:
            rows["FP"] = {"top1": top1(model, x, y)}
        print(f"ResNet-{depth} FP {rows['FP']['top1']:.2f}", flush=True)
        for label, recipe in configs(args.tiles, args.bits, args.methods, args.points):
            if label in rows or (args.no_direct and recipe.winograd is None):
                continue
            q, tq = quantize_timed(model, recipe, calib)
            t1 = time.perf_counter()
            acc = top1(q, x, y)
            rows[label] = {"top1": acc, "drop": rows["FP"]["top1"] - acc, "quantize_s": tq,
                           "eval_s": time.perf_counter() - t1, "recipe": recipe.to_json()}
            if recipe.scales == "learned" and not recipe.shared_scales:
                rows[label]["log_scale_spread"] = scale_spread(q)
            print(f"ResNet-{depth} {label:28s} {acc:6.2f}  drop {rows['FP']['top1'] - acc:+6.2f}  "
                  f"quantize {tq:6.1f}s", flush=True)
            dump_json(args.out, results)
        dump_json(args.out, results)
    for key in results:
        if key.startswith("resnet"):
            print(f"\n## {key}\n" + pivot_markdown(results, key))


def pivot_markdown(results, model: str) -> str:
    """One model: rows = method, columns = bits x tile; cells = top-1 (drop vs FP)."""
    rows = results[model]
    bits = [b for b in BITS if any(k.startswith(b) for k in rows)]
    tiles = sorted({k.split()[1] for k in rows if "F(" in k})
    cols = [(b, t) for b in bits for t in ["direct"] + tiles]
    methods = []
    for k in rows:
        if k == "FP":
            continue
        method = " ".join(k.split()[2:]) if "F(" in k else " ".join(k.split()[2:])
        if method not in methods:
            methods.append(method)
    head = "| method | " + " | ".join(f"{b} {t}" for b, t in cols) + " |"
    lines = [f"FP top-1: {rows['FP']['top1']:.2f}", "", head, "|---|" + "---|" * len(cols)]
    for method in methods:
        cells = []
        for b, t in cols:
            key = f"{b} {t} {method}"
            r = rows.get(key)
            cells.append("" if r is None else f"{r['top1']:.2f} ({-r['drop']:+.2f})")
        if any(cells):
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(results) -> str:
    models = [k for k in results if k.startswith("resnet")]
    labels = []
    for mdl in models:
        labels += [l for l in results[mdl] if l not in labels]
    lines = ["| method | " + " | ".join(f"{m} top-1 (drop)" for m in models) + " |",
             "|---|" + "---|" * len(models)]
    for l in labels:
        cells = []
        for m in models:
            r = results[m].get(l)
            cells.append("" if r is None else (f"{r['top1']:.2f}" + (f" ({r['drop']:+.2f})" if "drop" in r else "")))
        lines.append(f"| {l} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
