"""Helpers of benchmarks/pruning_unet.py that need no data: the run list, the 4% / 1% point,
and redrawing the Dice plot from several result files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "pruning_unet.py"


@pytest.fixture(scope="module")
def bench(load_file_module):
    return load_file_module(BENCH, "pruning_unet_bench")


def test_runs_name_criterion_schedule_and_optionally_allocation(bench):
    assert bench.parse_runs("l1/oneshot,taylor/iterative/uniform", "global") == [
        ("l1", "oneshot", "global"), ("taylor", "iterative", "uniform")]
    assert bench.parse_runs("random/oneshot", "uniform") == [("random", "oneshot", "uniform")]
    with pytest.raises(SystemExit, match="criterion/schedule"):
        bench.parse_runs("l1", "global")


def row(ratio, dice, criterion="l1"):
    return {"criterion": criterion, "schedule": "oneshot", "allocation": "global", "target": ratio,
            "ratio_params": ratio * 1.02, "ratio_macs": ratio / 2, "dice": dice}


def test_largest_within_takes_the_largest_ratio_inside_the_loss(bench):
    rows = [row(4, 0.90), row(16, 0.83), row(64, 0.80), row(256, 0.50), row(1000, 0.81, "taylor")]
    assert bench.largest_within(rows, 0.84, 0.04)["target"] == 1000        # 0.81 >= 0.8064
    assert bench.largest_within(rows, 0.84, 0.01)["target"] == 4           # 16x: 0.83 < 0.8316
    assert bench.largest_within(rows, 0.95, 0.01) is None


def test_plot_only_merges_result_files_of_one_dataset(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "OUT", tmp_path)
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"dataset": "chase", "dense": {"dice": 0.75}, "rows": [row(4, 0.74), row(64, 0.6)]}))
    b.write_text(json.dumps({"dataset": "chase", "dense": {"dice": 0.75}, "rows": [row(64, 0.62, "taylor")]}))
    bench.main(["--dataset", "chase", "--plot-only", str(a), str(b), "--name", "merged"])
    assert (tmp_path / "merged_dice.png").stat().st_size > 1000
    c = tmp_path / "c.json"   # another dense model: refused
    c.write_text(json.dumps({"dataset": "chase", "dense": {"dice": 0.70}, "rows": []}))
    with pytest.raises(SystemExit, match="one dataset and dense model"):
        bench.main(["--dataset", "chase", "--plot-only", str(a), str(c)])


def test_reference_is_the_better_of_dense_and_its_fine_tuned_control(bench):
    assert bench.reference_dice(0.84, None) == 0.84
    assert bench.reference_dice(0.84, {"dice": 0.896}) == 0.896    # an under-trained baseline
    assert bench.reference_dice(0.75, {"dice": 0.744}) == 0.75


def test_a_control_from_another_run_must_be_of_the_same_dense_weights(bench, tmp_path):
    w = tmp_path / "dense.safetensors"
    ok = tmp_path / "control.json"
    ok.write_text(json.dumps({"weights": str(w), "dense": {"dice": 0.8}, "dense_finetuned": {"dice": 0.85}}))
    assert bench.earlier_control(ok, w, 0.8) == {"dice": 0.85}
    with pytest.raises(SystemExit, match="not a control of"):
        bench.earlier_control(ok, tmp_path / "other.safetensors", 0.8)
    with pytest.raises(SystemExit, match="run --control-only"):
        bench.earlier_control(ok, w, 0.7)
