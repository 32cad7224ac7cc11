"""Layer budgets: how a global sparsity is spread over layers (uniform, ERK, global)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["DISTRIBUTIONS", "layer_densities"]

DISTRIBUTIONS = ("uniform", "erk", "global")


def _erk_densities(shapes: Sequence[tuple[int, ...]], density: float) -> list[float]:
    """Erdős–Rényi-kernel: density proportional to sum(shape) / prod(shape), rescaled so the
    total number of kept weights matches ``density``; layers that would exceed 1 stay dense."""
    sizes = np.array([float(np.prod(s)) for s in shapes])
    raw = np.array([float(sum(s)) / float(np.prod(s)) for s in shapes])
    dense = np.zeros(len(shapes), dtype=bool)
    while True:
        budget = density * sizes.sum() - sizes[dense].sum()
        scale = budget / float((raw * sizes)[~dense].sum())
        out = np.where(dense, 1.0, raw * scale)
        over = (out > 1.0) & ~dense
        if not over.any():
            return out.tolist()
        dense |= over


def layer_densities(shapes: Sequence[tuple[int, ...]], sparsity: float, distribution: str) -> list[float]:
    """Per-layer density (fraction of weights kept) for a global ``sparsity``.

    ``global`` returns the uniform densities: the layer split is decided later by one
    threshold over all layers (see the methods that use it)."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; valid: {', '.join(DISTRIBUTIONS)}")
    density = 1.0 - sparsity
    if distribution == "erk":
        return _erk_densities(shapes, density)
    return [density] * len(shapes)
