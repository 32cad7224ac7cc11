"""What a sparse-training method is given: a frozen :class:`MethodContext`.

``sparsify`` builds the context completely (masked graph, sparse layers, channel units,
budget, latency table, run length) before the method sees it; the method receives it
once, at ``initialize``, and never reads another object's private state. The context's
fields never change; what changes during training is the masks, which the context's
mask operations (``set_mask``, ``prune_grow``, ...) write through the layers' mask nodes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from ..analysis import ChannelAnalysis, ChannelGroup
from .channels import ChannelUnit, expand_channel_masks
from .knapsack import Budget
from .layers import SparseLayer, check_finite
from .masking import global_topk_masks, nm_mask, topk_mask

__all__ = ["MethodContext", "Structure", "STRUCTURES"]

STRUCTURES = ("unstructured", "channel", "n:m")


@dataclass(frozen=True)
class Structure:
    """What a mask removes: ``unstructured`` weights, whole ``channel`` groups, or ``n:m``
    (N of every M consecutive input channels)."""

    kind: str
    n: int = 0
    m: int = 0

    @classmethod
    def parse(cls, structure: str) -> Structure:
        """``unstructured``, ``channel``, ``n:m`` / ``nm`` (2:4) or ``N:M``; ``ValueError`` otherwise."""
        if structure in ("unstructured", "channel"):
            return cls(structure)
        if structure in ("n:m", "nm"):
            return cls("n:m", 2, 4)
        parts = structure.split(":") if isinstance(structure, str) else []
        if len(parts) == 2 and all(p.isdigit() for p in parts):
            n, m = int(parts[0]), int(parts[1])
            if not 0 < n < m:
                raise ValueError(f"n:m structure needs 0 < N < M, got {structure!r}")
            return cls("n:m", n, m)
        raise ValueError(f"unknown structure {structure!r}; valid: unstructured, channel, n:m, N:M (e.g. 2:4)")

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "n:m" else self.kind


@dataclass(frozen=True)
class MethodContext:
    """Everything a method may read about the model it sparsifies, fixed at ``sparsify``.

    ``source`` is the user's model (its parameters are the ones the masked ``graph``
    reads); ``layers`` the sparse layers in graph order; ``units`` one channel mask per
    prunable channel group (``structure.kind == "channel"``; empty otherwise) and
    ``analysis`` their channel analysis; ``sparsity`` the global target and
    ``distribution`` how it is spread over layers; ``total_steps`` the run length (None for
    unscheduled use); ``budget`` the structured budget and ``latency_table`` the target's
    table for a latency budget."""

    source: nn.Module
    graph: fx.GraphModule
    layers: tuple[SparseLayer, ...]
    structure: Structure
    distribution: str
    sparsity: float
    total_steps: int | None = None
    units: tuple[ChannelUnit, ...] = ()
    analysis: ChannelAnalysis | None = None
    budget: Budget | None = None
    latency_table: Any = None

    @property
    def groups(self) -> list[ChannelGroup]:
        """The channel groups of the analysis (empty without one)."""
        return [] if self.analysis is None else self.analysis.groups

    # ---- weight masks ------------------------------------------------------------------
    def set_mask(self, layer: SparseLayer, mask: torch.Tensor) -> None:
        layer.masked.set_mask(mask)

    def keep_count(self, layer: SparseLayer, density: float) -> int:
        """Weights a layer keeps at ``density``."""
        return int(round(density * layer.masked.mask_shape.numel()))

    def random_mask(self, layer: SparseLayer, density: float, generator: torch.Generator) -> torch.Tensor:
        scores = torch.rand(layer.masked.mask_shape, generator=generator)
        if self.structure.kind == "n:m":
            return nm_mask(scores, self.structure.n, self.structure.m, layer.in_dim)
        return topk_mask(scores, self.keep_count(layer, density))

    def magnitude_mask(self, layer: SparseLayer, density: float, within: torch.Tensor | None = None) -> torch.Tensor:
        scores = check_finite(layer.module.weight.detach().abs().float(), layer, "weight magnitude")
        if self.structure.kind == "n:m":
            return nm_mask(scores, self.structure.n, self.structure.m, layer.in_dim)
        if within is not None:
            scores = torch.where(within, scores, torch.full_like(scores, -1.0))
        return topk_mask(scores, self.keep_count(layer, density))

    def global_magnitude_masks(self, density: float, within: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Masks keeping the ``density`` fraction of all sparse weights with the largest
        magnitudes, one threshold across layers (the ``global`` distribution); every layer
        keeps at least its largest weight."""
        scores = [layer.module.weight.detach().abs().float() for layer in self.layers]
        if within is not None:
            scores = [torch.where(w, s, torch.full_like(s, -1.0)) for s, w in zip(scores, within)]
        total = sum(s.numel() for s in scores)
        return global_topk_masks(scores, max(len(scores), int(round(density * total))))

    def mean_density(self) -> float:
        """The density of all sparse weights together (their layer targets, size-weighted)."""
        sizes = [layer.masked.mask.numel() for layer in self.layers]
        return sum(layer.density * n for layer, n in zip(self.layers, sizes)) / sum(sizes)

    @torch.no_grad()
    def prune_grow(self, layer: SparseLayer, k: int, grow_scores: torch.Tensor, init: str = "zero",
                   method: str = "this method") -> None:
        """Drop the ``k`` active weights of smallest magnitude, then grow the ``k`` inactive
        weights with the largest ``grow_scores``; the active count is unchanged."""
        if self.structure.kind == "n:m":
            raise NotImplementedError(f"method {method!r} does not support N:M prune-grow yet")
        mask = layer.masked.mask
        if k <= 0:
            layer.grown = torch.zeros_like(mask)
            layer.after_prune = mask.clone()
            return
        weight = check_finite(layer.module.weight.detach().abs().float(), layer, "weight magnitude")
        grow_scores = check_finite(grow_scores, layer, "grow score")
        drop_scores = torch.where(mask, -weight, torch.full_like(weight, -math.inf))
        dropped = topk_mask(drop_scores, k)
        after_drop = mask & ~dropped
        candidates = torch.where(after_drop, torch.full_like(weight, -math.inf), grow_scores.float())
        grown = topk_mask(candidates, k)
        new = after_drop | grown
        if init == "zero":
            layer.module.weight.masked_fill_(grown & ~mask, 0.0)
        layer.grown = grown & ~mask
        layer.after_prune = after_drop
        self.set_mask(layer, new)

    # ---- channel masks -----------------------------------------------------------------
    def set_channel_mask(self, unit: ChannelUnit, mask: torch.Tensor) -> None:
        """Set one channel unit's mask and re-derive the weight masks it reaches."""
        unit.mask.copy_(mask.to(torch.bool))
        expand_channel_masks(self.units, self.layers)
