"""A sparse layer: one Conv/ConvTranspose/Linear whose weight goes through a mask node."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .masking import MaskedWeight, input_channel_dim

__all__ = ["SparseLayer", "TRACKED", "check_finite"]

# per-layer records a SparseModel keeps between updates (saved in its state and broadcast under DDP)
TRACKED = ("previous", "ever_active", "last_grown", "grown", "after_prune")


@dataclass
class SparseLayer:
    """One sparse layer: its module, its mask node and its target density."""

    name: str
    module: nn.Module
    masked: MaskedWeight
    density: float
    grown: torch.Tensor | None = field(default=None, repr=False)  # grown at the last update
    after_prune: torch.Tensor | None = field(default=None, repr=False)  # active set between prune and grow
    previous: torch.Tensor | None = field(default=None, repr=False)  # active set after the last update
    ever_active: torch.Tensor | None = field(default=None, repr=False)
    last_grown: torch.Tensor | None = field(default=None, repr=False)  # grown at the last recorded update
    batchnorm: nn.Module | None = field(default=None, repr=False)  # the BatchNorm right after, if any

    @property
    def in_dim(self) -> int:
        """The weight dimension of the input channels (N:M groups run along it)."""
        return input_channel_dim(self.module)


def check_finite(scores: torch.Tensor, layer: SparseLayer, what: str) -> torch.Tensor:
    """``scores`` unchanged; NaN/inf is a ``ValueError`` naming ``layer`` and ``what`` was scored."""
    if not torch.isfinite(scores).all():
        raise ValueError(f"{what} is NaN/inf in layer {layer.name}: the model diverged or its weights are corrupt")
    return scores
