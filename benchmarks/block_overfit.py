"""Layer-wise vs block-wise learned rounding (BRECQ) on a CIFAR ResNet: accuracy and the
per-block output error on the calibration images and on held-out images.

    python benchmarks/block_overfit.py --depth 20 --calib-images 32 128 --out benchmarks/out/block_overfit.json

W4A8 (INT4 weights, INT8 activations, group 32), direct convs, learned rounding with
``--iters`` iterations per layer / block on ``Recipe(calib_samples=N)`` calibration images
from the far end of the fixed shuffle; top-1 on ``--n-images`` images. Block errors: for each
residual block, the quantized block is fed the float model's block input and compared with the
float block's output (squared error summed over channels, averaged over the rest) on the
calibration images and on ``--held-out`` other images (disjoint from both).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cifar_split, dump_json, machine, quantize_timed, top1  # noqa: E402

import winoq  # noqa: E402
from winoq.algorithms.block_reconstruction import find_blocks  # noqa: E402
from winoq.models import load_cifar_resnet  # noqa: E402


def block_io(model, blocks, x):
    """(input, output) of each named block of ``model`` on ``x``."""
    rec = {}
    hooks = [model.get_submodule(b).register_forward_hook(lambda m, a, o, b=b: rec.__setitem__(b, (a[0], o)))
             for b in blocks]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return rec


def block_errors(qmodel, blocks, ref):
    with torch.no_grad():
        return [float((qmodel.get_submodule(b)(ref[b][0]) - ref[b][1]).pow(2).sum(1).mean()) for b in blocks]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--n-images", type=int, default=1000)
    ap.add_argument("--calib-images", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--held-out", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/block_overfit.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_cifar_resnet(args.depth)
    blocks, _ = find_blocks(model)
    res = {"machine": machine(), "command": "python benchmarks/block_overfit.py " + " ".join(argv or sys.argv[1:]),
           "blocks": blocks, "runs": {}}
    for n_cal in args.calib_images:
        x, y, calib = cifar_split(args.n_images, n_cal)
        held = cifar_split(args.n_images + args.held_out, n_cal)[0][args.n_images:]
        ref_cal, ref_held = block_io(model, blocks, calib), block_io(model, blocks, held)
        for rec in ("layer", "block"):
            recipe = winoq.Recipe(weights="int4", winograd=None, rounding="learned", rounding_iters=args.iters,
                                  reconstruction=rec, calib_samples=n_cal)
            q, t = quantize_timed(model, recipe, calib)
            row = {"top1": top1(q, x, y), "fp_top1": top1(model, x, y), "calibrate_s": t,
                   "block_err_calib": block_errors(q, blocks, ref_cal),
                   "block_err_held_out": block_errors(q, blocks, ref_held)}
            res["runs"][f"{n_cal} calib, {rec}"] = row
            print(f"{n_cal:4d} calib {rec:5s}: top-1 {row['top1']:.2f} (FP {row['fp_top1']:.2f}), {t:.0f}s; last block "
                  f"error calib {row['block_err_calib'][-1]:.3f}, held-out {row['block_err_held_out'][-1]:.3f}",
                  flush=True)
            dump_json(args.out, res)


if __name__ == "__main__":
    main()
