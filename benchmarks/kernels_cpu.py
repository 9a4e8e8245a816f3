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

``--peers``: the compiled fixed-point kernel (``kernel="cpu"``, F(2,3)/F(4,3)/F(6,3)) against
fp32 ``F.conv2d`` (oneDNN) and the int8 direct convs users already have,
``torch.ao.nn.quantized.Conv2d`` under the fbgemm and the onednn engines (quint8 channels-last
input, per-channel qint8 weights), same inputs (channels-last float32 for winoq, prepared
outside the timing like the peers' quint8 channels-last input), on the shapes of issue 11, ResNet-18 and SD-1.5
3x3 layers; plus the floor: the kernel's int8 MACs at 64 MACs per cycle (one 512-bit
``vpdpbusd`` per cycle) at the nominal clock. ``--accuracy``: the fixed-point transforms
(4..12 fractional bits) against the float-transform emulation and the exact conv.

    python benchmarks/kernels_cpu.py --peers --threads 1 2     # benchmarks/out/kernels_cpu_peers.json
    python benchmarks/kernels_cpu.py --accuracy                # benchmarks/out/kernels_cpu_accuracy.json
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


# (name, batch, channels, height=width): issue 11's shapes (3x3 stride 1, C = K), ResNet-18's other
# 3x3 stage and SD-1.5's UNet 3x3 layers at 512x512 (latent 64x64) batch 1
PEER_SHAPES = [("r18-s1", 8, 64, 56), ("r18-s2", 8, 128, 28), ("r18-s3", 8, 256, 14), ("r18-s4", 8, 512, 7),
               ("sd-320", 1, 320, 64), ("sd-640", 1, 640, 32), ("sd-1280", 1, 1280, 16)]
VNNI_MACS_PER_CYCLE = 64  # one 512-bit vpdpbusd: 16 lanes x 4 int8 products, assumed one per cycle per core


def _clock_hz() -> float:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.split(":")[1]) * 1e6
    except OSError:
        pass
    return 2.5e9


def _ao_conv(conv: torch.nn.Conv2d, engine: str, x: torch.Tensor):
    """A torch.ao int8 conv of ``conv`` (per-channel weights) and its quint8 channels-last input."""
    import torch.ao.nn.quantized as nnq

    torch.backends.quantized.engine = engine
    w = conv.weight.detach()
    ws = (w.abs().amax(dim=(1, 2, 3)) / 127).clamp_min(1e-8).double()
    wq = torch.quantize_per_channel(w, ws, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
    q = nnq.Conv2d(conv.in_channels, conv.out_channels, 3, padding=1)
    q.set_weight_bias(wq, conv.bias.detach())
    q.scale, q.zero_point = float(x.abs().max() * 4 / 255), 128
    xq = torch.quantize_per_tensor(x, float(x.abs().max() / 255), 0, torch.quint8)
    return q, xq.contiguous(memory_format=torch.channels_last)


def peer_problem(nb: int, c: int, hw: int) -> tuple[torch.Tensor, torch.nn.Conv2d]:
    """The input (ReLU'd noise, seed 1) and the C -> C 3x3 conv (kaiming, seed 0) of one peer shape."""
    x = torch.randn(nb, c, hw, hw, generator=torch.Generator().manual_seed(1)).relu()
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(c, c, 3, padding=1)
    torch.nn.init.kaiming_normal_(conv.weight)
    return x, conv


def ao_int8_fns(conv: torch.nn.Conv2d, x: torch.Tensor) -> dict:
    """{"int8_fbgemm": fn, "int8_onednn": fn}: the torch.ao int8 conv of ``conv`` on ``x`` per engine."""
    fns = {}
    for engine in ("fbgemm", "onednn"):
        q, xq = _ao_conv(conv, engine, x)
        fns[f"int8_{engine}"] = (lambda q=q, xq=xq, e=engine: (setattr(torch.backends.quantized, "engine", e), q(xq)))
    return fns


def peer_layer(conv: torch.nn.Conv2d, m: int, group_size: int, pipeline: str) -> QuantWinogradConv2d:
    """The Winograd layer the kernel runs: the default recipe's stages (per-tile input and V with
    zero points, V and U per tap, int16 M), the same without zero points ("symmetric") or the
    paper's (per-sample input, V shared by the taps, int8 M)."""
    from winoq.formats import parse
    from winoq.winograd.quantized import StageFormats

    default = pipeline in ("default", "symmetric")
    fmts = StageFormats(output=parse("int16" if default else "int8"))
    layer = QuantWinogradConv2d.from_conv(conv, m, group_size=group_size, formats=fmts).eval()
    layer.activation_granularity = "fine" if default else "sample"
    layer.input_tapwise = layer.weight_tapwise = default
    layer.activation_zero_point = pipeline == "default"
    learn_layer_scales(layer, ScaleLearningConfig(steps=0))
    layer.kernel = "cpu"
    return layer


def run_peers(args) -> dict:
    import warnings

    from winoq.kernels import cpu
    from winoq.winograd import fixed_point

    warnings.filterwarnings("ignore", message=".*quantize_per.*deprecated")
    if not cpu.available():
        raise SystemExit("the compiled cpu kernel is not built (bash setup.sh)")
    shapes = [s for s in PEER_SHAPES if not args.shapes or s[0] in args.shapes]
    hz = _clock_hz()
    rows = []
    for threads in args.threads_list:
        torch.set_num_threads(threads)
        for name, nb, c, hw in shapes:
            x, conv = peer_problem(nb, c, hw)
            # channels-last, as the int8 peers' quint8 input is prepared outside the timing and as the
            # kernel's own output is (a model's next layer gets it without a copy)
            x_nhwc = x.contiguous(memory_format=torch.channels_last)
            w, b = conv.weight.detach(), conv.bias.detach()
            direct_macs = nb * c * c * 9 * hw * hw
            row = {"shape": name, "batch": nb, "channels": c, "hw": hw, "threads": threads,
                   "direct_gmac": direct_macs / 1e9}
            fns = {"fp32_onednn": lambda: F.conv2d(x, w, b, padding=1)}
            fns.update(ao_int8_fns(conv, x))
            layers = {}
            for m in args.tiles_peers:
                layer = peer_layer(conv, m, args.group_size, args.pipeline)
                layers[m] = layer
                with torch.no_grad():
                    cpu.forward(layer, x)  # packs U once (cached on the layer)
                fns[f"winoq_F{m}"] = lambda layer=layer: cpu.forward(layer, x_nhwc)
                th = -(-hw // m)
                row[f"winoq_F{m}_gmac"] = nb * th * th * (m + 2) ** 2 * c * c / 1e9
                row[f"winoq_F{m}_floor_ms"] = row[f"winoq_F{m}_gmac"] * 1e9 / (VNNI_MACS_PER_CYCLE * hz) * 1e3
            row["direct_floor_ms"] = direct_macs / (VNNI_MACS_PER_CYCLE * hz) * 1e3
            with torch.no_grad():
                for k, (cpu_ms, wall_ms) in median_ms(fns, args.reps, budget_s=args.budget).items():
                    row[f"{k}_ms"], row[f"{k}_wall_ms"] = cpu_ms, wall_ms
                if args.check and threads == args.threads_list[0]:
                    exact = F.conv2d(x.double(), w.double(), b.double(), padding=1)
                    for m, layer in layers.items():
                        y = cpu.forward(layer, x)
                        row[f"winoq_F{m}_bit_exact"] = bool(torch.equal(y, fixed_point.reference_forward(layer, x)))
                        row[f"winoq_F{m}_sqnr_db"] = sqnr_db(y.double(), exact)
            best = min(row[f"winoq_F{m}_ms"] for m in args.tiles_peers)
            row["speedup_vs_onednn_int8"] = row["int8_onednn_ms"] / best
            row["speedup_vs_fbgemm_int8"] = row["int8_fbgemm_ms"] / best
            rows.append(row)
            print_peer_row(row, args.tiles_peers)
    return {"machine": {**machine(), "isa": cpu.isa(), "clock_hz": hz}, "group_size": args.group_size,
            "pipeline": args.pipeline,
            "load_average": os.getloadavg(), "timing": "median thread CPU time (ms) of round-robin calls; with 2 "
            "threads the pool's second thread is not counted, see *_wall_ms", "rows": rows,
            "floor": f"int8 MACs / ({VNNI_MACS_PER_CYCLE} MAC/cycle x {hz / 1e9:.2f} GHz)"}


def print_peer_row(r: dict, tiles) -> None:
    if not getattr(print_peer_row, "done", False):
        head = (f"{'shape':<9}{'N':>3}{'C':>5}{'HW':>4}{'thr':>4}{'fp32':>8}{'fbgemm8':>9}{'onednn8':>9}"
                + "".join(f"{'F(%d,3)' % m:>8}" for m in tiles) + f"{'floor':>7}{'vs onednn':>10}{'vs fbgemm':>10}")
        print(head + "\n" + "-" * len(head) + "   (ms, median thread CPU; floor = best tile's MACs at VNNI peak)")
        print_peer_row.done = True
    best = min(tiles, key=lambda m: r[f"winoq_F{m}_ms"])
    wall = r["threads"] > 1
    get = (lambda k: r[f"{k}_wall_ms"]) if wall else (lambda k: r[f"{k}_ms"])
    print(f"{r['shape']:<9}{r['batch']:>3}{r['channels']:>5}{r['hw']:>4}{r['threads']:>4}{get('fp32_onednn'):>8.2f}"
          f"{get('int8_fbgemm'):>9.2f}{get('int8_onednn'):>9.2f}" + "".join(f"{get(f'winoq_F{m}'):>8.2f}" for m in tiles)
          + f"{r[f'winoq_F{best}_floor_ms']:>7.2f}{get('int8_onednn') / get(f'winoq_F{best}'):>10.2f}"
          f"{get('int8_fbgemm') / get(f'winoq_F{best}'):>10.2f}" + ("  (wall ms)" if wall else ""), flush=True)


def run_accuracy(args) -> dict:
    from winoq.winograd import fixed_point

    torch.set_num_threads(args.threads)
    rows = []
    for name, nb, c, hw in [("r18-s2", 1, 128, 28), ("r18-s3", 2, 256, 14), ("sd-320", 1, 320, 32)]:
        x = torch.randn(nb, c, hw, hw, generator=torch.Generator().manual_seed(1)).relu()
        for m in (2, 4, 6):
            torch.manual_seed(0)
            conv = torch.nn.Conv2d(c, c, 3, padding=1)
            torch.nn.init.kaiming_normal_(conv.weight)
            exact = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
            layer = QuantWinogradConv2d.from_conv(conv, m, group_size=args.group_size).eval()
            learn_layer_scales(layer, ScaleLearningConfig(steps=0))
            with torch.no_grad():
                emu = layer.forward_emulated(x).double()
                row = {"shape": name, "m": m, "emulated_float_transforms_sqnr_db": sqnr_db(emu, exact)}
                for bits in (4, 6, 8, 10, 12):
                    layer.transform_bits = bits
                    y = fixed_point.reference_forward(layer, x).double()
                    row[f"fixed{bits}_sqnr_db"] = sqnr_db(y, exact)
                    row[f"fixed{bits}_vs_emulated_rel"] = float((y - emu).norm() / emu.norm())
                layer.transform_bits = None
                layer.kernel = "cpu"  # the emulation with the kernel's rounded transforms
                row["emulated_fixed_transforms_sqnr_db"] = sqnr_db(layer.forward_emulated(x).double(), exact)
                # the default recipe's stages (V per tap: exact integer BT, only AT' in fixed point)
                dl = peer_layer(conv, m, args.group_size, "default")
                row["default_fixed_sqnr_db"] = sqnr_db(fixed_point.reference_forward(dl, x).double(), exact)
                dl.kernel = "emulated"
                row["default_emulated_sqnr_db"] = sqnr_db(dl.forward_emulated(x).double(), exact)
            rows.append(row)
            print(f"{name:<8} F({m},3)  float-transform emulation {row['emulated_float_transforms_sqnr_db']:6.2f} dB | "
                  + "  ".join(f"k={b}: {row[f'fixed{b}_sqnr_db']:6.2f}" for b in (4, 6, 8, 10, 12))
                  + f" | emulated w/ fixed transforms {row['emulated_fixed_transforms_sqnr_db']:6.2f}"
                  + f" | default stages: fixed point {row['default_fixed_sqnr_db']:6.2f}, float transforms "
                  f"{row['default_emulated_sqnr_db']:6.2f}", flush=True)
    return {"machine": machine(), "group_size": args.group_size, "default_bits": fixed_point.DEFAULT_TRANSFORM_BITS,
            "rows": rows, "metric": "SQNR (dB) against the exact float64 conv; *_vs_emulated_rel: ||y - emu|| / ||emu||"}


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
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON to write (default: benchmarks/out/kernels_cpu.json, kernels_cpu_peers.json with "
                         "--peers, kernels_cpu_accuracy.json with --accuracy)")
    ap.add_argument("--default-malloc", action="store_true",
                    help="keep glibc's default allocator settings (large temporaries page-fault on every call)")
    ap.add_argument("--peers", action="store_true", help="compiled kernel vs fp32 / int8 fbgemm / int8 onednn")
    ap.add_argument("--accuracy", action="store_true", help="fixed-point transform bits vs float transforms")
    ap.add_argument("--threads-list", dest="threads_list", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tiles-peers", dest="tiles_peers", type=int, nargs="+", default=[2, 4, 6])
    ap.add_argument("--shapes", nargs="*", default=None, help="--peers: only these shape names")
    ap.add_argument("--pipeline", choices=("default", "symmetric", "paper"), default="default",
                    help="--peers: the default recipe's Winograd stages, the same without zero points, or the paper's")
    ap.add_argument("--budget", type=float, default=60.0, help="--peers: seconds per shape before fewer reps")
    args = ap.parse_args(argv)
    default_name = "kernels_cpu_peers.json" if args.peers else "kernels_cpu_accuracy.json" if args.accuracy \
        else "kernels_cpu.json"
    args.out = args.out or Path(__file__).resolve().parent / "out" / default_name
    if args.peers or args.accuracy:
        out = args.out
        dump_json(out, run_peers(args) if args.peers else run_accuracy(args))
        print(f"wrote {out}")
        return
    if not args.default_malloc and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})  # re-run with them set
    result = run(args)
    dump_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
