#!/usr/bin/env python3
"""Train the small class-conditional Fashion-MNIST DDPM shipped with winoq.

Reads Fashion-MNIST from /usr/share/datasets/fashion-mnist (nothing is downloaded),
scales images to [-1, 1], trains a ``winoq.diffusion.DDPMUNet`` to predict the noise
(linear beta schedule, T=1000) with AdamW, linear warm-up + cosine decay, random
horizontal flips, label dropout (null class) for classifier-free guidance and an EMA
of the weights, then writes

    src/winoq/assets/ddpm_fmnist.safetensors   (EMA weights, float32)
    src/winoq/assets/ddpm_fmnist.json          (config, schedule, seed, steps, time, command, ...)
    src/winoq/assets/ddpm_fmnist_samples.png   (10 classes x 10 seeds, DDIM 50 steps)

Usage: python3 scripts/train_ddpm.py [--steps 1200] [--batch 32] [--seed 0] [--threads 1]
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

from winoq.data import load_fashion_mnist  # noqa: E402
from winoq.diffusion.images import save_grid  # noqa: E402
from winoq.diffusion.pretrained import DDPM_METADATA, DDPM_SAMPLES, DDPM_WEIGHTS  # noqa: E402
from winoq.diffusion.samplers import sample  # noqa: E402
from winoq.diffusion.schedule import make_schedule  # noqa: E402
from winoq.diffusion.unet import DDPMUNet, UNetConfig  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--ema", type=float, default=0.995)
    ap.add_argument("--p-uncond", type=float, default=0.1, help="probability of the null class (CFG)")
    ap.add_argument("--base", type=int, default=32)
    ap.add_argument("--mults", default="1,2,2")
    ap.add_argument("--schedule", default="linear", choices=("linear", "cosine"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-minutes", type=float, default=0, help="stop early after this wall time (0: never)")
    ap.add_argument("--stop-after", type=int, default=0,
                    help="stop after this many steps, keeping the LR schedule of --steps (reproduces a "
                         "--max-minutes run: see 'reproduce' in the JSON)")
    ap.add_argument("--guidance", type=float, default=2.0, help="CFG scale of the sample grid")
    ap.add_argument("--out", default=str(REPO / "src" / "winoq" / "assets"))
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    images, labels = load_fashion_mnist("train")
    x_all = images.float().div(127.5).sub(1).unsqueeze(1)  # [-1, 1]
    cfg = UNetConfig(base=args.base, channel_mults=tuple(int(m) for m in args.mults.split(",")), num_classes=10)
    model = DDPMUNet(cfg)
    ema = DDPMUNet(cfg)
    ema.load_state_dict(model.state_dict())
    ema.eval().requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    schedule = make_schedule(args.schedule, 1000)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "emb" not in name else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.99))

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))

    print(f"DDPMUNet {cfg.to_dict()} | {n_params:,} parameters | {args.steps} steps x {args.batch}", flush=True)
    perm = torch.randperm(len(x_all), generator=gen)
    pos, history, running = 0, [], 0.0
    start = time.perf_counter()
    model.train()
    step = 0
    for step in range(args.steps):
        if pos + args.batch > len(perm):
            perm, pos = torch.randperm(len(x_all), generator=gen), 0
        idx = perm[pos:pos + args.batch]
        pos += args.batch
        x0 = x_all[idx]
        flip = torch.rand(len(idx), generator=gen) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        y = labels[idx].clone()
        y[torch.rand(len(idx), generator=gen) < args.p_uncond] = cfg.num_classes
        t = torch.randint(0, schedule.num_steps, (len(idx),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        loss = F.mse_loss(model(schedule.q_sample(x0, t, noise), t, y), noise)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        d = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - d)
        running += loss.item()
        if (step + 1) % 40 == 0:
            elapsed = time.perf_counter() - start
            history.append({"step": step + 1, "loss": round(running / 40, 5), "seconds": round(elapsed, 1)})
            print(f"step {step + 1}/{args.steps} loss {running / 40:.4f} lr {lr_at(step):.2e} "
                  f"{elapsed:.0f}s ({(step + 1) * args.batch / elapsed:.0f} img/s)", flush=True)
            running = 0.0
        if args.stop_after and step + 1 >= args.stop_after:
            break
        if args.max_minutes and time.perf_counter() - start > args.max_minutes * 60:
            print(f"stopping after {step + 1} steps: --max-minutes {args.max_minutes} reached", flush=True)
            break
    steps_done = step + 1
    train_seconds = time.perf_counter() - start

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in ema.state_dict().items()}
    save_file(state, str(out / DDPM_WEIGHTS))
    sha = hashlib.sha256((out / DDPM_WEIGHTS).read_bytes()).hexdigest()

    s0 = time.perf_counter()
    grid_labels = torch.arange(10).repeat_interleave(10)
    grid_seeds = list(range(100))
    xs = sample(ema, schedule, grid_seeds, steps=50, labels=grid_labels, guidance_scale=args.guidance)
    save_grid(xs, out / DDPM_SAMPLES, nrow=10, scale=2)
    sample_seconds = time.perf_counter() - s0

    meta = {
        "model": "ddpm-fmnist-unet",
        "config": cfg.to_dict(),
        "parameters": n_params,
        "schedule": {"kind": args.schedule, "num_steps": schedule.num_steps},
        "prediction": "epsilon",
        "data_range": [-1, 1],
        "dataset": "Fashion-MNIST train (/usr/share/datasets/fashion-mnist), images scaled to [-1, 1]",
        "weights": "EMA",
        "seed": args.seed,
        "steps": steps_done,
        "steps_requested": args.steps,
        "batch_size": args.batch,
        "images_seen": steps_done * args.batch,
        "optimizer": f"AdamW(lr={args.lr}, betas=(0.9, 0.99), weight_decay={args.weight_decay}), grad clip 1.0",
        "lr_schedule": f"linear warm-up {args.warmup} steps, cosine decay to 5%",
        "ema": f"decay min({args.ema}, (1+step)/(10+step))",
        "label_dropout": args.p_uncond,
        "augmentation": "random horizontal flip",
        "threads": args.threads,
        "train_seconds": round(train_seconds, 1),
        "history": history,
        "sample_grid": {"file": DDPM_SAMPLES, "sampler": "DDIM 50 steps, eta 0", "guidance_scale": args.guidance,
                        "rows": "classes 0..9", "seeds": "0..99", "seconds": round(sample_seconds, 1)},
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": "python3 scripts/train_ddpm.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "reproduce": (f"python3 scripts/train_ddpm.py --steps {args.steps} --stop-after {steps_done} --batch {args.batch} "
                      f"--lr {args.lr} --warmup {args.warmup} --ema {args.ema} --p-uncond {args.p_uncond} "
                      f"--base {args.base} --mults {args.mults} --schedule {args.schedule} --seed {args.seed} "
                      f"--threads {args.threads}"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "weights_sha256": sha,
    }
    (out / DDPM_METADATA).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out / DDPM_WEIGHTS} ({train_seconds:.0f}s training), {out / DDPM_METADATA}, {out / DDPM_SAMPLES}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
