"""Zero points on the dynamic activation scales (``Recipe.activation_zero_point``) and the
per-kernel-position weight scales of direct convs (``Recipe.direct_weight_scales``)."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import winoq
from winoq.granularity import CONV_INPUT, DirectGranularity, WinogradGranularity
from winoq.modules import QuantConv2d, QuantLinear
from winoq.quantizers import Granularity, compute_scale, fake_quantize, fake_quantize_dynamic
from winoq.recipe import Recipe
from winoq.winograd.quantized import QuantWinogradConv2d, StageFormats


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 70), g=st.sampled_from([1, 4, 32]), shift=st.floats(-3, 3),
       seed=st.integers(0, 2**16), fmt=st.sampled_from(["int8", "uint8", "int4"]))
def test_grouped_zero_point_path_equals_compute_scale(n, c, g, shift, seed, fmt):
    """The grouped hot path gives what ``compute_scale(symmetric=False)`` + ``fake_quantize`` give,
    and every group's range holds 0 exactly."""
    x = torch.randn(n, c, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift
    gran = Granularity("group", axis=1, group_size=g, shared_dims=(2,))
    got = fake_quantize_dynamic(x, fmt, gran, zero_point=True)
    scale, zp = compute_scale(x, fmt, gran, symmetric=False)
    torch.testing.assert_close(got, fake_quantize(x, fmt, scale, zp), rtol=0, atol=1e-12)
    assert torch.equal(fake_quantize_dynamic(torch.zeros_like(x), fmt, gran, zero_point=True), torch.zeros_like(x))
    # the error is at most half a step of the group's [min, max] range
    assert float((got - x).abs().max()) <= float(scale.max()) / 2 + 1e-9


def test_zero_points_halve_the_error_of_one_signed_inputs():
    x = F.silu(torch.randn(4, 64, 8, 8, generator=torch.Generator().manual_seed(0)))
    gran = DirectGranularity.make(32).input.granularity(CONV_INPUT)
    xv = x.reshape(4, 1, 64, 8, 8)
    err = {zp: float((fake_quantize_dynamic(xv, "int8", gran, zero_point=zp) - xv).pow(2).mean()) for zp in (False, True)}
    assert err[True] < err[False] / 2.5  # steps (max - min) / 255 instead of 2 max / 254, min ~ -0.28 after SiLU


def test_minifloat_formats_have_no_zero_points():
    with pytest.raises(ValueError, match="integer format"):
        fake_quantize_dynamic(torch.randn(4, 8), "fp8_e4m3", Granularity("group", axis=1, group_size=4), zero_point=True)


# --------------------------------------------------------------------------- the recipe
def test_recipe_resolves_and_validates_zero_points():
    assert Recipe().input_zero_points
    assert not Recipe(activations="fp8_e4m3").input_zero_points
    assert not Recipe(activation_ranges="static").input_zero_points
    assert not Recipe(kernel="int-cpu").input_zero_points and Recipe(kernel="cpu").input_zero_points
    assert not Recipe(activation_zero_point=False).input_zero_points
    assert "A:int8+zp" in Recipe().describe() and "+zp" not in Recipe(activation_zero_point=False).describe()
    for bad, match in [(dict(activations="fp8_e4m3"), "integer activation"), (dict(activation_ranges="static"), "static"),
                       (dict(kernel="int-cpu"), "int-cpu"), (dict(kernel="triton"), "triton")]:
        with pytest.raises(ValueError, match=match):
            Recipe(activation_zero_point=True, **bad)
    with pytest.raises(ValueError, match="activation_zero_point must be"):
        Recipe(activation_zero_point="yes")
    with pytest.raises(ValueError, match="direct_weight_scales"):
        Recipe(direct_weight_scales="per-tap")


def test_recipes_saved_before_the_fields_load_as_before():
    data = json.loads(Recipe().to_json())
    for key in ("activation_zero_point", "direct_weight_scales"):
        data.pop(key)
    old = Recipe.from_json(json.dumps(data))
    assert old.activation_zero_point is False and old.direct_weight_scales == "shared"
    assert Recipe.from_json(Recipe().to_json()) == Recipe()


# --------------------------------------------------------------------------- the layers
def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.SiLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 64, 10)).eval()


def quantized(recipe):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return winoq.quantize(net(), recipe, progress=False)


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("winograd", [None, 4])
def test_the_default_recipe_puts_zero_points_on_every_integer_input(winograd):
    qm = quantized(Recipe(winograd=winograd, learn_steps=2))
    layers = [m for m in qm.modules() if isinstance(m, (QuantConv2d, QuantLinear, QuantWinogradConv2d))]
    assert len(layers) == 4 and all(m.granularity.input.zero_point for m in layers)
    wino = [m for m in layers if isinstance(m, QuantWinogradConv2d)]
    assert len(wino) == (2 if winograd else 0) and all(m.granularity.v.zero_point for m in wino)
    assert not any(m.granularity.u.zero_point or m.granularity.m.zero_point for m in wino)
    sym = quantized(Recipe(winograd=winograd, learn_steps=2, activation_zero_point=False))
    assert not any(m.granularity.input.zero_point for m in sym.modules() if hasattr(m, "granularity"))
    with torch.no_grad():
        ref = net()(X)
        err = lambda q: float((q(X) - ref).pow(2).sum() / ref.pow(2).sum())  # noqa: E731
        assert err(qm) < err(sym)


def test_forward_integer_follows_the_emulation_with_zero_points():
    gen = torch.Generator().manual_seed(0)
    layer = QuantWinogradConv2d(32, 16, 3, 4, padding=1, formats=StageFormats(output="int16"), group_size=16).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen, dtype=torch.float64))
    layer.activation_zero_point = layer.input_tapwise = layer.weight_tapwise = True
    x = F.silu(torch.randn(2, 32, 9, 9, generator=gen, dtype=torch.float64))
    with torch.no_grad():
        emu, integer = layer.forward_emulated(x), layer.forward_integer(x)
    assert float((emu - integer).norm() / emu.norm()) < 1e-9


def test_integer_only_kernels_refuse_zero_point_models_when_switched():
    qm = quantized(Recipe(winograd=4, learn_steps=1))
    with pytest.raises(ValueError, match="zero points.*activation_zero_point=False"):
        winoq.set_kernel(qm, "int-cpu")
    winoq.set_kernel(qm, "cpu")  # the fixed-point kernel runs them
    sym = quantized(Recipe(winograd=4, learn_steps=1, activation_zero_point=False))
    winoq.set_kernel(sym, "int-cpu")
    with torch.no_grad():
        sym(X)


def test_direct_weight_scales_per_kernel_position():
    qm = quantized(Recipe(winograd=None))
    conv = qm[2]
    assert conv.granularity.weight.keeps("pixel")
    w, wq = conv.weight.detach(), conv.quantized_weight().detach()
    # one scale per (output channel, group of 32 inputs, ky, kx): every position's max maps to 127
    codes = wq / (w.abs().amax(dim=1, keepdim=True) / 127)
    assert torch.allclose(codes.abs().amax(dim=1), torch.full_like(codes[:, 0], 127.0), atol=1e-4)
    shared = quantized(Recipe(winograd=None, direct_weight_scales="shared"))[2]
    assert not shared.granularity.weight.keeps("pixel")
    err = lambda layer: float((layer.quantized_weight().detach() - w).pow(2).sum())  # noqa: E731
    assert err(conv) < err(shared)
    assert not qm[7].granularity.weight.keeps("pixel")  # linear weights: per output channel and group


def test_checkpoints_round_trip_the_new_granularities(tmp_path):
    qm = quantized(Recipe(winograd=4, learn_steps=1))
    path = tmp_path / "m.safetensors"
    winoq.save(qm, path)
    loaded = winoq.load(path, net())
    assert loaded[2].granularity == qm[2].granularity
    with torch.no_grad():
        assert torch.equal(loaded(X), qm(X))


def test_stage_granularity_table_names_the_zero_points():
    rows = dict(winoq.granularity.table())
    assert rows["direct conv input"].endswith("with a zero point")
    assert "zero point" not in rows["Winograd U"] and "zero point" not in rows["Winograd M"]
    assert WinogradGranularity.make(32, zero_point=True).v.zero_point
