"""Activation granularity and per-tap U scales, measured on three models (W8A8, g32, data-free).

    python benchmarks/granularity.py --out benchmarks/out/granularity.json

Rows: direct convs with the input per sample (``activation_granularity="sample"``, the old
default) vs per sample, pixel and channel group ("fine"); Winograd F(4,3) / F(6,3) learned with
the spatial input per sample, per tile ("fine") or per m x m pixel block ("block"); and per-tap
U scales (``winograd_weight_scales="tapwise"``) against shared ones at the fine granularity.

Models:

* ``ddpm``: the project's Fashion-MNIST DDPM, noise-prediction SQNR (dB) against FP on the
  FP DDIM trajectory (``--ddpm-steps`` steps, ``--ddpm-seeds`` seeds, labels i % 10): the worst
  of t = 50 / 500 / 950 (the nearest trajectory steps), the worst of every step, the mean;
* ``fmnist``: the project's Fashion-MNIST ResNet, top-1 (%) on the first ``--n-images``
  Fashion-MNIST test images (needs the dataset, e.g. the Debian package);
* ``resnet20``: CIFAR-10 ResNet-20 (../shared), top-1 (%) on ``--n-images`` test images
  (the fixed split of ``common.cifar_split``).

Rows are merged into the JSON as they finish (a rerun skips them; --fresh starts over).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, cifar_split, dump_json, load_json, machine, quantize_timed, top1  # noqa: E402

import winoq  # noqa: E402
from winoq.models import get_model  # noqa: E402

ROWS = {  # name -> Recipe fields
    "direct, input per sample": dict(winograd=None, activation_granularity="sample"),
    "direct, input per pixel (fine)": dict(winograd=None, activation_granularity="fine"),
}
for _m in (4, 6):
    for _g, _label in (("sample", "per sample"), ("fine", "per tile (fine)"), ("block", "per block")):
        ROWS[f"F({_m},3) learned, input {_label}"] = dict(winograd=_m, activation_granularity=_g)
    ROWS[f"F({_m},3) learned, input per tile, tap-wise U"] = dict(winograd=_m, activation_granularity="fine",
                                                                  winograd_weight_scales="tapwise")
    ROWS[f"F({_m},3) learned, input per sample, tap-wise U"] = dict(winograd=_m, activation_granularity="sample",
                                                                    winograd_weight_scales="tapwise")


PROBE_T = (50, 500, 950)  # the timesteps of the "worst of t = 50 / 500 / 950"


def ddpm_eval(args):
    from winoq.diffusion import default_ddpm_schedule, load_default_ddpm, sample
    from winoq.diffusion.metrics import eps_sqnr_per_timestep

    model, sched = load_default_ddpm(), default_ddpm_schedule()
    seeds = list(range(args.ddpm_seeds))
    labels = [i % 10 for i in seeds]
    _, traj = sample(model, sched, seeds, steps=args.ddpm_steps, labels=labels, record=True)

    def run(qmodel):
        with torch.no_grad():
            per_t = eps_sqnr_per_timestep(model, qmodel, sched, seeds, labels=labels, trajectory=traj)
        vals = list(per_t.values())
        probe = [per_t[min(per_t, key=lambda t: abs(t - target))] for target in PROBE_T]
        return {"probe_worst_db": min(probe), "worst_db": min(vals), "mean_db": sum(vals) / len(vals),
                "per_t": {str(t): v for t, v in per_t.items()}}

    return model, run


def classifier_eval(model, x, y):
    def run(qmodel):
        return {"top1": top1(qmodel, x, y)}

    return model, run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["ddpm", "fmnist", "resnet20"])
    ap.add_argument("--rows", nargs="+", default=list(ROWS))
    ap.add_argument("--n-images", type=int, default=1000)
    ap.add_argument("--ddpm-seeds", type=int, default=8)
    ap.add_argument("--ddpm-steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "granularity.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = {} if args.fresh else load_json(args.out)
    res["machine"] = machine()
    for name in args.models:
        if name == "ddpm":
            model, run = ddpm_eval(args)
        elif name == "fmnist":
            from winoq.data.fashion_mnist import fashion_mnist_tensors

            x, y = fashion_mnist_tensors("test")
            model, run = classifier_eval(get_model("fmnist-resnet"), x[:args.n_images], y[:args.n_images])
        else:
            x, y, _ = cifar_split(args.n_images, 64)
            model, run = classifier_eval(get_model("cifar-resnet20", "shared"), x, y)
        rows = res.setdefault(name, {})
        if "FP" not in rows:
            rows["FP"] = run(model)
        for row in args.rows:
            if row in rows:
                continue
            qmodel, secs = quantize_timed(model, winoq.Recipe(**ROWS[row]))
            rows[row] = {**run(qmodel), "quantize_s": secs}
            print(name, row, rows[row], flush=True)
            dump_json(args.out, res)
        dump_json(args.out, res)
    print(markdown(res))


def markdown(res) -> str:
    cols = [m for m in ("ddpm", "fmnist", "resnet20") if m in res]
    head = "| configuration (W8A8, g32) | " + " | ".join(
        {"ddpm": "DDPM eps SQNR (dB): worst of t=50/500/950 / worst of all t / mean", "fmnist": "FMNIST ResNet top-1 (%)",
         "resnet20": "ResNet-20 top-1 (%)"}[c] for c in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for row in ["FP"] + list(ROWS):
        cells = []
        for c in cols:
            r = res[c].get(row)
            if r is None:
                cells.append("")
            elif row == "FP" and "worst_db" in r:
                cells.append("(reference)")
            elif "worst_db" in r:
                cells.append(f"{r['probe_worst_db']:.1f} / {r['worst_db']:.1f} / {r['mean_db']:.1f}")
            else:
                cells.append(f"{r['top1']:.2f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
