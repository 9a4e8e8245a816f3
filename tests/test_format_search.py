"""Tests for winoq.algorithms.format_search: the ExMy split chosen for a weight
tensor against an independent computation of every candidate's error, the bias
search without scaling, layer-output errors and the validation errors."""
from __future__ import annotations

import pytest
import torch

from winoq.algorithms.format_search import fp_splits, search_fp_format
from winoq.formats import FloatFormat, parse
from winoq.quantizers import fake_quantize, per_channel, per_group, per_tensor

torch.set_num_threads(1)


def gaussian(shape, seed=0, std=0.05):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * std


def weight_mse(w, fmt, gran) -> float:
    """Independent reference: max-based scales computed here, then the MSE."""
    if gran.kind == "tensor":
        amax = w.abs().max()
    else:
        amax = w.abs().amax(dim=1, keepdim=True)
    q = fmt.round(w / (amax / fmt.max_value)) * (amax / fmt.max_value)
    return float((q - w).double().pow(2).mean())


def test_splits():
    assert fp_splits(4) == [(1, 2), (2, 1), (3, 0)]
    assert (4, 3) in fp_splits(8) and (5, 2) in fp_splits(8) and (3, 4) in fp_splits(8)
    assert len(fp_splits(3)) == 2


@pytest.mark.parametrize("gran", [per_tensor(), per_channel(0)], ids=["tensor", "channel"])
def test_gaussian_4bit_prefers_e2m1_over_e3m0(gran):
    w = gaussian((128, 64))
    e2m1, e3m0, e1m2 = (FloatFormat(e, m, special="finite") for e, m in [(2, 1), (3, 0), (1, 2)])
    ref = {f.name: weight_mse(w, f, gran) for f in (e2m1, e3m0, e1m2)}
    # measured (std 0.05): per tensor e2m1 3.7e-5 < e1m2 7.0e-5 < e3m0 9.2e-5;
    # per channel (rows of 64) e2m1 2.8e-5 < e1m2 3.0e-5 < e3m0 8.8e-5
    assert ref["fp4_e2m1"] < ref["fp4_e3m0"]
    fmt, scale, err, table = search_fp_format(w, 4, gran, return_table=True)
    best = min(ref, key=ref.get)
    assert fmt.name == best and fmt == parse(best)
    assert err == pytest.approx(ref[best], rel=1e-5)
    assert dict(table)[fmt.name] == pytest.approx(err)
    assert {n for n, _ in table} == set(ref)
    # the returned scale quantizes w to the reported error, and maps each max to max_value
    assert float((fake_quantize(w, fmt, scale) - w).double().pow(2).mean()) == pytest.approx(err, rel=1e-6)
    if gran.kind == "channel":
        assert scale.shape == (128, 1)
    assert torch.allclose(scale * fmt.max_value, w.abs().amax(dim=None if gran.kind == "tensor" else 1,
                                                              keepdim=gran.kind != "tensor"))


def test_restricted_candidates_and_8_bits():
    w = gaussian((64, 64), seed=1)
    fmt, _, err = search_fp_format(w, 4, candidates=["fp4_e2m1", (3, 0)])
    assert fmt.name == "fp4_e2m1"
    assert err == pytest.approx(weight_mse(w, fmt, per_tensor()), rel=1e-5)
    fmt8, _, _ = search_fp_format(w, 8, candidates=[(4, 3), (5, 2), (3, 4)])
    ref = {f: weight_mse(w, FloatFormat(*f, special="finite"), per_tensor()) for f in [(4, 3), (5, 2), (3, 4)]}
    assert (fmt8.exp_bits, fmt8.man_bits) == min(ref, key=ref.get)
    assert fmt8.bits == 8 and fmt8.special == "finite"


def test_bias_is_absorbed_by_max_scaling():
    w = gaussian((32, 32), seed=2)
    _, _, _, table = search_fp_format(w, 4, candidates=[(2, 1)], biases=[-1, 0, 1, 2], return_table=True)
    errs = [e for _, e in table]
    assert len(errs) == 4 and max(errs) == pytest.approx(min(errs), rel=1e-9)


def test_bias_search_without_scaling():
    w = gaussian((64, 64), seed=3)  # max|w| about 0.2
    fmt, scale, err, table = search_fp_format(w, 4, scaling="none", return_table=True)
    assert float(scale) == 1.0
    assert err == pytest.approx(min(e for _, e in table))
    assert err == pytest.approx(float((fmt.round(w) - w).double().pow(2).mean()), rel=1e-6)
    assert parse(fmt.name) == fmt and fmt.bias != (1 << (fmt.exp_bits - 1)) - 1  # the default range is far too wide
    # without saturation the chosen format covers max|w|
    fmt_ns, _, _ = search_fp_format(w, 4, scaling="none", saturate=False)
    assert fmt_ns.max_value >= float(w.abs().max())


def test_output_metric_uses_layer_fn():
    w = gaussian((16, 32), seed=4)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(5))

    def layer_fn(inp, wt):
        return inp @ wt.T

    fmt, scale, err, table = search_fp_format(w, 4, per_channel(0), layer_fn=layer_fn, inputs=x, return_table=True)
    ref = float((layer_fn(x, fake_quantize(w, fmt, scale)) - layer_fn(x, w)).double().pow(2).mean())
    assert err == pytest.approx(ref, rel=1e-6)
    assert err == pytest.approx(min(e for _, e in table))


def test_group_granularity_scales():
    w = gaussian((8, 64), seed=6)
    fmt, scale, _ = search_fp_format(w, 6, per_group(16, axis=1))
    assert fmt.bits == 6 and scale.shape == w.shape  # one scale per group, expanded along the group


@pytest.mark.parametrize("bits", [2, 9, 4.0, True])
def test_bits_out_of_range(bits):
    with pytest.raises(ValueError, match=r"bits must be an int in 3\.\.8"):
        search_fp_format(gaussian((4, 4)), bits)


def test_unrepresentable_range_without_saturation_names_the_fix():
    w = gaussian((8, 8)) * 1e3
    with pytest.raises(ValueError, match="saturate=True"):
        search_fp_format(w, 4, candidates=["fp4_e2m1"], biases=[5, 6], scaling="none", saturate=False)


def test_argument_errors():
    w = gaussian((8, 8))
    with pytest.raises(ValueError, match="has 8 bits, not the requested 4"):
        search_fp_format(w, 4, candidates=["fp8_e4m3"])
    with pytest.raises(ValueError, match="integer format"):
        search_fp_format(w, 4, candidates=["int4"])
    with pytest.raises(ValueError, match="metric"):
        search_fp_format(w, 4, metric="kl")
    with pytest.raises(ValueError, match="scaling"):
        search_fp_format(w, 4, scaling="pow3")
    with pytest.raises(ValueError, match="per-tensor"):
        search_fp_format(w, 4, per_channel(0), scaling="none")
    with pytest.raises(ValueError, match="both layer_fn and inputs"):
        search_fp_format(w, 4, layer_fn=lambda x, y: x)
    with pytest.raises(ValueError, match="NaN"):
        search_fp_format(torch.tensor([1.0, float("nan")]), 4)


# --------------------------------------------------------------------------- Recipe(format_search=...)
def _recipe_model():
    import torch.nn as nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.Flatten(),
                         nn.Linear(8 * 36, 4))


@pytest.mark.parametrize("mode,winograd", [("weight", None), ("weight", 4), ("output", 4)])
def test_recipe_format_search_picks_the_best_split_per_layer(mode, winograd, tmp_path):
    import winoq
    from winoq.modules import QuantConv2d
    from winoq.winograd.quantized import QuantWinogradConv2d

    model = _recipe_model()
    x = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    recipe = winoq.Recipe(winograd_min_channels=None, weights="fp4_e2m1", winograd=winograd, format_search=mode, learn_steps=0)
    qm = winoq.quantize(model, recipe, progress=False, calib_data=x if mode == "output" else None)
    for rep in qm.winoq_report:
        errs = rep.calibration["format_errors"]
        assert set(errs) == {"fp4_e1m2", "fp4_e2m1", "fp4_e3m0"}
        assert rep.calibration["weight_format"] == min(errs, key=errs.get)
        mod = qm.get_submodule(rep.name)
        got = mod.formats.weight if isinstance(mod, QuantWinogradConv2d) else mod.weight_format
        assert got.name == rep.calibration["weight_format"]
    assert isinstance(qm[0], QuantWinogradConv2d if winograd else QuantConv2d)
    path = tmp_path / "f.safetensors"
    winoq.save(qm, path)
    with torch.no_grad():
        assert torch.equal(winoq.load(path, model)(x), qm(x))


def test_recipe_format_search_needs_fp_weights_and_data_for_output():
    import winoq

    with pytest.raises(ValueError, match="integer format"):
        winoq.Recipe(weights="int4", format_search="weight")
    with pytest.raises(ValueError, match="format_search"):
        winoq.Recipe(weights="fp4_e2m1", format_search="best")
    with pytest.raises(ValueError, match="calib_data"):
        winoq.quantize(_recipe_model(), winoq.Recipe(weights="fp4_e2m1", format_search="output"), progress=False)
