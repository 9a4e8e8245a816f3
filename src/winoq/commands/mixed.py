"""``winoq mixed``: HAWQ-V3 mixed-precision plan (Hessian traces + exact ILP), printed as a table,
plotted (per-layer bits and the sensitivity vs cost Pareto curve), optionally converted to an
integer-only model and exported to ONNX. ``--tiles``: the joint plan instead, each layer's Winograd
tile (direct, F(2,3), F(4,3), F(6,3)) and weight bits (4, 8) by the same exact ILP."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("mixed", help="HAWQ-V3 mixed-precision plan by ILP (table, plot, integer ONNX)",
                              description=__doc__)
    p.add_argument("--model", default="fmnist-resnet", help="model name or state-dict file (as for quantize)")
    p.add_argument("--weights", help="weights file, or 'shared' for the CIFAR ResNets")
    p.add_argument("--calib-data", metavar="DIR", help="ImageFolder of calibration images (fmnist-resnet: "
                   "Fashion-MNIST training images when installed)")
    p.add_argument("--calib-images", type=int, default=64, metavar="N")
    p.add_argument("--tiles", action="store_true",
                   help="plan each layer's Winograd tile and weight bits jointly (int8 activations; layers Winograd "
                        "cannot run choose direct int4 or int8); budget mults (default) or latency")
    p.add_argument("--budget", choices=("size", "bops", "mults", "latency"),
                   help="budget kind: size or bops (default) for the HAWQ-V3 plan (latency budgets need a measured "
                        "table: Python API); mults (multiplications x bits, default) or latency (measured on this "
                        "CPU) with --tiles")
    p.add_argument("--r", type=float, default=0.5, help="budget = cost(4 bit) + r (cost(8 bit) - cost(4 bit)); "
                   "with --tiles, cost(cheapest plan) + r (cost(dearest) - cost(cheapest))")
    p.add_argument("--check-images", type=int, default=0, metavar="N",
                   help="with --tiles: N more calibration images on which the plan is checked against every uniform "
                        "choice within the budget (top-1 agreement with the float model; the better one is kept)")
    p.add_argument("--learn-steps", type=int, default=20, metavar="N",
                   help="with --tiles: data-free steps of each Winograd choice's learned transform scales")
    p.add_argument("--trace", choices=("hutchinson", "fisher"),
                   help="layer curvature: Hutchinson's Hessian trace estimate (HAWQ-V3) or the exact Fisher trace "
                        "per image (never negative, less noisy on deep nets)")
    p.add_argument("--activation-term", action="store_true",
                   help="choose W4A4 / W4A8 / W8A8 per layer, with the activation term Tr(F_a) mse(a) in Omega "
                        "(HAWQ-V3's Omega counts only the weights and chooses W4A4 or W8A8)")
    p.add_argument("--trace-iters", type=int, help="at most this many Hutchinson samples (default 30)")
    p.add_argument("--out", type=Path, help="write the plan as JSON")
    p.add_argument("--plot", type=Path, help="write a PNG: per-layer bits and the Pareto curve")
    p.add_argument("--onnx", type=Path, help="convert to integer-only with the plan and export to ONNX")
    p.add_argument("--save", type=Path, metavar="OUT.safetensors",
                   help="quantize with the plan (winoq.quantize, the plan as the recipe's layer_plan) and save the "
                        "checkpoint: `winoq eval --checkpoint` and winoq.load rebuild it with each layer's bits")
    p.set_defaults(func=run)


def _name(choice) -> str:
    """4 -> "4", (4, 8) -> "W4A8"."""
    return str(choice) if isinstance(choice, int) else f"W{choice[0]}A{choice[1]}"


def _table(plan, layers, choices) -> str:
    head = "".join(f" {'Omega(' + _name(c) + ')':>13s}" for c in choices)
    rows = [f"{'layer':28s} {'MACs':>11s} {'params':>8s} {'trace':>10s}{head} bits"]
    for l in layers:
        s = plan.sensitivity[l.name]
        tr = plan.traces.get(l.name, {}).get("trace", float("nan"))
        om = "".join(f" {s[c]:13.3g}" if c in s else f" {'(fixed)':>13s}" for c in choices)
        rows.append(f"{l.name:28s} {l.macs:11d} {l.params:8d} {tr:10.3g}{om} {_name(plan.bits[l.name]):>4s}")
    return "\n".join(rows)


def pareto(sens, tables, kind, ties, rs):
    """(cost, summed sensitivity) of the ILP optimum at each r."""
    from ..mixed_precision import solve_ilp

    lo = sum(min(tables[kind][n][b] for b in sens[n]) for n in sens)
    hi = sum(max(tables[kind][n][b] for b in sens[n]) for n in sens)
    out = []
    for r in rs:
        bits = solve_ilp(sens, tables, {kind: (lo + r * (hi - lo)) * (1 + 1e-12)}, ties)
        out.append((sum(tables[kind][n][bits[n]] for n in sens), sum(sens[n][bits[n]] for n in sens)))
    return out


def plot_plan(plan, layers, tables, path, choices=(4, 8)) -> str:
    from ..plots import save_figure  # first: it sets the Agg backend before pyplot loads

    import matplotlib.pyplot as plt

    kind = plan.budget_kind
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    names = [l.name for l in layers]
    from ..mixed_precision.hessian import bits_of_choice

    pairs = [bits_of_choice(plan.bits[n]) for n in names]
    a.bar([i - 0.2 for i in range(len(names))], [w for w, _ in pairs], width=0.4, color="tab:blue", label="weights")
    a.bar([i + 0.2 for i in range(len(names))], [b for _, b in pairs], width=0.4, color="tab:orange",
          label="activations")
    a.legend(fontsize=7)
    a.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    a.set_ylabel("bits")
    a.set_title(f"plan: {kind} r={plan.r}")
    curve = pareto(plan.sensitivity, tables, kind, plan.ties, [i / 20 for i in range(21)])
    b.plot([c for c, _ in curve], [s for _, s in curve], "o-", label="ILP (mixed)")
    top = max(choices, key=bits_of_choice)
    for choice, mk in zip(choices, "s^vD"):
        c = sum(tables[kind][n][choice if choice in plan.sensitivity[n] else top] for n in names)
        s = sum(plan.sensitivity[n].get(choice, plan.sensitivity[n][top]) for n in names)
        b.plot([c], [s], mk, ms=9, label=f"uniform {_name(choice)} (ends {_name(top)})")
    b.set_xlabel(kind)
    b.set_ylabel("sum of Omega")
    b.set_yscale("symlog", linthresh=1e-9)
    b.legend()
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def _save_quantized(model, plan, args) -> None:
    import warnings

    import winoq

    recipe = plan.recipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = winoq.quantize(model, recipe, progress=True)
    winoq.save(qmodel, args.save)
    print(f"quantized with the plan ({recipe.describe()}) -> {args.save}")


HAWQ_ONLY = (("--trace", "trace"), ("--activation-term", "activation_term"), ("--trace-iters", "trace_iters"))


def _check_args(args) -> None:
    from ._common import CLIError

    if not 0 <= args.r <= 1:
        raise CLIError(f"--r must be in [0, 1], got {args.r}")
    if args.tiles:
        args.budget = args.budget or "mults"
        if args.budget not in ("mults", "latency"):
            raise CLIError(f"--budget {args.budget} is a HAWQ-V3 budget; with --tiles use --budget mults or latency")
        given = [flag for flag, attr in HAWQ_ONLY if getattr(args, attr)]
        if given:
            raise CLIError(f"{', '.join(given)} belong to the HAWQ-V3 plan; the --tiles plan measures each choice's "
                           "output error instead: drop them, or drop --tiles")
    else:
        args.budget = args.budget or "bops"
        if args.budget not in ("size", "bops"):
            raise CLIError(f"--budget {args.budget} is a budget of the joint plan: add --tiles, or use size or bops")
        if args.check_images:
            raise CLIError("--check-images checks the joint plan: add --tiles")
    if args.check_images < 0 or args.calib_images < 1 or args.learn_steps < 0:
        raise CLIError(f"--calib-images must be >= 1, --check-images and --learn-steps >= 0, got {args.calib_images}, "
                       f"{args.check_images}, {args.learn_steps}")


def run(args) -> int:
    from ._common import CLIError, check_output, load_float_model
    from .quantize import _calibration_images

    _check_args(args)
    inputs = [Path(p) for p in (args.model, args.weights) if p]
    for flag, path, example in (("--out", args.out, "plan.json"), ("--plot", args.plot, "plan.png"),
                                ("--onnx", args.onnx, "model.onnx"), ("--save", args.save, "mixed.safetensors")):
        if path:  # before any work: a bad path would otherwise fail after the traces and the ILP
            check_output(path, inputs, flag, example)
    model, name = load_float_model(args.model, args.weights)
    calib = _calibration_images(name, args.calib_data, args.calib_images + args.check_images)
    if calib is None:
        raise CLIError("winoq mixed needs calibration images: pass --calib-data DIR (ImageFolder)")
    if args.check_images and len(calib) < args.calib_images + args.check_images:  # the two sets must not overlap
        raise CLIError(f"found {len(calib)} calibration images, fewer than --calib-images {args.calib_images} + "
                       f"--check-images {args.check_images}; lower either")
    if args.tiles:
        return _run_tiles(model, calib[:args.calib_images], calib[args.calib_images:] if args.check_images else None,
                          args)
    return _run_hawq(model, calib, args)


def _run_hawq(model, calib, args) -> int:
    from ..mixed_precision import PlanConfig, cost_tables, model_layers, plan_bits
    from ..mixed_precision.hessian import bits_of_choice

    choices = ((4, 4), (4, 8), (8, 8)) if args.activation_term else (4, 8)
    plan = plan_bits(model, calib, PlanConfig(budget=args.budget, r=args.r, max_iters=args.trace_iters or 30,
                                              max_samples=args.calib_images, trace=args.trace or "hutchinson",
                                              choices=choices, activation_term=args.activation_term))
    layers, _ = model_layers(model, calib)
    tables = cost_tables(layers, choices)
    print(_table(plan, layers, choices))
    pairs = [bits_of_choice(b) for b in plan.bits.values()]
    print(f"budget {plan.budget_kind} <= {plan.budget:.4g}: size {plan.totals['size'] / 1e6:.4f} MB, "
          f"{plan.totals['bops'] / 1e9:.3f} GBOPs; {sum(w == 4 for w, _ in pairs)}/{len(pairs)} layers with 4-bit "
          f"weights, {sum(a == 4 for _, a in pairs)} with 4-bit activations; ILP {plan.solve_seconds * 1e3:.1f} ms")
    _write_outputs(model, calib, plan, args, lambda: plot_plan(plan, layers, tables, args.plot, choices))
    return 0


def _write_outputs(model, calib, plan, args, plot, onnx_note: str = "") -> None:
    """``--out``, ``--plot`` (``plot()`` writes it), ``--save`` and ``--onnx`` of either kind of plan."""
    if args.out:
        args.out.write_text(plan.to_json())
        print(f"plan -> {args.out}")
    if args.plot:
        print(f"plot -> {plot()}")
    if args.save:
        _save_quantized(model, plan, args)
    if args.onnx:
        from ..integer import convert
        from ..integer.onnx_export import export_onnx

        export_onnx(convert(model, calib, plan.integer_config()), args.onnx, calib[:1])
        print(f"integer-only model (ONNX, opset 13) -> {args.onnx}{onnx_note}")


# ----------------------------------------------------------------------------- joint tile + bits plan
def _tile_name(label) -> str:
    """("F4", 8) -> "F(4,3) int8", ("direct", 4) -> "direct int4"."""
    tile, bits = label
    return f"{'direct' if tile == 'direct' else f'F({tile[1:]},3)'} int{bits}"


def _tiles_table(plan) -> str:
    kind = plan.budget_kind
    rows = [f"{'layer':28s} {'choice':>14s} {'output error':>13s} {'Gmults x bits':>14s} {'latency ms':>11s} "
            f"{'choices':>7s}"]
    for n, label in plan.plan.items():
        rows.append(f"{n:28s} {_tile_name(label):>14s} {plan.sensitivity[n][label]:13.3g} "
                    f"{plan.costs['mults'][n][label] / 1e9:14.4f} {plan.costs['latency'][n][label] * 1e3:11.3f} "
                    f"{len(plan.sensitivity[n]):7d}")
    return "\n".join(rows) + f"\n(budget: {kind})"


def _run_tiles(model, calib, check, args) -> int:
    from ..mixed_precision.winograd_choice import BITS, TILES, JointPlanConfig, plan_tiles, uniform_plan

    print(f"joint tile + bits plan: quantizing the {len(TILES) * len(BITS)} uniform choices, then measuring each layer's choices "
          f"on {len(calib)} calibration images", flush=True)
    plan, _ = plan_tiles(model, calib, JointPlanConfig(budget=args.budget, r=args.r, samples=len(calib),
                                                       learn_steps=args.learn_steps), check=check)
    print(_tiles_table(plan))
    direct8 = uniform_plan(("direct", 8), plan.sensitivity)
    ref = sum(plan.costs["mults"][n][direct8[n]] for n in plan.plan)
    tiles = [t for t, _ in plan.plan.values()]
    print(f"budget {plan.budget_kind} <= {plan.budget:.4g}: {plan.totals['mults'] / 1e9:.3f} G mults x bits "
          f"({plan.totals['mults'] / ref:.0%} of int8 direct); measured latency {plan.totals['latency'] * 1e3:.2f} ms "
          f"per image (Winograd layers on the {_kernel_name()} kernel, direct layers emulated); "
          + ", ".join(f"{tiles.count(t)} {t}" for t in sorted(set(tiles), key=str))
          + f"; {sum(b == 4 for _, b in plan.plan.values())}/{len(tiles)} layers with 4-bit weights; "
          f"ILP {plan.solve_seconds * 1e3:.1f} ms")
    if plan.check is not None:
        print(f"check on {len(check)} held-out images (top-1 agreement with the float model): "
              + ", ".join(f"{k} {v[0]:.3f}" for k, v in plan.check["scores"].items())
              + f"; kept: {plan.check['chosen']}")
    _write_outputs(model, calib, plan, args, lambda: plot_tiles(plan, args.plot),
                   "\n  (ONNX has no Winograd operator: the Winograd layers are exported as their direct integer twins)")
    return 0


def _kernel_name() -> str:
    from ..mixed_precision.winograd_choice import fastest_cpu_kernel

    return {"cpu": "compiled fixed-point", "int-cpu": "PyTorch integer"}[fastest_cpu_kernel()]


def plot_tiles(plan, path) -> str:
    """Per-layer weight bits coloured by tile, and the ILP's sensitivity vs cost curve with every
    uniform choice marked."""
    from ..plots import save_figure  # first: it sets the Agg backend before pyplot loads

    import matplotlib.pyplot as plt

    from ..mixed_precision.winograd_choice import uniform_plan

    kind, names = plan.budget_kind, list(plan.plan)
    colors = {"direct": "tab:gray", "F2": "tab:blue", "F4": "tab:orange", "F6": "tab:red"}
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    a.bar(range(len(names)), [plan.plan[n][1] for n in names],
          color=[colors.get(plan.plan[n][0], "tab:green") for n in names])
    for tile, c in colors.items():
        a.bar([0], [0], color=c, label=tile)
    a.legend(fontsize=7)
    a.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    a.set_ylabel("weight bits (colour: tile)")
    a.set_title(f"plan: {kind} r={plan.r}")
    curve = pareto(plan.sensitivity, plan.costs, kind, (), [i / 20 for i in range(21)])
    b.plot([c for c, _ in curve], [s for _, s in curve], "o-", label="ILP (joint)")
    labels = sorted({c for t in plan.sensitivity.values() for c in t}, key=str)
    for label, mk in zip(labels, "s^vD<>ph"):
        u = uniform_plan(label, plan.sensitivity)
        b.plot([sum(plan.costs[kind][n][u[n]] for n in u)], [sum(plan.sensitivity[n][u[n]] for n in u)], mk, ms=8,
               label=f"uniform {_tile_name(label)}")
    b.plot([plan.totals[kind]], [sum(plan.sensitivity[n][c] for n, c in plan.plan.items())], "k*", ms=14,
           label="this plan")
    b.set_xlabel(kind)
    b.set_ylabel("sum of output errors")
    b.set_yscale("log")
    b.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)
