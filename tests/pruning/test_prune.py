"""Structured filter pruning of a UNetSeg: target ratios, plain smaller modules, save / load."""
from __future__ import annotations

import pytest
import torch

from winoq.data.segmentation import SegmentationSet
from winoq.models.unet_seg import UNetConfig, UNetSeg, count_params, measured_widths
from winoq.pruning import (PruneConfig, TrainConfig, UnreachableRatioError, count_macs, largest_ratio,
                           load_unet, prune_unet, save_unet, stage_targets)

EXAMPLE = torch.zeros(1, 1, 16, 16)


def tiny_unet(seed=0, norm="batch"):
    torch.manual_seed(seed)
    model = UNetSeg(UNetConfig(depth=2, base_width=8, norm=norm))
    with torch.no_grad():   # non-trivial BN statistics, so a round trip that dropped them would show
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def tiny_data(n=6, size=16):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, size, size, generator=g)
    return SegmentationSet(x, (x > 0.6).float(), [f"s{i}" for i in range(n)])


@pytest.mark.parametrize("criterion", ["l1", "l2", "taylor", "random"])
@pytest.mark.parametrize("metric", ["params", "macs"])
def test_reaches_target_ratio_within_tolerance(criterion, metric):
    dense = tiny_unet()
    cfg = PruneConfig(target_ratio=8, criterion=criterion, metric=metric, tolerance=0.1)
    res = prune_unet(dense, cfg, tiny_data(), example=EXAMPLE, progress=False)
    reached = res.ratio_params if metric == "params" else res.ratio_macs
    assert 8 * 0.9 <= reached <= 8 / 0.9
    assert res.params == count_params(res.model) and res.macs == count_macs(res.model, EXAMPLE)
    assert measured_widths(dense) == dense.config.resolved_widths()   # the dense model is untouched


def test_pruned_model_is_a_plain_smaller_unet():
    res = prune_unet(tiny_unet(), PruneConfig(target_ratio=20), example=EXAMPLE, progress=False)
    model = res.model
    assert type(model) is UNetSeg and model.config.widths == measured_widths(model)
    assert sum(model.config.widths) < sum(tiny_unet().config.resolved_widths())
    # a freshly built UNetSeg of the recorded widths takes the weights strictly
    UNetSeg(model.config).load_state_dict(model.state_dict(), strict=True)
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 1, 16, 16)


def test_l1_removes_dead_filters_first_random_does_not():
    dense = tiny_unet(norm="none")
    conv1, conv2 = dense.enc[0].conv1, dense.enc[0].conv2
    with torch.no_grad():   # filters 0, 2, 4, 6 of the first conv contribute nothing
        conv1.weight[::2] = 0
        conv1.bias[::2] = 0
        conv2.weight[:, ::2] = 0
    dead_params = 4 * (9 + 1 + 8 * 9)
    total = count_params(dense)
    ratio = total / (total - dead_params + 20)   # the 4 dead filters' worth, just
    x = torch.rand(4, 1, 16, 16)
    with torch.no_grad():
        ref = dense(x)
        l1 = prune_unet(dense, PruneConfig(target_ratio=ratio, tolerance=1e-3), example=EXAMPLE, progress=False).model
        assert l1.config.width_map()["enc.0.conv1"] == 4 and count_params(l1) == total - dead_params
        assert torch.allclose(l1(x), ref, atol=1e-6)   # only dead filters went
        assert bool((l1.enc[0].conv1.weight.abs().sum((1, 2, 3)) > 0).all())
        for seed in range(3):   # the control does not find them
            rnd = prune_unet(dense, PruneConfig(target_ratio=ratio, tolerance=1e-3, criterion="random", seed=seed),
                             example=EXAMPLE, progress=False).model
            kept_dead = bool((rnd.enc[0].conv1.weight.abs().sum((1, 2, 3)) == 0).any())
            assert kept_dead or rnd.config.width_map()["enc.0.conv1"] != 4


def test_save_load_round_trip_is_bit_exact(tmp_path):
    res = prune_unet(tiny_unet(), PruneConfig(target_ratio=10, criterion="l2"), example=EXAMPLE, progress=False)
    path = tmp_path / "pruned.safetensors"
    save_unet(res.model, path, {"note": "test"})
    loaded, info = load_unet(path)   # no original network needed
    assert info == {"note": "test"} and loaded.config == res.model.config
    a, b = res.model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(3, 1, 16, 16)
    assert torch.equal(res.model(x), loaded(x))


def test_unreachable_ratio_names_the_largest():
    dense = tiny_unet()
    best = largest_ratio(dense, "params", EXAMPLE)
    with pytest.raises(UnreachableRatioError, match=rf"at most; ask for <= {best:.1f}x"):
        prune_unet(dense, PruneConfig(target_ratio=best * 1.5), example=EXAMPLE, progress=False)
    # the largest reachable ratio itself is reachable (every conv left with one filter)
    res = prune_unet(dense, PruneConfig(target_ratio=best * 0.99, tolerance=0.02), example=EXAMPLE, progress=False)
    assert set(res.model.config.widths) == {1}


def test_iterative_schedule_fine_tunes_between_stages():
    cfg = PruneConfig(target_ratio=16, schedule="iterative", stages=2, criterion="taylor",
                      finetune=TrainConfig(steps=4, batch_size=2))
    assert stage_targets(cfg) == pytest.approx([4.0, 16.0])
    res = prune_unet(tiny_unet(), cfg, tiny_data(), example=EXAMPLE, progress=False)
    assert [h["stage"] for h in res.history] == [0, 1]
    assert all(h["finetune"]["steps"] == 2 for h in res.history)
    assert res.history[0]["reached"] < res.history[1]["reached"]


def test_config_validation():
    with pytest.raises(ValueError, match="target_ratio"):
        PruneConfig(target_ratio=0.5)
    with pytest.raises(ValueError, match="criterion"):
        PruneConfig(target_ratio=2, criterion="hessian")
    with pytest.raises(ValueError, match="train_data"):
        prune_unet(tiny_unet(), PruneConfig(target_ratio=2, finetune=TrainConfig(steps=1)), progress=False)


def test_cost_aware_ranking_keeps_more_full_resolution_filters():
    dense = tiny_unet()
    widths = {}
    for aware in (True, False):
        res = prune_unet(dense, PruneConfig(target_ratio=30, cost_aware=aware), example=EXAMPLE, progress=False)
        widths[aware] = res.model.config.width_map()
    # the first conv's filters are cheap (9 weights each): importance per parameter keeps them
    assert widths[True]["enc.0.conv1"] > widths[False]["enc.0.conv1"]


def test_taylor_and_fine_tuning_pad_images_of_any_size():
    data = tiny_data(n=4, size=18)   # not a multiple of 2**depth = 4
    cfg = PruneConfig(target_ratio=4, criterion="taylor", finetune=TrainConfig(steps=2, batch_size=2))
    res = prune_unet(tiny_unet(), cfg, data, example=EXAMPLE, progress=False)
    assert res.ratio_params >= 4 * 0.95 and res.history[0]["finetune"]["steps"] == 2
