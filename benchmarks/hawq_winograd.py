"""Joint Winograd tile + weight bits per 3x3 layer by exact ILP, against every uniform choice.

    python benchmarks/hawq_winograd.py --depth 20 --n-images 500 --out benchmarks/out/hawq_winograd_r20.json

Choices {direct, F(2,3), F(4,3), F(6,3)} x {int4, int8 weights} (activations int8, group 32, data-free
learned transform scales, emulated kernel for accuracy) for each 3x3 stride-1 conv; the other convs
and the classifier choose direct int4 or int8 (``--layers all``, the default: each uniform model is
then itself a plan) or stay int8 direct (``--layers eligible``). Sensitivity (``--sensitivity``):
relative error of the network's output with only that layer quantized as the choice (default), or
of the layer's own output, on ``--calib-images`` images;
costs: multiplications x bits (``mults``) and measured layer latency (``latency``, thread CPU
time; Winograd on the integer CPU kernel). The ILP is solved for budgets from the cheapest to the
dearest plan (``--rs``) and at each uniform choice's own cost (``--match-uniform``: the ILP plan at
that cost should be at least as accurate); each plan and each uniform choice is evaluated on the
same images. At the end, each uniform choice is compared with the best plan that costs no more
(the dominance check), as a paired difference in top-1 on the same images with McNemar's exact
test, its p-value Holm-adjusted over the uniform choices (one question of the whole family), so
that a gap the test set cannot resolve is reported as such.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_cifar_args, cifar_split, correct, dump_json, machine  # noqa: E402

from winoq.mixed_precision import solve_ilp  # noqa: E402
from winoq.mixed_precision.winograd_choice import (  # noqa: E402
    LAYERS, assemble, budget_range, build_choices, checked_plan, joint_tables, label_key, uniform_plan)
from winoq.models import load_cifar_resnet  # noqa: E402


def paired_difference(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Top-1 of ``a`` minus top-1 of ``b`` (points) on the same images, the images only one of them
    gets right, and the exact two-sided McNemar p-value (a binomial test on those discordant images:
    with few of them, a normal interval would call a 4-to-0 split significant)."""
    from scipy.stats import binomtest

    better, worse = int((a & ~b).sum()), int((~a & b).sum())
    p = binomtest(better, better + worse).pvalue if better + worse else 1.0
    return {"diff": 100 * (better - worse) / len(a), "only_a": better, "only_b": worse, "p": float(p)}


def holm(pvalues: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order): the dominance check asks one question of the
    whole family ("is any uniform choice above the curve?"), and testing each of m choices at 5%
    would flag one by chance up to 1 - 0.95^m of the time (34% for 8)."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    out, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def dominance(uniform: dict, points: list[dict], kind: str, hits: dict) -> list[dict]:
    """For each uniform choice: the most accurate planned point whose ``kind`` cost is no higher, and
    the paired difference between the two (McNemar p, and Holm-adjusted over the uniform choices,
    which decides the verdict). ``hits[key]``: per-image correctness of each model."""
    out = []
    for label, u in uniform.items():
        cheaper = [p for p in points if p[kind] <= u[kind] * (1 + 1e-9)]
        if not cheaper:
            continue
        same = lambda p: u.get("plan") is not None and p.get("plan") == u["plan"]  # noqa: E731
        best = max(cheaper, key=lambda p: (p["top1"], -p[kind], same(p)))
        pd = paired_difference(hits[best["key"]], hits[("uniform", label)])
        out.append({"uniform": label, "uniform_top1": u["top1"], "uniform_cost": u[kind], "point": best["name"],
                    "point_top1": best["top1"], "point_cost": best[kind], **pd, "same_plan": same(best)})
    for row, p_holm in zip(out, holm([row["p"] for row in out])):
        row["p_holm"] = p_holm
        row["verdict"] = ("on the curve (the plan is this uniform model)" if row.pop("same_plan") else
                          "dominates" if row["diff"] >= 0 else "below, not significant" if p_holm >= 0.05
                          else "dominated")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--kind", default="mults", choices=("mults", "latency"))
    ap.add_argument("--rs", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.35, 0.5])
    ap.add_argument("--sensitivity", default="output", choices=("output", "layer"),
                    help="output: network output error with one layer quantized; layer: that layer's own error")
    ap.add_argument("--layers", default="all", choices=LAYERS,
                    help="all: every conv and linear is planned (non-Winograd layers: direct int4 or int8); "
                         "eligible: only the Winograd-eligible convs, the rest int8 direct")
    ap.add_argument("--match-uniform", action=argparse.BooleanOptionalAction, default=True,
                    help="also solve the ILP at each uniform choice's cost (the dominance check)")
    ap.add_argument("--check-images", type=int, default=0, metavar="N",
                    help="also check each ILP plan against the uniform choices within its budget by top-1 "
                         "agreement with the float model on N unlabelled calibration images (winograd_choice."
                         "checked_plan; disjoint from the test images); 0: no check")
    ap.add_argument("--check-labels", action="store_true",
                    help="also run the check with the check images' labels (a labelled validation set): candidates "
                         "ranked by top-1 accuracy on them; each check gets its own curve and dominance table")
    ap.add_argument("--eval-kernel", default="emulated", choices=("emulated", "cpu"),
                    help="kernel of the Winograd layers when models are evaluated and checked (the tables always "
                         "use the emulated layers): 'cpu' = the compiled fixed-point kernel users deploy, about 10x "
                         "faster than the emulation, which makes a test set of thousands of images affordable")
    add_cifar_args(ap, n_images=500, calib_images=32, out="benchmarks/out/hawq_winograd.json")
    args = ap.parse_args(argv)
    if args.check_labels and not args.check_images:
        ap.error("--check-labels needs check images: pass --check-images N")
    torch.set_num_threads(args.threads)
    # the calibration pool: the last images of the shuffled test set, never the evaluated ones
    x, y, pool, pool_y = cifar_split(args.n_images, max(args.calib_images, args.check_images), calib_labels=True)
    calib, check = pool[-args.calib_images:], pool[-args.check_images:] if args.check_images else None
    checks = {"checked": None}  # check name -> labels (None: agreement with the float model)
    if args.check_images and args.check_labels:
        checks["checked_labels"] = pool_y[-args.check_images:]
    model = load_cifar_resnet(args.depth)
    res = {"machine": machine(), "command": "python benchmarks/hawq_winograd.py " + " ".join(argv or sys.argv[1:]),
           "n_images": args.n_images, "fp_top1": 100 * float(correct(model, x, y).float().mean()), "uniform": {},
           "ilp": []}
    hits = {}   # per-image correctness of every evaluated model, for the paired dominance check

    def top1(m, key):
        hits[key] = correct(m, x, y)
        return 100 * float(hits[key].float().mean())

    t0 = time.perf_counter()
    choices = build_choices(model)
    sens, costs = joint_tables(model, choices, calib, samples=args.calib_images, sensitivity=args.sensitivity,
                                 layers=args.layers)
    res["build_s"] = time.perf_counter() - t0
    if args.eval_kernel != "emulated":
        from winoq import set_kernel
        from winoq.kernels import cpu

        if not cpu.available():
            raise SystemExit("--eval-kernel cpu needs the compiled kernel: run `bash setup.sh`")
        for label, qm in choices.items():
            if label[0] != "direct":
                set_kernel(qm, args.eval_kernel)   # assembled plans copy these layers, kernel included
    res["eval_kernel"], res["layers"] = args.eval_kernel, args.layers
    res["sensitivity"] = {n: {label_key(c): v for c, v in s.items()} for n, s in sens.items()}
    res["costs"] = {k: {n: {label_key(c): v for c, v in s.items()} for n, s in t.items()} for k, t in costs.items()}
    print(f"FP {res['fp_top1']:.2f}; tables built in {res['build_s']:.0f} s", flush=True)
    names = list(sens)
    for label in choices:
        plan = uniform_plan(label, sens)
        row = {"top1": top1(choices[label], ("uniform", label_key(label))),
               **{k: sum(costs[k][n][plan[n]] for n in names) for k in costs},
               "sum_sensitivity": sum(sens[n][plan[n]] for n in names), "plan": {n: label_key(c) for n, c in plan.items()}}
        res["uniform"][label_key(label)] = row
        print("uniform", label, {k: round(v, 4) for k, v in row.items() if k != "plan"}, flush=True)
        dump_json(args.out, res)
    lo, hi = budget_range(costs, args.kind)
    budgets = [("r", r, lo + r * (hi - lo)) for r in args.rs]
    if args.match_uniform:
        budgets += [("uniform", k, row[args.kind]) for k, row in res["uniform"].items()]
    check_cache = {}  # the check images' logits of every candidate scored, shared by both checks and every budget
    for how, key, budget in budgets:
        t1 = time.thread_time()
        plan = solve_ilp(sens, costs, {args.kind: budget * (1 + 1e-12)})
        solve_s = time.thread_time() - t1
        m = assemble(choices, plan)
        row = {how: key, "top1": top1(m, ("ilp", how, key)), **{k: sum(costs[k][n][plan[n]] for n in names) for k in costs},
               "sum_sensitivity": sum(sens[n][plan[n]] for n in names), "solve_s": solve_s,
               "plan": {n: label_key(c) for n, c in plan.items()}}
        for cname, labels in (checks.items() if check is not None else ()):
            cplan, info = checked_plan(model, choices, plan, costs, {args.kind: budget * (1 + 1e-12)}, check,
                                       check_cache, labels=labels)
            done = [c for c in checks if c in row and row[c]["chosen"] == info["chosen"]]
            if cplan is plan:
                hits[(cname, how, key)], acc = hits[("ilp", how, key)], row["top1"]
            elif done:  # the other check chose the same candidate: evaluated already
                hits[(cname, how, key)], acc = hits[(done[0], how, key)], row[done[0]]["top1"]
            else:
                acc = top1(assemble(choices, cplan), (cname, how, key))
            row[cname] = {"chosen": info["chosen"], "scores": info["scores"], "top1": acc,
                          **{k: sum(costs[k][n][cplan[n]] for n in names) for k in costs},
                          "plan": {n: label_key(c) for n, c in cplan.items()}}
        res["ilp"].append(row)
        print("ilp", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "plan"},
              flush=True)
        dump_json(args.out, res)
    # one curve per check (the ILP's plans and what that check chose), never their union
    res["dominance"] = dominance(res["uniform"], curve_points(res["ilp"], args.kind), args.kind, hits)
    if "checked_labels" in checks and check is not None:
        res["dominance_labels"] = dominance(res["uniform"], curve_points(res["ilp"], args.kind, "checked_labels"),
                                            args.kind, hits)
    dump_json(args.out, res)
    print_dominance(res["dominance"], args.kind)
    if "dominance_labels" in res:
        print("\nwith the labelled check:")
        print_dominance(res["dominance_labels"], args.kind)


def curve_points(rows: list[dict], kind: str, check: str = "checked") -> list[dict]:
    """Every planned model (the ILP's plan, and the ``check``'s plan where it differs) as a curve point."""
    points = []
    for row in rows:
        how = "r" if "r" in row else "uniform"
        points.append({"name": f"ILP at {how}={row[how]}", "key": ("ilp", how, row[how]), "top1": row["top1"],
                       kind: row[kind], "plan": row.get("plan")})
        c = row.get(check)
        if c is not None and c["chosen"] != "ilp":
            points.append({"name": f"{check.replace('_', ' ')} at {how}={row[how]} ({c['chosen']})",
                           "key": (check, how, row[how]), "top1": c["top1"], kind: c[kind], "plan": c.get("plan")})
    return points


def print_dominance(rows: list[dict], kind: str) -> None:
    print(f"\n| uniform | top-1 | {kind} | best plan at no more cost | top-1 | {kind} | difference | images only "
          f"plan / only uniform right | McNemar p | Holm p | verdict |\n|---|---:|---:|---|---:|---:|---:|---|---:|---:|---|")
    for d in rows:
        print(f"| {d['uniform']} | {d['uniform_top1']:.1f} | {d['uniform_cost']:.4g} | {d['point']} | "
              f"{d['point_top1']:.1f} | {d['point_cost']:.4g} | {d['diff']:+.1f} | {d['only_a']} / {d['only_b']} | "
              f"{d['p']:.2f} | {d['p_holm']:.2f} | {d['verdict']} |")


if __name__ == "__main__":
    main()
