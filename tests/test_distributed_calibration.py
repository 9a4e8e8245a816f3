"""Sharded data-free calibration (winoq.distributed): 2 gloo processes give the same model, bit for bit."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import winoq
from winoq.distributed import assign_layers, layer_cost, quantize_sharded, shard, sharded_calibration
from winoq.winograd.quantized import QuantWinogradConv2d


def wide_cnn() -> nn.Sequential:
    gen = torch.Generator().manual_seed(0)
    convs = [nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 8, 3, padding=1),
             nn.Conv2d(8, 8, 5, padding=2)]
    with torch.no_grad():
        for c in convs:
            c.weight.copy_(torch.randn(c.weight.shape, generator=gen) * 0.2)
            c.bias.copy_(torch.randn(c.bias.shape, generator=gen) * 0.1)
    return nn.Sequential(convs[0], nn.ReLU(), convs[1], nn.ReLU(), convs[2], convs[3])


RECIPE = winoq.Recipe(winograd=4, group_size=4, learn_steps=1, winograd_kernels=(3, 5))


def test_assign_layers_balances_by_cost_and_is_deterministic():
    costs = [5.0, 1.0, 4.0, 2.0, 2.0, 1.0]
    owners = assign_layers(costs, 2)
    assert owners == assign_layers(costs, 2)
    loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(2)]
    assert sorted(loads) == [7.0, 8.0]
    assert assign_layers(costs, 1) == [0] * len(costs)
    assert sorted(set(assign_layers(costs, 3))) == [0, 1, 2]
    with pytest.raises(ValueError, match="world size"):
        assign_layers(costs, 0)


def test_layer_cost_grows_with_channels_and_tile():
    q = winoq.quantize(wide_cnn(), RECIPE, calibrate=False, progress=False)
    a, b = q[0], q[2]
    assert isinstance(a, QuantWinogradConv2d) and isinstance(b, QuantWinogradConv2d)
    assert layer_cost(b, None) > layer_cost(a, None)
    assert layer_cost(b, 8) < layer_cost(b, None)


def test_no_process_group_means_no_sharding():
    with sharded_calibration():
        assert shard() == (0, 1)
    assert shard() == (0, 1)


def test_two_processes_equal_one_process_bit_for_bit(one_thread):
    model = wide_cnn()
    single = winoq.quantize(model, RECIPE, progress=False)
    sharded = quantize_sharded(model, RECIPE, procs=2)
    assert [r.kind for r in sharded.winoq_report] == [r.kind for r in single.winoq_report]
    assert sum(r.kind == "winograd" for r in single.winoq_report) == 4
    sd1, sd2 = single.state_dict(), sharded.state_dict()
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        assert torch.equal(sd1[k], sd2[k]), k
    for r1, r2 in zip(single.winoq_report, sharded.winoq_report):
        assert r1.calibration.get("s_b") == r2.calibration.get("s_b")
        assert r1.calibration.get("sqnr_learned_db") == r2.calibration.get("sqnr_learned_db")
    x = torch.randn(2, 8, 12, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(single(x), sharded(x))
    # the scales were learned (not left at the standard ones) on both ranks' layers
    assert all(float(m.log_sb.abs().max()) > 0 for m in sharded.modules() if isinstance(m, QuantWinogradConv2d))


def test_quantize_sharded_rejects_bad_procs():
    with pytest.raises(ValueError, match="procs"):
        quantize_sharded(wide_cnn(), RECIPE, procs=0)
    with pytest.raises(ValueError, match="process group"):
        quantize_sharded(wide_cnn(), RECIPE, procs=None)
