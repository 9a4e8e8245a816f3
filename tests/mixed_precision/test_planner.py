"""Hutchinson traces against the exact Hessian trace, sensitivities and the model-level planner."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from winoq.integer import IntegerConfig, convert
from winoq.mixed_precision import Plan, PlanConfig, activation_traces, fisher_traces, hutchinson_traces, plan_bits
from winoq.mixed_precision.hessian import activation_error, sensitivities
from winoq.models import fmnist_resnet


def _exact_trace(model, x, y, name):
    w = dict(model.named_modules())[name].weight
    loss = F.cross_entropy(model(x), y)
    (g,) = torch.autograd.grad(loss, w, create_graph=True)
    g = g.flatten()
    return sum(float(torch.autograd.grad(g[i], w, retain_graph=True)[0].flatten()[i]) for i in range(g.numel()))


def test_hutchinson_trace_converges_to_exact_trace():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 3, (32,))
    est = hutchinson_traces(model, ["0", "2"], [(x, y)], tol=1e-4, min_iters=200, max_iters=400)
    for name in ("0", "2"):
        exact = _exact_trace(model, x, y, name)
        e = est[name]
        assert abs(e.trace - exact) < 4 * e.stderr + 1e-9, (name, e.trace, exact, e.stderr)
        assert e.samples == len(e.history) >= 200


def test_fisher_trace_is_the_exact_hessian_trace_of_a_model_linear_in_its_weights():
    # logits = W2 relu(W1 x): linear in W2, so d2L/dW2^2 is exactly the Gauss-Newton matrix, whose trace
    # the Fisher of the model's own distribution gives (the labels do not enter it)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4)).double()
    x = torch.randn(7, 6, dtype=torch.float64)
    est = fisher_traces(model, ["2"], x)["2"]
    exact = sum(_exact_trace(model, x[i:i + 1], torch.tensor([0]), "2") for i in range(len(x))) / len(x)
    assert est.trace == pytest.approx(exact, rel=1e-10)
    assert est.samples == len(est.history) == 7 and est.history[-1] == pytest.approx(est.trace)


def test_fisher_trace_is_the_gauss_newton_trace_and_never_negative():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    w = model[0].weight
    ggn = 0.0
    for i in range(len(x)):  # Tr(J^T (diag p - p p^T) J) from the full Jacobian of the logits
        jac = torch.autograd.functional.jacobian(
            lambda wt: torch.func.functional_call(model, {"0.weight": wt}, (x[i:i + 1],))[0], w).reshape(3, -1)
        p = torch.softmax(model(x[i:i + 1])[0], -1).detach()
        ggn += float(torch.trace(jac.T @ (torch.diag(p) - torch.outer(p, p)) @ jac)) / len(x)
    est = fisher_traces(model, ["0", "2"], [(x, torch.zeros(5, dtype=torch.long))])
    assert est["0"].trace == pytest.approx(ggn, rel=1e-10)
    assert est["0"].trace > 0 and est["2"].trace > 0 and est["0"].stderr >= 0
    with pytest.raises(ValueError, match="'nope'"):
        fisher_traces(model, ["nope"], x)


def test_many_classes_are_sampled_without_bias():
    # 40 classes, 8 drawn per image: the Monte Carlo traces agree with the exact ones on the same images
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 40)).double()
    x = torch.randn(200, 5, dtype=torch.float64)
    exact = fisher_traces(model, ["0", "2"], x, max_classes=40)
    mc = fisher_traces(model, ["0", "2"], x, max_classes=8)
    acts_exact, _ = activation_traces(model, ["2"], x, max_classes=40)
    acts_mc, _ = activation_traces(model, ["2"], x, max_classes=8)
    for e, m in ((exact["0"], mc["0"]), (exact["2"], mc["2"]), (acts_exact["2"], acts_mc["2"])):
        assert e.trace != m.trace and abs(e.trace - m.trace) < 4 * m.stderr, (e.trace, m.trace, m.stderr)
    assert fisher_traces(model, ["2"], x[:20], max_classes=8)["2"] == fisher_traces(model, ["2"], x[:20], max_classes=8)["2"]


def _small_model():
    torch.manual_seed(0)
    m = fmnist_resnet(widths=(4, 8), blocks=(1, 1))
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            nn.init.uniform_(mod.weight, 0.5, 1.5)
    return m.eval()


@pytest.mark.parametrize("budget", ["size", "bops"])
def test_planner_meets_budget_ties_downsample_and_keeps_ends_8bit(budget):
    model = _small_model()
    x = torch.randn(8, 1, 12, 12)
    plans = {}
    for r in (0.75, 0.25):
        p = plan_bits(model, x, PlanConfig(budget=budget, r=r, max_iters=6, max_samples=8))
        assert p.totals[budget] <= p.budget * (1 + 1e-9)
        assert p.bits["conv1"] == 8 and p.bits["fc"] == 8
        assert p.bits["layer2.0.conv1"] == p.bits["layer2.0.downsample.0"]
        assert ["layer2.0.conv1", "layer2.0.downsample.0"] in p.ties
        plans[r] = p
    assert plans[0.25].totals[budget] <= plans[0.75].totals[budget]
    assert sum(plans[0.25].sensitivity[l][b] for l, b in plans[0.25].bits.items()) >= \
        sum(plans[0.75].sensitivity[l][b] for l, b in plans[0.75].bits.items()) - 1e-12
    again = Plan.from_json(plans[0.25].to_json())
    assert again.bits == plans[0.25].bits
    im = convert(model, x, IntegerConfig(layer_bits=again.bits))
    if budget == "bops":
        assert im.bops() == pytest.approx(again.totals["bops"])


def test_planner_with_fisher_traces():
    model = _small_model()
    x = torch.randn(8, 1, 28, 28)
    plan = plan_bits(model, x, PlanConfig(budget="bops", r=0.5, trace="fisher", max_samples=4))
    assert set(plan.bits.values()) <= {4, 8} and plan.totals["bops"] <= plan.budget * (1 + 1e-9)
    assert all(t["samples"] == 4 and t["trace"] >= 0 for t in plan.traces.values())
    with pytest.raises(ValueError, match="trace must be one of"):
        PlanConfig(trace="exact")


def test_activation_trace_is_the_fisher_trace_of_the_layer_input():
    # the last layer's input a: logits = W a + b, so the Fisher in a is W^T (diag p - p p^T) W per image
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    traces, values = activation_traces(model, ["0", "2"], x)
    w = model[2].weight.detach()
    exact = 0.0
    for i in range(len(x)):
        p = torch.softmax(model(x[i:i + 1])[0], -1).detach()
        exact += float(torch.trace(w.T @ (torch.diag(p) - torch.outer(p, p)) @ w)) / len(x)
    assert traces["2"].trace == pytest.approx(exact, rel=1e-10)
    assert traces["0"].trace > 0 and traces["0"].samples == 5
    assert torch.equal(values["0"].sort().values, x.flatten().sort().values)   # layer 0 reads the input
    assert bool((values["2"] >= 0).all())                                       # layer 2 reads the ReLU


def test_activation_error_follows_the_integer_conversion_grid():
    grid = torch.arange(0, 256, dtype=torch.float64) * 0.01          # 255 steps: exact on an unsigned 8-bit grid,
    assert activation_error(grid, 8) > 0                             # but 8-bit post-ReLU values are symmetric
    sym = torch.arange(-127, 128, dtype=torch.float64) * 0.01
    assert activation_error(sym, 8) == pytest.approx(0.0, abs=1e-20)
    relu4 = torch.arange(0, 16, dtype=torch.float64) * 0.1           # 4 bit post-ReLU: unsigned [0, 15]
    assert activation_error(relu4, 4) == pytest.approx(0.0, abs=1e-20)
    v = torch.randn(4000, dtype=torch.float64).relu()
    assert activation_error(v, 4) > activation_error(v, 8) > 0


def test_choices_that_differ_in_activation_bits_need_the_activation_term():
    model = _small_model()
    x = torch.randn(6, 1, 12, 12)
    pairs = ((4, 4), (4, 8), (8, 8))
    with pytest.raises(ValueError, match="activation bits alone"):
        plan_bits(model, x, PlanConfig(choices=pairs, max_iters=2, max_samples=4))
    with pytest.raises(ValueError, match="choices must be"):
        PlanConfig(choices=((4, 4, 4),))
    plans = {b: plan_bits(model, x, PlanConfig(budget=b, r=0.3, choices=pairs, trace="fisher", activation_term=True,
                                               max_samples=4)) for b in ("size", "bops")}
    size = plans["size"]
    assert size.bits["conv1"] == (8, 8) and size.bits["fc"] == (8, 8)
    # 4-bit activations save no bytes: the size plan never takes them (they only add error)
    assert (4, 8) in size.bits.values() and (4, 4) not in size.bits.values()
    for layer, t in size.sensitivity.items():
        if (4, 4) in t:
            assert t[(4, 4)] > t[(4, 8)]
    assert all("activation_trace" in t for t in size.traces.values())
    bops = plans["bops"]
    assert bops.totals["bops"] <= bops.budget * (1 + 1e-9)
    again = Plan.from_json(bops.to_json())
    assert again.bits == bops.bits and again.sensitivity == bops.sensitivity
    im = convert(model, x, IntegerConfig(layer_bits=again.bits))
    assert im.bops() == pytest.approx(again.totals["bops"])
    layer = next(n for n, b in size.bits.items() if b == (4, 8))
    assert size.recipe().plan_for(layer) == {"weights": "int4", "activations": "int8"}


def test_latency_budget_needs_a_table_and_bad_r():
    with pytest.raises(ValueError, match="latency table"):
        plan_bits(_small_model(), torch.randn(2, 1, 12, 12), PlanConfig(budget="latency", max_iters=1, max_samples=2))
    with pytest.raises(ValueError, match="r must be in"):
        PlanConfig(r=2.0)


def test_plan_becomes_a_recipe_that_quantize_applies():
    import winoq
    from winoq.algorithms.adaround import layer_weight_format

    model = _small_model()
    x = torch.randn(4, 1, 12, 12)
    p = plan_bits(model, x, PlanConfig(budget="size", r=0.0, max_iters=2, max_samples=4))
    assert 4 in p.bits.values()
    recipe = p.recipe()
    assert recipe.winograd is None
    q = winoq.quantize(model, recipe, progress=False)
    for name, bits in p.bits.items():
        layer = q.get_submodule(name)
        assert layer_weight_format(layer).name == f"int{bits}" and layer.act_format.name == f"int{bits}"


def test_joint_plan_becomes_a_recipe():
    from winoq.mixed_precision.winograd_choice import plan_recipe

    r = plan_recipe({"a": ("F4", 8), "b": ("direct", 4)})
    assert r.plan_for("a") == {"weights": "int8", "winograd": 4}
    assert r.plan_for("b") == {"weights": "int4", "winograd": None}
