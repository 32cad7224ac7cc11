"""Prune-grow methods, one registry.

A method owns its configuration (a frozen dataclass validated at construction) and
its state; the :class:`~spruce.passes.sparsity.model.SparseModel` calls
``initialize`` once, ``wants_dense_grad(step)`` before each forward, and
``update(step)`` after each optimizer step. Every method keeps each layer's
sparsity exactly on its target after every update.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from spruce.passes.sparsity.model import SparseLayer, SparseModel

__all__ = ["METHODS", "register_method", "Method", "StaticConfig", "RigLConfig", "GMPConfig"]

METHODS: dict[str, type[Method]] = {}


def register_method(name: str):
    def register(cls: type[Method]) -> type[Method]:
        cls.name = name
        METHODS[name] = cls
        return cls

    return register


def _check_fraction(name: str, value: float, low_open: bool = False) -> None:
    ok = (0.0 < value <= 1.0) if low_open else (0.0 <= value <= 1.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok:
        raise ValueError(f"{name} must be in {'(0, 1]' if low_open else '[0, 1]'}, got {value!r}")


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class Method:
    """Base: no updates, no dense gradients."""

    name: ClassVar[str]
    Config: ClassVar[type]
    scheduled: ClassVar[bool] = False  # needs total_steps

    def __init__(self, config: Any):
        self.config = config
        self.generator = torch.Generator().manual_seed(getattr(config, "seed", 0))

    @classmethod
    def from_options(cls, **options: Any) -> Method:
        known = {f.name for f in fields(cls.Config)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(unknown)} for method {cls.name!r}; valid: "
                             f"{', '.join(sorted(known)) or 'none'}")
        return cls(cls.Config(**options))

    def initialize(self, sm: SparseModel) -> None:
        for layer in sm.layers:
            sm.set_mask(layer, sm.random_mask(layer, layer.density, self.generator))

    def is_update(self, sm: SparseModel, step: int) -> bool:
        """Does the method update masks after optimizer step ``step`` (1-based)?"""
        return False

    def wants_dense_grad(self, sm: SparseModel, step: int) -> bool:
        return False

    def update(self, sm: SparseModel, step: int) -> bool:
        """Change masks after optimizer step ``step``; True when they changed."""
        return False

    def state_dict(self) -> dict:
        return {"config": asdict(self.config), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


@dataclass(frozen=True)
class StaticConfig:
    init: str = "random"  # or "magnitude"
    seed: int = 0

    def __post_init__(self):
        if self.init not in ("random", "magnitude"):
            raise ValueError(f"static: init must be 'random' or 'magnitude', got {self.init!r}")


@register_method("static")
class Static(Method):
    """A fixed mask (random or by magnitude) for the whole of training."""

    Config = StaticConfig

    def initialize(self, sm: SparseModel) -> None:
        if self.config.init == "random":
            super().initialize(sm)
            return
        for layer in sm.layers:
            sm.set_mask(layer, sm.magnitude_mask(layer, layer.density))


@dataclass(frozen=True)
class RigLConfig:
    delta_t: int = 100
    alpha: float = 0.3
    end_fraction: float = 0.75
    decay: str = "cosine"  # or "constant"
    seed: int = 0

    def __post_init__(self):
        _check_positive_int("delta_t", self.delta_t)
        _check_fraction("alpha", self.alpha)
        _check_fraction("end_fraction", self.end_fraction, low_open=True)
        if self.decay not in ("cosine", "constant"):
            raise ValueError(f"decay must be 'cosine' or 'constant', got {self.decay!r}")


@register_method("rigl")
class RigL(Method):
    """RigL (Evci et al. 2020): every ``delta_t`` steps drop the smallest-magnitude active
    weights and grow the inactive ones with the largest dense gradient; grown weights start
    at zero; the drop fraction decays by a cosine to zero at ``end_fraction`` of training."""

    Config = RigLConfig
    scheduled = True

    def is_update(self, sm: SparseModel, step: int) -> bool:
        return step % self.config.delta_t == 0 and step < self.config.end_fraction * sm.total_steps

    def drop_fraction(self, sm: SparseModel, step: int) -> float:
        if self.config.decay == "constant":
            return self.config.alpha
        end = self.config.end_fraction * sm.total_steps
        return self.config.alpha / 2 * (1 + math.cos(math.pi * step / end))

    def wants_dense_grad(self, sm: SparseModel, step: int) -> bool:
        return self.is_update(sm, step)

    def grow_scores(self, sm: SparseModel, layer: SparseLayer) -> torch.Tensor:
        grad = layer.masked.dense_grad
        if grad is None:
            raise RuntimeError(f"rigl: no dense gradient for layer {layer.name}; call backward before step()")
        return grad.abs()

    def update(self, sm: SparseModel, step: int) -> bool:
        fraction = self.drop_fraction(sm, step)
        for layer in sm.layers:
            n_active = int(layer.masked.mask.sum())
            k = int(fraction * n_active)
            sm.prune_grow(layer, k, self.grow_scores(sm, layer), init="zero")
        return True


@register_method("set")
class SET(RigL):
    """SET (Mocanu et al. 2018): like RigL but grows at random (no dense gradient)."""

    Config = RigLConfig

    def wants_dense_grad(self, sm: SparseModel, step: int) -> bool:
        return False

    def grow_scores(self, sm: SparseModel, layer: SparseLayer) -> torch.Tensor:
        return torch.rand(layer.masked.mask.shape, generator=self.generator)


@dataclass(frozen=True)
class GMPConfig:
    delta_t: int = 100
    start_fraction: float = 0.0
    end_fraction: float = 0.75
    initial_sparsity: float = 0.0
    seed: int = 0

    def __post_init__(self):
        _check_positive_int("delta_t", self.delta_t)
        _check_fraction("start_fraction", self.start_fraction)
        _check_fraction("end_fraction", self.end_fraction, low_open=True)
        if not self.start_fraction < self.end_fraction:
            raise ValueError("gmp: start_fraction must be below end_fraction")
        if not 0.0 <= self.initial_sparsity < 1.0:
            raise ValueError(f"gmp: initial_sparsity must be in [0, 1), got {self.initial_sparsity!r}")


@register_method("gmp")
class GMP(Method):
    """Gradual magnitude pruning (Zhu & Gupta 2017): sparsity follows
    s_t = s_f + (s_i - s_f)(1 - progress)^3 between ``start_fraction`` and ``end_fraction``
    of training, pruning the smallest magnitudes among the active weights."""

    Config = GMPConfig
    scheduled = True

    def target(self, sm: SparseModel, layer: SparseLayer, step: int) -> float:
        """The layer's sparsity at ``step``."""
        begin = self.config.start_fraction * sm.total_steps
        end = self.config.end_fraction * sm.total_steps
        progress = min(1.0, max(0.0, (step - begin) / max(end - begin, 1.0)))
        final = 1.0 - layer.density
        start = min(self.config.initial_sparsity, final)
        return final + (start - final) * (1.0 - progress) ** 3

    def initialize(self, sm: SparseModel) -> None:
        for layer in sm.layers:
            sm.set_mask(layer, sm.magnitude_mask(layer, 1.0 - self.target(sm, layer, 0)))

    def is_update(self, sm: SparseModel, step: int) -> bool:
        begin = self.config.start_fraction * sm.total_steps
        end = self.config.end_fraction * sm.total_steps
        return step % self.config.delta_t == 0 and begin <= step <= end + self.config.delta_t

    def update(self, sm: SparseModel, step: int) -> bool:
        changed = False
        for layer in sm.layers:
            density = 1.0 - self.target(sm, layer, step)
            mask = sm.magnitude_mask(layer, density, within=layer.masked.mask)
            if not torch.equal(mask, layer.masked.mask):
                sm.set_mask(layer, mask)
                changed = True
        return changed

