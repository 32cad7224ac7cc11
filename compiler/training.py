"""The built-in training loop of ``spruce compile``: any model, optionally sparse.

The loop is the one a user would write: forward, loss, backward, ``optimizer.step()``,
then ``SparseModel.step()`` when the model is sparse. The learning rate follows a
cosine from ``lr`` to zero over all steps.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

__all__ = ["OPTIMIZERS", "TrainLog", "cosine_schedule", "evaluate", "make_optimizer", "train", "train_step"]


def _sgd(params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)


def _adamw(params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {"sgd": _sgd, "adamw": _adamw}


def make_optimizer(name: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name]([p for p in model.parameters() if p.requires_grad], lr)


@dataclass
class TrainLog:
    """Per-epoch loss and test accuracy of one training run."""

    loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    seconds: float = 0.0


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable) -> float:
    """Top-1 accuracy of ``model`` on ``loader`` (eval mode; the model's mode is restored)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for inputs, labels in loader:
        predicted = model(inputs).argmax(dim=1)
        correct += int((predicted == labels).sum())
        total += int(labels.numel())
    model.train(was_training)
    return correct / max(total, 1)


def cosine_schedule(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate decays from the optimizer's to zero along a half cosine over
    ``steps`` optimizer steps (and stays at zero after them)."""
    steps = max(1, steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


def train_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, schedule, sparse=None) -> None:
    """One step of the loop a user writes: gradients of ``loss``, ``optimizer.step()``, then
    the SparseModel's ``step()`` (its method's mask update, when ``sparse`` is given), then
    the learning-rate ``schedule``."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if sparse is not None:
        sparse.step()
    schedule.step()


def train(model: nn.Module, train_loader: Iterable, test_loader: Iterable, epochs: int, lr: float,
          optimizer: str = "sgd", sparse=None, desc: str = "train", quiet: bool = False) -> TrainLog:
    """Train ``model`` (``sparse``: the :class:`SparseModel` wrapping it, stepped after each
    optimizer step) for ``epochs``; returns the per-epoch log."""
    import time

    runner = sparse if sparse is not None else model
    opt = make_optimizer(optimizer, runner, lr)
    if sparse is not None:
        sparse.attach(opt)
    schedule = cosine_schedule(opt, epochs * len(train_loader))
    log = TrainLog()
    start = time.perf_counter()
    disable = quiet or not sys.stderr.isatty()
    for epoch in range(epochs):
        runner.train()
        total = count = 0.0
        for inputs, labels in tqdm(train_loader, desc=f"{desc} {epoch + 1}/{epochs}", leave=False, disable=disable):
            loss = F.cross_entropy(runner(inputs), labels)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: the loss became {loss.item()} at epoch {epoch + 1}; lower --lr")
            train_step(loss, opt, schedule, sparse)
            total += loss.item() * len(labels)
            count += len(labels)
        log.loss.append(total / max(count, 1))
        log.accuracy.append(evaluate(runner, test_loader))
        if not quiet:
            print(f"  {desc} epoch {epoch + 1}/{epochs}: loss {log.loss[-1]:.4f}, test accuracy "
                  f"{log.accuracy[-1]:.4f}", file=sys.stderr, flush=True)
    log.seconds = time.perf_counter() - start
    return log
