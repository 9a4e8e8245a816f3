"""Winograd maths (``transforms``), the exact layer (``conv``), the fully
quantized layer (``quantized``) and the data-free scale learning (``scales``)."""
from .transforms import ToomCook, ScaledTransforms, apply_diagonal_scales, default_points, tap_range_2d, toom_cook
from .conv import WinogradConv2d, is_winograd_eligible, winograd_ineligibility, winograd_or_direct

__all__ = [
    "ToomCook", "ScaledTransforms", "apply_diagonal_scales", "default_points", "tap_range_2d", "toom_cook",
    "WinogradConv2d", "is_winograd_eligible", "winograd_ineligibility", "winograd_or_direct",
]
