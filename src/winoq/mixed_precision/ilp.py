"""Exact mixed-precision choice as an integer linear program (scipy.optimize.milp / HiGHS)."""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Hashable, Iterable, Mapping

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

__all__ = ["solve_ilp"]


@contextlib.contextmanager
def _c_stdout_silenced():
    """Silence the C-level stdout while HiGHS runs: some HiGHS builds print a stray debug line
    ("HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();", ERGO-Code/HiGHS
    #2783) even with display off, which lands in the middle of our tables."""
    try:
        fd = sys.__stdout__.fileno()
    except (AttributeError, OSError, ValueError):  # no real stdout (embedded interpreter): nothing to silence
        yield
        return
    sys.stdout.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def _check_tables(sensitivity, costs, budgets, ties):
    layers = list(sensitivity)
    if not layers:
        raise ValueError("sensitivity is empty: give {layer: {choice: float}} for at least one layer")
    for layer, table in sensitivity.items():
        if not table:
            raise ValueError(f"layer {layer!r} has no choices in sensitivity")
        bad = [c for c, v in table.items() if not np.isfinite(float(v))]
        if bad:
            raise ValueError(f"layer {layer!r}: sensitivity of choice {bad[0]!r} is not finite")
    for kind in budgets:
        if kind not in costs:
            raise ValueError(f"budget {kind!r} has no cost table; costs has {sorted(map(str, costs))}")
        for layer in layers:
            if layer not in costs[kind]:
                raise ValueError(f"layer {layer!r} is missing from the {kind!r} cost table")
            missing = [c for c in sensitivity[layer] if c not in costs[kind][layer]]
            if missing:
                raise ValueError(f"layer {layer!r}: choices {missing!r} have no {kind!r} cost")
            if not all(np.isfinite(float(costs[kind][layer][c])) for c in sensitivity[layer]):
                raise ValueError(f"layer {layer!r}: a {kind!r} cost is not finite")
        extra = [l for l in costs[kind] if l not in sensitivity]
        if extra:
            raise ValueError(f"layer {extra[0]!r} is in the {kind!r} cost table but missing from sensitivity")
    for group in ties:
        for layer in group:
            if layer not in sensitivity:
                raise ValueError(f"tied layer {layer!r} is missing from sensitivity")
        choices = [set(sensitivity[l]) for l in group]
        if choices and not set.intersection(*choices):
            raise ValueError(f"tied layers {list(group)!r} have no choice in common")


def _smallest_feasible(kind, sensitivity, costs, ties) -> float:
    """Least total cost of ``kind`` under the ties alone (an ILP of its own, exact)."""
    cost_only = {l: {c: float(costs[kind][l][c]) for c in t} for l, t in sensitivity.items()}
    plan = _solve(cost_only, {}, {}, ties)
    return sum(costs[kind][l][c] for l, c in plan.items())


def _solve(sensitivity, costs, budgets, ties):
    var = [(l, c) for l, t in sensitivity.items() for c in t]
    index = {v: i for i, v in enumerate(var)}
    n = len(var)
    obj = np.array([float(sensitivity[l][c]) for l, c in var])
    rows, lo, hi = [], [], []
    for layer in sensitivity:  # exactly one choice per layer
        row = np.zeros(n)
        for c in sensitivity[layer]:
            row[index[(layer, c)]] = 1
        rows.append(row); lo.append(1); hi.append(1)
    for kind, budget in budgets.items():
        row = np.array([float(costs[kind][l][c]) for l, c in var])
        rows.append(row); lo.append(-np.inf); hi.append(float(budget))
    for group in ties:  # x[a, c] == x[b, c] for every choice; choices not shared by all are off
        group = list(group)
        common = set.intersection(*(set(sensitivity[l]) for l in group))
        for l in group:
            for c in sensitivity[l]:
                if c not in common:
                    row = np.zeros(n); row[index[(l, c)]] = 1
                    rows.append(row); lo.append(0); hi.append(0)
        for a, b in zip(group, group[1:]):
            for c in common:
                row = np.zeros(n); row[index[(a, c)]] = 1; row[index[(b, c)]] = -1
                rows.append(row); lo.append(0); hi.append(0)
    with _c_stdout_silenced():
        res = milp(obj, constraints=LinearConstraint(np.array(rows), lo, hi), integrality=np.ones(n),
                   bounds=Bounds(0, 1))
    if res.status != 0 or res.x is None:
        return None
    return {l: c for (l, c), x in zip(var, res.x) if x > 0.5}


def solve_ilp(sensitivity: Mapping[Hashable, Mapping[Hashable, float]],
              costs: Mapping[str, Mapping[Hashable, Mapping[Hashable, float]]],
              budgets: Mapping[str, float], ties: Iterable[Iterable[Hashable]] = ()) -> dict:
    """``{layer: choice}`` minimising the summed ``sensitivity[layer][choice]`` such that, for every
    kind in ``budgets``, ``sum_layer costs[kind][layer][choice] <= budgets[kind]``, and the layers of
    each group in ``ties`` take the same choice. Choices are any hashable labels.

    Solved exactly with HiGHS (``scipy.optimize.milp``): one binary per (layer, choice).
    Raises ``ValueError`` naming a layer missing from a table, or, for an infeasible budget, the
    constraint and the smallest feasible value of it."""
    ties = [tuple(g) for g in ties]
    _check_tables(sensitivity, costs, budgets, ties)
    plan = _solve(sensitivity, costs, budgets, ties)
    if plan is not None:
        return plan
    for kind, budget in budgets.items():
        least = _smallest_feasible(kind, sensitivity, costs, ties)
        if least > budget:
            raise ValueError(f"budget {kind!r} = {budget:g} is infeasible: the smallest feasible {kind!r} "
                             f"budget is {least:g} (every layer at its cheapest choice, ties respected)")
    raise ValueError(f"budgets {dict(budgets)!r} are infeasible together (each alone is feasible); "
                     f"raise one of them")
