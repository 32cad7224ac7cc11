"""What the trainer callbacks share: one sparse run driven by a trainer's lifecycle events.

:class:`SparseRun` is what a callback for a training framework (``spruce.api.lightning``,
``spruce.api.hf_trainer``) calls from that framework's hooks: ``start`` (``sparsify`` with the
trainer's total optimizer steps as ``total_steps``), ``attach`` (the trainer's optimizer),
``after_batch`` (``SparseModel.step`` once for every optimizer step really taken since the
last call) and ``finish`` (``compact`` for structure="channel", ``fold`` otherwise). It
imports neither framework.

Which optimizer steps count is read from the optimizer itself (:class:`OptimizerSteps`, a
step post-hook on the torch optimizer): a micro-batch of gradient accumulation takes no step,
and torch's AMP ``GradScaler`` does not call ``optimizer.step()`` when the gradients hold
inf/NaN, so neither advances the method.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from ..passes.sparsity.method import MethodConfig
from ..passes.sparsity.model import SparseModel
from .verbs import sparsify

__all__ = ["OptimizerSteps", "SparseRun", "SparseRunCallback", "torch_optimizer"]


def torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` inside a framework's wrapper (accelerate's
    ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``: both keep it as
    ``.optimizer``). Raises ``TypeError`` when there is none."""
    for _ in range(8):  # AcceleratedOptimizer subclasses torch's Optimizer but holds its state elsewhere
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"expected a torch.optim.Optimizer (or a wrapper holding one as .optimizer), "
                        f"got {type(optimizer).__name__}")
    return optimizer


class OptimizerSteps:
    """Counts the steps ``optimizer`` really takes (a step post-hook: it runs only when
    ``optimizer.step()`` runs, so not on accumulation micro-batches nor on steps the AMP
    grad scaler skipped). :meth:`pop` returns the count since the last pop."""

    def __init__(self, optimizer: Any):
        self.optimizer = torch_optimizer(optimizer)
        self._taken = 0
        self._handle = self.optimizer.register_step_post_hook(self._count)

    def _count(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self._taken += 1

    def pop(self) -> int:
        taken, self._taken = self._taken, 0
        return taken

    def remove(self) -> None:
        self._handle.remove()


class SparseRun:
    """One sparse run inside a trainer: the method's config and ``sparsify``'s other
    options, applied once the trainer knows its length.

    ``method``: a method config or name (as :func:`spruce.sparsify`); ``example_inputs``: what
    ``sparsify`` traces the model with; ``options``: ``sparsify``'s other keyword arguments
    (``structure``, ``sparsity``, ``budget``, ``latency_table``, ...; not ``total_steps``, which
    is the trainer's). Raises ``ValueError`` for ``total_steps`` among the options."""

    def __init__(self, method: str | MethodConfig, example_inputs: object, options: Mapping[str, Any]):
        if "total_steps" in options:
            raise ValueError("total_steps is the trainer's number of optimizer steps: do not pass it")
        self.method = method
        self.example_inputs = example_inputs
        self.options = dict(options)
        self.sparse: SparseModel | None = None
        self.result: nn.Module | None = None
        self._steps: OptimizerSteps | None = None

    def start(self, model: nn.Module, total_steps: int) -> SparseModel:
        """``sparsify(model, ...)`` scheduled over ``total_steps`` optimizer steps (the
        method's defaults scaled to it); the SparseModel shares ``model``'s parameters.
        Raises ``ValueError`` for a run length that is not a positive integer (a trainer
        without max steps or epochs) and what ``sparsify`` refuses."""
        if isinstance(total_steps, float) and total_steps.is_integer():
            total_steps = int(total_steps)
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"the trainer's number of optimizer steps must be a positive integer to schedule "
                             f"the method, got {total_steps!r}: set max_steps or max_epochs")
        self.sparse = sparsify(model, self.example_inputs, self.method, total_steps=total_steps, **self.options)
        return self.sparse

    def attach(self, optimizer: Any) -> None:
        """Attach the trainer's optimizer (unwrapped) to the SparseModel and count its steps."""
        opt = torch_optimizer(optimizer)
        if self._steps is not None:
            self._steps.remove()
        self.sparse.attach(opt)
        self._steps = OptimizerSteps(opt)

    def after_batch(self, loss: float | torch.Tensor | None = None) -> int:
        """``SparseModel.step()`` once per optimizer step taken since the last call (the
        batch's training ``loss``, when the trainer gives it, feeds the SparseModel's loss
        guard); returns how many."""
        taken = self._steps.pop() if self._steps is not None else 0
        for _ in range(taken):
            self.sparse.step(loss=loss)
        return taken

    def finish(self) -> nn.Module:
        """The trained result: ``compact()`` for structure="channel" (channels removed),
        ``fold()`` otherwise (pruned weights are zeros); also kept as :attr:`result`."""
        if self._steps is not None:
            self._steps.remove()
            self._steps = None
        self.result = self.sparse.compact() if self.sparse.structure == "channel" else self.sparse.fold()
        return self.result


class SparseRunCallback:
    """What every trainer callback exposes of its :class:`SparseRun` (``self.run``): ``sparse``,
    the SparseModel once training began, and ``result``, the compact / folded model after it."""

    run: SparseRun

    @property
    def sparse(self) -> SparseModel | None:
        return self.run.sparse

    @property
    def result(self) -> nn.Module | None:
        return self.run.result
