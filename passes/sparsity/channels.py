"""Channel structure: masks over channel groups, expanded onto every weight they touch.

A :class:`ChannelUnit` holds one bool per channel of a prunable
:class:`~spruce.passes.analysis.ChannelGroup`; a weight's mask is the AND of the
expansions of every unit that carries one of its dims (producer rows and consumer
columns alike), so a masked channel contributes nothing anywhere. The physical
channel-removal pass turns the result into a compact model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..analysis import ChannelAnalysis, ChannelGroup, Member
from ..importance import importance_scores, param_table, register_importance
from .layers import SparseLayer

__all__ = ["ChannelUnit", "channel_units", "expand_channel_masks", "channel_scores", "taylor", "taylor_bn"]


@dataclass
class ChannelUnit:
    """The channel mask of one prunable group and the sparse weights it reaches."""

    group: ChannelGroup
    mask: torch.Tensor
    density: float
    targets: list[tuple[SparseLayer, Member]] = field(default_factory=list, repr=False)

    @property
    def name(self) -> str:
        return f"group{self.group.id}"

    def keep_count(self, density: float | None = None) -> int:
        return max(1, int(round((self.density if density is None else density) * self.group.size)))


def channel_units(analysis: ChannelAnalysis, layers: list[SparseLayer],
                  density: float) -> tuple[list[ChannelUnit], list[str]]:
    """One unit per prunable group that touches at least one sparse layer's weight, and the
    groups left out with why.

    A group is left out when one of its members is weight-like (see :func:`_weight_like`)
    but not a sparse layer's weight (a layer excluded, frozen or of an unsupported type, a
    parameter the model's code uses directly): no mask would reach it, so a masked channel
    would still flow through it while the compact model removes the channel. Invariant:
    every weight-like member of a unit is masked, so the model with the unit's channels
    masked computes what the compact model computes."""
    by_weight = {f"{layer.name}.weight": layer for layer in layers}
    tensors = {name: analysis.analyzer.tensors[key] for key, name in analysis.analyzer.tensor_names.items()}
    units, left_out = [], []
    for group in analysis.groups:
        if not group.prunable:
            continue
        targets = [(by_weight[m.name], m) for m in group.members if m.name in by_weight]
        if not targets:
            continue
        unmasked = sorted({m.name for m in group.members if m.name not in by_weight and _weight_like(m, tensors)})
        if unmasked:
            left_out.append(f"group{group.id} ({group.size} channels; no mask reaches {', '.join(unmasked)})")
            continue
        units.append(ChannelUnit(group, torch.ones(group.size, dtype=torch.bool), density, targets))
    return units, left_out


def _weight_like(member: Member, tensors: Mapping[str, torch.Tensor]) -> bool:
    """Can the member mix a channel into others (a weight)? Tensors of 2+ dims, and 1-D ones
    giving a channel several entries (a vector viewed as a matrix). Biases, BatchNorm affine
    and statistics, PReLU slopes are per channel: what they do to a masked channel stays in
    it, and the next masked weight drops it."""
    tensor = tensors.get(member.name)
    return tensor is not None and (tensor.dim() >= 2 or member.index.shape[1] > 1)


@torch.no_grad()
def expand_channel_masks(units: list[ChannelUnit], layers: list[SparseLayer]) -> None:
    """Set every sparse layer's weight mask from the channel masks of its units."""
    masks = {layer.name: torch.ones_like(layer.masked.mask) for layer in layers}
    for unit in units:
        dead = np.flatnonzero(~unit.mask.numpy())
        if len(dead) == 0:
            continue
        for layer, member in unit.targets:
            entries = torch.as_tensor(member.index[dead].reshape(-1))
            masks[layer.name].index_fill_(member.dim, entries, False)
    for layer in layers:
        layer.masked.set_mask(masks[layer.name])


def channel_scores(model: nn.Module, unit: ChannelUnit, criterion: str = "l1",
                   rng: np.random.Generator | None = None) -> torch.Tensor:
    """Importance of each channel of ``unit`` in ``model`` (the channel criteria registry,
    :data:`spruce.passes.importance.IMPORTANCE`; ``taylor``/``taylor_bn`` read gradients)."""
    params = param_table(model)
    return torch.as_tensor(importance_scores(criterion, unit.group, params, rng or np.random.default_rng(0)))


def _grad(params: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    grad = getattr(params[name], "grad", None)
    if grad is None:
        raise ValueError(f"Taylor importance needs the gradient of {name}: call backward() before scoring")
    return grad


@register_importance("taylor_bn")
def taylor_bn(group: ChannelGroup, params: Mapping[str, torch.Tensor], rng: np.random.Generator) -> np.ndarray:
    """HALP's Taylor importance: per BatchNorm of the group |g_gamma * gamma + g_beta * beta|,
    summed over the group's BatchNorms; a group without one falls back to ``taylor``."""
    owners = getattr(params, "batchnorm_weights", None) or set()
    norms = [m for m in group.members if m.name in owners]
    if not norms:
        return taylor(group, params, rng)
    total = np.zeros(group.size, dtype=np.float64)
    for member in norms:
        bias = member.name[: -len("weight")] + "bias"
        score = params[member.name].detach() * _grad(params, member.name)
        if bias in params:
            score = score + params[bias].detach() * _grad(params, bias)
        total += score.abs().double().numpy()[member.index].sum(axis=1)
    return total


@register_importance("taylor")
def taylor(group: ChannelGroup, params: Mapping[str, torch.Tensor], rng: np.random.Generator) -> np.ndarray:
    """First-order Taylor estimate of the loss change when a channel goes: |sum of w * dL/dw|
    over every parameter entry carrying it."""
    total = np.zeros(group.size, dtype=np.float64)
    for member in group.members:
        if member.name not in params:
            continue
        tensor = params[member.name].detach()
        product = (tensor * _grad(params, member.name)).double()
        per_entry = product.movedim(member.dim, 0).reshape(tensor.shape[member.dim], -1).sum(dim=1).numpy()
        total += per_entry[member.index].sum(axis=1)
    return np.abs(total)
