"""Layer budgets: how a global sparsity is spread over layers (uniform, ERK, global).

Every layer keeps at least one weight: a layer with none would make the model output a
constant. ``uniform`` refuses a sparsity that empties a layer; ``erk`` and ``global``
give such a layer one weight and spread the rest of the budget over the others."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

from ..config import check_choice

__all__ = ["DISTRIBUTIONS", "layer_densities"]

DISTRIBUTIONS = ("uniform", "erk", "global")


def _fit(raw: np.ndarray, sizes: np.ndarray, kept: float) -> list[float]:
    """Densities proportional to ``raw``, each between one weight (1 / size) and 1, keeping
    ``kept`` weights in all: layers that would leave those bounds are fixed at them and the
    others rescaled (Erdős–Rényi-kernel keeps layers that would exceed 1 dense)."""
    low = np.zeros(len(sizes), dtype=bool)
    high = np.zeros(len(sizes), dtype=bool)
    while True:
        free = ~(low | high)
        if not free.any():
            return np.where(high, 1.0, 1.0 / sizes).tolist()
        budget = kept - sizes[high].sum() - low.sum()
        scale = budget / float((raw * sizes)[free].sum())
        out = np.where(high, 1.0, np.where(low, 1.0 / sizes, raw * scale))
        over = (out > 1.0) & free
        under = (out * sizes < 1.0) & free
        if not (over.any() or under.any()):
            return out.tolist()
        high |= over
        low |= under


def _floor(value: float, digits: int = 6) -> float:
    """``value`` rounded down, so a sparsity printed as feasible really is."""
    return math.floor(value * 10**digits) / 10**digits


def layer_densities(shapes: Sequence[tuple[int, ...]], sparsity: float, distribution: str,
                    names: Sequence[str] | None = None) -> list[float]:
    """Per-layer density (fraction of weights kept, ``round(density * numel)`` of them) for a
    global ``sparsity``; ``names`` name the layers in errors.

    Invariant: every layer keeps at least one weight. ``uniform`` raises ``ValueError``
    naming the layer left empty and the highest feasible uniform sparsity; ``erk`` and
    ``global`` redistribute, and when the budget is below one weight per layer they keep
    exactly one per layer, with a warning giving the sparsity that reaches. ``global`` returns
    uniform densities adjusted by that rule: the layer split is decided later by one
    threshold over all layers (see the methods that use it)."""
    check_choice("distribution", distribution, DISTRIBUTIONS)
    names = list(names) if names is not None else [f"#{i}" for i in range(len(shapes))]
    sizes = np.array([float(np.prod(s)) for s in shapes])
    density = 1.0 - sparsity
    if distribution == "uniform":
        empty = [i for i, n in enumerate(sizes) if int(round(density * n)) < 1]
        if empty:
            smallest = int(np.argmin(sizes))
            raise ValueError(
                f"sparsity={sparsity:g} with distribution='uniform' leaves layer {names[empty[0]]} "
                f"({int(sizes[empty[0]])} weights) with no weight"
                + (f" (and {len(empty) - 1} more layers)" if len(empty) > 1 else "")
                + f": the highest feasible uniform sparsity is {_floor(1.0 - 1.0 / sizes[smallest])} (one weight "
                f"left in layer {names[smallest]}); distribution='erk' or 'global' keeps one weight in such layers")
        return [density] * len(shapes)
    kept = density * sizes.sum()
    if kept < len(shapes):
        warnings.warn(
            f"sparsity={sparsity:g} keeps {kept:.3g} of {int(sizes.sum())} weights, fewer than one per layer "
            f"({len(shapes)} layers): each layer keeps one weight, a sparsity of "
            f"{_floor(1.0 - len(shapes) / sizes.sum())}, the highest feasible with distribution={distribution!r}",
            stacklevel=3)
        return (1.0 / sizes).tolist()
    if distribution == "erk":
        raw = np.array([float(sum(s)) / float(np.prod(s)) for s in shapes])  # Erdős–Rényi-kernel
    else:
        raw = np.ones(len(shapes))
    return _fit(raw, sizes, kept)
