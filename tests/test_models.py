"""Tests for winoq.models.

Nothing here needs the shared folder except the ``slow`` test, which is skipped when it
is absent; the Fashion-MNIST accuracy test is skipped when the dataset is not installed.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from winoq.models import (
    MODEL_NAMES,
    CifarResNet,
    FmnistResNet,
    LambdaShortcut,
    cifar_resnet,
    cifar_resnet18,
    default_shared_dirs,
    fmnist_metadata,
    fmnist_resnet,
    get_model,
    load_cifar_resnet,
    load_default_fmnist_model,
    resnet18,
    resnet34,
    resnet50,
)

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def bn_keys(prefix: str, with_tracked: bool = True) -> list[str]:
    names = BN if with_tracked else BN[:4]
    return [f"{prefix}.{n}" for n in names]


# ----------------------------------------------------------------------------- CIFAR ResNets

def cifar_checkpoint_keys(depth: int) -> list[str]:
    """Key names of the published checkpoints (after stripping ``module.``)."""
    n = (depth - 2) // 6
    keys = ["conv1.weight"] + bn_keys("bn1", False)
    for layer in (1, 2, 3):
        for b in range(n):
            p = f"layer{layer}.{b}"
            keys += [f"{p}.conv1.weight"] + bn_keys(f"{p}.bn1", False)
            keys += [f"{p}.conv2.weight"] + bn_keys(f"{p}.bn2", False)
    return keys + ["linear.weight", "linear.bias"]


@pytest.mark.parametrize("depth,count", [(20, 269_722), (32, 464_154), (44, 658_586),
                                         (56, 853_018)])
def test_cifar_resnet_names_and_params(depth, count):
    m = cifar_resnet(depth)
    keys = [k for k in m.state_dict() if not k.endswith("num_batches_tracked")]
    assert keys == cifar_checkpoint_keys(depth)
    assert n_params(m) == count
    sd = m.state_dict()
    assert sd["conv1.weight"].shape == (16, 3, 3, 3)
    assert sd["layer2.0.conv1.weight"].shape == (32, 16, 3, 3)
    assert sd["layer3.0.conv1.weight"].shape == (64, 32, 3, 3)
    assert sd["linear.weight"].shape == (10, 64)
    assert m.layer2[0].conv1.stride == (2, 2) and m.layer3[0].conv1.stride == (2, 2)
    assert m.layer1[0].conv1.stride == (1, 1) and m.layer2[1].conv1.stride == (1, 1)


def test_cifar_resnet_bad_depth():
    with pytest.raises(ValueError, match="20, 32, 44, 56"):
        cifar_resnet(18)


def test_option_a_shortcut():
    x = torch.randn(2, 16, 32, 32)
    sc = LambdaShortcut(32)
    y = sc(x)
    assert y.shape == (2, 32, 16, 16)
    assert list(sc.parameters()) == []
    torch.testing.assert_close(y[:, 8:24], x[:, :, ::2, ::2])
    assert y[:, :8].abs().sum() == 0 and y[:, 24:].abs().sum() == 0
    m = cifar_resnet(20)
    assert isinstance(m.layer2[0].shortcut, LambdaShortcut)
    assert isinstance(m.layer1[0].shortcut, nn.Identity)
    feats = m.layer2[0](torch.randn(2, 16, 32, 32))
    assert feats.shape == (2, 32, 16, 16)
    assert m.eval()(torch.randn(3, 3, 32, 32)).shape == (3, 10)


def _fake_checkpoint(tmp_path: Path, depth: int = 20, extra=None) -> tuple[Path, CifarResNet]:
    torch.manual_seed(0)
    ref = cifar_resnet(depth)
    for mod in ref.modules():  # non-trivial BN statistics
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    sd = {"module." + k: v for k, v in ref.state_dict().items()
          if not k.endswith("num_batches_tracked")}  # as in the published files
    d = tmp_path / "models" / "cifar10-resnet"
    d.mkdir(parents=True)
    path = d / f"resnet{depth}-0123abcd.th"
    ckpt = {"best_prec1": 91.5, "state_dict": sd}
    if extra is not None:
        ckpt["extra"] = extra
    torch.save(ckpt, path)
    return path, ref.eval()


def test_load_cifar_resnet_from_fake_checkpoint(tmp_path, monkeypatch):
    path, ref = _fake_checkpoint(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    for m in (load_cifar_resnet(20, shared_dir=tmp_path), load_cifar_resnet(20, path=path)):
        assert not m.training
        torch.testing.assert_close(m(x), ref(x))
    monkeypatch.setenv("WINOQ_SHARED", str(tmp_path))
    assert default_shared_dirs()[0] == tmp_path.resolve()
    torch.testing.assert_close(load_cifar_resnet(20)(x), ref(x))
    torch.testing.assert_close(get_model("cifar-resnet20", weights="shared")(x), ref(x))
    torch.testing.assert_close(get_model("cifar-resnet20", weights=path)(x), ref(x))


def test_load_cifar_resnet_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="looked in") as ei:
        load_cifar_resnet(32, shared_dir=tmp_path)
    assert str(tmp_path) in str(ei.value) and "resnet32-*.th" in str(ei.value)


class _NotATensor:
    pass


def test_load_cifar_resnet_refuses_unsafe_pickle(tmp_path):
    path, _ = _fake_checkpoint(tmp_path, extra=_NotATensor())
    with pytest.raises(RuntimeError, match="weights_only=True"):
        load_cifar_resnet(20, path=path)


# ----------------------------------------------------------------------------- torchvision ResNets

def torchvision_keys(bottleneck: bool, layers: list[int], num_classes_keys=True) -> list[str]:
    """State-dict keys of torchvision.models.resnet*, in torchvision's order."""
    keys = ["conv1.weight"] + bn_keys("bn1")
    for li, n in enumerate(layers, start=1):
        for b in range(n):
            p = f"layer{li}.{b}"
            for c in (1, 2, 3) if bottleneck else (1, 2):
                keys += [f"{p}.conv{c}.weight"] + bn_keys(f"{p}.bn{c}")
            if b == 0 and (li > 1 or bottleneck):
                keys += [f"{p}.downsample.0.weight"] + bn_keys(f"{p}.downsample.1")
    return keys + ["fc.weight", "fc.bias"]


@pytest.mark.parametrize("ctor,bottleneck,layers,count,n_keys", [
    (resnet18, False, [2, 2, 2, 2], 11_689_512, 122),
    (resnet34, False, [3, 4, 6, 3], 21_797_672, 218),
    (resnet50, True, [3, 4, 6, 3], 25_557_032, 320),
])
def test_torchvision_names_and_counts(ctor, bottleneck, layers, count, n_keys):
    with torch.device("meta"):  # names and shapes only: skip the costly random init
        m = ctor()
    keys = list(m.state_dict())
    assert keys == torchvision_keys(bottleneck, layers)
    assert len(keys) == n_keys
    assert n_params(m) == count
    names = dict(m.named_children())
    assert list(names) == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3",
                           "layer4", "avgpool", "fc"]


def test_resnet_shapes_and_strides():
    r18, r50 = resnet18(), resnet50()
    sd18, sd50 = r18.state_dict(), r50.state_dict()
    assert sd18["conv1.weight"].shape == (64, 3, 7, 7)
    assert sd18["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert sd18["fc.weight"].shape == (1000, 512)
    assert sd50["layer1.0.conv1.weight"].shape == (64, 64, 1, 1)
    assert sd50["layer1.0.conv3.weight"].shape == (256, 64, 1, 1)
    assert sd50["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert sd50["fc.weight"].shape == (1000, 2048)
    # torchvision ResNet V1.5: the stride of a bottleneck sits on its 3x3 conv.
    assert r50.layer2[0].conv2.stride == (2, 2) and r50.layer2[0].conv1.stride == (1, 1)
    with torch.no_grad():
        assert r18.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
        assert r50.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
        assert resnet18(num_classes=7).eval()(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_cifar_resnet18_same_names():
    with torch.device("meta"):
        m = cifar_resnet18()
    assert list(m.state_dict()) == torchvision_keys(False, [2, 2, 2, 2])
    assert m.conv1.weight.shape == (64, 3, 3, 3) and m.conv1.stride == (1, 1)
    assert m.fc.weight.shape == (10, 512)
    assert isinstance(m.maxpool, nn.Identity)
    with torch.no_grad():
        assert cifar_resnet18().eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_get_model_weights_files(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    ref = cifar_resnet(20).eval()
    x = torch.randn(2, 3, 32, 32)
    sd = ref.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    torch.save(sd, tmp_path / "w.pth")
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, tmp_path / "w.pt")
    with torch.no_grad():
        want = ref(x)
        for f in ("w.safetensors", "w.pth", "w.pt"):
            m = get_model("cifar-resnet20", weights=tmp_path / f)
            assert not m.training
            torch.testing.assert_close(m(x), want)
    with pytest.raises(RuntimeError):  # wrong architecture: strict load
        get_model("cifar-resnet32", weights=tmp_path / "w.pth")
    with pytest.raises(FileNotFoundError):
        get_model("resnet18", weights=tmp_path / "missing.safetensors")


def test_get_model_registry():
    assert set(MODEL_NAMES) >= {"fmnist-resnet", "cifar-resnet20", "cifar-resnet32",
                                "cifar-resnet44", "cifar-resnet56", "resnet18", "resnet34",
                                "resnet50"}
    with pytest.raises(ValueError, match="valid names:.*resnet18"):
        get_model("vgg16")
    with pytest.raises(ValueError, match="shared"):
        get_model("resnet18", weights="shared")
    m = get_model("cifar-resnet44")
    assert isinstance(m, CifarResNet) and not m.training and len(m.layer1) == 7


# ----------------------------------------------------------------------------- Fashion-MNIST model

def test_fmnist_architecture():
    m = fmnist_resnet()
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    wino = [c for c in convs if c.kernel_size == (3, 3) and c.stride == (1, 1)]
    assert len(wino) >= len(convs) // 2 + 1  # mostly Winograd-eligible convs
    assert m.conv1.in_channels == 1 and m.fc.out_features == 10
    assert m.eval()(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert n_params(m) < 500_000


def test_load_default_fmnist_model():
    m = load_default_fmnist_model()
    assert isinstance(m, FmnistResNet) and not m.training
    with torch.no_grad():
        out = m(torch.randn(4, 1, 28, 28))
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    assert isinstance(get_model("fmnist-resnet"), FmnistResNet)
    assets = resources.files("winoq").joinpath("assets")
    assert len(assets.joinpath("fmnist_resnet.safetensors").read_bytes()) < 2 * 1024 * 1024
    meta = fmnist_metadata()
    for key in ("seed", "epochs", "test_accuracy", "date", "command"):
        assert key in meta
    assert meta["test_accuracy"] >= 0.90
    assert meta["config"] == m.config()


@pytest.mark.skipif(not FMNIST_DIR.is_dir(),
                    reason=f"{FMNIST_DIR} missing (`apt-get install dataset-fashion-mnist`)")
def test_fmnist_model_accuracy():
    from winoq.data import fashion_mnist_tensors

    x, y = fashion_mnist_tensors("test")
    x, y = x[:2000], y[:2000]
    m = load_default_fmnist_model()
    with torch.no_grad():
        pred = torch.cat([m(x[i:i + 500]).argmax(1) for i in range(0, len(x), 500)])
    acc = (pred == y).float().mean().item()
    assert acc >= 0.90, f"committed Fashion-MNIST model: {acc:.4f} on the first 2000 test images"


# ----------------------------------------------------------------------------- slow (shared)

def _shared_dir():
    for d in default_shared_dirs():
        if (d / "data" / "cifar10-test").is_dir() and list(
                (d / "models" / "cifar10-resnet").glob("resnet20-*.th")):
            return d
    return None


@pytest.mark.slow
def test_shared_cifar_resnet20_accuracy():
    shared = _shared_dir()
    if shared is None:
        pytest.skip("shared folder with models/cifar10-resnet and data/cifar10-test not found")
    from winoq.data import cifar_transform, load_imagefolder_tensors

    x, y = load_imagefolder_tensors(shared / "data" / "cifar10-test", cifar_transform(),
                                    per_class=50)
    assert x.shape == (500, 3, 32, 32)
    m = load_cifar_resnet(20, shared_dir=shared)
    with torch.no_grad():
        acc = (m(x).argmax(1) == y).float().mean().item()
    assert acc > 0.75, f"ResNet-20 on 500 shared CIFAR-10 test images: {acc:.4f}"


@pytest.mark.slow
@pytest.mark.parametrize("recipe_kw, max_drop", [
    (dict(winograd=None, weights="int4", rounding="learned", reconstruction="block", rounding_iters=100), 4.0),
    (dict(winograd=None, activation_ranges="static"), 2.0),
    (dict(winograd=4, rounding="learned", rounding_iters=100), 4.0),
    (dict(winograd=None, weights="fp4_e2m1", format_search="output"), 6.0),
])
def test_shared_cifar_resnet20_calibrated_recipes(recipe_kw, max_drop):
    """Recipes that learn on data, on the real model: 32 calibration images, 468 others evaluated."""
    shared = _shared_dir()
    if shared is None:
        pytest.skip("shared folder with models/cifar10-resnet and data/cifar10-test not found")
    import winoq
    from winoq.data import cifar_transform, load_imagefolder_tensors

    x, y = load_imagefolder_tensors(shared / "data" / "cifar10-test", cifar_transform(), per_class=50)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    calib, x, y = x[perm[:32]], x[perm[32:]], y[perm[32:]]
    m = load_cifar_resnet(20, shared_dir=shared)
    q = winoq.quantize(m, winoq.Recipe(**recipe_kw), calib_data=calib, progress=False)
    with torch.no_grad():
        fp = (m(x).argmax(1) == y).float().mean().item() * 100
        acc = (q(x).argmax(1) == y).float().mean().item() * 100
    print(f"{winoq.Recipe(**recipe_kw).describe()}: {acc:.2f} vs FP {fp:.2f}")
    assert fp - acc < max_drop, f"{winoq.Recipe(**recipe_kw).describe()}: {acc:.2f} vs FP {fp:.2f}"
