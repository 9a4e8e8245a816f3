"""Tests for winoq.data: IDX parsing, Fashion-MNIST loading, ImageFolder and transforms.

Only the test marked ``needs_fmnist`` reads the real dataset (skipped when the Debian
package ``dataset-fashion-mnist`` is not installed); everything else uses files
generated in ``tmp_path``.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from winoq.data import (
    FASHION_MNIST_CLASSES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    CenterCrop,
    ImageFolderDataset,
    ResizeShorter,
    cifar_transform,
    fashion_mnist_tensors,
    imagenet_transform,
    load_fashion_mnist,
    load_imagefolder_tensors,
    read_idx,
    to_tensor,
)

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(
    not FMNIST_DIR.is_dir(),
    reason=f"{FMNIST_DIR} missing (install with `apt-get install dataset-fashion-mnist`)")


def write_idx(path: Path, arr: np.ndarray, type_code: int = 0x08, magic: bytes | None = None,
              compress: bool = True) -> Path:
    header = magic if magic is not None else bytes([0, 0, type_code, arr.ndim])
    header += struct.pack(">" + "I" * arr.ndim, *arr.shape)
    payload = header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
    return path


def make_fake_fmnist(root: Path, n_train: int = 12, n_test: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = {}
    for split, n, prefix in (("train", n_train, "train"), ("test", n_test, "t10k")):
        imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        lbls = rng.integers(0, 10, size=(n,), dtype=np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", imgs)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", lbls)
        out[split] = (imgs, lbls)
    return out


# ----------------------------------------------------------------------------- IDX files

def test_read_idx_roundtrip_gz_and_plain(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    got = read_idx(write_idx(tmp_path / "a-idx3-ubyte.gz", arr), expected_ndim=3)
    np.testing.assert_array_equal(got, arr)
    got = read_idx(write_idx(tmp_path / "a-idx3-ubyte", arr, compress=False))
    np.testing.assert_array_equal(got, arr)


def test_read_idx_big_endian_int32(tmp_path):
    arr = np.array([1, -2, 70000], dtype=np.int32)
    got = read_idx(write_idx(tmp_path / "b.gz", arr, type_code=0x0C))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, arr)


def test_read_idx_bad_magic(tmp_path):
    arr = np.zeros((3,), dtype=np.uint8)
    path = write_idx(tmp_path / "bad-labels-idx1-ubyte.gz", arr, magic=b"\x12\x34\x08\x01")
    with pytest.raises(ValueError, match="magic") as ei:
        read_idx(path)
    assert str(path) in str(ei.value)
    assert "dataset-fashion-mnist" in str(ei.value)


def test_read_idx_wrong_ndim_and_truncated(tmp_path):
    arr = np.zeros((4, 2), dtype=np.uint8)
    path = write_idx(tmp_path / "c.gz", arr)
    with pytest.raises(ValueError, match="dimensions"):
        read_idx(path, expected_ndim=3)
    raw = gzip.decompress(path.read_bytes())
    trunc = tmp_path / "d.gz"
    trunc.write_bytes(gzip.compress(raw[:-3]))
    with pytest.raises(ValueError, match="corrupt"):
        read_idx(trunc)


def test_read_idx_not_gzip_and_missing(tmp_path):
    bad = tmp_path / "e.gz"
    bad.write_bytes(b"this is not gzip data")
    with pytest.raises(ValueError, match=str(bad).replace("\\", "\\\\")):
        read_idx(bad)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        read_idx(tmp_path / "missing.gz")


def test_load_fashion_mnist_synthetic_root(tmp_path):
    ref = make_fake_fmnist(tmp_path)
    x, y = load_fashion_mnist("train", root=tmp_path)
    assert x.dtype == torch.uint8 and x.shape == (12, 28, 28)
    assert y.dtype == torch.int64 and y.shape == (12,)
    np.testing.assert_array_equal(x.numpy(), ref["train"][0])
    np.testing.assert_array_equal(y.numpy(), ref["train"][1])
    x, y = load_fashion_mnist("test", root=tmp_path)
    assert x.shape == (5, 28, 28) and y.shape == (5,)
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("val", root=tmp_path)


def test_load_fashion_mnist_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("test", root=tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte.gz"):
        load_fashion_mnist("test", root=tmp_path)


def test_load_fashion_mnist_count_mismatch(tmp_path):
    make_fake_fmnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(4, dtype=np.uint8))
    with pytest.raises(ValueError, match="labels"):
        load_fashion_mnist("test", root=tmp_path)


def test_fashion_mnist_tensors_normalization(tmp_path, monkeypatch):
    make_fake_fmnist(tmp_path)
    monkeypatch.setenv("WINOQ_FASHION_MNIST", str(tmp_path))
    raw, _ = load_fashion_mnist("train")
    x, y = fashion_mnist_tensors("train")
    assert x.shape == (12, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    expect = (raw.float() / 255 - 0.2860) / 0.3530
    torch.testing.assert_close(x[:, 0], expect)
    x01, _ = fashion_mnist_tensors("train", normalize=False)
    assert 0.0 <= x01.min() and x01.max() <= 1.0


@needs_fmnist
def test_real_fashion_mnist_test_split():
    x, y = load_fashion_mnist("test")
    assert x.shape == (10000, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (10000,) and y.dtype == torch.int64
    assert torch.bincount(y).tolist() == [1000] * 10
    assert len(FASHION_MNIST_CLASSES) == 10


# ----------------------------------------------------------------------------- ImageFolder

def make_folder(root: Path, classes=("dog", "cat", "bird"), per_class=(3, 2, 4), size=(8, 6)):
    colors = {}
    for ci, (c, n) in enumerate(zip(classes, per_class)):
        (root / c).mkdir(parents=True)
        for i in range(n):
            color = (10 * ci + i, 100 + i, 200 - ci)
            colors[(c, i)] = color
            Image.new("RGB", size, color).save(root / c / f"{i:03d}.png")
    (root / "cat" / "notes.txt").write_text("not an image")
    return colors


def test_imagefolder_classes_and_labels(tmp_path):
    colors = make_folder(tmp_path)
    ds = ImageFolderDataset(tmp_path, transform=None)
    assert ds.classes == ["bird", "cat", "dog"]
    assert ds.class_to_idx == {"bird": 0, "cat": 1, "dog": 2}
    assert len(ds) == 9
    assert ds.targets == [0] * 4 + [1] * 2 + [2] * 3
    x, y = ds[4]  # first cat image
    assert y == 1 and x.shape == (3, 6, 8) and x.dtype == torch.float32
    expect = torch.tensor(colors[("cat", 0)], dtype=torch.float32) / 255
    torch.testing.assert_close(x[:, 0, 0], expect)


def test_imagefolder_grayscale_converted_to_rgb(tmp_path):
    (tmp_path / "a").mkdir()
    Image.new("L", (5, 5), 77).save(tmp_path / "a" / "g.png")
    x, y = ImageFolderDataset(tmp_path)[0]
    assert x.shape == (3, 5, 5) and y == 0
    torch.testing.assert_close(x, torch.full((3, 5, 5), 77 / 255))


def test_imagefolder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no class sub-folders"):
        ImageFolderDataset(tmp_path / "empty")
    (tmp_path / "empty" / "cls").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolderDataset(tmp_path / "empty")


def test_load_imagefolder_tensors_subsets(tmp_path):
    make_folder(tmp_path)
    x, y = load_imagefolder_tensors(tmp_path, cifar_transform())
    assert x.shape == (9, 3, 6, 8) and y.tolist() == [0] * 4 + [1] * 2 + [2] * 3
    x, y = load_imagefolder_tensors(tmp_path, cifar_transform(), per_class=2)
    assert y.tolist() == [0, 0, 1, 1, 2, 2]
    x, y = load_imagefolder_tensors(tmp_path, None, limit=3)  # round-robin: one per class
    assert sorted(y.tolist()) == [0, 1, 2] and x.shape == (3, 3, 6, 8)
    x, y = load_imagefolder_tensors(tmp_path, None, limit=7, per_class=3)
    assert torch.bincount(y).tolist() == [3, 2, 2]


# ----------------------------------------------------------------------------- transforms

def test_cifar_transform_numbers():
    img = Image.new("RGB", (32, 32), (255, 128, 0))
    x = cifar_transform()(img)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    expect = [(255 / 255 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (0 - 0.406) / 0.225]
    torch.testing.assert_close(x[:, 5, 7], torch.tensor(expect), atol=1e-6, rtol=1e-6)
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)


def test_to_tensor_layout():
    arr = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)  # H=2, W=3, C=3
    x = to_tensor(Image.fromarray(arr))
    assert x.shape == (3, 2, 3)
    torch.testing.assert_close(x, torch.from_numpy(arr).permute(2, 0, 1).float() / 255)


def test_resize_shorter_and_center_crop_geometry():
    assert ResizeShorter(256)(Image.new("RGB", (400, 300))).size == (341, 256)
    assert ResizeShorter(256)(Image.new("RGB", (300, 500))).size == (256, 426)
    # Center crop picks the middle: columns 3..6 of a 10-wide ramp, rows 1..4 of 6 rows.
    arr = np.tile(np.arange(10, dtype=np.uint8)[None, :, None], (6, 1, 3))
    arr[:, :, 1] = np.arange(6, dtype=np.uint8)[:, None]
    out = np.asarray(CenterCrop(4)(Image.fromarray(arr)))
    assert out[0, :, 0].tolist() == [3, 4, 5, 6]
    assert out[:, 0, 1].tolist() == [1, 2, 3, 4]


def test_imagenet_transform_shapes_and_values():
    t = imagenet_transform()
    x = t(Image.new("RGB", (500, 375), (0, 255, 128)))
    assert x.shape == (3, 224, 224)
    expect = [(0 - 0.485) / 0.229, (1 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225]
    torch.testing.assert_close(x.mean(dim=(1, 2)), torch.tensor(expect), atol=1e-5, rtol=1e-5)
    assert imagenet_transform(112)(Image.new("RGB", (64, 80))).shape == (3, 112, 112)
