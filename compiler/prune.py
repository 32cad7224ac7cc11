"""One-shot structured pruning: analyse, score, choose, remove."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from spruce.passes.analysis import ChannelAnalysis, ChannelGroup, analyze_model
from spruce.passes.export import mask_channels, remove_channels
from spruce.passes.importance import IMPORTANCE, importance_scores, param_table
from torch import nn

__all__ = ["PruneResult", "prune", "select_channels"]


@dataclass
class PruneResult:
    """``model``: compact model; ``masked``: the original architecture with the removed
    channels zeroed; the two compute the same function. ``kept[group.id]`` lists the
    kept channel indices of each pruned group (groups absent keep everything)."""

    model: nn.Module
    masked: nn.Module
    groups: list[ChannelGroup]
    kept: dict[int, np.ndarray]
    analysis: ChannelAnalysis


def _validate(ratio: float, importance: str, round_to: int | None) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be a number in [0, 1), got {ratio!r}")
    if importance not in IMPORTANCE:
        raise ValueError(f"unknown importance {importance!r}; valid: {', '.join(sorted(IMPORTANCE))}")
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"round_to must be a positive integer or None, got {round_to!r}")


def _ignored(model: nn.Module, ignore: Iterable[object]) -> tuple[str, ...]:
    """Name prefixes of ignored modules/parameters (given as names, modules or types)."""
    prefixes: list[str] = []
    for item in ignore:
        if isinstance(item, str):
            prefixes.append(item)
        elif isinstance(item, nn.Module):
            prefixes.extend(n for n, m in model.named_modules() if m is item)
        elif isinstance(item, type):
            prefixes.extend(n for n, m in model.named_modules() if isinstance(m, item))
        else:
            raise TypeError(f"ignore entries must be names, modules or module types, got {item!r}")
    return tuple(prefixes)


def _matches(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def select_channels(
    model: nn.Module,
    groups: list[ChannelGroup],
    ratio: float,
    importance: str = "l1",
    round_to: int | None = None,
    ignore: Iterable[object] = (),
    seed: int = 0,
) -> dict[int, np.ndarray]:
    """Kept channel indices per prunable group: the top ``1 - ratio`` by importance
    (at least one channel; rounded up to a multiple of ``round_to``)."""
    _validate(ratio, importance, round_to)
    prefixes = _ignored(model, ignore)
    params = param_table(model)
    rng = np.random.default_rng(seed)
    kept: dict[int, np.ndarray] = {}
    for group in groups:
        if not group.prunable or any(_matches(m.name, prefixes) for m in group.members):
            continue
        n_keep = max(1, math.ceil(round((1.0 - ratio) * group.size, 6)))
        if round_to:
            n_keep = min(group.size, math.ceil(n_keep / round_to) * round_to)
        if n_keep >= group.size:
            continue
        scores = importance_scores(importance, group, params, rng)
        order = np.argsort(-scores, kind="stable")
        kept[group.id] = np.sort(order[:n_keep])
    return kept


def prune(
    model: nn.Module,
    example_inputs: object,
    ratio: float = 0.5,
    importance: str = "l1",
    round_to: int | None = None,
    ignore: Iterable[object] = (),
    leaf_modules: Iterable[object] = (),
    seed: int = 0,
) -> PruneResult:
    """Remove ``ratio`` of the channels of every prunable group, least important first.

    Channels reaching a graph output are never removed. Raises ``ValueError`` for a
    ratio outside [0, 1) or an unknown importance (listing the valid ones), and
    :class:`spruce.TraceError` for a model that cannot be traced."""
    _validate(ratio, importance, round_to)
    analysis = analyze_model(model, example_inputs, leaf_modules)
    kept = select_channels(model, analysis.groups, ratio, importance, round_to, ignore, seed)
    compact = remove_channels(analysis, model, kept)
    masked = mask_channels(analysis, model, kept)
    return PruneResult(compact, masked, analysis.groups, kept, analysis)
