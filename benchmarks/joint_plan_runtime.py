"""The joint tile + bits ILP under a latency budget timed on winoq's compiled integer runtime, and the
planned model deployed on that runtime, end to end.

    WINOQ_SHARED=../shared OMP_NUM_THREADS=1 python benchmarks/joint_plan_runtime.py --depth 20 \
        --out benchmarks/out/joint_plan_runtime_r20.json

``plan_tiles`` with ``JointPlanConfig(budget="latency", latency="integer")``: each layer's latency
cost is its time on the kernel it deploys on (the int8 direct conv or the integer Winograd step,
requantization included). Each plan (``--rs``) is converted to an integer-only model
(``plan.integer_config()``) and compiled (``winoq.integer.compile_model``); its top-1 on
``--n-images`` CIFAR-10 test images and its median time per batch (``--batch``, thread CPU ms,
interleaved with the others) are set against the uniform int8 direct integer model on the same
runtime, a torch.ao int8 model (x86 backend) and the float model.
"""
from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_cifar_args, cifar_split, dump_json, machine  # noqa: E402
from kernels_cpu import median_ms  # noqa: E402

from winoq.integer import compile_model, convert  # noqa: E402
from winoq.mixed_precision.winograd_choice import JointPlanConfig, plan_tiles  # noqa: E402
from winoq.models import load_cifar_resnet  # noqa: E402


def top1(fn, x, y, batch=250) -> float:
    with torch.no_grad():
        pred = torch.cat([fn(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])
    return 100.0 * float((pred == y).float().mean())


def torch_ao(model, calib, example):
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    qm = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), (example,))
    with torch.no_grad():
        qm(calib)
    return convert_fx(qm)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cifar_args(ap, n_images=1000, calib_images=128, out="benchmarks/out/joint_plan_runtime.json")
    ap.add_argument("--depth", type=int, default=20, choices=[20, 32, 44, 56])
    ap.add_argument("--rs", type=float, nargs="+", default=[0.0, 0.1, 0.3], help="latency budgets r of the plans")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    model = load_cifar_resnet(args.depth).eval()
    x, y, calib = cifar_split(args.n_images, args.calib_images)
    xb = x[:args.batch]
    runs = {"fp32": model, "torch.ao int8 (x86)": torch_ao(model, calib, x[:1]),
            "winoq integer int8 direct (compiled)": compile_model(convert(model, calib))}
    plans = {}
    for r in args.rs:
        plan, _ = plan_tiles(model, calib, JointPlanConfig(budget="latency", r=r, latency="integer"), progress=False)
        name = f"winoq joint plan r={r} (compiled)"
        runs[name] = compile_model(convert(model, calib, plan.integer_config()))
        tiles = {}
        for t, b in plan.plan.values():
            tiles[f"{t}/{b}"] = tiles.get(f"{t}/{b}", 0) + 1
        plans[name] = {"choices": tiles, "planned_ms_per_image": 1e3 * plan.totals["latency"], "budget_ms_per_image": 1e3 * plan.budget}
        print(name, plans[name], flush=True)
    acc = {k: top1(f, x, y) for k, f in runs.items()}
    with torch.no_grad():
        ms = {k: v[0] for k, v in median_ms({k: (lambda f=f: f(xb)) for k, f in runs.items()}, args.reps).items()}
    print(f"| model | top-1 ({len(x)} images) | ms per batch of {args.batch} |\n|---|---:|---:|")
    for k in runs:
        print(f"| {k} | {acc[k]:.2f} | {ms[k]:.1f} |")
    dump_json(args.out, {"machine": machine(), "threads": torch.get_num_threads(), "depth": args.depth,
                         "n_images": len(x), "batch": args.batch, "top1": acc, "ms": ms, "plans": plans})


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted; nothing was written to --out (it is written once every model is measured)")
