"""Channel importance criteria, one registry.

A criterion maps a :class:`ChannelGroup` and the model's named parameters to one
score per channel of the group (higher = more important). Scores are summed over
every parameter member of the group (producer rows, normalisation affine, consumer
columns), so coupled layers vote together.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch

from .analysis import ChannelGroup, Member
from .config import check_choice

__all__ = ["GRADIENT_CRITERIA", "GRADIENT_FALLBACK", "IMPORTANCE", "importance_scores", "register_importance"]

# criteria that read the parameters' gradients (registered in spruce.passes.sparsity.channels)
GRADIENT_CRITERIA = frozenset({"taylor", "taylor_bn"})
# What a gradient criterion falls back to when every gradient it read is exactly zero (no signal:
# at the start of distillation the student equals its teacher, so the loss and its gradient are
# zero): the weights' own size, BatchNorm |gamma| for Taylor-on-BatchNorm (network slimming; a group
# without a BatchNorm uses l1), L1 magnitude for plain Taylor. Never random: an all-zero score would
# leave the knapsack's choice to ties. Used by spruce.passes.sparsity.channel_budget.ImportanceMeter.
GRADIENT_FALLBACK = {"taylor": "l1", "taylor_bn": "bn_scale"}

Criterion = Callable[[ChannelGroup, Mapping[str, torch.Tensor], np.random.Generator], np.ndarray]
IMPORTANCE: dict[str, Criterion] = {}


def register_importance(name: str):
    """Decorator adding a criterion to :data:`IMPORTANCE` under ``name``."""

    def register(fn: Criterion) -> Criterion:
        IMPORTANCE[name] = fn
        return fn

    return register


def _per_entry(params: Mapping[str, torch.Tensor], name: str, dim: int, power: int) -> np.ndarray:
    """sum of |w|**power over everything but ``dim``, per entry of ``dim`` (cached per call
    when ``params`` is a :class:`ParamTable`: DenseNet-style concats share consumers)."""
    cache = getattr(params, "cache", None)
    key = (name, dim, power)
    if cache is not None and key in cache:
        return cache[key]
    tensor = params[name].detach().float()
    flat = tensor.movedim(dim, 0).reshape(tensor.shape[dim], -1).abs()
    if power != 1:
        flat = flat.pow(power)
    scores = flat.sum(dim=1).cpu().numpy().astype(np.float64)
    if cache is not None:
        cache[key] = scores
    return scores


def _entry_scores(params: Mapping[str, torch.Tensor], member: Member, power: int) -> np.ndarray:
    """Per channel: sum over the member's entries of |w|**power."""
    return _per_entry(params, member.name, member.dim, power)[member.index].sum(axis=1)


def _norm_scores(group: ChannelGroup, params: Mapping[str, torch.Tensor], power: int) -> np.ndarray:
    total = np.zeros(group.size, dtype=np.float64)
    for member in group.members:
        if member.name in params:
            total += _entry_scores(params, member, power)
    return total


@register_importance("l1")
def l1(group: ChannelGroup, params: Mapping[str, torch.Tensor], rng: np.random.Generator) -> np.ndarray:
    """Sum of absolute weights of every parameter entry carrying the channel."""
    return _norm_scores(group, params, 1)


@register_importance("l2")
def l2(group: ChannelGroup, params: Mapping[str, torch.Tensor], rng: np.random.Generator) -> np.ndarray:
    """Euclidean norm of every parameter entry carrying the channel."""
    return np.sqrt(_norm_scores(group, params, 2))


@register_importance("random")
def random(group: ChannelGroup, params: Mapping[str, torch.Tensor], rng: np.random.Generator) -> np.ndarray:
    """Uniform random scores (a baseline; seeded by ``prune(seed=...)``)."""
    return rng.random(group.size)


@register_importance("bn_scale")
def bn_scale(group: ChannelGroup, params: Mapping[str, torch.Tensor], rng: np.random.Generator) -> np.ndarray:
    """|gamma| of the group's BatchNorm layers (network slimming); groups without a
    BatchNorm fall back to ``l1``."""
    owners = getattr(params, "batchnorm_weights", None) or set()
    bn_members = [m for m in group.members if m.name in owners]
    if not bn_members:
        return l1(group, params, rng)
    total = np.zeros(group.size, dtype=np.float64)
    for member in bn_members:
        total += _entry_scores(params, member, 1)
    return total


class ParamTable(dict):
    """Named parameters of a model, the names of its BatchNorm weights, and a cache of
    per-entry norms shared by the groups scored in one call."""

    batchnorm_weights: set[str]
    cache: dict


def param_table(model: torch.nn.Module) -> ParamTable:
    table = ParamTable(model.named_parameters(remove_duplicate=False))
    table.cache = {}
    table.batchnorm_weights = {
        f"{name}.weight" if name else "weight"
        for name, module in model.named_modules(remove_duplicate=False)
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.weight is not None
    }
    return table


def importance_scores(
    criterion: str, group: ChannelGroup, params: Mapping[str, torch.Tensor], rng: np.random.Generator
) -> np.ndarray:
    """Scores of ``group``'s channels under ``criterion``; a NaN/inf score is an error
    naming the group's first member (never a silently wrong choice)."""
    check_choice("importance", criterion, IMPORTANCE)
    scores = np.asarray(IMPORTANCE[criterion](group, params, rng), dtype=np.float64)
    if scores.shape != (group.size,):
        raise ValueError(f"importance {criterion!r} returned shape {scores.shape} for a group of {group.size}")
    if not np.isfinite(scores).all():
        culprits = [
            f"{m.name} (dim {m.dim})"
            for m in group.members
            if m.name in params and not torch.isfinite(params[m.name].detach()).all()
        ] or [f"{group.members[0].name} (dim {group.members[0].dim})"]
        raise ValueError(
            f"importance {criterion!r} is NaN/inf for channels of group {group.id}: "
            f"non-finite values in {', '.join(culprits)}"
        )
    return scores
