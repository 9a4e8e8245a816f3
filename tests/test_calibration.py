"""Calibration data forms (winoq.calibration), static activation ranges
(Recipe(activation_ranges="static"), winoq.quantizers.StaticRanges) and the errors of
calibration on bad data."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import winoq
from winoq import Recipe
from winoq.calibration import capture_layer_inputs, run_calibration
from winoq.diffusion import CalibrationSet
from winoq.formats import parse
from winoq.modules import QuantConv2d
from winoq.quantizers import CLIP_RATIOS, StaticRanges
from winoq.winograd.quantized import QuantWinogradConv2d


# the paper's Winograd-domain scales (shared by the taps, 8-bit M), where static and dynamic ranges compare
PAPER = dict(winograd_input_scales="shared", winograd_weight_scales="shared", winograd_output_format=None)


def tiny_cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 4))


class TwoInput(nn.Module):
    """A UNet-like signature: model(x, t[, y])."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Linear(1, 4)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.calls = []

    def forward(self, x, t, y=None):
        self.calls.append((tuple(x.shape), tuple(t.shape), None if y is None else tuple(y.shape)))
        h = x + self.emb(t.float()[:, None])[:, :, None, None]
        return self.conv(h)


def images(n=4, seed=1, c=3, hw=8):
    return torch.randn(n, c, hw, hw, generator=torch.Generator().manual_seed(seed))


def q(model, recipe, **kw):
    return winoq.quantize(model, recipe, progress=False, **kw)


# --------------------------------------------------------------------------- forms
@pytest.mark.parametrize("form", ["tensor", "list", "pairs", "dicts", "callable"])
def test_every_calibration_form_reaches_the_layers(form):
    model = tiny_cnn()
    x = images(6)
    data = {"tensor": x, "list": [x[:3], x[3:]], "pairs": [(x[:3], torch.zeros(3)), (x[3:], torch.ones(3))],
            "dicts": [{"input": x[:3]}, {"input": x[3:]}], "callable": lambda m: m(x)}[form]
    got = capture_layer_inputs(model, ["0", "4"], data)
    assert torch.equal(got["0"], x)
    assert got["4"].shape == (6, 128)


def test_calibration_set_calls_the_model_with_x_t_y():
    model = TwoInput()
    cal = CalibrationSet(images(5, c=4), torch.arange(5), torch.arange(5) % 2)
    assert run_calibration(model, cal) == 5
    assert model.calls == [((5, 4, 8, 8), (5,), (5,))]
    model.calls.clear()
    run_calibration(model, CalibrationSet(images(3, c=4), torch.arange(3), None))
    assert model.calls == [((3, 4, 8, 8), (3,), None)]


def test_max_samples_stops_early():
    model = TwoInput()
    cal = CalibrationSet(images(200, c=4), torch.arange(200), None)
    assert run_calibration(model, cal, max_samples=64) == 64  # batches of 64
    assert len(model.calls) == 1


def test_wrong_shape_names_the_batch_and_the_fix():
    with pytest.raises(ValueError, match=r"batch 0 \(tensor\(2, 5, 8, 8\)\).*calib_data must"):
        run_calibration(tiny_cnn(), images(2, c=5))


@pytest.mark.parametrize("bad", ["some/path", 3, [], [object()]])
def test_unusable_calibration_data_is_named(bad):
    with pytest.raises(ValueError, match="calib_data|calibration"):
        run_calibration(tiny_cnn(), bad)


def test_learned_rounding_on_a_two_input_model():
    model = TwoInput()
    cal = CalibrationSet(images(8, c=4), torch.arange(8), None)
    qm = q(model, Recipe(weights="int4", winograd=None, rounding="learned", rounding_iters=20), calib_data=cal)
    assert all("rounding" in r.calibration for r in qm.winoq_report)


# --------------------------------------------------------------------------- static ranges
def test_static_ranges_unit():
    torch.manual_seed(0)
    x = torch.randn(4, 6, 5, 5)
    r = StaticRanges()
    fmt = parse("int8")
    assert r("input", x, fmt, 1, 4, (1,)) is x  # observing: pass through
    r("input", 3 * x, fmt, 1, 4, (1,))
    amax = getattr(r, "amax_input")
    assert amax.shape == (1, 2, 1, 1, 1)  # (sample, group, in-group, h, w) in the grouped view
    assert torch.allclose(amax.flatten(), torch.stack([3 * x[:, :4].abs().max(), 3 * x[:, 4:].abs().max()]))
    r.mode = "search"
    r("input", x, fmt, 1, 4, (1,))
    ratios = r.freeze()
    assert ratios["input"] in CLIP_RATIOS
    y = r("input", x, fmt, 1, 4, (1,))
    scale = amax.flatten() * ratios["input"] / fmt.max_value
    codes = y[:, :4] / scale[0]
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 127


def test_static_ranges_before_calibration_is_an_error():
    r = StaticRanges()
    r.mode = "frozen"
    with pytest.raises(RuntimeError, match="never calibrated"):
        r("input", torch.randn(2, 3), "int8", -1, None, (-1,))


@pytest.mark.parametrize("winograd", [None, 4])
def test_static_recipe_quantizes_close_and_is_batch_independent(winograd, tmp_path):
    model = tiny_cnn()
    cal = [images(8, seed=s) for s in range(3)]
    qm = q(model, Recipe(winograd_min_channels=None, winograd=winograd, activation_ranges="static", learn_steps=0, **PAPER), calib_data=cal)
    layers = [m for m in qm.modules() if isinstance(m, (QuantConv2d, QuantWinogradConv2d))]
    assert all(m.act_ranges is not None and m.act_ranges.mode == "frozen" for m in layers)
    x = images(4, seed=9)
    with torch.no_grad():
        ref, y = model(x), qm(x)
        y_single = torch.cat([qm(x[i:i + 1]) for i in range(4)])
    assert torch.allclose(y, y_single, atol=1e-5)  # static scales: a sample's result ignores its batch-mates
    # like for like: static ranges are symmetric, so the dynamic reference is too
    dynamic = q(model, Recipe(winograd_min_channels=None, winograd=winograd, learn_steps=0, activation_zero_point=False,
                              **PAPER))
    with torch.no_grad():
        err_dynamic = (dynamic(x) - ref).pow(2).sum() / ref.pow(2).sum()
    assert ((y - ref).pow(2).sum() / ref.pow(2).sum()) < max(2 * err_dynamic, 0.01)
    path = tmp_path / "q.safetensors"
    winoq.save(qm, path)
    loaded = winoq.load(path, model)
    with torch.no_grad():
        assert torch.equal(loaded(x), y)
    stages = qm.winoq_report[0].calibration["static_clip_ratios"]
    assert set(stages) == ({"input"} if winograd is None else {"input", "v", "m"})


def test_static_winograd_layer_refuses_the_integer_twin_and_stays_emulated():
    qm = q(tiny_cnn(), Recipe(winograd_min_channels=None, winograd=4, activation_ranges="static", learn_steps=0), calib_data=images(4))
    with pytest.raises(ValueError, match="static ranges"):
        qm[0].forward_integer(images(1))
    x = images(2, seed=3)
    with torch.no_grad():
        y = qm(x)
        with pytest.warns(UserWarning, match="static activation ranges"):
            winoq.set_kernel(qm, "int-cpu")
        assert torch.equal(qm(x), y)


def test_static_on_a_two_input_model_with_a_calibration_set():
    model = TwoInput()
    cal = CalibrationSet(images(16, c=4), torch.arange(16) * 60, None)
    qm = q(model, Recipe(winograd_min_channels=None, winograd=4, activation_ranges="static", learn_steps=0), calib_data=cal)
    with torch.no_grad():
        ref, y = model(cal.x[:4], cal.t[:4]), qm(cal.x[:4], cal.t[:4])
    assert ((y - ref).pow(2).sum() / ref.pow(2).sum()) < 0.05


@pytest.mark.parametrize("recipe", [Recipe(activation_ranges="static"), Recipe(rounding="learned")])
def test_recipes_needing_data_fail_before_any_work(recipe, monkeypatch):
    import winoq.api as api

    monkeypatch.setattr(api, "_calibrate", lambda *a, **k: pytest.fail("calibrated before checking the data"))
    with pytest.raises(ValueError, match="calib_data"):
        q(tiny_cnn(), recipe)


def test_static_recipe_validation():
    with pytest.raises(ValueError, match="activation_ranges"):
        Recipe(activation_ranges="percentile")
    assert "static-ranges" in Recipe(activation_ranges="static").describe()


# --------------------------------------------------------------------------- non-finite
def test_non_finite_activations_during_static_calibration_name_the_layer():
    model = tiny_cnn()
    bad = images(2)
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"layer '0'"):
        q(model, Recipe(winograd=None, activation_ranges="static"), calib_data=bad)


def test_non_finite_outputs_while_learning_scales_name_the_layer():
    model = tiny_cnn()
    with torch.no_grad():
        model[2].weight.mul_(0)
        model[0].weight.fill_(3e38)  # finite weights whose conv overflows float32
    with pytest.raises(FloatingPointError, match=r"layer '0'.*non-finite"):
        q(model, Recipe(winograd_min_channels=None, winograd=4))


# --------------------------------------------------------------------------- block reconstruction via the Recipe
class ResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(torch.relu(self.conv1(x)))


def res_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ResBlock(8), ResBlock(8), nn.Flatten(), nn.Linear(8 * 64, 3))


@pytest.mark.parametrize("winograd", [None, 4])
def test_block_reconstruction_recipe(winograd, tmp_path):
    model = res_net()
    cal = images(16)
    recipe = Recipe(winograd_min_channels=None, weights="int4", winograd=winograd, scales="standard" if winograd else "learned",
                    rounding="learned", rounding_iters=60, reconstruction="block")
    qm = q(model, recipe, calib_data=cal)
    rounding = {r.name: r.calibration["rounding"] for r in qm.winoq_report}
    assert rounding["1.conv1"]["block"] == "1" and rounding["2.conv2"]["block"] == "2"
    assert "block" not in rounding["0"] and "block" not in rounding["4"]  # loose layers: layer-wise
    assert rounding["1.conv1"]["loss_learned"] < rounding["1.conv1"]["loss_nearest"]
    path = tmp_path / "b.safetensors"
    winoq.save(qm, path)
    x = images(2, seed=5)
    with torch.no_grad():
        assert torch.equal(winoq.load(path, model)(x), qm(x))


def test_reconstruction_must_be_known():
    with pytest.raises(ValueError, match="reconstruction"):
        Recipe(reconstruction="network")


def test_static_stage_filter_falls_back_to_dynamic():
    model = tiny_cnn()
    recipe = Recipe(winograd_min_channels=None, winograd=4, learn_steps=0, activation_zero_point=False)  # as static ranges
    dynamic = q(model, recipe)
    static = q(model, recipe.replace(activation_ranges="static"), calib_data=images(8))
    x = images(2, seed=4)
    for mod in static.modules():
        if getattr(mod, "act_ranges", None) is not None:
            mod.act_ranges.stages = set()  # no stage static: exactly the dynamic model
    with torch.no_grad():
        assert torch.equal(static(x), dynamic(x))
        static[0].act_ranges.stages = {"m"}
        assert not torch.equal(static(x), dynamic(x))


def test_static_ranges_and_learned_rounding_on_a_diffusers_unet_with_dict_batches():
    pytest.importorskip("diffusers")
    from winoq.diffusion.diffusers_support import build_unet2d, unet2d_config

    unet = build_unet2d(unet2d_config(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4,
                                      layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                                      up_block_types=("UpBlock2D", "UpBlock2D")))
    gen = torch.Generator().manual_seed(0)
    batches = [{"sample": torch.randn(4, unet.config.in_channels, 8, 8, generator=gen),
                "timestep": torch.randint(0, 1000, (4,), generator=gen)} for _ in range(2)]
    recipe = Recipe(winograd_min_channels=None, winograd=4, activation_ranges="static", rounding="learned", rounding_iters=5, learn_steps=0)
    qm = q(unet, recipe, calib_data=batches)
    with torch.no_grad():
        ref = unet(**batches[0]).sample
        out = qm(**batches[0]).sample
    rel = float((out - ref).pow(2).sum() / ref.pow(2).sum())
    assert torch.isfinite(out).all() and rel < 0.4  # 0.23 measured (random weights, 8-16 channels)
    assert all("rounding" in r.calibration and "static_clip_ratios" in r.calibration for r in qm.winoq_report)


def test_wrong_calibration_shape_fails_before_any_calibration(monkeypatch):
    import winoq.api as api

    monkeypatch.setattr(api, "_calibrate", lambda *a, **k: pytest.fail("calibrated before checking the data"))
    with pytest.raises(ValueError, match=r"batch 0 \(tensor\(4, 1, 8, 8\)\)"):
        q(tiny_cnn(), Recipe(winograd_min_channels=None, winograd=4, activation_ranges="static"), calib_data=images(4, c=1))


def test_a_used_up_iterator_is_named():
    model = tiny_cnn()
    gen = (x for x in [images(2)])
    run_calibration(model, gen)
    with pytest.raises(ValueError, match="one-shot iterator"):
        run_calibration(model, gen)


def test_generators_are_refused_before_any_work():
    with pytest.raises(ValueError, match="one-shot iterator"):
        q(tiny_cnn(), Recipe(winograd=None, activation_ranges="static"), calib_data=(x for x in [images(2)]))
