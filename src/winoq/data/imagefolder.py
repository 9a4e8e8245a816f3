"""ImageFolder-layout datasets and preprocessing, with PIL + numpy only (no torchvision).

Layout: ``root/<class>/<image>``; the sorted class folder names give label indices
0..C-1, exactly as torchvision's ``ImageFolder`` does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

__all__ = [
    "IMG_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageFolderDataset",
    "to_tensor",
    "Normalize",
    "Compose",
    "ResizeShorter",
    "CenterCrop",
    "cifar_transform",
    "imagenet_transform",
    "load_imagefolder_tensors",
]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image -> float32 tensor ``[C, H, W]`` in [0, 1] (RGB unless the image is L)."""
    if img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float().div_(255.0)


class Normalize:
    """Per-channel ``(x - mean) / std`` on a ``[C, H, W]`` tensor."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


class Compose:
    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(repr(t) for t in self.transforms) + ")"


class ResizeShorter:
    """Resize so the shorter side is ``size`` (aspect kept), like torchvision ``Resize(int)``."""

    def __init__(self, size: int, resample=Image.BILINEAR):
        self.size = int(size)
        self.resample = resample

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        if short == self.size:
            return img
        new_short, new_long = self.size, int(self.size * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        return img.resize((new_w, new_h), self.resample)

    def __repr__(self) -> str:
        return f"ResizeShorter({self.size})"


class CenterCrop:
    """Center crop to ``size x size`` (same rounding as torchvision ``CenterCrop``)."""

    def __init__(self, size: int):
        self.size = int(size)

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        th = tw = self.size
        if w < tw or h < th:
            raise ValueError(f"image {w}x{h} is smaller than the crop {tw}x{th}")
        top = int(round((h - th) / 2.0))
        left = int(round((w - tw) / 2.0))
        return img.crop((left, top, left + tw, top + th))

    def __repr__(self) -> str:
        return f"CenterCrop({self.size})"


def _rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")


def cifar_transform() -> Callable[[Image.Image], torch.Tensor]:
    """CIFAR preprocessing for the ``../shared`` CIFAR ResNets: RGB -> [0, 1] -> ImageNet
    mean/std normalization (mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225))."""
    return Compose([_rgb, to_tensor, Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def imagenet_transform(size: int = 224) -> Callable[[Image.Image], torch.Tensor]:
    """ImageNet eval preprocessing: resize the shorter side to 256 (bilinear; scaled as
    ``round(size * 256 / 224)`` for other sizes), center crop ``size``, [0, 1], ImageNet
    mean/std normalization."""
    resize = int(round(size * 256 / 224))
    return Compose([_rgb, ResizeShorter(resize, Image.BILINEAR), CenterCrop(size), to_tensor,
                    Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def _find_classes(root: Path) -> list[str]:
    if not root.is_dir():
        raise FileNotFoundError(f"image folder root {root} does not exist or is not a directory")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"image folder root {root} has no class sub-folders "
                                f"(expected the layout root/<class>/<image>)")
    return classes


class ImageFolderDataset(torch.utils.data.Dataset):
    """``root/<class>/<image>`` dataset; label = index of the class in sorted folder names.

    ``transform`` maps a PIL image to the returned sample (default: :func:`to_tensor` of
    the RGB image).  Attributes: ``classes``, ``class_to_idx``, ``samples`` (list of
    ``(path, label)``, sorted by class then file name) and ``targets``.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None,
                 extensions: Sequence[str] = IMG_EXTENSIONS):
        self.root = Path(root)
        self.transform = transform
        self.classes = _find_classes(self.root)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        exts = tuple(e.lower() for e in extensions)
        samples: list[tuple[str, int]] = []
        for c in self.classes:
            files = sorted(
                os.path.join(dp, f)
                for dp, _, fs in os.walk(self.root / c, followlinks=True)
                for f in fs if f.lower().endswith(exts))
            samples.extend((p, self.class_to_idx[c]) for p in files)
        if not samples:
            raise FileNotFoundError(f"image folder root {self.root} has class folders "
                                    f"{self.classes} but no images with extensions {exts}")
        self.samples = samples
        self.targets = [y for _, y in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Image.Image:
        path = self.samples[index][0]
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB") if img.mode != "RGB" else img.copy()

    def __getitem__(self, index: int):
        img = self.load(index)
        x = self.transform(img) if self.transform is not None else to_tensor(img)
        return x, self.samples[index][1]


def _select(targets: Sequence[int], limit: int | None, per_class: int | None) -> list[int]:
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(targets):
        by_class.setdefault(y, []).append(i)
    if per_class is not None:
        if per_class < 0:
            raise ValueError(f"per_class must be >= 0, got {per_class}")
        by_class = {y: idx[:per_class] for y, idx in by_class.items()}
    if limit is None:
        return sorted(i for idx in by_class.values() for i in idx)
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    # Round-robin over classes, so a small limit still gives a class-balanced subset.
    order: list[int] = []
    lists = [by_class[y] for y in sorted(by_class)]
    for k in range(max((len(l) for l in lists), default=0)):
        order.extend(l[k] for l in lists if k < len(l))
    return sorted(order[:limit])


def load_imagefolder_tensors(root: str | os.PathLike, transform: Callable | None = None,
                             limit: int | None = None, per_class: int | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Load an ImageFolder set into memory as ``(x [N, ...] float, y [N] int64)``.

    ``per_class`` keeps the first k images (sorted file names) of each class; ``limit``
    caps the total, taking images round-robin across classes so the subset stays
    balanced.  Both ``None`` loads everything.  Meant for fast eval of small sets.
    """
    ds = ImageFolderDataset(root, transform)
    idx = _select(ds.targets, limit, per_class)
    if not idx:
        raise ValueError(f"no images selected from {root} (limit={limit}, per_class={per_class})")
    xs = [ds[i][0] for i in idx]
    x = torch.stack(xs)
    y = torch.tensor([ds.targets[i] for i in idx], dtype=torch.int64)
    return x, y
