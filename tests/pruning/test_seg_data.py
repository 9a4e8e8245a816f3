"""Segmentation loaders on tiny synthetic folders (the Sunnybrook and CHASE_DB1 layouts)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from winoq.data.segmentation import load_chase, load_sunnybrook, paired_files, random_patches


def make_sunnybrook(root, n=3, size=32, split="train"):
    rng = np.random.default_rng(0)
    (root / split / "images").mkdir(parents=True, exist_ok=True)
    (root / split / "masks").mkdir(parents=True, exist_ok=True)
    for k in range(n):
        img = rng.integers(0, 2000, (size, size)).astype(np.uint16)
        Image.fromarray(img).save(root / split / "images" / f"P-{k}_00{k}.png")
        mask = np.zeros((size, size), np.uint8)
        mask[size // 4: size // 2 + k, size // 4: size // 2] = 255
        Image.fromarray(mask).save(root / split / "masks" / f"P-{k}_00{k}.png")
    return root


def make_chase(root, n=2, wh=(36, 30), split="train"):
    rng = np.random.default_rng(1)
    for sub in ("images", "masks", "masks_2nd_observer"):
        (root / split / sub).mkdir(parents=True, exist_ok=True)
    for k in range(n):
        Image.fromarray(rng.integers(0, 255, (wh[1], wh[0], 3)).astype(np.uint8)).save(root / split / "images" / f"0{k}L.jpg")
        for sub, off in (("masks", 0), ("masks_2nd_observer", 1)):
            m = np.zeros((wh[1], wh[0]), np.uint8)
            m[:, 10 + off: 14 + off] = 255
            Image.fromarray(m).save(root / split / sub / f"0{k}L.png")
    return root


def test_sunnybrook_loader_shapes_and_values(tmp_path):
    data = load_sunnybrook("train", make_sunnybrook(tmp_path), size=16)
    assert data.images.shape == (3, 1, 16, 16) and data.masks.shape == (3, 1, 16, 16)
    assert set(data.masks.unique().tolist()) <= {0.0, 1.0} and data.masks.sum() > 0
    assert data.names == ["P-0_000", "P-1_001", "P-2_002"]
    full = load_sunnybrook("train", tmp_path, size=32)   # native size: no resampling
    for img in full.images:   # each image divided by its 99.5th percentile (then clipped at 1.5)
        assert float(torch.quantile(img.flatten(), 0.995)) == pytest.approx(1.0, abs=1e-3)
        assert 1.0 <= float(img.amax()) <= 1.5


def test_chase_loader_downscales_and_keeps_second_observer(tmp_path):
    data = load_chase("train", make_chase(tmp_path), downscale=2)
    assert data.images.shape == (2, 3, 15, 18) and data.masks.shape == (2, 1, 15, 18)
    assert data.reference is not None and data.reference.shape == data.masks.shape
    assert not torch.equal(data.reference, data.masks)


def test_mask_without_image_is_named(tmp_path):
    root = make_sunnybrook(tmp_path)
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "train" / "masks" / "stray.png")
    with pytest.raises(ValueError, match=r"stray\.png.*no image"):
        load_sunnybrook("train", root)


def test_image_without_mask_is_named(tmp_path):
    root = make_sunnybrook(tmp_path)
    (root / "train" / "masks" / "P-1_001.png").unlink()
    with pytest.raises(ValueError, match=r"P-1_001\.png.*no mask"):
        paired_files(root / "train" / "images", root / "train" / "masks")


def test_mask_of_another_size_is_named(tmp_path):
    root = make_chase(tmp_path)
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(root / "train" / "masks" / "01L.png")
    with pytest.raises(ValueError, match=r"01L\.png is 20x20 but its image is 36x30"):
        load_chase("train", root)


def test_random_patches_crop_image_and_mask_together():
    x = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8)
    xi, yi = random_patches(x, x.clone(), 5, 4, torch.Generator().manual_seed(0))
    assert xi.shape == (5, 1, 4, 4) and torch.equal(xi, yi)
