#!/usr/bin/env python3
"""Train the small Fashion-MNIST ResNet shipped as winoq's default model.

Reads Fashion-MNIST from /usr/share/datasets/fashion-mnist (Debian package
``dataset-fashion-mnist``), trains with SGD + Nesterov momentum and a one-cycle LR
schedule, light augmentation (random crop with 2-pixel padding, horizontal flip; torch
ops only), evaluates on the 10,000 test images and writes

    src/winoq/assets/fmnist_resnet.safetensors   (weights)
    src/winoq/assets/fmnist_resnet.json          (seed, epochs, measured accuracy, ...)

Usage: python3 scripts/train_fmnist.py [--epochs 8] [--seed 0] [--threads 1]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from winoq.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, fashion_mnist_tensors  # noqa: E402
from winoq.models.fmnist import FMNIST_METADATA, FMNIST_WEIGHTS, fmnist_resnet  # noqa: E402


def augment(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Per-sample random crop (zero-padding ``pad`` in pixel space) and horizontal flip."""
    b, c, h, w = x.shape
    bg = -FASHION_MNIST_MEAN / FASHION_MNIST_STD  # a black pixel after normalization
    xp = F.pad(x, (pad, pad, pad, pad), value=bg)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    rows = dy[:, None] + torch.arange(h)[None, :]                      # [B, H]
    cols = dx[:, None] + torch.arange(w)[None, :]                      # [B, W]
    flip = torch.rand(b, generator=gen) < 0.5
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    bi = torch.arange(b)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
    return out.permute(0, 3, 1, 2)


@torch.no_grad()
def evaluate(model, x, y, batch_size=1000, channels_last=True) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        correct += (model(xb).argmax(1) == y[i:i + batch_size]).sum().item()
    return correct / len(x)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.2, help="peak (one-cycle) learning rate")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--label-smoothing", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--limit-train", type=int, default=None, help="use only N training images")
    p.add_argument("--out-dir", type=Path, default=REPO / "src" / "winoq" / "assets")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    x_train, y_train = fashion_mnist_tensors("train")
    x_test, y_test = fashion_mnist_tensors("test")
    if args.limit_train:
        x_train, y_train = x_train[:args.limit_train], y_train[:args.limit_train]
    n = len(x_train)
    steps_per_epoch = math.ceil(n / args.batch_size)

    model = fmnist_resnet().to(memory_format=torch.channels_last)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {model.config()}, {n_params:,} parameters; train {n}, test {len(x_test)}",
          flush=True)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=args.lr, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=steps_per_epoch,
        pct_start=0.25, div_factor=10.0, final_div_factor=100.0)

    t0 = time.time()
    history = []
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        tot_loss, tot_correct, seen = 0.0, 0, 0
        te = time.time()
        for step in range(steps_per_epoch):
            idx = perm[step * args.batch_size:(step + 1) * args.batch_size]
            xb = augment(x_train[idx], 2, gen).contiguous(memory_format=torch.channels_last)
            yb = y_train[idx]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb, label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot_loss += loss.item() * len(idx)
            tot_correct += (logits.argmax(1) == yb).sum().item()
            seen += len(idx)
            if (step + 1) % 100 == 0:
                print(f"  epoch {epoch + 1} step {step + 1}/{steps_per_epoch} "
                      f"loss {tot_loss / seen:.4f} acc {tot_correct / seen:.4f} "
                      f"lr {sched.get_last_lr()[0]:.4f} ({time.time() - te:.0f}s)", flush=True)
        acc = evaluate(model, x_test, y_test)
        history.append({"epoch": epoch + 1, "train_loss": round(tot_loss / seen, 5),
                        "train_acc": round(tot_correct / seen, 5), "test_acc": acc})
        print(f"epoch {epoch + 1}/{args.epochs}: train loss {tot_loss / seen:.4f} "
              f"acc {tot_correct / seen:.4f} | test acc {acc:.4f} | "
              f"{time.time() - te:.0f}s (total {time.time() - t0:.0f}s)", flush=True)
    train_s = time.time() - t0

    model = model.to(memory_format=torch.contiguous_format).eval()
    test_acc = evaluate(model, x_test, y_test, channels_last=False)
    first2000 = evaluate(model, x_test[:2000], y_test[:2000], channels_last=False)
    print(f"final test accuracy {test_acc:.4f} (first 2000: {first2000:.4f}); "
          f"training took {train_s / 60:.1f} min", flush=True)
    if args.no_save:
        return 0

    from safetensors.torch import save_file

    args.out_dir.mkdir(parents=True, exist_ok=True)
    wpath = args.out_dir / FMNIST_WEIGHTS
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(wpath), metadata={"format": "pt", "model": "winoq fmnist-resnet"})
    wpath.chmod(0o644)
    meta = {
        "model": "fmnist-resnet",
        "config": model.config(),
        "parameters": n_params,
        "dataset": "Fashion-MNIST (/usr/share/datasets/fashion-mnist)",
        "normalization": {"mean": FASHION_MNIST_MEAN, "std": FASHION_MNIST_STD},
        "test_accuracy": round(test_acc, 4),
        "test_accuracy_first_2000": round(first2000, 4),
        "seed": args.seed,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "optimizer": f"SGD(momentum=0.9, nesterov=True, weight_decay={args.weight_decay} on "
                     f"conv/linear weights)",
        "lr_schedule": f"OneCycleLR(max_lr={args.lr}, pct_start=0.25, div_factor=10, "
                       f"final_div_factor=100)",
        "label_smoothing": args.label_smoothing,
        "augmentation": "random crop (2-pixel zero padding) + horizontal flip",
        "train_images": n,
        "threads": args.threads,
        "train_seconds": round(train_s, 1),
        "history": history,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": "python3 scripts/train_fmnist.py"
                   + "".join(" " + shlex.quote(a) for a in (argv if argv is not None
                                                             else sys.argv[1:])),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "weights_sha256": hashlib.sha256(wpath.read_bytes()).hexdigest(),
    }
    (args.out_dir / FMNIST_METADATA).write_text(json.dumps(meta, indent=2) + "\n",
                                                encoding="utf-8")
    print(f"wrote {wpath} ({wpath.stat().st_size / 1024:.0f} KiB) and "
          f"{args.out_dir / FMNIST_METADATA}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
