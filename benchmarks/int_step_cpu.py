"""The compiled integer Winograd step against the int8 direct convs users already have (issue 11).

    OMP_NUM_THREADS=1 python benchmarks/int_step_cpu.py --out benchmarks/out/int_step_cpu.json
    OMP_NUM_THREADS=1 python benchmarks/int_step_cpu.py --end-to-end --out benchmarks/out/int_step_e2e.json

Per layer (3x3 stride 1, C = K, ReLU'd noise; the shapes of benchmarks/kernels_cpu.py), median thread
CPU ms of interleaved calls, 1 thread: fp32 oneDNN (``F.conv2d``), int8 fbgemm and int8 oneDNN
(``torch.ao.nn.quantized.Conv2d``, quint8 channels-last input prepared outside the timing), and the
integer Winograd step of winoq's integer-only graphs (``IntWinogradConv2d``, V in block floating
point per tile, tap and 32 channels; int8 channels-last codes in, int32 accumulator out) on the
compiled kernel, F(2,3) / F(4,3) / F(6,3), with the input transform's rows "fixed" (the default,
learned S_B in 10-bit fixed point) or "exact" (Toom-Cook integers, int16 lanes); and "direct": the
same layer as winoq's compiled int8 direct conv (``IntConv2d``, weights per output channel, int32
accumulator out). ``--check`` compares each step with its PyTorch definition on the first image
(bit for bit). ``--phases`` adds each Winograd step's time per phase (input transform, tap GEMMs,
output transform: the kernel's own thread-CPU timer, ``WINOQ_KERNEL_PROFILE``; 1 thread) and the
GEMMs' bound, their ``vpdpbusd`` count at ``--vnni-rate`` instructions per second.

``--end-to-end``: a CIFAR ResNet-20 (random BN statistics unless ../shared has the weights) as an
integer-only model, all convs direct and with Winograd F(2,3) / F(4,3) layers, on the compiled
runtime (``winoq.integer.compile_model``), against the same model with every step in PyTorch, the
float model and a torch.ao int8 model (FX post-training quantization, x86 backend).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import dump_json, machine  # noqa: E402
from kernels_cpu import PEER_SHAPES, ao_int8_fns, median_ms, peer_problem  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from winoq.integer.layers import IntConv2d  # noqa: E402
from winoq.integer.winograd import build_int_winograd  # noqa: E402
from winoq.kernels import int_step  # noqa: E402


def make_step(conv, x, m: int, rows: str, s_in: float):
    step, _, _ = build_int_winograd("bench", conv, conv.weight.detach().double(), conv.bias.detach().double(), s_in,
                                    127, x[:2], m=m, weight_bits=8, v_bits=8, m_bits=16, transform_bits=10,
                                    scales="learned", v_clip="minmax", learn_steps=20, seed=0, v_group=32,
                                    input_rows=rows)
    return step


def run_layers(args) -> list[dict]:
    from winoq.kernels import int_graph

    rows = []
    for name, nb, c, hw in PEER_SHAPES:
        if args.shapes and name not in args.shapes:
            continue
        x, conv = peer_problem(nb, c, hw)
        s_in = float(x.abs().max()) / 127
        qx = torch.round(x / s_in).clamp(-127, 127).to(torch.int8).contiguous(memory_format=torch.channels_last)
        fns = {"fp32": lambda: F.conv2d(x, conv.weight, conv.bias, padding=1), **ao_int8_fns(conv, x)}
        direct = IntConv2d.timing_twin(conv, "bench")
        fns["direct"] = lambda: int_graph.conv(direct, qx)
        checks = {"direct": bool(torch.equal(int_graph.conv(direct, qx[:1]), direct.forward_torch(qx[:1].int())))} \
            if args.check else {}
        for m in args.tiles:
            for r in args.rows:
                step = make_step(conv, x, m, r, s_in)
                key = f"F{m}-{r}"
                fns[key] = (lambda step=step: int_step.forward(step, qx))
                if args.check:
                    checks[key] = bool(torch.equal(int_step.forward(step, qx[:1]), step.forward_torch(qx[:1].int())))
        ms = {k: v[0] for k, v in median_ms(fns, args.reps, budget_s=args.budget).items()}
        phases = {k: step_phases(fns[k], args.reps) for k in fns if k.startswith("F")} if args.phases else {}
        wino = {k: v for k, v in ms.items() if k.startswith("F")}
        best = min(wino, key=wino.get)
        row = {"shape": name, "N": nb, "C": c, "HW": hw, "ms": ms, "best": best, "checks": checks,
               "best_vs_onednn": ms["int8_onednn"] / wino[best], "best_vs_fbgemm": ms["int8_fbgemm"] / wino[best],
               "best_vs_fp32": ms["fp32"] / wino[best], "direct_vs_onednn": ms["int8_onednn"] / ms["direct"],
               "direct_vs_fbgemm": ms["int8_fbgemm"] / ms["direct"], "phases": phases}
        rows.append(row)
        print_row(row, fns)
        for k, p in phases.items():
            m = int(k[1])
            bound = nb * c * c * (m + 2) ** 2 * (-(-hw // m)) ** 2 / 64 / args.vnni_rate * 1e3
            print(f"    {k} phases: input {p[0]:.2f} ms, GEMMs {p[1]:.2f} ms (bound {bound:.2f}), output {p[2]:.2f} ms")
        dump_json(args.out, {"machine": machine(), "isa": int_step.isa(), "threads": torch.get_num_threads(),
                             "rows": rows})
    return rows


def step_phases(fn, reps: int) -> list[float]:
    """Mean ms per call of the step's input transform, tap GEMMs and output transform (the kernel's timer)."""
    mod = int_step.load()
    mod.profile()
    for _ in range(reps):
        fn()
    return [v / reps for v in mod.profile()]


def print_row(r: dict, fns) -> None:
    if not hasattr(print_row, "head"):
        print("| shape | N | C | H=W | " + " | ".join(k for k in fns) + " | best | vs oneDNN int8 | vs fbgemm | vs fp32 "
              "| direct vs oneDNN | direct vs fbgemm |")
        print("|" + "---|" * (len(fns) + 10))
        print_row.head = True
    cells = " | ".join(f"{r['ms'][k]:.2f}" for k in fns)
    print(f"| {r['shape']} | {r['N']} | {r['C']} | {r['HW']} | {cells} | {r['best']} | {r['best_vs_onednn']:.2f}x | "
          f"{r['best_vs_fbgemm']:.2f}x | {r['best_vs_fp32']:.2f}x | {r['direct_vs_onednn']:.2f}x | "
          f"{r['direct_vs_fbgemm']:.2f}x |" + ("" if not r["checks"] else
                                                                       f" exact: {all(r['checks'].values())}"),
          flush=True)


def run_end_to_end(args) -> dict:
    import copy

    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    from winoq.integer import IntegerConfig, compile_model, convert
    from winoq.models import cifar_resnet20, load_cifar_resnet

    try:
        model, source = load_cifar_resnet(20), "../shared pretrained"
    except FileNotFoundError:  # no ../shared: random weights (the timing does not depend on them)
        torch.manual_seed(0)
        model, source = cifar_resnet20().eval(), "random weights"
    x = torch.randn(args.batch, 3, 32, 32)
    calib = torch.randn(32, 3, 32, 32)
    torch.backends.quantized.engine = "x86"
    ao = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), (x[:1],))
    with torch.no_grad():
        ao(calib)
    ao = convert_fx(ao)
    fns = {"fp32": lambda: model(x), "torch.ao int8 (x86)": lambda: ao(x)}
    same = {}
    for m in (None, 2, 4):
        im = convert(model, calib, IntegerConfig(winograd=m, learn_steps=20))
        q, cm = im.quantize_input(x), compile_model(im)
        name = "direct" if m is None else f"F({m},3)"
        fns[f"winoq integer {name}, compiled"] = (lambda cm=cm, q=q: cm.forward_integer(q))
        with torch.no_grad():
            same[name] = bool(torch.equal(cm.forward_integer(q), _pytorch_steps(im, q)))
        if m == 4:
            fns[f"winoq integer {name}, PyTorch steps"] = (lambda im=im, q=q: _pytorch_steps(im, q))
    with torch.no_grad():
        ms = {k: v[0] for k, v in median_ms(fns, args.reps, budget_s=args.budget).items()}
    res = {"model": f"CIFAR ResNet-20 ({source}), integer-only W8A8", "batch": args.batch, "ms": ms,
           "codes_equal_to_pytorch_steps": same}
    for k, v in ms.items():
        print(f"| {k} | {v:.1f} |", flush=True)
    print(res["codes_equal_to_pytorch_steps"], flush=True)
    return res


def _pytorch_steps(im, q):
    with im.kernels("torch"):
        return im.forward_integer(q)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", choices=[s[0] for s in PEER_SHAPES], help="layer shapes (default: all)")
    ap.add_argument("--tiles", type=int, nargs="+", default=[2, 4, 6])
    ap.add_argument("--rows", nargs="+", default=["fixed", "exact"], choices=["fixed", "exact"],
                    help="input transform rows (IntegerConfig.winograd_input_rows; its default takes exact up to F(4,3))")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--budget", type=float, default=30.0, help="seconds per shape before stopping at >= 3 reps")
    ap.add_argument("--check", action="store_true", help="compare each step with its PyTorch definition (1 image)")
    ap.add_argument("--phases", action="store_true", help="time each Winograd step's phases (1 thread)")
    ap.add_argument("--vnni-rate", type=float, default=5.5e9,
                    help="vpdpbusd per second of one core (the GEMM bound of --phases; 5.5e9 measured here)")
    ap.add_argument("--end-to-end", action="store_true")
    ap.add_argument("--batch", type=int, default=32, help="batch of the end-to-end run")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/int_step_cpu.json"))
    args = ap.parse_args(argv)
    if args.phases:  # read once, when the kernel loads
        os.environ["WINOQ_KERNEL_PROFILE"] = "1"
        torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*quantize_per.*deprecated")
    if not int_step.available():
        raise SystemExit("the compiled integer step is not built (bash setup.sh)")
    if args.end_to_end:
        dump_json(args.out, {"machine": machine(), "isa": int_step.isa(), "threads": torch.get_num_threads(),
                             "end_to_end": run_end_to_end(args)})
    else:
        run_layers(args)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # --out is rewritten whole after each shape: it holds the shapes finished so far
        sys.exit("interrupted; the shapes finished so far are in --out")
