"""Recipe field types: every field refuses values of the wrong type (bool is no int, floats finite)."""
from __future__ import annotations

import dataclasses
import math

import pytest
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
