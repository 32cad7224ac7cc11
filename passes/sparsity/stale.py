"""Optimizers that do not hold the parameters they are used for: the warning and its watch.

An optimizer built before ``sparsify`` on other tensors updates nothing of the SparseModel
(``SparseModel.attach`` says so at once). ``compact()`` and ``fold()`` return a model with
parameters of its own, which the optimizer attached to the SparseModel does not hold; that is
only a mistake when that optimizer is then used to train the new model, so the warning waits
for it: :class:`StaleOptimizerWatch` hooks the optimizer's ``step`` (a step pre-hook) and warns,
once per optimizer, when it steps while a compact or folded model has gradients.
"""

from __future__ import annotations

import warnings
import weakref

import torch
from torch import nn

__all__ = ["OPTIMIZER_REMEDY", "StaleOptimizerWarning", "StaleOptimizerWatch", "held_by"]

OPTIMIZER_REMEDY = ("build the optimizer after sparsify() on sm.parameters() (the model's own parameters, "
                    "which the SparseModel shares, do too), and a new one on a compact or folded model's "
                    "parameters to train that model")


class StaleOptimizerWarning(UserWarning):
    """An optimizer that does not hold the parameters it is about to be used for: one built
    before ``sparsify`` on other tensors (at ``attach``), or the SparseModel's optimizer
    stepping while a model made by ``compact()`` / ``fold()`` is trained (it has parameters of
    its own, which that optimizer does not update)."""


def held_by(optimizer: torch.optim.Optimizer) -> set[int]:
    """The ids of the tensors ``optimizer`` updates."""
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


class StaleOptimizerWatch:
    """Watches one optimizer for steps taken while a model it does not train is being trained.

    :meth:`watch` registers a step pre-hook on the optimizer (one per optimizer) and remembers
    the new model's parameters that the optimizer does not hold (weakly: a model that is
    dropped is forgotten). When the optimizer steps and one of them has a gradient, the user
    is training the new model with the old optimizer: :class:`StaleOptimizerWarning`, once,
    and the hook is removed. A loop that compacts at the end and never steps again, or that
    keeps training the SparseModel, hears nothing."""

    def __init__(self) -> None:
        self._handle = None
        self._watched: list[weakref.ref] = []

    def watch(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
        held = held_by(optimizer)
        own = [p for p in model.parameters() if p.requires_grad and id(p) not in held]
        if not own:
            return
        self._watched += [weakref.ref(p) for p in own]
        if self._handle is None:
            watched = weakref.ref(self)
            self._handle = optimizer.register_step_pre_hook(
                lambda opt, args, kwargs: watched() is not None and watched().check())

    def check(self) -> None:
        """The hook: warn (once) when a watched parameter has a gradient."""
        alive = [p for p in (ref() for ref in self._watched) if p is not None]
        if any(p.grad is not None for p in alive):
            self.stop()
            warnings.warn(StaleOptimizerWarning(
                f"this optimizer steps while a model made by compact() / fold() is trained, but it holds "
                f"the SparseModel's parameters, not that model's ({len(alive)} tensors): it updates nothing of "
                f"it; build a new optimizer on that model's parameters"), stacklevel=4)
        self._watched = [weakref.ref(p) for p in alive]

    def stop(self) -> None:
        """Stop watching (a new optimizer was attached, or the warning was given)."""
        if self._handle is not None:
            self._handle.remove()
        self._handle = None
        self._watched = []
