"""`winoq sparsity`: platforms, a small search on a generated ImageFolder, clear errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from winoq.cli import main


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "data" / cls / f"{i}.png")
    return tmp_path


def test_platforms(capsys):
    assert main(["sparsity", "platforms"]) == 0
    out = capsys.readouterr().out
    assert "ZCU102" in out and "2520 DSP" in out and "12288 DSP" in out and "912 BRAM36" in out


def test_uniform_search_writes_records_and_plots(folder, capsys):
    out = folder / "out"
    rc = main(["sparsity", "search", "--model", "cifar-resnet20", "--data", str(folder / "data"), "--n-images", "8",
               "--method", "uniform", "--tau-w", "0", "0.01", "--tau-a", "0", "0.2", "--max-drop", "100",
               "--out", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    rec = json.loads((out / "records.json").read_text())
    assert len(rec["records"]) == 4 and rec["records"][0]["design"]["platform"] == "ZCU102"
    assert (out / "pareto.png").stat().st_size > 0 and (out / "layers.png").stat().st_size > 0
    assert "best within 100.0 pt" in capsys.readouterr().out


def test_hass_search_with_refinement(folder, capsys):
    out = folder / "hass"
    rc = main(["sparsity", "search", "--model", "cifar-resnet20", "--data", str(folder / "data"), "--n-images", "8",
               "--stats-images", "2", "--method", "hass", "--trials", "2", "--refine-steps", "1", "--max-drop", "100",
               "--storage", f"sqlite:///{folder / 'h.db'}", "--out", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    recs = json.loads((out / "records.json").read_text())["records"]
    refined = [r for r in recs if r["method"] == "hass-refine"]
    assert len(recs) == 2 + len(refined) and len(refined) <= 1
    assert all(r["design"]["throughput_per_dsp"] > 0 for r in recs)
    assert main(["sparsity", "search", "--model", "cifar-resnet20", "--data", str(folder / "data"), "--n-images", "8",
                 "--refine-steps", "-1", "--out", str(out), "--no-progress"]) != 0


@pytest.mark.parametrize("args, message", [
    (["--platform", "vu9p"], "unknown platform 'vu9p'; known platforms: zcu102, u250"),
    (["--tau-w-max", "-0.1"], "out of range"),
    (["--tau-a", "nan"], "out of range"),
    (["--tau-w-max", "0"], "tau_w_max must be finite and > 0"),
])
def test_bad_input_is_one_clear_line(folder, capsys, args, message):
    rc = main(["sparsity", "search", "--model", "cifar-resnet20", "--data", str(folder / "data"), "--n-images", "4",
               "--method", "uniform", "--out", str(folder / "o"), "--no-progress", *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err


def test_help_and_missing_subcommand(capsys):
    assert main(["sparsity", "search", "--help"]) == 0
    assert "--tau-w-max" in capsys.readouterr().out
    assert main(["sparsity"]) == 2
    assert "platforms" in capsys.readouterr().err
