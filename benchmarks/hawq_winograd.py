"""Joint Winograd tile + weight bits per 3x3 layer by exact ILP, against every uniform choice.

    python benchmarks/hawq_winograd.py --depth 20 --n-images 500 --out benchmarks/out/hawq_winograd_r20.json

Choices {direct, F(2,3), F(4,3), F(6,3)} x {int4, int8 weights} (activations int8, group 32, data-free
learned transform scales, emulated kernel for accuracy) for each 3x3 stride-1 conv; other layers
int8 direct. Sensitivity (``--sensitivity``): relative error of the network's output with only that
layer quantized as the choice (default), or of the layer's own output, on ``--calib-images`` images;
costs: multiplications x bits (``mults``) and measured layer latency (``latency``, thread CPU
time; Winograd on the integer CPU kernel). The ILP is solved for budgets from the cheapest to the
dearest plan (``--rs``) and at each uniform choice's own cost (``--match-uniform``: the ILP plan at
that cost should be at least as accurate); each plan and each uniform choice is evaluated on the
same images.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_cifar_args, cifar_split, dump_json, machine, top1  # noqa: E402

from winoq.mixed_precision import solve_ilp  # noqa: E402
from winoq.mixed_precision.winograd_choice import assemble, build_choices, checked_plan, joint_tables  # noqa: E402
from winoq.models import load_cifar_resnet  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--kind", default="mults", choices=("mults", "latency"))
    ap.add_argument("--rs", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.35, 0.5])
    ap.add_argument("--sensitivity", default="output", choices=("output", "layer"),
                    help="output: network output error with one layer quantized; layer: that layer's own error")
    ap.add_argument("--match-uniform", action=argparse.BooleanOptionalAction, default=True,
                    help="also solve the ILP at each uniform choice's cost (the dominance check)")
    ap.add_argument("--check-images", type=int, default=0, metavar="N",
                    help="also check each ILP plan against the uniform choices within its budget by top-1 "
                         "agreement with the float model on N unlabelled calibration images (winograd_choice."
                         "checked_plan; disjoint from the test images); 0: no check")
    add_cifar_args(ap, n_images=500, calib_images=32, out="benchmarks/out/hawq_winograd.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    # the calibration pool: the last images of the shuffled test set, never the evaluated ones
    x, y, pool = cifar_split(args.n_images, max(args.calib_images, args.check_images))
    calib, check = pool[-args.calib_images:], pool[-args.check_images:] if args.check_images else None
    model = load_cifar_resnet(args.depth)
    res = {"machine": machine(), "command": "python benchmarks/hawq_winograd.py " + " ".join(argv or sys.argv[1:]),
           "n_images": args.n_images, "fp_top1": top1(model, x, y), "uniform": {}, "ilp": []}
    t0 = time.perf_counter()
    choices = build_choices(model)
    sens, costs = joint_tables(model, choices, calib, samples=args.calib_images, sensitivity=args.sensitivity)
    res["build_s"] = time.perf_counter() - t0
    res["sensitivity"] = {n: {f"{t}/{b}": v for (t, b), v in s.items()} for n, s in sens.items()}
    res["costs"] = {k: {n: {f"{t}/{b}": v for (t, b), v in s.items()} for n, s in c.items()} for k, c in costs.items()}
    print(f"FP {res['fp_top1']:.2f}; tables built in {res['build_s']:.0f} s", flush=True)
    names = list(sens)
    for label in choices:
        row = {"top1": top1(choices[label], x, y), **{k: sum(costs[k][n][label] for n in names) for k in costs},
               "sum_sensitivity": sum(sens[n][label] for n in names)}
        res["uniform"][f"{label[0]}/{label[1]}"] = row
        print("uniform", label, {k: round(v, 4) for k, v in row.items()}, flush=True)
        dump_json(args.out, res)
    lo = sum(min(t.values()) for t in costs[args.kind].values())
    hi = sum(max(t.values()) for t in costs[args.kind].values())
    budgets = [("r", r, lo + r * (hi - lo)) for r in args.rs]
    if args.match_uniform:
        budgets += [("uniform", k, row[args.kind]) for k, row in res["uniform"].items()]
    check_scores = {}  # the uniform candidates' scores, shared by every budget
    for how, key, budget in budgets:
        t1 = time.thread_time()
        plan = solve_ilp(sens, costs, {args.kind: budget * (1 + 1e-12)})
        solve_s = time.thread_time() - t1
        m = assemble(choices, plan)
        row = {how: key, "top1": top1(m, x, y), **{k: sum(costs[k][n][plan[n]] for n in names) for k in costs},
               "sum_sensitivity": sum(sens[n][plan[n]] for n in names), "solve_s": solve_s,
               "plan": {n: f"{t}/{b}" for n, (t, b) in plan.items()}}
        if check is not None:
            cplan, info = checked_plan(model, choices, plan, costs, {args.kind: budget * (1 + 1e-12)}, check,
                                       check_scores)
            row["checked"] = {"chosen": info["chosen"], "scores": info["scores"],
                              "top1": row["top1"] if cplan is plan else top1(assemble(choices, cplan), x, y),
                              **{k: sum(costs[k][n][cplan[n]] for n in names) for k in costs}}
        res["ilp"].append(row)
        print("ilp", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "plan"},
              flush=True)
        dump_json(args.out, res)


if __name__ == "__main__":
    main()
