"""``winoq mixed``: HAWQ-V3 mixed-precision plan (Hessian traces + exact ILP), printed as a table,
plotted (per-layer bits and the sensitivity vs cost Pareto curve), optionally converted to an
integer-only model and exported to ONNX."""
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
    p.add_argument("--budget", choices=("size", "bops"), default="bops",
                   help="budget kind (latency budgets need a measured table: Python API)")
    p.add_argument("--r", type=float, default=0.5, help="budget = cost(4 bit) + r (cost(8 bit) - cost(4 bit))")
    p.add_argument("--trace", choices=("hutchinson", "fisher"), default="hutchinson",
                   help="layer curvature: Hutchinson's Hessian trace estimate (HAWQ-V3) or the exact Fisher trace "
                        "per image (never negative, less noisy on deep nets)")
    p.add_argument("--activation-term", action="store_true",
                   help="choose W4A4 / W4A8 / W8A8 per layer, with the activation term Tr(F_a) mse(a) in Omega "
                        "(HAWQ-V3's Omega counts only the weights and chooses W4A4 or W8A8)")
    p.add_argument("--trace-iters", type=int, default=30, help="at most this many Hutchinson samples")
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
    import matplotlib

    matplotlib.use("Agg")
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
    path = Path(path) if Path(path).suffix else Path(f"{path}.png")  # say the name matplotlib writes
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def _save_quantized(model, plan, args) -> None:
    import warnings

    import winoq

    recipe = plan.recipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = winoq.quantize(model, recipe, progress=True)
    winoq.save(qmodel, args.save)
    print(f"quantized with the plan ({recipe.describe()}) -> {args.save}")


def run(args) -> int:
    from ._common import CLIError, check_output, load_float_model
    from .quantize import _calibration_images
    from ..mixed_precision import PlanConfig, cost_tables, model_layers, plan_bits

    if not 0 <= args.r <= 1:
        raise CLIError(f"--r must be in [0, 1], got {args.r}")
    inputs = [Path(p) for p in (args.model, args.weights) if p]
    for flag, path, example in (("--out", args.out, "plan.json"), ("--plot", args.plot, "plan.png"),
                                ("--onnx", args.onnx, "model.onnx"), ("--save", args.save, "mixed.safetensors")):
        if path:  # before any work: a bad path would otherwise fail after the traces and the ILP
            check_output(path, inputs, flag, example)
    model, name = load_float_model(args.model, args.weights)
    calib = _calibration_images(name, args.calib_data, args.calib_images)
    if calib is None:
        raise CLIError("winoq mixed needs calibration images: pass --calib-data DIR (ImageFolder)")
    from ..mixed_precision.hessian import bits_of_choice

    choices = ((4, 4), (4, 8), (8, 8)) if args.activation_term else (4, 8)
    plan = plan_bits(model, calib, PlanConfig(budget=args.budget, r=args.r, max_iters=args.trace_iters,
                                              max_samples=args.calib_images, trace=args.trace, choices=choices,
                                              activation_term=args.activation_term))
    layers, _ = model_layers(model, calib)
    tables = cost_tables(layers, choices)
    print(_table(plan, layers, choices))
    pairs = [bits_of_choice(b) for b in plan.bits.values()]
    print(f"budget {plan.budget_kind} <= {plan.budget:.4g}: size {plan.totals['size'] / 1e6:.4f} MB, "
          f"{plan.totals['bops'] / 1e9:.3f} GBOPs; {sum(w == 4 for w, _ in pairs)}/{len(pairs)} layers with 4-bit "
          f"weights, {sum(a == 4 for _, a in pairs)} with 4-bit activations; ILP {plan.solve_seconds * 1e3:.1f} ms")
    if args.out:
        args.out.write_text(plan.to_json())
        print(f"plan -> {args.out}")
    if args.plot:
        print(f"plot -> {plot_plan(plan, layers, tables, args.plot, choices)}")
    if args.save:
        _save_quantized(model, plan, args)
    if args.onnx:
        from ..integer import IntegerConfig, convert
        from ..integer.onnx_export import export_onnx

        im = convert(model, calib, IntegerConfig(layer_bits=plan.bits))
        export_onnx(im, args.onnx, calib[:1])
        print(f"integer-only model (ONNX, opset 13) -> {args.onnx}")
    return 0
