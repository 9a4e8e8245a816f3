"""Evaluation metrics (top-1 accuracy) and a small timing helper."""
from .classification import evaluate_top1, timed

__all__ = ["evaluate_top1", "timed"]
