"""The embedded default's trained weights, cached so that ``spruce compile`` trains the small
digits CNN once per machine rather than on every run.

An entry is keyed by everything the trained weights depend on: the seed, the initial weights
(the architecture with them), the data (the recovery and held-out tensors), the training options
(epochs, learning rate, optimizer, batch size) and the code that trains (this package's version,
the source of :mod:`~spruce.compiler.training` and :mod:`~spruce.compiler.datasets`, torch's
version). It holds the trained state dict, the training log and the random states training left
behind (torch's global generator and the recovery loader's), which a hit restores, so a cached run
continues exactly as a training one would. Entries are written atomically; an entry that cannot be
read is trained again and replaced, and a cache folder that cannot be written only costs the cache.

The folder is ``$SPRUCE_MODEL_CACHE``, else ``$XDG_CACHE_HOME/spruce/models``, else
``~/.cache/spruce/models``.
"""

from __future__ import annotations

import hashlib
import os
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .. import __version__
from ..targets.files import atomic_path
from . import datasets, training
from .datasets import Loaders
from .training import TrainLog, train

__all__ = ["CACHE_ENV", "default_cache_dir", "trained_default"]

CACHE_ENV = "SPRUCE_MODEL_CACHE"
_FORMAT = 1


def default_cache_dir() -> Path:
    """``$SPRUCE_MODEL_CACHE``, else ``$XDG_CACHE_HOME/spruce/models``, else ``~/.cache/spruce/models``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "spruce" / "models"


def trained_default(model: nn.Module, data: Loaders, seed: int, epochs: int, lr: float, optimizer: str,
                    quiet: bool = False, cache_dir: Path | None = None) -> tuple[TrainLog, bool]:
    """Train the embedded default ``model`` in place on ``data`` (seeded with ``seed``), or load
    the weights a previous identical training left in the cache; returns the training log and
    whether it came from the cache. Data whose loaders are not plain tensor loaders is trained
    every time (its key cannot be computed without reading it)."""
    folder = default_cache_dir() if cache_dir is None else Path(cache_dir)
    key = _key(model, data, seed, epochs, lr, optimizer)
    path = folder / f"digits-cnn-{key}.pt" if key is not None else None
    if path is not None and path.is_file():
        log = _restore(model, data, path)
        if log is not None:
            if not quiet:
                print(f"  dense (the embedded default): trained weights from the cache {path}", file=sys.stderr)
            return log, True
    torch.manual_seed(seed)
    log = train(model, data.train, data.test, epochs, lr, optimizer,
                desc="dense (the embedded default's training)", quiet=quiet)
    if path is not None:
        _store(model, data, log, path)
    return log, False


def _key(model: nn.Module, data: Loaders, seed: int, epochs: int, lr: float, optimizer: str) -> str | None:
    tensors = [*_dataset_tensors(data.train), *_dataset_tensors(data.test)]
    if not tensors or _generator(data.train) is None:
        return None
    digest = hashlib.sha256()
    for part in (_FORMAT, __version__, torch.__version__, seed, epochs, float(lr), optimizer,
                 data.train.batch_size, data.name):
        digest.update(repr(part).encode() + b"\0")
    for module in (training, datasets):
        digest.update(Path(module.__file__).read_bytes())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode() + b"\0")
        _update(digest, tensor)
    for tensor in tensors:
        _update(digest, tensor)
    return digest.hexdigest()[:24]


def _update(digest: Any, tensor: torch.Tensor) -> None:
    digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())


def _dataset_tensors(loader: Iterable) -> list[torch.Tensor]:
    if isinstance(loader, DataLoader) and isinstance(loader.dataset, TensorDataset):
        return list(loader.dataset.tensors)
    return []


def _generator(loader: Iterable) -> torch.Generator | None:
    return loader.generator if isinstance(loader, DataLoader) else None


def _store(model: nn.Module, data: Loaders, log: TrainLog, path: Path) -> None:
    entry = {"format": _FORMAT, "state_dict": model.state_dict(), "loss": list(log.loss),
             "accuracy": list(log.accuracy), "seconds": log.seconds, "rng": torch.get_rng_state(),
             "loader_rng": _generator(data.train).get_state()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as temp, open(temp, "wb") as stream:
            torch.save(entry, stream)
    except (OSError, ValueError) as exc:  # an unwritable cache costs the cache only
        warnings.warn(f"spruce: the trained default model could not be cached in {path.parent}: {exc} "
                      f"(set {CACHE_ENV} to a writable folder)", stacklevel=3)


def _restore(model: nn.Module, data: Loaders, path: Path) -> TrainLog | None:
    """Load the entry at ``path`` into ``model`` and the random states; None if it is unreadable."""
    try:
        with open(path, "rb") as stream:
            entry = torch.load(stream, map_location="cpu", weights_only=True)
        state, own = entry["state_dict"], model.state_dict()
        if entry.get("format") != _FORMAT or set(state) != set(own) or any(
                state[name].shape != own[name].shape or state[name].dtype != own[name].dtype for name in own):
            return None
        log = TrainLog(loss=[float(v) for v in entry["loss"]], accuracy=[float(v) for v in entry["accuracy"]],
                       seconds=float(entry["seconds"]))
        rng, loader_rng = entry["rng"], entry["loader_rng"]
    except Exception:  # noqa: BLE001 - a damaged entry (truncated, another format): train again
        return None
    model.load_state_dict(state)
    torch.set_rng_state(rng)
    _generator(data.train).set_state(loader_rng)
    return log
