"""Overlap metrics for binary segmentation: Dice and IoU per image and their mean.

Convention: an image where both prediction and ground truth are empty scores 1 (perfect
agreement on "nothing there"); an empty ground truth with a non-empty prediction scores 0.
"""
from __future__ import annotations

import torch


def _flat_binary(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() < 2:
        raise ValueError(f"{name} must be (N, ...) with one image per row, got shape {tuple(x.shape)}")
    return (x.reshape(x.shape[0], -1) > 0.5).to(torch.float64)


def dice_per_image(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice 2|A∩B| / (|A|+|B|) of binary masks (values > 0.5 count as foreground), one per image."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    p, t = _flat_binary(pred, "pred"), _flat_binary(target, "target")
    inter, total = (p * t).sum(1), p.sum(1) + t.sum(1)
    return torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))


def iou_per_image(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU |A∩B| / |A∪B| of binary masks, one per image."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    p, t = _flat_binary(pred, "pred"), _flat_binary(target, "target")
    inter = (p * t).sum(1)
    union = p.sum(1) + t.sum(1) - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def segmentation_scores(pred: torch.Tensor, target: torch.Tensor) -> dict:
    """{"dice": mean, "iou": mean, "dice_per_image": [...], "iou_per_image": [...]}."""
    d, j = dice_per_image(pred, target), iou_per_image(pred, target)
    return {"dice": float(d.mean()), "iou": float(j.mean()),
            "dice_per_image": d.tolist(), "iou_per_image": j.tolist()}
