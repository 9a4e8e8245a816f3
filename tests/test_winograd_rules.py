"""Which convs become Winograd: the channel rule, the kernel-size rule (no blind F(6,5)), forcing."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import winoq
from winoq import Recipe
from winoq.modules import QuantConv2d
from winoq.winograd.conv import tile_for_kernel, winograd_choice
from winoq.winograd.quantized import QuantWinogradConv2d


def unet_like() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 3, 3, padding=1))


def report(qm) -> dict:
    return {r.name: (r.kind, r.detail) for r in qm.winoq_report}


def test_default_keeps_few_channel_convs_direct_and_says_why():
    qm = winoq.quantize(unet_like(), Recipe(winograd=4, learn_steps=0), progress=False)
    rep = report(qm)
    assert rep["0"] == ("direct", "3 input channels < group size 32")
    assert rep["2"] == ("winograd", "F(4,3)")
    assert rep["4"] == ("direct", "3 output channels < group size 32")
    assert type(qm[0]) is QuantConv2d and type(qm[2]) is QuantWinogradConv2d and type(qm[4]) is QuantConv2d


def test_user_forces_either_way():
    everything = winoq.quantize(unet_like(), Recipe(winograd=4, learn_steps=0, winograd_min_channels=None),
                                progress=False)
    assert [r.kind for r in everything.winoq_report] == ["winograd"] * 3
    forced = winoq.quantize(unet_like(), Recipe(winograd=4, learn_steps=0, force_winograd=("0",)), progress=False)
    assert report(forced)["0"] == ("winograd", "F(4,3) (forced)") and report(forced)["4"][0] == "direct"
    stricter = winoq.quantize(unet_like(), Recipe(winograd=4, learn_steps=0, winograd_min_channels=64),
                              progress=False)
    assert report(stricter)["2"] == ("direct", "32 input channels < winograd_min_channels=64")
    skipped = winoq.quantize(unet_like(), Recipe(winograd=4, learn_steps=0, skip=("0",)), progress=False)
    assert "0" not in report(skipped)  # skip (float) still wins over the rule
    per_channel = Recipe(group_size=None)
    assert per_channel.min_winograd_channels == (32, "group size 32")


def large_kernel_net(k: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(32, 32, k, padding=k // 2))


@pytest.mark.parametrize("k", [5, 7])
def test_large_kernels_stay_direct_by_default_with_a_warning(k):
    with pytest.warns(UserWarning, match=rf"{k}x{k} kernels .* stay direct: F\(6,{k}\) is inaccurate"):
        qm = winoq.quantize(large_kernel_net(k), Recipe(winograd=6), progress=False)
    assert report(qm)["0"] == ("direct", f"{k}x{k} kernel: only 3x3 kernels run as Winograd (winograd_kernels)")
    text = Recipe(winograd=6).describe()
    assert "3x3: F(6,3)" in text and "5x5/7x7: direct" in text


def test_opted_in_large_kernels_keep_the_transform_size_not_the_tile():
    assert (tile_for_kernel(6, 3), tile_for_kernel(6, 5), tile_for_kernel(6, 7)) == (6, 4, 2)
    assert tile_for_kernel(4, 5) == 2 and tile_for_kernel(4, 7) is None
    r = Recipe(winograd=6, winograd_kernels=(7, 3, 5))
    assert r.winograd_kernels == (3, 5, 7)
    assert "5x5: F(4,5)" in r.describe() and "7x7: F(2,7)" in r.describe()
    assert "7x7: direct (no tile fits)" in Recipe(winograd=4, winograd_kernels=(3, 7)).describe()
    m, detail = winograd_choice(nn.Conv2d(32, 32, 7, padding=3), 4, min_channels=None, kernels=(3, 7))
    assert m is None and "no output tile" in detail


def test_opted_in_5x5_is_accurate_where_blind_f65_was_not():
    """Regression: a 5x5 stride-1 conv used to become F(6,5) with ~10x relative output error."""
    net = large_kernel_net(5)
    x = torch.randn(2, 32, 24, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = net(x).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # opted in: no warning
        qm = winoq.quantize(net, Recipe(winograd=6, winograd_kernels=(3, 5), learn_steps=2), progress=False)
    assert report(qm)["0"] == ("winograd", "F(4,5)")
    with torch.no_grad():
        rel = float((qm(x).double() - ref).pow(2).sum() / ref.pow(2).sum())
    assert rel < 0.15, rel  # measured 0.07, the level of F(6,3) on the same noise (same 8x8 transforms)
    blind_f65 = QuantWinogradConv2d.from_conv(net[0], 6, formats=qm[0].formats, group_size=32)  # standard scales
    with torch.no_grad():
        rel_blind = float((blind_f65(x).double() - ref).pow(2).sum() / ref.pow(2).sum())
    assert rel_blind > 100 * rel, (rel_blind, rel)  # what the old rule built for this conv


def test_recipe_rule_fields_are_validated_and_round_trip():
    for bad in (dict(winograd_min_channels=0), dict(winograd_min_channels="auto"), dict(winograd_min_channels=True),
                dict(winograd_kernels=3), dict(winograd_kernels=(1,)), dict(force_winograd="conv_in")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Recipe(**bad)
    r = Recipe(winograd_min_channels=8, winograd_kernels=(3, 5), force_winograd=("conv_in",))
    assert Recipe.from_json(r.to_json()) == r
    legacy = json.loads(Recipe().to_json())
    for key in ("winograd_min_channels", "winograd_kernels", "force_winograd"):
        del legacy[key]
    assert Recipe.from_json(json.dumps(legacy)).winograd_min_channels is None  # old checkpoints: every conv
