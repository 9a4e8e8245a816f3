"""Structured filter pruning of segmentation U-Nets (Torch-Pruning DepGraph).

    from winoq.pruning import PruneConfig, prune_unet, save_unet, load_unet
    result = prune_unet(dense, PruneConfig(target_ratio=100, criterion="l1", schedule="iterative",
                                           finetune=TrainConfig(steps=200)), train_data)
    save_unet(result.model, "pruned.safetensors")      # widths in the metadata
    model, info = load_unet("pruned.safetensors")      # no original network needed
"""
from .checkpoint import load_unet, read_unet_metadata, save_unet
from .prune import (
    ALLOCATIONS,
    CRITERIA,
    METRICS,
    SCHEDULES,
    PruneConfig,
    PruneResult,
    UnreachableRatioError,
    as_plain_unet,
    count_macs,
    largest_ratio,
    prune_to_ratio,
    prune_unet,
    stage_targets,
    uniform_widths,
)
from .train import TrainConfig, evaluate, human_reference, predict_logits, segmentation_loss, train

__all__ = [
    "load_unet", "read_unet_metadata", "save_unet", "CRITERIA", "METRICS", "SCHEDULES", "PruneConfig",
    "PruneResult", "UnreachableRatioError", "as_plain_unet", "count_macs", "largest_ratio", "prune_to_ratio",
    "ALLOCATIONS", "uniform_widths",
    "prune_unet", "stage_targets", "TrainConfig", "evaluate", "human_reference", "predict_logits",
    "segmentation_loss", "train",
]
