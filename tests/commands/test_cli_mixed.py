"""``winoq mixed``: plan table, JSON, plot and integer ONNX from a tiny ImageFolder."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from winoq.cli import main


def _images(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")


def test_mixed_command_writes_plan_plot_and_onnx(tmp_path, capsys):
    pytest.importorskip("onnx")
    _images(tmp_path)
    rc = main(["mixed", "--model", "cifar-resnet20", "--calib-data", str(tmp_path / "imgs"), "--calib-images", "4",
               "--trace-iters", "2", "--budget", "size", "--r", "0.25", "--out", str(tmp_path / "plan.json"),
               "--plot", str(tmp_path / "plan.png"), "--onnx", str(tmp_path / "m.onnx")])
    assert rc in (0, None)
    out = capsys.readouterr().out
    assert "layer1.0.conv1" in out and "bits" in out and "ILP" in out
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["bits"]["conv1"] == 8 and plan["totals"]["size"] <= plan["budget"] * (1 + 1e-9)
    assert (tmp_path / "plan.png").stat().st_size > 1000 and (tmp_path / "m.onnx").stat().st_size > 1000


def test_mixed_command_saves_the_plan_in_a_checkpoint(tmp_path, capsys):
    import winoq
    from winoq.algorithms.adaround import layer_weight_format
    from winoq.models import cifar_resnet20

    _images(tmp_path)
    out = tmp_path / "mixed.safetensors"
    rc = main(["mixed", "--model", "cifar-resnet20", "--calib-data", str(tmp_path / "imgs"), "--calib-images", "4",
               "--trace-iters", "2", "--budget", "bops", "--r", "0.25", "--out", str(tmp_path / "plan.json"),
               "--save", str(out)])
    assert rc in (0, None)
    bits = json.loads((tmp_path / "plan.json").read_text())["bits"]
    q = winoq.load(out, cifar_resnet20())
    plan = dict(q.winoq_recipe.layer_plan)
    assert {n: dict(c)["weights"] for n, c in plan.items()} == {n: f"int{b}" for n, b in bits.items()}
    four = [n for n, b in bits.items() if b == 4]
    assert four and all(layer_weight_format(q.get_submodule(n)).name == "int4" for n in four)
    assert "layer-plan" in capsys.readouterr().out
    assert main(["mixed", "--model", "cifar-resnet20", "--calib-data", str(tmp_path / "imgs"), "--save", str(tmp_path)]) != 0
    assert "is a directory" in capsys.readouterr().err


def test_mixed_command_with_activation_pairs(tmp_path, capsys):
    import winoq
    from winoq.mixed_precision import Plan
    from winoq.models import cifar_resnet20

    _images(tmp_path)
    out = tmp_path / "pairs.safetensors"
    rc = main(["mixed", "--model", "cifar-resnet20", "--calib-data", str(tmp_path / "imgs"), "--calib-images", "4",
               "--trace", "fisher", "--activation-term", "--budget", "bops", "--r", "0.3",
               "--out", str(tmp_path / "plan.json"), "--plot", str(tmp_path / "plan.png"), "--save", str(out)])
    assert rc in (0, None)
    text = capsys.readouterr().out
    assert "Omega(W4A8)" in text and "4-bit activations" in text
    plan = Plan.from_json((tmp_path / "plan.json").read_text())
    assert plan.bits["conv1"] == (8, 8) and set(plan.bits.values()) <= {(4, 4), (4, 8), (8, 8)}
    assert plan.totals["bops"] <= plan.budget * (1 + 1e-9)
    q = winoq.load(out, cifar_resnet20())
    saved = {n: dict(c) for n, c in dict(q.winoq_recipe.layer_plan).items()}
    assert saved == {n: {"weights": f"int{w}", "activations": f"int{a}"} for n, (w, a) in plan.bits.items()}
    assert (tmp_path / "plan.png").stat().st_size > 1000


def test_mixed_command_checks_every_output_path_before_any_work(tmp_path, capsys):
    base = ["mixed", "--model", "cifar-resnet20", "--calib-data", str(tmp_path / "no-images")]
    assert main(base + ["--out", str(tmp_path / "missing" / "plan.json")]) != 0
    assert "does not exist" in capsys.readouterr().err
    assert main(base + ["--plot", str(tmp_path)]) != 0
    err = capsys.readouterr().err
    assert "--plot" in err and "is a directory" in err and "plan.png" in err
    assert main(base + ["--onnx", str(tmp_path)]) != 0
    assert "--onnx" in capsys.readouterr().err


def test_mixed_tiles_plans_tiles_and_bits_and_saves_them(tmp_path, capsys):
    import winoq
    from winoq.mixed_precision.winograd_choice import JointPlan
    from winoq.models import cifar_resnet20
    from winoq.winograd.quantized import QuantWinogradConv2d

    _images(tmp_path)
    out = tmp_path / "joint.safetensors"
    rc = main(["mixed", "--tiles", "--model", "cifar-resnet20", "--calib-data", str(tmp_path / "imgs"),
               "--calib-images", "2", "--check-images", "2", "--learn-steps", "1", "--r", "0.3",
               "--out", str(tmp_path / "plan.json"), "--plot", str(tmp_path / "plan.png"), "--save", str(out)])
    assert rc in (0, None)
    text = capsys.readouterr().out
    assert "layer1.0.conv1" in text and "of int8 direct" in text and "check on 2 held-out images" in text
    plan = JointPlan.from_json((tmp_path / "plan.json").read_text())
    assert plan.totals["mults"] <= plan.budget * (1 + 1e-9) and len(plan.plan) == 20  # every conv and the linear
    assert plan.plan["layer2.0.conv1"][0] == "direct"                                  # stride 2: direct only
    q = winoq.load(out, cifar_resnet20())
    for n, (tile, _) in plan.plan.items():
        assert isinstance(q.get_submodule(n), QuantWinogradConv2d) == (tile != "direct"), n
    assert (tmp_path / "plan.png").stat().st_size > 1000


@pytest.mark.parametrize("args, message", [
    (["--tiles", "--budget", "bops"], "with --tiles use --budget mults or latency"),
    (["--tiles", "--trace", "fisher"], "belong to the HAWQ-V3 plan"),
    (["--budget", "mults"], "add --tiles"),
    (["--check-images", "4"], "checks the joint plan"),
    (["--tiles", "--check-images", "-1"], "--check-images and --learn-steps >= 0"),
])
def test_mixed_tiles_rejects_flags_of_the_other_plan(tmp_path, capsys, args, message):
    _images(tmp_path)
    assert main(["mixed", "--model", "cifar-resnet20", "--calib-data", str(tmp_path / "imgs"), *args]) != 0
    assert message in capsys.readouterr().err
