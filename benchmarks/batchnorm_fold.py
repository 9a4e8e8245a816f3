"""Accuracy with and without BatchNorm folding (``Recipe.fold_batchnorm``), W8A8 g32:
direct, F(4,3) learned, F(6,3) learned; the Fashion-MNIST ResNet (Fashion-MNIST test split)
and CIFAR ResNet-20 (../shared, CIFAR-10 test images in the fixed order of common.cifar_split).

    python benchmarks/batchnorm_fold.py --n-images 2000 --out benchmarks/out/batchnorm_fold.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cifar_split, dump_json, machine, quantize_timed, top1  # noqa: E402

import winoq  # noqa: E402

RECIPES = {"W8A8 direct g32": dict(winograd=None), "W8A8 F(4,3) learned": dict(winograd=4),
           "W8A8 F(6,3) learned": dict(winograd=6)}


def models(n_images: int):
    from winoq.data import fashion_mnist_tensors
    from winoq.models import load_cifar_resnet, load_default_fmnist_model

    x, y = fashion_mnist_tensors("test")
    yield "fmnist-resnet", load_default_fmnist_model().eval(), x[:n_images], y[:n_images]
    xc, yc, _ = cifar_split(n_images, 0)
    yield "cifar-resnet20", load_cifar_resnet(20).eval(), xc, yc


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-images", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/batchnorm_fold.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name, model, x, y in models(args.n_images):
        fp = top1(model, x, y)
        for label, kw in RECIPES.items():
            acc = {}
            for fold in (False, True):
                q, _ = quantize_timed(model, winoq.Recipe(fold_batchnorm=fold, **kw))
                acc[fold] = top1(q, x, y)
            rows.append({"model": name, "recipe": label, "fp": fp, "unfolded": acc[False], "folded": acc[True]})
            print(f"{name:15s} {label:22s} FP {fp:.2f}  BN kept {acc[False]:.2f}  BN folded {acc[True]:.2f}", flush=True)
    dump_json(args.out, {"machine": machine(), "n_images": args.n_images, "rows": rows})
    print("\n| model | recipe | FP | BN kept in float | BN folded | folded - kept |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['recipe']} | {r['fp']:.2f} | {r['unfolded']:.2f} | {r['folded']:.2f} | "
              f"{r['folded'] - r['unfolded']:+.2f} |")


if __name__ == "__main__":
    main()
