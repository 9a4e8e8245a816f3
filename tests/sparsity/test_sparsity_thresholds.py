"""Thresholds, fixed-point quantization and the measured sparsity / window histograms."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from winoq.formats import IntFormat
from winoq.sparsity.thresholds import (Evaluator, SparsityConfig, _histogram_by_patterns, _histogram_direct,
                                       window_histogram)


class Tiny(nn.Module):
    """conv on signed input -> ReLU -> conv (ReLU-fed) -> ReLU -> pool -> linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, stride=2)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        y = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    model = Tiny().eval()
    x = torch.randn(24, 3, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)  # labels = the float model's own predictions: 100% at zero thresholds
    return model, x, y


def brute_histogram(x, w, stride, padding, dilation):
    """Every window counted with Python loops in float64."""
    x = F.pad(x.double(), (padding,) * 4)
    n, c, h, wd = x.shape
    f, _, k, _ = w.shape
    span = dilation * (k - 1) + 1
    hist = torch.zeros(c, k * k + 1, dtype=torch.float64)
    for i in range(0, h - span + 1, stride):
        for j in range(0, wd - span + 1, stride):
            patch = x[:, :, i:i + span:dilation, j:j + span:dilation] != 0      # [N, C, k, k]
            nz = (patch.unsqueeze(1) & (w != 0).unsqueeze(0)).sum((3, 4))        # [N, F, C]
            for cc in range(c):
                hist[cc] += torch.bincount(nz[:, :, cc].flatten(), minlength=k * k + 1).double()
    return hist


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 3), st.integers(0, 2), st.integers(1, 2), st.sampled_from([1, 2, 3]), st.integers(0, 10**6))
def test_window_histogram_matches_brute_force(stride, padding, dilation, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(2, 3, 7, 7, generator=g) - 0.2)
    w = torch.randn(4, 3, k, k, generator=g)
    w[w.abs() < 0.5] = 0
    conv = nn.Conv2d(3, 4, k, stride=stride, padding=padding, dilation=dilation)
    if (7 + 2 * padding - dilation * (k - 1)) < 1:
        return
    want = brute_histogram(x, w, stride, padding, dilation)
    for fn in (_histogram_by_patterns, _histogram_direct, window_histogram):
        hist, nz = fn(x, w, conv)
        assert torch.equal(hist, want)
        assert nz == float((want * torch.arange(k * k + 1)).sum())


def test_direct_counting_for_large_kernels():
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, 5, padding=2)
    x = torch.relu(torch.randn(1, 2, 6, 6))
    w = conv.weight.detach()
    assert torch.equal(window_histogram(x, w, conv)[0], brute_histogram(x, w, 1, 2, 1))


def test_zero_thresholds_float_is_the_model(tiny):
    model, x, y = tiny
    ev = Evaluator(model, x, y, bits=None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    e = ev.evaluate(ev.uniform(0.0, 0.0))
    assert e.accuracy == 100.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights put back
    assert ev.relu_fed == {"conv1": False, "conv2": True}
    s1 = e.layers["conv1"]
    assert s1.activation_sparsity == 0.0 and s1.weight_sparsity == 0.0
    # conv1: padding zeros only. Windows touching the 1-pixel border hold 3 or 5 padded taps
    t = 9
    assert s1.product_sparsity == pytest.approx(1 - float((s1.hist * torch.arange(t + 1)).sum(1).mean()) / t)
    assert s1.macs == 8 * 8 * 3 * 6 * 9
    assert e.layers["conv2"].macs == 4 * 4 * 6 * 6 * 9


def test_thresholds_act_as_specified(tiny):
    model, x, y = tiny
    ev = Evaluator(model, x, y, bits=None)
    tau_w, tau_a = 0.1, 0.3
    cfg = ev.config({"conv1": tau_w, "conv2": tau_w}, {"conv2": tau_a})
    got = ev.evaluate(cfg)

    # reference: the same network written out with the thresholds, float64
    m = model.double()
    w1 = m.conv1.weight * (m.conv1.weight.abs() >= tau_w)
    w2 = m.conv2.weight * (m.conv2.weight.abs() >= tau_w)
    xd = x.double()
    h = F.relu(F.conv2d(xd, w1, m.conv1.bias, padding=1))
    h = h * (h > tau_a)                                   # ReLU_tau
    h2 = F.relu(F.conv2d(h, w2, m.conv2.bias, stride=2, padding=1))
    ref = m.fc(F.adaptive_avg_pool2d(h2, 1).flatten(1)).argmax(1)
    model.float()
    assert got.accuracy == pytest.approx(100.0 * float((ref == y).double().mean()))
    assert got.layers["conv2"].activation_sparsity == pytest.approx(float((h == 0).double().mean()))
    assert got.layers["conv2"].weight_sparsity == pytest.approx(float((w2 == 0).double().mean()))
    assert got.layers["conv1"].weight_sparsity == pytest.approx(float((w1 == 0).double().mean()))


def test_quantization_adds_zeros_and_uses_project_quantizers(tiny):
    model, x, y = tiny
    e8 = Evaluator(model, x, y, bits=8)
    e16 = Evaluator(model, x, y, bits=16)
    s8 = e8.evaluate(e8.uniform(0.0, 0.0)).layers["conv2"]
    s16 = e16.evaluate(e16.uniform(0.0, 0.0)).layers["conv2"]
    assert s8.activation_sparsity >= s16.activation_sparsity
    info = e8.infos[1]
    # ReLU-fed input: unsigned 8-bit, static scale = calibration max / 255
    with torch.no_grad():
        a = F.relu(model.conv1(x))
    assert info.input_scale == pytest.approx(float(a.max()) / IntFormat(8, signed=False).max_value)
    # 8-bit weights: at most 255 levels per output channel
    from winoq.sparsity.thresholds import sparse_weight
    w = sparse_weight(info, 0.0, 8)
    for row in w.flatten(1):
        assert len(torch.unique(row)) <= 255


def test_bad_thresholds_are_clear_errors(tiny):
    model, x, y = tiny
    ev = Evaluator(model, x, y, bits=8)
    with pytest.raises(ValueError, match="out of range.*>= 0"):
        SparsityConfig({"conv1": -0.1}, {})
    with pytest.raises(ValueError, match="out of range"):
        SparsityConfig({}, {"conv2": math.nan})
    with pytest.raises(ValueError, match="bits must be one of"):
        SparsityConfig({}, {}, bits=4)
    with pytest.raises(ValueError, match=r"unknown conv layers \['convX'\]"):
        ev.evaluate(ev.config({"convX": 0.1}))
    with pytest.raises(ValueError, match=r"not ReLU-fed.*\['conv1'\]"):
        ev.evaluate(ev.config({}, {"conv1": 0.1}))
    with pytest.raises(ValueError, match="would zero the whole layer"):
        ev.evaluate(ev.config({"conv2": 10.0}))
    with pytest.raises(ValueError, match="labels"):
        Evaluator(model, x, y[:3])
