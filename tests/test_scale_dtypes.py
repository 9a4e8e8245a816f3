"""Models in float16 / bfloat16 / float64 quantize with learned Winograd scales (learned in
float32, float64 for float64 models) and keep their dtype."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import winoq
from winoq import Recipe
from winoq.winograd.quantized import QuantWinogradConv2d
from winoq.winograd.scales import ScaleLearningConfig, learn_layer_scales


def model32() -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    m = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return m


def rel(y, ref) -> float:
    return float((y.double() - ref.double()).norm() / ref.double().norm())


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 0.01), (torch.bfloat16, 0.03), (torch.float64, 0.0)])
def test_model_dtype_is_kept_and_close_to_float32(dtype, tol, shared, one_thread):
    base = model32()
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    recipe = Recipe(winograd=4, learn_steps=3, shared_scales=shared)
    q32 = winoq.quantize(base, recipe, progress=False)
    qd = winoq.quantize(copy.deepcopy(base).to(dtype), recipe, progress=False)
    assert all(p.dtype == dtype for p in qd.parameters() if p.is_floating_point() and p.ndim > 1)
    with torch.no_grad():
        ref, y32, y = base(x), q32(x), qd(x.to(dtype))
    assert y.dtype == dtype
    err32 = rel(y32, ref)
    assert err32 < 0.3  # W8A8 F(4,3) with 16 input channels: about 15 dB
    assert rel(y, ref) < 1.15 * err32 + tol  # the other dtypes quantize as well, up to their own rounding


def test_scales_learned_on_a_half_layer_match_float32():
    conv = model32()[2]
    cfg = ScaleLearningConfig(steps=2, batch=1, tiles=2)
    l32 = QuantWinogradConv2d.from_conv(conv, 4)
    l16 = QuantWinogradConv2d.from_conv(copy.deepcopy(conv).half(), 4)
    info32, info16 = learn_layer_scales(l32, cfg), learn_layer_scales(l16, cfg)
    assert l16.weight.dtype == torch.float16
    # learned in float32 on the fp16-rounded weights: the same optimum up to that rounding
    torch.testing.assert_close(torch.tensor(info16["s_b"]), torch.tensor(info32["s_b"]), rtol=0.05, atol=0)
