"""DST-EE (papers/dst-ee-more-exploration.md, Eq. 1 and Algorithm 1).

Every ``delta_t`` steps until ``end_fraction`` of training, each layer drops its k
active weights closest to zero, then grows the k inactive weights with the largest
acquisition score

    S = |∂L/∂W| + c · ln t / (N + ε)                                   (Eq. 1)

where N counts, per weight, the mask updates at which it was active (N ← M at the
start, N ← N + M after every update, Alg. 1) and t is the step. Unexplored weights
(N = 0) get the largest exploration bonus, so the active set covers more of the
weights over training (exploration degree R, recorded in ``SparseModel.metrics``).
Grown weights start at zero and k follows RigL's cosine-decayed drop fraction, the
schedule the paper adopts from RigL/ITOP. The paper leaves c and ε to the user; the
defaults here (c = 1e-3, ε = 1) make the bonus of a never-active weight at t = 100
about 5e-3, the size of typical gradient magnitudes of small CNNs.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from pydantic import Field

from ..layers import SparseLayer
from ..method import register_method
from .baselines import RigL, RigLConfig

__all__ = ["DSTEEConfig", "DSTEE"]


class DSTEEConfig(RigLConfig):
    """RigL's schedule options plus the exploration coefficient ``c`` and ``eps`` of Eq. 1
    (``eps`` > 0 keeps 1 / (N + eps) finite)."""

    name: ClassVar[str] = "dst_ee"

    c: float = Field(1e-3, ge=0)
    eps: float = Field(1.0, gt=0)


@register_method(DSTEEConfig)
class DSTEE(RigL):
    """Drop the smallest magnitudes, grow by |gradient| + c·ln t/(N + ε) (Eq. 1, Alg. 1)."""

    def __init__(self, config: DSTEEConfig):
        super().__init__(config)
        self.counters: dict[str, torch.Tensor] = {}

    def set_initial_masks(self) -> None:
        super().set_initial_masks()
        # N ← M (Alg. 1): counts of mask updates at which each weight was active
        self.counters = {layer.name: layer.masked.mask.to(torch.int32) for layer in self.ctx.layers}

    def scores(self, layer: SparseLayer, step: int) -> torch.Tensor:
        """Eq. 1 for ``layer`` at step ``t = step``."""
        grad = layer.masked.dense_grad
        if grad is None:
            raise RuntimeError(f"dst_ee: no dense gradient for layer {layer.name}; call backward before step()")
        counts = self.counters[layer.name].to(grad.device, torch.float32)
        return grad.abs().float() + self.config.c * math.log(step) / (counts + self.config.eps)

    def grow_scores(self, layer: SparseLayer, step: int) -> torch.Tensor:
        return self.scores(layer, step)

    def update(self, step: int) -> bool:
        changed = super().update(step)
        for layer in self.ctx.layers:  # N ← N + M after the update (Alg. 1)
            self.counters[layer.name] += layer.masked.mask.to(torch.int32)
        return changed

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["counters"] = {name: c.clone() for name, c in self.counters.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        missing = sorted(set(self.counters) ^ set(state["counters"]))
        if missing:
            raise ValueError(f"dst_ee: the saved counters do not match this model's layers: {', '.join(missing)}")
        for name, saved in state["counters"].items():
            if saved.shape != self.counters[name].shape:
                raise ValueError(f"dst_ee: saved counter for layer {name} has shape {tuple(saved.shape)}, "
                                 f"the layer has {tuple(self.counters[name].shape)}")
            self.counters[name] = saved.to(self.counters[name].device, torch.int32).clone()
