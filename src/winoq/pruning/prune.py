"""Structured filter pruning of a UNetSeg to a target parameter or MAC compression ratio.

Torch-Pruning's DependencyGraph (DepGraph) groups every conv's output filters with all that
depends on them (its norm layer, the next conv's input channels, the decoder conv that reads
the skip concatenation), so removing a group keeps the network consistent and genuinely
smaller.  On top of it this module decides *which* filters go and *how many*:

* importance (``criterion``): ``l1`` / ``l2`` filter-group magnitude, ``taylor`` (|w * dL/dw|
  on a calibration batch) or ``random`` (the control), after Torch-Pruning's per-group mean
  normalisation, ranked globally across layers per unit of what a filter costs (``cost_aware``:
  importance / parameters or MACs it carries), so wide deep layers give up filters before the
  narrow full-resolution ones (ranking by importance alone takes every layer down by about the
  same fraction and leaves the first convs with one filter at high ratios);
* amount: rounds of "remove the least important filters whose estimated saving fills the
  remaining gap", re-measuring the exact parameter / MAC count after each round, until the
  target is met within ``tolerance``; every layer keeps at least ``min_filters`` filters (or all
  it has, if fewer).  The floor matters at high ratios: the cost of a filter depends on the
  current width of its neighbours, so a greedy global ranking takes whole chains of layers down
  to one filter (at 1000x with a floor of 1 the 1.9 M-parameter U-Net kept a single filter in
  13 of its 17 convs, a one-channel bottleneck at every level) while the layers next to them,
  now cheap, keep dozens;
* allocation (how many filters each layer keeps): ``global`` as above, or ``uniform``: every
  conv keeps the same fraction of its dense width (rounded, at least ``min_filters``), the
  fraction found by bisection so the network meets the target; the criterion then only picks
  *which* filters of each layer go (Torch-Pruning's local pruning with a common ratio);
* schedule: ``oneshot`` (prune to the target, then fine-tune) or ``iterative`` (``stages``
  geometric steps to the target, fine-tuning after each), with the same fine-tuning budget.

The result is a fresh plain :class:`UNetSeg` whose config records its new widths.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.segmentation import SegmentationSet, pad_to_multiple
from ..models.unet_seg import UNetSeg, count_params, measured_widths, width_slots
from .train import TrainConfig, segmentation_loss, train

CRITERIA = ("l1", "l2", "taylor", "random")
SCHEDULES = ("oneshot", "iterative")
METRICS = ("params", "macs")
ALLOCATIONS = ("global", "uniform")


class UnreachableRatioError(ValueError):
    """The requested compression needs more filters removed than the network has."""


@dataclass(frozen=True)
class PruneConfig:
    """``target_ratio``: dense / pruned ``metric`` (params or MACs), >= 1.  ``tolerance``:
    accepted relative shortfall/overshoot of the reached ratio.  ``finetune``: the total
    fine-tuning budget (its ``steps`` are split over the stages); ``calib_batch``: images used
    for the Taylor gradients."""
    target_ratio: float
    criterion: str = "l1"
    schedule: str = "oneshot"
    metric: str = "params"
    stages: int = 4
    tolerance: float = 0.05
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(steps=0))
    calib_batch: int = 8
    cost_aware: bool = True
    min_filters: int = 1
    allocation: str = "global"
    seed: int = 0

    def __post_init__(self):
        if not self.target_ratio >= 1:
            raise ValueError(f"PruneConfig.target_ratio must be >= 1 (dense / pruned), got {self.target_ratio}")
        for name, allowed in (("criterion", CRITERIA), ("schedule", SCHEDULES), ("metric", METRICS),
                              ("allocation", ALLOCATIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"PruneConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.stages < 1:
            raise ValueError(f"PruneConfig.stages must be >= 1, got {self.stages}")
        if self.min_filters < 1:
            raise ValueError(f"PruneConfig.min_filters must be >= 1, got {self.min_filters}")
        if not 0 < self.tolerance < 1:
            raise ValueError(f"PruneConfig.tolerance must be in (0, 1), got {self.tolerance}")


# ----------------------------------------------------------------------------- measuring
def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of the convs (and linears) for one forward of ``example``."""
    total = 0

    def hook(m, inp, out):
        nonlocal total
        if isinstance(m, nn.ConvTranspose2d):   # every input pixel meets the whole kernel
            total += inp[0].numel() * m.out_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups
        elif isinstance(m, nn.Conv2d):
            total += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Linear):
            total += out.numel() * m.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in handles:
            h.remove()
    return int(total)


def measure(model: nn.Module, metric: str, example: torch.Tensor) -> int:
    return count_params(model) if metric == "params" else count_macs(model, example)


def largest_ratio(model: UNetSeg, metric: str, example: torch.Tensor, dense_value: int | None = None,
                  min_filters: int = 1) -> float:
    """The compression of the narrowest network structured pruning can leave: ``min_filters``
    filters per conv (or its current width, if smaller)."""
    narrow = UNetSeg(model.config.with_widths([min(w, min_filters) for w in measured_widths(model)]))
    dense = dense_value if dense_value is not None else measure(model, metric, example)
    return dense / measure(narrow, metric, example)


# ----------------------------------------------------------------------------- importance
def make_importance(criterion: str):
    import torch_pruning as tp

    if criterion == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if criterion == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if criterion == "taylor":
        return tp.importance.GroupTaylorImportance()
    if criterion == "random":
        return tp.importance.RandomImportance()
    raise ValueError(f"unknown criterion {criterion!r}; use one of {CRITERIA}")


def _taylor_gradients(model: nn.Module, calib: tuple[torch.Tensor, torch.Tensor]) -> None:
    model.zero_grad(set_to_none=True)
    model.eval()   # BN running statistics, as at inference
    segmentation_loss(model(calib[0]), calib[1]).backward()


# ----------------------------------------------------------------------------- one pruning round
def _output_areas(model: nn.Module, example: torch.Tensor) -> dict[nn.Module, int]:
    areas = {}
    hooks = [m.register_forward_hook(lambda m, i, o: areas.__setitem__(m, o.shape[-1] * o.shape[-2]))
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return areas


def _channel_cost(DG, group, metric: str, areas: dict) -> float:
    """Estimated parameters (or MACs) removed with one channel of ``group``."""
    cost, seen = 0.0, set()
    for dep, _ in group:
        m, fn = dep.target.module, dep.handler
        if (id(m), fn) in seen or not isinstance(m, nn.Module):
            continue
        seen.add((id(m), fn))
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            k = m.kernel_size[0] * m.kernel_size[1]
            if DG.is_out_channel_pruning_fn(fn):
                c = k * m.in_channels // m.groups + (0 if m.bias is None or metric == "macs" else 1)
            elif DG.is_in_channel_pruning_fn(fn):
                c = k * m.out_channels // m.groups
            else:
                continue
            cost += c * (areas.get(m, 1) if metric == "macs" else 1)
        elif metric == "params":
            cost += sum(p.numel() for p in m.parameters(recurse=False)) / max(1, _dim(m))
    return cost


def _dim(m: nn.Module) -> int:
    return getattr(m, "num_features", None) or getattr(m, "out_channels", None) or 1


def _prune_round(model: UNetSeg, importance, metric: str, gap: float, example: torch.Tensor,
                 calib, criterion: str, cost_aware: bool = True, min_filters: int = 1) -> int:
    """Remove the least important filters whose estimated saving covers ``gap``; returns how many."""
    import torch_pruning as tp

    if criterion == "taylor":
        _taylor_gradients(model, calib)
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    areas = _output_areas(model, example) if metric == "macs" else {}
    groups = list(DG.get_all_groups(ignored_layers=[model.head], root_module_types=[nn.Conv2d, nn.ConvTranspose2d]))
    candidates, info = [], []
    with torch.no_grad():
        for gi, group in enumerate(groups):
            root = group[0].dep.target.module
            n = DG.get_out_channels(root)
            if n is None or n <= min_filters:
                continue
            scores = importance(group)
            cost = _channel_cost(DG, group, metric, areas)
            info.append((root, group[0].dep.handler, n, cost))
            if cost_aware:
                scores = scores / max(cost, 1e-12)
            for c, s in enumerate(scores.tolist()):
                candidates.append((s, len(info) - 1, c))
    if not candidates:
        return 0
    candidates.sort(key=lambda t: t[0])
    chosen: dict[int, list[int]] = {}
    saved = 0.0
    for score, k, c in candidates:
        if saved >= gap:
            break
        idxs = chosen.setdefault(k, [])
        if info[k][2] - (len(idxs) + 1) < max(min_filters, 1):   # keep min_filters per layer
            continue
        idxs.append(c)
        saved += info[k][3]
    removed = 0
    for k, idxs in chosen.items():
        root, handler, _, _ = info[k]
        group = DG.get_pruning_group(root, handler, idxs=sorted(idxs))
        if DG.check_pruning_group(group):
            group.prune()
            removed += len(idxs)
    model.zero_grad(set_to_none=True)
    return removed


@torch.enable_grad()
def prune_to_ratio(model: UNetSeg, ratio: float, metric: str, criterion: str, example: torch.Tensor,
                   dense_value: int, tolerance: float = 0.05, calib=None, seed: int = 0,
                   max_rounds: int = 200, cost_aware: bool = True, min_filters: int = 1) -> float:
    """Prune ``model`` in place until dense_value / metric >= ratio * (1 - tolerance); returns the
    ratio reached.  Raises :class:`UnreachableRatioError` with the largest reachable ratio."""
    best = largest_ratio(model, metric, example, dense_value, min_filters)
    if ratio > best:
        raise UnreachableRatioError(_unreachable(ratio, metric, best, min_filters))
    if criterion == "taylor" and calib is None:
        raise ValueError("criterion 'taylor' needs a calibration batch (images, masks) for its gradients")
    importance = make_importance(criterion)
    target = dense_value / ratio
    for r in range(max_rounds):
        current = measure(model, metric, example)
        if current <= target * (1 + tolerance):
            break
        torch.manual_seed(seed * 1000 + r)   # the random criterion's draw, reproducibly
        # aim a little below the target so the rounds converge from one side
        if _prune_round(model, importance, metric, current - target * (1 - tolerance / 2), example,
                        calib, criterion, cost_aware, min_filters) == 0:
            break
    reached = dense_value / measure(model, metric, example)
    if reached < ratio * (1 - tolerance):
        raise UnreachableRatioError(f"pruning stopped at {reached:.1f}x, short of {ratio:g}x "
                                    f"(largest reachable {best:.1f}x)")
    return reached


# ----------------------------------------------------------------------------- uniform allocation
def uniform_widths(model: UNetSeg, dense_widths: tuple[int, ...], ratio: float, metric: str,
                   example: torch.Tensor, dense_value: int, min_filters: int = 1) -> tuple[int, ...]:
    """Widths ``max(floor, round(f * dense width))`` (never above the current ones), with the
    largest fraction ``f`` whose network is at least ``ratio`` times smaller than ``dense_value``
    (or the floor widths, if no fraction reaches it)."""
    current = measured_widths(model)

    def widths(f: float) -> tuple[int, ...]:
        return tuple(min(c, max(min(min_filters, c), round(f * d))) for c, d in zip(current, dense_widths))

    cache: dict[tuple, int] = {}

    def value(w: tuple[int, ...]) -> int:
        if w not in cache:
            cache[w] = measure(UNetSeg(model.config.with_widths(w)), metric, example)
        return cache[w]

    budget = dense_value / ratio
    lo, hi = 0.0, 1.0
    if value(widths(hi)) <= budget:
        return widths(hi)
    for _ in range(40):   # value(widths(lo)) <= budget or lo is the floor; value(widths(hi)) > budget
        mid = (lo + hi) / 2
        if value(widths(mid)) <= budget:
            lo = mid
        else:
            hi = mid
        if widths(lo) == widths(hi):
            break
    return widths(lo)


def _prune_to_widths(model: UNetSeg, targets: tuple[int, ...], importance, example: torch.Tensor,
                     calib, criterion: str) -> int:
    """Remove from every conv its least important filters (its DepGraph group's scores) down to
    ``targets`` (width_slots order); returns how many filters went."""
    import torch_pruning as tp

    if criterion == "taylor":
        _taylor_gradients(model, calib)
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    plan = []
    with torch.no_grad():
        for name, target in zip(width_slots(model.config.depth), targets):
            m = model.get_submodule(name)
            n = m.out_channels
            if target >= n:
                continue
            handler = DG.get_pruner_of_module(m).prune_out_channels
            scores = importance(DG.get_pruning_group(m, handler, idxs=list(range(n))))
            drop = torch.argsort(scores.float(), stable=True)[:n - target].tolist()
            plan.append((m, handler, sorted(drop)))
    for m, handler, drop in plan:
        group = DG.get_pruning_group(m, handler, idxs=drop)
        if not DG.check_pruning_group(group):
            raise RuntimeError(f"DepGraph refused to prune {len(drop)} filters of {m}")
        group.prune()
    model.zero_grad(set_to_none=True)
    return sum(len(d) for _, _, d in plan)


def _unreachable(ratio: float, metric: str, best: float, min_filters: int) -> str:
    left = "one filter" if min_filters == 1 else f"{min_filters} filters (min_filters)"
    return (f"a {metric} compression of {ratio:g}x is not reachable: with {left} left in every conv this "
            f"U-Net is {best:.1f}x smaller at most; ask for <= {best:.1f}x")


def as_plain_unet(model: UNetSeg) -> UNetSeg:
    """A freshly built UNetSeg at the model's current widths holding its weights."""
    fresh = UNetSeg(model.config.with_widths(measured_widths(model)))
    fresh.load_state_dict(model.state_dict(), strict=True)
    return fresh.eval()


# ----------------------------------------------------------------------------- schedules
@dataclass
class PruneResult:
    model: UNetSeg
    ratio_params: float
    ratio_macs: float
    params: int
    macs: int
    history: list[dict]


def stage_targets(config: PruneConfig) -> list[float]:
    """Ratios after each stage: geometric steps for ``iterative``, the target for ``oneshot``."""
    if config.schedule == "oneshot":
        return [config.target_ratio]
    return [config.target_ratio ** ((k + 1) / config.stages) for k in range(config.stages)]


@torch.enable_grad()   # DepGraph traces with autograd; a caller's no_grad must not break it
def prune_unet(model: UNetSeg, config: PruneConfig, train_data: SegmentationSet | None = None,
               example: torch.Tensor | None = None, progress: bool = True) -> PruneResult:
    """Prune a copy of ``model`` per ``config``; fine-tunes on ``train_data`` when the budget
    ``config.finetune.steps`` > 0.  ``example``: one input at deployment size (MACs count on it)."""
    import copy

    if not isinstance(model, UNetSeg):
        raise TypeError(f"prune_unet expects a winoq UNetSeg, got {type(model).__name__}")
    if config.finetune.steps > 0 and train_data is None:
        raise ValueError("fine-tuning (config.finetune.steps > 0) needs train_data")
    if example is None:
        s = 2 ** model.config.depth * 4
        example = torch.zeros(1, model.config.in_channels, s, s)
    work = copy.deepcopy(model).eval()
    dense = {"params": count_params(work), "macs": count_macs(work, example)}
    dense_widths = measured_widths(work)
    calib = None
    if config.criterion == "taylor":
        if train_data is None:
            raise ValueError("criterion 'taylor' needs train_data for its gradients")
        g = torch.Generator().manual_seed(config.seed)
        idx = torch.randperm(len(train_data), generator=g)[:config.calib_batch]
        m = 2 ** work.config.depth   # whole images of any size: pad like at inference
        calib = (pad_to_multiple(train_data.images[idx], m)[0], pad_to_multiple(train_data.masks[idx], m)[0])
    targets = stage_targets(config)
    # fail before any work when the final target is out of reach
    best = largest_ratio(work, config.metric, example, dense[config.metric], config.min_filters)
    if config.target_ratio > best:
        raise UnreachableRatioError(_unreachable(config.target_ratio, config.metric, best, config.min_filters))
    steps_per_stage = config.finetune.steps // len(targets)
    history = []
    bar = tqdm(targets, desc=f"prune {config.criterion}/{config.schedule}", disable=not progress, leave=False)
    for k, ratio in enumerate(bar):
        if config.allocation == "uniform":
            torch.manual_seed(config.seed * 1000 + k)   # the random criterion's draw, reproducibly
            targets_w = uniform_widths(work, dense_widths, ratio, config.metric, example, dense[config.metric],
                                       config.min_filters)
            _prune_to_widths(work, targets_w, make_importance(config.criterion), example, calib, config.criterion)
            reached = dense[config.metric] / measure(work, config.metric, example)
        else:
            reached = prune_to_ratio(work, ratio, config.metric, config.criterion, example, dense[config.metric],
                                     config.tolerance, calib, config.seed + k, cost_aware=config.cost_aware,
                                     min_filters=config.min_filters)
        work = as_plain_unet(work)
        log = {"stage": k, "target": ratio, "reached": reached, "params": count_params(work)}
        if steps_per_stage > 0:
            tcfg = TrainConfig(**{**config.finetune.__dict__, "steps": steps_per_stage, "seed": config.finetune.seed + k,
                                  "pad_multiple": max(config.finetune.pad_multiple, 2 ** work.config.depth)})
            log["finetune"] = train(work, train_data, tcfg, progress=progress, desc=f"fine-tune {k}")
        history.append(log)
        bar.set_postfix(ratio=f"{reached:.1f}x")
    params, macs = count_params(work), count_macs(work, example)
    return PruneResult(work.eval(), dense["params"] / params, dense["macs"] / macs, params, macs, history)
