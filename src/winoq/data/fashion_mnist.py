"""Fashion-MNIST from the gzip IDX files of the Debian package ``dataset-fashion-mnist``.

The files are read from ``/usr/share/datasets/fashion-mnist/`` by default (or ``root``);
nothing is ever downloaded.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DEFAULT_FASHION_MNIST_ROOT",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "read_idx",
    "load_fashion_mnist",
    "fashion_mnist_tensors",
]

DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

_FIX = "install it with `apt-get install dataset-fashion-mnist`"

# IDX type codes -> numpy big-endian dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike, expected_ndim: int | None = None) -> np.ndarray:
    """Parse an IDX file (optionally gzip-compressed) into a numpy array.

    The magic number is ``0x00 0x00 <type> <ndim>`` followed by ``ndim`` big-endian
    uint32 sizes.  Raises ``ValueError`` naming the file if the magic number, the
    dimension count or the payload size is wrong, ``FileNotFoundError`` if missing.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Fashion-MNIST file {path} not found; {_FIX}")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"cannot read IDX file {path} ({e}); it looks corrupt, reinstall it "
                         f"with `apt-get install --reinstall dataset-fashion-mnist`") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        magic = raw[:4].hex() if raw else "<empty>"
        raise ValueError(f"bad IDX magic number 0x{magic} in {path}; the file is corrupt or not "
                         f"an IDX file, reinstall it with "
                         f"`apt-get install --reinstall dataset-fashion-mnist`")
    dtype = _IDX_DTYPES[raw[2]]
    ndim = raw[3]
    if expected_ndim is not None and ndim != expected_ndim:
        raise ValueError(f"IDX file {path} has {ndim} dimensions, expected {expected_ndim} "
                         f"(magic 0x{raw[:4].hex()}); wrong or corrupt file, reinstall it with "
                         f"`apt-get install --reinstall dataset-fashion-mnist`")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"IDX file {path} is truncated (header); reinstall it with "
                         f"`apt-get install --reinstall dataset-fashion-mnist`")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    count = int(np.prod(shape)) if shape else 1
    nbytes = count * dtype.itemsize
    if len(raw) - header != nbytes:
        raise ValueError(f"IDX file {path} holds {len(raw) - header} data bytes, expected "
                         f"{nbytes} for shape {shape}; the file is corrupt, reinstall it with "
                         f"`apt-get install --reinstall dataset-fashion-mnist`")
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _resolve_root(root: str | os.PathLike | None) -> Path:
    root = Path(root) if root is not None else Path(
        os.environ.get("WINOQ_FASHION_MNIST", DEFAULT_FASHION_MNIST_ROOT))
    if not root.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST directory {root} not found; {_FIX}")
    return root


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images, labels)``: uint8 ``[N, 28, 28]`` and int64 ``[N]``.

    ``split`` is ``"train"`` (60,000 images) or ``"test"`` (10,000).  ``root`` defaults to
    ``$WINOQ_FASHION_MNIST`` or ``/usr/share/datasets/fashion-mnist``.
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = _resolve_root(root)
    img_name, lbl_name = _FILES[split]
    images = read_idx(root / img_name, expected_ndim=3)
    labels = read_idx(root / lbl_name, expected_ndim=1)
    if images.dtype != np.uint8 or labels.dtype != np.uint8:
        raise ValueError(f"unexpected IDX element types in {root} ({images.dtype}, {labels.dtype});"
                         f" reinstall with `apt-get install --reinstall dataset-fashion-mnist`")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{root / img_name} has {images.shape[0]} images but {root / lbl_name} "
                         f"has {labels.shape[0]} labels; reinstall with "
                         f"`apt-get install --reinstall dataset-fashion-mnist`")
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"label out of range in {root / lbl_name}")
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def fashion_mnist_tensors(split: str = "train", normalize: bool = True,
                          root: str | os.PathLike | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(x, y)``: float32 ``[N, 1, 28, 28]`` and int64 ``[N]``.

    Pixels are scaled to [0, 1] and, when ``normalize``, standardized with
    mean ``0.2860`` / std ``0.3530``.
    """
    images, labels = load_fashion_mnist(split, root)
    x = images.unsqueeze(1).float().div_(255.0)
    if normalize:
        x.sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD)
    return x, labels
