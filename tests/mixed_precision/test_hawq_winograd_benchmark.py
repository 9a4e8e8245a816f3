"""The dominance check of benchmarks/hawq_winograd.py: paired top-1 differences with a 95% interval,
and the choice of the best planned point that costs no more than each uniform choice."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "hawq_winograd.py"


@pytest.fixture(scope="module")
def bench(load_file_module):
    return load_file_module(BENCH, "hawq_winograd_bench")


def test_paired_difference_counts_discordant_images_and_tests_them_exactly(bench):
    a = torch.tensor([1, 1, 1, 0, 1, 0, 1, 1], dtype=torch.bool)
    b = torch.tensor([1, 0, 1, 0, 1, 1, 1, 0], dtype=torch.bool)
    out = bench.paired_difference(a, b)
    assert out["diff"] == pytest.approx(100 * 1 / 8)
    assert (out["only_a"], out["only_b"]) == (2, 1)
    assert out["p"] == pytest.approx(1.0)                        # 2 vs 1 of 3: no evidence
    far = bench.paired_difference(torch.ones(40, dtype=torch.bool), torch.zeros(40, dtype=torch.bool))
    assert far["p"] == pytest.approx(2 * 0.5 ** 40)              # 40 to 0: exact binomial tail
    assert bench.paired_difference(a, a) == {"diff": 0.0, "only_a": 0, "only_b": 0, "p": 1.0}


def test_dominance_takes_the_best_point_no_dearer_and_says_how_sure(bench):
    n = 400
    hits = {("uniform", "F2/4"): torch.ones(n, dtype=torch.bool),
            ("uniform", "direct/8"): torch.zeros(n, dtype=torch.bool)}
    cheap = torch.ones(n, dtype=torch.bool)
    cheap[:4] = False                             # 1 point below F2/4: 4 of 400 images, p = 0.125
    hits[("ilp", "r", 0.1)] = cheap
    hits[("ilp", "r", 0.5)] = torch.ones(n, dtype=torch.bool)
    uniform = {"F2/4": {"top1": 100.0, "mults": 1.0}, "direct/8": {"top1": 0.0, "mults": 4.0}}
    points = [{"name": "a", "key": ("ilp", "r", 0.1), "top1": 99.0, "mults": 0.9},
              {"name": "b", "key": ("ilp", "r", 0.5), "top1": 100.0, "mults": 2.0}]
    rows = {r["uniform"]: r for r in bench.dominance(uniform, points, "mults", hits)}
    assert rows["F2/4"]["point"] == "a"           # b costs more than F2/4
    assert rows["F2/4"]["diff"] == pytest.approx(-1.0)
    assert rows["F2/4"]["verdict"] == "below, not significant"
    assert rows["direct/8"]["point"] == "b" and rows["direct/8"]["verdict"] == "dominates"
    hits[("ilp", "r", 0.1)] = torch.zeros(n, dtype=torch.bool)   # far below, every image
    points[0]["top1"] = 0.0
    rows = {r["uniform"]: r for r in bench.dominance(uniform, points, "mults", hits)}
    assert rows["F2/4"]["verdict"] == "dominated"
    # a planned point that is the uniform model itself (same plan, same images right) is on the curve
    hits[("ilp", "r", 0.1)] = hits[("uniform", "F2/4")]
    points[0].update(top1=100.0, mults=1.0, plan={"a": "F2/4"})
    uniform["F2/4"]["plan"] = {"a": "F2/4"}
    rows = {r["uniform"]: r for r in bench.dominance(uniform, points, "mults", hits)}
    assert rows["F2/4"]["point"] == "a" and rows["F2/4"]["verdict"].startswith("on the curve")


def test_holm_adjusts_for_the_number_of_uniform_choices(bench):
    assert bench.holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert bench.holm([0.3, 0.9]) == pytest.approx([0.6, 0.9])     # monotone in the sorted order, capped at 1
    assert bench.holm([]) == []
    # a gap with p = 0.02 among eight uniform choices is not significant for the family
    n = 1000
    hits = {("uniform", f"u{i}"): torch.ones(n, dtype=torch.bool) for i in range(8)}
    plan = torch.ones(n, dtype=torch.bool)
    plan[:14] = False                                              # 0 / 14 discordant: p = 2^-13
    hits[("ilp", "r", 0.1)] = plan
    uniform = {f"u{i}": {"top1": 100.0, "mults": 1.0} for i in range(8)}
    points = [{"name": "a", "key": ("ilp", "r", 0.1), "top1": 98.6, "mults": 1.0}]
    rows = bench.dominance(uniform, points, "mults", hits)
    assert all(r["p"] < 0.05 / 8 and r["p_holm"] == pytest.approx(8 * r["p"]) for r in rows)
    assert all(r["verdict"] == "dominated" for r in rows)
    plan[:] = True
    plan[:7] = False                                               # 0 / 7: p = 0.016, Holm 0.125
    rows = bench.dominance(uniform, points, "mults", hits)
    assert all(0.01 < r["p"] < 0.05 and r["p_holm"] > 0.05 for r in rows)
    assert all(r["verdict"] == "below, not significant" for r in rows)


def test_curve_points_list_the_ilp_plan_and_a_different_checked_plan(bench):
    rows = [{"r": 0.1, "top1": 80.0, "mults": 1.0, "checked": {"chosen": "ilp", "top1": 80.0, "mults": 1.0}},
            {"uniform": "F2/4", "top1": 79.0, "mults": 0.5, "checked": {"chosen": "F2/4", "top1": 80.5, "mults": 0.5}}]
    pts = bench.curve_points(rows, "mults")
    assert [p["key"] for p in pts] == [("ilp", "r", 0.1), ("ilp", "uniform", "F2/4"), ("checked", "uniform", "F2/4")]


def test_each_check_has_its_own_curve(bench):
    rows = [{"r": 0.1, "top1": 80.0, "mults": 1.0, "checked": {"chosen": "F2/4", "top1": 81.0, "mults": 0.5},
             "checked_labels": {"chosen": "direct/4", "top1": 82.0, "mults": 0.9}}]
    agree = bench.curve_points(rows, "mults")
    labelled = bench.curve_points(rows, "mults", "checked_labels")
    assert [p["key"] for p in agree] == [("ilp", "r", 0.1), ("checked", "r", 0.1)]
    assert [p["key"] for p in labelled] == [("ilp", "r", 0.1), ("checked_labels", "r", 0.1)]
    assert labelled[1]["name"] == "checked labels at r=0.1 (direct/4)"
