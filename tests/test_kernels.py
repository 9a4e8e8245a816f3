"""Tests for winoq.kernels: the kernel switch, the integer CPU path (int_cpu), the
Triton kernels (under the Triton interpreter, when triton is installed) and the
CPU-independent parts of benchmarks/kernels_gpu.py.

Tolerances, against ``QuantWinogradConv2d.forward_integer`` (float64):

* int_cpu with ``dtype=float64`` on integer-valued inputs (input scale exactly 1,
  so forward_integer's own float64 pipeline is exact too): equal to 1e-12 relative
  (max abs difference / max |ref|), every configuration (hypothesis).
* on float inputs the integer codes are identical except at rounding ties of V (a
  value exactly halfway, which forward_integer's float64 noise decides either way;
  checked code by code); the outputs then agree on >= 95 % of the elements to
  1e-5 * max |ref| and to 2e-2 relative norm (one flipped code moves its tile's
  group maximum, so a whole tile group changes).
* int_cpu in float32 (the default) likewise (>= 95 %, 2e-2).
* Triton kernels (interpreter) against int_cpu in float32: int8 codes of V and M
  bit-identical; outputs to 1e-6 relative.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import winoq.kernels as kernels
from winoq.kernels import KERNELS, int_cpu, resolve_kernel, triton_available, winograd_forward
from winoq.granularity import WINO_TILES_LAST
from winoq.quantizers import compute_scale, quantize
from winoq.winograd.conv import extract_tiles, transform_2d
from winoq.winograd.quantized import QuantWinogradConv2d, StageFormats

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_layer(c, k, m, groups=1, group_size=32, scale_mode="shared", padding=1, bias=True, seed=0,
               formats=StageFormats(), padding_mode="zeros", input_scales="sample"):
    """``input_scales``: the layer's activation granularity ("sample": one input scale per sample
    and channel group, exact on ``integer_input``; "fine": per tile; "block")."""
    gen = torch.Generator().manual_seed(seed)
    layer = QuantWinogradConv2d(c, k, 3, m, padding=padding, bias=bias, groups=groups, group_size=group_size,
                                scale_mode=scale_mode, formats=formats, padding_mode=padding_mode)
    layer.activation_granularity = input_scales
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen))
        if bias:
            layer.bias.copy_(torch.randn(k, generator=gen))
    return layer


def integer_input(shape, group_size, seed=1):
    """Integers in [-127, 127] with a 127 in every (sample, input channel group): the
    input stage's scale is then exactly 1 and every stage is exact in float64."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-127, 128, shape, generator=gen).float()
    gs = shape[1] if group_size is None else min(group_size, shape[1])
    x[:, ::gs, 0, 0] = 127.0
    return x


def float_input(shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def rel_max(y, ref) -> float:
    return float((y.double() - ref).abs().max() / ref.abs().max())


def agreement(y, ref) -> tuple[float, float]:
    d = (y.double() - ref).abs()
    return float((d <= 1e-5 * ref.abs().max()).double().mean()), float(d.norm() / ref.norm())


# ----------------------------------------------------------------------------- the switch
def test_kernel_names_and_cpu_resolution():
    assert KERNELS == ("emulated", "int-cpu", "cpu", "triton", "auto")
    assert resolve_kernel("emulated", "cpu") == "emulated"
    assert resolve_kernel("int-cpu", "cpu") == "int-cpu"
    if not torch.cuda.is_available():
        assert resolve_kernel("auto", "cpu") == "emulated"
        assert resolve_kernel("auto") == "emulated"
    with pytest.raises(ValueError, match="unknown"):
        resolve_kernel("cuda-graphs", "cpu")


def test_triton_kernel_needs_cuda_and_triton(monkeypatch):
    with pytest.raises(RuntimeError, match=r"CUDA.*'emulated' works everywhere"):
        resolve_kernel("triton", "cpu")
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match=r"'triton' package") as err:
        resolve_kernel("triton", "cuda")
    assert "CUDA" not in str(err.value).split("needs")[1].split(";")[0]  # only what is missing is named
    assert resolve_kernel("auto", "cuda") == "emulated"


def test_auto_prefers_triton_on_cuda(monkeypatch):
    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_kernel("auto", "cuda") == "triton"
    assert resolve_kernel("auto", None) == "triton"
    assert resolve_kernel("auto", "cpu") == "emulated"  # CPU tensors never go to the GPU kernels
    assert resolve_kernel("triton", "cuda:0") == "triton"


def test_winograd_forward_dispatch():
    layer = make_layer(8, 6, 4, group_size=4)
    x = float_input((2, 8, 9, 10))
    torch.testing.assert_close(winograd_forward(layer, x, "emulated"), layer(x), rtol=0, atol=0)
    y = winograd_forward(layer, x, "int-cpu")
    assert y.dtype == x.dtype and y.shape == (2, 6, 9, 10)
    torch.testing.assert_close(y, int_cpu.forward(layer, x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown"):
        winograd_forward(layer, x, "fast")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            winograd_forward(layer, x, "triton")


# ----------------------------------------------------------------------------- int_cpu
@st.composite
def layer_configs(draw):
    groups = draw(st.sampled_from([1, 2, 3]))
    c = groups * draw(st.integers(1, 7))
    k = groups * draw(st.integers(1, 5))
    m = draw(st.sampled_from([2, 4, 6]))
    gs = draw(st.one_of(st.none(), st.integers(1, c + 2)))
    padding = draw(st.sampled_from([0, 1, "same"]))
    hw = (draw(st.integers(3, 13)), draw(st.integers(3, 13)))
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect"])) if padding != 0 else "zeros"
    return dict(c=c, k=k, m=m, groups=groups, group_size=gs, padding=padding, hw=hw, padding_mode=mode,
                scale_mode=draw(st.sampled_from(["shared", "shared", "tapwise"])), bias=draw(st.booleans()),
                weight_tapwise=draw(st.booleans()),
                gemm=draw(st.sampled_from(["int_mm", "float"])), batch=draw(st.integers(1, 2)),
                seed=draw(st.integers(0, 1000)))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cfg=layer_configs())
def test_int_cpu_float64_equals_forward_integer_on_integer_inputs(cfg):
    layer = make_layer(cfg["c"], cfg["k"], cfg["m"], cfg["groups"], cfg["group_size"], cfg["scale_mode"],
                       cfg["padding"], cfg["bias"], cfg["seed"], padding_mode=cfg["padding_mode"])
    layer.weight_tapwise = cfg["weight_tapwise"]
    x = integer_input((cfg["batch"], cfg["c"], *cfg["hw"]), cfg["group_size"], cfg["seed"])
    ref = layer.forward_integer(x)
    y = int_cpu.forward(layer, x, gemm=cfg["gemm"], dtype=torch.float64)
    assert y.shape == ref.shape
    assert rel_max(y, ref) <= 1e-12


def test_int_mm_and_float_gemm_are_identical():
    layer = make_layer(40, 24, 4, group_size=16)
    x = float_input((2, 40, 11, 9))
    for dtype in (torch.float32, torch.float64):
        a, ca = int_cpu.forward(layer, x, gemm="int_mm", dtype=dtype, return_codes=True)
        b, cb = int_cpu.forward(layer, x, gemm="float", dtype=dtype, return_codes=True)
        assert torch.equal(ca["acc"].double(), cb["acc"].double())  # the int32 group sums
        assert torch.equal(a, b)


def _forward_integer_v_ratio(layer, x):
    """forward_integer's V / scale, in int_cpu's (taps, C, P) layout."""
    fm = layer.formats
    x = x.double()
    at, g, bt = layer.transforms(torch.float64, "cpu")
    xp = layer.quantize_padded_input(layer.pad_input(layer.quantize_input(x)))
    tiles = layer.quantize_tiles(extract_tiles(xp, layer.m, layer.kernel_size, layer.output_hw(xp)), WINO_TILES_LAST)
    v = transform_2d(bt, tiles)
    sv = layer._per_conv_group(v, lambda t: compute_scale(t, fm.winograd_input,
                                                          layer.granularity.v.granularity(WINO_TILES_LAST))[0].expand(t.shape))
    u = v / sv
    nb, c, th, tw, n, _ = u.shape
    return u.permute(4, 5, 1, 0, 2, 3).reshape(n * n, c, -1), quantize(v, fm.winograd_input, sv).codes


@pytest.mark.parametrize("input_scales", ["sample", "fine", "block"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", ["plain", "diagonal_scales", "misaligned_groups", "free_transforms"])
def test_int_cpu_on_float_inputs(case, dtype, input_scales):
    layer = make_layer(12, 8, 4, groups=2 if case == "misaligned_groups" else 1,
                       group_size=5 if case == "misaligned_groups" else 4, input_scales=input_scales)
    if case == "diagonal_scales":
        gen = torch.Generator().manual_seed(5)
        layer.set_diagonal_scales(torch.exp(torch.rand(6, generator=gen) - 0.5),
                                  torch.exp(torch.rand(6, generator=gen) - 0.5))
    if case == "free_transforms":
        tc = layer.tc
        layer.set_free_transforms(tc.AT, tc.G, tc.BT)
        with torch.no_grad():
            layer.free_transforms["BT"][1, 0] += 0.01
    x = float_input((2, 12, 10, 9))
    ref = layer.forward_integer(x)
    y, codes = int_cpu.forward(layer, x, dtype=dtype, return_codes=True)
    if dtype == torch.float64:  # V codes identical except at exact rounding ties
        ratio, ref_codes = _forward_integer_v_ratio(layer, x)
        nb, c, th, tw, n, _ = ref_codes.shape
        ref_codes = ref_codes.permute(4, 5, 1, 0, 2, 3).reshape(n * n, c, -1).double()
        differ = codes["v"] != ref_codes
        assert bool(((ratio - ratio.floor() - 0.5).abs()[differ] < 1e-9).all())
    match, rel = agreement(y, ref)
    assert match >= 0.95 and rel <= 2e-2, (match, rel)


@pytest.mark.parametrize("fmts", [("fp8_e4m3", "int8", "int8", "int8"), ("int8", "int8", "int8", None),
                                  ("int8", "int8", "int8", "fp8_e4m3"), (None, "int8", "int8", "int8"),
                                  ("int6", "int4", "int4", "int6")])
@pytest.mark.parametrize("input_scales", ["sample", "fine"])
def test_int_cpu_other_stage_formats(fmts, input_scales):
    layer = make_layer(12, 8, 4, group_size=4, formats=StageFormats(*fmts), input_scales=input_scales)
    x = float_input((2, 12, 10, 9))
    ref = layer.forward_integer(x)
    for dtype in (torch.float64, torch.float32):
        match, rel = agreement(int_cpu.forward(layer, x, dtype=dtype), ref)
        assert match >= 0.95 and rel <= 2e-2, (fmts, dtype, match, rel)


@pytest.mark.parametrize("input_scales", ["sample", "fine", "block"])
def test_int_cpu_close_to_emulated_forward(input_scales):
    layer = make_layer(16, 16, 4, group_size=8, input_scales=input_scales)
    x = float_input((2, 16, 12, 12))
    match, rel = agreement(int_cpu.forward(layer, x), layer(x.double()).detach())
    assert match >= 0.95 and rel <= 2e-2


def test_int_cpu_weight_cache_follows_the_weights():
    layer = make_layer(8, 8, 4, group_size=4)
    x = integer_input((1, 8, 8, 8), 4)
    int_cpu.forward(layer, x)
    with torch.no_grad():
        layer.weight.mul_(-2.0)
    assert rel_max(int_cpu.forward(layer, x, dtype=torch.float64), layer.forward_integer(x)) <= 1e-12


def test_int_cpu_rejects_what_it_cannot_do():
    layer = make_layer(4, 4, 4, formats=StageFormats("int8", "fp8_e4m3", "int8", "int8"))
    with pytest.raises(ValueError, match="integer formats"):
        int_cpu.forward(layer, float_input((1, 4, 6, 6)))
    with pytest.raises(ValueError, match="int-cpu"):
        int_cpu.forward(torch.nn.Conv2d(4, 4, 3), float_input((1, 4, 6, 6)))
    layer16 = make_layer(4, 4, 4, formats=StageFormats("int8", "int12", "int8", "int8"))
    with pytest.raises(ValueError, match="fit int8"):
        int_cpu.forward(layer16, float_input((1, 4, 6, 6)), gemm="int_mm")
    x = float_input((1, 4, 6, 6))  # codes beyond int8: the exact float GEMM takes over
    assert agreement(int_cpu.forward(layer16, x), layer16.forward_integer(x))[0] >= 0.95


# ----------------------------------------------------------------------------- Triton
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


@needs_triton
def test_triton_rejects_unsupported_layers():
    from winoq.kernels import triton_winograd

    x = float_input((1, 4, 6, 6))
    with pytest.raises(NotImplementedError, match="emulated"):
        triton_winograd.forward(make_layer(4, 4, 4, scale_mode="tapwise"), x)
    with pytest.raises(NotImplementedError, match="emulated"):
        triton_winograd.forward(make_layer(4, 4, 4, padding_mode="reflect"), x)
    if not triton_winograd.interpreted():
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            triton_winograd.forward(make_layer(4, 4, 4), x)


def _triton_interpreter_checks() -> dict:
    """Run in a subprocess with TRITON_INTERPRET=1 (set before triton is imported)."""
    from winoq.kernels import triton_winograd

    assert triton_winograd.interpreted(), "TRITON_INTERPRET=1 was not in effect"
    torch.set_num_threads(1)
    report = {}
    # integer parts bit-exact: integer-valued inputs, int8 codes of V and M against int_cpu (float32)
    for name, (c, k, m, groups, gs, hw) in {"f4": (16, 16, 4, 1, 32, (9, 11)), "f6_ragged_group": (8, 4, 6, 1, 3, (7, 6)),
                                           "f2_ragged": (10, 6, 2, 1, 4, (5, 7))}.items():
        layer = make_layer(c, k, m, groups, gs)
        x = integer_input((1, c, *hw), gs)
        y, cd = triton_winograd.forward(layer, x, return_codes=True)
        yc, cc = int_cpu.forward(layer, x, return_codes=True)
        assert torch.equal(cd["v"].float().transpose(1, 2), cc["v"]), name
        assert torch.equal(cd["mq"].transpose(1, 2), cc["m"]), name
        report[name] = float((y - yc).norm() / yc.norm())
        assert report[name] <= 1e-6, (name, report[name])
    # float inputs and the other paths: outputs against int_cpu (float32)
    for name in ("diagonal_scales_misaligned_groups", "free_transforms_tapwise_u", "unquantized_input_and_m",
                 "big_group_channels_last_fp16"):
        big = name.startswith("big")
        c, k, gs, groups = (150, 40, 100, 1) if big else (12, 8, 5, 2)
        fm = StageFormats(None, "int8", "int8", None) if name.startswith("unquantized") else StageFormats()
        layer = make_layer(c, k, 4, groups, gs, formats=fm, padding=0 if name.startswith("unq") else 1,
                           bias=not name.startswith("unq"))
        layer.weight_tapwise = name.startswith("free")
        if name.startswith("diagonal"):
            gen = torch.Generator().manual_seed(5)
            layer.set_diagonal_scales(torch.exp(torch.rand(6, generator=gen) - 0.5),
                                      torch.exp(torch.rand(6, generator=gen) - 0.5))
        if name.startswith("free"):
            layer.set_free_transforms(layer.tc.AT, layer.tc.G, layer.tc.BT)
            with torch.no_grad():
                layer.free_transforms["BT"][1, 0] += 0.01
        x = float_input((1, c, 6, 7) if big else (1, c, 10, 9))
        if big:
            x = x.half().contiguous(memory_format=torch.channels_last)
        y = triton_winograd.forward(layer, x)
        yc = int_cpu.forward(layer, x.float())
        assert y.dtype == x.dtype and y.is_contiguous(memory_format=torch.channels_last) == big
        report[name] = float((y.float() - yc).norm() / yc.norm())
        assert report[name] <= (1e-3 if big else 1e-6), (name, report[name])
    # per-tile input scales (the default granularity): V codes and outputs against int_cpu
    for name, (c, k, m, groups, gs) in {"tile_input_f4_groups": (12, 8, 4, 2, 5), "tile_input_f6": (16, 8, 6, 1, 8)}.items():
        layer = make_layer(c, k, m, groups, gs, input_scales="fine")
        x = float_input((2, c, 10, 9))
        y, cd = triton_winograd.forward(layer, x, return_codes=True)
        yc, cc = int_cpu.forward(layer, x, return_codes=True)
        same = (cd["v"].float().transpose(1, 2) == cc["v"]).double().mean()
        assert same >= 0.999, (name, float(same))
        report[name] = float((y - yc).norm() / yc.norm())
        assert report[name] <= 1e-5, (name, report[name])
    return report


@needs_triton
def test_triton_kernels_under_the_interpreter():
    code = ("import json, runpy; ns = runpy.run_path(%r); print('RESULT', json.dumps(ns['_triton_interpreter_checks']()))"
            % str(Path(__file__).resolve()))
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert len(result) == 9


# ----------------------------------------------------------------------------- GPU benchmark, CPU parts
def _load_gpu_bench():
    spec = importlib.util.spec_from_file_location("kernels_gpu", REPO / "benchmarks" / "kernels_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_benchmark_shapes_and_floors(capsys):
    gb = _load_gpu_bench()
    shapes = gb.shapes()
    assert len(shapes) == 4 * 2 + 4 * 4
    assert {(s["c"], s["h"]) for s in shapes if s["model"] == "sd1.5-unet"} == {(320, 64), (640, 32), (1280, 16), (1280, 8)}
    assert {s["n"] for s in shapes if s["model"] == "sd1.5-unet"} == {1, 2, 8, 16}
    assert {s["n"] for s in shapes if s["model"].startswith("resnet")} == {1, 32}
    s = {"n": 2, "c": 64, "k": 32, "h": 8, "w": 8}
    f = gb.roofline_floor_us(s, bw_gbs=1000.0, int8_tops=100.0)
    assert f["ops"] == 2 * 2 * 32 * 64 * 9 * 64
    assert f["bytes"] == 2 * 64 * 64 * 2 + 32 * 64 * 9 + 2 * 32 * 64 * 2
    assert f["mem_us"] == pytest.approx(f["bytes"] / 1e12 * 1e6)
    assert f["compute_us"] == pytest.approx(f["ops"] / 1e14 * 1e6)
    assert f["floor_us"] == max(f["mem_us"], f["compute_us"]) and f["bound"] == "compute"
    f4 = gb.roofline_floor_us(s, bw_gbs=1000.0, int8_tops=100.0, m=4)
    assert f4["ops"] == 2 * 2 * 32 * 64 * 36 * 4  # 2x2 tiles of 6x6 taps
    assert f4["ops"] / f["ops"] == pytest.approx(36 / (9 * 16))
    gb.main(["--floors-only", "--only", "conv5_x"])
    assert "conv5_x" in capsys.readouterr().out
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="torch.cuda.is_available"):
            gb.main(["--only", "conv5_x"])
