"""Static vs dynamic activation ranges on a CIFAR ResNet from ../shared, per Winograd stage.

    python benchmarks/static_ranges.py --depth 20 --n-images 1000 --out benchmarks/out/static_ranges.json

W8A8 group 32, data-free learned transform scales; static ranges
(``Recipe(activation_ranges="static")``) calibrated on ``--calib-images`` images from the
other end of the fixed shuffle. For the Winograd tiles, the static scales are then applied
to one stage at a time (spatial input, V = B^T d B, M = U * V; the other stages dynamic,
``StaticRanges.stages``) to show which stage loses most.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_cifar_args, cifar_setup, dump_json, machine, quantize_timed, top1  # noqa: E402

import winoq  # noqa: E402
from winoq.models import load_cifar_resnet  # noqa: E402


def set_static_stages(qmodel, stages):
    for mod in qmodel.modules():
        ranges = getattr(mod, "act_ranges", None)
        if ranges is not None:
            ranges.stages = stages


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--tiles", nargs="+", default=["direct", "4", "6"])
    add_cifar_args(ap, n_images=1000, calib_images=64, out="benchmarks/out/static_ranges.json")
    args = ap.parse_args(argv)
    x, y, calib = cifar_setup(args)
    model = load_cifar_resnet(args.depth)
    fp = top1(model, x, y)
    res = {"machine": machine(), "command": "python benchmarks/static_ranges.py " + " ".join(argv or sys.argv[1:]),
           "n_images": args.n_images, "calib_images": args.calib_images, "fp_top1": fp, "rows": {}}
    print(f"ResNet-{args.depth} FP {fp:.2f}")
    for tile in args.tiles:
        m = None if tile == "direct" else int(tile)
        name = "direct" if m is None else f"F({m},3) learned"
        dyn, _ = quantize_timed(model, winoq.Recipe(winograd=m))
        st, t_cal = quantize_timed(model, winoq.Recipe(winograd=m, activation_ranges="static"), calib)
        row = {"dynamic": top1(dyn, x, y), "static": top1(st, x, y), "calibrate_s": t_cal}
        if m is not None:
            for stage in ("input", "v", "m"):
                set_static_stages(st, {stage})
                row[f"static {stage} only"] = top1(st, x, y)
        res["rows"][name] = row
        print(name, {k: round(v, 2) for k, v in row.items()}, flush=True)
        dump_json(args.out, res)


if __name__ == "__main__":
    main()
