"""CPU speed of the integer Winograd path (``winoq.kernels.int_cpu``) against
float32 ``F.conv2d`` (oneDNN) and the emulated (fake-quant) ``layer.forward``.

One thread by default (the honest single-core comparison). Every integer run is
also checked against ``layer.forward_integer`` (relative error printed).

    python benchmarks/kernels_cpu.py                    # table + benchmarks/out/kernels_cpu.json
    python benchmarks/kernels_cpu.py --tiles 4 6 --reps 20
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import dump_json, machine  # noqa: E402

from winoq.kernels import int_cpu  # noqa: E402
from winoq.winograd.quantized import QuantWinogradConv2d  # noqa: E402

# (name, batch, channels, height=width): ResNet-20 stages at batch 32, a ResNet-18/34 stage-1 layer at batch 8
SHAPES = [("resnet20-s1", 32, 16, 32), ("resnet20-s2", 32, 32, 16), ("resnet20-s3", 32, 64, 8),
          ("resnet-56x56", 8, 64, 56)]


def median_ms(fn, reps: int, warmup: int = 2, budget_s: float = 20.0) -> float:
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
        if time.perf_counter() - start > budget_s and len(times) >= 3:
            break
    return statistics.median(times)


def make_layer(c: int, m: int, group_size: int, seed: int = 0) -> QuantWinogradConv2d:
    conv = torch.nn.Conv2d(c, c, 3, padding=1, bias=True)
    torch.manual_seed(seed)
    torch.nn.init.kaiming_normal_(conv.weight)
    layer = QuantWinogradConv2d.from_conv(conv, m, group_size=group_size)
    return layer.eval()


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    rows = []
    for name, nb, c, hw in SHAPES:
        x = torch.randn(nb, c, hw, hw, generator=torch.Generator().manual_seed(1)).relu()  # post-ReLU activations
        for m in args.tiles:
            layer = make_layer(c, m, args.group_size)
            w, b = layer.weight.detach(), layer.bias.detach()
            with torch.no_grad():
                ref = layer.forward_integer(x) if args.check else None
                row = {"shape": name, "batch": nb, "channels": c, "hw": hw, "m": m, "group_size": args.group_size,
                       "gflop_direct": 2 * nb * c * c * 9 * hw * hw / 1e9}
                row["conv2d_f32_ms"] = median_ms(lambda: F.conv2d(x, w, b, padding=1), args.reps)
                row["emulated_ms"] = median_ms(lambda: layer(x), args.reps)
                int_cpu.prepare(layer, torch.float32)  # weights are quantized once, not per call
                for gemm in ("int_mm", "float"):
                    row[f"int_cpu_{gemm}_ms"] = median_ms(lambda: int_cpu.forward(layer, x, gemm=gemm), args.reps)
                    if ref is not None:
                        y = int_cpu.forward(layer, x, gemm=gemm)
                        row[f"int_cpu_{gemm}_rel_err"] = float((y.double() - ref).norm() / ref.norm())
                if args.float64:
                    int_cpu.prepare(layer, torch.float64)
                    row["int_cpu_f64_ms"] = median_ms(lambda: int_cpu.forward(layer, x, dtype=torch.float64),
                                                      args.reps)
            best = min(row["int_cpu_int_mm_ms"], row["int_cpu_float_ms"])
            row["int_vs_conv2d"] = row["conv2d_f32_ms"] / best    # > 1: integer path faster
            row["int_vs_emulated"] = row["emulated_ms"] / best
            rows.append(row)
            print_row(row)
    return {"machine": machine(), "threads": args.threads, "group_size": args.group_size, "rows": rows}


HEADER = (f"{'shape':<14}{'N':>4}{'C':>5}{'HW':>4}{'F(m,3)':>7}{'conv2d f32':>12}{'emulated':>10}"
          f"{'int_mm':>9}{'int(f32 gemm)':>14}{'conv/int':>9}{'emu/int':>9}{'rel err':>10}")


def print_row(r: dict) -> None:
    if not getattr(print_row, "done", False):
        print(HEADER + "\n" + "-" * len(HEADER) + "   (milliseconds, median)")
        print_row.done = True
    err = r.get("int_cpu_int_mm_rel_err", float("nan"))
    print(f"{r['shape']:<14}{r['batch']:>4}{r['channels']:>5}{r['hw']:>4}{'F(%d,3)' % r['m']:>7}"
          f"{r['conv2d_f32_ms']:>12.2f}{r['emulated_ms']:>10.2f}{r['int_cpu_int_mm_ms']:>9.2f}"
          f"{r['int_cpu_float_ms']:>14.2f}{r['int_vs_conv2d']:>9.2f}{r['int_vs_emulated']:>9.2f}{err:>10.1e}",
          flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", type=int, nargs="+", default=[4], help="output tile sizes m of F(m,3)")
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--no-check", dest="check", action="store_false", help="skip the forward_integer comparison")
    ap.add_argument("--float64", action="store_true", help="also time the float64 (bit-faithful) mode")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "kernels_cpu.json")
    args = ap.parse_args(argv)
    result = run(args)
    dump_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
