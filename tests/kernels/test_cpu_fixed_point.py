"""The fixed-point pipeline (winoq.winograd.fixed_point) and the compiled "cpu" kernel.

The compiled kernel must equal ``fixed_point.reference_forward`` bit for bit (torch.equal,
no tolerance) on every instruction set this CPU has, including rounding ties; the
reference itself is checked against the exact convolution and the float-transform
emulation with loose bounds (it is a quantized conv)."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import winoq
from winoq.kernels import cpu, winograd_forward
from winoq.winograd import fixed_point as fp
from winoq.winograd.quantized import QuantWinogradConv2d, StageFormats

pytestmark = pytest.mark.usefixtures("one_thread")


def compiled_isas() -> list[str]:
    if not cpu.available():
        pytest.skip("the compiled cpu kernel could not be built here (no g++ / ninja)")
    best = cpu.isa()
    return {"avx512-vnni": ["avx512-vnni", "avx2", "portable"], "avx2": ["avx2", "portable"]}.get(best, ["portable"])


# what the fixed-point kernel implements: the paper's pipeline with per-sample input scales
KERNEL_PIPELINE = dict(activation_granularity="sample", winograd_input_scales="shared", winograd_output_format=None,
                       winograd_min_channels=None)


def make_layer(c, k, m, groups=1, group_size=32, padding=1, bias=True, seed=0, learned=True, clip=(1.0, 1.0),
               formats=StageFormats()):
    gen = torch.Generator().manual_seed(seed)
    layer = QuantWinogradConv2d(c, k, 3, m, padding=padding, bias=bias, groups=groups, group_size=group_size,
                                formats=formats).eval()
    layer.activation_granularity = "sample"  # the kernel's input scales: per sample and channel group
    n = m + 2
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * 0.2)
        if bias:
            layer.bias.copy_(torch.randn(k, generator=gen))
        if learned:  # arbitrary learned diagonal scales: non-integer transforms
            layer.set_diagonal_scales(torch.rand(n, generator=gen) * 1.5 + 0.5, torch.rand(n, generator=gen) * 1.5 + 0.5)
    return layer


CASES = [  # c, k, m, groups, group_size, padding, (h, w), batch, learned, clip, bias
    (8, 6, 2, 1, 4, 1, (9, 10), 2, True, (1.0, 1.0), True),
    (33, 20, 2, 1, 8, 0, (7, 11), 1, True, (0.8, 0.9), True),
    (16, 16, 4, 4, 4, 2, (9, 9), 2, True, (1.0, 1.0), False),
    (12, 12, 4, 12, 32, 1, (8, 13), 1, True, (1.0, 0.7), True),   # depthwise
    (12, 24, 2, 12, 32, 1, (6, 6), 1, False, (1.0, 1.0), True),   # depthwise, 2 outputs per input
    (64, 40, 6, 1, 32, 1, (14, 15), 1, True, (0.9, 1.0), True),
    (32, 64, 6, 2, 16, "same", (5, 17), 2, True, (1.0, 1.0), True),
    (20, 8, 4, 1, None, 1, (11, 7), 1, True, (1.0, 1.0), True),   # one group over all channels
    (6, 10, 6, 1, 3, 1, (3, 4), 3, False, (1.0, 1.0), True),      # a single ragged tile
]


@pytest.mark.parametrize("case", CASES, ids=[f"c{c[0]}k{c[1]}F{c[2]}g{c[3]}gs{c[4]}" for c in CASES])
def test_compiled_equals_reference_bit_for_bit(case):
    c, k, m, groups, gs, pad, hw, nb, learned, clip, bias = case
    layer = make_layer(c, k, m, groups, gs, pad, bias, learned=learned, clip=clip)
    x = torch.randn(nb, c, *hw, generator=torch.Generator().manual_seed(1)) * 3
    ref = fp.reference_forward(layer, x)
    assert ref.shape == F.conv2d(x, layer.weight, None, padding=pad, groups=groups).shape
    for isa in compiled_isas():
        assert torch.equal(cpu.forward(layer, x, isa=isa), ref), isa


def _sparse_input(shape, seed):
    """Mostly zeros with isolated pixels: V of such tiles is an outer product of BT columns,
    whose ratios (e.g. 2/4 in F(4,3)) put many codes exactly on .5 before rounding."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, shape, generator=gen).float()
    return x * (torch.rand(shape, generator=gen) < 0.05)


def test_ties_round_half_away_and_match():
    layer = make_layer(4, 4, 4, group_size=1, learned=False, bias=False)
    x = _sparse_input((2, 4, 16, 16), 3)
    ref, codes = fp.reference_forward(layer, x, return_codes=True)
    p = fp.plan(layer)
    amax = codes["v"].abs().amax(dim=(-1, -2), keepdim=True).float()  # group_size 1: per channel
    pre = codes["v"].float() * torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    ties = (pre.abs() - pre.abs().floor()) == 0.5
    assert int(ties.sum()) > 10  # the input really exercises ties
    qv = codes["qv"].reshape(pre.shape)
    assert torch.equal(qv[ties].abs().float(), pre[ties].abs() + 0.5)  # away from zero
    assert p.kb == fp.DEFAULT_TRANSFORM_BITS
    for isa in compiled_isas():
        assert torch.equal(cpu.forward(layer, x, isa=isa), ref), isa


@given(st.integers(-(2**20), 2**20), st.integers(1, 12))
def test_rshift_is_round_half_away(t, k):
    exact = t / 2**k
    want = math.copysign(math.floor(abs(exact) + 0.5), exact)
    assert int(fp.rshift(torch.tensor([t]), k)) == int(want)


def test_rha_halves():
    t = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 2.4999998, -0.49999997, 8388607.5, 0.0])
    assert fp.rha(t).tolist() == [-3, -2, -1, 1, 2, 3, 2, -0.0, 8388608, 0]


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([2, 4, 6]), st.integers(0, 14), st.floats(0.25, 4.0))
def test_effective_bits_fit_int32(m, bits, spread):
    layer = make_layer(4, 4, m, learned=False)
    n = m + 2
    with torch.no_grad():
        layer.set_diagonal_scales(torch.linspace(1 / spread, spread, n), torch.ones(n))
    at, _, bt = layer.transforms(torch.float64, "cpu", fixed_point=False)
    for mat in (at, bt):
        k = fp.effective_bits(mat, bits)
        assert 0 <= k <= bits
        assert fp.int_transform_bound(fp.fixed(mat, k), k, 128) < 2**31
        # rounding error of a coefficient is at most half a step
        assert float((fp.fixed(mat, k) / 2.0**k - mat).abs().max()) <= 2.0 ** -(k + 1) + 1e-12


def test_reference_is_a_close_conv():
    """The fixed-point pipeline stays close to the exact conv and to the float-transform emulation."""
    layer = make_layer(32, 32, 4, group_size=16)
    from winoq.winograd.scales import ScaleLearningConfig, learn_layer_scales

    learn_layer_scales(layer, ScaleLearningConfig(steps=0))
    x = torch.randn(2, 32, 12, 12, generator=torch.Generator().manual_seed(2)).relu()
    exact = F.conv2d(x.double(), layer.weight.double(), layer.bias.double(), padding=1)
    ref = fp.reference_forward(layer, x).double()
    with torch.no_grad():
        emu = layer.forward_emulated(x).double()
    sq = lambda y: float(10 * torch.log10(exact.pow(2).sum() / (y - exact).pow(2).sum()))  # noqa: E731
    assert sq(ref) > 15 and abs(sq(ref) - sq(emu)) < 1.0  # measured: 18.1 and 18.4 dB


def test_emulation_uses_the_kernels_rounded_transforms():
    layer = make_layer(8, 8, 6, group_size=4)
    at, g, bt = layer.transforms(torch.float64, "cpu")
    layer.kernel = "cpu"
    at_q, g_q, bt_q = layer.transforms(torch.float64, "cpu")
    p = fp.plan(layer)
    assert torch.equal(g, g_q)
    assert torch.equal(bt_q, p.bq.double() / 2.0**p.kb) and torch.equal(at_q, p.aq.double() / 2.0**p.ka)
    assert not torch.equal(bt, bt_q)  # learned scales: BT' is not fixed point already
    # straight-through: the diagonal scales still receive gradients through the rounded transforms
    layer.log_sb.requires_grad_(True)
    x = torch.randn(1, 8, 8, 8)
    layer.train()
    layer(x).square().sum().backward()
    assert layer.log_sb.grad is not None and bool(layer.log_sb.grad.abs().sum() > 0)


def test_switch_and_recipe():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 16, 3, padding=1)).eval()
    q = winoq.quantize(model, winoq.Recipe(winograd=4, group_size=8, scales="learned", learn_steps=0, kernel="cpu", **KERNEL_PIPELINE),
                       progress=False)
    x = torch.randn(2, 8, 10, 10)
    layers = [mod for mod in q.modules() if isinstance(mod, QuantWinogradConv2d)]
    assert layers and all(mod.kernel == "cpu" for mod in layers)
    with torch.no_grad():
        y = q(x)
        h = fp.reference_forward(layers[0], x).relu()
        torch.testing.assert_close(y, fp.reference_forward(layers[1], h), rtol=0, atol=0)
        winoq.set_kernel(q, "emulated")
        assert torch.equal(layers[0].transforms(torch.float64, "cpu")[2],
                           layers[0].transforms(torch.float64, "cpu", fixed_point=False)[2])


def test_unsupported_layer_runs_emulated_with_a_warning():
    layer = QuantWinogradConv2d(4, 4, 3, 2, padding=1, scale_mode="tapwise").eval()
    layer.kernel = "cpu"
    x = torch.randn(1, 4, 6, 6)
    with pytest.warns(UserWarning, match="tapwise.*runs emulated"):
        y = winograd_forward(layer, x, "cpu")
    torch.testing.assert_close(y, layer.forward_emulated(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="fixed-point kernel.*tapwise"):
        fp.reference_forward(layer, x)


def test_missing_extension_warns_once_and_falls_back(no_compiler):
    no_compiler(cpu)
    layer = make_layer(8, 8, 4, group_size=4)
    x = torch.randn(1, 8, 9, 9)
    with pytest.warns(RuntimeWarning, match="could not be built.*Ninja is required"):
        y = winograd_forward(layer, x, "cpu")
    assert torch.equal(y, fp.reference_forward(layer, x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        winograd_forward(layer, x, "cpu")  # no second warning
    assert not cpu.available() and cpu.isa() is None


def test_input_scales_must_nest_in_v_groups():
    layer = make_layer(40, 40, 2, groups=2, group_size=16)  # conv group 1 (channels 20-39) straddles 16-31 / 32-39
    x = torch.randn(1, 40, 6, 6)
    assert "straddle" in fp.unsupported_reason(layer)
    layer.kernel = "cpu"
    with pytest.warns(UserWarning, match="straddle.*runs emulated"):
        winograd_forward(layer, x, "cpu")
    ok = make_layer(8, 8, 2, groups=2, group_size=4)
    pad, out_hw, th, tw = fp.tile_grid(ok, 6, 6)
    rx, sx, _ = fp.input_scales(ok, x[:, :8], th, tw)
    sx = sx.clone()
    sx[..., 1] *= 2  # a scale that changes inside a V group: refused, never a silent wrong sum
    with pytest.raises(ValueError, match="input scales vary inside a channel group of V"):
        fp.reference_forward(ok, x[:, :8], rx, sx)


def test_per_tile_input_scales_plug_in():
    """Finer input scales (one per sample, tile and channel group) go through the same entry."""
    layer = make_layer(8, 8, 4, group_size=4)
    x = torch.randn(2, 8, 12, 12)
    pad, out_hw, th, tw = fp.tile_grid(layer, 12, 12)
    rx, sx, _ = fp.input_scales(layer, x, th, tw)
    gen = torch.Generator().manual_seed(0)
    f = (torch.rand(2, th, tw, 2, generator=gen) + 0.5).repeat_interleave(4, -1)
    rx, sx = (rx / f).contiguous(), (sx * f).contiguous()
    ref = fp.reference_forward(layer, x, rx, sx)
    assert not torch.equal(ref, fp.reference_forward(layer, x))
    for isa in compiled_isas():
        assert torch.equal(cpu.forward(layer, x, rx, sx, isa=isa), ref)


@pytest.mark.parametrize("m", [2, 4, 6])
def test_per_tile_input_granularity_runs_compiled(m):
    """activation_granularity="fine" (the default): one input scale per sample, tile and channel
    group, the amax over the tile's pixels; the kernel runs it, bit for bit, close to the emulation."""
    layer = make_layer(24, 16, m, group_size=8)
    layer.activation_granularity = "fine"
    assert layer.granularity.input_mode == "tile" and fp.unsupported_reason(layer) is None
    x = torch.randn(2, 24, 13, 11, generator=torch.Generator().manual_seed(4)).relu() * 2
    pad, _, th, tw = fp.tile_grid(layer, 13, 11)
    rx, sx, _ = fp.input_scales(layer, x, th, tw)
    tiles = fp.padded_tiles(layer, x, pad, th, tw)  # (N, th, tw, C, n, n)
    want = tiles.abs().amax(dim=(-1, -2)).reshape(2, th, tw, 3, 8).amax(-1)  # per tile and group of 8
    torch.testing.assert_close(sx[..., ::8], want / 127, rtol=0, atol=0)
    ref = fp.reference_forward(layer, x)
    for isa in compiled_isas():
        assert torch.equal(cpu.forward(layer, x, isa=isa), ref), isa
    exact = F.conv2d(x.double(), layer.weight.double(), layer.bias.double(), padding=1)
    with torch.no_grad():
        emu = layer.forward_emulated(x).double()
    sq = lambda y: float(10 * torch.log10(exact.pow(2).sum() / (y.double() - exact).pow(2).sum()))  # noqa: E731
    assert abs(sq(ref) - sq(emu)) < 1.0


@pytest.mark.parametrize("case", CASES[:7], ids=[f"c{c[0]}k{c[1]}F{c[2]}g{c[3]}gs{c[4]}" for c in CASES[:7]])
def test_tapwise_v_and_u_run_compiled_bit_for_bit(case):
    """V and U with one scale per tap (winograd_input_scales / winograd_weight_scales = "tapwise",
    the defaults) and per-tile inputs: the compiled kernel equals the twin on every ISA build."""
    c, k, m, groups, gs, pad, hw, nb, learned, clip, bias = case
    layer = make_layer(c, k, m, groups, gs, pad, bias, learned=learned)
    layer.activation_granularity = "fine"
    layer.input_tapwise = layer.weight_tapwise = True
    assert layer.granularity.v.keeps("tap") and fp.unsupported_reason(layer) is None
    x = torch.randn(nb, c, *hw, generator=torch.Generator().manual_seed(1)) * 3
    ref, codes = fp.reference_forward(layer, x, return_codes=True)
    n = m + 2
    assert fp.plan(layer).su.reshape(n * n, -1).unique(dim=0).shape[0] > 1  # U scales differ between taps
    for isa in compiled_isas():
        assert torch.equal(cpu.forward(layer, x, isa=isa), ref), isa


@pytest.mark.parametrize("m", [2, 4, 6])
def test_per_tap_v_runs_the_exact_integer_input_transform(m):
    """With V per tap, Bq is the Toom-Cook rows as integers (BT' = diag(f) Bq exactly up to float64)
    and S_B lives in V's per-tap factor; F(2,3) / F(4,3) fit int16 lanes, F(6,3) (rows up to 21) not."""
    layer = make_layer(8, 8, m, group_size=4)
    n = m + 2
    shared = fp.plan(layer)
    assert shared.kb > 0 and not shared.input16
    assert torch.equal(shared.v_factor, torch.full((n * n,), 2.0 ** (shared.sb - 2 * shared.kb)))
    layer.input_tapwise = True
    p = fp.plan(layer)
    assert p is not shared and p.kb == 0 and p.sb == 0
    bt = layer.transforms(torch.float64, "cpu", fixed_point=False)[2]
    b_int, f = fp.exact_input_rows(layer)
    assert torch.equal(p.bq.long(), b_int)
    assert torch.allclose(f[:, None] * b_int.double(), bt, rtol=1e-15, atol=0)
    assert torch.equal(p.v_factor, torch.outer(f, f).reshape(-1).float())
    assert p.input16 == (m in (2, 4))
    assert int(b_int.abs().max()) == {2: 1, 4: 5, 6: 21}[m]
    layer.free_transforms is None and layer.set_free_transforms(*layer.transforms(torch.float64, "cpu", False))
    assert fp.exact_input_rows(layer) is None  # free (PAW) transforms keep the fixed-point BT'


@pytest.mark.parametrize("m", [4, 6])
def test_exact_input_transform_tracks_the_float_transform_emulation(m):
    """With V per tap only the output transform is fixed point: the pipeline's SQNR against the
    float64 conv equals the float-transform emulation's to 0.05 dB (measured: 0.01 dB over six
    seeds; BT' in 10-bit fixed point moved it by up to 0.1 dB either way)."""
    layer = make_layer(32, 32, m, group_size=16)
    from winoq.winograd.scales import ScaleLearningConfig, learn_layer_scales

    learn_layer_scales(layer, ScaleLearningConfig(steps=0))
    layer.activation_granularity = "fine"
    layer.input_tapwise = True
    x = torch.randn(2, 32, 12, 12, generator=torch.Generator().manual_seed(2)).relu()
    exact = F.conv2d(x.double(), layer.weight.double(), layer.bias.double(), padding=1)
    sq = lambda y: float(10 * torch.log10(exact.pow(2).sum() / (y.double() - exact).pow(2).sum()))  # noqa: E731
    with torch.no_grad():
        emu = sq(layer.forward_emulated(x))
    assert abs(sq(fp.reference_forward(layer, x)) - emu) < 0.05


@pytest.mark.parametrize("fmt", ["fp8_e4m3", None])
def test_a_float_input_stage_with_per_tap_v_runs_emulated_with_a_warning(fmt):
    from winoq.formats import parse

    layer = QuantWinogradConv2d(8, 8, 3, 4, padding=1, group_size=4,
                                formats=StageFormats(input=parse(fmt) if fmt else None)).eval()
    layer.input_tapwise = True
    layer.kernel = "cpu"
    x = torch.randn(1, 8, 8, 8)
    with pytest.warns(UserWarning, match="runs emulated"):
        y = layer(x)
    layer.kernel = "emulated"
    assert torch.equal(y, layer(x))


def test_integer_rows_that_overflow_int32_keep_the_fixed_point_input_transform():
    """Points 0, +-1/2, +-1/4, +-1/8 have integer rows up to 4096: their two-pass transform would
    overflow int32, so BT' stays k-bit fixed point (with its shift) and the kernel still matches."""
    from fractions import Fraction as Fr

    pts = (0, Fr(1, 2), Fr(-1, 2), Fr(1, 4), Fr(-1, 4), Fr(1, 8), Fr(-1, 8))
    layer = QuantWinogradConv2d(8, 8, 3, 6, padding=1, group_size=4, points=pts).eval()
    layer.input_tapwise = True
    assert fp.exact_input_rows(layer) is None
    p = fp.plan(layer)
    assert p.kb > 0 and not p.input16
    x = torch.randn(1, 8, 9, 9, generator=torch.Generator().manual_seed(3)).relu()
    ref = fp.reference_forward(layer, x)
    if cpu.available():
        assert torch.equal(cpu.forward(layer, x), ref)


def test_emulation_with_per_tap_v_runs_the_unrounded_input_transform():
    layer = make_layer(8, 8, 4, group_size=4)
    layer.input_tapwise = True
    bt = layer.transforms(torch.float64, "cpu", fixed_point=False)[2]
    layer.kernel = "cpu"
    at_q, _, bt_q = layer.transforms(torch.float64, "cpu")
    p = fp.plan(layer)
    assert torch.equal(bt_q, bt) and torch.equal(at_q, p.aq.double() / 2.0**p.ka)


def test_tapwise_v_is_closer_to_the_exact_conv_than_shared_v():
    layer = make_layer(32, 32, 6, group_size=16)
    from winoq.winograd.scales import ScaleLearningConfig, learn_layer_scales

    learn_layer_scales(layer, ScaleLearningConfig(steps=0))
    layer.activation_granularity = "fine"
    x = torch.randn(2, 32, 12, 12, generator=torch.Generator().manual_seed(2)).relu()
    exact = F.conv2d(x.double(), layer.weight.double(), layer.bias.double(), padding=1)
    sq = lambda y: float(10 * torch.log10(exact.pow(2).sum() / (y.double() - exact).pow(2).sum()))  # noqa: E731
    shared = sq(fp.reference_forward(layer, x))
    layer.input_tapwise = True
    tapwise = sq(fp.reference_forward(layer, x))
    with torch.no_grad():
        emu = sq(layer.forward_emulated(x))
    assert tapwise > shared + 1.0 and abs(tapwise - emu) < 1.0, (shared, tapwise, emu)


@pytest.mark.parametrize("case", CASES[:7], ids=[f"c{c[0]}k{c[1]}F{c[2]}g{c[3]}gs{c[4]}" for c in CASES[:7]])
def test_the_default_pipeline_with_int16_m_runs_compiled_bit_for_bit(case):
    """The default recipe's Winograd stages: per-tile input, V and U per tap, int16 M (its output
    transform in int64 at the full 10 bits, no first-pass shift)."""
    c, k, m, groups, gs, pad, hw, nb, learned, clip, bias = case
    fm = StageFormats(output=winoq.formats.parse("int16"))
    layer = make_layer(c, k, m, groups, gs, pad, bias, learned=learned, formats=fm)
    layer.activation_granularity = "fine"
    layer.input_tapwise = layer.weight_tapwise = True
    assert fp.unsupported_reason(layer) is None and fp.wide_m(layer)
    p = fp.plan(layer)
    assert (p.ka, p.sa) == (fp.DEFAULT_TRANSFORM_BITS, 0)
    x = torch.randn(nb, c, *hw, generator=torch.Generator().manual_seed(1)) * 3
    ref, codes = fp.reference_forward(layer, x, return_codes=True)
    assert int(codes["qm"].abs().max()) > 127  # really 16-bit M codes
    for isa in compiled_isas():
        assert torch.equal(cpu.forward(layer, x, isa=isa), ref), isa


def test_int16_m_is_closer_to_the_exact_conv_than_int8_m():
    from winoq.winograd.scales import ScaleLearningConfig, learn_layer_scales

    out = {}
    for fmt in ("int8", "int16"):
        layer = make_layer(32, 32, 6, group_size=16, formats=StageFormats(output=winoq.formats.parse(fmt)))
        learn_layer_scales(layer, ScaleLearningConfig(steps=0))
        layer.activation_granularity, layer.input_tapwise, layer.weight_tapwise = "fine", True, True
        x = torch.randn(2, 32, 12, 12, generator=torch.Generator().manual_seed(2)).relu()
        exact = F.conv2d(x.double(), layer.weight.double(), layer.bias.double(), padding=1)
        sq = lambda y: float(10 * torch.log10(exact.pow(2).sum() / (y.double() - exact).pow(2).sum()))  # noqa: E731
        with torch.no_grad():
            out[fmt] = sq(fp.reference_forward(layer, x)), sq(layer.forward_emulated(x))
    assert out["int16"][0] > out["int8"][0] + 1.0 and abs(out["int16"][0] - out["int16"][1]) < 0.5, out


def test_tiles_beyond_8x8_fall_back_to_the_emulation():
    layer = QuantWinogradConv2d(4, 4, 5, 6, padding=2).eval()  # F(6,5): 10x10 tiles, an older files' choice
    assert "10x10 tiles" in fp.unsupported_reason(layer)


@pytest.mark.parametrize("mode", ["fine", "sample"])
@pytest.mark.parametrize("case", CASES, ids=[f"c{c[0]}k{c[1]}F{c[2]}g{c[3]}gs{c[4]}" for c in CASES])
def test_input_zero_points_run_compiled_bit_for_bit(case, mode):
    """Input and V scales with zero points (``Recipe.activation_zero_point``, on by default):
    each tile's (or sample's) [min, max] over all 256 codes; the kernel computes the input's per
    tile itself ("fine", here with V and U per tap) or takes them from ``input_scales``
    ("sample", V shared by the taps), bit for bit the twin on every ISA."""
    c, k, m, groups, gs, pad, hw, nb, learned, clip, bias = case
    layer = make_layer(c, k, m, groups, gs, pad, bias, learned=learned)
    layer.activation_granularity = mode
    layer.input_tapwise = layer.weight_tapwise = mode == "fine"
    layer.activation_zero_point = True
    gr = layer.granularity
    assert gr.input.zero_point and gr.v.zero_point and fp.unsupported_reason(layer) is None
    x = torch.randn(nb, c, *hw, generator=torch.Generator().manual_seed(1)) * 3 + 1.5  # off-centre
    ref, codes = fp.reference_forward(layer, x, return_codes=True)
    assert int(codes["qx"].max()) > 127  # codes minus zero point reach beyond int8's range
    assert int(codes["qv"].abs().max()) > 128  # ... and so do V's
    for isa in compiled_isas():
        assert torch.equal(cpu.forward(layer, x, isa=isa), ref), isa


@pytest.mark.parametrize("m", [4, 6])
def test_input_zero_points_match_the_emulation_and_beat_symmetric(m):
    """On a post-SiLU input (nonnegative but for a small dip) zero points give the input codes
    about one more bit (~6 dB); the layer output gains less (the 8-bit V dominates here), the
    fixed point follows the emulation within 0.5 dB."""
    from winoq.winograd.scales import ScaleLearningConfig, learn_layer_scales

    layer = make_layer(32, 32, m, group_size=16, learned=False, formats=StageFormats(output="int16"))
    learn_layer_scales(layer, ScaleLearningConfig(steps=0))  # the closed-form scales
    layer.activation_granularity = "fine"
    layer.input_tapwise = layer.weight_tapwise = True
    x = F.silu(torch.randn(2, 32, 12, 12, generator=torch.Generator().manual_seed(2)) * 2)
    exact = F.conv2d(x.double(), layer.weight.double(), layer.bias.double(), padding=1)
    sq = lambda y, ref=exact: float(10 * torch.log10(ref.pow(2).sum() / (y.double() - ref).pow(2).sum()))  # noqa: E731
    pad, _, th, tw = fp.tile_grid(layer, 12, 12)
    tiles = fp.padded_tiles(layer, x, pad, th, tw).double()

    def run():
        y, codes = fp.reference_forward(layer, x, return_codes=True)
        sx = fp.input_scales(layer, x, th, tw)[1].double()[..., None, None]
        return sq(y), sq(codes["qx"].double() * sx, tiles)

    sym, sym_in = run()
    layer.activation_zero_point = True
    fixed, fixed_in = run()
    with torch.no_grad():
        emu = sq(layer.forward_emulated(x))
    assert fixed_in > sym_in + 4.5 and fixed > sym and abs(fixed - emu) < 0.5, (sym_in, fixed_in, sym, fixed, emu)
    # the int32 bounds of the input transform are planned for codes up to qmax - qmin
    assert fp.input_code_bound(layer) == 255
    p = fp.plan(layer)
    assert fp.int_transform_bound(p.bq, p.sb, 255) <= 2**31 - 1


SCHEDULE_CASES = [  # c, k, m, group_size, (h, w), batch: what the kernel's schedule branches on
    (64, 40, 4, 32, (13, 11), 3),    # groups of 32 (the unrolled GEMM), K not a multiple of 32, 27 tiles
    (128, 32, 2, 64, (9, 9), 2),     # groups of 64 (the run-time GEMM loop), 50 tiles
    (264, 8, 2, None, (5, 5), 1),    # one group of 264: |acc| may pass 2^24, the flush stays in int32
]


@pytest.mark.parametrize("chunk", ["8", "16", None])
@pytest.mark.parametrize("case", SCHEDULE_CASES, ids=[f"c{c[0]}k{c[1]}F{c[2]}gs{c[3]}" for c in SCHEDULE_CASES])
def test_chunked_schedule_is_bit_for_bit(case, chunk, monkeypatch):
    """The kernel runs its tiles in chunks (``WINOQ_KERNEL_CHUNK`` overrides the length): the
    last chunk and the last 8-tile register block are partial, M's max over the taps is taken in
    the GEMM's last flush; any chunk length gives the twin's output bit for bit, with the
    default pipeline (zero points, V / U per tap, int16 M) and the paper's."""
    c, k, m, gs, hw, nb = case
    if chunk is None:
        monkeypatch.delenv("WINOQ_KERNEL_CHUNK", raising=False)
    else:
        monkeypatch.setenv("WINOQ_KERNEL_CHUNK", chunk)
    x = torch.randn(nb, c, *hw, generator=torch.Generator().manual_seed(2)).relu() * 2
    for default in (True, False):
        layer = make_layer(c, k, m, group_size=gs, formats=StageFormats(output="int16" if default else "int8"))
        layer.activation_granularity = "fine" if default else "sample"
        layer.input_tapwise = layer.weight_tapwise = layer.activation_zero_point = default
        ref = fp.reference_forward(layer, x)
        for isa in compiled_isas():
            assert torch.equal(cpu.forward(layer, x, isa=isa), ref), (isa, default)


@pytest.mark.parametrize("case", SCHEDULE_CASES[1:], ids=[f"c{c[0]}k{c[1]}F{c[2]}gs{c[3]}" for c in SCHEDULE_CASES[1:]])
def test_threads_sharing_one_chunk_is_bit_for_bit(case, monkeypatch):
    """With several threads and few tiles for the channel count, the threads share one chunk
    (tiles for the transforms, output-channel blocks for the GEMM): the same output bit for bit."""
    monkeypatch.delenv("WINOQ_KERNEL_CHUNK", raising=False)
    c, k, m, gs, hw, nb = case
    x = torch.randn(nb, c, *hw, generator=torch.Generator().manual_seed(3)).relu() * 2
    layer = make_layer(c, k, m, group_size=gs, formats=StageFormats(output="int16"))
    layer.activation_granularity = "fine"
    layer.input_tapwise = layer.weight_tapwise = layer.activation_zero_point = True
    ref = fp.reference_forward(layer, x)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for isa in compiled_isas():
            assert torch.equal(cpu.forward(layer, x, isa=isa), ref), isa
    finally:
        torch.set_num_threads(threads)
