"""Layer budgets: how a global sparsity is spread over layers (uniform, ERK, ERK with a floor
per output channel, global).

Every layer keeps at least one weight: a layer with none would make the model output a
constant. ``uniform`` refuses a sparsity that empties a layer; ``erk``, ``erk_floor`` and
``global`` give such a layer one weight and spread the rest of the budget over the others.

``erk`` is the Erdős–Rényi-kernel distribution of Evci et al. 2020 ("Rigging the Lottery",
section 3, "Sparsity distribution"): a layer's density is proportional to
``sum(shape) / prod(shape)``, layers that would exceed 1 dense are kept dense and the rest
rescaled. It starves a wide 3x3 conv between small layers: in a 1-24-48 CNN with a 768->10
classifier at 90 % it keeps 1.55 % of the 24->48 conv (3.3 weights per output channel) and
21 % of the classifier, and five of six unstructured methods then ended 4.7-8.9 points below
dense. That is layer collapse at the scale of a unit (Tanaka et al. 2020, "Pruning neural
networks without any data by iteratively conserving synaptic flow", section 3: a layer pruned
so far that it disconnects the network). ``erk_floor`` (the default) is ERK with every layer's
density at least ``ERK_FLOOR_PER_CHANNEL`` weights per output channel (row of its weight, on
average; all of a row when it has fewer), the total kept the same: the other layers give up
the difference in ERK's proportions. Where the floors alone exceed the budget each layer gets
the same share of its floor. The floor 16 was chosen on that CNN (8, 16 and 32 measured; 16
and 32 closed most of the gap, 16 kept more for the classifier) and checked on a third CNN
not used while choosing (``bench/own_loop.py``); networks where ERK already keeps 16 per
output channel get exactly ERK's densities."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

from ..config import check_choice

__all__ = ["DEFAULT_DISTRIBUTION", "DISTRIBUTIONS", "ERK_FLOOR_PER_CHANNEL", "layer_densities"]

DISTRIBUTIONS = ("uniform", "erk", "erk_floor", "global")
# the distribution sparsify uses when none is named (every unstructured method shares it)
DEFAULT_DISTRIBUTION = "erk_floor"
# 'erk_floor': the fewest weights each output channel (row of the weight) keeps on average
ERK_FLOOR_PER_CHANNEL = 16


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


def _fit_floored(raw: np.ndarray, sizes: np.ndarray, kept: float, lower: np.ndarray) -> list[float]:
    """Densities ``clip(raw * scale, lower, 1)`` keeping ``kept`` weights in all (needs
    ``sum(lower * sizes) <= kept <= sum(sizes)``). The kept count grows monotonically with
    ``scale``: a bisection finds which layers sit at a bound, then the free layers' scale is
    solved exactly, so the total is ``kept`` up to float rounding."""
    lo, hi = 0.0, float(1.0 / raw.min())
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if float((np.clip(raw * mid, lower, 1.0) * sizes).sum()) < kept:
            lo = mid
        else:
            hi = mid
    high = raw * hi >= 1.0
    low = (raw * hi <= lower) & ~high
    free = ~(low | high)
    if not free.any():
        return np.where(high, 1.0, lower).tolist()
    scale = (kept - sizes[high].sum() - (lower * sizes)[low].sum()) / float((raw * sizes)[free].sum())
    return np.where(high, 1.0, np.where(low, lower, raw * scale)).tolist()


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
    if distribution == "global":
        return _fit(np.ones(len(shapes)), sizes, kept)
    raw = np.array([float(sum(s)) / float(np.prod(s)) for s in shapes])  # Erdős–Rényi-kernel
    if distribution == "erk":
        return _fit(raw, sizes, kept)
    rows = np.array([float(s[0]) for s in shapes])
    floor = np.minimum(1.0, ERK_FLOOR_PER_CHANNEL * rows / sizes)
    if float((floor * sizes).sum()) > kept:  # too few weights for the floor: the same share of it in each layer
        floor *= kept / float((floor * sizes).sum())
    lower = np.maximum(floor, 1.0 / sizes)
    if float((lower * sizes).sum()) > kept:  # one weight per layer is above that share somewhere: plain ERK
        return _fit(raw, sizes, kept)
    return _fit_floored(raw, sizes, kept, lower)
