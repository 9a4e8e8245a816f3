"""Joint tile + bits tables on a tiny conv net, solved by solve_ilp and assembled."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from winoq.mixed_precision import solve_ilp
from winoq.mixed_precision.winograd_choice import assemble, build_choices, joint_tables, planned_layers, uniform_plan
from winoq.modules import QuantConv2d
from winoq.winograd.quantized import QuantWinogradConv2d


def test_joint_tables_ilp_and_assembly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                          nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2), nn.Flatten()).eval()
    calib = torch.randn(4, 2, 12, 12)
    choices = build_choices(model, tiles=("direct", 2, 6), learn_steps=2)
    sens, costs = joint_tables(model, choices, calib, samples=4, latency_batch=2, layers="eligible")
    assert set(sens) == {"0", "2"}  # the stride-2 conv is not a choice
    for n in sens:
        assert sens[n][("direct", 8)] < sens[n][("direct", 4)]
        assert costs["mults"][n][("F6", 8)] < costs["mults"][n][("F2", 8)] < costs["mults"][n][("direct", 8)]
        assert all(v > 0 for v in costs["latency"][n].values())
        # one timing per tile: int4 and int8 weights run the same kernel
        assert all(costs["latency"][n][(t, 4)] == costs["latency"][n][(t, 8)] for t in ("direct", "F2", "F6"))
    cheapest = sum(min(t.values()) for t in costs["mults"].values())
    plan = solve_ilp(sens, costs, {"mults": cheapest})
    assert sum(costs["mults"][n][plan[n]] for n in plan) <= cheapest
    plan = solve_ilp(sens, costs, {"mults": 1e18})
    assert all(sens[n][plan[n]] == min(sens[n].values()) for n in plan)
    m = assemble(choices, {"0": ("F6", 4), "2": ("direct", 8)})
    assert isinstance(m[0], QuantWinogradConv2d) and m[0].m == 6 and isinstance(m[2], QuantConv2d)
    assert m(calib).shape == model(calib).shape


def test_all_layers_are_planned_and_a_uniform_model_is_a_plan():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 5 * 5, 3)).eval()
    calib = torch.randn(4, 2, 12, 12)
    choices = build_choices(model, tiles=("direct", 2), learn_steps=2)
    allowed = planned_layers(model, choices)
    assert allowed == {"0": list(choices), "2": [("direct", 4), ("direct", 8)], "5": [("direct", 4), ("direct", 8)]}
    assert list(planned_layers(model, choices, "eligible")) == ["0"]
    with pytest.raises(ValueError, match="layers must be one of"):
        planned_layers(model, choices, "some")
    sens, costs = joint_tables(model, choices, calib, samples=4, latency_batch=2)
    assert {n: sorted(t) for n, t in sens.items()} == {n: sorted(v) for n, v in allowed.items()}
    assert costs["mults"]["5"] == {("direct", 4): 100 * 3 * 4 * 8, ("direct", 8): 100 * 3 * 8 * 8}
    assert costs["mults"]["2"][("direct", 8)] == 5 * 5 * 4 * 4 * 9 * 8 * 8
    plan = uniform_plan(("F2", 4), sens)
    assert plan == {"0": ("F2", 4), "2": ("direct", 4), "5": ("direct", 4)}
    with torch.no_grad():  # the assembled uniform plan is the uniform model, bit for bit
        assert torch.equal(assemble(choices, plan)(calib), choices[("F2", 4)](calib))
    # the cheapest budget is the all-4-bit plan with the stride-2 conv and the classifier at 4 bits too
    cheapest = solve_ilp(sens, costs, {"mults": sum(min(t.values()) for t in costs["mults"].values())})
    assert cheapest["2"] == cheapest["5"] == ("direct", 4)


def test_output_sensitivity_is_zero_for_the_float_layer_and_ranks_bits():
    import copy

    from winoq.batchnorm import fold_batchnorm
    from winoq.mixed_precision.winograd_choice import output_sensitivity

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                          nn.Flatten()).eval()
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    x = torch.randn(4, 2, 8, 8)
    folded = copy.deepcopy(model)
    fold_batchnorm(folded)
    choices = build_choices(model, tiles=("direct",), learn_steps=1)
    choices["float"] = folded
    sens = output_sensitivity(model, choices, ["0", "3"], x)
    for n in ("0", "3"):
        assert sens[n]["float"] < 1e-12
        assert 0 < sens[n][("direct", 8)] < sens[n][("direct", 4)]
    assert torch.equal(model(x), folded(x)) or torch.allclose(model(x), folded(x), atol=1e-5)


def test_checked_plan_keeps_the_candidate_that_agrees_most_with_the_float_model(monkeypatch):
    from winoq.mixed_precision import winograd_choice as wc

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                          nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.Flatten()).eval()
    x = torch.randn(6, 2, 10, 10)
    choices = build_choices(model, tiles=("direct", 6), learn_steps=1)
    sens, costs = joint_tables(model, choices, x, samples=4, latency_batch=2)
    budget = {"mults": sum(costs["mults"][n][("F6", 8)] for n in sens)}
    bad = {n: ("F6", 4) for n in sens}  # a deliberately bad "ILP" plan within the budget
    calls = []
    real = wc.logits_of
    monkeypatch.setattr(wc, "logits_of", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = {}
    plan, info = wc.checked_plan(model, choices, bad, costs, budget, x, cache)
    assert len(calls) == 3  # the float model, the ILP's plan (= uniform F6/4: run once) and F6/8
    assert set(info["scores"]) == {"ilp", "F6/8", "F6/4"}  # direct/8 is over budget: no candidate
    best = max(v[0] for v in info["scores"].values())
    assert info["scores"][info["chosen"]][0] == best
    assert info["chosen"] == "F6/8" and plan == {n: ("F6", 8) for n in sens}
    # every candidate's logits are reused: a second budget whose plan was scored before runs no model,
    # and neither does a labelled check on the same images
    again, info2 = wc.checked_plan(model, choices, plan, costs, budget, x, cache)
    assert len(calls) == 3 and info2["chosen"] == "ilp" and again == plan  # ties keep the ILP's plan
    _, info3 = wc.checked_plan(model, choices, plan, costs, budget, x, cache, labels=torch.zeros(6, dtype=torch.long))
    assert len(calls) == 3 and set(info3["scores"]) == set(info2["scores"])
    with pytest.raises(ValueError, match="classifiers"):
        wc.checked_plan(nn.Sequential(model, nn.Unflatten(1, (4, 10, 10))), choices, bad, costs, budget, x)


def test_labelled_check_ranks_by_accuracy_on_the_labels():
    from winoq.mixed_precision import winograd_choice as wc

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                          nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.Flatten()).eval()
    x = torch.randn(6, 2, 10, 10)
    with torch.no_grad():
        ref = model(x)
    assert wc.prediction_agreement(model, x, ref) == wc.prediction_agreement(model, x, ref, labels=ref.argmax(-1))
    wrong = (ref.argmax(-1) + 1) % ref.shape[1]
    assert wc.prediction_agreement(model, x, ref, labels=wrong)[0] == 0.0
    choices = build_choices(model, tiles=("direct", 6), learn_steps=1)
    sens, costs = joint_tables(model, choices, x, samples=4, latency_batch=2)
    budget = {"mults": sum(costs["mults"][n][("F6", 8)] for n in sens)}
    plan = {n: ("F6", 8) for n in sens}
    # labels that only uniform F(6,3)/4 gets right: the labelled check must pick it
    with torch.no_grad():
        labels = choices[("F6", 4)](x).argmax(-1)
    _, info = wc.checked_plan(model, choices, plan, costs, budget, x, {}, labels=labels)
    assert info["chosen"] == "F6/4" and info["scores"]["F6/4"][0] == 1.0


def test_plan_tiles_is_applied_by_quantize_and_converts_to_integer():
    import warnings

    import winoq
    from winoq.integer import convert
    from winoq.mixed_precision.winograd_choice import JointPlan, JointPlanConfig, plan_tiles

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    x = torch.randn(16, 3, 12, 12)
    plan, choices = plan_tiles(model, x[:8], JointPlanConfig(r=0.3, samples=8, learn_steps=1), check=x[8:],
                               progress=False)
    assert set(plan.plan) == {"0", "2", "4", "7"} and plan.plan["4"][0] == plan.plan["7"][0] == "direct"
    assert plan.totals["mults"] <= plan.budget * (1 + 1e-9) and plan.check["chosen"] in plan.check["scores"]
    assert any(t != "direct" for t, _ in plan.plan.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = winoq.quantize(model, plan.recipe(), progress=False)
    with torch.no_grad():  # the recipe rebuilds exactly the model the plan was scored as
        assert torch.equal(q(x), assemble(choices, plan.plan)(x))
    assert JointPlan.from_json(plan.to_json()) == plan
    cfg = plan.integer_config()
    assert cfg.winograd_layers == {n: int(t[1:]) for n, (t, _) in plan.plan.items() if t != "direct"}
    assert {n: w for n, (w, _) in cfg.layer_bits.items()} == {n: b for n, (_, b) in plan.plan.items()}
    im = convert(model.eval(), x[:8], cfg)
    with torch.no_grad():
        assert im(x[:2]).shape == (2, 4)


@pytest.mark.parametrize("kw, message", [
    ({"budget": "bops"}, "budget must be one of"), ({"r": 1.5}, "r must be in"), ({"tiles": (3, 9)}, "tiles must"),
    ({"tiles": (4,)}, "must include 'direct'"), ({"bits": (16,)}, "bits must"), ({"layers": "x"}, "layers must"),
    ({"sensitivity": "loss"}, "sensitivity must"), ({"samples": 0}, "samples must"),
])
def test_joint_plan_config_rejects_bad_values(kw, message):
    from winoq.mixed_precision.winograd_choice import JointPlanConfig

    with pytest.raises(ValueError, match=message):
        JointPlanConfig(**kw)
    assert JointPlanConfig(tiles=(4,), layers="eligible").tiles == (4,)


def test_latency_on_the_integer_runtime_kernels():
    """The default latency times each conv on the compiled integer runtime (direct int8 conv or the
    integer Winograd step); a linear, or latency="recipe", times the quantized layer itself."""
    from winoq.kernels import int_graph
    from winoq.mixed_precision.winograd_choice import JointPlanConfig, integer_latency

    torch.manual_seed(0)
    conv = nn.Conv2d(32, 32, 3, padding=1)
    x = torch.randn(2, 32, 12, 12)
    assert integer_latency(nn.Linear(4, 3), torch.randn(2, 4), "direct") is None
    if int_graph.available():
        for tile in ("direct", "F2", "F4", "F6"):
            t = integer_latency(conv, x, tile)
            assert t is not None and 0 < t < 1.0
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    calib = torch.randn(4, 2, 6, 6)
    choices = build_choices(model, tiles=("direct", 2), learn_steps=2)
    for source in ("integer", "recipe"):
        _, costs = joint_tables(model, choices, calib, samples=4, latency_batch=2, latency=source)
        assert all(v > 0 for t in costs["latency"].values() for v in t.values())
    with pytest.raises(ValueError, match="latency must be one of"):
        joint_tables(model, choices, calib, samples=4, latency="fast")
    with pytest.raises(ValueError, match="latency must be one of"):
        JointPlanConfig(latency="fast")
