"""Segmentation datasets: Sunnybrook left ventricle (cardiac MRI) and CHASE_DB1 (retinal vessels).

Both folders hold ``<split>/images/<name>.<ext>`` and ``<split>/masks/<name>.png`` (0 / 255),
CHASE_DB1 also ``masks_2nd_observer/``.  Images and masks are paired by file stem; a mask
without an image (or the reverse) or a mask of another size is an error naming the file.

* Sunnybrook: 16-bit PNG, 256 x 256; each image is divided by its 99.5th percentile (the
  DICOM values are raw, see the dataset's SOURCE.md) and resized to ``size``.
* CHASE_DB1: RGB JPEG, 999 x 960; downscaled by an integer ``downscale`` and normalised
  per channel to [0, 1].  Training uses random patches (:func:`random_patches`).

Everything is returned as float32 tensors: images (N, C, H, W), masks (N, 1, H, W) in {0, 1}.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def dataset_root(folder: str) -> Path:
    """``<shared>/data/<folder>`` from the first shared folder that has it ($WINOQ_SHARED,
    ../shared, the repo's sibling shared/); FileNotFoundError lists the places searched."""
    from ..models.cifar_resnet import default_shared_dirs

    tried = [d / "data" / folder for d in default_shared_dirs()]
    for path in tried:
        if path.is_dir():
            return path
    raise FileNotFoundError(f"dataset folder {folder!r} not found in {', '.join(map(str, tried))}; "
                            f"set WINOQ_SHARED or pass root=")
@dataclass
class SegmentationSet:
    """Images, masks and names of one split; ``reference`` is a second annotation if any."""
    images: torch.Tensor
    masks: torch.Tensor
    names: list[str]
    reference: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.names)


def _files_by_stem(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"folder {folder} not found; check the dataset root")
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}


def paired_files(image_dir: str | os.PathLike, mask_dir: str | os.PathLike) -> list[tuple[str, Path, Path]]:
    """(name, image path, mask path) for every image; names must match one to one."""
    images, masks = _files_by_stem(Path(image_dir)), _files_by_stem(Path(mask_dir))
    if not images:
        raise FileNotFoundError(f"no images in {image_dir}")
    for name, path in masks.items():
        if name not in images:
            raise ValueError(f"mask {path} has no image of the same name in {image_dir}; "
                             f"rename or remove it (images and masks are paired by file name)")
    for name, path in images.items():
        if name not in masks:
            raise ValueError(f"image {path} has no mask of the same name in {mask_dir}; "
                             f"add the mask or remove the image (images and masks are paired by file name)")
    return [(name, images[name], masks[name]) for name in sorted(images)]


def read_mask(path: Path, image_size: tuple[int, int]) -> np.ndarray:
    """A 0/255 mask as a bool array; its (width, height) must equal ``image_size``."""
    from PIL import Image

    with Image.open(path) as m:
        if m.size != image_size:
            raise ValueError(f"mask {path} is {m.size[0]}x{m.size[1]} but its image is "
                             f"{image_size[0]}x{image_size[1]} (width x height); masks must match their images")
        arr = np.asarray(m.convert("L"))
    return arr >= 128


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)


def _resize_mask(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return (_resize(m, size) >= 0.5).float()


def _read_sunnybrook_image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        size = im.size
        arr = np.asarray(im, dtype=np.float32) if im.mode.startswith("I") else np.asarray(im.convert("F"), dtype=np.float32)
    scale = float(np.percentile(arr, 99.5))
    return np.clip(arr / max(scale, 1e-6), 0.0, 1.5), size


def load_sunnybrook(split: str = "train", root: str | os.PathLike | None = None, size: int = 128,
                    crop: int | None = None) -> SegmentationSet:
    """Sunnybrook LV slices of ``split`` ("train" / "test"): optionally the central ``crop`` x ``crop``
    region (the short-axis views centre the heart), resized to ``size`` x ``size``."""
    root = Path(root) if root is not None else dataset_root("sunnybrook_lv")
    images, masks, names = [], [], []
    for name, ip, mp in paired_files(root / split / "images", root / split / "masks"):
        img, wh = _read_sunnybrook_image(ip)
        images.append(torch.from_numpy(img)[None, None])
        masks.append(torch.from_numpy(read_mask(mp, wh).astype(np.float32))[None, None])
        names.append(name)
    x, y = torch.cat(images), torch.cat(masks)
    if crop is not None:
        h, w = x.shape[-2:]
        if not 1 <= crop <= min(h, w):
            raise ValueError(f"crop {crop} must be between 1 and the image size {h}x{w}")
        top, left = (h - crop) // 2, (w - crop) // 2
        x, y = x[..., top:top + crop, left:left + crop], y[..., top:top + crop, left:left + crop]
    x = _resize(x, (size, size))
    y = _resize_mask(y, (size, size))
    return SegmentationSet(x.contiguous(), y.contiguous(), names)


def load_chase(split: str = "train", root: str | os.PathLike | None = None, downscale: int = 3) -> SegmentationSet:
    """CHASE_DB1 fundus images of ``split``, downscaled by ``downscale``; ``reference`` holds the
    second observer's masks (the human agreement a model is compared with)."""
    from PIL import Image

    if int(downscale) < 1:
        raise ValueError(f"downscale must be >= 1, got {downscale}")
    root = Path(root) if root is not None else dataset_root("chase_db1")
    pairs = paired_files(root / split / "images", root / split / "masks")
    second_dir = root / split / "masks_2nd_observer"
    second = paired_files(root / split / "images", second_dir) if second_dir.is_dir() else None
    images, masks, refs, names = [], [], [], []
    for k, (name, ip, mp) in enumerate(pairs):
        with Image.open(ip) as im:
            wh = im.size
            img = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        images.append(torch.from_numpy(img).permute(2, 0, 1)[None])
        masks.append(torch.from_numpy(read_mask(mp, wh).astype(np.float32))[None, None])
        if second is not None:
            refs.append(torch.from_numpy(read_mask(second[k][2], wh).astype(np.float32))[None, None])
        names.append(name)
    shapes = {tuple(t.shape[-2:]) for t in images}
    if len(shapes) != 1:
        raise ValueError(f"CHASE_DB1 images in {root / split / 'images'} have different sizes {sorted(shapes)}")
    h, w = shapes.pop()
    size = (h // downscale, w // downscale)
    x = _resize(torch.cat(images), size)
    y = _resize_mask(torch.cat(masks), size)
    ref = _resize_mask(torch.cat(refs), size) if refs else None
    return SegmentationSet(x.contiguous(), y.contiguous(), names, ref)


def load_segmentation(dataset: str, split: str, root: str | os.PathLike | None = None, **kwargs) -> SegmentationSet:
    """``dataset``: "sunnybrook" or "chase"."""
    if dataset == "sunnybrook":
        return load_sunnybrook(split, root, **kwargs)
    if dataset == "chase":
        return load_chase(split, root, **kwargs)
    raise ValueError(f"unknown segmentation dataset {dataset!r}; use 'sunnybrook' or 'chase'")


# ----------------------------------------------------------------------------- augmentation
def random_patches(images: torch.Tensor, masks: torch.Tensor, n: int, size: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random ``size`` x ``size`` crops (image and mask at the same place)."""
    N, _, H, W = images.shape
    if size > H or size > W:
        raise ValueError(f"patch size {size} exceeds the image size {H}x{W}")
    idx = torch.randint(N, (n,), generator=generator)
    ys = torch.randint(H - size + 1, (n,), generator=generator)
    xs = torch.randint(W - size + 1, (n,), generator=generator)
    xi = torch.stack([images[i, :, y:y + size, x:x + size] for i, y, x in zip(idx, ys, xs)])
    yi = torch.stack([masks[i, :, y:y + size, x:x + size] for i, y, x in zip(idx, ys, xs)])
    return xi, yi


def augment(images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator,
            rotate90: bool = True, intensity: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample random flips, 90-degree rotations and a brightness / contrast jitter."""
    out_x, out_y = [], []
    for x, y in zip(images, masks):
        if torch.rand((), generator=generator) < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        if torch.rand((), generator=generator) < 0.5:
            x, y = x.flip(-2), y.flip(-2)
        if rotate90 and x.shape[-1] == x.shape[-2]:
            k = int(torch.randint(4, (), generator=generator))
            x, y = torch.rot90(x, k, (-2, -1)), torch.rot90(y, k, (-2, -1))
        gain = 1.0 + intensity * (2 * torch.rand((), generator=generator) - 1)
        shift = intensity * (2 * torch.rand((), generator=generator) - 1)
        out_x.append(x * gain + shift)
        out_y.append(y)
    return torch.stack(out_x), torch.stack(out_y)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Zero-pad the bottom / right so H and W divide ``multiple``; returns the original (H, W)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    return (F.pad(x, (0, pw, 0, ph)) if ph or pw else x), (h, w)
