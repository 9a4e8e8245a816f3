"""GPU speed of the fully quantized Winograd kernels (``winoq.kernels.triton_winograd``)
against cuDNN and a direct int8 conv, with a roofline floor per shape.

Shapes: the stride-1 3x3 convs of ResNet-18/34 (C = K = 64..512) at batch 1 and 32,
and SD-1.5 UNet 3x3 convs (64x64x320, 32x32x640, 16x16x1280, 8x8x1280) at batch
1, 2, 8, 16. Columns (median microseconds over CUDA-event timed calls):

* ``cudnn_fp16`` / ``cudnn_bf16``: ``F.conv2d`` in fp16 / bf16, channels_last,
  ``cudnn.benchmark`` on;
* ``direct_int8``: dynamic per-tensor int8 input, per-channel int8 weights,
  im2col + ``torch._int_mm`` (int32), rescale to fp16 (all of it timed);
* ``winoq_f4`` / ``winoq_f6``: F(4,3) / F(6,3), int8 input, V, U and M stages,
  group size 32 (the three Triton kernels plus the input-scale reduction).

The floor of a shape is ``max(bytes / bandwidth, int8 ops / peak)`` with the
minimal traffic (fp16 input read once, int8 weights, fp16 output written once)
and the multiply-adds of the direct conv; ``*_floor_us`` of the Winograd columns
use their (fewer) Winograd-domain multiply-adds and their int8 transformed weights.
H100 SXM numbers by default (``--bw-gbs 3350 --int8-tops 1979``; H100 PCIe: 2000 and 1513).

    python benchmarks/kernels_gpu.py                 # table + benchmarks/out/kernels_gpu.json
    python benchmarks/kernels_gpu.py --floors-only   # shapes and floors, no GPU needed
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import dump_json, machine  # noqa: E402

RESNET_3X3 = [("conv2_x", 64, 56), ("conv3_x", 128, 28), ("conv4_x", 256, 14), ("conv5_x", 512, 7)]
RESNET_BATCHES = (1, 32)
SD15_3X3 = [("64x64x320", 320, 64), ("32x32x640", 640, 32), ("16x16x1280", 1280, 16), ("8x8x1280", 1280, 8)]
SD15_BATCHES = (1, 2, 8, 16)
TILES = (4, 6)
COLUMNS = ("cudnn_fp16", "cudnn_bf16", "direct_int8", "winoq_f4", "winoq_f6")


def shapes() -> list[dict]:
    """Every benchmarked conv: 3x3, stride 1, padding 1, C = K, square maps."""
    out = []
    for name, c, hw in RESNET_3X3:
        for nb in RESNET_BATCHES:
            out.append({"model": "resnet18/34", "layer": name, "n": nb, "c": c, "k": c, "h": hw, "w": hw})
    for name, c, hw in SD15_3X3:
        for nb in SD15_BATCHES:
            out.append({"model": "sd1.5-unet", "layer": name, "n": nb, "c": c, "k": c, "h": hw, "w": hw})
    return out


def roofline_floor_us(s: dict, bw_gbs: float = 3350.0, int8_tops: float = 1979.0, m: int | None = None,
                      act_bytes: int = 2) -> dict:
    """Lower bound on the time of one conv: max(minimal bytes / bandwidth, int8 ops / peak).

    Bytes: input read once and output written once in ``act_bytes`` (fp16), int8 weights
    (r*r taps, or the n*n transformed taps of F(m,3)). Ops: 2 * multiply-adds, of the
    direct conv or (``m`` given) of the Winograd-domain products over whole tiles."""
    n, c, k, h, w = s["n"], s["c"], s["k"], s["h"], s["w"]
    r = 3
    if m is None:
        taps, positions = r * r, h * w
    else:
        taps, positions = (m + r - 1) ** 2, math.ceil(h / m) * math.ceil(w / m)
    ops = 2 * n * k * c * taps * positions
    nbytes = n * c * h * w * act_bytes + k * c * taps + n * k * h * w * act_bytes
    mem_us = nbytes / (bw_gbs * 1e9) * 1e6
    compute_us = ops / (int8_tops * 1e12) * 1e6
    return {"bytes": nbytes, "ops": ops, "mem_us": mem_us, "compute_us": compute_us,
            "floor_us": max(mem_us, compute_us), "bound": "memory" if mem_us >= compute_us else "compute"}


# ----------------------------------------------------------------------------- timing (GPU only)
def cuda_time_us(fn, warmup: int, reps: int) -> float:
    """Median of ``reps`` CUDA-event timings of ``fn`` (after ``warmup`` calls)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e3 for s, e in events)


def direct_int8(x: torch.Tensor, wq_t: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """Direct 3x3 conv in int8: dynamic per-tensor input scale, im2col (NHWC), _int_mm, fp16 out."""
    nb, c, h, w = x.shape
    sx = x.abs().amax().float().clamp_min(1e-30) / 127.0
    xq = (x.float() / sx).round_().clamp_(-127, 127).to(torch.int8)
    xq = xq.permute(0, 2, 3, 1)  # NHWC view (contiguous when x is channels_last)
    xp = F.pad(xq, (0, 0, 1, 1, 1, 1))
    cols = xp.unfold(1, 3, 1).unfold(2, 3, 1).reshape(nb * h * w, c * 9)  # (N*H*W, C*3*3), one copy
    acc = torch._int_mm(cols, wq_t)  # int32 (N*H*W, K)
    y = (acc.float() * (sx * w_scale)).half()
    return y.view(nb, h, w, -1).permute(0, 3, 1, 2)


def bench_shape(s: dict, args) -> dict:
    from winoq.kernels import triton_available
    from winoq.winograd.quantized import QuantWinogradConv2d

    dev = torch.device("cuda")
    n, c, k, h, w = s["n"], s["c"], s["k"], s["h"], s["w"]
    gen = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(c, k, 3, padding=1, bias=True)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * (2.0 / (9 * c)) ** 0.5)
        conv.bias.copy_(torch.randn(k, generator=gen) * 0.1)
    x32 = torch.randn(n, c, h, w, generator=gen).relu().to(dev)
    row = dict(s)
    for name, dt in (("cudnn_fp16", torch.float16), ("cudnn_bf16", torch.bfloat16)):
        xc = x32.to(dt).contiguous(memory_format=torch.channels_last)
        wc = conv.weight.to(dev, dt).contiguous(memory_format=torch.channels_last)
        bc = conv.bias.to(dev, dt)
        row[f"{name}_us"] = cuda_time_us(lambda: F.conv2d(xc, wc, bc, padding=1), args.warmup, args.reps)
    x16 = x32.half().contiguous(memory_format=torch.channels_last)
    wf = conv.weight.to(dev).reshape(k, -1)
    w_scale = (wf.abs().amax(1) / 127.0).clamp_min(1e-30)
    wq_t = (wf / w_scale[:, None]).round().clamp(-127, 127).to(torch.int8).t()  # column-major (C*9, K)
    try:
        row["direct_int8_us"] = cuda_time_us(lambda: direct_int8(x16, wq_t, w_scale), args.warmup, args.reps)
    except RuntimeError as exc:  # _int_mm shape constraints on some GPUs / versions
        row["direct_int8_us"], row["direct_int8_error"] = None, str(exc)[:200]
    if triton_available():
        from winoq.kernels import triton_winograd

        for m in TILES:
            layer = QuantWinogradConv2d.from_conv(conv, m, group_size=args.group_size).to(dev).eval()
            try:
                row[f"winoq_f{m}_us"] = cuda_time_us(lambda: triton_winograd.forward(layer, x16),
                                                    args.warmup, args.reps)
            except Exception as exc:  # report, keep measuring the other columns
                row[f"winoq_f{m}_us"], row[f"winoq_f{m}_error"] = None, f"{type(exc).__name__}: {exc}"[:300]
    else:
        for m in TILES:
            row[f"winoq_f{m}_us"], row[f"winoq_f{m}_error"] = None, "triton not installed"
    return row


def add_floors(row: dict, args) -> dict:
    row["floor"] = roofline_floor_us(row, args.bw_gbs, args.int8_tops)
    for m in TILES:
        row[f"floor_f{m}"] = roofline_floor_us(row, args.bw_gbs, args.int8_tops, m=m)
    base = row.get("cudnn_fp16_us")
    for col in COLUMNS:
        t = row.get(f"{col}_us")
        if t:
            row[f"{col}_speedup_vs_fp16"] = base / t if base else None
            floor = row[f"floor_f{col[-1]}"]["floor_us"] if col.startswith("winoq") else row["floor"]["floor_us"]
            row[f"{col}_over_floor"] = t / floor
    return row


def fmt_us(v) -> str:
    return f"{v:>12.1f}" if isinstance(v, (int, float)) else f"{'-':>12}"


def print_table(rows: list[dict]) -> None:
    head = f"{'model':<12}{'layer':<12}{'N':>4}" + "".join(f"{c:>12}" for c in COLUMNS) + \
        f"{'f4 x fp16':>10}{'f6 x fp16':>10}{'floor':>9}{'floor f4':>9}{'bound':>8}"
    print(head + "\n" + "-" * len(head) + "   (microseconds; 'x fp16' = speed-up over cuDNN fp16)")
    for r in rows:
        sp = [r.get(f"winoq_f{m}_speedup_vs_fp16") for m in TILES]
        print(f"{r['model']:<12}{r['layer']:<12}{r['n']:>4}" + "".join(fmt_us(r.get(f"{c}_us")) for c in COLUMNS)
              + "".join(f"{v:>10.2f}" if v else f"{'-':>10}" for v in sp)
              + f"{r['floor']['floor_us']:>9.1f}{r['floor_f4']['floor_us']:>9.1f}{r['floor']['bound']:>8}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bw-gbs", type=float, default=3350.0, help="memory bandwidth, GB/s (H100 SXM: 3350)")
    ap.add_argument("--int8-tops", type=float, default=1979.0, help="dense int8 tensor-core peak, TOPS (H100 SXM)")
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--only", default=None, help="substring of model/layer to restrict the shapes")
    ap.add_argument("--floors-only", action="store_true", help="print the shapes and their floors; no GPU needed")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "kernels_gpu.json")
    args = ap.parse_args(argv)
    todo = [s for s in shapes() if args.only is None or args.only in f"{s['model']} {s['layer']}"]
    if args.floors_only:
        rows = [add_floors(dict(s), args) for s in todo]
        print_table(rows)
        return
    if not torch.cuda.is_available():
        raise SystemExit("kernels_gpu.py measures CUDA kernels, but torch.cuda.is_available() is False here "
                         f"(torch {torch.__version__}); nothing was measured. Run it on a GPU machine, or use "
                         "--floors-only for the shape table, and benchmarks/kernels_cpu.py for the CPU path.")
    torch.backends.cudnn.benchmark = True
    rows = []
    for s in todo:
        row = add_floors(bench_shape(s, args), args)
        rows.append(row)
        print(f"  measured {s['model']} {s['layer']} N={s['n']}", flush=True)
    print_table(rows)
    result = {"machine": machine(), "device": torch.cuda.get_device_name(), "bw_gbs": args.bw_gbs,
              "int8_tops": args.int8_tops, "group_size": args.group_size, "reps": args.reps, "rows": rows}
    dump_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
