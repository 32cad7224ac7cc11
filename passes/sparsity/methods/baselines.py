"""The baselines users compare with: static masks, RigL, SET and gradual magnitude pruning."""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator

from ..channels import channel_scores
from ..layers import SparseLayer
from ..masking import topk_mask
from ..method import Method, MethodConfig, RunLength, register_method

__all__ = ["GMP", "GMPConfig", "RigL", "RigLConfig", "SET", "SETConfig", "Static", "StaticConfig"]

# Under `spruce compile`, RigL-style methods update 20 times per run by default (the
# literature's delta_t = 100 assumes far longer runs than a compile recipe's).
UPDATES_PER_RUN = 20


class StaticConfig(MethodConfig):
    """``init``: the fixed mask is ``random`` or keeps the largest ``magnitude`` weights."""

    name: ClassVar[str] = "static"
    structures: ClassVar[tuple[str, ...]] = ("unstructured", "n:m", "channel")
    needs: ClassVar[tuple[str, ...]] = ()

    init: Literal["random", "magnitude"] = "random"


@register_method(StaticConfig)
class Static(Method):
    """A fixed mask (random or by magnitude) for the whole of training."""

    def set_initial_masks(self) -> None:
        ctx = self.ctx
        if ctx.structure.kind == "channel":
            for unit in ctx.units:
                if self.config.init == "random":
                    scores = torch.rand(unit.group.size, generator=self.generator)
                else:
                    scores = channel_scores(ctx.source, unit)
                ctx.set_channel_mask(unit, topk_mask(scores, unit.keep_count()))
            return
        if self.config.init == "random":
            super().set_initial_masks()
            return
        if ctx.distribution == "global" and ctx.structure.kind == "unstructured":
            for layer, mask in zip(ctx.layers, ctx.global_magnitude_masks(ctx.mean_density())):
                ctx.set_mask(layer, mask)
            return
        for layer in ctx.layers:
            ctx.set_mask(layer, ctx.magnitude_mask(layer, layer.density))


class RigLConfig(MethodConfig):
    """``delta_t``: steps between updates; ``alpha``: the initial drop fraction, decayed by a
    cosine (``decay``) to zero at ``end_fraction`` of training, when updates end."""

    name: ClassVar[str] = "rigl"
    structures: ClassVar[tuple[str, ...]] = ("unstructured",)

    delta_t: int = Field(100, ge=1)
    alpha: float = Field(0.3, ge=0, le=1)
    end_fraction: float = Field(0.75, gt=0, le=1)
    decay: Literal["cosine", "constant"] = "cosine"

    def for_run(self, run: RunLength) -> MethodConfig:
        return self.with_defaults({"delta_t": max(1, run.total_steps // UPDATES_PER_RUN)})

    def check_fits(self, run: RunLength) -> None:
        """Updates come every ``delta_t`` steps before ``end_fraction`` of the run: one must fit,
        or the mask would never change (a static mask by another name)."""
        horizon = self.end_fraction * run.total_steps
        if not self.delta_t < horizon:
            fixes = (["lower delta_t"] if self.delta_t > 1 else []) \
                + (["raise end_fraction"] if self.end_fraction < 1 else []) + ["train longer"]
            advice = ", ".join(fixes[:-1]) + (" or " if len(fixes) > 1 else "") + fixes[-1]
            raise ValueError(f"{self.name}: no mask update fits: delta_t={self.delta_t} is not below end_fraction x "
                             f"total_steps = {self.end_fraction:g} x {run.total_steps} = {horizon:g}; {advice}")


@register_method(RigLConfig)
class RigL(Method):
    """RigL (Evci et al. 2020): every ``delta_t`` steps drop the smallest-magnitude active
    weights and grow the inactive ones with the largest dense gradient; grown weights start
    at zero; the drop fraction decays by a cosine to zero at ``end_fraction`` of training."""

    def is_update(self, step: int) -> bool:
        return step % self.config.delta_t == 0 and step < self.config.end_fraction * self.ctx.total_steps

    def drop_fraction(self, step: int) -> float:
        if self.config.decay == "constant":
            return self.config.alpha
        end = self.config.end_fraction * self.ctx.total_steps
        return self.config.alpha / 2 * (1 + math.cos(math.pi * step / end))

    def wants_dense_grad(self, step: int) -> bool:
        return self.is_update(step)

    def grow_scores(self, layer: SparseLayer, step: int) -> torch.Tensor:
        grad = layer.masked.dense_grad
        if grad is None:
            raise RuntimeError(f"rigl: no dense gradient for layer {layer.name}; call backward before step()")
        return grad.abs()

    def update(self, step: int) -> bool:
        fraction = self.drop_fraction(step)
        for layer in self.ctx.layers:
            n_active = int(layer.masked.mask.sum())
            k = int(fraction * n_active)
            self.ctx.prune_grow(layer, k, self.grow_scores(layer, step), init="zero", method=self.name)
        return True


class SETConfig(RigLConfig):
    """RigL's options (SET grows at random)."""

    name: ClassVar[str] = "set"


@register_method(SETConfig)
class SET(RigL):
    """SET (Mocanu et al. 2018): like RigL but grows at random (no dense gradient)."""

    def wants_dense_grad(self, step: int) -> bool:
        return False

    def grow_scores(self, layer: SparseLayer, step: int) -> torch.Tensor:
        return torch.rand(layer.masked.mask.shape, generator=self.generator)


class GMPConfig(MethodConfig):
    """``delta_t``: steps between pruning steps; the sparsity follows the cubic schedule from
    ``initial_sparsity`` at ``start_fraction`` to the target at ``end_fraction`` of training."""

    name: ClassVar[str] = "gmp"
    structures: ClassVar[tuple[str, ...]] = ("unstructured", "n:m", "channel")

    delta_t: int = Field(100, ge=1)
    start_fraction: float = Field(0.0, ge=0, le=1)
    end_fraction: float = Field(0.75, gt=0, le=1)
    initial_sparsity: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _ordered(self) -> GMPConfig:
        if not self.start_fraction < self.end_fraction:
            raise ValueError("start_fraction must be below end_fraction")
        return self

    def for_run(self, run: RunLength) -> MethodConfig:
        """``delta_t`` spreads ``UPDATES_PER_RUN`` pruning steps over the schedule's window. The
        literature's 100 is longer than a short run's window (84 steps of issue 30's 112), where
        the only pruning step was the one after the window: 0 to 90 % at once with a quarter of
        the run left (measured on digits, lr 0.05: the loss jumped from 0.05 to 1.8 there)."""
        window = (self.end_fraction - self.start_fraction) * run.total_steps
        return self.with_defaults({"delta_t": max(1, int(window) // UPDATES_PER_RUN)})


@register_method(GMPConfig)
class GMP(Method):
    """Gradual magnitude pruning (Zhu & Gupta 2017): sparsity follows
    s_t = s_f + (s_i - s_f)(1 - progress)^3 between ``start_fraction`` and ``end_fraction``
    of training, pruning the smallest magnitudes among the active weights."""

    def target(self, layer: SparseLayer, step: int) -> float:
        """The layer's sparsity at ``step``."""
        return self.schedule(step, 1.0 - layer.density)

    def schedule(self, step: int, final: float) -> float:
        """The scheduled sparsity at ``step`` for a ``final`` sparsity."""
        begin = self.config.start_fraction * self.ctx.total_steps
        end = self.config.end_fraction * self.ctx.total_steps
        progress = min(1.0, max(0.0, (step - begin) / max(end - begin, 1.0)))
        start = min(self.config.initial_sparsity, final)
        return final + (start - final) * (1.0 - progress) ** 3

    def set_initial_masks(self) -> None:
        self._apply(0, within=False)

    def _apply_channels(self, step: int) -> bool:
        changed = False
        for unit in self.ctx.units:
            final = 1.0 - unit.density
            target = self.schedule(step, final)
            scores = channel_scores(self.ctx.source, unit).float()
            scores = torch.where(unit.mask, scores, torch.full_like(scores, -1.0))
            mask = topk_mask(scores, unit.keep_count(1.0 - target))
            if not torch.equal(mask, unit.mask):
                self.ctx.set_channel_mask(unit, mask)
                changed = True
        return changed

    def _apply(self, step: int, within: bool) -> bool:
        ctx = self.ctx
        if ctx.structure.kind == "channel":
            return self._apply_channels(step)
        current = [layer.masked.mask.clone() for layer in ctx.layers]
        if ctx.distribution == "global" and ctx.structure.kind == "unstructured":
            density = 1.0 - self.schedule(step, 1.0 - ctx.mean_density())
            masks = ctx.global_magnitude_masks(density, within=current if within else None)
        else:
            masks = [ctx.magnitude_mask(layer, 1.0 - self.target(layer, step),
                                        within=layer.masked.mask if within else None) for layer in ctx.layers]
        changed = False
        for layer, old, mask in zip(ctx.layers, current, masks):
            if not torch.equal(old, mask):
                ctx.set_mask(layer, mask)
                changed = True
        return changed

    def is_update(self, step: int) -> bool:
        """Every ``delta_t`` steps between the start and the end of the schedule, plus the
        first step at or after its end, so the target is reached whatever ``delta_t``."""
        begin = self.config.start_fraction * self.ctx.total_steps
        end = self.config.end_fraction * self.ctx.total_steps
        final = max(1, math.ceil(end))
        return step == final or (step % self.config.delta_t == 0 and begin <= step <= end)

    def update(self, step: int) -> bool:
        return self._apply(step, within=True)
