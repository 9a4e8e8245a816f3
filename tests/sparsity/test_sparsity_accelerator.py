"""The dataflow accelerator model on hand-computed layers, allocation and model mapping."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from winoq.sparsity.accelerator import (PLATFORMS, Folding, LayerSpec, allocate, bram36, get_platform, layer_bram,
                                        layer_cycles, layer_dsp, map_model, window_cycles)


def conv(c_in=4, c_out=8, h=6, k=3, h_in=None, bits=8, name="c"):
    h_in = h if h_in is None else h_in
    return LayerSpec(name, "conv", c_in, c_out, h_in, h_in, h, h, k=k, bits=bits)


def test_window_cycles_hand_computed():
    ws = [0.1, 0.2, 0.3, 0.2, 0.2]  # j = 0..4 non-zero products
    # ceil(j/2): j=0 -> 1 cycle (all-zero window), 1 -> 1, 2 -> 1, 3 -> 2, 4 -> 2
    assert window_cycles(ws, 2) == pytest.approx(0.1 + 0.2 + 0.3 + 0.4 + 0.4)
    assert window_cycles(ws, 2, skip_zero_windows=True) == pytest.approx(1.3)
    assert window_cycles(ws, 4) == pytest.approx(1.0)
    assert window_cycles([0, 0, 0, 0, 1.0], 3) == 2  # dense window of 4 taps at fine 3
    with pytest.raises(ValueError, match="fine"):
        window_cycles(ws, 0)


def test_dense_conv_cycles_and_dsp():
    spec = conv()  # 4 -> 8 channels, 3x3, 6x6 output
    fold = Folding(fine=3, coarse_in=2, coarse_out=4)
    # workload 36 * (4/2) * (8/4) = 144 windows, ceil(9/3) = 3 cycles each; stream max(72, 72)
    assert layer_cycles(spec, fold) == 432
    assert layer_dsp(spec, fold) == 12            # 3*2*4 multipliers, two per DSP at 8 bit
    assert layer_dsp(conv(bits=16), fold) == 24
    assert layer_cycles(spec, Folding()) == 36 * 4 * 8 * 9


def test_sparse_conv_cycles_use_the_histogram():
    spec = conv(c_in=2, c_out=2, h=4, k=2)
    ws = [0.5, 0.0, 0.5, 0.0, 0.0]  # half the windows empty, half with 2 non-zero products
    # fine 1: 0.5*1 + 0.5*2 = 1.5 cycles per window; workload 16 * 2 * 2 = 64 -> 96
    assert layer_cycles(spec, Folding(), ws) == pytest.approx(96)
    assert layer_cycles(spec, Folding(), ws, skip_zero_windows=True) == pytest.approx(64)
    # fine 2: every window one cycle -> 64, but the stream (16*2 words / lane) is smaller
    assert layer_cycles(spec, Folding(fine=2), ws) == pytest.approx(64)


def test_conv_is_at_least_its_streaming_time():
    # stride-2 1x1 conv: 10x10x4 in, 5x5x4 out, fully parallel: workload 25, stream 100
    spec = LayerSpec("s", "conv", 4, 4, 10, 10, 5, 5, k=1)
    assert layer_cycles(spec, Folding(1, 4, 4)) == 100


def test_linear_pool_eltwise_hand_computed():
    lin = LayerSpec("fc", "linear", 64, 10, 1, 1, 1, 1)
    assert layer_cycles(lin, Folding(1, 8, 5)) == 16
    assert layer_dsp(lin, Folding(1, 8, 5)) == 20
    assert layer_cycles(lin, Folding(1, 64, 10)) == 1
    pool = LayerSpec("gap", "pool", 64, 64, 8, 8, 1, 1, k=8)
    assert layer_cycles(pool, Folding(coarse_in=4)) == 8 * 8 * 64 / 4
    assert layer_dsp(pool, Folding(coarse_in=4)) == 0
    add = LayerSpec("add", "eltwise", 16, 16, 32, 32, 32, 32)
    assert layer_cycles(add, Folding(coarse_in=2)) == 32 * 32 * 16 / 2
    assert layer_dsp(add, Folding(coarse_in=2)) == 0


def test_bram36_counts():
    assert bram36(64, 8) == 0                # 512 bits: distributed RAM
    assert bram36(1024, 36) == 1             # one block as 1K x 36
    assert bram36(512, 72) == 1
    assert bram36(4096, 8) == 1              # 4K x 9
    assert bram36(2048, 36) == 2
    assert bram36(1000, 80) == 3             # 1K x 36 three wide; 512 x 72 would need 2 x 2
    # conv: 2*4 weight memories of 1 word... depth (4/2)(8/4)*ceil(9/3) = 12 words x 24 bits -> LUTRAM;
    # line buffers 2 lanes x 2 lines of 6*4/2 = 12 words -> LUTRAM
    assert layer_bram(conv(), Folding(3, 2, 4)) == 0
    big = LayerSpec("b", "conv", 64, 64, 8, 8, 8, 8, k=3)
    # one memory of 64*64*9 = 36864 words x 8 bit = 288 Kbit: 9 blocks as 4K x 9; line buffers
    # 2 x (8*64 = 512 words x 8 bit = 4 Kbit) -> 1 block each
    assert layer_bram(big, Folding()) == 9 + 2


def test_bram36_matches_brute_force():
    for depth in (100, 700, 3000, 9000):
        for width in (8, 16, 40):
            shapes = [(1, 32768), (2, 16384), (4, 8192), (9, 4096), (18, 2048), (36, 1024), (72, 512)]
            want = min(math.ceil(width / w) * math.ceil(depth / d) for w, d in shapes)
            assert bram36(depth, width) == (0 if depth * width <= 2048 else want)


def two_layer_pipeline():
    return [LayerSpec("a", "conv", 16, 16, 16, 16, 16, 16, k=3), LayerSpec("b", "conv", 16, 32, 16, 16, 8, 8, k=3,)]


def test_allocation_respects_budgets_and_grows_with_them():
    layers = two_layer_pipeline()
    prev = 0.0
    for frac in (0.01, 0.05, 0.2, 1.0):
        d = allocate(layers, "zcu102", dsp_fraction=frac)
        assert d.dsp <= int(2520 * frac) and d.bram <= 912
        assert d.throughput == pytest.approx(200e6 / max(d.cycles))
        assert d.latency_s == pytest.approx(sum(d.cycles) / 200e6)
        assert d.throughput >= prev
        prev = d.throughput
    # enough DSPs for full parallelism: every engine reaches its smallest cycle count
    full = allocate(layers, "u250")
    assert full.folding[0] == Folding(9, 16, 16) and full.cycles[0] == 16 * 16  # the stream bound
    assert full.bottleneck in ("a", "b")


def test_sparse_histograms_speed_up_at_equal_budget():
    layers = two_layer_pipeline()
    sparse = {"a": [0.3, 0.3, 0.2, 0.2] + [0.0] * 6, "b": [0.3, 0.3, 0.2, 0.2] + [0.0] * 6}
    dense = allocate(layers, "zcu102", dsp_fraction=0.05)
    fast = allocate(layers, "zcu102", histograms=sparse, dsp_fraction=0.05)
    assert fast.throughput > dense.throughput
    best = allocate(layers, "zcu102", histograms=sparse, best_per_dsp=True)
    assert best.throughput_per_dsp >= allocate(layers, "zcu102", histograms=sparse).throughput_per_dsp


def test_platforms_and_errors():
    assert get_platform("ZCU102").dsp == 2520 and get_platform("u250").dsp == 12288
    assert PLATFORMS["zcu102"].bram36 == 912 and PLATFORMS["u250"].bram36 == 2688
    with pytest.raises(ValueError, match="known platforms: zcu102, u250"):
        get_platform("vu9p")
    with pytest.raises(ValueError, match="dsp_fraction"):
        allocate(two_layer_pipeline(), "zcu102", dsp_fraction=0)
    with pytest.raises(ValueError, match="does not fit"):
        allocate([LayerSpec("huge", "conv", 512, 512, 64, 64, 64, 64, k=3, bits=16)] * 4, "zcu102")


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = F.relu(self.bn(self.conv1(x)))
        y = F.relu(self.conv2(y) + y)
        y = F.adaptive_avg_pool2d(self.pool(y), 1).flatten(1)
        return self.fc(y)


def test_map_model_finds_every_engine():
    specs = map_model(Block(), torch.zeros(1, 3, 8, 8))
    assert [(s.name, s.kind) for s in specs] == [("conv1", "conv"), ("conv2", "conv"), ("add", "eltwise"),
                                                 ("pool", "pool"), ("adaptive_avg_pool2d", "pool"), ("fc", "linear")]
    c2 = specs[1]
    assert (c2.c_in, c2.c_out, c2.h_out, c2.k) == (8, 8, 8, 3)
    assert (specs[3].h_in, specs[3].h_out, specs[3].k) == (8, 4, 2)


def test_map_model_names_the_layers_it_cannot_map():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.dw = nn.Conv2d(4, 4, 3, groups=4)
            self.up = nn.ConvTranspose2d(4, 4, 2)

        def forward(self, x):
            return torch.sigmoid(self.up(self.dw(x)))

    with pytest.raises(ValueError, match=r"dw \(Conv2d, groups=4\), up \(ConvTranspose2d\), sigmoid"):
        map_model(Bad(), torch.zeros(1, 4, 8, 8))
