"""Tests for winoq.winograd.conv: WinogradConv2d against F.conv2d in float64 and
the eligibility rules."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from winoq.winograd import WinogradConv2d, is_winograd_eligible, winograd_ineligibility, winograd_or_direct
from winoq.winograd.conv import conv_padding

SETTINGS = settings(max_examples=40, deadline=None)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).detach().norm() / ref.detach().norm().clamp_min(1e-300))


@st.composite
def conv_cases(draw):
    r = draw(st.sampled_from([3, 5]))
    m = draw(st.sampled_from([2, 4, 6]))
    group_kind = draw(st.sampled_from(["one", "two", "depthwise"]))
    if group_kind == "one":
        groups, c, k = 1, draw(st.integers(1, 8)), draw(st.integers(1, 8))
    elif group_kind == "two":
        groups, c, k = 2, 2 * draw(st.integers(1, 4)), 2 * draw(st.integers(1, 4))
    else:
        c = draw(st.integers(1, 8))
        groups, k = c, c * draw(st.integers(1, 2))
    pad_kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    if pad_kind == "int":
        padding = draw(st.integers(0, 3))
        ph = pw = padding
    elif pad_kind == "tuple":
        ph, pw = draw(st.integers(0, 3)), draw(st.integers(0, 3))
        padding = (ph, pw)
    elif pad_kind == "same":
        padding, ph, pw = "same", r // 2, r // 2
    else:
        padding, ph, pw = "valid", 0, 0
    h = draw(st.integers(max(1, r - 2 * ph), 15))
    w = draw(st.integers(max(1, r - 2 * pw), 15))
    nb = draw(st.integers(1, 2))
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(r=r, m=m, groups=groups, c=c, k=k, padding=padding, h=h, w=w, nb=nb, bias=bias, seed=seed)


def make_conv(case, dtype=torch.float64) -> nn.Conv2d:
    gen = torch.Generator().manual_seed(case["seed"])
    conv = nn.Conv2d(case["c"], case["k"], case["r"], padding=case["padding"], bias=case["bias"],
                     groups=case["groups"], dtype=dtype)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen, dtype=dtype))
        if conv.bias is not None:
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen, dtype=dtype))
    return conv


@SETTINGS
@given(conv_cases())
def test_matches_conv2d_in_float64(case):
    conv = make_conv(case)
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    x = torch.randn(case["nb"], case["c"], case["h"], case["w"], generator=gen, dtype=torch.float64)
    layer = WinogradConv2d.from_conv(conv, case["m"])
    assert layer.weight.dtype == torch.float64
    assert (layer.bias is None) == (not case["bias"])
    y = layer(x)
    ref = F.conv2d(x, conv.weight, conv.bias, padding=case["padding"], groups=case["groups"])
    assert y.shape == ref.shape
    assert y.dtype == torch.float64
    assert rel_err(y, ref) < 1e-10, case


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("m", [2, 4])
def test_padding_modes(mode, m):
    gen = torch.Generator().manual_seed(5)
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode=mode, dtype=torch.float64)
    x = torch.randn(2, 3, 7, 9, generator=gen, dtype=torch.float64)
    layer = WinogradConv2d.from_conv(conv, m)
    assert rel_err(layer(x), conv(x)) < 1e-10


def test_float32_is_close(seed):
    gen = torch.Generator().manual_seed(2)
    conv = nn.Conv2d(4, 5, 3, padding=1)
    x = torch.randn(1, 4, 10, 10, generator=gen)
    layer = WinogradConv2d.from_conv(conv, 4)
    assert layer.weight.dtype == torch.float32
    assert rel_err(layer(x), conv(x)) < 1e-5


def test_from_conv_copies_parameters_and_does_not_alias(seed):
    conv = nn.Conv2d(3, 4, 3, padding=1)
    layer = WinogradConv2d.from_conv(conv, 2)
    assert torch.equal(layer.weight, conv.weight) and torch.equal(layer.bias, conv.bias)
    with torch.no_grad():
        layer.weight.zero_()
    assert conv.weight.abs().sum() > 0


def test_gradients_match_conv2d():
    gen = torch.Generator().manual_seed(7)
    conv = nn.Conv2d(3, 4, 3, padding=1, dtype=torch.float64)
    layer = WinogradConv2d.from_conv(conv, 4)
    x = torch.randn(2, 3, 6, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(2, 4, 6, 7, generator=gen, dtype=torch.float64)
    gx_ref, gw_ref = torch.autograd.grad((conv(x) * gy).sum(), (x, conv.weight))
    gx, gw = torch.autograd.grad((layer(x) * gy).sum(), (x, layer.weight))
    assert rel_err(gx, gx_ref) < 1e-10 and rel_err(gw, gw_ref) < 1e-10


@pytest.mark.parametrize(
    "conv,reason",
    [
        (nn.Conv2d(4, 4, 3, stride=2, padding=1), "stride"),
        (nn.Conv2d(4, 4, 3, dilation=2, padding=2), "dilation"),
        (nn.Conv2d(4, 4, 1), "1x1"),
        (nn.Conv2d(4, 4, (3, 5), padding=1), "square"),
        (nn.Conv2d(4, 4, 3, stride=(1, 2), padding=1), "stride"),
    ],
)
def test_ineligible_convs(conv, reason):
    assert not is_winograd_eligible(conv)
    why = winograd_ineligibility(conv)
    assert why is not None and reason in why
    with pytest.raises(ValueError, match="cannot make a Winograd conv"):
        WinogradConv2d.from_conv(conv, 4)
    with pytest.warns(UserWarning, match="stays a direct conv"):
        assert winograd_or_direct(conv, 4) is conv


def test_non_conv_is_ineligible():
    assert not is_winograd_eligible(nn.Linear(3, 3))
    assert "not an nn.Conv2d" in winograd_ineligibility(nn.Linear(3, 3))


@pytest.mark.parametrize("k", [2, 3, 5, 7])
def test_eligible_convs(k):
    conv = nn.Conv2d(2, 2, k, padding=1)
    assert is_winograd_eligible(conv)
    assert winograd_ineligibility(conv) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(winograd_or_direct(conv, 2), WinogradConv2d)


def test_wrong_input_shape_raises():
    layer = WinogradConv2d(4, 4, 3, 2, padding=1)
    with pytest.raises(ValueError, match="expects"):
        layer(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError):
        layer(torch.randn(4, 8, 8))


def test_input_smaller_than_kernel_raises():
    layer = WinogradConv2d(2, 2, 5, 2, padding=0)
    with pytest.raises(ValueError, match="smaller"):
        layer(torch.randn(1, 2, 4, 8))


def test_constructor_checks_groups():
    with pytest.raises(ValueError, match="divisible"):
        WinogradConv2d(3, 4, 3, 2, groups=2)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("k", [2, 4])
def test_even_kernels_with_same_padding(k):
    gen = torch.Generator().manual_seed(k)
    conv = nn.Conv2d(2, 3, k, padding="same", dtype=torch.float64)
    x = torch.randn(1, 2, 7, 6, generator=gen, dtype=torch.float64)
    layer = WinogradConv2d.from_conv(conv, 3)
    assert rel_err(layer(x), conv(x)) < 1e-10


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_conv_padding_same_matches_pytorch(k):
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(1, 1, 6, 7, generator=gen, dtype=torch.float64)
    w = torch.randn(1, 1, k, k, generator=gen, dtype=torch.float64)
    manual = F.conv2d(F.pad(x, conv_padding("same", k)), w)
    torch.testing.assert_close(manual, F.conv2d(x, w, padding="same"), rtol=1e-12, atol=1e-12)
    assert conv_padding("valid", k) == (0, 0, 0, 0)
    assert conv_padding((1, 2), k) == (2, 2, 1, 1)
