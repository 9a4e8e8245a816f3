"""Integer Winograd layers inside the integer-only graph: integer-only, bit-exact float64 twin,
accuracy against the float64 conv, the choice of layers, and clear errors."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from winoq.integer import IntegerConfig, convert
from winoq.integer.winograd import IntWinogradConv2d, _rshift_float, _rshift_int, build_int_winograd
from winoq.models import cifar_resnet20

from test_integer_convert import RecordOps, _random_bn  # noqa: E402 (same directory)


def _model():
    torch.manual_seed(0)
    return _random_bn(cifar_resnet20())


@pytest.fixture(scope="module")
def converted():
    model = _model()
    x = torch.randn(12, 3, 32, 32)
    return model, x, convert(model, x, IntegerConfig(winograd=4, learn_steps=2, layer_calib_samples=8))


def test_rshift_twins_agree_and_round_half_away():
    t = torch.arange(-70, 71, dtype=torch.int64)
    for k in (0, 1, 3, 5):
        exact = [int(torch.sign(torch.tensor(v)) * ((abs(v) + (1 << k >> 1)) >> k)) if k else v for v in t.tolist()]
        assert _rshift_int(t, k).tolist() == exact
        assert _rshift_float(t.double(), k).tolist() == [float(e) for e in exact]


def test_eligible_convs_become_integer_winograd_and_the_stem_stays_direct(converted):
    _, _, im = converted
    algo = {i.name: i.algorithm for i in im.layers}
    assert algo["conv1"] == "direct"                       # 3 input channels < winograd_min_channels
    assert algo["layer1.0.conv1"] == "F(4,3)"
    assert algo["layer2.0.conv1"] == "direct"              # stride 2
    assert algo["layer2.0.conv2"] == "F(4,3)"
    assert sum(isinstance(s, IntWinogradConv2d) for s in im.steps) == 16


def test_winograd_graph_is_integer_only_and_matches_its_float64_twin(converted):
    _, x, im = converted
    q = im.quantize_input(x[:4])
    with RecordOps() as rec:
        z = im.forward_integer(q)
    floating = [(op, i, o) for op, i, o in rec.ops if any(d.is_floating_point for d in i + o)]
    assert not floating, f"floating-point ops in the integer Winograd graph: {floating[:5]}"
    assert not any("div" in op for op, _, _ in rec.ops)
    assert torch.equal(z.double(), im.simulate_codes(x[:4]))


def test_winograd_graph_stays_close_to_the_float_model(converted):
    model, x, im = converted
    with torch.no_grad():
        ref = model(x)
        direct = convert(model, x, IntegerConfig())(x)
        wino = im(x)
    err = lambda y: float(((y - ref) ** 2).sum() / (ref ** 2).sum())  # noqa: E731
    assert err(wino) < 0.02
    assert err(wino) < 20 * err(direct) + 1e-3


@pytest.mark.parametrize("v_group", [0, 32])
@pytest.mark.parametrize("m", [2, 4, 6])
def test_one_layer_against_the_float64_conv(m, v_group):
    torch.manual_seed(m)
    conv = nn.Conv2d(32, 24, 3, padding=1).double()
    x = torch.randn(6, 32, 13, 11, dtype=torch.float64).relu()
    s_in = float(x.abs().max()) / 127
    step, s_acc, bound = build_int_winograd(
        "c", conv, conv.weight.detach(), conv.bias.detach(), s_in, 127, x, m=m, weight_bits=8, v_bits=8, m_bits=16,
        transform_bits=10, scales="learned", v_clip="mse", learn_steps=2, seed=0, v_group=v_group)
    qx = torch.round(x / s_in).clamp(-127, 127).to(torch.int32)
    acc = step(qx)
    assert acc.dtype == torch.int32 and float(acc.abs().max()) <= bound
    assert torch.equal(acc.double(), step.simulate(qx.double()))
    y = acc.double() * s_acc
    ref = F.conv2d(qx.double() * s_in, conv.weight.detach(), conv.bias.detach(), padding=1)
    rel = float(((y - ref) ** 2).sum() / (ref ** 2).sum())
    assert rel < {2: 1e-3, 4: 1.5e-2, 6: 6e-2}[m], rel  # measured: 3e-4 / 7e-3 / 3e-2 (static V)


def test_tile_exponents_keep_the_tap_sums():
    """Power-of-two V codes per tile, tap and channel group: the tap sums stay within 8-bit rounding
    of the exact sums of V_int x U, and the twins agree."""
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 8, 3, padding=1).double()
    x = torch.randn(2, 64, 8, 8, dtype=torch.float64).relu() * torch.rand(1, 64, 1, 1, dtype=torch.float64) * 4
    s_in = float(x.abs().max()) / 127
    step, _, _ = build_int_winograd("c", conv, conv.weight.detach(), conv.bias.detach(), s_in, 127, x, m=4,
                                    weight_bits=8, v_bits=8, m_bits=16, transform_bits=10, scales="standard",
                                    v_clip="minmax", learn_steps=0, seed=0, v_group=16)
    qx = torch.round(x / s_in).clamp(-127, 127).long()
    v = step.input_transform(qx)
    sums = step.tap_sums(v)
    exact = torch.einsum("nyxct,tkc->nyxtk", v, step.u).double() / 2 ** step.pre_shift
    assert float(((sums - exact) ** 2).sum() / (exact ** 2).sum()) < 1e-3
    assert torch.equal(sums.double(), step.tap_sums(v.double(), integer=False))


def test_per_layer_tiles_override_the_default():
    model = _model()
    x = torch.randn(4, 3, 32, 32)
    cfg = IntegerConfig(winograd=4, winograd_layers={"layer1.0.conv1": 2, "layer1.0.conv2": None, "conv1": 6},
                        learn_steps=0, layer_calib_samples=4)
    algo = {i.name: i.algorithm for i in convert(model, x, cfg).layers}
    assert (algo["conv1"], algo["layer1.0.conv1"], algo["layer1.0.conv2"], algo["layer1.1.conv1"]) == \
        ("F(6,3)", "F(2,3)", "direct", "F(4,3)")


def test_winograd_layers_cost_fewer_multiplications(converted):
    model, x, im = converted
    direct = convert(model, x[:4], IntegerConfig())
    by_name = {i.name: i.macs for i in direct.layers}
    for info in im.layers:
        if info.algorithm == "F(4,3)":
            assert info.macs * 4 == by_name[info.name]  # 36 multiplies per 4x4 outputs vs 9 x 16
    assert im.bops() < direct.bops()


def test_bad_winograd_settings_are_refused():
    model = _model()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="int m in \\[2, 6\\]"):
        IntegerConfig(winograd=8)
    with pytest.raises(ValueError, match="not convs of this model"):
        convert(model, x, IntegerConfig(winograd_layers={"nope": 4}))
    with pytest.raises(ValueError, match="layer2.0.conv1.*stride"):
        convert(model, x, IntegerConfig(winograd_layers={"layer2.0.conv1": 4}))
    with pytest.raises(ValueError, match="winograd_v_clip"):
        IntegerConfig(winograd_v_clip="p99")


def test_onnx_exports_winograd_layers_as_their_direct_twins(converted, tmp_path):
    pytest.importorskip("onnxruntime")
    from winoq.integer.onnx_export import export_onnx, run_onnx

    model, x, im = converted
    with pytest.raises(ValueError, match="ONNX has no Winograd operator"):
        export_onnx(im, tmp_path / "m.onnx", x[:1], winograd="refuse")
    with pytest.warns(UserWarning, match="direct ConvInteger twins"):
        export_onnx(im, tmp_path / "m.onnx", x[:1])
    # the exported graph is the integer model with every Winograd step replaced by its direct twin
    twin = copy.deepcopy(im)
    for step in twin.steps:
        if isinstance(step, IntWinogradConv2d):
            step.forward = step.direct_twin
    with torch.no_grad():
        assert torch.equal(run_onnx(tmp_path / "m.onnx", x[:4]), twin(x[:4]))
        ref, wino, direct = model(x[:4]), im(x[:4]), twin(x[:4])
    err = lambda y: float(((y - ref) ** 2).sum() / (ref ** 2).sum())  # noqa: E731
    assert err(direct) < 0.02 and err(wino) < 0.02


def test_qlinear_export_runs_winograd_layers_as_fused_direct_twins(converted, tmp_path):
    pytest.importorskip("onnxruntime")
    from winoq.integer.onnx_export import export_onnx, run_onnx

    model, x, im = converted
    with pytest.warns(UserWarning, match="direct ConvInteger twins"):
        proto = export_onnx(im, tmp_path / "q.onnx", x[:1], ops="qlinear", calib=x)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QLinearConv") == sum(type(s).__name__ in ("IntConv2d", "IntWinogradConv2d") for s in im.steps)
    twin = copy.deepcopy(im)
    for step in twin.steps:
        if isinstance(step, IntWinogradConv2d):
            step.forward = step.direct_twin
    with torch.no_grad():
        got, direct = run_onnx(tmp_path / "q.onnx", x[:4]), twin(x[:4])
    # the twin's two dyadic steps are one float32 multiplier here: close to the twin model
    assert float(((got - direct) ** 2).sum() / (direct ** 2).sum()) < 1e-3


def test_input_rows_default_exact_up_to_f4_and_fixed_at_f6(converted):
    _, _, im = converted
    steps = [s for s in im.steps if isinstance(s, IntWinogradConv2d)]
    assert all(s.sb == 0 and int(s.bq.abs().max()) == 5 for s in steps)  # F(4,3): the Toom-Cook integers
    cfg = IntegerConfig(winograd=6)
    assert (cfg.input_rows(2), cfg.input_rows(4), cfg.input_rows(6)) == ("exact", "exact", "fixed")
    assert IntegerConfig(winograd=4, winograd_input_rows="fixed").input_rows(4) == "fixed"
    with pytest.raises(ValueError, match="winograd_input_rows must be"):
        IntegerConfig(winograd_input_rows="integer")
