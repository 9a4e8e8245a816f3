"""INT vs FP formats and nearest vs learned rounding on a CIFAR ResNet from ../shared.

    python benchmarks/formats_table.py --depth 20 --n-images 1000 --out benchmarks/out/formats_table.json

Rows: W8A8 as INT8 and FP8 (E4M3); W4A8 with INT4 / FP4 (E2M1) weights, each with
round-to-nearest and learned (AdaRound-style) rounding; each direct and as fully
quantized Winograd F(4,3) / F(6,3) with data-free learned scales. Group size 32.
``--rows extra`` adds block-wise reconstruction (BRECQ), learned rounding at 8 bit and
the per-layer FP4 split search. Learned rounding calibrates on images from the other end of a fixed shuffle of the
test set (disjoint from the evaluated ones). Calibration seconds are reported.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_cifar_args, cifar_setup, dump_json, load_json, machine, quantize_timed, top1  # noqa: E402

import winoq  # noqa: E402
from winoq.models import load_cifar_resnet  # noqa: E402

ROWS = [("W8A8 INT8", dict(weights="int8", activations="int8")),
        ("W8A8 FP8 e4m3", dict(weights="fp8_e4m3", activations="fp8_e4m3")),
        ("W4A8 INT4 nearest", dict(weights="int4")),
        ("W4A8 INT4 learned", dict(weights="int4", rounding="learned")),
        ("W4A8 FP4 nearest", dict(weights="fp4_e2m1")),
        ("W4A8 FP4 learned", dict(weights="fp4_e2m1", rounding="learned"))]
# beyond the grid (--rows extra): block-wise reconstruction, learned rounding at 8 bit,
# per-layer FP4 split search
EXTRA_ROWS = [("W4A8 INT4 learned, block", dict(weights="int4", rounding="learned", reconstruction="block")),
              ("W4A8 FP4 learned, block", dict(weights="fp4_e2m1", rounding="learned", reconstruction="block")),
              ("W4A8 FP4 split search", dict(weights="fp4_e2m1", format_search="output")),
              ("W8A8 INT8 learned", dict(weights="int8", rounding="learned")),
              ("W8A8 INT8 learned, block", dict(weights="int8", rounding="learned", reconstruction="block"))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--tiles", nargs="+", default=["direct", "4", "6"])
    add_cifar_args(ap, n_images=1000, calib_images=32, out="benchmarks/out/formats_table.json")
    ap.add_argument("--rounding-iters", type=int, default=100)
    ap.add_argument("--rows", choices=["issue", "extra", "all"], default="issue",
                    help="issue: the INT/FP x nearest/learned grid; extra: block reconstruction, 8-bit learned "
                         "rounding, FP4 split search; all: both")
    args = ap.parse_args(argv)
    x, y, calib = cifar_setup(args)
    model = load_cifar_resnet(args.depth)
    results = load_json(args.out)
    results.update(machine=machine(), n_images=args.n_images, rounding_iters=args.rounding_iters)
    rows = results.setdefault("rows", {})
    rows.setdefault("FP", {"top1": top1(model, x, y)})
    fp = rows["FP"]["top1"]
    print(f"ResNet-{args.depth} FP {fp:.2f}", flush=True)
    for tile in args.tiles:
        for label, kw in {"issue": ROWS, "extra": EXTRA_ROWS, "all": ROWS + EXTRA_ROWS}[args.rows]:
            key = f"{label} {'direct' if tile == 'direct' else f'F({tile},3)'}"
            if key in rows:
                continue
            recipe = winoq.Recipe(**{"activations": "int8", **kw}, winograd=None if tile == "direct" else int(tile),
                                  rounding_iters=args.rounding_iters)
            q, tq = quantize_timed(model, recipe, calib)
            acc = top1(q, x, y)
            rows[key] = {"top1": acc, "drop": fp - acc, "calibrate_s": tq, "recipe": recipe.to_json()}
            print(f"{key:32s} {acc:6.2f}  drop {fp - acc:+6.2f}  calibrate {tq:6.1f}s", flush=True)
            chosen = [r.calibration["weight_format"] for r in q.winoq_report if "weight_format" in r.calibration]
            if chosen:  # split search: how many layers took each format
                rows[key]["chosen_formats"] = {f: chosen.count(f) for f in sorted(set(chosen))}
                print(f"{'':32s} chosen: {rows[key]['chosen_formats']}", flush=True)
            dump_json(args.out, results)


if __name__ == "__main__":
    main()
