"""Model-level mixed-precision planning: traces -> sensitivities -> costs -> ILP -> per-layer bits."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from ..integer.convert import _fold_bn, _kind, trace
from .hessian import TraceEstimate, activation_traces, bits_of_choice, fisher_traces, hutchinson_traces, sensitivities
from .ilp import solve_ilp

__all__ = ["PlanConfig", "LayerCost", "Plan", "model_layers", "plan_bits", "cost_tables"]

BUDGETS = ("size", "bops", "latency")
TRACES = {"hutchinson": hutchinson_traces, "fisher": fisher_traces}


@dataclass(frozen=True)
class PlanConfig:
    """What to plan: per-layer bits among ``choices`` under one budget
    ``cost(lowest) + r (cost(highest) - cost(lowest))`` of kind ``budget``. ``trace``: the
    curvature of each layer in its sensitivity: ``"hutchinson"`` (HAWQ-V3: Hessian trace by
    Rademacher samples, stopping at ``tol`` or ``max_iters``) or ``"fisher"`` (exact Fisher /
    Gauss-Newton trace per image: never negative, no random vectors; see
    :func:`~winoq.mixed_precision.hessian.fisher_traces`); both on ``max_samples`` images.
    ``choices``: bit widths for weights and activations together (HAWQ-V3), or ``(weight,
    activation)`` pairs such as ``((4, 4), (4, 8), (8, 8))``. ``activation_term``: add each
    layer's activation term ``Tr(F_a) * mse(a)`` to Omega (HAWQ-V3's counts only the weights, so
    it cannot see what 4-bit activations cost); pairs that differ in activation bits alone need it."""

    budget: str = "bops"
    r: float = 0.5
    choices: tuple[int, ...] = (4, 8)
    first_last_8bit: bool = True
    tol: float = 0.02
    max_iters: int = 100
    max_samples: int = 128
    trace: str = "hutchinson"
    activation_term: bool = False

    def __post_init__(self):
        if self.trace not in TRACES:
            raise ValueError(f"trace must be one of {tuple(TRACES)}, got {self.trace!r}")
        if self.budget not in BUDGETS:
            raise ValueError(f"budget must be one of {BUDGETS}, got {self.budget!r}")
        if not 0.0 <= self.r <= 1.0:
            raise ValueError(f"r must be in [0, 1] (e.g. 0.75, 0.5, 0.25), got {self.r}")
        if not self.choices or not all(_valid_choice(c) for c in self.choices):
            raise ValueError(f"choices must be bit widths in [2, 16] or (weight, activation) pairs of them, "
                             f"got {self.choices!r}")


def _valid_choice(c) -> bool:
    pair = (c, c) if isinstance(c, int) else c
    return isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(b, int) and 2 <= b <= 16 for b in pair)


@dataclass(frozen=True)
class LayerCost:
    name: str
    macs: int
    params: int
    input_of: str   # the fx node the layer reads (layers reading the same value are tied)


@dataclass
class Plan:
    bits: dict[str, int | tuple[int, int]]   # a bit width, or (weight, activation) bits
    budget_kind: str
    r: float
    budget: float
    totals: dict[str, float]
    sensitivity: dict[str, dict[int, float]]
    traces: dict[str, dict] = field(default_factory=dict)
    ties: list[list[str]] = field(default_factory=list)
    solve_seconds: float = 0.0

    def to_json(self) -> str:
        d = asdict(self)
        d["sensitivity"] = {l: {_choice_key(b): v for b, v in t.items()} for l, t in self.sensitivity.items()}
        return json.dumps(d, indent=1)

    def recipe(self, base=None):
        """A :class:`winoq.Recipe` that applies this plan with ``winoq.quantize`` (and is saved with
        the checkpoint): each planned layer's weights and input activations at its bits; the other
        fields from ``base`` (default: every conv direct, as HAWQ-V3)."""
        from ..recipe import Recipe

        base = base or Recipe(winograd=None)
        return base.replace(layer_plan={n: {"weights": f"int{w}", "activations": f"int{a}"}
                                        for n, (w, a) in ((n, bits_of_choice(b)) for n, b in self.bits.items())})

    def integer_config(self, **overrides):
        """An :class:`winoq.integer.IntegerConfig` that converts the model to integer-only with this plan."""
        from ..integer import IntegerConfig

        return IntegerConfig(layer_bits=self.bits, **overrides)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        d = json.loads(text)
        d["sensitivity"] = {l: {_parse_choice(b): v for b, v in t.items()} for l, t in d["sensitivity"].items()}
        d["bits"] = {l: b if isinstance(b, int) else tuple(b) for l, b in d["bits"].items()}
        return cls(**d)


def _choice_key(choice) -> str:
    """A choice as a JSON key: "4", or "4/8" for (weight, activation) bits."""
    return str(choice) if isinstance(choice, int) else "/".join(map(str, choice))


def _parse_choice(key: str):
    return int(key) if "/" not in key else tuple(int(b) for b in key.split("/"))


class _Shapes(fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.out = {}

    def run_node(self, n):
        r = super().run_node(n)
        if isinstance(r, torch.Tensor):
            self.out[n.name] = r[0].numel()
        return r


def _source(node: fx.Node, kinds) -> fx.Node:
    """The value a layer reads, looking through ops that do not change it."""
    while kinds[node] == "identity":
        node = node.args[0]
    return node


def model_layers(model: nn.Module, example: torch.Tensor, leaf_modules=()) -> tuple[list[LayerCost], dict]:
    """Convs / linears in execution order with MACs per sample, and their folded float64 weights
    and BN factors ``{name: (W', gamma / sigma)}``."""
    gm = trace(model, leaf_modules)
    mods = dict(gm.named_modules())
    kinds = {n: _kind(n, mods) for n in gm.graph.nodes}
    shapes = _Shapes(gm)
    with torch.no_grad():
        shapes.run(example[:1])
    out, folded = [], {}
    for n in gm.graph.nodes:
        if kinds[n] not in ("conv", "linear"):
            continue
        mod = mods[n.target]
        users = list(n.users)
        bn = mods[users[0].target] if (kinds[n] == "conv" and len(users) == 1 and kinds[users[0]] == "bn") else None
        w, _ = _fold_bn(mod, bn)
        if bn is not None:
            fold = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
        else:
            fold = torch.ones(w.shape[0], dtype=torch.float64)
        folded[n.target] = (w, fold)
        numel = shapes.out[n.name]
        out.append(LayerCost(n.target, int(numel * w[0].numel()), int(w.numel()), _source(n.args[0], kinds).name))
    return out, folded


def cost_tables(layers: list[LayerCost], choices, latency: dict[str, dict[int, float]] | None = None) -> dict:
    """``{kind: {layer: {choice: cost}}}``: size in bytes (params x b_w / 8), BOPs (MACs x b_w x b_a;
    a bit-width choice sets both), and ``latency`` when a measured table is given."""
    bits = {c: bits_of_choice(c) for c in choices}
    tables = {"size": {l.name: {c: l.params * bits[c][0] / 8 for c in choices} for l in layers},
              "bops": {l.name: {c: float(l.macs * bits[c][0] * bits[c][1]) for c in choices} for l in layers}}
    if latency is not None:
        tables["latency"] = {l.name: {b: float(latency[l.name][b]) for b in choices} for l in layers}
    return tables


def plan_bits(model: nn.Module, calib_data, config: PlanConfig | None = None, *, latency=None,
              traces: dict[str, TraceEstimate] | None = None, activations=None, leaf_modules=()) -> Plan:
    """Per-layer bits for ``model`` minimising the HAWQ-V3 sensitivity under the configured budget.

    Layers reading the same value (a block's first conv and its downsample conv) are tied; the
    first and last layers are kept at the largest choice. ``latency``: ``{layer: {bits: seconds}}``
    measured by the caller (needed for ``budget="latency"``). ``traces`` and ``activations`` (the output
    of :func:`~winoq.mixed_precision.hessian.activation_traces`) reuse earlier estimates."""
    config = config or PlanConfig()
    x = calib_data if isinstance(calib_data, torch.Tensor) else next(iter(calib_data))
    x = x[0] if isinstance(x, (tuple, list)) else x
    layers, folded = model_layers(model, x, leaf_modules)
    names = [l.name for l in layers]
    if traces is None:
        traces = TRACES[config.trace](model, names, calib_data, tol=config.tol, max_iters=config.max_iters,
                                      max_samples=config.max_samples)
    acts = None
    if config.activation_term:
        acts = activations or activation_traces(model, names, calib_data, max_samples=config.max_samples)
    sens = sensitivities(traces, folded, config.choices, acts)
    if config.first_last_8bit:
        top = max(config.choices, key=bits_of_choice)
        for end in (names[0], names[-1]):
            sens[end] = {top: sens[end][top]}
    if config.budget == "latency" and latency is None:
        raise ValueError("budget='latency' needs a measured latency table: pass latency={layer: {bits: seconds}}")
    tables = cost_tables(layers, config.choices, latency)
    groups: dict[str, list[str]] = {}
    for l in layers:
        groups.setdefault(l.input_of, []).append(l.name)
    ties = [g for g in groups.values() if len(g) > 1]
    table = tables[config.budget]
    lo = sum(min(table[n][b] for b in sens[n]) for n in names)
    hi = sum(max(table[n][b] for b in sens[n]) for n in names)
    budget = lo + config.r * (hi - lo)
    t0 = time.perf_counter()
    bits = solve_ilp(sens, tables, {config.budget: budget * (1 + 1e-12)}, ties)
    solve_s = time.perf_counter() - t0
    totals = {k: sum(t[n][bits[n]] for n in names) for k, t in tables.items()}
    tr = {n: {"trace": e.trace, "stderr": e.stderr, "samples": e.samples} for n, e in traces.items()}
    if acts is not None:
        for n, e in acts[0].items():
            tr[n].update(activation_trace=e.trace, activation_stderr=e.stderr)
    return Plan(bits, config.budget, config.r, budget, totals, sens, tr, ties, solve_s)
