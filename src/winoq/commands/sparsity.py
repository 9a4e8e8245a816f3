"""``winoq sparsity``: hardware-aware sparsity search (HASS) for dataflow FPGA accelerators.

    winoq sparsity platforms
    winoq sparsity search --model cifar-resnet20 --weights shared --platform zcu102 --trials 50 --out hass-r20
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

METHODS = ("hass", "unaware", "uniform", "greedy")


def _platform(text: str) -> str:
    from ..sparsity.accelerator import get_platform

    try:
        get_platform(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text.lower()


def _threshold(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (v >= 0 and v < float("inf")):
        raise argparse.ArgumentTypeError(f"threshold {text} is out of range: thresholds must be finite and >= 0")
    return v


def register(subparsers) -> None:
    """Add ``sparsity`` with its ``platforms`` and ``search`` subcommands."""
    from ._common import add_common_options as _common, positive_int as _positive_int

    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser(
        "sparsity", formatter_class=fmt, help="hardware-aware sparsity search for dataflow FPGA accelerators",
        description="Per-layer weight / activation thresholds searched with a layer-pipelined FPGA accelerator "
                    "model in the loop (HASS), and the baselines: uniform thresholds, hardware-unaware per-layer "
                    "search, greedy steps.",
        epilog="examples:\n  winoq sparsity platforms\n"
               "  winoq sparsity search --model cifar-resnet20 --weights shared --platform zcu102 --out hass-r20\n"
               "  winoq sparsity search --model cifar-resnet20 --weights shared --method uniform "
               "--tau-w 0 0.01 --tau-a 0 0.1 0.2 --out uni")
    sub = p.add_subparsers(dest="sparsity_command", metavar="SUBCOMMAND", parser_class=subparsers._parser_class)
    plats = sub.add_parser("platforms", help="list the modelled FPGA platforms")
    plats.set_defaults(func=run_platforms)
    s = sub.add_parser(
        "search", formatter_class=fmt, help="search per-layer thresholds (and the allocation) for one platform",
        description="Evaluates threshold configurations on --n-images labelled images (8- or 16-bit fixed point), "
                    "allocates the accelerator and writes OUT/records.json, OUT/pareto.png and OUT/layers.png "
                    "(the best design within --max-drop points of the dense model). Optuna studies are kept in "
                    "--storage (default OUT/study.db): run the same command again to resume, or start more "
                    "processes on it with --workers.")
    s.add_argument("--model", required=True, metavar="NAME_OR_PATH", help="model name or state-dict file")
    s.add_argument("--weights", metavar="FILE", help="float weights ('shared': the pretrained CIFAR ResNets)")
    s.add_argument("--data", metavar="DIR", help="labelled images (ImageFolder; cifar-*: shared CIFAR-10 test set)")
    s.add_argument("--n-images", type=_positive_int, default=256, metavar="N", help="images to score designs on (default 256)")
    s.add_argument("--stats-images", type=_positive_int, default=64, metavar="N",
                   help="of those, images to measure sparsity histograms on (default 64)")
    s.add_argument("--platform", type=_platform, default="zcu102", metavar="NAME", help="zcu102 (default) or u250")
    s.add_argument("--method", choices=METHODS, default="hass", help="search method (default hass)")
    s.add_argument("--objective", choices=("throughput_per_dsp", "throughput"), default="throughput_per_dsp")
    s.add_argument("--bits", type=int, choices=(8, 16), default=8, help="fixed-point width (default 8)")
    s.add_argument("--trials", type=_positive_int, default=50, help="complete trials of the TPE study (default 50)")
    s.add_argument("--workers", type=_positive_int, default=1, help="worker processes sharing the study (default 1)")
    s.add_argument("--storage", metavar="URL", help="Optuna RDB storage (default sqlite:///OUT/study.db)")
    s.add_argument("--study", metavar="NAME", help="study name (default: METHOD-MODEL-PLATFORM)")
    s.add_argument("--tau-w-max", type=_threshold, default=0.05, help="largest weight threshold searched (default 0.05)")
    s.add_argument("--tau-a-max", type=_threshold, default=0.5, help="largest activation threshold searched (default 0.5)")
    s.add_argument("--tau-w", type=_threshold, nargs="+", default=[0.0, 0.005, 0.01, 0.02],
                   help="uniform method: weight thresholds of the grid")
    s.add_argument("--tau-a", type=_threshold, nargs="+", default=[0.0, 0.05, 0.1, 0.2, 0.3],
                   help="uniform method: activation thresholds of the grid")
    s.add_argument("--max-drop", type=float, default=2.0, help="accuracy drop (points) of the reported design (default 2)")
    s.add_argument("--refine-steps", type=int, default=0, metavar="N",
                   help="hass / unaware: N per-layer refinement steps from the best TPE design within --max-drop "
                        "(hass: on the layers holding the most DSPs, by the hardware metric; unaware: by product "
                        "sparsity). Default 0")
    s.add_argument("--out", required=True, metavar="DIR", help="output folder")
    _common(s, 1, "torch threads (default 1)")
    s.set_defaults(func=run_search)
    p.set_defaults(func=lambda args: (p.print_help(sys.stderr), 2)[1])


def run_platforms(args) -> int:
    from ..sparsity.accelerator import PLATFORMS

    for key, p in PLATFORMS.items():
        print(f"{key:8s} {p.name:8s} {p.dsp:6d} DSP  {p.bram36:5d} BRAM36  {p.clock_mhz:.0f} MHz")
    return 0


def run_search(args) -> int:
    from ._common import CLIError, load_eval_data, load_float_model
    from ._common import progress_enabled as _progress_enabled, set_threads as _set_threads
    from ..sparsity import (Evaluator, Problem, SearchSpace, StudyConfig, allocate_best, best_under_drop,
                            greedy_search, hass_search, map_model, refine, uniform_search, unaware_search)
    from ..sparsity.plots import plot_layers, plot_pareto
    from ..sparsity.search import make_record

    _set_threads(args.threads)
    progress = _progress_enabled(args)
    out = Path(args.out)
    model, name = load_float_model(args.model, args.weights)
    x, y, what = load_eval_data(name, args.data, args.n_images)
    try:
        space = SearchSpace(args.tau_w_max, args.tau_a_max)
        ev = Evaluator(model, x, y, bits=args.bits, n_stats=args.stats_images)
        specs = map_model(model, x[:1], bits=args.bits)
        problem = Problem(ev, specs, space)
        dense_cfg = ev.uniform(0.0, 0.0)
        dense = make_record("dense", dense_cfg, ev.evaluate(dense_cfg))
        dense.design = allocate_best(dense, specs, args.platform, args.objective, sparse=False).summary()
        out.mkdir(parents=True, exist_ok=True)
        study = StudyConfig(args.study or f"{args.method}-{name}-{args.platform}",
                            args.storage or f"sqlite:///{(out / 'study.db').resolve()}", args.trials, args.workers,
                            progress=progress)
        t0 = time.perf_counter()
        if args.method == "hass":
            recs = hass_search(problem, args.platform, study, args.objective)
        elif args.method == "unaware":
            recs = unaware_search(problem, study)
        elif args.method == "uniform":
            recs = uniform_search(problem, args.tau_w, args.tau_a, progress=progress)
        else:
            recs = greedy_search(problem, args.platform, max_drop=args.max_drop, objective=args.objective,
                                 progress=progress)
        if args.refine_steps < 0:
            raise ValueError(f"--refine-steps must be >= 0, got {args.refine_steps}")
        if args.refine_steps and args.method in ("hass", "unaware"):
            hw = args.method == "hass"
            key = (lambda r: r.design[args.objective]) if hw else (lambda r: r.product_sparsity)
            start = best_under_drop(recs, dense.accuracy, args.max_drop, key=key)
            if start is not None:
                recs = recs + refine(problem, start, "hardware" if hw else "sparsity", args.platform,
                                     reference_accuracy=dense.accuracy, max_drop=args.max_drop,
                                     max_steps=args.refine_steps, objective=args.objective, progress=progress)[1:]
        seconds = time.perf_counter() - t0
        for r in recs:
            if r.design is None or r.method != "hass":
                r.design = allocate_best(r, specs, args.platform, args.objective).summary()
    except ValueError as exc:
        raise CLIError(" ".join(str(exc).split())) from None
    best = best_under_drop(recs, dense.accuracy, args.max_drop, key=lambda r: r.design[args.objective])
    (out / "records.json").write_text(json.dumps({"data": what, "platform": args.platform, "method": args.method,
                                                  "seconds": seconds, "dense": dense.as_dict(),
                                                  "records": [r.as_dict() for r in recs]}, indent=1))
    plot_pareto({"dense": [dense], args.method: recs}, out / "pareto.png",
                title=f"{name} on {args.platform}, {args.bits} bit", highlight={"best": best} if best else None)
    print(f"{name} on {args.platform}: {len(recs)} designs in {seconds:.0f} s; dense {args.bits}-bit: "
          f"{dense.accuracy:.2f}%, {dense.design['throughput']:.0f} images/s, {dense.design['dsp']} DSP")
    if best is None:
        print(f"no design within {args.max_drop} points of the dense accuracy")
        return 0
    plot_layers(best, out / "layers.png")
    d = best.design
    print(f"best within {args.max_drop} pt: {best.accuracy:.2f}%, {d['throughput']:.0f} images/s, {d['dsp']} DSP, "
          f"{d['throughput_per_dsp']:.2f} images/s/DSP, product sparsity {best.product_sparsity:.3f}, "
          f"bottleneck {d['bottleneck']}")
    print(f"wrote {out / 'records.json'}, {out / 'pareto.png'}, {out / 'layers.png'}")
    return 0
