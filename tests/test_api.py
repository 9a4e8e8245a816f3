"""Tests for the public API: Recipe validation, winoq.quantize (module swap,
calibration), winoq.save / winoq.load."""
from __future__ import annotations

import hashlib
import json
import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import winoq
from winoq import Recipe
from winoq.modules import QuantConv2d, QuantLinear
from winoq.winograd.quantized import QuantWinogradConv2d

# the paper's Winograd-domain scales (shared by the taps, 8-bit M): where learning the transform scales matters most
PAPER_PIPELINE = dict(winograd_input_scales="shared", winograd_weight_scales="shared", winograd_output_format=None)


def tiny_cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),          # Winograd
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),  # stride 2: direct
        nn.Conv2d(8, 8, 1),                     # 1x1: direct
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def no_winograd_cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Conv2d(4, 4, 1), nn.Flatten(), nn.Linear(64, 2))


def example_input(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))




def q(model, recipe: Recipe, **kw):
    return winoq.quantize(model, recipe, progress=False, **kw)


def file_digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- Recipe


def test_recipe_defaults_are_valid_and_json_round_trips():
    r = Recipe()
    assert Recipe.from_json(r.to_json()) == r
    r2 = Recipe(winograd_min_channels=None, weights="int4", activations="fp8_e4m3", group_size=None, winograd=4, scales="tapwise",
                points=("0", "1", "-1", "1/2", "-1/2"))
    assert Recipe.from_json(r2.to_json()) == r2
    assert json.loads(r2.to_json())["points"] == ["0", "1", "-1", "1/2", "-1/2"]
    assert r.replace(seed=3).seed == 3 and r.seed == 0


def test_recipe_points_are_normalised():
    assert Recipe(points=("0.5", "2/4", "-3")).points == ("1/2", "1/2", "-3")


def test_recipe_unknown_scales_lists_the_valid_ones():
    with pytest.raises(ValueError) as exc:
        Recipe(scales="magic")
    msg = str(exc.value)
    for name in ("standard", "learned", "paw-fsq", "tapwise"):
        assert name in msg


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(weights="int99"),
        dict(activations="float7"),
        dict(group_size=0),
        dict(group_size=-4),
        dict(group_size=2.5),
        dict(winograd=1),
        dict(winograd=0),
        dict(winograd=15),
        dict(kernel="cuda-magic"),
        dict(noise="pink"),
        dict(learn_steps=-1),
        dict(learn_lr=0.0),
        dict(seed="0"),
    ],
)
def test_recipe_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        Recipe(**kwargs)


def test_recipe_from_json_rejects_unknown_fields():
    data = json.loads(Recipe().to_json())
    data["tile"] = 4
    with pytest.raises(ValueError, match="unknown"):
        Recipe.from_json(json.dumps(data))


# --------------------------------------------------------------------------- quantize


def test_quantize_returns_a_new_model_and_leaves_the_original_alone():
    model = tiny_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types_before = [type(mod) for mod in model]
    qm = q(model, Recipe(winograd_min_channels=None, winograd=4, scales="standard"))
    assert qm is not model
    assert [type(mod) for mod in model] == types_before
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    # the copy does not share storage with the original
    with torch.no_grad():
        qm[0].weight.add_(1.0)
    assert torch.equal(model[0].weight, before["0.weight"])


def test_module_swap_plan():
    qm = q(tiny_cnn(), Recipe(winograd_min_channels=None, winograd=4, scales="standard", group_size=4))
    assert type(qm[0]) is QuantWinogradConv2d
    assert type(qm[2]) is QuantConv2d and qm[2].stride == (2, 2)
    assert type(qm[3]) is QuantConv2d and qm[3].kernel_size == (1, 1)
    assert type(qm[6]) is QuantLinear
    assert isinstance(qm[1], nn.ReLU)
    assert qm[0].m == 4 and qm[0].group_size == 4
    assert qm[2].group_size == 4 and qm[2].weight_format.name == "int8"
    kinds = {r.name: r.kind for r in qm.winoq_report}
    assert kinds == {"0": "winograd", "2": "direct", "3": "direct", "6": "linear"}
    assert "stride" in next(r.detail for r in qm.winoq_report if r.name == "2")
    assert qm.winoq_recipe == Recipe(winograd_min_channels=None, winograd=4, scales="standard", group_size=4)
    assert not qm.training


def test_quantized_model_runs_and_stays_close():
    model = tiny_cnn().eval()
    x = example_input()
    qm = q(model, Recipe(winograd_min_channels=None, winograd=4, scales="standard"))
    with torch.no_grad():
        y, yq = model(x), qm(x)
    assert yq.shape == y.shape and torch.isfinite(yq).all()
    assert float((yq - y).norm() / y.norm()) < 0.2


def test_winograd_off_keeps_every_conv_direct():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qm = q(tiny_cnn(), Recipe(winograd=None))
    assert type(qm[0]) is QuantConv2d
    assert not any(isinstance(mod, QuantWinogradConv2d) for mod in qm.modules())


def test_model_without_eligible_convs_warns_and_works():
    model = no_winograd_cnn()
    with pytest.warns(UserWarning, match="no conv runs as Winograd"):
        qm = q(model, Recipe(winograd_min_channels=None, winograd=4))
    assert type(qm[0]) is QuantConv2d and type(qm[1]) is QuantConv2d and type(qm[3]) is QuantLinear
    x = example_input()
    with torch.no_grad():
        out = qm(x)
    assert out.shape == (2, 2) and torch.isfinite(out).all()


def test_nan_weight_is_rejected_with_the_parameter_name():
    model = tiny_cnn()
    with torch.no_grad():
        model[2].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"2\.weight"):
        q(model, Recipe(winograd_min_channels=None, winograd=4, scales="standard"))
    model = tiny_cnn()
    with torch.no_grad():
        model[6].bias[1] = float("inf")
    with pytest.raises(ValueError, match=r"6\.bias"):
        q(model, Recipe(winograd_min_channels=None, winograd=4, scales="standard"))


def test_quantize_argument_checks():
    with pytest.raises(TypeError):
        winoq.quantize(tiny_cnn(), {"weights": "int8"}, progress=False)
    with pytest.raises(TypeError):
        winoq.quantize(lambda x: x, Recipe(), progress=False)
    qm = q(tiny_cnn(), Recipe(winograd_min_channels=None, winograd=4, scales="standard"))
    with pytest.raises(ValueError, match="already quantized"):
        q(qm, Recipe(winograd_min_channels=None, winograd=4, scales="standard"))


# --------------------------------------------------------------------------- save / load


def _round_trip(tmp_path, recipe: Recipe, **kw):
    model = tiny_cnn()
    qm = q(model, recipe, **kw)
    path = tmp_path / "model.safetensors"
    winoq.save(qm, path)
    loaded = winoq.load(path, tiny_cnn(seed=123))  # weights come from the file, not from this model
    x = example_input()
    with torch.no_grad():
        return qm, loaded, qm(x), loaded(x)


def test_round_trip_learned(tmp_path):
    qm, loaded, y, y2 = _round_trip(tmp_path, Recipe(winograd_min_channels=None, winograd=4, scales="learned", learn_steps=2))
    cal = qm.winoq_report[0].calibration
    assert cal["sqnr_learned_db"] >= cal["sqnr_standard_db"]
    assert torch.equal(y, y2)
    assert loaded.winoq_recipe == qm.winoq_recipe
    assert [r.name for r in loaded.winoq_report] == [r.name for r in qm.winoq_report]
    assert loaded.winoq_report[0].calibration.keys() == qm.winoq_report[0].calibration.keys()


def test_round_trip_paw_fsq(tmp_path):
    calib = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(7))  # 200 fixed steps: keep it tiny
    qm, loaded, y, y2 = _round_trip(tmp_path, Recipe(winograd_min_channels=None, winograd=4, scales="paw-fsq"), calib_data=calib)
    assert qm[0].free_transforms is not None and loaded[0].free_transforms is not None
    assert torch.equal(y, y2)


def test_round_trip_shared_scales(tmp_path):
    qm, loaded, y, y2 = _round_trip(tmp_path, Recipe(winograd_min_channels=None, winograd=4, scales="learned", learn_steps=1, shared_scales=True))
    assert torch.equal(y, y2)
    assert loaded[0].log_sb.dtype == qm[0].log_sb.dtype
    assert torch.equal(loaded[0].log_sb, qm[0].log_sb) and torch.equal(loaded[0].log_sg, qm[0].log_sg)


def test_round_trip_standard_and_tapwise(tmp_path):
    for scales in ("standard", "tapwise"):
        _, loaded, y, y2 = _round_trip(tmp_path, Recipe(winograd_min_channels=None, winograd=4, scales=scales, weights="int4"))
        assert torch.equal(y, y2)
        assert loaded[0].scale_mode == ("tapwise" if scales == "tapwise" else "shared")


def test_load_rejects_foreign_safetensors_and_leaves_it_alone(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"w": torch.randn(3, 3)}, str(path), metadata={"format": "pt"})
    digest = file_digest(path)
    with pytest.raises(ValueError, match="not a winoq checkpoint"):
        winoq.load(path, tiny_cnn())
    assert path.exists() and file_digest(path) == digest


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}"])
def test_load_rejects_garbage_and_leaves_it_alone(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError):
        winoq.load(path, tiny_cnn())
    assert path.exists() and path.read_bytes() == content


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        winoq.load(tmp_path / "nope.safetensors", tiny_cnn())


def test_load_into_a_different_architecture_fails(tmp_path):
    qm = q(tiny_cnn(), Recipe(winograd_min_channels=None, winograd=4, scales="standard"))
    path = tmp_path / "m.safetensors"
    winoq.save(qm, path)
    bigger = tiny_cnn()
    bigger.append(nn.Linear(4, 4))  # same layers plus one: missing keys
    with pytest.raises(ValueError, match="does not match"):
        winoq.load(path, bigger)


def test_load_into_an_architecture_with_other_shapes_raises_value_error(tmp_path):
    qm = q(tiny_cnn(), Recipe(winograd_min_channels=None, winograd=4, scales="standard"))
    path = tmp_path / "m.safetensors"
    winoq.save(qm, path)
    wider = tiny_cnn()
    wider[0] = nn.Conv2d(3, 16, 3, padding=1)
    wider[2] = nn.Conv2d(16, 8, 3, stride=2, padding=1)
    with pytest.raises(ValueError, match="does not match"):
        winoq.load(path, wider)


def test_save_over_an_existing_file(tmp_path):
    path = tmp_path / "m.safetensors"
    x = example_input()
    qa = q(tiny_cnn(seed=0), Recipe(winograd_min_channels=None, winograd=4, scales="standard"))
    qb = q(tiny_cnn(seed=1), Recipe(winograd_min_channels=None, winograd=2, scales="standard", weights="int4"))
    winoq.save(qa, path)
    winoq.save(qb, path)
    loaded = winoq.load(path, tiny_cnn())
    assert loaded.winoq_recipe == qb.winoq_recipe and loaded[0].m == 2
    with torch.no_grad():
        assert torch.equal(loaded(x), qb(x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # no temporary left behind
    # a save that fails leaves the existing checkpoint as it was
    digest = file_digest(path)
    with pytest.raises(ValueError):
        winoq.save(tiny_cnn(), path)  # not a quantized model
    assert file_digest(path) == digest
    assert winoq.load(path, tiny_cnn()).winoq_recipe == qb.winoq_recipe


def test_skip_patterns_keep_layers_float_and_survive_save_load(tmp_path):
    model = tiny_cnn()
    recipe = Recipe(winograd_min_channels=None, winograd=4, scales="standard", skip=("0", "[6-9]"))
    qm = q(model, recipe)
    assert type(qm[0]) is nn.Conv2d
    assert not any(isinstance(m, QuantLinear) for m in qm.modules())
    assert any(isinstance(m, QuantConv2d) for m in qm.modules())
    path = tmp_path / "m.safetensors"
    winoq.save(qm, path)
    loaded = winoq.load(path, model)
    assert loaded.winoq_recipe.skip == ("0", "[6-9]")
    x = example_input()
    with torch.no_grad():
        assert torch.equal(qm(x), loaded(x))


def test_skip_must_be_patterns():
    with pytest.raises(ValueError, match="skip must be a tuple"):
        Recipe(skip="conv_in")


@pytest.mark.parametrize("optimizer,loss", [("sgd", "mse"), ("adam", "l1")])
def test_learning_optimizer_and_loss_are_recipe_choices(optimizer, loss):
    qm = q(tiny_cnn(), Recipe(winograd_min_channels=None, winograd=6, learn_steps=3, learn_optimizer=optimizer, learn_loss=loss, **PAPER_PIPELINE))
    rep = [r for r in qm.winoq_report if r.kind == "winograd"][0]
    assert rep.calibration["sqnr_learned_db"] > rep.calibration["sqnr_standard_db"] + 10
    with pytest.raises(ValueError, match="learn_optimizer"):
        Recipe(learn_optimizer="lbfgs")
