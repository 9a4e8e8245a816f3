"""Recipe field types: every field refuses values of the wrong type (bool is no int, floats finite)."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from winoq import Recipe

INT_FIELDS = ("group_size", "winograd", "seed", "learn_steps", "learn_max_channels", "rounding_iters", "calib_samples")
STR_FIELDS = ("weights", "activations", "scales", "noise", "learn_optimizer", "learn_loss", "kernel",
              "winograd_weight_scales", "rounding", "reconstruction", "format_search", "activation_ranges")


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(group_size=True), "group_size must be an int or None"),
    (dict(winograd=True), "winograd must be an int or None"),
    (dict(seed=True), "seed must be an int"),
    (dict(shared_scales="yes"), "shared_scales must be a bool"),
    (dict(shared_scales=1), "shared_scales must be a bool"),
    (dict(learn_steps=2.5), "learn_steps must be an int"),
    (dict(learn_lr=math.nan), "learn_lr must be a finite number"),
    (dict(learn_lr=math.inf), "learn_lr must be a finite number"),
    (dict(learn_lr="0.01"), "learn_lr must be a finite number"),
    (dict(rounding_iters=False), "rounding_iters must be an int"),
    (dict(kernel=None), "kernel must be a str"),
    (dict(skip="conv_in"), "skip must be a tuple"),
])
def test_wrong_types_are_refused_with_the_field_name(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        Recipe(**kwargs)


def test_right_types_still_pass():
    r = Recipe(learn_lr=1, shared_scales=True, group_size=None, skip=["conv_in"], points=("0", "1", "-1"))
    assert r.learn_lr == 1 and r.skip == ("conv_in",)
    assert Recipe.from_json(r.to_json()) == r


def test_every_field_has_a_type_check():
    """A field added later with a plain annotation is checked without further code."""
    plain = {f.name for f in dataclasses.fields(Recipe)} - {"points"}
    assert set(INT_FIELDS) | set(STR_FIELDS) | {"shared_scales", "learn_lr", "skip"} <= plain
    for name in plain:
        with pytest.raises(ValueError, match=name):
            Recipe(**{name: object()})


@settings(max_examples=60, deadline=None)
@given(field=st.sampled_from(INT_FIELDS), value=st.one_of(st.booleans(), st.floats(allow_nan=True), st.text(max_size=3)))
def test_int_fields_refuse_bools_floats_and_text(field, value):
    with pytest.raises(ValueError, match=field):
        Recipe(**{field: value})


@settings(max_examples=60, deadline=None)
@given(value=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5), st.booleans()))
def test_learn_lr_accepts_exactly_the_positive_finite_numbers(value):
    ok = not isinstance(value, bool) and math.isfinite(value) and value > 0
    if ok:
        assert Recipe(learn_lr=value).learn_lr == value
    else:
        with pytest.raises(ValueError):
            Recipe(learn_lr=value)


def test_layer_plan_is_validated_normalized_and_survives_json():
    r = Recipe(layer_plan={"b": {"winograd": None}, "a": {"weights": "int4", "winograd": 2}})
    assert r.layer_plan == (("a", (("weights", "int4"), ("winograd", 2))), ("b", (("winograd", None),)))
    assert r.plan_for("a") == {"weights": "int4", "winograd": 2} and r.plan_for("zzz") == {}
    assert Recipe.from_json(r.to_json()) == r
    assert hash(r) == hash(Recipe.from_json(r.to_json()))
    assert "layer-plan(2 layers)" in r.describe()
    for bad, msg in (({"a": {"bits": 4}}, "unknown keys"), ({"a": {"weights": "int99"}}, "int99"),
                     ({"a": {"winograd": 1}}, "output tile"), ({"a": {"winograd": True}}, "output tile"),
                     ({"a": 4}, "dicts of choices")):
        with pytest.raises(ValueError, match=msg):
            Recipe(layer_plan=bad)


def test_quantize_applies_the_layer_plan_and_load_rebuilds_it(tmp_path):
    import winoq
    from winoq.algorithms.adaround import layer_weight_format
    from winoq.models import cifar_resnet20

    torch.manual_seed(0)
    model = cifar_resnet20().eval()
    plan = {"layer1.0.conv1": {"weights": "int4", "winograd": 2}, "layer1.0.conv2": {"winograd": None},
            "linear": {"weights": "int4", "activations": "int4"}}
    recipe = Recipe(winograd=6, layer_plan=plan, learn_steps=1)
    q = winoq.quantize(model, recipe, progress=False)
    rep = {r.name: (r.kind, r.detail) for r in q.winoq_report}
    assert rep["layer1.0.conv1"] == ("winograd", "F(2,3) (layer_plan)")
    assert rep["layer1.0.conv2"] == ("direct", "direct (layer_plan)")
    assert rep["layer1.1.conv1"] == ("direct", "16 input channels < group size 32")  # the plan overrides the rule
    assert rep["layer3.1.conv1"] == ("winograd", "F(6,3)")
    assert layer_weight_format(q.layer1[0].conv1).name == "int4"
    assert layer_weight_format(q.layer1[1].conv1).name == "int8"
    assert q.linear.act_format.name == "int4"
    winoq.save(q, tmp_path / "q.safetensors")
    back = winoq.load(tmp_path / "q.safetensors", cifar_resnet20())
    x = torch.randn(2, 3, 32, 32)
    assert back.winoq_recipe.layer_plan == recipe.layer_plan
    assert torch.equal(back(x), q(x))
    with pytest.raises(ValueError, match="not a conv or linear"):
        winoq.quantize(model, Recipe(layer_plan={"layer1.0": {"weights": "int4"}}), progress=False)
    with pytest.raises(ValueError, match="layer2.0.conv1.*stride"):
        winoq.quantize(model, Recipe(layer_plan={"layer2.0.conv1": {"winograd": 4}}), progress=False)
