"""Why per-tap V / U scales and a 16-bit M (docs/results.md §12), on the project's DDPM.

    python benchmarks/winograd_stages.py --parts layer net

* layer: one DDPM conv (``--layer``, default down.0.blocks.0.conv1, 32 -> 32 channels at 28x28)
  on its real input at t = 50 (Fashion-MNIST test images when installed, else FP samples); layer
  output SQNR vs the float64 conv after learning the transform scales, for M int8 / int16 and V, U
  shared by the taps or per tap, F(4,3) and F(6,3). Input scales per sample and group (the
  measurement behind the choice predates per-tile input scales; ``--input-granularity fine`` for those).
* net: the whole DDPM with its 1-channel first and last convs direct, noise-prediction SQNR at
  t = 50 / 500 / 950, for the paper's pipeline, M int16, and M int16 with V, U per tap, learned and
  standard transform scales.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, dump_json, machine  # noqa: E402
from targets import ddpm_inputs, sqnr_db  # noqa: E402

import winoq  # noqa: E402
from winoq.diffusion import default_ddpm_schedule, load_default_ddpm  # noqa: E402
from winoq.winograd.quantized import QuantWinogradConv2d, StageFormats  # noqa: E402
from winoq.winograd.scales import ScaleLearningConfig, learn_layer_scales  # noqa: E402


def noisy_batches(model, sched, n, timesteps, seed=0):
    x0, labels, _ = ddpm_inputs(n, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    out = []
    for t in timesteps:
        tt = torch.full((n,), t, dtype=torch.long)
        out.append((t, sched.q_sample(x0, tt, torch.randn(x0.shape, generator=gen)), tt))
    return out, labels


def layer_part(args, model, sched):
    batches, labels = noisy_batches(model, sched, 16, [50])
    _, x, tt = batches[0]
    conv, cap = model.get_submodule(args.layer), {}
    hook = conv.register_forward_hook(lambda mod, i, o: cap.update(x=i[0]))
    with torch.no_grad():
        model(x, tt, labels)
    hook.remove()
    inp = cap["x"]
    ref = F.conv2d(inp.double(), conv.weight.double(), conv.bias.double(), padding=conv.padding)
    rows = {}
    for m in (4, 6):
        for mfmt in ("int8", "int16"):
            for v_tap, u_tap in ((False, False), (False, True), (True, False), (True, True)):
                q = QuantWinogradConv2d.from_conv(conv, m, formats=StageFormats("int8", "int8", "int8", mfmt))
                q.activation_granularity = args.input_granularity
                q.input_tapwise, q.weight_tapwise = v_tap, u_tap
                learn_layer_scales(q, ScaleLearningConfig())
                with torch.no_grad():
                    db = sqnr_db(q(inp), ref)
                key = f"F({m},3) M {mfmt} V {'tap' if v_tap else 'shared'} U {'tap' if u_tap else 'shared'}"
                rows[key] = db
                print(f"{key}: {db:.1f} dB", flush=True)
    return rows


def net_part(model, sched):
    batches, labels = noisy_batches(model, sched, 32, [50, 500, 950])
    with torch.no_grad():
        refs = [model(x, tt, labels) for _, x, tt in batches]
    paper = dict(winograd_input_scales="shared", winograd_weight_scales="shared", winograd_output_format=None)
    configs = {"paper": paper, "M int16": {**paper, "winograd_output_format": "int16"},
               "M int16, V/U per tap": {}, "M int16, V/U per tap, standard scales": {"scales": "standard"}}
    rows = {}
    for m in (4, 6):
        for name, kw in configs.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                q = winoq.quantize(model, winoq.Recipe(winograd=m, **kw), progress=False)
            with torch.no_grad():
                per_t = [sqnr_db(q(x, tt, labels), ref) for (_, x, tt), ref in zip(batches, refs)]
            rows[f"F({m},3) {name}"] = per_t
            print(f"F({m},3) {name}: " + " / ".join(f"{v:.1f}" for v in per_t), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", nargs="+", default=["layer", "net"], choices=["layer", "net"])
    ap.add_argument("--layer", default="down.0.blocks.0.conv1")
    ap.add_argument("--input-granularity", default="sample", choices=["sample", "fine"])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "winograd_stages.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, sched = load_default_ddpm(), default_ddpm_schedule()
    results = {"machine": machine()}
    if "layer" in args.parts:
        results["layer"] = layer_part(args, model, sched)
    if "net" in args.parts:
        results["net"] = net_part(model, sched)
    dump_json(args.out, results)


if __name__ == "__main__":
    main()
