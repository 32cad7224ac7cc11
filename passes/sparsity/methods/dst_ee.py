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
schedule the paper adopts from RigL/ITOP.

Deviation from Eq. 1 (the default): c is relative to the layer's gradients. The paper
gives no value for c, and an absolute c cannot have a default: the first term is a
gradient, whose scale depends on the loss, the data, the layer and the point in
training. An absolute c = 1e-3 (spruce's earlier default) gave a bonus of about 5e-3
against gradients of 3e-2 to 2e-1 on MNIST: the grow set was 90-100 % RigL's and the
exploration degree R equal to RigL's. So by default the bonus is

    c · ḡ · ln t / (N + ε),    ḡ = sqrt(mean (∂L/∂W)²) over the layer at this update,

with ``c_relative`` = 1: a never-active weight gets ln t ≈ 5-9 root-mean-square
gradients of bonus, a weight active once half that. The RMS, not the mean |∂L/∂W|,
because growth picks from the top of a heavy-tailed distribution: a few weights carry
most of the gradient, and the RMS follows them. At the defaults the exploration term
changes the grow set (on the digits CNN of the tests at 90 % sparsity the grow sets hold
63 % of RigL's over the updates, and R ends at 0.29 against RigL's 0.22), and its effect
does not change when the loss is scaled. ``c`` (absolute, Eq. 1 verbatim) keeps the
paper's form: setting it selects it, and ``c=1e-3`` reproduces spruce's earlier
behaviour bitwise. ``bench/results/methods.md`` reports R and accuracy over a sweep of
``c_relative``.
"""

from __future__ import annotations

import math
from typing import Annotated, ClassVar

import torch
from pydantic import Field, model_validator

from ..layers import SparseLayer
from ..method import register_method
from .baselines import RigL, RigLConfig

__all__ = ["DSTEEConfig", "DSTEE", "C_RELATIVE"]

# the default exploration coefficient, in units of the layer's RMS gradient at the update
C_RELATIVE = 1.0


class DSTEEConfig(RigLConfig):
    """RigL's schedule options plus Eq. 1's exploration coefficient and ``eps`` (> 0 keeps
    1 / (N + eps) finite). ``c_relative``: the coefficient in units of the layer's
    root-mean-square dense gradient at the update (the default; a deviation from Eq. 1, see the
    module doc). ``c``: the paper's absolute coefficient; setting it uses Eq. 1 verbatim
    (``c_relative`` must then be left out)."""

    name: ClassVar[str] = "dst_ee"

    c: Annotated[float, Field(ge=0)] | None = None
    c_relative: float = Field(C_RELATIVE, ge=0)
    eps: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _one_coefficient(self) -> DSTEEConfig:
        if self.c is not None and "c_relative" in self.model_fields_set:
            raise ValueError("give c (absolute, Eq. 1) or c_relative (in units of the layer's RMS gradient), "
                             "not both")
        return self

    @property
    def absolute(self) -> bool:
        """Does the bonus use the paper's absolute c (Eq. 1 verbatim)?"""
        return self.c is not None


def gradient_scale(grad: torch.Tensor) -> float:
    """ḡ: the root-mean-square dense gradient of a layer (1 when it is all zero: then only the
    bonus orders the candidates, and its scale does not matter)."""
    scale = float(grad.float().pow(2).mean().sqrt())
    return scale if scale > 0 else 1.0


@register_method(DSTEEConfig)
class DSTEE(RigL):
    """Drop the smallest magnitudes, grow by |gradient| + c·ln t/(N + ε) (Eq. 1, Alg. 1), c
    relative to the layer's gradients unless the absolute ``c`` is set."""

    def __init__(self, config: DSTEEConfig):
        super().__init__(config)
        self.counters: dict[str, torch.Tensor] = {}

    def set_initial_masks(self) -> None:
        super().set_initial_masks()
        # N ← M (Alg. 1): counts of mask updates at which each weight was active
        self.counters = {layer.name: layer.masked.mask.to(torch.int32) for layer in self.ctx.layers}

    def coefficient(self, grad: torch.Tensor) -> float:
        """The c of Eq. 1 for a layer with dense gradient ``grad``: the absolute ``c``, or
        ``c_relative`` times the layer's RMS gradient."""
        if self.config.absolute:
            return self.config.c
        return self.config.c_relative * gradient_scale(grad)

    def scores(self, layer: SparseLayer, step: int) -> torch.Tensor:
        """Eq. 1 for ``layer`` at step ``t = step``."""
        grad = layer.masked.dense_grad
        if grad is None:
            raise RuntimeError(f"dst_ee: no dense gradient for layer {layer.name}; call backward before step()")
        counts = self.counters[layer.name].to(grad.device, torch.float32)
        return grad.abs().float() + self.coefficient(grad) * math.log(step) / (counts + self.config.eps)

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
