"""Stage granularities (winoq.granularity) and what each layer does with them: direct conv
inputs per pixel group within conv groups, Winograd inputs per tile or pixel block, the
int32 report of learned transforms, old checkpoints with the removed clip buffer."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import winoq
from winoq.granularity import (CONV_INPUT, WINO_TILES, DirectGranularity, StageGranularity, WinogradGranularity,
                               linear_input, table)
from winoq.modules import QuantConv2d, QuantLinear
from winoq.quantizers import Granularity
from winoq.winograd.conv import extract_tiles, stitch_tiles
from winoq.winograd.quantized import QuantWinogradConv2d, StageFormats, integer_form
from winoq.winograd.transforms import toom_cook

pytestmark = pytest.mark.usefixtures("one_thread")


def rel_err(y, ref) -> float:
    return float((y.detach() - ref).norm() / ref.norm())


def fq_int8(t: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 fake quantization of ``t`` with one scale (max |t| -> 127)."""
    s = (t.abs().max() / 127).clamp_min(1e-30)
    return torch.round(t / s).clamp(-128, 127) * s


# ----------------------------------------------------------------------------- the description
def test_stage_granularity_layouts():
    st = StageGranularity(8, ("sample", "pixel"))
    assert st.granularity(CONV_INPUT) == Granularity("group", axis=2, group_size=8, shared_dims=())
    coarse = StageGranularity(8, ("sample",))
    assert coarse.granularity(CONV_INPUT).shared_dims == (3, 4)  # conv groups never share
    assert coarse.static_keep(CONV_INPUT) == (1, 2)
    v = StageGranularity(None, ("sample", "tile"))
    g = v.granularity(WINO_TILES)
    assert g.axis == 2 and g.shared_dims == (0,) and g.group_size >= 1 << 30
    assert v.with_kinds("tap").granularity(WINO_TILES).shared_dims == ()
    assert StageGranularity(4, ("sample", "row")).granularity(linear_input(3)).shared_dims == ()
    with pytest.raises(ValueError, match="unknown granularity kinds"):
        StageGranularity(4, ("pixels",))
    with pytest.raises(ValueError, match="exactly one 'channel'"):
        st.granularity(("sample", "y", "x"))
    with pytest.raises(ValueError, match="activation granularity"):
        DirectGranularity.make(4, "coarse")
    rows = dict(table(32))
    assert set(rows) >= {"direct conv input", "Winograd input x", "Winograd V", "Winograd U", "Winograd M"}
    assert "pixel" in rows["direct conv input"] and "tile" in rows["Winograd input x"]


def test_recipe_field_reaches_layers_and_old_recipes_stay_per_sample():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2))
    for mode in ("fine", "sample", "block"):
        q = winoq.quantize(model, winoq.Recipe(winograd=4, scales="standard", activation_granularity=mode),
                           progress=False)
        assert {m.activation_granularity for m in q.modules()
                if isinstance(m, (QuantConv2d, QuantWinogradConv2d))} == {mode}
    with pytest.raises(ValueError, match="activation_granularity"):
        winoq.Recipe(activation_granularity="pixel")
    import json

    data = json.loads(winoq.Recipe().to_json())
    del data["activation_granularity"]
    old = json.dumps(data)
    assert winoq.Recipe.from_json(old).activation_granularity == "sample"


# ----------------------------------------------------------------------------- direct convs
@pytest.mark.parametrize("groups", [1, 2, 8])
def test_direct_input_is_per_pixel_and_channel_group(groups):
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=groups)
    layer = QuantConv2d.from_conv(conv, None, "int8", 2)
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    layer.double()
    ref = torch.empty_like(x)
    cg = 8 // groups
    for n in range(2):
        for i in range(5):
            for j in range(6):
                for g0 in range(0, 8, cg):  # groups of 2 channels inside each conv group
                    for c0 in range(g0, g0 + cg, min(2, cg)):
                        sl = slice(c0, min(c0 + 2, g0 + cg))
                        ref[n, sl, i, j] = fq_int8(x[n, sl, i, j])
    assert torch.allclose(layer.quantize_input(x), ref, rtol=0, atol=1e-12)
    layer.activation_granularity = "sample"
    coarse = layer.quantize_input(x)
    assert not torch.allclose(coarse, ref)


@pytest.mark.parametrize("groups", [2, 8])
@pytest.mark.parametrize("mode", ["fine", "sample"])
def test_grouped_conv_scales_never_straddle_conv_groups(groups, mode):
    """One loud channel must not zero the other conv groups (relative error was 1.0)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1, groups=groups)
    layer = QuantConv2d.from_conv(conv, "int8", "int8", 32, activation_granularity=mode)
    x = torch.randn(2, 16, 6, 6) * 1e-3
    x[:, 0] *= 1e6  # one loud channel in the first conv group
    with torch.no_grad():
        y, ref = layer(x), conv(x)
    cg = 16 // groups
    quiet = slice(cg, 16)  # output channels of the other conv groups
    assert rel_err(y[:, quiet], ref[:, quiet]) < 0.02


def test_linear_input_per_row_and_group():
    lin = nn.Linear(8, 3)
    layer = QuantLinear.from_linear(lin, None, "int8", 4)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    ref = torch.cat([torch.stack([torch.stack([fq_int8(x[a, b, c:c + 4]) for c in (0, 4)]).flatten()
                                  for b in range(5)]) for a in range(2)]).reshape(2, 5, 8)
    assert torch.allclose(layer.quantize_input(x), ref, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- Winograd input
def winograd_layer(c, k, m, groups=1, group_size=4, mode="fine", seed=0):
    torch.manual_seed(seed)
    layer = QuantWinogradConv2d(c, k, 3, m, padding=1, groups=groups, group_size=group_size,
                                formats=StageFormats("int8", None, None, None)).double()
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    layer.activation_granularity = mode
    return layer


@pytest.mark.parametrize("groups,group_size", [(1, 4), (1, 3), (2, 2), (2, None)])
@pytest.mark.parametrize("m", [2, 4])
def test_winograd_input_per_tile(m, groups, group_size):
    """Each overlapping tile quantized on its own, then the exact conv of that tile."""
    c, k = 6, 4
    layer = winograd_layer(c, k, m, groups, group_size)
    x = torch.randn(2, c, 7, 9, dtype=torch.float64)
    xp = F.pad(x, (1, 1, 1, 1))
    oh, ow = 7, 9
    tiles = extract_tiles(xp, m, 3, (oh, ow)).clone()  # (N, C, th, tw, n, n)
    cg = c // groups
    gs = cg if group_size is None else group_size
    for g0 in range(0, c, cg):
        for c0 in range(g0, g0 + cg, gs):
            sl = slice(c0, min(c0 + gs, g0 + cg))
            for n in range(2):
                for i in range(tiles.shape[2]):
                    for j in range(tiles.shape[3]):
                        tiles[n, sl, i, j] = fq_int8(tiles[n, sl, i, j])
    nb, _, th, tw, nn_, _ = tiles.shape
    flat = tiles.permute(0, 2, 3, 1, 4, 5).reshape(nb * th * tw, c, nn_, nn_)
    out = F.conv2d(flat, layer.weight, layer.bias, groups=groups)  # (N*th*tw, K, m, m)
    ref = stitch_tiles(out.reshape(nb, th, tw, k, m, m).permute(0, 3, 1, 2, 4, 5), (oh, ow))
    assert rel_err(layer(x).detach(), ref) < 1e-10


@pytest.mark.parametrize("m", [2, 4])
def test_winograd_input_per_block(m):
    c = 4
    layer = winograd_layer(c, 3, m, group_size=2, mode="block")
    x = torch.randn(1, c, 7, 6, dtype=torch.float64)
    xp = F.pad(x, (1, 1, 1, 1))  # blocks of m x m pixels of the padded grid (the tile grid)
    xq = xp.clone()
    for c0 in (0, 2):
        for by in range(0, xp.shape[2], m):
            for bx in range(0, xp.shape[3], m):
                xq[0, c0:c0 + 2, by:by + m, bx:bx + m] = fq_int8(xp[0, c0:c0 + 2, by:by + m, bx:bx + m])
    ref = F.conv2d(xq, layer.weight, layer.bias)
    assert rel_err(layer(x).detach(), ref) < 1e-10


def test_finer_input_scales_cut_the_error_of_a_loud_corner():
    layer = winograd_layer(8, 8, 4, group_size=8)
    x = torch.randn(2, 8, 16, 16, dtype=torch.float64)
    x[:, :, :2, :2] *= 100.0  # one loud corner: a per-sample scale wastes the rest of the image
    ref = F.conv2d(x, layer.weight, layer.bias, padding=1)
    errs = {}
    for mode in ("sample", "fine", "block"):
        layer.activation_granularity = mode
        errs[mode] = rel_err(layer(x).detach(), ref)
    assert errs["fine"] < errs["sample"] and errs["block"] < errs["sample"]


# ----------------------------------------------------------------------------- int32 report
def test_integer_form_exact_rationals_and_fixed_point():
    tc = toom_cook(6, 3)
    bti, den = integer_form(tc.BT)
    assert den == math.lcm(*(v.denominator for row in tc.BT_exact for v in row))
    assert torch.equal(bti, (tc.BT * den).round())
    learned = tc.AT * torch.tensor([1.0, 0.9, 1.1, 0.7, 1.3, 0.95, 1.05, 1.0], dtype=torch.float64)
    ati, den = integer_form(learned, 8)
    assert den == 256 and (ati / 256 - learned).abs().max() <= 0.5 / 256


def test_int32_report_of_learned_scales_is_the_fixed_point_pipeline():
    layer = QuantWinogradConv2d(64, 8, 3, 6, padding=1)
    before = layer.int32_report()
    s_b = torch.tensor([1.0, 0.9, 1.1, 0.7, 1.3, 0.95, 1.05, 1.0], dtype=torch.float64)
    layer.set_diagonal_scales(s_b, torch.ones(8, dtype=torch.float64))
    after = layer.int32_report()
    # S_B folds into V's requantization: the integer input transform is the Toom-Cook one
    assert after["input_transform"] == before["input_transform"]
    at, _, _ = layer.transforms(torch.float64, "cpu")
    for bits in (8, 10):
        ati = (at * 2**bits).round()
        expect = float(ati.abs().sum(1).max() ** 2 * 127)
        assert layer.int32_report(bits)["output_transform"]["worst_abs"] == expect
    assert after["output_transform"]["worst_abs"] != before["output_transform"]["worst_abs"]


def test_quantize_stores_the_int32_report_after_learning():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    q = winoq.quantize(model, winoq.Recipe(winograd=6, scales="learned", learn_steps=2, winograd_min_channels=None), progress=False)
    layers = [m for m in q.modules() if isinstance(m, QuantWinogradConv2d)]
    assert not bool((layers[0].log_sb == 0).all())  # the scales were learned
    for rep, layer in zip([r for r in q.winoq_report if r.kind == "winograd"], layers):
        assert rep.int32 == layer.int32_report()


# ----------------------------------------------------------------------------- removed clip buffer
def test_load_accepts_old_checkpoints_with_a_clip_buffer(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1))
    q = winoq.quantize(model, winoq.Recipe(winograd=4, scales="standard"), progress=False)
    assert not hasattr(q[0], "clip") and not hasattr(q[0], "weight_method")
    path = tmp_path / "new.safetensors"
    winoq.save(q, path)
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["0.clip"] = torch.ones(2)  # what checkpoints written before its removal carry
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata=meta)
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(winoq.load(old, model)(x), q(x))
