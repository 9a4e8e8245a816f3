"""A/B of a compiled Winograd kernel between two source trees, relative to oneDNN's int8 conv.

The VM's speed drifts by up to 1.6x between runs, so each version is timed against the oneDNN
int8 direct conv of the same shape in the same process, and the versions run alternately:

    git worktree add /tmp/before <commit>
    for round in 1 2 3; do for v in /tmp/before .; do
        PYTHONPATH=$v/src OMP_NUM_THREADS=1 python benchmarks/kernel_ab.py --tag $v --out ab.jsonl
    done; done

Each run appends one JSON line per shape of benchmarks/kernels_cpu.PEER_SHAPES: median thread CPU
ms of the oneDNN int8 conv and of the kernel at each tile (the default recipe's stages, group 32,
channels-last input prepared outside the timing, 1 thread). ``--kernel int-step``: the compiled
integer Winograd step of integer-only graphs instead (benchmarks/int_step_cpu.py's layer, exact
input rows, int8 channels-last codes).
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernels_cpu as kc  # noqa: E402

from int_step_cpu import make_step  # noqa: E402

from winoq.kernels import cpu, int_step  # noqa: E402


def time_shape(nb: int, c: int, hw: int, tiles: list[int], reps: int, kernel: str = "cpu") -> dict:
    x, conv = kc.peer_problem(nb, c, hw)
    xc = x.contiguous(memory_format=torch.channels_last)
    fns = {"onednn": kc.ao_int8_fns(conv, x)["int8_onednn"]}
    s_in = float(x.abs().max()) / 127
    qx = torch.round(x / s_in).clamp(-127, 127).to(torch.int8).contiguous(memory_format=torch.channels_last)
    for m in tiles:
        if kernel == "int-step":
            step = make_step(conv, x, m, "exact", s_in)
            fns[f"F{m}"] = lambda step=step: int_step.forward(step, qx)
            continue
        layer = kc.peer_layer(conv, m, 32, "default")
        fns[f"F{m}"] = lambda layer=layer: cpu.forward(layer, xc)
    return {k: cpu_ms for k, (cpu_ms, _) in kc.median_ms(fns, reps, budget_s=float("inf")).items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tag", required=True, help="name of this version in the output")
    ap.add_argument("--out", type=Path, required=True, help="JSON-lines file to append to")
    ap.add_argument("--tiles", type=int, nargs="+", default=[4, 6])
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--shapes", nargs="*", default=None, help="names from kernels_cpu.PEER_SHAPES (default: all)")
    ap.add_argument("--kernel", choices=["cpu", "int-step"], default="cpu",
                    help="the dynamic-scale kernel='cpu' layer, or the integer-only graphs' Winograd step")
    args = ap.parse_args(argv)
    known = [s[0] for s in kc.PEER_SHAPES]
    unknown = sorted(set(args.shapes or ()) - set(known))
    if unknown:
        ap.error(f"unknown --shapes {unknown}; choose from {known}")
    if not (cpu if args.kernel == "cpu" else int_step).available():
        raise SystemExit("the compiled kernel is not built here (bash setup.sh)")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for name, nb, c, hw in kc.PEER_SHAPES:
        if args.shapes and name not in args.shapes:
            continue
        row = {"version": args.tag, "shape": name, "kernel": args.kernel,
               **time_shape(nb, c, hw, args.tiles, args.reps, args.kernel)}
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the rows already appended are whole lines: keep them
        sys.exit("interrupted; the shapes finished so far are in --out")
