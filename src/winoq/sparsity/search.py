"""Searches over per-layer thresholds: hardware-aware multi-objective TPE (HASS) and its baselines.

* :func:`hass_search` -- Optuna TPE over every conv's ``(tau_w, tau_a)`` and the allocation's DSP
  budget (``dsp_fraction``; the folding itself comes from the greedy allocator of
  :mod:`.accelerator`), objectives: accuracy on the calibration images and images/s or
  images/s per DSP of the allocated design.
* :func:`unaware_search` -- the same per-layer thresholds searched for accuracy and MAC-weighted
  product sparsity alone; resources are allocated afterwards (:func:`allocate_best`).
* :func:`uniform_search` -- one ``tau_w`` and one ``tau_a`` for all layers, on a grid.
* :func:`greedy_search` -- the HASS paper's greedy baseline: from zero thresholds, step every
  layer's ``tau_w`` by ``step_w`` or every ``tau_a`` by ``step_a``, keep the step with the
  smaller accuracy loss per throughput gain, stop past a ``max_drop``-point accuracy drop.
* :func:`refine` -- per-layer coordinate steps from a found design (e.g. the best TPE trial),
  with the same number of evaluations for either objective: hardware-aware (``"hardware"``:
  steps on the layers whose engines hold the most DSPs, scored by the allocated design's
  images/s per DSP) or hardware-unaware (``"sparsity"``: steps on the layers with the most
  non-zero MACs left, scored by MAC-weighted product sparsity; resources allocated afterwards).

Every evaluated design is a :class:`Record` (thresholds, accuracy, sparsity, per-conv window
histograms), so any platform can be allocated afterwards. Optuna studies live in an RDB storage:
an SQLite file by default; several worker processes (or machines sharing a PostgreSQL / MySQL
URL) run the same study; a crashed or interrupted search resumes from its storage, keeping
every finished trial (heartbeats mark the trials of a dead worker failed; they are re-run).
"""
from __future__ import annotations

import math
import multiprocessing as mp
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .accelerator import Design, LayerSpec, allocate, get_platform
from .thresholds import Evaluation, Evaluator, SparsityConfig

OBJECTIVES = ("throughput_per_dsp", "throughput")


@dataclass(frozen=True)
class SearchSpace:
    """Ranges of the searched knobs. ``tau_w`` in ``[0, tau_w_max]`` (also capped at half a layer's
    largest |w|), ``tau_a`` in ``[0, tau_a_max]``, ``dsp_fraction`` in ``[dsp_fraction_min, 1]``."""

    tau_w_max: float = 0.05
    tau_a_max: float = 0.5
    dsp_fraction_min: float = 0.1

    def __post_init__(self):
        for name in ("tau_w_max", "tau_a_max"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be finite and > 0, got {v}")
        if not 0 < self.dsp_fraction_min <= 1:
            raise ValueError(f"dsp_fraction_min must be in (0, 1], got {self.dsp_fraction_min}")


@dataclass(frozen=True)
class StudyConfig:
    """Where and how an Optuna study runs. ``storage``: an RDB URL (``sqlite:///file.db``,
    ``postgresql://...``); ``None`` keeps the study in memory (one worker, no resume)."""

    study_name: str = "hass"
    storage: str | None = "sqlite:///hass.db"
    trials: int = 50
    workers: int = 1
    seed: int = 0
    heartbeat_s: int = 10
    grace_s: int = 30
    progress: bool = True

    def __post_init__(self):
        if self.trials < 1 or self.workers < 1:
            raise ValueError(f"trials and workers must be >= 1 (got {self.trials}, {self.workers})")
        if self.workers > 1 and self.storage is None:
            raise ValueError("several workers need a shared storage; pass storage='sqlite:///FILE.db' or an RDB URL")
        if self.heartbeat_s < 1 or self.grace_s <= self.heartbeat_s:
            raise ValueError("heartbeat_s must be >= 1 and grace_s larger than heartbeat_s")


@dataclass
class Record:
    """One evaluated threshold configuration (platform independent) and, optionally, a design."""

    method: str
    tau_w: dict
    tau_a: dict
    accuracy: float
    product_sparsity: float          # MAC-weighted over the convs
    layers: list                     # LayerStats.as_dict() per conv
    dsp_fraction: float = 1.0
    design: dict | None = None       # Design.summary() when allocated
    trial: int | None = None

    @property
    def histograms(self) -> dict:
        return {l["name"]: l["hist_mean"] for l in self.layers}

    def as_dict(self) -> dict:
        return {"method": self.method, "tau_w": self.tau_w, "tau_a": self.tau_a, "accuracy": self.accuracy,
                "product_sparsity": self.product_sparsity, "layers": self.layers, "dsp_fraction": self.dsp_fraction,
                "design": self.design, "trial": self.trial}

    @classmethod
    def from_dict(cls, d: dict) -> "Record":
        return cls(**d)


def make_record(method: str, cfg: SparsityConfig, ev: Evaluation, **kw) -> Record:
    return Record(method, dict(cfg.tau_w), dict(cfg.tau_a), ev.accuracy, ev.mac_weighted_product_sparsity(),
                  [s.as_dict() for s in ev.layers.values()], **kw)


def metric_of(design: Design, objective: str) -> float:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r} unknown; use one of {OBJECTIVES}")
    return design.throughput_per_dsp if objective == "throughput_per_dsp" else design.throughput


def allocate_record(rec: Record, specs: Sequence[LayerSpec], platform, dsp_fraction: float = 1.0,
                    sparse: bool = True) -> Design:
    """Allocate ``rec``'s sparsity (dense engines when ``sparse`` is False) on ``platform``."""
    return allocate(specs, platform, rec.histograms if sparse else None, dsp_fraction)


def allocate_best(rec: Record, specs, platform, objective: str, sparse: bool = True) -> Design:
    """The allocation afterwards of the non-hardware-aware baselines: for images/s, the greedy
    allocator on the whole platform; for images/s per DSP, the best state along its path (the
    best design of any DSP budget)."""
    return allocate(specs, platform, rec.histograms if sparse else None, 1.0,
                    best_per_dsp=(metric_of_name(objective) == "throughput_per_dsp"))


def metric_of_name(objective: str) -> str:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r} unknown; use one of {OBJECTIVES}")
    return objective


# ----------------------------------------------------------------------------- the problem
@dataclass
class Problem:
    """What every search evaluates: the model with its calibration images (an :class:`Evaluator`)
    and its pipeline mapping ``specs``."""

    evaluator: Evaluator
    specs: list[LayerSpec]
    space: SearchSpace = field(default_factory=SearchSpace)

    def suggest(self, trial) -> SparsityConfig:
        ev = self.evaluator
        tau_w = {n: trial.suggest_float(f"w:{n}", 0.0, min(self.space.tau_w_max, 0.5 * ev.max_abs_weight[n]))
                 for n in ev.names}
        tau_a = {n: trial.suggest_float(f"a:{n}", 0.0, self.space.tau_a_max) for n in ev.names if ev.relu_fed[n]}
        return ev.config(tau_w, tau_a)

    def uniform_params(self, tau_w: float, tau_a: float, dsp_fraction: float | None = None) -> dict:
        """Trial parameters of one threshold pair for all layers (to warm-start a study)."""
        ev = self.evaluator
        p = {f"w:{n}": min(tau_w, self.space.tau_w_max, 0.5 * ev.max_abs_weight[n]) for n in ev.names}
        p.update({f"a:{n}": min(tau_a, self.space.tau_a_max) for n in ev.names if ev.relu_fed[n]})
        if dsp_fraction is not None:
            p["dsp_fraction"] = dsp_fraction
        return p

    def warm_start(self, with_dsp: bool) -> list[dict]:
        """Small uniform thresholds (each dimension's low end) as the studies' first trials: TPE's
        random start alone rarely lands where accuracy is kept."""
        pairs = ((0.0, 0.0), (0.005, 0.05), (0.01, 0.1), (0.005, 0.15), (0.01, 0.2))
        return [self.uniform_params(w, a, 1.0 if with_dsp else None) for w, a in pairs]


class _HassObjective:
    """Picklable objective of the hardware-aware study (for worker processes)."""

    def __init__(self, problem: Problem, platform: str, objective: str):
        self.problem, self.platform, self.objective = problem, platform, objective

    def __call__(self, trial):
        cfg = self.problem.suggest(trial)
        frac = 1.0
        if self.objective == "throughput_per_dsp":
            frac = trial.suggest_float("dsp_fraction", self.problem.space.dsp_fraction_min, 1.0)
        rec = make_record("hass", cfg, self.problem.evaluator.evaluate(cfg), dsp_fraction=frac, trial=trial.number)
        design = allocate(self.problem.specs, self.platform, rec.histograms, frac,
                          best_per_dsp=self.objective == "throughput_per_dsp")
        rec.design = design.summary()
        trial.set_user_attr("record", rec.as_dict())
        return rec.accuracy, metric_of(design, self.objective)


class _UnawareObjective:
    def __init__(self, problem: Problem):
        self.problem = problem

    def __call__(self, trial):
        cfg = self.problem.suggest(trial)
        rec = make_record("unaware", cfg, self.problem.evaluator.evaluate(cfg), trial=trial.number)
        trial.set_user_attr("record", rec.as_dict())
        return rec.accuracy, rec.product_sparsity


# ----------------------------------------------------------------------------- studies
def _storage(cfg: StudyConfig):
    import optuna

    if cfg.storage is None:
        return None
    kwargs = {"connect_args": {"timeout": 120}} if cfg.storage.startswith("sqlite") else {}
    with warnings.catch_warnings():  # heartbeats are marked experimental; they are what makes resume safe
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(cfg.storage, engine_kwargs=kwargs, heartbeat_interval=cfg.heartbeat_s,
                                          grace_period=cfg.grace_s)


def _study(cfg: StudyConfig, directions: Sequence[str], seed: int, storage=None):
    import optuna

    sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)
    return optuna.create_study(study_name=cfg.study_name, storage=storage if storage is not None else _storage(cfg),
                               directions=list(directions), sampler=sampler, load_if_exists=True)


def completed(study) -> list:
    import optuna

    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def _run_worker(objective, cfg: StudyConfig, directions, worker: int) -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(1)
    study = _study(cfg, directions, cfg.seed + worker)
    _optimize(study, objective, cfg.trials)


def _optimize(study, objective, target: int, callbacks=()) -> None:
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    left = target - len(completed(study))
    if left > 0:
        study.optimize(objective, n_trials=left, catch=(),
                       callbacks=[MaxTrialsCallback(target, states=(TrialState.COMPLETE,)), *callbacks])


def run_study(objective: Callable, cfg: StudyConfig, directions: Sequence[str] = ("maximize", "maximize"),
              warm_start: Sequence[dict] = ()):
    """Run (or resume) ``cfg.study_name`` until it holds ``cfg.trials`` complete trials; with
    ``cfg.workers > 1`` that many processes share the storage. ``warm_start``: parameter dicts
    enqueued as the first trials of a new study. Returns the study."""
    import optuna
    from tqdm.auto import tqdm

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = _storage(cfg)
    study = _study(cfg, directions, cfg.seed, storage)
    if list(study.directions) != [optuna.study.StudyDirection.MAXIMIZE] * len(directions):
        raise ValueError(f"study {cfg.study_name!r} in {cfg.storage} has other objectives; pick another study name")
    if warm_start and not study.get_trials(deepcopy=False):
        for params in warm_start:
            study.enqueue_trial(params, skip_if_exists=True)
    done = len(completed(study))
    bar = tqdm(total=cfg.trials, initial=min(done, cfg.trials), desc=cfg.study_name, disable=not cfg.progress,
               unit="trial")
    try:
        if cfg.workers == 1:
            _optimize(study, objective, cfg.trials, callbacks=[lambda s, t: bar.update(1)])
        else:
            _run_waiting(study, objective, cfg.trials, bar)
            # fork shares the loaded model and images for free; spawn (other systems) pickles them
            # and needs the caller's script guarded by `if __name__ == "__main__":`
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            procs = [ctx.Process(target=_run_worker, args=(objective, cfg, tuple(directions), w + 1))
                     for w in range(cfg.workers)]
            for p in procs:
                p.start()
            while any(p.is_alive() for p in procs):
                time.sleep(1.0)
                bar.update(min(len(completed(study)), cfg.trials) - bar.n)
            bad = [p.exitcode for p in procs if p.exitcode != 0]
            if bad:
                raise RuntimeError(f"{len(bad)} search worker(s) failed (exit codes {bad}); the study keeps its "
                                   f"finished trials: run again to resume")
            bar.update(min(len(completed(study)), cfg.trials) - bar.n)
    finally:
        bar.close()
    return study


def _run_waiting(study, objective, target: int, bar) -> None:
    """Run the enqueued (warm-start) trials in this process before the workers start: SQLite cannot
    lock a row, so two workers could pop the same waiting trial and the second would fail on
    telling it ("Cannot tell a COMPLETE trial", seen under load)."""
    from optuna.trial import TrialState

    n = min(len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,))), target - len(completed(study)))
    if n > 0:
        study.optimize(objective, n_trials=n, catch=(), callbacks=[lambda s, t: bar.update(1)])


def records_of(study) -> list[Record]:
    return [Record.from_dict(t.user_attrs["record"]) for t in completed(study) if "record" in t.user_attrs]


def hass_search(problem: Problem, platform: str, cfg: StudyConfig, objective: str = "throughput_per_dsp") -> list[Record]:
    """Hardware-aware TPE (see the module docstring); returns every finished trial's record."""
    get_platform(platform)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r} unknown; use one of {OBJECTIVES}")
    return records_of(run_study(_HassObjective(problem, platform, objective), cfg,
                                warm_start=problem.warm_start(objective == "throughput_per_dsp")))


def unaware_search(problem: Problem, cfg: StudyConfig) -> list[Record]:
    """Per-layer thresholds searched for accuracy and product sparsity only (no hardware)."""
    return records_of(run_study(_UnawareObjective(problem), cfg, warm_start=problem.warm_start(False)))


def uniform_search(problem: Problem, tau_w_grid: Sequence[float], tau_a_grid: Sequence[float],
                   progress: bool = True) -> list[Record]:
    """One threshold pair for all layers, every pair of the two grids."""
    from tqdm.auto import tqdm

    ev = problem.evaluator
    pairs = [(w, a) for w in tau_w_grid for a in tau_a_grid]
    out = []
    for w, a in tqdm(pairs, desc="uniform", disable=not progress, unit="config"):
        cfg = ev.uniform(w, a)
        out.append(make_record("uniform", cfg, ev.evaluate(cfg)))
    return out


def greedy_search(problem: Problem, platform: str, step_w: float = 0.001, step_a: float = 0.01,
                  max_drop: float = 2.0, max_steps: int = 50, objective: str = "throughput",
                  progress: bool = True) -> list[Record]:
    """The paper's greedy baseline (module docstring) on all layers at once; returns the design
    of every accepted step, the starting one (zero thresholds) first."""
    from tqdm.auto import tqdm

    if step_w <= 0 or step_a <= 0 or max_drop <= 0 or max_steps < 1:
        raise ValueError("step_w, step_a and max_drop must be > 0 and max_steps >= 1")
    ev, specs = problem.evaluator, problem.specs

    def assess(w: float, a: float) -> tuple[Record, float]:
        cfg = ev.uniform(w, a)
        rec = make_record("greedy", cfg, ev.evaluate(cfg))
        design = allocate_best(rec, specs, platform, objective)
        rec.design = design.summary()
        return rec, metric_of(design, objective)

    w = a = 0.0
    cur, cur_metric = assess(w, a)
    start_acc, out = cur.accuracy, [cur]
    cap_w = min(0.5 * v for v in ev.max_abs_weight.values())
    for _ in tqdm(range(max_steps), desc="greedy", disable=not progress, unit="step"):
        cands = []
        if w + step_w < cap_w:
            cands.append((w + step_w, a))
        if any(ev.relu_fed.values()):
            cands.append((w, a + step_a))
        scored = []
        for cw, ca in cands:
            rec, m = assess(cw, ca)
            loss, gain = cur.accuracy - rec.accuracy, m - cur_metric
            # smaller accuracy loss per throughput gain; steps that gain nothing rank by loss alone
            scored.append(((0, loss / gain) if gain > 0 else (1, loss), cw, ca, rec, m))
        if not scored:
            break
        _, w, a, rec, m = min(scored, key=lambda s: s[0])
        if start_acc - rec.accuracy > max_drop:
            break
        cur, cur_metric = rec, m
        out.append(rec)
    return out


REFINE_SCORES = ("hardware", "sparsity")


def refine(problem: Problem, start: Record, score: str, platform: str | None = None, *, reference_accuracy: float,
           max_drop: float = 1.0, step_w: float = 0.0025, step_a: float = 0.025, layers_per_step: int = 4,
           max_steps: int = 15, objective: str = "throughput_per_dsp", progress: bool = True) -> list[Record]:
    """Per-layer coordinate ascent from ``start`` (see the module docstring); every accepted step's
    record, ``start`` first. A step raises one layer's ``tau_w`` by ``step_w`` or ``tau_a`` by
    ``step_a``; the candidates are ``2 * layers_per_step`` such steps on the layers chosen by
    ``score``; the step with the largest score gain per point of accuracy lost (gain alone when
    nothing is lost) is taken if it stays within ``max_drop`` of ``reference_accuracy``; stops when
    no candidate gains. ``score="hardware"`` needs ``platform``."""
    from tqdm.auto import tqdm

    if score not in REFINE_SCORES:
        raise ValueError(f"score must be one of {REFINE_SCORES}, got {score!r}")
    if score == "hardware":
        get_platform(platform)
    if step_w <= 0 or step_a <= 0 or max_drop < 0 or max_steps < 1 or layers_per_step < 1:
        raise ValueError("step_w, step_a must be > 0, max_drop >= 0, max_steps and layers_per_step >= 1")
    ev, specs = problem.evaluator, problem.specs
    method = "hass-refine" if score == "hardware" else "unaware-refine"

    def assess(tau_w: dict, tau_a: dict) -> tuple[Record, float]:
        cfg = ev.config(tau_w, tau_a)
        rec = make_record(method, cfg, ev.evaluate(cfg))
        if score == "sparsity":
            return rec, rec.product_sparsity
        design = allocate(specs, platform, rec.histograms, 1.0, best_per_dsp=objective == "throughput_per_dsp")
        rec.design = design.summary()
        return rec, metric_of(design, objective)

    def targets(rec: Record) -> list[str]:
        if score == "hardware":
            dsp = {l["name"]: l["dsp"] for l in rec.design["layers"]}
            order = sorted(ev.names, key=lambda n: -dsp.get(n, 0))
        else:
            left = {l["name"]: l["macs"] * (1 - l["product_sparsity"]) for l in rec.layers}
            order = sorted(ev.names, key=lambda n: -left.get(n, 0))
        return order[:layers_per_step]

    cur, cur_score = assess(dict(start.tau_w), dict(start.tau_a))
    out = [cur]
    for _ in tqdm(range(max_steps), desc=method, disable=not progress, unit="step"):
        best = None
        for name in targets(cur):
            moves = []
            cap_w = min(problem.space.tau_w_max, 0.5 * ev.max_abs_weight[name])
            if cur.tau_w.get(name, 0.0) + step_w <= cap_w:
                moves.append(("w", name))
            if ev.relu_fed[name] and cur.tau_a.get(name, 0.0) + step_a <= problem.space.tau_a_max:
                moves.append(("a", name))
            for kind, n in moves:
                tw, ta = dict(cur.tau_w), dict(cur.tau_a)
                if kind == "w":
                    tw[n] = tw.get(n, 0.0) + step_w
                else:
                    ta[n] = ta.get(n, 0.0) + step_a
                rec, sc = assess(tw, ta)
                gain, loss = sc - cur_score, cur.accuracy - rec.accuracy
                if gain <= 0 or rec.accuracy < reference_accuracy - max_drop - 1e-9:
                    continue
                rank = gain / loss if loss > 0 else math.inf
                key = (rank, gain)
                if best is None or key > best[0]:
                    best = (key, rec, sc)
        if best is None:
            break
        _, cur, cur_score = best
        out.append(cur)
    return out


def best_under_drop(records: Sequence[Record], reference_accuracy: float, drop: float,
                    key: Callable[[Record], float]) -> Record | None:
    """The record of largest ``key`` among those within ``drop`` points of the reference."""
    ok = [r for r in records if r.accuracy >= reference_accuracy - drop - 1e-9]
    return max(ok, key=key) if ok else None


def pareto(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats in both coordinates (both maximised)."""
    idx = []
    for i, (x, y) in enumerate(points):
        if not any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for x2, y2 in points):
            idx.append(i)
    return sorted(idx, key=lambda i: points[i][0])
