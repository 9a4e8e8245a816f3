"""Checkpoint file sizes: the float model, the older float-weights format (winoq-1: the quantized
model's float state dict), and deployable winoq-2 files (codes and scales) for W8A8 and W4A8,
direct and Winograd; each winoq-2 file is reloaded into a copy of the model with every
parameter and statistic redrawn at random and must give bit-identical outputs. The last column
keeps the Winograd layers' float 3x3 weights (``save(..., winograd_weights="float")``).

    python benchmarks/checkpoint_sizes.py --out benchmarks/out/checkpoint_sizes.json

Models: the Fashion-MNIST ResNet and DDPM (shipped weights) and CIFAR ResNet-20 (../shared).
Sizes do not depend on the learned values: the transform scales get 2 learning steps here.
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import dump_json, machine  # noqa: E402

import winoq  # noqa: E402

RECIPES = {
    "W8A8 direct": dict(weights="int8", winograd=None),
    "W8A8 F(4,3)": dict(weights="int8", winograd=4),
    "W8A8 F(6,3)": dict(weights="int8", winograd=6),
    "W4A8 direct": dict(weights="int4", winograd=None),
    "W4A8 F(6,3)": dict(weights="int4", winograd=6),
}


def models():
    from winoq.diffusion import load_default_ddpm
    from winoq.models import load_cifar_resnet, load_default_fmnist_model

    yield "fmnist-resnet", load_default_fmnist_model(), lambda m: m(torch.randn(2, 1, 28, 28, generator=_gen()))
    yield "cifar-resnet20", load_cifar_resnet(20), lambda m: m(torch.randn(2, 3, 32, 32, generator=_gen()))
    ddpm = load_default_ddpm()
    c = ddpm.config
    size = getattr(c, "image_size", 28)
    yield "ddpm (Fashion-MNIST)", ddpm, lambda m: m(torch.randn(2, c.in_channels, size, size, generator=_gen()),
                                                     torch.tensor([10, 500]), torch.tensor([1, 2]))


def _gen():
    return torch.Generator().manual_seed(0)


def randomized(model: nn.Module) -> nn.Module:
    """The architecture with every parameter and BatchNorm statistic redrawn."""
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        for p in fresh.parameters():
            p.normal_()
        for m in fresh.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return fresh


def file_size(tensors: dict, path: Path, metadata=None) -> int:
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path.stat().st_size


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/checkpoint_sizes.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, model, run in models():
            model.eval()
            float_bytes = file_size(model.state_dict(), tmp / "float.safetensors")
            for label, kw in RECIPES.items():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    qm = winoq.quantize(model, winoq.Recipe(learn_steps=2, **kw), progress=False)
                old_bytes = file_size(qm.state_dict(), tmp / "old.safetensors")
                path = tmp / "q.safetensors"
                winoq.save(qm, path)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    loaded = winoq.load(path, randomized(model))
                with torch.no_grad():
                    identical = bool(torch.equal(run(qm), run(loaded)))
                new_bytes = path.stat().st_size
                winoq.save(qm, tmp / "qf.safetensors", winograd_weights="float")
                float_wino_bytes = (tmp / "qf.safetensors").stat().st_size
                rows.append({"model": name, "recipe": label, "float_bytes": float_bytes, "winoq1_bytes": old_bytes,
                             "winoq2_bytes": new_bytes, "winoq2_float_winograd_bytes": float_wino_bytes,
                             "bit_identical_reload": identical})
                print(f"{name:22s} {label:12s} float {float_bytes / 1e6:7.3f} MB  winoq-1 {old_bytes / 1e6:7.3f} MB  "
                      f"winoq-2 {new_bytes / 1e6:7.3f} MB ({new_bytes / float_bytes:.2f}x)  identical={identical}",
                      flush=True)
    dump_json(args.out, {"machine": machine(), "rows": rows})
    print("\n| model | recipe | float MB | winoq-1 (float weights) MB | winoq-2 (codes) MB | winoq-2 / float "
          "| winoq-2, Winograd weights float / float | reload bit-identical |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['recipe']} | {r['float_bytes'] / 1e6:.3f} | {r['winoq1_bytes'] / 1e6:.3f} | "
              f"{r['winoq2_bytes'] / 1e6:.3f} | {r['winoq2_bytes'] / r['float_bytes']:.2f}x | "
              f"{r['winoq2_float_winograd_bytes'] / r['float_bytes']:.2f}x | "
              f"{'yes' if r['bit_identical_reload'] else 'NO'} |")


if __name__ == "__main__":
    main()
