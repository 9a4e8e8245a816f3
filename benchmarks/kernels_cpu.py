"""CPU speed of the integer Winograd path (``winoq.kernels.int_cpu``) against
float32 ``F.conv2d`` (oneDNN) and the emulated (fake-quant) ``layer.forward``.

One thread by default (the single-core comparison). Times are the median *thread
CPU time* of calls interleaved round-robin (wall time is in the JSON too): on a
shared machine wall time mostly measures the neighbours. The layers carry the
data-free learned transform scales (closed form), as deployed. Every integer run is
checked against ``layer.forward_integer``: ``match`` is the fraction of outputs
within 1e-5 * max |y| of it (the rest differ through rounding ties, see
tests/test_kernels.py), ``SQNR`` the layer's own quantization error vs the exact conv.

    python benchmarks/kernels_cpu.py                    # table + benchmarks/out/kernels_cpu.json
    python benchmarks/kernels_cpu.py --tiles 4 --reps 30 --default-malloc
"""
from __future__ import annotations

import argparse
import os
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
from winoq.winograd.scales import ScaleLearningConfig, learn_layer_scales, sqnr_db  # noqa: E402

# (name, batch, channels, height=width): ResNet-20 stages at batch 32, a ResNet-18/34 stage-1 layer at batch 8
SHAPES = [("resnet20-s1", 32, 16, 32), ("resnet20-s2", 32, 32, 16), ("resnet20-s3", 32, 64, 8),
          ("resnet-56x56", 8, 64, 56)]


def median_ms(fns: dict, reps: int, warmup: int = 2, budget_s: float = 60.0) -> dict:
    """Median time (ms) of each callable: thread CPU time (what the computation costs;
    immune to the preemption of a shared machine) and wall time. Calls are interleaved
    round-robin so that a busy machine slows every column alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    cpu = {k: [] for k in fns}
    wall = {k: [] for k in fns}
    start = time.perf_counter()
    for _ in range(reps):
        for k, fn in fns.items():
            t, w = time.thread_time(), time.perf_counter()
            fn()
            cpu[k].append((time.thread_time() - t) * 1e3)
            wall[k].append((time.perf_counter() - w) * 1e3)
        if time.perf_counter() - start > budget_s and len(cpu[k]) >= 3:
            break
    return {k: (statistics.median(cpu[k]), statistics.median(wall[k])) for k in fns}


def make_layer(c: int, m: int, group_size: int, learned: bool, seed: int = 0) -> QuantWinogradConv2d:
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(c, c, 3, padding=1, bias=True)
    torch.nn.init.kaiming_normal_(conv.weight)
    layer = QuantWinogradConv2d.from_conv(conv, m, group_size=group_size).eval()
    if learned:  # the data-free transform scales (closed form): the layer as it is deployed
        learn_layer_scales(layer, ScaleLearningConfig(steps=0))
    return layer


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    rows = []
    for name, nb, c, hw in SHAPES:
        x = torch.randn(nb, c, hw, hw, generator=torch.Generator().manual_seed(1)).relu()  # post-ReLU activations
        for m in args.tiles:
            layer = make_layer(c, m, args.group_size, args.learned)
            w, b = layer.weight.detach(), layer.bias.detach()
            row = {"shape": name, "batch": nb, "channels": c, "hw": hw, "m": m, "group_size": args.group_size,
                   "learned_scales": args.learned, "gflop_direct": 2 * nb * c * c * 9 * hw * hw / 1e9}
            with torch.no_grad():
                int_cpu.prepare(layer, torch.float32)  # weights are quantized once, not per call
                fns = {"conv2d_f32": lambda: F.conv2d(x, w, b, padding=1),
                       "emulated": lambda: layer(x),
                       "int_cpu_int_mm": lambda: int_cpu.forward(layer, x, gemm="int_mm"),
                       "int_cpu_float": lambda: int_cpu.forward(layer, x, gemm="float")}
                if args.float64:
                    int_cpu.prepare(layer, torch.float64)
                    fns["int_cpu_f64"] = lambda: int_cpu.forward(layer, x, dtype=torch.float64)
                for k, (cpu_ms, wall_ms) in median_ms(fns, args.reps).items():
                    row[f"{k}_ms"], row[f"{k}_wall_ms"] = cpu_ms, wall_ms
                if args.check:
                    ref = layer.forward_integer(x)
                    exact = F.conv2d(x.double(), w.double(), b.double(), padding=1)
                    row["sqnr_db_vs_float_conv"] = sqnr_db(ref, exact)
                    for gemm in ("int_mm", "float"):
                        d = (int_cpu.forward(layer, x, gemm=gemm).double() - ref).abs()
                        row[f"int_cpu_{gemm}_rel_err"] = float(d.norm() / ref.norm())
                        row[f"int_cpu_{gemm}_match"] = float((d <= 1e-5 * ref.abs().max()).double().mean())
            best = min(row["int_cpu_int_mm_ms"], row["int_cpu_float_ms"])
            row["conv2d_over_int"] = row["conv2d_f32_ms"] / best    # > 1: integer path faster
            row["emulated_over_int"] = row["emulated_ms"] / best
            rows.append(row)
            print_row(row)
    return {"machine": machine(), "threads": args.threads, "group_size": args.group_size,
            "load_average": os.getloadavg(), "malloc_env": {k: os.environ.get(k) for k in MALLOC_ENV},
            "timing": "median thread CPU time (ms); *_wall_ms: median wall time", "rows": rows}


HEADER = (f"{'shape':<14}{'N':>4}{'C':>5}{'HW':>4}{'F(m,3)':>7}{'conv2d f32':>12}{'emulated':>10}"
          f"{'int_mm':>9}{'int(f32 gemm)':>14}{'conv/int':>9}{'emu/int':>9}{'match':>8}{'SQNR dB':>9}")


def print_row(r: dict) -> None:
    if not getattr(print_row, "done", False):
        print(HEADER + "\n" + "-" * len(HEADER) + "   (CPU ms, median)")
        print_row.done = True
    match = r.get("int_cpu_int_mm_match", float("nan"))
    sqnr = r.get("sqnr_db_vs_float_conv", float("nan"))
    print(f"{r['shape']:<14}{r['batch']:>4}{r['channels']:>5}{r['hw']:>4}{'F(%d,3)' % r['m']:>7}"
          f"{r['conv2d_f32_ms']:>12.2f}{r['emulated_ms']:>10.2f}{r['int_cpu_int_mm_ms']:>9.2f}"
          f"{r['int_cpu_float_ms']:>14.2f}{r['conv2d_over_int']:>9.2f}{r['emulated_over_int']:>9.2f}{match:>8.4f}"
          f"{sqnr:>9.1f}",
          flush=True)


# glibc returns freed multi-MB blocks to the OS, so every large temporary costs ~1000 page
# faults (~2 ms per 4.7 MB on the VM this was written on); keeping freed memory in the heap
# (what jemalloc/tcmalloc do, as commonly used for PyTorch CPU inference) removes that.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "2000000000", "MALLOC_TRIM_THRESHOLD_": "4000000000",
              "MALLOC_TOP_PAD_": "200000000"}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", type=int, nargs="+", default=[4, 6], help="output tile sizes m of F(m,3)")
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--no-learned-scales", dest="learned", action="store_false",
                    help="plain Toom-Cook transforms instead of the data-free learned scales")
    ap.add_argument("--no-check", dest="check", action="store_false", help="skip the forward_integer comparison")
    ap.add_argument("--float64", action="store_true", help="also time the float64 (bit-faithful) mode")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "kernels_cpu.json")
    ap.add_argument("--default-malloc", action="store_true",
                    help="keep glibc's default allocator settings (large temporaries page-fault on every call)")
    args = ap.parse_args(argv)
    if not args.default_malloc and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})  # re-run with them set
    result = run(args)
    dump_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
