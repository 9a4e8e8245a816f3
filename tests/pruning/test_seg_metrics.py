"""Dice and IoU against hand-computed values."""
from __future__ import annotations

import pytest
import torch

from winoq.metrics.segmentation import dice_per_image, iou_per_image, segmentation_scores


def test_dice_iou_hand_computed():
    pred = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.float32)
    true = torch.tensor([[1, 0, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.float32)
    # image 0: |A|=2 |B|=2 |A∩B|=1 -> Dice 2/4, IoU 1/3; image 1: perfect; image 2: both empty -> 1;
    # image 3: empty prediction, one true pixel -> 0
    assert dice_per_image(pred, true).tolist() == pytest.approx([0.5, 1.0, 1.0, 0.0])
    assert iou_per_image(pred, true).tolist() == pytest.approx([1 / 3, 1.0, 1.0, 0.0])
    s = segmentation_scores(pred.reshape(4, 1, 2, 2), true.reshape(4, 1, 2, 2))
    assert s["dice"] == pytest.approx(2.5 / 4) and s["iou"] == pytest.approx((1 / 3 + 2) / 4)


def test_dice_iou_relation_and_threshold():
    g = torch.Generator().manual_seed(0)
    p, t = torch.rand(6, 1, 5, 5, generator=g), (torch.rand(6, 1, 5, 5, generator=g) > 0.5).float()
    d, j = dice_per_image(p, t), iou_per_image(p, t)
    assert torch.allclose(d, 2 * j / (1 + j))   # Dice = 2 IoU / (1 + IoU) for every image
    assert torch.equal(d, dice_per_image((p > 0.5).float(), t))


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        dice_per_image(torch.zeros(2, 4), torch.zeros(2, 5))
