"""Training, fine-tuning and evaluation of segmentation U-Nets on the CPU.

One loop serves the dense baseline and the fine-tuning between pruning steps: Adam on
binary cross-entropy + soft Dice, seeded augmentation (flips, 90-degree turns, intensity
jitter) on whole images or random patches, bounded by a step count and a wall-clock limit.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data.segmentation import SegmentationSet, augment, pad_to_multiple, random_patches
from ..metrics.segmentation import segmentation_scores


@dataclass(frozen=True)
class TrainConfig:
    """``patch_size``: train on random square patches of this size (None: whole images).
    ``max_seconds``: stop early after this much wall time (None: no limit).  ``pad_multiple``:
    zero-pad whole images (and masks) to this multiple (a U-Net of depth d needs 2**d)."""
    steps: int = 200
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 0.0
    patch_size: int | None = None
    rotate90: bool = True
    seed: int = 0
    max_seconds: float | None = None
    pad_multiple: int = 1

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError(f"TrainConfig needs steps >= 0 and batch_size >= 1, got {self.steps}, {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if self.patch_size is not None and self.patch_size < 1:
            raise ValueError(f"TrainConfig.patch_size must be >= 1 or None, got {self.patch_size}")


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + (1 - soft Dice over the batch): BCE for calibrated pixels, Dice against the
    class imbalance (vessels are ~7% of a fundus image, the LV ~2% of an MRI slice)."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    dice = (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    return bce + (1 - dice)


def _batch(data: SegmentationSet, cfg: TrainConfig, g: torch.Generator):
    if cfg.patch_size is not None:
        x, y = random_patches(data.images, data.masks, cfg.batch_size, cfg.patch_size, g)
    else:
        idx = torch.randint(len(data), (cfg.batch_size,), generator=g)
        x, y = data.images[idx], data.masks[idx]
        if cfg.pad_multiple > 1:   # whole images the network cannot take as they are
            x, y = pad_to_multiple(x, cfg.pad_multiple)[0], pad_to_multiple(y, cfg.pad_multiple)[0]
    return augment(x, y, g, rotate90=cfg.rotate90)


def train(model: nn.Module, data: SegmentationSet, cfg: TrainConfig, progress: bool = True,
          desc: str = "train") -> dict:
    """Train ``model`` in place; returns {"steps": done, "loss": last mean loss, "seconds": ...}."""
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    t0, losses, step = time.perf_counter(), [], 0
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        if cfg.max_seconds is not None and time.perf_counter() - t0 > cfg.max_seconds:
            break
        # cosine decay over the step budget or the time budget, whichever runs out first
        progress_frac = step / max(cfg.steps, 1)
        if cfg.max_seconds:
            progress_frac = max(progress_frac, (time.perf_counter() - t0) / cfg.max_seconds)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * min(progress_frac, 1.0)))
        x, y = _batch(data, cfg, g)
        loss = segmentation_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    else:
        step = cfg.steps
    model.eval()
    tail = losses[-20:]
    return {"steps": step, "loss": sum(tail) / len(tail) if tail else float("nan"),
            "seconds": time.perf_counter() - t0}


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, multiple: int = 1, batch_size: int = 8) -> torch.Tensor:
    """Logits for every image; inputs are zero-padded to ``multiple`` and the output cropped back."""
    model.eval()
    outs = []
    for i in range(0, len(images), batch_size):
        x, (h, w) = pad_to_multiple(images[i:i + batch_size], multiple)
        outs.append(model(x)[..., :h, :w])
    return torch.cat(outs)


def size_multiple(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    return 2 ** cfg.depth if cfg is not None and hasattr(cfg, "depth") else 1


def evaluate(model: nn.Module, data: SegmentationSet, batch_size: int = 8) -> dict:
    """Dice / IoU (mean and per image) of the thresholded prediction (logit > 0) against the masks."""
    return logit_scores(predict_logits(model, data.images, size_multiple(model), batch_size), data)


def logit_scores(logits: torch.Tensor, data: SegmentationSet) -> dict:
    """Dice / IoU of logits (of any model or runtime) thresholded at 0 against ``data``'s masks."""
    return segmentation_scores((logits > 0).float(), data.masks)


def human_reference(data: SegmentationSet) -> dict | None:
    """Agreement of the second annotation with the first (the human reference), if present."""
    return None if data.reference is None else segmentation_scores(data.reference, data.masks)
