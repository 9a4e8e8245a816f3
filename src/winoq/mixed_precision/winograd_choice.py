"""Joint choice of each 3x3 layer's algorithm and weight bits by the same exact ILP.

Choices per Winograd-eligible conv (square kernel > 1, stride 1): ``(tile, bits)`` with tile in
``"direct"``, 2, 4, 6 (F(m,3)) and weight bits in (4, 8); activations stay int8. By default every
other conv and linear that ``winoq.quantize`` quantizes (stride-2 convs, 1x1 convs, the classifier)
is planned too, with the direct choices only, so that each uniform model is itself a plan and the
ILP can give those layers 4-bit weights as the uniform models do (``layers="eligible"`` plans the
eligible convs only and keeps the rest int8 direct). Every choice is the project's own quantized
layer, built by ``winoq.quantize`` with a uniform recipe (data-free learned transform scales for the
Winograd tiles), so a plan is assembled from already quantized layers.

* sensitivity (``sensitivity="layer"``): the layer's relative output error ``||y_q - y||^2 / ||y||^2``
  on its calibration inputs (the float model's inputs to that layer); or (``"output"``, the
  default) the relative error of the *network's* output when only that layer takes the choice
  (the float model with BatchNorm folded, that one layer swapped): it weighs each layer's error
  by how much of it reaches the logits, which the summed layer errors do not (measured:
  docs/results.md section 17);
* costs: ``mults`` = general multiplications per sample times weight bits times 8 activation bits
  (direct: one per MAC, a linear's in x out; F(m,3): ``(m+2)^2`` per m x m output tile and channel
  pair), and
  ``latency``: measured thread CPU time of the layer on its calibration inputs, once per layer and
  tile (both weight widths run the same kernel on int8 codes, and timing them apart let the ILP
  trade accuracy for timing noise: section 29). By default (``latency="integer"``) on the kernels
  the layer deploys on, winoq's compiled integer runtime (:func:`integer_latency`: the int8
  direct conv or the integer Winograd step, requantization included); layers those kernels do not
  run (linears), or ``latency="recipe"``, time the quantized layer itself (Winograd on the compiled
  fixed-point kernel when built, direct on the emulated path).
"""
from __future__ import annotations

import copy
import json
import math
import statistics
import time
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from tqdm.auto import tqdm

from ..calibration import capture_layer_inputs
from .ilp import solve_ilp

TILES = ("direct", 2, 4, 6)
BITS = (4, 8)


def _label(tile, bits):
    return ("direct" if tile == "direct" else f"F{tile}", bits)


def label_key(label) -> str:
    """A choice as text (JSON keys, candidate names): ``("F4", 8)`` -> ``"F4/8"``."""
    return f"{label[0]}/{label[1]}"


def parse_label_key(key: str) -> tuple:
    """``"F4/8"`` -> ``("F4", 8)``, the inverse of :func:`label_key`."""
    tile, bits = key.split("/")
    return tile, int(bits)


def build_choices(model: nn.Module, tiles=TILES, bits=BITS, learn_steps: int = 20, progress: bool = False) -> dict:
    """``{(tile label, bits): quantized model}`` for every uniform choice (winoq.quantize, group 32)."""
    import winoq

    out = {}
    for tile, b in tqdm([(t, b) for t in tiles for b in bits], desc="quantizing the uniform choices", unit="choice",
                        disable=not progress):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out[_label(tile, b)] = winoq.quantize(model, choice_recipe(tile, b, learn_steps), progress=False)
    return out


def choice_recipe(tile="direct", bits: int = 8, learn_steps: int = 20):
    """The uniform recipe of one choice: int``bits`` weights, int8 activations, F(``tile``,3) on every
    eligible conv (the ILP chooses each layer's algorithm: no channel rule) or direct."""
    import winoq

    return winoq.Recipe(weights=f"int{bits}", activations="int8", winograd=None if tile == "direct" else tile,
                        winograd_min_channels=None, scales="learned", learn_steps=learn_steps)


def eligible_layers(model: nn.Module) -> list[str]:
    from ..winograd.conv import winograd_ineligibility

    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and winograd_ineligibility(m) is None]


LAYERS = ("all", "eligible")


def planned_layers(model: nn.Module, choices: dict, layers: str = "all") -> dict[str, list]:
    """``{layer: [labels it may take]}``: each Winograd-eligible conv takes every label of
    ``choices``; with ``layers="all"`` every other conv / linear that the choices quantized takes the
    direct labels (a uniform model is then exactly a plan)."""
    if layers not in LAYERS:
        raise ValueError(f"layers must be one of {LAYERS}, got {layers!r}")
    eligible = set(eligible_layers(model))
    base = next(iter(choices.values()))
    out = {}
    for n, m in model.named_modules():
        if n in eligible:
            out[n] = list(choices)
        elif (layers == "all" and isinstance(m, (nn.Conv2d, nn.Linear))
              and type(base.get_submodule(n)) is not type(m)):  # quantized by winoq.quantize
            out[n] = [label for label in choices if label[0] == "direct"]
    return out


def uniform_plan(label, tables: dict) -> dict:
    """The plan of the uniform model ``label``: each layer of ``tables`` (``{layer: {label: ...}}``)
    takes ``label``, or the direct choice of the same bits where it cannot run ``label``'s tile."""
    return {n: label if label in t else ("direct", label[1]) for n, t in tables.items()}


def _mults(layer: nn.Module, y: torch.Tensor, tile) -> float:
    """Multiplications per sample of ``layer`` computing its output ``y`` (a batch) with ``tile``."""
    per_output = layer.in_features if isinstance(layer, nn.Linear) else \
        layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
    if tile == "direct":
        return float(y[0].numel() * per_output)
    m, k = int(tile[1:]), layer.kernel_size[0]  # Winograd-eligible: square kernel, stride 1
    cout, oh, ow = y.shape[-3:]
    return float(math.ceil(oh / m) * math.ceil(ow / m) * (m + k - 1) ** 2 * layer.in_channels * cout)


def _thread_time(fn, repeats=3) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.thread_time()
        fn()
        ts.append(time.thread_time() - t0)
    return statistics.median(ts)


def fastest_cpu_kernel() -> str:
    """The compiled fixed-point kernel when it is built here, else the PyTorch integer kernel."""
    from ..kernels import cpu

    return "cpu" if cpu.available() else "int-cpu"


def _relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((y - ref) ** 2).sum() / (ref ** 2).sum().clamp_min(1e-30))


def output_sensitivity(model: nn.Module, choices: dict, names, x: torch.Tensor, progress: bool = False) -> dict:
    """``{layer: {label: relative network output error}}`` with only ``layer`` quantized as ``label``
    (in the BatchNorm-folded float model, the layout of every choice's quantized model). ``names``:
    a list of layers (each takes every label) or ``{layer: [labels]}``."""
    from ..api import _replace
    from ..batchnorm import fold_batchnorm

    folded = copy.deepcopy(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fold_batchnorm(folded)
    out = {}
    with torch.no_grad():
        ref = folded(x)
        for n in tqdm(names, desc="network output error per layer", unit="layer", disable=not progress):
            original = folded.get_submodule(n)
            for label in (names[n] if isinstance(names, dict) else choices):
                _replace(folded, n, choices[label].get_submodule(n))
                out.setdefault(n, {})[label] = _relative_error(folded(x), ref)
            _replace(folded, n, original)
    return out


def integer_latency(layer: nn.Module, x: torch.Tensor, tile: str, repeats: int = 3) -> float | None:
    """Thread seconds per sample of ``layer`` (a conv) on input ``x`` as a step of winoq's compiled
    integer runtime, its requantization included, as it deploys: ``tile`` "direct" on the int8 direct
    conv, "F<m>" on the integer Winograd step (standard transforms: the kernel's speed does not depend
    on the values). None where those kernels do not run the layer (not built, a linear, grouped)."""
    from ..integer.layers import IntConv2d
    from ..integer.winograd import build_int_winograd
    from ..kernels import int_graph, int_step

    if not isinstance(layer, nn.Conv2d) or not int_graph.available():
        return None
    w = layer.weight.detach()
    s_in = float(x.abs().max().clamp_min(1e-12)) / 127
    codes = torch.round(x / s_in).clamp(-127, 127).to(torch.int8).contiguous(memory_format=torch.channels_last)
    epi = int_graph.Epilogue(torch.tensor(2**30), torch.tensor(40), -127, 127)
    if tile == "direct":
        step = IntConv2d.timing_twin(layer, "latency")
        if int_graph.cached_reason(step) is not None:
            return None
        fn = lambda: int_graph.conv(step, codes, epi)  # noqa: E731
    else:
        from ..integer import IntegerConfig

        m = int(tile[1:])
        b = layer.bias.detach().double() if layer.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
        step, _, _ = build_int_winograd("latency", layer, w.double(), b, s_in, 127, x[:2], m=m, weight_bits=8,
                                        v_bits=8, m_bits=16, transform_bits=10, scales="standard", v_clip="minmax",
                                        learn_steps=0, seed=0, v_group=32,
                                        input_rows=IntegerConfig().input_rows(m))
        if not int_step.available() or int_step.cached_reason(step) is not None:
            return None
        fn = lambda: int_graph.requantize(int_step.forward(step, codes), epi)  # noqa: E731
    with torch.no_grad():
        fn()  # warm-up: packing, first-touch of the buffers
        return _thread_time(fn, repeats) / len(x)


def joint_tables(model: nn.Module, choices: dict, calib, samples: int = 32, latency_batch: int = 8,
                 sensitivity: str = "output", layers: str = "all", progress: bool = False, latency: str = "integer"):
    """Sensitivity and cost tables of the joint ILP: ``(sensitivity, {"mults": ..., "latency": ...})``,
    each ``{layer: {label: value}}`` over :func:`planned_layers`. ``latency``: "integer" (the compiled
    integer runtime's kernels, :func:`integer_latency`) or "recipe" (the quantized layers)."""
    import winoq

    if sensitivity not in ("output", "layer"):
        raise ValueError(f"sensitivity must be 'output' or 'layer', got {sensitivity!r}")
    if latency not in LATENCY:
        raise ValueError(f"latency must be one of {LATENCY}, got {latency!r}")
    allowed = planned_layers(model, choices, layers)
    inputs = capture_layer_inputs(model, list(allowed), calib, max_samples=samples)
    mods = dict(model.named_modules())
    sens, mults, lat, timed = {}, {}, {}, {}
    for label, qm in tqdm(choices.items(), desc="measuring each layer's choices", unit="choice", disable=not progress):
        qmods = dict(qm.named_modules())
        if label[0] != "direct":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                winoq.set_kernel(qm, fastest_cpu_kernel())
        for n in (n for n, labels in allowed.items() if label in labels):
            x = inputs[n]
            with torch.no_grad():
                y = mods[n](x)
                yq = qmods[n](x)
                sens.setdefault(n, {})[label] = float(((yq - y) ** 2).sum() / (y ** 2).sum())
                if (n, label[0]) not in timed:  # the kernels store int4 and int8 weights alike: time each tile once
                    t = integer_latency(mods[n], x[:latency_batch], label[0]) if latency == "integer" else None
                    timed[n, label[0]] = t if t is not None else \
                        _thread_time(lambda: qmods[n](x[:latency_batch])) / latency_batch
                lat.setdefault(n, {})[label] = timed[n, label[0]]
            mults.setdefault(n, {})[label] = _mults(mods[n], y, label[0]) * label[1] * 8
        if label[0] != "direct":
            winoq.set_kernel(qm, "emulated")
    if sensitivity == "output":
        x = calib if isinstance(calib, torch.Tensor) else next(iter(calib))
        x = (x[0] if isinstance(x, (tuple, list)) else x)[:samples]
        sens = output_sensitivity(model, choices, allowed, x, progress)
    return sens, {"mults": mults, "latency": lat}


def logits_of(model: nn.Module, x: torch.Tensor, batch: int = 250) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


def score_logits(y: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[float, float]:
    """(fraction of rows whose top-1 class equals the float model's, relative logit error) of the
    logits ``y``: a task-level score that needs no labels. With ``labels``, the first number is the
    top-1 accuracy on them instead."""
    target = ref_logits.argmax(-1) if labels is None else labels
    return float((y.argmax(-1) == target).float().mean()), _relative_error(y, ref_logits)


def prediction_agreement(model: nn.Module, x: torch.Tensor, ref_logits: torch.Tensor, batch: int = 250,
                         labels: torch.Tensor | None = None) -> tuple[float, float]:
    """:func:`score_logits` of ``model`` on ``x``."""
    return score_logits(logits_of(model, x, batch), ref_logits, labels)


def checked_plan(model: nn.Module, choices: dict, plan: dict, costs: dict, budgets: dict, x: torch.Tensor,
                 cache: dict | None = None, labels: torch.Tensor | None = None):
    """The ILP's ``plan`` checked against every uniform choice that fits ``budgets`` by a task-level
    score on unlabelled calibration inputs ``x`` (a classifier's: logits (N, classes)): the
    candidate whose top-1 agrees most often with the float model wins, the smaller relative logit
    error breaks ties, and a full tie keeps the ILP's plan. Returns ``(plan, {"chosen": "ilp" or
    the uniform label, "scores": {candidate: (agreement, error)}})``. ``cache``: a dict reused
    across calls with the same ``x`` (any budget, with or without labels), filled here with the
    logits of the float model and of every candidate scored, so that no model is run twice.
    ``labels``: the classes of ``x`` when the check images are labelled (a validation set):
    candidates are then ranked by top-1 accuracy on them, which also credits a candidate that is
    *more* accurate than the float model, where agreement with the float model cannot.

    Why: the ILP adds single-layer output errors, and many layers at 4-bit weights together can
    err differently from that sum: on ResNet-56 the ILP's plan at uniform F(2,3)/4's cost lost 2.4
    pt to it, while the *joint* logit MSE on 32 images still ranked the ILP's plan first
    (docs/results.md section 17). Top-1 agreement with the float model is what the accuracy
    measures, without labels."""
    from ..batchnorm import fold_batchnorm

    cache = {} if cache is None else cache
    if "float" not in cache:
        folded = copy.deepcopy(model).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fold_batchnorm(folded)
        cache["float"] = logits_of(folded, x)
    ref = cache["float"]
    if ref.ndim != 2:
        raise ValueError(f"checked_plan scores classifiers (logits (N, classes)); this model returns {tuple(ref.shape)}")
    candidates = {"ilp": plan}
    for label in choices:
        uniform = uniform_plan(label, costs[next(iter(costs))])
        if all(sum(costs[k][n][uniform[n]] for n in uniform) <= b for k, b in budgets.items()):
            candidates[label_key(label)] = uniform
    found = {}
    for key, cand in candidates.items():
        logits_key = ("plan", tuple(sorted(cand.items())))
        if logits_key not in cache:
            cache[logits_key] = logits_of(assemble(choices, cand), x)
        found[key] = score_logits(cache[logits_key], ref, labels)
    best = max(found, key=lambda k: (found[k][0], -found[k][1], k == "ilp"))
    return candidates[best], {"chosen": best, "scores": found}


def plan_recipe(plan: dict, base=None, learn_steps: int = 20):
    """A :class:`winoq.Recipe` whose ``layer_plan`` gives each planned layer its tile and weight bits
    (``plan``: ``{layer: (tile label, bits)}`` from the joint ILP); ``winoq.quantize`` applies it and
    the checkpoint keeps it. ``base``: the recipe of the layers the plan does not name (default:
    the choices' own recipe, int8 direct)."""
    base = base or choice_recipe("direct", 8, learn_steps)
    return base.replace(layer_plan={n: {"weights": f"int{b}", "winograd": None if t == "direct" else int(str(t).lstrip("F"))}
                                    for n, (t, b) in plan.items()})


def assemble(choices: dict, plan: dict, base=("direct", 8)) -> nn.Module:
    """A model whose eligible layers come from ``choices[plan[layer]]`` and the rest from ``base``."""
    from ..api import _replace

    model = copy.deepcopy(choices[base])
    for layer, label in plan.items():
        _replace(model, layer, copy.deepcopy(choices[label].get_submodule(layer)))
    return model


# ----------------------------------------------------------------------------- model-level planner
BUDGETS = ("mults", "latency")
LATENCY = ("integer", "recipe")


@dataclass(frozen=True)
class JointPlanConfig:
    """What the joint tile + bits ILP plans: each layer's ``(tile, bits)`` among ``tiles`` x ``bits``
    under one budget ``cost(cheapest) + r (cost(dearest) - cost(cheapest))`` of kind ``budget``
    (``"mults"``: multiplications x weight bits x 8; ``"latency"``: measured CPU time). ``layers``:
    ``"all"`` (every conv and linear; non-Winograd layers choose direct bits) or ``"eligible"``;
    ``sensitivity``: ``"output"`` or ``"layer"`` (module docstring), on ``samples`` calibration
    images; ``learn_steps``: data-free steps of each Winograd choice's learned transform scales;
    ``latency``: what the latency costs time, "integer" (the compiled integer runtime's kernels) or
    "recipe" (the quantized layers; :func:`joint_tables`)."""

    budget: str = "mults"
    r: float = 0.5
    tiles: tuple = TILES
    bits: tuple = BITS
    layers: str = "all"
    sensitivity: str = "output"
    samples: int = 32
    learn_steps: int = 20
    latency: str = "integer"

    def __post_init__(self):
        if self.latency not in LATENCY:
            raise ValueError(f"latency must be one of {LATENCY}, got {self.latency!r}")
        if self.budget not in BUDGETS:
            raise ValueError(f"budget must be one of {BUDGETS} for the joint tile + bits plan, got {self.budget!r}")
        if not 0.0 <= self.r <= 1.0:
            raise ValueError(f"r must be in [0, 1] (e.g. 0.75, 0.5, 0.25), got {self.r}")
        bad = [t for t in self.tiles if t != "direct" and t not in (2, 3, 4, 5, 6)]
        if not self.tiles or bad:
            raise ValueError(f"tiles must be 'direct' and/or output tiles 2..6 of F(m,3), got {self.tiles!r}")
        if "direct" not in self.tiles and self.layers == "all":
            raise ValueError("tiles must include 'direct' when every layer is planned (layers='all'): the layers "
                             "Winograd cannot run (stride 2, 1x1, linear) choose among the direct choices")
        if not self.bits or not all(isinstance(b, int) and 2 <= b <= 8 for b in self.bits):
            raise ValueError(f"bits must be weight bit widths in [2, 8], got {self.bits!r}")
        if self.layers not in LAYERS:
            raise ValueError(f"layers must be one of {LAYERS}, got {self.layers!r}")
        if self.sensitivity not in ("output", "layer"):
            raise ValueError(f"sensitivity must be 'output' or 'layer', got {self.sensitivity!r}")
        if self.samples < 1 or self.learn_steps < 0:
            raise ValueError(f"samples must be >= 1 and learn_steps >= 0, got {self.samples}, {self.learn_steps}")


@dataclass
class JointPlan:
    """The joint ILP's answer: ``plan`` ``{layer: (tile label, weight bits)}`` (tile label ``"direct"``
    or ``"F4"``), its ``totals`` per cost kind, the tables it was solved on, and, when the plan was
    checked on held-out images, ``check`` (``{"chosen": "ilp" or a uniform label, "scores": ...}``)."""

    plan: dict
    budget_kind: str
    r: float
    budget: float
    totals: dict
    sensitivity: dict
    costs: dict
    solve_seconds: float = 0.0
    check: dict | None = None
    learn_steps: int = 20

    def recipe(self, base=None):
        """A :class:`winoq.Recipe` that applies the plan with ``winoq.quantize`` (saved with the checkpoint)."""
        return plan_recipe(self.plan, base, self.learn_steps)

    def integer_config(self, **overrides):
        """An :class:`winoq.integer.IntegerConfig` for the integer-only conversion of the plan: each
        layer's weight bits (int8 activations) and Winograd tile (every other layer direct)."""
        from ..integer import IntegerConfig

        return IntegerConfig(layer_bits={n: (b, 8) for n, (_, b) in self.plan.items()}, first_last_8bit=False,
                             winograd_layers={n: int(t[1:]) for n, (t, _) in self.plan.items() if t != "direct"},
                             **overrides)

    def to_json(self) -> str:
        d = asdict(self)
        d["plan"] = {n: label_key(c) for n, c in self.plan.items()}
        d["sensitivity"] = {n: {label_key(c): v for c, v in t.items()} for n, t in self.sensitivity.items()}
        d["costs"] = {k: {n: {label_key(c): v for c, v in t.items()} for n, t in c.items()}
                      for k, c in self.costs.items()}
        return json.dumps(d, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "JointPlan":
        d = json.loads(text)
        d["plan"] = {n: parse_label_key(c) for n, c in d["plan"].items()}
        d["sensitivity"] = {n: {parse_label_key(c): v for c, v in t.items()} for n, t in d["sensitivity"].items()}
        d["costs"] = {k: {n: {parse_label_key(c): v for c, v in t.items()} for n, t in c.items()}
                      for k, c in d["costs"].items()}
        return cls(**d)


def budget_range(costs: dict, kind: str) -> tuple[float, float]:
    """(cheapest, dearest) total ``kind`` cost over every plan of the tables."""
    return (sum(min(t.values()) for t in costs[kind].values()), sum(max(t.values()) for t in costs[kind].values()))


def plan_tiles(model: nn.Module, calib, config: JointPlanConfig | None = None, *, check: torch.Tensor | None = None,
               check_labels: torch.Tensor | None = None, progress: bool = True) -> tuple[JointPlan, dict]:
    """Plan each layer's Winograd tile and weight bits by the joint ILP. Returns the plan and the
    quantized choices it was assembled from (``assemble(choices, plan.plan)`` is the planned model,
    as ``winoq.quantize(model, plan.recipe())`` is). ``check``: held-out images (disjoint from
    ``calib``) on which the plan is compared with every uniform choice within the budget
    (:func:`checked_plan`; by top-1 accuracy when ``check_labels`` are given)."""
    config = config or JointPlanConfig()
    model = model.eval()
    choices = build_choices(model, config.tiles, config.bits, config.learn_steps, progress)
    sens, costs = joint_tables(model, choices, calib, samples=config.samples, sensitivity=config.sensitivity,
                               layers=config.layers, progress=progress, latency=config.latency)
    lo, hi = budget_range(costs, config.budget)
    budget = lo + config.r * (hi - lo)
    t0 = time.perf_counter()
    plan = solve_ilp(sens, costs, {config.budget: budget * (1 + 1e-12)})
    solve_s = time.perf_counter() - t0
    info = None
    if check is not None:
        plan, info = checked_plan(model, choices, plan, costs, {config.budget: budget * (1 + 1e-12)}, check,
                                  labels=check_labels)
        info = {"chosen": info["chosen"], "scores": {k: list(v) for k, v in info["scores"].items()}}
    totals = {k: sum(c[n][plan[n]] for n in plan) for k, c in costs.items()}
    return JointPlan(plan, config.budget, config.r, budget, totals, sens, costs, solve_s, info,
                     config.learn_steps), choices
