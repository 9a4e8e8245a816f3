"""Which interpolation points suit fully quantized F(6,3) (and F(4,3)) best?

For each candidate point set, the layers of a CIFAR ResNet from ../shared are made
W8A8 fully quantized Winograd convs, their scales learned data-free, and the mean
per-layer SQNR on Gaussian noise (held out) is reported, with standard and learned
scales.

    python benchmarks/points_search.py --depth 20 --out benchmarks/out/points_search.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import dump_json, machine  # noqa: E402

from winoq.models import load_cifar_resnet  # noqa: E402
from winoq.winograd import default_points, is_winograd_eligible  # noqa: E402
from winoq.winograd.quantized import QuantWinogradConv2d  # noqa: E402
from winoq.winograd.scales import ScaleLearningConfig, learn_layer_scales  # noqa: E402

CANDIDATES = {
    6: [None, "0 1 -1 1/2 -1/2 3/2 -3/2", "0 1 -1 2 -2 3/2 -3/2", "0 1 -1 1/2 -1/2 3 -3", "0 1 -1 2 -2 1/3 -1/3",
        "0 1 -1 2/3 -2/3 3/2 -3/2", "0 1 -1 1/2 -1/2 5/2 -5/2", "0 1 -1 2/3 -2/3 2 -2"],
    4: [None, "0 1 -1 1/2 -1/2", "0 1 -1 3/2 -3/2", "0 1 -1 1/3 -1/3", "0 1 -1 3 -3"],
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--tiles", type=int, nargs="+", default=[4, 6])
    ap.add_argument("--layers", type=int, default=6, help="use every k-th eligible conv so about this many are tried")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/points_search.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = load_cifar_resnet(args.depth)
    convs = [(n, c) for n, c in model.named_modules() if isinstance(c, torch.nn.Conv2d) and is_winograd_eligible(c)]
    convs = convs[:: max(1, len(convs) // args.layers)]
    cfg = ScaleLearningConfig(steps=0)
    out = {"machine": machine(), "depth": args.depth, "layers": [n for n, _ in convs], "rows": []}
    for m in args.tiles:
        for pts in CANDIDATES[m]:
            points = None if pts is None else pts.split()
            std, learned = [], []
            for _, conv in convs:
                layer = QuantWinogradConv2d.from_conv(conv, m, points=points)
                rep = learn_layer_scales(layer, cfg)
                std.append(rep["sqnr_standard_db"])
                learned.append(rep["sqnr_learned_db"])
            default = "default (" + " ".join(str(p) for p in default_points(m + 2)) + ")"
            row = {"tile": f"F({m},3)", "points": pts or default,
                   "sqnr_standard_db": sum(std) / len(std), "sqnr_learned_db": sum(learned) / len(learned)}
            out["rows"].append(row)
            print(f"{row['tile']} {row['points']:28s} standard {row['sqnr_standard_db']:7.2f} dB   "
                  f"learned {row['sqnr_learned_db']:6.2f} dB", flush=True)
            dump_json(args.out, out)


if __name__ == "__main__":
    main()
