"""Tests for the ``winoq`` command line, the report writer and the plots.

Fast (a few seconds); nothing here needs the shared folder. The quantize -> eval round
trip is skipped when Fashion-MNIST is not installed.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

import winoq
from winoq.api import LayerReport
from winoq.cli import main

FMNIST = Path(os.environ.get("WINOQ_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
needs_fmnist = pytest.mark.skipif(not (FMNIST / "t10k-images-idx3-ubyte.gz").is_file(),
                                  reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- help / info
@pytest.mark.parametrize("command", [[], ["demo"], ["quantize"], ["eval"], ["info"]])
def test_help_of_each_command(command, capsys):
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: winoq")
    expected = {"quantize": "--weights-format", "eval": "--checkpoint", "demo": "--n-images"}
    if command and command[0] in expected:
        assert expected[command[0]] in out


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "usage: winoq" in capsys.readouterr().err


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"winoq {winoq.__version__}" in out
    assert f"torch {torch.__version__}" in out
    assert "threads" in out and "fp8_e4m3" in out and "fmnist-resnet" in out


def test_console_script_help():
    exe = shutil.which("winoq")
    if exe is None:
        pytest.skip("the winoq console script is not on PATH (pip install -e .)")
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "quantize" in proc.stdout and "demo" in proc.stdout


# ----------------------------------------------------------------------------- user errors
def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "expected an error message on stderr"
    assert "Traceback" not in "\n".join(err)
    return err[-1]


def test_unknown_model_exits_2(capsys, tmp_path):
    assert main(["quantize", "--model", "no-such-net", "--out", str(tmp_path / "q.safetensors")]) == 2
    line = _error_line(capsys)
    assert line.startswith("winoq: error: unknown model 'no-such-net'")
    assert "fmnist-resnet" in line  # lists the valid names
    assert main(["eval", "--model", "no-such-net"]) == 2


@pytest.mark.parametrize("argv, fragment", [
    (["--weights-format", "int99"], "--weights-format"),
    (["--activations", "fp9_zz"], "--activations"),
    (["--winograd", "20"], "--winograd"),
    (["--group-size", "0"], "--group-size"),
    (["--scales", "magic"], "--scales"),
])
def test_bad_options_exit_2(argv, fragment, capsys, tmp_path):
    code = main(["quantize", "--model", "fmnist-resnet", "--out", str(tmp_path / "q.safetensors"), *argv])
    assert code == 2
    line = _error_line(capsys)
    assert line.startswith("winoq: error:") and fragment in line


def test_missing_files_exit_2(capsys, tmp_path):
    assert main(["eval", "--model", "fmnist-resnet", "--checkpoint", str(tmp_path / "none.safetensors")]) == 2
    assert "not found" in _error_line(capsys)
    assert main(["quantize", "--model", str(tmp_path / "none.pth"), "--out", str(tmp_path / "q.safetensors")]) == 2
    assert "not found" in _error_line(capsys)
    assert main(["quantize", "--model", "fmnist-resnet", "--out", str(tmp_path / "nodir" / "q.safetensors")]) == 2
    assert "does not exist" in _error_line(capsys)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    assert main(["eval", "--model", "fmnist-resnet", "--checkpoint", str(bad)]) == 2
    assert "cannot load checkpoint" in _error_line(capsys)


def test_demo_without_dataset_exits_1(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("WINOQ_FASHION_MNIST", str(tmp_path / "missing"))
    assert main(["demo", "--out", str(tmp_path / "demo"), "--no-progress"]) == 1
    line = _error_line(capsys)
    assert "apt-get install dataset-fashion-mnist" in line and "bash setup.sh" in line


# ----------------------------------------------------------------------------- round trip
@needs_fmnist
def test_quantize_then_eval_checkpoint(capsys, tmp_path):
    threads = torch.get_num_threads()
    ckpt = tmp_path / "fm4.safetensors"
    assert main(["quantize", "--model", "fmnist-resnet", "--winograd", "4", "--scales", "standard",
                 "--out", str(ckpt), "--threads", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert ckpt.is_file()
    assert "layer1.0.conv1" in out and "winograd" in out and "F(4,3)" in out and "direct" in out
    assert torch.get_num_threads() == threads  # --threads does not leak out of main()

    assert main(["eval", "--model", "fmnist-resnet", "--checkpoint", str(ckpt), "--n-images", "200",
                 "--threads", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "F(4,3) standard" in out and "200 images" in out
    acc = float(out.split("top-1")[1].split("%")[0])
    assert 0.0 <= acc <= 100.0


# ----------------------------------------------------------------------------- report / plots
ROWS = [
    {"method": "FP32", "accuracy": 92.75, "drop": 0.0, "quantize_seconds": None, "eval_seconds": 1.1},
    {"method": "Winograd F(6,3) learned", "accuracy": 89.3, "drop": 3.45, "quantize_seconds": 7.2,
     "eval_seconds": 7.6},
]


def test_format_table_is_aligned():
    from winoq.report import format_table

    lines = format_table(ROWS).splitlines()
    assert len(lines) == 4 and "top-1 %" in lines[0]
    assert len({len(line) for line in lines}) == 1  # every line padded to the same width
    assert "89.30" in lines[3] and "+3.45" in lines[3] and lines[2].split()[3] == "-"


def test_markdown_report_contains_table(tmp_path):
    from winoq.report import machine_info, write_markdown_report

    img = tmp_path / "fig.png"
    img.write_bytes(PNG_MAGIC)
    rep = LayerReport("conv1", "winograd", "F(6,3)", calibration={
        "sqnr_standard_db": -16.5, "sqnr_closed_form_db": 4.6, "sqnr_learned_db": 4.9})
    path = write_markdown_report(tmp_path / "report.md", ROWS, {"model": "tiny", "n images": 10,
                                                                "machine": machine_info()},
                                 [img], layers={"F(6,3) learned": [rep]})
    text = Path(path).read_text()
    assert "| method | top-1 % | drop vs FP (pts) | quantize s | eval s |" in text
    assert "| Winograd F(6,3) learned | 89.30 | +3.45 | 7.2 | 7.6 |" in text
    assert "| FP32 | 92.75 | +0.00 | - | 1.1 |" in text
    assert "![fig](fig.png)" in text  # relative link
    assert "torch" in text and "-16.5" in text


def _tiny_layers():
    from winoq.winograd.quantized import QuantWinogradConv2d
    from winoq.winograd.scales import ScaleLearningConfig, learn_layer_scales

    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1)
    standard = QuantWinogradConv2d.from_conv(conv, 4)
    learned = QuantWinogradConv2d.from_conv(conv, 4)
    cal = learn_layer_scales(learned, ScaleLearningConfig(steps=2, batch=1, tiles=2))
    return standard, learned, LayerReport("conv", "winograd", "F(4,3)", calibration=cal)


def test_plots_write_pngs(tmp_path):
    from winoq.plots import plot_layer_sqnr, plot_tap_ranges, tap_ranges

    standard, learned, rep = _tiny_layers()
    direct = LayerReport("fc", "linear", "direct")
    p1 = plot_layer_sqnr({"F(4,3)": [rep, direct], "uncalibrated": [direct]}, tmp_path / "sqnr.png")
    p2 = plot_tap_ranges(standard, learned, tmp_path / "sub" / "taps.png")
    for p in (p1, p2):
        assert Path(p).read_bytes()[:8] == PNG_MAGIC
    ranges = tap_ranges(standard)
    assert set(ranges) == {"V", "U", "M"} and all(t.shape == (6, 6) for t in ranges.values())


def test_demo_help_names_its_outputs(capsys):
    assert main(["demo", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for name in ("report.md", "results.json", "layer_sqnr.png", "tap_ranges.png"):
        assert name in text


def test_quantize_a_local_diffusers_unet(tmp_path, capsys):
    pytest.importorskip("diffusers")
    from winoq.diffusion.diffusers_support import build_unet2d, unet2d_config

    unet = build_unet2d(unet2d_config(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4,
                                      layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                                      up_block_types=("UpBlock2D", "UpBlock2D")))
    unet.save_pretrained(tmp_path / "unet")
    out = tmp_path / "unet.w8a8.safetensors"
    rc = main(["quantize", "--model", f"diffusers:{tmp_path / 'unet'}", "--winograd", "4", "--scales", "standard", "--group-size", "8",
               "--out", str(out), "--no-progress"])
    assert rc == 0 and out.is_file()
    assert "winograd" in capsys.readouterr().out
    rc = main(["quantize", "--model", f"diffusers:{tmp_path / 'missing'}", "--out", str(out)])
    assert rc == 2
    assert "not found" in capsys.readouterr().err
    rc = main(["quantize", "--model", f"diffusers:{tmp_path / 'unet'}", "--activation-ranges", "static",
               "--out", str(out), "--no-progress"])
    assert rc == 2
    assert "calibration_inputs" in capsys.readouterr().err


# ----------------------------------------------------------------------------- calibration-data options
def _image_folder(root, n=6):
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(n // 2):
            px = (torch.rand(32, 32, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(px).save(root / c / f"{i}.png")
    return root


def test_static_ranges_and_learned_rounding_from_the_cli(capsys, tmp_path):
    calib = _image_folder(tmp_path / "calib")
    out = tmp_path / "r20.safetensors"
    assert main(["quantize", "--model", "cifar-resnet20", "--winograd", "none", "--weights-format", "int4",
                 "--rounding", "learned", "--reconstruction", "block", "--activation-ranges", "static",
                 "--calib-data", str(calib), "--calib-images", "4", "--out", str(out), "--threads", "1",
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "static-ranges" in text and "learned-rounding(block)" in text and out.is_file()


def test_recipes_needing_calibration_data_ask_for_it(capsys, tmp_path):
    out = str(tmp_path / "q.safetensors")
    assert main(["quantize", "--model", "cifar-resnet20", "--rounding", "learned", "--out", out]) == 2
    assert "--calib-data" in _error_line(capsys)
    assert main(["quantize", "--model", "cifar-resnet20", "--activation-ranges", "static", "--out", out,
                 "--calib-data", str(tmp_path / "nowhere")]) == 2
    assert "not a directory" in _error_line(capsys)
    assert main(["quantize", "--model", "cifar-resnet20", "--format-search", "weight", "--out", out]) == 2
    assert "integer format" in _error_line(capsys)
