"""Winograd where it pays: the default rule (convs with fewer input or output channels than the
group size stay direct) against making every eligible conv Winograd, and the quantized error of
larger kernels per tile (why 5x5 / 7x7 convs stay direct unless opted in, with F(m,3)'s
transform size).

    python benchmarks/winograd_rules.py --parts kernels ddpm fmnist cifar --out benchmarks/out/winograd_rules.json

* kernels: one 64 -> 64 conv per kernel size (torch.manual_seed(0), then per r: conv, input 4x64x24x24), W8A8 g32:
  relative squared output error vs the float conv, direct and F(m,r) with standard and learned
  (data-free, default steps) scales.
* ddpm: the project's Fashion-MNIST DDPM, noise-prediction SQNR vs FP on the FP DDIM trajectories
  (``--steps`` steps) of ``--trajectories`` seeds: worst and mean over timesteps.
* fmnist: the Fashion-MNIST ResNet (demo model), top-1 on the first ``--n-images`` test images.
* cifar: CIFAR ResNet-20 (../shared), top-1 on ``--n-images`` test images (common.cifar_split).
W8A8 g32 data-free learned scales for every Winograd row; "all" = ``winograd_min_channels=None``
(every eligible 3x3 conv, the behaviour before the rule), "rule" = the default.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, dump_json, load_json, machine, quantize_timed, top1  # noqa: E402

import winoq  # noqa: E402

RULES = {"all": dict(winograd_min_channels=None), "rule": {}}


def recipes(tiles):
    yield "direct", winoq.Recipe(winograd=None)
    for m in tiles:
        for rule, kw in RULES.items():
            yield f"F({m},3) learned, {rule}", winoq.Recipe(winograd=m, **kw)


def direct_layers(q) -> list[str]:
    return [f"{r.name}: {r.detail}" for r in q.winoq_report if r.kind == "direct" and "channels <" in r.detail]


def run_kernels(args, res):
    from winoq.modules import QuantConv2d
    from winoq.winograd.quantized import QuantWinogradConv2d, StageFormats
    from winoq.winograd.scales import ScaleLearningConfig, learn_layer_scales

    rows = res.setdefault("kernels", {})
    torch.manual_seed(0)
    for r in (3, 5, 7):
        conv = nn.Conv2d(64, 64, r, padding=r // 2)
        x = torch.randn(4, 64, 24, 24)  # global generator, seeded once above
        with torch.no_grad():
            ref = conv(x).double()
            err = lambda y: float((y.double() - ref).pow(2).sum() / ref.pow(2).sum())  # noqa: E731
            rows[f"{r}x{r} direct"] = {"rel_err": err(QuantConv2d.from_conv(conv, "int8", "int8", 32)(x))}
        for m in (2, 4, 6):
            q = QuantWinogradConv2d.from_conv(conv, m, None, formats=StageFormats("int8", "int8", "int8", "int8"),
                                              group_size=32)
            with torch.no_grad():
                std = err(q(x))
            learn_layer_scales(q, ScaleLearningConfig())
            with torch.no_grad():
                rows[f"F({m},{r})"] = {"n": m + r - 1, "rel_err_standard": std, "rel_err_learned": err(q(x))}
            print(f"F({m},{r}) n={m + r - 1}: standard {std:.2e}, learned {rows[f'F({m},{r})']['rel_err_learned']:.2e}",
                  flush=True)
        dump_json(args.out, res)


def run_ddpm(args, res):
    from winoq.diffusion import default_ddpm_schedule, load_default_ddpm, sample
    from winoq.diffusion.metrics import eps_sqnr_per_timestep

    model, sched = load_default_ddpm(), default_ddpm_schedule()
    seeds = list(range(args.trajectories))
    labels = [i % 10 for i in seeds]
    _, traj = sample(model, sched, seeds, steps=args.steps, labels=labels, record=True)
    rows = res.setdefault("ddpm", {})
    for name, recipe in recipes(args.tiles):
        q, tq = quantize_timed(model, recipe)
        with torch.no_grad():
            s = eps_sqnr_per_timestep(model, q, sched, seeds, labels=labels, trajectory=traj)
        rows[name] = {"eps_sqnr_min_db": min(s.values()), "eps_sqnr_mean_db": sum(s.values()) / len(s),
                      "per_timestep": s, "quantize_s": tq, "kept_direct": direct_layers(q)}
        print(f"DDPM {name}: worst {min(s.values()):.1f} dB, mean {rows[name]['eps_sqnr_mean_db']:.1f} dB; "
              f"direct by the rule: {rows[name]['kept_direct']}", flush=True)
        dump_json(args.out, res)


def run_classifier(args, res, key, model, x, y):
    rows = res.setdefault(key, {})
    rows["FP"] = {"top1": top1(model, x, y)}
    for name, recipe in recipes(args.tiles):
        q, tq = quantize_timed(model, recipe)
        acc = top1(q, x, y)
        rows[name] = {"top1": acc, "drop": rows["FP"]["top1"] - acc, "quantize_s": tq, "kept_direct": direct_layers(q)}
        print(f"{key} {name}: {acc:.2f} (drop {rows[name]['drop']:+.2f}); direct by the rule: "
              f"{rows[name]['kept_direct']}", flush=True)
        dump_json(args.out, res)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["kernels", "ddpm", "fmnist", "cifar"],
                    choices=["kernels", "ddpm", "fmnist", "cifar"])
    ap.add_argument("--tiles", type=int, nargs="+", default=[4, 6])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--trajectories", type=int, default=4)
    ap.add_argument("--n-images", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "winograd_rules.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = load_json(args.out)
    res["machine"] = machine()
    res["command"] = "python benchmarks/winograd_rules.py " + " ".join(argv if argv is not None else sys.argv[1:])
    t0 = time.perf_counter()
    if "kernels" in args.parts:
        run_kernels(args, res)
    if "ddpm" in args.parts:
        run_ddpm(args, res)
    if "fmnist" in args.parts:
        from winoq.data import fashion_mnist_tensors
        from winoq.models import load_default_fmnist_model

        x, y = fashion_mnist_tensors("test")
        run_classifier(args, res, "fmnist_resnet", load_default_fmnist_model(), x[:args.n_images], y[:args.n_images])
    if "cifar" in args.parts:
        from common import cifar_split
        from winoq.models import load_cifar_resnet

        x, y, _ = cifar_split(args.n_images, 0)
        run_classifier(args, res, "cifar_resnet20", load_cifar_resnet(20), x, y)
    dump_json(args.out, res)
    print(f"{time.perf_counter() - t0:.0f}s; JSON: {args.out}")


if __name__ == "__main__":
    main()
