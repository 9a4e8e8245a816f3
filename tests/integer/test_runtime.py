"""The compiled runtime of integer-only models (winoq.integer.runtime): the fused plan gives the
same output codes as the PyTorch steps, on every kind of graph the converter makes."""
from __future__ import annotations

import pytest
import torch

from winoq.integer import IntegerConfig, compile_model, convert
from winoq.integer import layers as L
from winoq.integer.runtime import plan
from winoq.kernels import int_graph
from winoq.models import cifar_resnet20, fmnist_resnet, resnet18
from test_integer_convert import _random_bn  # noqa: E402  (the same BatchNorm statistics)

needs_build = pytest.mark.skipif(not int_graph.available(), reason="the compiled kernels could not be built here")


def reference_codes(im, q):
    """The output codes with every step on its PyTorch definition."""
    with im.kernels("torch"):
        return im.forward_integer(q)


def check(im, x):
    q = im.quantize_input(x)
    ref = reference_codes(im, q)
    cm = compile_model(im)
    y = cm.forward_integer(q)
    assert y.dtype == ref.dtype and torch.equal(y, ref)
    assert torch.equal(cm(x), im(x))
    return cm


@pytest.fixture(scope="module")
def r20():
    torch.manual_seed(0)
    return _random_bn(cifar_resnet20())


@needs_build
@pytest.mark.parametrize("tile", [None, 4])
def test_cifar_resnet_same_codes(r20, tile):
    calib = torch.randn(16, 3, 32, 32)
    im = convert(r20, calib, IntegerConfig(winograd=tile, learn_steps=2, calib_samples=16, layer_calib_samples=8))
    cm = check(im, torch.randn(3, 3, 32, 32))
    s = cm.summary()
    assert s["conv+requantize"] == 10 and s["conv+add"] == 9  # every conv but the classifier fused
    assert "epilogue" not in s


@needs_build
def test_low_bits_and_two_threads(r20):
    calib = torch.randn(16, 3, 32, 32)
    im = convert(r20, calib, IntegerConfig(weight_bits=4, act_bits=4, calib_samples=16, layer_calib_samples=8,
                                           rounding_iters=5))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        check(im, torch.randn(5, 3, 32, 32))
    finally:
        torch.set_num_threads(threads)


@needs_build
def test_torchvision_resnet_with_maxpool_and_downsample_convs():
    torch.manual_seed(1)
    model = _random_bn(resnet18(num_classes=10))
    calib = torch.randn(4, 3, 64, 64)
    im = convert(model, calib, IntegerConfig(calib_samples=4, layer_calib_samples=4))
    cm = check(im, torch.randn(2, 3, 64, 64))
    assert cm.summary()["conv+add"] >= 8


@needs_build
def test_unsigned_8bit_codes_stay_in_pytorch():
    """8-bit unsigned activations ([0, 255]) do not fit int8: their steps run in PyTorch, same codes."""
    torch.manual_seed(2)
    model = _random_bn(fmnist_resnet())
    calib = torch.randn(16, 1, 28, 28)
    im = convert(model, calib, IntegerConfig(unsigned_max_bits=8, calib_samples=16))
    assert any(isinstance(s, L.Requantize) and s.qmax == 255 for s in im.steps)
    cm = check(im, torch.randn(3, 1, 28, 28))
    assert cm.summary().get("step", 0) > 3


def test_without_the_kernels_the_plan_is_the_program(r20, no_compiler):
    no_compiler(int_graph)
    calib = torch.randn(8, 3, 32, 32)
    im = convert(r20, calib, IntegerConfig(calib_samples=8))
    ops = plan(im)
    assert len(ops) == len(im.steps) and all(op.kind == "step" for op in ops)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(compile_model(im)(x), im(x))


def test_kernels_context_restores(r20):
    im = convert(r20, torch.randn(8, 3, 32, 32), IntegerConfig(calib_samples=8))
    convs = [s for s in im.steps if hasattr(s, "kernel")]
    with im.kernels("torch"):
        assert all(s.kernel == "torch" for s in convs)
    assert all(s.kernel == "auto" for s in convs)
    with pytest.raises(ValueError, match="'auto' or 'torch'"):
        with im.kernels("fast"):
            pass


def test_forward_integer_refuses_floats(r20):
    im = convert(r20, torch.randn(8, 3, 32, 32), IntegerConfig(calib_samples=8))
    with pytest.raises(TypeError, match="quantize_input"):
        compile_model(im).forward_integer(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("args", [(3, 2, 1, 1, False), (2, 2, 0, 1, False), (3, 1, 1, 1, False),
                                  ((3, 2), (2, 1), (1, 0), 1, False), (3, None, 0, 1, False), (3, 2, 1, 1, True)])
def test_int8_max_pool_equals_torch(args):
    x = torch.randint(-128, 128, (2, 5, 11, 13), dtype=torch.int8)
    pool = L.MaxPool(*args)
    for kind in ("auto", "torch"):  # the compiled pool (where built) and the PyTorch ops
        pool.kernel = kind
        for t in (x, x.contiguous(memory_format=torch.channels_last)):
            y = pool(t)
            assert y.dtype == torch.int8 and torch.equal(y.int(), torch.nn.functional.max_pool2d(t.int(), *args))
            assert y.is_contiguous(memory_format=torch.channels_last) == t.is_contiguous(memory_format=torch.channels_last)


@needs_build
def test_static_v_scales_and_a_unet():
    """Winograd steps the compiled step does not run (static per-tap V) stay PyTorch steps; a U-Net's
    concatenations and pixel shuffles run as PyTorch steps between compiled convs; same codes."""
    from winoq.models.unet_seg import UNetConfig, UNetSeg

    torch.manual_seed(3)
    model = _random_bn(cifar_resnet20())
    calib = torch.randn(8, 3, 32, 32)
    im = convert(model, calib, IntegerConfig(winograd=2, winograd_v_scales="static", learn_steps=2, calib_samples=8,
                                             layer_calib_samples=4))
    check(im, torch.randn(2, 3, 32, 32))
    unet = _random_bn(UNetSeg(UNetConfig(depth=2, base_width=8)))
    x = torch.randn(6, 1, 32, 32)
    cm = check(convert(unet, x, IntegerConfig(calib_samples=6)), x[:2])
    assert cm.summary()["conv+requantize"] >= 4
