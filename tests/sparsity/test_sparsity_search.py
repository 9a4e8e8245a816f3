"""HASS search, its baselines, multi-process studies and resuming after a crash."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from winoq.sparsity import (Evaluator, Problem, SearchSpace, StudyConfig, best_under_drop, greedy_search,
                            hass_search, map_model, pareto, run_study, uniform_search, unaware_search)
from winoq.sparsity.search import Record, completed

SRC = str(Path(__file__).resolve().parents[2] / "src")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = F.relu(self.conv1(x))
        y = F.relu(self.conv2(y) + y)
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


@pytest.fixture
def problem():
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    return Problem(Evaluator(model, x, y, bits=8), map_model(model, x[:1]), SearchSpace(0.05, 0.5))


def test_pareto_and_best_under_drop():
    pts = [(1, 5), (2, 4), (2, 3), (0, 6), (1, 4)]
    assert pareto(pts) == [3, 0, 1]
    recs = [Record("x", {}, {}, acc, 0.0, [], design={"v": v}) for acc, v in ((90, 1), (89.5, 3), (87, 9))]
    assert best_under_drop(recs, 90, 1.0, key=lambda r: r.design["v"]).design["v"] == 3
    assert best_under_drop(recs, 90, 3.0, key=lambda r: r.design["v"]).design["v"] == 9
    assert best_under_drop(recs, 95, 1.0, key=lambda r: r.design["v"]) is None


def test_uniform_and_greedy(problem):
    recs = uniform_search(problem, (0.0, 0.01), (0.0, 0.1, 0.2), progress=False)
    assert len(recs) == 6
    assert recs[0].accuracy == 100.0
    assert all(set(r.tau_a) == {"conv2"} for r in recs)         # conv1's input is signed: no tau_a
    assert recs[-1].product_sparsity >= recs[0].product_sparsity
    steps = greedy_search(problem, "zcu102", step_w=0.01, step_a=0.1, max_steps=3, max_drop=50.0, progress=False)
    assert 1 <= len(steps) <= 4 and steps[0].tau_w["conv1"] == 0.0
    assert all(100.0 - s.accuracy <= 50.0 for s in steps)
    with pytest.raises(ValueError, match="step_w"):
        greedy_search(problem, "zcu102", step_w=0, progress=False)


def test_hass_and_unaware_studies_resume(problem, tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    recs = hass_search(problem, "zcu102", StudyConfig("h", url, trials=3, progress=False))
    assert len(recs) == 3 and all(r.design["platform"] == "ZCU102" for r in recs)
    assert recs[0].tau_w == {"conv1": 0.0, "conv2": 0.0}        # warm start: zero thresholds first
    assert all(0.1 <= r.dsp_fraction <= 1.0 and r.design["dsp"] <= 2520 * r.dsp_fraction for r in recs)
    more = hass_search(problem, "zcu102", StudyConfig("h", url, trials=5, progress=False))
    assert len(more) == 5 and [r.tau_w for r in more[:3]] == [r.tau_w for r in recs]
    un = unaware_search(problem, StudyConfig("u", url, trials=2, progress=False))
    assert len(un) == 2 and un[0].design is None
    with pytest.raises(ValueError, match="objective"):
        hass_search(problem, "zcu102", StudyConfig("h2", None, trials=1, progress=False), objective="latency")
    with pytest.raises(ValueError, match="known platforms"):
        hass_search(problem, "kintex", StudyConfig("h3", None, trials=1, progress=False))


def test_several_worker_processes_share_one_study(problem, tmp_path):
    url = f"sqlite:///{tmp_path / 'w.db'}"
    recs = hass_search(problem, "u250", StudyConfig("w", url, trials=4, workers=2, progress=False))
    assert len(recs) >= 4
    assert len({r.trial for r in recs}) == len(recs)
    with pytest.raises(ValueError, match="shared storage"):
        StudyConfig("w", None, trials=4, workers=2)


CRASHING = textwrap.dedent("""
    import sys, time
    from winoq.sparsity.search import StudyConfig, run_study

    def objective(trial):
        x = trial.suggest_float("x", 0, 1)
        if trial.number >= 3:
            time.sleep(600)          # the fourth trial hangs until the process is killed
        return x, 1 - x

    run_study(objective, StudyConfig("crash", sys.argv[1], trials=10, heartbeat_s=1, grace_s=2, progress=False))
""")


def test_a_killed_search_resumes_without_losing_trials(tmp_path):
    url = f"sqlite:///{tmp_path / 'c.db'}"
    script = tmp_path / "crash.py"
    script.write_text(CRASHING)
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, str(script), url], env=env)
    try:
        deadline = time.time() + 60
        study = None
        while time.time() < deadline:
            time.sleep(0.5)
            try:
                study = optuna.load_study(study_name="crash", storage=url)
            except KeyError:
                continue
            if any(t.state == optuna.trial.TrialState.RUNNING and t.number == 3 for t in study.get_trials()):
                break
        else:
            pytest.fail("the crashing search did not reach its fourth trial")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = {t.number: t.params for t in completed(optuna.load_study(study_name="crash", storage=url))}
    assert sorted(before) == [0, 1, 2]
    # past the grace period (2 s): SQLite's now() has whole seconds, so a heartbeat just before the kill
    # is stale only once the clock is 3 s on; 3.5 s leaves a margin
    time.sleep(3.5)

    def objective(trial):
        x = trial.suggest_float("x", 0, 1)
        return x, 1 - x

    study = run_study(objective, StudyConfig("crash", url, trials=6, heartbeat_s=1, grace_s=2, progress=False))
    trials = study.get_trials()
    done = completed(study)
    assert len(done) == 6
    assert {t.number: t.params for t in done if t.number in before} == before      # finished trials kept
    assert trials[3].state == optuna.trial.TrialState.FAIL                          # the killed one
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]


def test_refine_climbs_its_score_within_the_drop(problem):
    from winoq.sparsity import refine

    start = uniform_search(problem, (0.0,), (0.0,), progress=False)[0]
    hw = refine(problem, start, "hardware", "zcu102", reference_accuracy=start.accuracy, max_drop=10.0,
                step_w=0.01, step_a=0.1, layers_per_step=2, max_steps=3, progress=False)
    un = refine(problem, start, "sparsity", reference_accuracy=start.accuracy, max_drop=10.0,
                step_w=0.01, step_a=0.1, layers_per_step=2, max_steps=3, progress=False)
    assert len(hw) >= 2 and len(un) >= 2  # both took at least one step from the dense start
    per_dsp = [r.design["throughput_per_dsp"] for r in hw]
    assert all(b > a for a, b in zip(per_dsp, per_dsp[1:]))
    sparsity = [r.product_sparsity for r in un]
    assert all(b > a for a, b in zip(sparsity, sparsity[1:]))
    assert all(r.accuracy >= start.accuracy - 10.0 for r in hw + un)
    assert all(r.method == "hass-refine" for r in hw) and un[0].design is None
    strict = refine(problem, start, "hardware", "zcu102", reference_accuracy=start.accuracy, max_drop=0.0,
                    step_w=0.04, step_a=0.5, max_steps=2, progress=False)
    assert all(r.accuracy >= start.accuracy for r in strict)
    with pytest.raises(ValueError, match="score must be"):
        refine(problem, start, "speed", reference_accuracy=100.0)
    with pytest.raises(ValueError, match="unknown|platform"):
        refine(problem, start, "hardware", "nope", reference_accuracy=100.0)


def _xy(trial):
    x = trial.suggest_float("x", 0, 1)
    return x, 1 - x


def test_warm_start_trials_run_once_before_the_workers_fork(tmp_path):
    """SQLite cannot lock a waiting trial for one process: the enqueued trials run in the parent,
    so no worker ever tells a trial another one finished."""
    from optuna.trial import TrialState

    from winoq.sparsity.search import run_study

    url = f"sqlite:///{tmp_path / 'ws.db'}"
    warm = [{"x": 0.125}, {"x": 0.25}, {"x": 0.5}]
    study = run_study(_xy, StudyConfig("ws", url, trials=5, workers=2, progress=False), warm_start=warm)
    trials = study.get_trials(deepcopy=False)
    assert not [t for t in trials if t.state in (TrialState.FAIL, TrialState.WAITING)]
    assert [t.params["x"] for t in sorted(trials, key=lambda t: t.number)[:3]] == [0.125, 0.25, 0.5]
    assert sum(t.params["x"] in (0.125, 0.25, 0.5) for t in trials) == 3
