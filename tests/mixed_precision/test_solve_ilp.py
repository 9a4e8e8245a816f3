"""solve_ilp against brute force on small random instances, and its errors."""
from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from winoq.mixed_precision import solve_ilp

CHOICES = [4, 8, ("F6", 8), "direct"]


def _brute_force(sens, costs, budgets, ties):
    layers = list(sens)
    best = None
    for combo in itertools.product(*(list(sens[l]) for l in layers)):
        plan = dict(zip(layers, combo))
        if any(len({plan[l] for l in g}) > 1 for g in ties):
            continue
        if any(sum(costs[k][l][plan[l]] for l in layers) > b + 1e-9 for k, b in budgets.items()):
            continue
        obj = sum(sens[l][plan[l]] for l in layers)
        if best is None or obj < best[0] - 1e-12:
            best = (obj, plan)
    return best


@st.composite
def instances(draw):
    n_layers = draw(st.integers(1, 5))
    n_choices = draw(st.integers(1, 4))
    choices = CHOICES[:n_choices]
    layers = [f"l{i}" for i in range(n_layers)]
    val = st.integers(0, 20).map(float)
    sens = {l: {c: draw(val) for c in choices} for l in layers}
    kinds = draw(st.sampled_from([["size"], ["size", "bops"]]))
    costs = {k: {l: {c: draw(val) for c in choices} for l in layers} for k in kinds}
    budgets = {k: float(draw(st.integers(0, 20 * n_layers))) for k in kinds}
    ties = []
    if n_layers >= 2 and draw(st.booleans()):
        ties = [tuple(draw(st.permutations(layers))[:2])]
    return sens, costs, budgets, ties


@settings(max_examples=60, deadline=None)
@given(instances())
def test_solve_ilp_matches_brute_force(inst):
    sens, costs, budgets, ties = inst
    best = _brute_force(sens, costs, budgets, ties)
    if best is None:
        with pytest.raises(ValueError, match="infeasible"):
            solve_ilp(sens, costs, budgets, ties)
        return
    plan = solve_ilp(sens, costs, budgets, ties)
    assert set(plan) == set(sens)
    assert sum(sens[l][plan[l]] for l in sens) == pytest.approx(best[0])
    for k, b in budgets.items():
        assert sum(costs[k][l][plan[l]] for l in sens) <= b + 1e-9
    for g in ties:
        assert len({plan[l] for l in g}) == 1


def test_infeasible_budget_names_constraint_and_minimum():
    sens = {"a": {4: 1.0, 8: 0.0}, "b": {4: 1.0, 8: 0.0}}
    costs = {"size": {"a": {4: 4.0, 8: 8.0}, "b": {4: 2.0, 8: 8.0}}}
    with pytest.raises(ValueError, match=r"'size' = 5 is infeasible.*smallest feasible 'size' budget is 6"):
        solve_ilp(sens, costs, {"size": 5.0})
    # ties raise the minimum: b must follow a
    with pytest.raises(ValueError, match="smallest feasible 'size' budget is 6"):
        solve_ilp(sens, costs, {"size": 5.0}, ties=[("a", "b")])
    sens["a"][4] = 2.0
    assert solve_ilp(sens, costs, {"size": 12.0}) == {"a": 8, "b": 4}


def test_missing_layer_is_named():
    sens = {"a": {4: 1.0}, "b": {4: 1.0}}
    with pytest.raises(ValueError, match="layer 'b' is missing from the 'bops' cost table"):
        solve_ilp(sens, {"bops": {"a": {4: 1.0}}}, {"bops": 10})
    with pytest.raises(ValueError, match="tied layer 'z' is missing"):
        solve_ilp(sens, {"bops": {"a": {4: 1.0}, "b": {4: 1.0}}}, {"bops": 10}, ties=[("a", "z")])


def test_hashable_labels_and_no_budget():
    sens = {"x": {("F6", 8): 0.5, ("direct", 4): 0.1}}
    assert solve_ilp(sens, {}, {}) == {"x": ("direct", 4)}
