"""Datasets and preprocessing (Fashion-MNIST IDX files, ImageFolder layouts)."""

from .fashion_mnist import (
    DEFAULT_FASHION_MNIST_ROOT,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    fashion_mnist_tensors,
    load_fashion_mnist,
    read_idx,
)
from .imagefolder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    IMG_EXTENSIONS,
    CenterCrop,
    Compose,
    ImageFolderDataset,
    Normalize,
    ResizeShorter,
    cifar_transform,
    imagenet_transform,
    load_imagefolder_tensors,
    to_tensor,
)

__all__ = [
    "DEFAULT_FASHION_MNIST_ROOT",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "fashion_mnist_tensors",
    "load_fashion_mnist",
    "read_idx",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMG_EXTENSIONS",
    "CenterCrop",
    "Compose",
    "ImageFolderDataset",
    "Normalize",
    "ResizeShorter",
    "cifar_transform",
    "imagenet_transform",
    "load_imagefolder_tensors",
    "to_tensor",
]
