"""Tests for winoq.algorithms.block_reconstruction: block discovery on small
residual models (float and quantized), recording of block calls (args, kwargs,
sample limit), and joint learned rounding of direct and Winograd blocks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import winoq
from winoq.algorithms.adaround import lies_on_grid, reconstruction_loss
from winoq.algorithms.block_reconstruction import BlockCall, capture_block_io, find_blocks, reconstruct_block
from winoq.modules import QuantConv2d
from winoq.quantizers import compute_scale
from winoq.winograd.conv import transform_2d
from winoq.winograd.quantized import QuantWinogradConv2d

torch.set_num_threads(1)

C = 8


class Residual(nn.Module):
    def __init__(self, c: int = C):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return F.relu(x + self.conv2(F.relu(self.conv1(x))))


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, C, 3, padding=1)
        self.res1 = Residual()
        self.res2 = Residual()
        self.fc = nn.Linear(C, 4)

    def forward(self, x):
        h = self.res2(self.res1(F.relu(self.stem(x))))
        return self.fc(h.mean((2, 3)))


class TimeBlock(nn.Module):
    """A residual block conditioned on a time embedding, called as block(x, temb=...)."""

    def __init__(self, c: int = C, t: int = 6):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.emb = nn.Linear(t, c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x, temb):
        h = F.silu(self.conv1(x)) + self.emb(temb)[:, :, None, None]
        return x + self.conv2(F.silu(h))


class TimeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, C, 3, padding=1)
        self.block = TimeBlock()

    def forward(self, x, temb):
        return self.block(self.stem(x), temb=temb)


def images(n: int, seed: int, hw: int = 8) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return F.avg_pool2d(torch.randn(n, 3, hw + 2, hw + 2, generator=gen), 3, 1)


def model(cls, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return cls().eval()


def batches_runner(batches):
    def run(m):
        for b in batches:
            m(*b) if isinstance(b, tuple) else m(b)
    return run


def grad_flags(mod: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in mod.named_parameters()}


# ----------------------------------------------------------------------------- find_blocks
def test_find_blocks_residual_model_float_and_quantized():
    net = model(TinyResNet)
    assert find_blocks(net) == (["res1", "res2"], ["stem", "fc"])
    for recipe in (winoq.Recipe(weights="int4", winograd=None),
                   winoq.Recipe(winograd_min_channels=None, weights="int4", winograd=4, scales="standard")):
        assert find_blocks(winoq.quantize(net, recipe, progress=False)) == (["res1", "res2"], ["stem", "fc"])


def test_find_blocks_descends_into_groups_larger_than_max_layers():
    net = nn.Sequential(nn.Conv2d(3, C, 1), nn.Sequential(Residual(), Residual()), nn.Linear(C, 2))
    assert find_blocks(net, max_layers=4) == (["1"], ["0", "2"])
    assert find_blocks(net, max_layers=3) == (["1.0", "1.1"], ["0", "2"])
    single = nn.Sequential(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()), nn.Linear(3, 3))
    assert find_blocks(single) == ([], ["0.0", "1"])
    with pytest.raises(ValueError, match="max_layers"):
        find_blocks(net, max_layers=1)


# ----------------------------------------------------------------------------- capture
def test_capture_block_io_shapes_and_sample_limit():
    net = model(TinyResNet)
    batches = [images(4, s) for s in range(3)]
    io = capture_block_io(net, ["res1", "res2"], batches_runner(batches), max_samples=10)
    for name in ("res1", "res2"):
        calls = io[name]
        assert [c.args[0].shape[0] for c in calls] == [4, 4, 2]
        assert all(isinstance(c, BlockCall) and c.kwargs == {} and c.output.shape == c.args[0].shape for c in calls)
        assert not any(c.output.requires_grad for c in calls)
    with torch.no_grad():
        ref = net.res1(F.relu(net.stem(batches[1])))
    torch.testing.assert_close(io["res1"][1].output, ref)
    torch.testing.assert_close(io["res2"][1].args[0], ref)
    assert all(len(h) == 0 for m in net.modules() for h in (m._forward_hooks, m._forward_pre_hooks))


def test_capture_block_io_keeps_kwargs_and_non_tensor_args():
    net = model(TimeNet)
    gen = torch.Generator().manual_seed(1)
    batches = [(images(3, s), torch.randn(3, 6, generator=gen)) for s in range(2)]
    io = capture_block_io(net, ["block"], batches_runner(batches), max_samples=32)
    calls = io["block"]
    assert len(calls) == 2 and calls[0].args[0].shape == (3, C, 8, 8)
    torch.testing.assert_close(calls[1].kwargs["temb"], batches[1][1])


# ----------------------------------------------------------------------------- reconstruction
def check_reconstruction(qblock, calls, iters=150):
    before = grad_flags(qblock)
    layers = [m for m in qblock.modules() if isinstance(m, (QuantConv2d, QuantWinogradConv2d, nn.Linear))]
    scales = {}
    with torch.no_grad():
        for m in layers:
            if isinstance(m, QuantWinogradConv2d):
                u = transform_2d(m.transforms(torch.float32, "cpu")[1], m.weight)
                scales[m] = compute_scale(u, m.formats.weight, m._weight_gran())[0]
            else:
                scales[m] = compute_scale(m.weight, m.weight_format, m.weight_gran(),
                                          "minmax")[0]
    with torch.no_grad():
        own = [float(reconstruction_loss(qblock(*c.args, **c.kwargs), c.output)) for c in calls]
    info = reconstruct_block(qblock, calls, iters=iters, seed=0)
    assert info["layers"] == len(layers) and info["iters"] == iters
    assert info["loss_nearest"] == pytest.approx(sum(own) / len(own), rel=1e-5)  # calls of equal size
    assert info["loss_learned"] < 0.9 * info["loss_nearest"]
    assert grad_flags(qblock) == before and not qblock.training
    assert "quantized_weight" not in vars(layers[0])
    for m in layers:
        if isinstance(m, QuantWinogradConv2d):
            assert m.learned_u is not None and lies_on_grid(m.learned_u, m.formats.weight, scales[m])
        else:
            assert lies_on_grid(m.weight.detach(), m.weight_format, scales[m])
            torch.testing.assert_close(m.quantized_weight(), m.weight)  # same values up to float rounding
    return info


def test_reconstruct_direct_block_beats_nearest():
    net = model(TinyResNet)
    qnet = winoq.quantize(net, winoq.Recipe(weights="int4", activations="int8", winograd=None), progress=False)
    io = capture_block_io(net, ["res1"], batches_runner([images(8, s) for s in range(2)]))
    check_reconstruction(qnet.res1, io["res1"])


def test_reconstruct_winograd_block_beats_nearest():
    net = model(TinyResNet)
    qnet = winoq.quantize(net, winoq.Recipe(winograd_min_channels=None, weights="int4", winograd=4, scales="standard"), progress=False)
    assert isinstance(qnet.res2.conv1, QuantWinogradConv2d)
    io = capture_block_io(net, ["res2"], batches_runner([images(8, s) for s in range(2)]))
    info = check_reconstruction(qnet.res2, io["res2"])
    with torch.no_grad():  # the model now uses the learned weights
        out = qnet.res2(*io["res2"][0].args)
    assert torch.isfinite(out).all() and info["seconds"] > 0


def test_reconstruct_block_with_time_embedding_kwarg():
    net = model(TimeNet)
    gen = torch.Generator().manual_seed(2)
    batches = [(images(6, s), torch.randn(6, 6, generator=gen)) for s in range(2)]
    qnet = winoq.quantize(net, winoq.Recipe(weights="int4", winograd=None), progress=False)
    io = capture_block_io(net, ["block"], batches_runner(batches))
    check_reconstruction(qnet.block, io["block"])


def test_reconstruct_block_errors_and_float_block():
    net = model(TinyResNet)
    qnet = winoq.quantize(net, winoq.Recipe(weights="int4", winograd=None), progress=False)
    io = capture_block_io(net, ["res1"], batches_runner([images(4, 0)]))
    w0 = qnet.res1.conv1.weight.detach().clone()
    with pytest.raises(FloatingPointError, match="res1"):
        reconstruct_block(qnet.res1, io["res1"], iters=5, lr=float("inf"), warmup=0.0, name="res1")
    assert torch.equal(qnet.res1.conv1.weight, w0) and "quantized_weight" not in vars(qnet.res1.conv1)
    assert all(p.requires_grad for p in qnet.res1.parameters())
    with pytest.raises(ValueError, match="calls"):
        reconstruct_block(qnet.res1, [])
    info = reconstruct_block(net.res1, io["res1"], iters=5)  # float block: nothing to round
    assert info["layers"] == 0 and info["loss_nearest"] == info["loss_learned"] < 1e-10
