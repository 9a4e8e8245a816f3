"""Where a compiled integer model spends its time: each op of the plan, and the steps that have two
implementations, each way in the same process.

    OMP_NUM_THREADS=1 python benchmarks/integer_ops.py --model r18 --batch 8 --out benchmarks/out/integer_ops_r18.json

The model is an integer-only ResNet (``winoq.integer.convert``) run by ``compile_model``: ResNet-18 at
224 x 224 (random weights, non-trivial BatchNorm statistics, as in deploy_e2e.py) or the CIFAR
ResNet-20 / 56 of ../shared. Per op of the plan (conv + fused requantization / add, pooling, the
classifier), the median wall ms of ``--reps`` forward passes, each op timed inside the pass, so
every op sees the activations as the model leaves them in cache; then the input quantization.

``--peer`` also times torch.ao's int8 model of the same network (FX post-training quantization,
``x86`` backend, as in deploy_e2e.py) conv by conv inside its own forward passes (forward hooks), and
prints the two side by side, each conv matched to the integer model's by (input channels, output
channels, kernel, stride) in order; torch.ao's residual adds, pooling and classifier are its total
less its convs (the integer model fuses each add into a conv's epilogue).

``--alternatives`` also times, interleaved round by round on the model's own tensors, the steps
that have a compiled and a PyTorch form with the same integers: the max pool of int8 codes
(``MaxPool.kernel`` "auto" / "torch") and the input quantization (``int_graph.quantize_input``,
isa "avx512-vnni" / "portable").
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import dump_json, machine  # noqa: E402

import torch  # noqa: E402


def load_model(name: str, batch: int, calib_images: int):
    from deploy_e2e import load

    model, x, _, calib = load(name, batch, calib_images)
    return model, x[:batch], calib


def describe(op) -> str:
    step = op.step
    text = type(step).__name__
    w = getattr(step, "weight", None)
    if w is not None and w.dim() == 4:
        text += f" {tuple(w.shape[:2])} {w.shape[2]}x{w.shape[3]} s{step.stride[0]}"
    return text


def run_passes(model, x, reps: int, times: dict) -> list[float]:
    """One warm-up pass of ``model`` on ``x``, then ``reps`` timed ones (seconds each); ``times``, what
    the caller's per-op timers fill, is emptied after the warm-up."""
    total = []
    with torch.no_grad():
        model(x)
        for v in times.values():
            v.clear()
        for _ in range(reps):
            t0 = time.perf_counter()
            model(x)
            total.append(time.perf_counter() - t0)
    return total


def time_ops(cm, x, reps: int) -> list[dict]:
    """Median ms of each op of ``cm``'s plan over ``reps`` passes (the op timed inside the pass)."""
    from winoq.integer import runtime

    times: dict[int, list[float]] = {id(op): [] for op in cm.ops}
    run = runtime.CompiledIntegerModel._run_op

    def timed(op, env):
        t0 = time.perf_counter()
        y = run(op, env)
        times[id(op)].append(time.perf_counter() - t0)
        return y

    runtime.CompiledIntegerModel._run_op = staticmethod(timed)
    try:
        run_passes(cm, x, reps, times)
    finally:
        runtime.CompiledIntegerModel._run_op = staticmethod(run)
    return [{"op": describe(op), "kind": op.kind, "ms": 1e3 * statistics.median(times[id(op)])} for op in cm.ops]


def conv_key(w: torch.Tensor, stride) -> tuple:
    """(input channels, output channels, kernel, stride): what matches a conv across the two models."""
    return int(w.shape[1]), int(w.shape[0]), tuple(w.shape[2:]), tuple(stride)


def time_peer_convs(qmodel, x, reps: int) -> tuple[list[dict], float]:
    """Median ms of each conv module of torch.ao's model inside ``reps`` passes, and of the pass."""
    from torch.ao.nn.quantized import Conv2d  # ConvReLU2d and the other fused convs derive from it

    convs = [(n, m) for n, m in qmodel.named_modules() if isinstance(m, Conv2d)]
    times: dict[str, list[float]] = {n: [] for n, _ in convs}
    start: dict[str, float] = {}
    hooks = []
    for n, m in convs:
        hooks.append(m.register_forward_pre_hook(lambda mod, inp, n=n: start.__setitem__(n, time.perf_counter())))
        hooks.append(m.register_forward_hook(lambda mod, inp, out, n=n: times[n].append(time.perf_counter() - start[n])))
    try:
        total = run_passes(qmodel, x, reps, times)
    finally:
        for h in hooks:
            h.remove()
    rows = [{"layer": n, "key": conv_key(m.weight(), m.stride), "ms": 1e3 * statistics.median(times[n])}
            for n, m in convs]
    return rows, 1e3 * statistics.median(total)


def match_peer(ops: list[dict], cm, peer: list[dict]) -> list[dict]:
    """Each integer conv op beside the torch.ao conv with the same key, in order of appearance."""
    left: dict[tuple, list[dict]] = {}
    for r in peer:
        left.setdefault(r["key"], []).append(r)
    rows = []
    for o, op in zip(ops, cm.ops):
        w = getattr(op.step, "weight", None)
        if w is None or w.dim() != 4:
            continue
        mine = left.get(conv_key(w, op.step.stride), [])
        r = mine.pop(0) if mine else None
        rows.append({**o, "peer_layer": r and r["layer"], "peer_ms": r and r["ms"]})
    return rows


def print_peer(rows: list[dict], peer_total: float, total: float) -> None:
    print("| integer op | kind | winoq ms | torch.ao layer | torch.ao ms | winoq / torch.ao |\n|---|---|---:|---|---:|---:|")
    for r in rows:
        ratio = f"{r['ms'] / r['peer_ms']:.2f}" if r["peer_ms"] else "-"
        peer_ms = f"{r['peer_ms']:.2f}" if r["peer_ms"] else "-"
        print(f"| {r['op']} | {r['kind']} | {r['ms']:.2f} | {r['peer_layer'] or '-'} | {peer_ms} | {ratio} |")
    ours = sum(r["ms"] for r in rows)
    theirs = sum(r["peer_ms"] or 0.0 for r in rows)
    matched = sum(r["ms"] for r in rows if r["peer_ms"])  # the ratio over convs both models have
    print(f"| convs | | {ours:.2f} | | {theirs:.2f} | {matched / theirs:.2f} |" if theirs else f"| convs | | {ours:.2f} | | - | - |")
    print(f"| everything else | | {total - ours:.2f} | | {peer_total - theirs:.2f} | |")
    print(f"| whole pass | | {total:.2f} | | {peer_total:.2f} | {total / peer_total:.2f} |")


def interleaved(fns: dict, rounds: int, reps: int) -> dict:
    """Median ms of each callable, the callables taking turns round by round (shared noise)."""
    ts = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            f()
            for _ in range(reps):
                t0 = time.perf_counter()
                f()
                ts[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in ts.items()}


def alternatives(cm, x, rounds: int, reps: int) -> dict:
    from winoq.integer import layers as L
    from winoq.kernels import int_graph

    out = {}
    if int_graph.isa() == "avx512-vnni":
        m = cm.model
        out["input quantization"] = interleaved({
            "compiled (avx512-vnni)": lambda: int_graph.quantize_input(x, m.input_scale, m.input_qmax, isa="avx512-vnni"),
            "portable loop": lambda: int_graph.quantize_input(x, m.input_scale, m.input_qmax, isa="portable")},
            rounds, reps)
    pools = [(n, op) for n, op in enumerate(cm.ops) if isinstance(op.step, L.MaxPool)]
    if pools:
        n, op = pools[0]
        q = _input_of(cm, x, n)
        pool = op.step

        def with_kernel(kind):
            def f():
                pool.kernel = kind
                try:
                    return pool(q)
                finally:
                    pool.kernel = "auto"
            return f
        out["max pool"] = interleaved({"compiled": with_kernel("auto"), "PyTorch slices": with_kernel("torch")},
                                      rounds, reps)
    return out


def _input_of(cm, x, n: int) -> torch.Tensor:
    """The tensor op ``n`` of the plan reads (its first input), from one pass of ``cm`` on ``x``."""
    from winoq.integer import runtime

    seen = {}
    run = runtime.CompiledIntegerModel._run_op

    def capture(op, env):
        if op is cm.ops[n]:
            seen["x"] = env[op.ins[0]]
        return run(op, env)

    runtime.CompiledIntegerModel._run_op = staticmethod(capture)
    try:
        with torch.no_grad():
            cm(x)
    finally:
        runtime.CompiledIntegerModel._run_op = staticmethod(run)
    return seen["x"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="r18", choices=["r18", "r20", "r56"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--calib-images", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--alternatives", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--peer", action="store_true", help="also time torch.ao's int8 model conv by conv")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/integer_ops.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from winoq.integer import compile_model, convert
    from winoq.kernels import int_graph

    if not int_graph.available():
        raise SystemExit("the compiled integer-graph kernels are not built here (run setup.sh)")
    model, x, calib = load_model(args.model, args.batch, args.calib_images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = compile_model(convert(model, calib))
    ops = time_ops(cm, x, args.reps)
    with torch.no_grad():
        t_in = interleaved({"q": lambda: cm.quantize_input(x)}, 1, args.reps)["q"]
    total = sum(o["ms"] for o in ops) + t_in
    print(f"{args.model}, batch {args.batch}, {args.threads} thread(s), isa {int_graph.isa()}")
    print("| # | op | kind | ms | share |\n|---:|---|---|---:|---:|")
    for i, o in enumerate(ops):
        print(f"| {i} | {o['op']} | {o['kind']} | {o['ms']:.2f} | {100 * o['ms'] / total:.1f}% |")
    print(f"| | input quantization | | {t_in:.2f} | {100 * t_in / total:.1f}% |\n| | total | | {total:.2f} | |")
    peer = None
    if args.peer:
        from deploy_e2e import torch_ao

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qmodel = torch_ao(model, calib, x[:1])
        peer_convs, peer_total = time_peer_convs(qmodel, x, args.reps)
        peer = {"rows": match_peer(ops, cm, peer_convs), "total_ms": peer_total}
        print(f"\nagainst torch.ao int8 (x86), conv by conv (the pass: median of {args.reps}):")
        print_peer(peer["rows"], peer_total, total)
    alt = alternatives(cm, x, rounds=5, reps=max(3, args.reps // 2)) if args.alternatives else {}
    for step, ms in alt.items():
        print(f"{step}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()))
    dump_json(args.out, {"machine": machine(), "isa": int_graph.isa(), "threads": args.threads, "model": args.model,
                         "batch": args.batch, "ops": ops, "input_quantization_ms": t_in, "total_ms": total,
                         "alternatives": alt, "torch_ao": peer})
    print(f"-> {args.out}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # --out is written once, at the end
        sys.exit("interrupted; nothing was written to --out")
