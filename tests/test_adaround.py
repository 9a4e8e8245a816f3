"""Tests for winoq.algorithms.adaround: grid neighbours on integer and minifloat
grids (hand-made values and a property check), the soft-rounded weight, learned
rounding against round-to-nearest on small linear, conv and Winograd layers, and
the validation errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from winoq.algorithms.adaround import (
    AdaRoundWeight,
    learn_rounding,
    lies_on_grid,
    neighbours,
    reconstruction_loss,
    rectified_sigmoid,
    round_layer_weight,
    rounding_problem,
)
from winoq.formats import parse
from winoq.modules import QuantConv2d, QuantLinear
from winoq.quantizers import compute_scale, per_channel
from winoq.winograd.quantized import QuantWinogradConv2d, StageFormats

torch.set_num_threads(1)

FORMATS = ["int4", "int3", "uint4", "int8", "fp4_e2m1", "fp4_e3m0", "fp6_e3m2", "fp8_e4m3", "fp8_e5m2"]


def correlated(n: int, d: int, seed: int) -> torch.Tensor:
    """Inputs with correlated features (as real activations are): z @ A, A random."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=gen)
    mix = torch.randn(d, d, generator=gen) / d ** 0.5 + torch.eye(d)
    return z @ mix


def smooth_images(n: int, c: int, hw: int, seed: int) -> torch.Tensor:
    """Spatially correlated images (blurred noise)."""
    gen = torch.Generator().manual_seed(seed)
    return F.avg_pool2d(torch.randn(n, c, hw + 2, hw + 2, generator=gen), 3, 1)


# ----------------------------------------------------------------------------- neighbours
def test_neighbours_int4_hand_values():
    u = torch.tensor([-9.0, -8.0, -1.5, -0.2, 0.0, 0.5, 2.0, 2.7, 7.0, 7.9, 100.0])
    lo, hi = neighbours(u, "int4")
    assert lo.tolist() == [-8, -8, -2, -1, 0, 0, 2, 2, 7, 7, 7]
    assert hi.tolist() == [-8, -8, -1, 0, 0, 1, 2, 3, 7, 7, 7]


def test_neighbours_fp4_e2m1_hand_values():
    # grid: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and negatives
    u = torch.tensor([2.5, 4.5, -5.0, 0.2, 0.25, 3.0, -3.0, 7.0, -7.0, -0.0, 1.75, 5.999])
    lo, hi = neighbours(u, "fp4_e2m1")
    assert lo.tolist() == [2, 4, -6, 0, 0, 3, -3, 6, -6, 0, 1.5, 4]
    assert hi.tolist() == [3, 6, -4, 0.5, 0.5, 3, -3, 6, -6, 0, 2, 6]


def test_neighbours_fp4_e3m0_and_unsigned():
    lo, hi = neighbours(torch.tensor([0.3, 12.0, -0.1, 16.0]), "fp4_e3m0")  # 0, .25, .5, 1, 2, 4, 8, 16
    assert lo.tolist() == [0.25, 8, -0.25, 16] and hi.tolist() == [0.5, 16, 0, 16]
    lo, hi = neighbours(torch.tensor([-3.0, 2.5, 20.0]), "uint4")
    assert lo.tolist() == [0, 2, 15] and hi.tolist() == [0, 3, 15]


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(FORMATS), seed=st.integers(0, 2**16), spread=st.floats(0.1, 3.0))
def test_neighbours_bracket_and_adjacent(name, seed, spread):
    fmt = parse(name)
    grid = fmt.grid()
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(200, generator=gen, dtype=torch.float64) * spread * fmt.max_value / 2
    u[:8] = grid[torch.randint(0, grid.numel(), (8,), generator=gen)]  # some exactly on the grid
    lo, hi = neighbours(u, fmt)
    uc = u.clamp(float(grid[0]), float(grid[-1]))
    assert torch.isin(lo, grid).all() and torch.isin(hi, grid).all()
    assert (lo <= uc).all() and (uc <= hi).all()
    between = ((grid[None, :] > lo[:, None]) & (grid[None, :] < hi[:, None])).any(1)
    assert not between.any()
    assert torch.equal(lo[:8], u[:8]) and torch.equal(hi[:8], u[:8])
    nearest = fmt.round(u)
    assert ((nearest == lo) | (nearest == hi)).all()


def test_neighbours_rejects_nan_and_gridless_format():
    with pytest.raises(ValueError, match="NaN"):
        neighbours(torch.tensor([float("nan")]), "int4")
    with pytest.raises(ValueError, match="finite grid"):
        neighbours(torch.tensor([1.0]), object())
    with pytest.raises(ValueError, match="unknown number format"):
        neighbours(torch.tensor([1.0]), "int4x")


# ----------------------------------------------------------------------------- soft weight
@pytest.mark.parametrize("name", ["int4", "fp4_e2m1"])
def test_adaround_weight_starts_at_the_float_weight(name):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(16, 12, generator=gen)
    scale, _ = compute_scale(w, name, per_channel(0))
    ada = AdaRoundWeight(w, name, scale)
    assert torch.allclose(ada(hard=False), w, atol=1e-5)  # in range: h(V) is the fractional position
    lo, hi = neighbours(w / scale, name)
    frac = torch.where(hi > lo, (w / scale - lo) / (hi - lo).clamp_min(1e-12), torch.zeros_like(w))
    free = ada.free  # all but each row's max, which the scale puts on the grid (up to rounding)
    assert int((~free).sum()) >= 16
    assert torch.allclose(ada.h().detach()[free], frac[free], atol=1e-5)
    # hard: h >= 0.5 rounds up; at the start that is round-to-nearest (up to exact ties)
    hard = ada(hard=True)
    assert lies_on_grid(hard, name, scale)
    assert torch.equal(hard, torch.where(frac >= 0.5, hi, lo) * scale)


def test_rectified_sigmoid_and_regularizer():
    v = torch.tensor([-10.0, 0.0, 10.0])
    assert rectified_sigmoid(v).tolist() == pytest.approx([0.0, 0.5, 1.0])
    ada = AdaRoundWeight(torch.tensor([0.25, 0.5, 0.9, 3.0]), "int4", torch.tensor(1.0))
    with torch.no_grad():
        ada.V.copy_(torch.tensor([-10.0, 0.0, 10.0, 0.0]))
    # V = 0 on a free weight adds 1; the decided ones 0; the on-grid weight (3.0) never counts
    assert float(ada.regularizer(2.0).detach()) == pytest.approx(1.0)
    assert ada(hard=True).tolist() == [0.0, 1.0, 1.0, 3.0]
    assert ada.undecided_fraction() == pytest.approx(1 / 3)


def test_saturated_weights_stay_at_the_bound():
    w = torch.tensor([-20.0, -3.3, 0.4, 9.0])
    ada = AdaRoundWeight(w, "int4", torch.tensor(1.0))
    assert ada.lo.tolist() == [-8, -4, 0, 7] and ada.hi.tolist() == [-8, -3, 1, 7]
    assert ada.free.tolist() == [False, True, True, False]
    with torch.no_grad():
        ada.V.fill_(5.0)
    assert ada(hard=True).tolist() == [-8, -3, 1, 7]


def test_group_max_is_never_flipped():
    # a max-based scale maps each row's max onto max_value up to float rounding: it must stay there
    w = torch.tensor([[0.3, -0.71, 0.123], [1.1, 0.2, -0.05]])
    scale, _ = compute_scale(w, "int4", per_channel(0))
    ada = AdaRoundWeight(w, "int4", scale)
    assert ada.free.tolist() == [[True, False, True], [False, True, True]]
    with torch.no_grad():
        ada.V.fill_(-5.0)
    assert ada(hard=True).abs().amax(1).tolist() == pytest.approx([0.71, 1.1], rel=1e-6)


def test_generic_layer_fn_shape_error():
    w = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"inputs must be \(N, \.\.\.\)"):
        learn_rounding(w, "int4", torch.tensor(0.1), lambda x, wt: x @ wt.T, torch.randn(8, 5), torch.randn(8, 4))


def test_adaround_weight_validation():
    w = torch.randn(4, 3)
    with pytest.raises(ValueError, match="broadcast"):
        AdaRoundWeight(w, "int4", torch.ones(5, 1))
    with pytest.raises(ValueError, match="positive"):
        AdaRoundWeight(w, "int4", torch.zeros(4, 1))
    with pytest.raises(ValueError, match="floating-point"):
        AdaRoundWeight(torch.ones(4, dtype=torch.int64), "int4", torch.ones(()))


# ----------------------------------------------------------------------------- learning
def _linear_problem(fmt, seed=0):
    torch.manual_seed(seed)
    layer = QuantLinear.from_linear(nn.Linear(24, 16), fmt, None, None)
    return layer, correlated(256, 24, seed)


@pytest.mark.parametrize("fmt", ["int4", "fp4_e2m1"])
def test_learned_rounding_linear_beats_nearest_and_lies_on_grid(fmt):
    layer, x = _linear_problem(fmt)
    prob = rounding_problem(layer, x)
    wq, info = learn_rounding(prob.weight, prob.fmt, prob.scale, prob.layer_fn, prob.inputs, prob.target,
                              iters=500, lr=2e-2, return_info=True)
    assert lies_on_grid(wq, fmt, prob.scale)
    nearest = prob.scale * parse(fmt).round(prob.weight / prob.scale)
    # measured independently of the info dict
    with torch.no_grad():
        mse_nearest = float(reconstruction_loss(F.linear(x, nearest, layer.bias), prob.target))
        mse_learned = float(reconstruction_loss(F.linear(x, wq, layer.bias), prob.target))
    assert all(p.grad is None for p in layer.parameters())  # only the rounding variables were trained
    assert mse_learned < 0.9 * mse_nearest  # measured: 0.55x (int4), 0.60x (fp4_e2m1)
    assert info["loss_learned"] == pytest.approx(mse_learned, rel=1e-4)
    assert info["undecided"] < 0.05  # the regulariser has pushed h to 0 / 1
    # every weight moved at most to the other neighbour: never more than one grid step
    lo, hi = neighbours(prob.weight / prob.scale, fmt)
    assert ((wq == lo * prob.scale) | (wq == hi * prob.scale)).all()


def test_learned_rounding_conv_beats_nearest():
    torch.manual_seed(3)
    conv = nn.Conv2d(6, 8, 3, padding=1)
    layer = QuantConv2d.from_conv(conv, "int4", "int8", None)
    x = smooth_images(24, 6, 8, seed=3)
    wq, info = round_layer_weight(layer, x, "learned", iters=400)
    prob = rounding_problem(layer, x)
    assert lies_on_grid(wq, "int4", prob.scale)
    with torch.no_grad():
        mse_nearest = float(reconstruction_loss(layer(x), prob.target))  # the layer's own (nearest) rounding
        mse_learned = float(reconstruction_loss(prob.layer_fn(prob.inputs, wq), prob.target))
    assert mse_learned < 0.9 * mse_nearest  # measured: 0.50x
    assert info["loss_nearest"] == pytest.approx(mse_nearest, rel=1e-4)
    assert info["undecided"] < 0.05
    # the learned weights written back are a fixed point of the layer's own quantizer
    with torch.no_grad():
        layer.weight.copy_(wq)
    assert torch.allclose(layer.quantized_weight(), wq, rtol=1e-6, atol=0)


def test_learned_rounding_winograd_weights_beats_nearest():
    torch.manual_seed(4)
    conv = nn.Conv2d(4, 4, 3, padding=1)
    layer = QuantWinogradConv2d.from_conv(conv, 2, formats=StageFormats("int8", "int8", "int4", "int8"),
                                          group_size=None)
    x = smooth_images(8, 4, 8, seed=4)
    wq, info = round_layer_weight(layer, x, "learned", iters=300, batch=8)
    prob = rounding_problem(layer, x)
    assert wq.shape == (4, 4, 4, 4)  # U: (K, C, n, n)
    assert lies_on_grid(wq, "int4", prob.scale)
    # the layer with its own (nearest) U is what the learned U must beat
    with torch.no_grad():
        mse_nearest = float(reconstruction_loss(layer(x), prob.target))
        mse_learned = float(reconstruction_loss(prob.layer_fn(x, wq), prob.target))
    assert mse_learned < 0.9 * mse_nearest  # measured: 0.63x
    assert info["loss_nearest"] == pytest.approx(mse_nearest, rel=1e-4)
    assert "quantized_weight" not in layer.__dict__  # the temporary override is gone
    assert all(p.grad is None for p in layer.parameters())
    assert layer.bias.requires_grad


def test_nearest_mode_is_the_layers_own_rounding():
    layer, x = _linear_problem("fp4_e2m1", seed=2)
    wq, info = round_layer_weight(layer, x, "nearest")
    assert torch.equal(wq, layer.quantized_weight())
    assert info["loss_learned"] == info["loss_nearest"]


def test_learned_rounding_is_deterministic():
    layer, x = _linear_problem("int4", seed=5)
    a, _ = round_layer_weight(layer, x, "learned", iters=50)
    b, _ = round_layer_weight(layer, x, "learned", iters=50)
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- validation
def test_unknown_rounding_mode():
    layer, x = _linear_problem("int4")
    with pytest.raises(ValueError, match="rounding mode 'stochastic' unknown"):
        round_layer_weight(layer, x, "stochastic")


def test_wrong_input_shapes_name_the_expected_shape():
    layer, _ = _linear_problem("int4")
    with pytest.raises(ValueError, match=r"\(N, \.\.\., 24\)"):
        rounding_problem(layer, torch.randn(8, 23))
    conv = QuantConv2d.from_conv(nn.Conv2d(6, 8, 3), "int4", None, None)
    with pytest.raises(ValueError, match=r"\(N, 6, H, W\)"):
        rounding_problem(conv, torch.randn(2, 5, 8, 8))
    wino = QuantWinogradConv2d.from_conv(nn.Conv2d(4, 4, 3, padding=1), 2)
    with pytest.raises(ValueError, match=r"\(N, 4, H, W\)"):
        rounding_problem(wino, torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match="QuantConv2d, QuantLinear and QuantWinogradConv2d"):
        rounding_problem(nn.Linear(3, 3), torch.randn(2, 3))


def test_learn_rounding_argument_errors():
    layer, x = _linear_problem("int4")
    prob = rounding_problem(layer, x)
    args = (prob.weight, prob.fmt, prob.scale, prob.layer_fn)
    with pytest.raises(ValueError, match="same number N"):
        learn_rounding(*args, prob.inputs, prob.target[:10], iters=1)
    with pytest.raises(ValueError, match=r"expected target of shape \(N, 16\)"):
        learn_rounding(*args, prob.inputs, prob.target[:, :5], iters=1)
    with pytest.raises(ValueError, match="beta"):
        learn_rounding(*args, prob.inputs, prob.target, iters=1, beta=(2, 20))
    with pytest.raises(ValueError, match="warmup"):
        learn_rounding(*args, prob.inputs, prob.target, iters=1, warmup=1.0)
    unquantized = QuantLinear.from_linear(nn.Linear(4, 4), None, None, None)
    with pytest.raises(ValueError, match="nothing to round"):
        rounding_problem(unquantized, torch.randn(2, 4))
