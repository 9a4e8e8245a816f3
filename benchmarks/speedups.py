"""Two measured speed-ups of the calibration / emulation path, with their accuracy cost.

    python benchmarks/speedups.py --out benchmarks/out/speedups.json

1. Data-free scale learning on a random subset of output channels
   (``ScaleLearningConfig.max_out_channels``): one SD-1.5-sized 1280->1280 3x3 conv at
   F(6,3), W8A8 g32, the reduced SD setting (1 noise image of 4x4 tiles, 5 Adam steps);
   seconds and the SQNR of the *whole* layer (all output channels) on a held-out noise
   batch of 24x24, for all channels / 256 / 128.
2. FP8 rounding: ``FloatFormat.round`` of 2M float32 values through torch's float8 cast
   (E4M3, E5M2) vs the exact float64 path (a float64 input takes it); median of 5 runs,
   and whether the results are identical.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import dump_json, machine  # noqa: E402

from winoq.formats import parse  # noqa: E402
from winoq.winograd.quantized import QuantWinogradConv2d  # noqa: E402
from winoq.winograd.scales import ScaleLearningConfig, learn_layer_scales, reference_output, sqnr_db  # noqa: E402


def channel_subsets(channels: int, subsets) -> list[dict]:
    torch.manual_seed(0)
    conv = nn.Conv2d(channels, channels, 3, padding=1)
    x = torch.randn(1, channels, 24, 24, generator=torch.Generator().manual_seed(99))
    rows = []
    for k in subsets:
        layer = QuantWinogradConv2d.from_conv(conv, 6)
        t0 = time.perf_counter()
        learn_layer_scales(layer, ScaleLearningConfig(steps=5, batch=1, tiles=4, max_out_channels=k))
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            sqnr = sqnr_db(layer(x), reference_output(layer, x))
        rows.append({"max_out_channels": k, "seconds": seconds, "full_layer_sqnr_db": sqnr})
        print(f"  subset {str(k):>4s}: {seconds:6.1f} s, whole-layer SQNR {sqnr:.2f} dB", flush=True)
    return rows


def fp8_rounding(n: int = 2_000_000) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=gen) * torch.logspace(-12, 12, n)[torch.randperm(n, generator=gen)]
    rows = []
    for name in ("fp8_e4m3", "fp8_e5m2"):
        fmt = parse(name)

        def median_s(fn):
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                out = fn()
                times.append(time.perf_counter() - t0)
            return statistics.median(times), out

        t_fast, fast = median_s(lambda: fmt.round(x))
        t_exact, exact = median_s(lambda: fmt.round(x.double()).float())
        same = bool(((fast == exact) | (fast.isnan() & exact.isnan())).all())
        rows.append({"format": name, "torch_cast_ms": 1e3 * t_fast, "exact_ms": 1e3 * t_exact,
                     "speedup": t_exact / t_fast, "identical": same})
        print(f"  {name}: torch cast {1e3 * t_fast:.1f} ms, exact {1e3 * t_exact:.1f} ms "
              f"({t_exact / t_fast:.1f}x), identical: {same}", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--channels", type=int, default=1280)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/speedups.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = {"machine": machine(), "command": "python benchmarks/speedups.py " + " ".join(argv or sys.argv[1:])}
    print(f"scale learning, {args.channels}->{args.channels} F(6,3):")
    res["channel_subsets"] = channel_subsets(args.channels, [None, 256, 128])
    print("FP8 rounding of 2M float32 values:")
    res["fp8_rounding"] = fp8_rounding()
    dump_json(args.out, res)


if __name__ == "__main__":
    main()
