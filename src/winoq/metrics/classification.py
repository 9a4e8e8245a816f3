"""Top-1 accuracy of a classifier on in-memory tensors, and ``timed``."""
from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = ["evaluate_top1", "timed"]


def evaluate_top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500,
                  progress: bool = False, desc: str = "eval") -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)`` in percent (0..100).

    The model is put in eval mode and run without autograd on batches of
    ``batch_size`` images; ``progress`` shows a tqdm bar (one tick per image) titled ``desc``."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]} labels")
    if x.shape[0] == 0:
        raise ValueError("cannot evaluate on an empty set of images")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model.eval()
    correct = 0
    with torch.no_grad(), tqdm(total=x.shape[0], desc=desc, unit="img", disable=not progress,
                               leave=False, dynamic_ncols=True) as bar:
        for start in range(0, x.shape[0], batch_size):
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
            logits = model(xb)
            correct += int((logits.argmax(dim=1) == yb.to(logits.device)).sum())
            bar.update(xb.shape[0])
    return 100.0 * correct / x.shape[0]


def timed(fn: Callable[..., Any], *args, **kwargs) -> tuple[Any, float]:
    """Call ``fn(*args, **kwargs)``; return ``(result, wall-clock seconds)``."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start
