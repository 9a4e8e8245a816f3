"""BatchNorm folding (winoq.batchnorm, Recipe.fold_batchnorm): exact in float64, the folded
BatchNorm becomes nn.Identity, models without conv -> BN are untouched, off on request."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import winoq
from winoq import Recipe
from winoq.batchnorm import find_conv_bn_pairs, fold_batchnorm
from winoq.models import cifar_resnet20, fmnist_resnet, resnet18


def random_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine terms (fresh ones are the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g))
                m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g))
    return model.eval()


def count(model: nn.Module, kind) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


@pytest.mark.parametrize("build,channels,size", [(cifar_resnet20, 3, 32), (fmnist_resnet, 1, 28), (resnet18, 3, 32)])
def test_fold_is_exact_in_float64_on_the_project_models(build, channels, size):
    torch.manual_seed(0)
    model = random_stats(build()).double()
    x = torch.randn(2, channels, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    bns = count(model, nn.BatchNorm2d)
    folded = copy.deepcopy(model)
    pairs = fold_batchnorm(folded)
    assert len(pairs) == bns and count(folded, nn.BatchNorm2d) == 0
    for _, bn_name in pairs:
        assert type(folded.get_submodule(bn_name)) is nn.Identity
    with torch.no_grad():
        y, yf = model(x), folded(x)
    assert float((yf - y).abs().max() / y.abs().max()) < 1e-12


def test_fold_matches_the_formula_per_channel():
    conv = nn.Conv2d(3, 4, 3, bias=True).double()
    bn = random_stats(nn.Sequential(nn.BatchNorm2d(4))).double()[0]
    model = nn.Sequential(conv, bn).eval()
    w, b = conv.weight.detach().clone(), conv.bias.detach().clone()
    fold_batchnorm(model)
    sigma = (bn.running_var + bn.eps).sqrt()
    want_w = bn.weight[:, None, None, None] * w / sigma[:, None, None, None]
    want_b = (b - bn.running_mean) * bn.weight / sigma + bn.bias
    assert torch.allclose(model[0].weight, want_w, rtol=1e-15, atol=0)
    assert torch.allclose(model[0].bias, want_b, rtol=1e-15, atol=1e-15)
    assert type(model[1]) is nn.Identity


def test_models_without_conv_bn_pairs_are_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2)).eval()
    model(torch.randn(1, 3, 6, 6))  # materialize the lazy layer
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert fold_batchnorm(model) == []
    assert type(model[2]) is nn.BatchNorm2d
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    assert fold_batchnorm(plain) == []


def test_conv_output_used_twice_and_training_mode_bn_are_not_folded():
    class TwoUses(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # folding would change the second use

    assert find_conv_bn_pairs(TwoUses().eval()) == ([], "fx")
    train = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    assert fold_batchnorm(train) == [] and type(train[1]) is nn.BatchNorm2d


def test_untraceable_model_folds_sequential_pairs_with_a_warning():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                return self.body(x)
            return self.body(-x)

    model = random_stats(Branchy()).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    y = model(x)
    with pytest.warns(UserWarning, match="does not trace"):
        pairs = fold_batchnorm(model)
    assert pairs == [("body.0", "body.1")]
    assert torch.allclose(model(x), y, rtol=1e-12, atol=1e-12)


def test_quantize_folds_by_default_and_keeps_bn_when_asked():
    torch.manual_seed(0)
    model = random_stats(cifar_resnet20())
    bns = count(model, nn.BatchNorm2d)
    qm = winoq.quantize(model, Recipe(winograd=None), progress=False)
    assert count(qm, nn.BatchNorm2d) == 0 and count(model, nn.BatchNorm2d) == bns  # the float model is untouched
    folded = {r.name: r.calibration.get("folded_batchnorm") for r in qm.winoq_report}
    assert folded["conv1"] == "bn1" and folded["layer1.0.conv2"] == "layer1.0.bn2"
    kept = winoq.quantize(model, Recipe(winograd=None, fold_batchnorm=False), progress=False)
    assert count(kept, nn.BatchNorm2d) == bns
    assert "bn-unfolded" in Recipe(fold_batchnorm=False).describe()


def test_folded_quantized_model_stays_close_to_float():
    torch.manual_seed(0)
    model = random_stats(cifar_resnet20())
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qm = winoq.quantize(model, Recipe(winograd=None), progress=False)
    with torch.no_grad():
        y, yq = model(x), qm(x)
    assert float((yq - y).norm() / y.norm()) < 0.1


def test_fold_batchnorm_must_be_a_bool():
    with pytest.raises(ValueError, match="fold_batchnorm"):
        Recipe(fold_batchnorm="yes")
