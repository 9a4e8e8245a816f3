"""What ``winoq.quantize`` checks before any work and how it calibrates: the kernel, unsigned
formats, zero static ranges, unused calibration data, the global RNG, bare layers."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import winoq
from winoq import Recipe


def tiny_cnn(c: int = 8) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def q(model, recipe, **kw):
    return winoq.quantize(model, recipe, progress=False, **kw)


# ----------------------------------------------------------------------------- RNG
def test_quantize_leaves_the_global_rng_alone_and_is_deterministic():
    model = tiny_cnn()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = q(model, Recipe(winograd=4, learn_steps=2))
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)  # another global state: same result (every draw uses the recipe's seed)
    b = q(model, Recipe(winograd=4, learn_steps=2))
    x = images(2)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


# ----------------------------------------------------------------------------- kernels
def test_triton_kernel_on_a_cpu_machine_fails_before_any_work(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    import winoq.winograd.scales as scales

    def never(*a, **k):
        raise AssertionError("calibration started")

    monkeypatch.setattr(scales, "_learn_layer_scales", never)
    with pytest.raises(ValueError, match=r"kernel='triton'.*CUDA"):
        q(tiny_cnn(), Recipe(winograd=4, kernel="triton"))


def test_calibration_runs_emulated_and_inference_the_recipes_kernel(monkeypatch):
    from winoq.kernels import int_cpu

    calls = []
    real = int_cpu.forward
    monkeypatch.setattr(int_cpu, "forward", lambda layer, x, **kw: calls.append(1) or real(layer, x, **kw))
    qm = q(tiny_cnn(), Recipe(winograd=4, learn_steps=2, kernel="int-cpu", winograd_min_channels=None))
    assert calls == []  # scale learning (with and without gradients) never ran the integer kernel
    assert qm[2].kernel == "int-cpu"  # and the layers have their kernel back
    with torch.no_grad():
        qm(images(1))
    assert calls  # inference does


# ----------------------------------------------------------------------------- unsigned formats
def test_unsigned_weights_are_refused_with_the_layer_name():
    with pytest.raises(ValueError, match=r"unsigned.*layer '0'.*negative weights.*'int8'"):
        q(tiny_cnn(), Recipe(weights="uint8", winograd=None))


def test_unsigned_activations_refused_with_winograd_and_warned_on_direct_layers():
    with pytest.raises(ValueError, match=r"Winograd stages.*signed"):
        q(tiny_cnn(), Recipe(activations="uint8", winograd=4))
    with pytest.warns(UserWarning, match=r"unsigned: every negative layer input becomes 0"):
        q(tiny_cnn(), Recipe(activations="uint8", winograd=None))


# ----------------------------------------------------------------------------- calibration data
def test_all_zero_calibration_data_for_static_ranges_is_refused():
    with pytest.raises(ValueError, match=r"static input range of layer\(s\) '0'.*zero"):
        q(tiny_cnn(), Recipe(winograd=None, activation_ranges="static"), calib_data=torch.zeros(4, 3, 8, 8))


def test_calib_data_given_to_a_data_free_recipe_warns():
    with pytest.warns(UserWarning, match="calib_data is ignored"):
        q(tiny_cnn(), Recipe(winograd=4, scales="standard"), calib_data=images(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # data the recipe uses: no warning
        q(tiny_cnn(), Recipe(winograd=None, activation_ranges="static"), calib_data=images(4))


# ----------------------------------------------------------------------------- bare layers
@pytest.mark.parametrize("layer, kind", [(nn.Conv2d(8, 8, 3, padding=1), "winograd"), (nn.Conv2d(8, 4, 1), "direct"),
                                         (nn.Linear(8, 4), "linear")])
def test_a_bare_layer_is_quantized_and_round_trips(layer, kind, tmp_path):
    from safetensors import safe_open

    qm = q(layer, Recipe(winograd=4, learn_steps=1, winograd_min_channels=None))
    assert qm is not layer and type(qm) is not type(layer)
    assert [r.kind for r in qm.winoq_report] == [kind]
    x = torch.randn(2, 8, 6, 6) if isinstance(layer, nn.Conv2d) else torch.randn(3, 8)
    with torch.no_grad():
        y, ref = qm(x), layer(x)
    assert not torch.equal(y, ref) and float((y - ref).norm() / ref.norm()) < 0.2  # quantized, and close
    path = tmp_path / "layer.safetensors"
    winoq.save(qm, path)
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    assert any(k in keys for k in ("weight", "weight.codes", "u.codes")) and not any(k.startswith(".") for k in keys)
    loaded = winoq.load(path, type(layer)(*_ctor_args(layer)))
    with torch.no_grad():
        assert torch.equal(loaded(x), y)


def _ctor_args(layer):
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    return layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding
