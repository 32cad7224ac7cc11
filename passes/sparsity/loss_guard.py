"""A guard on a sparse run's training loss: warn when it stays above its own start.

A sparse run that collapses (a method's update that wipes out what the model learnt, a
learning rate the sparse model cannot take) shows it in the training loss long before any
evaluation: the loss climbs back to, or past, where the run started, and stays there. The
user's loop gives the loss to ``SparseModel.step(loss=...)``; :class:`LossGuard` keeps the
median of the first ``window`` losses as the run's starting level (a median: a run whose first
steps already blow up is judged against their typical value, not their largest) and warns
(:class:`LossAboveStartWarning`, once per run) when the median of the last ``window`` losses
has stayed above that level for ``window`` steps in a row, counted from step ``2 * window`` on
(non-finite losses count as above it). ``window`` is a twentieth of the run (at least 8
steps), or 20 steps when the run's length is unknown.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections import deque

import torch

__all__ = ["LossAboveStartWarning", "LossGuard", "guard_window"]


class LossAboveStartWarning(UserWarning):
    """A sparse run's training loss has stayed above its level over the run's first steps."""


def guard_window(total_steps: int | None) -> int:
    """Steps per window of the guard: ``total_steps // 20``, at least 8; 20 when unknown."""
    return 20 if total_steps is None else max(8, total_steps // 20)


class LossGuard:
    """Watches the losses given to ``SparseModel.step``; see the module docstring.

    ``window``: steps per window (:func:`guard_window`); ``name``: the method, for the message.
    :meth:`observe` takes one loss (a float or a one-element tensor) and returns True when it
    warned. Serialisable (:meth:`state_dict`), so a resumed run keeps its starting level."""

    def __init__(self, window: int, name: str = "sparse"):
        self.window = window
        self.name = name
        self.seen = 0
        self.first: list[float] = []
        self.recent: deque[float] = deque(maxlen=window)
        self.above_for = 0
        self.fired = False

    @property
    def start_level(self) -> float | None:
        """Median of the first ``window`` losses (None before they are in)."""
        return statistics.median(self.first) if len(self.first) >= self.window else None

    def observe(self, loss: float | torch.Tensor) -> bool:
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        if not math.isfinite(value):
            value = math.inf
        self.seen += 1
        if len(self.first) < self.window:
            self.first.append(value)
        self.recent.append(value)
        if self.fired or self.seen < 2 * self.window:
            return False
        level = self.start_level
        recent = statistics.median(self.recent)
        self.above_for = self.above_for + 1 if recent > level else 0
        if self.above_for < self.window:
            return False
        self.fired = True
        warnings.warn(LossAboveStartWarning(
            f"{self.name}: the training loss has stayed above its level over the first {self.window} steps "
            f"({level:.3g}) for {self.above_for} steps (median of the last {self.window}: {recent:.3g}, at step "
            f"{self.seen}): the sparse run is diverging or has collapsed; lower the learning rate or check the "
            f"method's schedule against the run's length"), stacklevel=3)
        return True

    def state_dict(self) -> dict:
        return {"window": self.window, "seen": self.seen, "first": list(self.first), "recent": list(self.recent),
                "above_for": self.above_for, "fired": self.fired}

    def load_state_dict(self, state: dict) -> None:
        self.window = state["window"]
        self.seen, self.first = state["seen"], list(state["first"])
        self.recent = deque(state["recent"], maxlen=self.window)
        self.above_for, self.fired = state["above_for"], state["fired"]
