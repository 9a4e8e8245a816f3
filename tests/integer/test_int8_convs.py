"""Int8 convs inside float models (winoq.integer.int8_convs): the compiled kernel equals the
definition bit for bit, the definition is close to the float conv, the conversion copies the model
and keeps the convs it cannot run float with a warning; the committed DDPM stays accurate."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from winoq.integer import Int8Conv2d, int8_convs
from winoq.kernels import int_graph


def sqnr(y, ref):
    return float(10 * torch.log10(ref.pow(2).sum() / (y - ref).pow(2).sum()))


class TinyUNet(nn.Module):
    """GroupNorm, SiLU, a timestep input, a grouped conv and a conv only one branch reaches."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 16, 3, padding=1)
        self.norm = nn.GroupNorm(4, 16)
        self.temb = nn.Linear(1, 16)
        self.conv_mid = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.grouped = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.proj = nn.Conv2d(32, 32, 1)
        self.unused = nn.Conv2d(32, 32, 1)

    def forward(self, x, t, use_unused: bool = False):
        h = self.conv_in(x) + self.temb(t[:, None].float())[:, :, None, None]
        h = self.conv_mid(F.silu(self.norm(h)))
        h = self.proj(self.grouped(h))
        return self.unused(h) if use_unused else h


def batches(n=3, size=4):
    gen = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(size, 3, 12, 12, generator=gen), "t": torch.rand(size, generator=gen)} for _ in range(n)]


def test_int8_conv2d_forward_equals_its_definition_and_the_float_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(24, 40, 3, padding=1)
    x = torch.randn(2, 24, 10, 19)
    layer = Int8Conv2d("c", conv, float(x.abs().max()))
    ref = layer.forward_torch(x)
    if int_graph.available():
        assert layer.compiled()
    assert torch.equal(layer(x), ref)
    with torch.no_grad():
        assert sqnr(ref, conv(x)) > 30


def test_int8_conv2d_follows_its_buffers_when_they_change():
    conv = nn.Conv2d(8, 16, 3, padding=1)
    x = torch.randn(2, 8, 9, 9)
    layer = Int8Conv2d("c", conv, float(x.abs().max()))
    before = layer(x)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["scale"] *= 2
    state["step.weight"], state["step.bias"] = -state["step.weight"], -state["step.bias"]
    layer.load_state_dict(state)
    assert torch.equal(layer(x), -2 * before)                  # exact: a sign and a power of two
    layer.input_inv.fill_(float(layer.input_inv) / 2)          # an in-place change counts too
    assert torch.equal(layer(x), layer.forward_torch(x))


def test_a_used_int8_conv2d_pickles_and_copies():
    import copy
    import pickle

    layer = Int8Conv2d("c", nn.Conv2d(4, 8, 3, padding=1), 1.0)
    x = torch.randn(1, 4, 5, 5)
    y = layer(x)
    for twin in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        assert torch.equal(twin(x), y)


def test_int8_conv2d_without_the_kernel_runs_the_definition(no_compiler):
    no_compiler(int_graph)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    x = torch.randn(1, 8, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        layer = Int8Conv2d("c", conv, float(x.abs().max()))
        assert not layer.compiled()
        assert torch.equal(layer(x), layer.forward_torch(x))


def test_int8_conv2d_rejects_other_input():
    layer = Int8Conv2d("c", nn.Conv2d(8, 16, 3, padding=1), 1.0)
    with pytest.raises(ValueError, match="float32 .N, 8, H, W. input"):
        layer(torch.zeros(1, 8, 5, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="float32"):
        layer(torch.zeros(1, 4, 5, 5))


def test_int8_convs_copies_swaps_and_warns_about_what_stays_float():
    torch.manual_seed(0)
    model = TinyUNet().eval()
    with pytest.warns(UserWarning, match="2 of 5 convs stay float") as rec:
        q = int8_convs(model, batches())
    msg = str(rec[0].message)
    assert "grouped (groups=4)" in msg and "unused (no calibration batch reached it)" in msg
    assert isinstance(model.conv_in, nn.Conv2d)                      # the model itself is unchanged
    swapped = {n for n, m in q.named_modules() if isinstance(m, Int8Conv2d)}
    assert swapped == {"conv_in", "conv_mid", "proj"}
    b = batches(1, 8)[0]
    with torch.no_grad():
        assert sqnr(q(**b), model(**b)) > 25


def test_int8_convs_skip_and_bad_input():
    model = TinyUNet().eval()
    with pytest.warns(UserWarning, match="proj .skipped."):
        q = int8_convs(model, batches(), skip=["proj", "grouped", "unused"])
    assert isinstance(q.proj, nn.Conv2d) and isinstance(q.conv_in, Int8Conv2d)
    with pytest.raises(ValueError, match="skip names no conv of the model: \\['nope'\\]"):
        int8_convs(model, batches(), skip=["nope"])
    with pytest.raises(ValueError, match="held no batch"):
        int8_convs(model, [])


def test_a_bare_conv_comes_back_as_an_int8_conv():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    x = torch.randn(2, 3, 8, 8)
    q = int8_convs(conv, x)
    assert isinstance(q, Int8Conv2d) and torch.equal(q(x), q.forward_torch(x))


def test_int8_convs_calls_tensors_tuples_and_dicts():
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1))
    x = torch.randn(2, 3, 8, 8)
    for calib in (x, [x], [(x,)], [{"input": x}]):
        q = int8_convs(conv, calib)
        assert isinstance(q[0], Int8Conv2d) and float(q[0].input_inv) == pytest.approx(127 / float(x.abs().max()))


def test_the_committed_ddpm_keeps_its_noise_prediction():
    from winoq.diffusion.pretrained import load_default_ddpm

    model = load_default_ddpm().eval()
    gen = torch.Generator().manual_seed(0)

    def inputs(n):
        return (torch.randn(n, 1, 28, 28, generator=gen), torch.randint(0, 1000, (n,), generator=gen),
                torch.randint(0, 10, (n,), generator=gen))

    q = int8_convs(model, [dict(zip("xty", inputs(8))) for _ in range(4)])
    assert sum(isinstance(m, Int8Conv2d) for m in q.modules()) == 43
    x, t, y = inputs(8)
    with torch.no_grad():
        assert sqnr(q(x, t, y), model(x, t, y)) > 25


def test_a_diffusers_unet_with_keyword_batches():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8).eval()
    calib = [{"sample": torch.randn(4, 3, 16, 16), "timestep": torch.full((4,), s)} for s in (10, 500, 900)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                   # every conv converts
        q = int8_convs(unet, calib)
    assert sum(isinstance(m, Int8Conv2d) for m in q.modules()) == sum(isinstance(m, nn.Conv2d) for m in unet.modules())
    x, t = torch.randn(4, 3, 16, 16), torch.full((4,), 10)
    with torch.no_grad():
        assert sqnr(q(x, t).sample, unet(x, t).sample) > 20
