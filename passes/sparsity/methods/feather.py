"""Feather (papers/feather-ste-sparsification.md, Eq. 3-4 and its θ rule).

A straight-through estimator around a thresholding operator between hard and soft
thresholding (Eq. 3):

    P_T(w) = sign(w) · (|w|^p − T^p)^{1/p}  if |w| > T,  else 0        (p = 3)

The forward uses P_T(w); the backward treats P_T as the identity, except that the
gradients of pruned weights are scaled by θ (Eq. 4: m = 1 where |w| > T, θ elsewhere),
with θ = 1 when the final target sparsity is below 95 % and θ = 0.5 otherwise (§2.2.2),
fixed for the whole run. Dense weights are kept (pruned ones keep training and can
come back), so ``keeps_pruned_weights`` is set and optimizer state is never reset.

Threshold: global magnitude pruning as in the paper's backbone: one T over all sparse
layers, re-derived every ``delta_t`` steps (1 = every iteration, as the paper) by a sort,
for a sparsity that rises from 0 by the cubic schedule of Zhu & Gupta and reaches the
target at ``end_fraction`` (0.5) of training, then stays. With ``distribution='uniform'``
or ``'erk'`` each layer follows its own schedule to its own sparsity with its own T
(layer-wise thresholds); with ``structure='N:M'`` each group of M keeps its N largest
magnitudes and T is per group (the largest pruned magnitude of the group).

Exact counts: the mask keeps exactly the scheduled number of weights (ties broken by
index), and T is the largest pruned magnitude, so ``|w| > T`` holds for kept weights up
to ties.
"""

from __future__ import annotations

from typing import Annotated, ClassVar

import torch
from pydantic import Field

from ..layers import SparseLayer
from ..masking import WEIGHT_FNS, global_topk_masks, nm_group_max, nm_mask, topk_mask
from ..method import Method, MethodConfig, register_method

__all__ = ["FeatherConfig", "Feather", "feather_threshold", "theta_for"]


def feather_threshold(weight: torch.Tensor, threshold: torch.Tensor, p: float) -> torch.Tensor:
    """Eq. 3: sign(w)·(|w|^p − T^p)^{1/p} where |w| > T, else 0 (T broadcast against w)."""
    magnitude = weight.abs()
    shrunk = (magnitude.pow(p) - threshold.pow(p)).clamp_min(0.0).pow(1.0 / p)
    return torch.where(magnitude > threshold, torch.sign(weight) * shrunk, torch.zeros_like(weight))


def theta_for(final_sparsity: float) -> float:
    """The paper's step rule: θ = 1 below 95 % final sparsity, 0.5 at or above it."""
    return 1.0 if final_sparsity < 0.95 else 0.5


class _FeatherSTE(torch.autograd.Function):
    """Forward P_T(w) on the kept weights (0 on pruned); backward m ⊙ grad, m ∈ {θ, 1} (Eq. 4)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, mask: torch.Tensor, threshold: torch.Tensor, p: float,
                theta: float) -> torch.Tensor:
        ctx.save_for_backward(mask)
        ctx.theta = theta
        return torch.where(mask, feather_threshold(weight, threshold.to(weight.dtype), p), torch.zeros_like(weight))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        scale = torch.where(mask, torch.ones((), dtype=grad.dtype, device=grad.device),
                            torch.full((), ctx.theta, dtype=grad.dtype, device=grad.device))
        return grad * scale, None, None, None, None


WEIGHT_FNS["feather"] = lambda mod, w: _FeatherSTE.apply(w, mod.mask, mod.threshold, mod.feather_p, mod.feather_theta)


class FeatherConfig(MethodConfig):
    """``p``: the operator's power (3 in the paper); ``theta``: gradient scale of pruned
    weights (None: the paper's rule from the final sparsity); ``end_fraction``: the target
    sparsity is reached at this fraction of training (0.5 in the paper); ``delta_t``: steps
    between threshold updates (1: every iteration, as the paper; between updates the pruned
    weights drift under the straight-through gradient, and long holds were seen to diverge on
    small models); ``record_every``: the metrics (IoU,
    survival, exploration) are recorded every this many threshold updates."""

    name: ClassVar[str] = "feather"

    p: float = Field(3.0, ge=1)
    theta: Annotated[float, Field(ge=0, le=1)] | None = None
    end_fraction: float = Field(0.5, gt=0, le=1)
    delta_t: int = Field(1, ge=1)
    record_every: int = Field(100, ge=1)
    seed: int = Field(0, ge=0)


@register_method(FeatherConfig)
class Feather(Method):
    """STE training with Feather's thresholding operator and gradient scaling."""

    keeps_pruned_weights = True
    resets_optimizer_state: ClassVar[bool] = False

    def __init__(self, config: FeatherConfig):
        super().__init__(config)
        self.updates = 0

    # ---- schedule ---------------------------------------------------------------------
    def sparsity_at(self, step: int, final: float) -> float:
        """Cubic schedule (Zhu & Gupta) from 0 at step 0 to ``final`` at ``end_fraction``."""
        end = max(self.config.end_fraction * self.ctx.total_steps, 1.0)
        progress = min(1.0, step / end)
        return final * (1.0 - (1.0 - progress) ** 3)

    def theta(self) -> float:
        return self.config.theta if self.config.theta is not None else theta_for(float(self.ctx.sparsity))

    # ---- the method -------------------------------------------------------------------
    def set_initial_masks(self) -> None:
        ctx = self.ctx
        theta = self.theta()
        for layer in ctx.layers:
            weight = layer.module.weight
            layer.masked.register_buffer("threshold", torch.zeros(
                weight.shape if ctx.structure.kind == "n:m" else (), dtype=torch.float32, device=weight.device))
            layer.masked.feather_p = float(self.config.p)
            layer.masked.feather_theta = float(theta)
            layer.masked.kind = "feather"
        self._derive(0)

    def is_update(self, step: int) -> bool:
        return step % self.config.delta_t == 0

    def completes_update(self, step: int) -> bool:
        return (step // self.config.delta_t) % self.config.record_every == 0

    def update(self, step: int) -> bool:
        self.updates += 1
        return self._derive(step)

    @torch.no_grad()
    def _derive(self, step: int) -> bool:
        """Masks and thresholds for ``step``'s scheduled sparsity; True when a mask changed."""
        ctx = self.ctx
        old = [layer.masked.mask for layer in ctx.layers]
        if ctx.structure.kind == "n:m":
            for layer in ctx.layers:
                self._set_nm(layer)
        elif ctx.distribution == "global":
            self._set_global(step)
        else:
            for layer in ctx.layers:
                magnitude = layer.module.weight.detach().abs().float()
                keep = self._kept_count(layer.masked.mask.numel(), self.sparsity_at(step, 1.0 - layer.density))
                self._set_layer(layer, topk_mask(magnitude, keep), magnitude)
        changed = False
        for layer, before in zip(ctx.layers, old):
            new = layer.masked.mask
            layer.after_prune, layer.grown = before & new, new & ~before
            changed |= not torch.equal(before, new)
        return changed

    @staticmethod
    def _kept_count(total: int, sparsity: float) -> int:
        return total - int(round(sparsity * total))

    def _set_layer(self, layer: SparseLayer, mask: torch.Tensor, magnitude: torch.Tensor) -> None:
        pruned = magnitude[~mask]
        layer.masked.threshold.fill_(float(pruned.max()) if pruned.numel() else 0.0)
        self.ctx.set_mask(layer, mask)

    def _set_global(self, step: int) -> None:
        layers = self.ctx.layers
        sizes = [layer.masked.mask.numel() for layer in layers]
        final = 1.0 - sum(layer.density * n for layer, n in zip(layers, sizes)) / sum(sizes)
        magnitudes = [layer.module.weight.detach().abs().float() for layer in layers]
        kept = max(len(sizes), self._kept_count(sum(sizes), self.sparsity_at(step, final)))
        masks = global_topk_masks(magnitudes, kept)  # every layer keeps at least its largest weight
        pruned = [m[~k] for m, k in zip(magnitudes, masks)]
        threshold = max((float(p.max()) for p in pruned if p.numel()), default=0.0)
        for layer, mask, magnitude, below in zip(layers, masks, magnitudes, pruned):
            # a layer kept alive by its largest weight alone gets its own T, so that weight passes |w| > T
            own = threshold
            if not bool((magnitude[mask] > threshold).all()):
                own = float(below.max()) if below.numel() else 0.0
            layer.masked.threshold.fill_(own)
            self.ctx.set_mask(layer, mask)

    def _set_nm(self, layer: SparseLayer) -> None:
        structure = self.ctx.structure
        magnitude = layer.module.weight.detach().abs().float()
        mask = nm_mask(magnitude, structure.n, structure.m, layer.in_dim)
        # T per group: the largest pruned magnitude of its group of M
        pruned = torch.where(mask, torch.zeros_like(magnitude), magnitude)
        layer.masked.threshold.copy_(nm_group_max(pruned, structure.m, layer.in_dim))
        self.ctx.set_mask(layer, mask)

    # ---- state --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["updates"] = self.updates
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.updates = int(state["updates"])
