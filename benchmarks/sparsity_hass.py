"""Hardware-aware sparsity search (HASS) vs its baselines on a CIFAR ResNet from ../shared.

    python benchmarks/sparsity_hass.py --depth 20 --out benchmarks/out/sparsity_hass.json

The model runs with 8-bit fixed point (weights per output channel, conv inputs per tensor).
Searches use ``--search-images`` labelled images (accuracy objective; window histograms on the
first ``--stats-images`` of them); the chosen designs are re-evaluated on ``--heldout-images``
other images. Designs per platform (ZCU102, U250):

* dense: zero thresholds, dense conv engines;
* uniform: one (tau_w, tau_a) for all layers, grid; resources allocated afterwards;
* unaware: per-layer thresholds by TPE for accuracy and product sparsity; allocated afterwards;
* greedy: the HASS paper's greedy steps (all layers together), throughput in the loop;
* hass: per-layer thresholds and the DSP budget by TPE for accuracy and images/s per DSP, then
  ``--refine-steps`` per-layer steps on the layers holding the most DSPs (``refine``, hardware score);
* the unaware search gets the same number of refinement steps with its own score (MAC-weighted
  product sparsity, on the layers with the most non-zero MACs left), so both searches evaluate
  about as many designs.

"Allocated afterwards" = the greedy allocator at the best of a grid of DSP budgets for images/s
per DSP, so the baselines get the same allocation freedom the hardware-aware search has. At
each accuracy drop (<= 1 and <= 2 points below the 8-bit dense model on the search images) each
method's design with the most images/s per DSP is reported.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cifar_split, dump_json, machine  # noqa: E402

import torch  # noqa: E402

from winoq.models import load_cifar_resnet  # noqa: E402
from winoq.sparsity import (Evaluator, Problem, StudyConfig, allocate_best, best_under_drop, greedy_search,  # noqa: E402
                            hass_search, map_model, refine, uniform_search, unaware_search)
from winoq.sparsity.plots import plot_layers, plot_pareto  # noqa: E402
from winoq.sparsity.search import make_record  # noqa: E402

OBJ = "throughput_per_dsp"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--platforms", nargs="+", default=["zcu102", "u250"])
    ap.add_argument("--search-images", type=int, default=256)
    ap.add_argument("--stats-images", type=int, default=64)
    ap.add_argument("--heldout-images", type=int, default=1000)
    ap.add_argument("--hass-trials", type=int, default=50)
    ap.add_argument("--unaware-trials", type=int, default=50)
    ap.add_argument("--greedy-steps", type=int, default=12)
    ap.add_argument("--refine-steps", type=int, default=12,
                    help="per-layer refinement steps after TPE, for HASS (hardware score) and the unaware "
                         "search (sparsity score) alike; 0: none")
    ap.add_argument("--refine-layers", type=int, default=4, help="layers tried per refinement step")
    ap.add_argument("--storage-dir", type=Path, default=Path("benchmarks/out/sparsity_hass_studies"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/sparsity_hass.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    n_s = args.search_images
    x, y, _ = cifar_split(n_s + args.heldout_images, 0)
    model = load_cifar_resnet(args.depth)
    ev = Evaluator(model, x[:n_s], y[:n_s], bits=8, n_stats=args.stats_images)
    held = Evaluator(model, x[n_s:], y[n_s:], bits=8, n_stats=1)
    specs = map_model(model, x[:1])
    problem = Problem(ev, specs)
    args.storage_dir.mkdir(parents=True, exist_ok=True)
    res = {"machine": machine(), "command": "python benchmarks/sparsity_hass.py " + " ".join(argv or sys.argv[1:]),
           "depth": args.depth, "search_images": n_s, "heldout_images": args.heldout_images, "methods": {}}
    with torch.no_grad():
        res["float_accuracy_search"] = 100.0 * float((model(x[:n_s]).argmax(1) == y[:n_s]).float().mean())

    cpu = {}

    def timed(fn, *a, **kw):  # wall-clock seconds; CPU seconds of this process kept in `cpu`
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn(*a, **kw)
        cpu[len(cpu)] = time.process_time() - c0
        return out, time.perf_counter() - t0

    dense_cfg = ev.uniform(0.0, 0.0)
    dense = make_record("dense", dense_cfg, ev.evaluate(dense_cfg))
    ref = dense.accuracy
    uniform, t_uni = timed(uniform_search, problem, (0.0, 0.01, 0.02), (0.0, 0.1, 0.2, 0.3), progress=False)
    db = lambda name: f"sqlite:///{args.storage_dir / name}.db"  # noqa: E731
    unaware, t_un = timed(unaware_search, problem, StudyConfig(f"unaware-r{args.depth}", db(f"unaware-r{args.depth}"),
                                                                args.unaware_trials, progress=False))
    res["search"] = {"uniform": {"trials": len(uniform), "seconds": t_uni, "cpu_seconds": cpu[0]},
                     "unaware": {"trials": len(unaware), "seconds": t_un, "cpu_seconds": cpu[1]}}
    refine_kw = dict(reference_accuracy=ref, max_steps=args.refine_steps, layers_per_step=args.refine_layers,
                     progress=False)
    if args.refine_steps:  # the unaware refinement: from its best design by sparsity at each drop
        for drop in (1.0, 2.0):
            start = best_under_drop(unaware, ref, drop, key=lambda r: r.product_sparsity)
            more, t_r = timed(refine, problem, start, "sparsity", max_drop=drop, **refine_kw)
            res["search"][f"unaware-refine@{drop:g}"] = {"trials": 1 + 2 * args.refine_layers * (len(more) - 1),
                                                         "steps": len(more) - 1, "seconds": t_r,
                                                         "cpu_seconds": cpu[len(cpu) - 1]}
            unaware = unaware + more
    heldout_cache: dict = {}

    def heldout(rec):
        key = (tuple(sorted(rec.tau_w.items())), tuple(sorted(rec.tau_a.items())))
        if key not in heldout_cache:
            heldout_cache[key] = held.evaluate(held.config(rec.tau_w, rec.tau_a)).accuracy
        return heldout_cache[key]

    for plat in args.platforms:
        name = f"hass-r{args.depth}-{plat}"
        hass, t_h = timed(hass_search, problem, plat, StudyConfig(name, db(name), args.hass_trials, progress=False), OBJ)
        greedy, t_g = timed(greedy_search, problem, plat, step_w=0.0025, step_a=0.025, max_steps=args.greedy_steps,
                            objective=OBJ, progress=False)
        res["search"][f"hass-{plat}"] = {"trials": len(hass), "seconds": t_h, "cpu_seconds": cpu[len(cpu) - 2]}
        res["search"][f"greedy-{plat}"] = {"trials": 1 + 2 * (len(greedy) - 1), "steps": len(greedy) - 1,
                                           "seconds": t_g, "cpu_seconds": cpu[len(cpu) - 1]}
        if args.refine_steps:  # HASS's refinement: from its best design by images/s per DSP at each drop
            for drop in (1.0, 2.0):
                start = best_under_drop(hass, ref, drop, key=lambda r: r.design[OBJ])
                more, t_r = timed(refine, problem, start, "hardware", plat, max_drop=drop, **refine_kw)
                res["search"][f"hass-refine-{plat}@{drop:g}"] = {
                    "trials": 1 + 2 * args.refine_layers * (len(more) - 1), "steps": len(more) - 1, "seconds": t_r,
                    "cpu_seconds": cpu[len(cpu) - 1]}
                hass = hass + more
        dense_d = make_record("dense", dense_cfg, ev.evaluate(dense_cfg))
        dense_d.design = allocate_best(dense_d, specs, plat, OBJ, sparse=False).summary()
        for rec in uniform + unaware:
            rec.design = allocate_best(rec, specs, plat, OBJ).summary()
        for rec in hass:  # refined designs were allocated on the full board: re-allocate at their best per DSP
            if rec.method == "hass-refine":
                rec.design = allocate_best(rec, specs, plat, OBJ).summary()
        for rec in greedy:  # greedy steps on full budget; its allocation afterwards like the others
            rec.design = allocate_best(rec, specs, plat, OBJ).summary()
        by_method = {"dense": [dense_d], "uniform": [r for r in uniform], "unaware": [r for r in unaware],
                     "greedy": greedy, "hass": hass}
        rows = {}
        for drop in (1.0, 2.0):
            for method, recs in by_method.items():
                best = best_under_drop(recs, ref, drop, key=lambda r: r.design[OBJ])
                if best is None:
                    continue
                rows[f"{method}@{drop:g}"] = {
                    "method": method, "drop": drop, "accuracy": best.accuracy, "heldout_accuracy": heldout(best),
                    "throughput": best.design["throughput"], "dsp": best.design["dsp"],
                    "bram36": best.design["bram36"], OBJ: best.design[OBJ],
                    "product_sparsity": best.product_sparsity, "bottleneck": best.design["bottleneck"],
                    "tau_w": best.tau_w, "tau_a": best.tau_a, "dsp_fraction": best.dsp_fraction,
                    "layers": best.layers, "design": best.design}
        res["methods"][plat] = rows
        out_png = args.out.with_name(f"{args.out.stem}_r{args.depth}_{plat}_pareto.png")
        recs_of = {m: by_method[m] for m in by_method}
        chosen = {}
        for key, row in rows.items():
            m = row["method"]
            chosen[key] = next(r for r in recs_of[m] if r.tau_w == row["tau_w"] and r.tau_a == row["tau_a"]
                               and r.design == row["design"])
        plot_pareto(recs_of, out_png, title=f"ResNet-{args.depth} on {plat}, 8 bit",
                    highlight={k: v for k, v in chosen.items() if k.startswith("hass")})
        if "hass@1" in chosen:
            plot_layers(chosen["hass@1"], args.out.with_name(f"{args.out.stem}_r{args.depth}_{plat}_layers.png"))
        dump_json(args.out, res)
    res["reference_accuracy"] = ref
    dump_json(args.out, res)
    print_table(res)
    return res


def print_table(res):
    print(f"ResNet-{res['depth']} 8 bit: float {res['float_accuracy_search']:.2f}%, dense 8-bit "
          f"{res['reference_accuracy']:.2f}% on {res['search_images']} search images")
    print("| platform | drop | method | acc (search) | acc (held-out) | images/s | DSP | images/s/DSP | product sparsity | vs best non-HW-aware |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for plat, rows in res["methods"].items():
        for drop in (1.0, 2.0):
            base = max((r[OBJ] for r in rows.values() if r["drop"] == drop and r["method"] in ("dense", "uniform", "unaware")),
                       default=None)
            for r in rows.values():
                if r["drop"] != drop:
                    continue
                ratio = f"{r[OBJ] / base:.2f}x" if base else "-"
                print(f"| {plat} | {drop:g} | {r['method']} | {r['accuracy']:.2f} | {r['heldout_accuracy']:.2f} | "
                      f"{r['throughput']:.0f} | {r['dsp']} | {r[OBJ]:.2f} | {r['product_sparsity']:.3f} | {ratio} |")
    print("| search | trials | wall seconds (shared machine) | CPU seconds |")
    print("|---|---|---|---|")
    for k, v in res["search"].items():
        print(f"| {k} | {v['trials']} | {v['seconds']:.0f} | {v['cpu_seconds']:.0f} |")


if __name__ == "__main__":
    main()
