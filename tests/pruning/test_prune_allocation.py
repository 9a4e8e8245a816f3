"""A floor on every conv's filters (min_filters) and the uniform allocation (the same fraction
of every layer's dense width, the criterion choosing which filters go)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_prune import EXAMPLE, tiny_data, tiny_unet  # noqa: E402

from winoq.models.unet_seg import UNetSeg, count_params, measured_widths  # noqa: E402
from winoq.pruning import (PruneConfig, TrainConfig, UnreachableRatioError, largest_ratio, prune_unet,  # noqa: E402
                           uniform_widths)


@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_min_filters_is_a_floor_on_every_conv(allocation):
    dense = tiny_unet()
    best1 = largest_ratio(dense, "params", EXAMPLE)
    best2 = largest_ratio(dense, "params", EXAMPLE, min_filters=2)
    assert 1 < best2 < best1
    res = prune_unet(dense, PruneConfig(target_ratio=best2 * 0.9, min_filters=2, allocation=allocation, tolerance=0.1),
                     example=EXAMPLE, progress=False)
    assert min(res.model.config.widths) == 2 and res.ratio_params >= best2 * 0.9 * 0.9
    # with a floor of 1 the same ratio takes some conv below 2
    res1 = prune_unet(dense, PruneConfig(target_ratio=best2 * 0.9, allocation=allocation, tolerance=0.1),
                      example=EXAMPLE, progress=False)
    assert min(res1.model.config.widths) < 2


def test_a_ratio_beyond_the_floor_names_the_floor_and_the_largest():
    dense = tiny_unet()
    best3 = largest_ratio(dense, "params", EXAMPLE, min_filters=3)
    with pytest.raises(UnreachableRatioError, match=rf"3 filters \(min_filters\).*ask for <= {best3:.1f}x"):
        prune_unet(dense, PruneConfig(target_ratio=best3 * 1.2, min_filters=3), example=EXAMPLE, progress=False)


def test_uniform_widths_are_the_largest_common_fraction_that_meets_the_target():
    dense = tiny_unet()
    d = measured_widths(dense)
    total = count_params(dense)
    w = uniform_widths(dense, d, 6.0, "params", EXAMPLE, total)
    assert count_params(UNetSeg(dense.config.with_widths(w))) <= total / 6
    fracs = [a / b for a, b in zip(w, d)]
    # one fraction, up to rounding to whole filters (the narrowest dense layer has 8)
    assert max(fracs) - min(fracs) <= 1 / 8 + 1e-9
    # one filter more in every conv would break the budget
    wider = tuple(min(a + 1, b) for a, b in zip(w, d))
    assert count_params(UNetSeg(dense.config.with_widths(wider))) > total / 6
    # beyond the floor it returns the floor
    assert uniform_widths(dense, d, 1e6, "params", EXAMPLE, total, min_filters=2) == tuple([2] * len(d))


def test_uniform_allocation_keeps_the_l1_largest_filters_of_each_layer():
    dense = tiny_unet(norm="none")
    conv, nxt = dense.enc[0].conv1, dense.enc[0].conv2
    with torch.no_grad():   # filters (and what reads them) of growing magnitude: L1 keeps the largest
        conv.bias.zero_()
        for i in range(conv.out_channels):
            conv.weight[i] = 0.01 * (i + 1)
            nxt.weight[:, i] = 0.01 * (i + 1)
    res = prune_unet(dense, PruneConfig(target_ratio=4, allocation="uniform"), example=EXAMPLE, progress=False)
    kept = res.model.enc[0].conv1.weight[:, 0, 0, 0]
    n = kept.numel()
    assert 1 <= n < conv.out_channels
    expected = 0.01 * torch.arange(conv.out_channels - n + 1, conv.out_channels + 1, dtype=torch.float32)
    assert torch.allclose(kept.sort().values, expected)


@pytest.mark.parametrize("criterion", ["l2", "taylor", "random"])
def test_uniform_allocation_with_every_criterion_and_the_iterative_schedule(criterion):
    cfg = PruneConfig(target_ratio=12, criterion=criterion, allocation="uniform", schedule="iterative", stages=2,
                      min_filters=2, finetune=TrainConfig(steps=2, batch_size=2))
    res = prune_unet(tiny_unet(), cfg, tiny_data(), example=EXAMPLE, progress=False)
    assert res.ratio_params >= 12 and min(res.model.config.widths) >= 2
    assert len(res.history) == 2 and res.history[0]["reached"] < res.history[1]["reached"]
    assert res.model(torch.randn(2, 1, 16, 16)).shape == (2, 1, 16, 16)


def test_config_rejects_a_bad_floor_and_allocation():
    with pytest.raises(ValueError, match="min_filters"):
        PruneConfig(target_ratio=2, min_filters=0)
    with pytest.raises(ValueError, match="allocation"):
        PruneConfig(target_ratio=2, allocation="greedy")
