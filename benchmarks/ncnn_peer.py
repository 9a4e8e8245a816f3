"""ncnn's int8 3x3 convolution, Winograd on and off, against the torch.ao int8 direct convs.

ncnn (PyPI ``ncnn``) is the best-known open int8 Winograd CPU implementation
(``conv3x3s1_winograd43_int8``). It has no Python API to build a layer from tensors, so
:func:`write_ncnn_conv` writes the model files itself: a ``.param`` text graph (Input ->
Convolution with ``8=1``, int8 scales present) and a ``.bin`` with float32 weights (a zero
flag word first: raw float32), the bias, one int8 weight scale per output channel and one
input scale (ncnn's convention: ``code = round(x * scale)``). ncnn quantizes the weights at
load time and runs its int8 kernels; its output is float. ncnn's int8 Winograd is exact
integer arithmetic on 16-bit transformed values, so Winograd on and off give the same output
bit for bit (checked below): what the switch changes is only the speed.

One image per ``extract`` call (ncnn's blobs have no batch dimension): a batch of N is N calls.
Times: median thread CPU time (ms, 1 thread) of calls interleaved round-robin with the torch.ao
convs on the same input; with 2 threads the wall time (``--threads 2``).

    python benchmarks/ncnn_peer.py                     # table + benchmarks/out/ncnn_peer.json
    python benchmarks/ncnn_peer.py --shapes r18-s2 sd-640 --threads 1 2
"""
from __future__ import annotations

import argparse
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import dump_json, machine  # noqa: E402
from kernels_cpu import PEER_SHAPES, ao_int8_fns, peer_problem  # noqa: E402


def write_ncnn_conv(folder: Path, conv: torch.nn.Conv2d, hw: int, input_scale: float) -> tuple[Path, Path]:
    """``conv.param`` / ``conv.bin`` of a single int8 ncnn Convolution (3x3, stride 1, pad 1)."""
    w = conv.weight.detach().float().numpy()
    b = conv.bias.detach().float().numpy()
    k, c = w.shape[:2]
    w_scales = (127.0 / np.maximum(np.abs(w).reshape(k, -1).max(1), 1e-8)).astype(np.float32)
    param = folder / "conv.param"
    param.write_text("7767517\n2 2\n"
                     f"Input data 0 1 data 0={hw} 1={hw} 2={c}\n"
                     f"Convolution conv 1 1 data out 0={k} 1=3 3=1 4=1 5=1 6={w.size} 8=1\n")
    weights = folder / "conv.bin"
    weights.write_bytes(struct.pack("<I", 0) + w.tobytes() + b.tobytes() + w_scales.tobytes()
                        + np.float32(input_scale).tobytes())
    return param, weights


def ncnn_net(param: Path, weights: Path, winograd: bool, threads: int):
    import ncnn

    opt = ncnn.Option()  # net.opt returns a copy: set a fresh Option, then assign it
    opt.num_threads = threads
    opt.use_int8_inference = True
    opt.use_packing_layout = True
    for name in ("use_winograd_convolution", "use_winograd23_convolution", "use_winograd43_convolution",
                 "use_winograd63_convolution"):
        setattr(opt, name, winograd)
    net = ncnn.Net()
    net.opt = opt
    if net.load_param(str(param)) != 0 or net.load_model(str(weights)) != 0:
        raise RuntimeError(f"ncnn could not load {param}")
    return net


def ncnn_forward(net, x: torch.Tensor) -> torch.Tensor:
    """Run ``net`` on every image of ``x`` (N, C, H, W) float32; returns (N, K, H, W)."""
    import ncnn

    outs = []
    for img in x.numpy():
        ex = net.create_extractor()
        ex.input("data", ncnn.Mat(np.ascontiguousarray(img)))
        _, out = ex.extract("out")
        outs.append(torch.from_numpy(np.array(out)))
    return torch.stack(outs)


def median_ms(fns: dict, reps: int, wall: bool) -> dict:
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    clock = time.perf_counter if wall else time.thread_time
    for _ in range(reps):
        for k, fn in fns.items():
            t = clock()
            fn()
            times[k].append((clock() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def run(args) -> dict:
    shapes = [s for s in PEER_SHAPES if not args.shapes or s[0] in args.shapes]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for threads in args.threads:
            torch.set_num_threads(threads)
            for name, nb, c, hw in shapes:
                x, conv = peer_problem(nb, c, hw)
                param, weights = write_ncnn_conv(Path(tmp), conv, hw, 127.0 / float(x.abs().max()))
                nets = {on: ncnn_net(param, weights, on, threads) for on in (False, True)}
                fns = {"ncnn_direct": lambda: ncnn_forward(nets[False], x),
                       "ncnn_winograd": lambda: ncnn_forward(nets[True], x)}
                fns.update(ao_int8_fns(conv, x))
                with torch.no_grad():
                    ms = median_ms(fns, args.reps, wall=threads > 1)
                    y_direct, y_wino = ncnn_forward(nets[False], x), ncnn_forward(nets[True], x)
                    exact = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
                err = float((y_wino.double() - exact).norm() / exact.norm())
                row = {"shape": name, "batch": nb, "channels": c, "hw": hw, "threads": threads,
                       **{f"{k}_ms": v for k, v in ms.items()},
                       "winograd_equals_direct": bool(torch.equal(y_direct, y_wino)), "ncnn_rel_error": err}
                rows.append(row)
                print_row(row)
    return {"machine": machine(), "timing": "1 thread: median thread CPU ms; 2 threads: median wall ms",
            "ncnn": __import__("ncnn").__version__, "rows": rows}


def print_row(r: dict) -> None:
    if not getattr(print_row, "done", False):
        head = (f"{'shape':<9}{'N':>3}{'C':>5}{'HW':>4}{'thr':>4}{'fbgemm8':>9}{'onednn8':>9}{'ncnn8':>8}"
                f"{'ncnn8 wino':>11}{'wino=direct':>12}{'rel err':>9}")
        print(head + "\n" + "-" * len(head))
        print_row.done = True
    print(f"{r['shape']:<9}{r['batch']:>3}{r['channels']:>5}{r['hw']:>4}{r['threads']:>4}{r['int8_fbgemm_ms']:>9.2f}"
          f"{r['int8_onednn_ms']:>9.2f}{r['ncnn_direct_ms']:>8.2f}{r['ncnn_winograd_ms']:>11.2f}"
          f"{str(r['winograd_equals_direct']):>12}{r['ncnn_rel_error']:>9.4f}", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", help="subset of " + " ".join(s[0] for s in PEER_SHAPES))
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "ncnn_peer.json"))
    args = ap.parse_args(argv)
    try:
        import ncnn  # noqa: F401
    except ImportError:
        raise SystemExit("this benchmark needs the ncnn package: pip install ncnn (or the 'bench' extra)")
    dump_json(Path(args.out), run(args))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
