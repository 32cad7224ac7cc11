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
from spruce.passes.importance import IMPORTANCE
from spruce.passes.sparsity.channels import channel_scores
from spruce.passes.sparsity.criteria import CRITERIA, importance
from spruce.passes.sparsity.masking import nm_refill, topk_mask

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
    keeps_pruned_weights: ClassVar[bool] = False  # dense weights behind an STE (not zeroed)
    supports_channels: ClassVar[bool] = False  # structure="channel"
    resets_optimizer_state: ClassVar[bool] = True  # zero optimizer state of weights whose mask flipped

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

    def completes_update(self, sm: SparseModel, step: int) -> bool:
        """Does the update at ``step`` finish a prune-grow update (recorded in metrics)?"""
        return True

    def on_step(self, sm: SparseModel, step: int) -> None:
        """Called after every optimizer step, before any mask update."""

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
    supports_channels = True

    def initialize(self, sm: SparseModel) -> None:
        if sm.structure == "channel":
            for unit in sm.units:
                if self.config.init == "random":
                    scores = torch.rand(unit.group.size, generator=self.generator)
                else:
                    scores = channel_scores(sm, unit)
                sm.set_channel_mask(unit, topk_mask(scores, unit.keep_count()))
            return
        if self.config.init == "random":
            super().initialize(sm)
            return
        if sm.distribution == "global" and sm.structure == "unstructured":
            for layer, mask in zip(sm.layers, sm.global_magnitude_masks(_mean_density(sm))):
                sm.set_mask(layer, mask)
            return
        for layer in sm.layers:
            sm.set_mask(layer, sm.magnitude_mask(layer, layer.density))


def _mean_density(sm: SparseModel) -> float:
    sizes = [layer.masked.mask.numel() for layer in sm.layers]
    return sum(layer.density * n for layer, n in zip(sm.layers, sizes)) / sum(sizes)


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

    def initialize(self, sm: SparseModel) -> None:
        if sm.structure == "n:m":  # refused here, not at the first update deep in training
            raise ValueError(f"{self.name}: structure='{sm.n}:{sm.m}' is not supported (prune-grow keeps counts "
                             "per layer, not per group of M); use structure='unstructured', or method static, gmp, "
                             "iee or feather for N:M")
        super().initialize(sm)

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
    supports_channels = True

    def target(self, sm: SparseModel, layer: SparseLayer, step: int) -> float:
        """The layer's sparsity at ``step``."""
        return self._schedule(sm, step, 1.0 - layer.density)

    def _schedule(self, sm: SparseModel, step: int, final: float) -> float:
        begin = self.config.start_fraction * sm.total_steps
        end = self.config.end_fraction * sm.total_steps
        progress = min(1.0, max(0.0, (step - begin) / max(end - begin, 1.0)))
        start = min(self.config.initial_sparsity, final)
        return final + (start - final) * (1.0 - progress) ** 3

    def initialize(self, sm: SparseModel) -> None:
        self._apply(sm, 0, within=False)

    def _apply_channels(self, sm: SparseModel, step: int) -> bool:
        changed = False
        for unit in sm.units:
            final = 1.0 - unit.density
            target = self._schedule(sm, step, final)
            scores = channel_scores(sm, unit).float()
            scores = torch.where(unit.mask, scores, torch.full_like(scores, -1.0))
            mask = topk_mask(scores, unit.keep_count(1.0 - target))
            if not torch.equal(mask, unit.mask):
                sm.set_channel_mask(unit, mask)
                changed = True
        return changed

    def _apply(self, sm: SparseModel, step: int, within: bool) -> bool:
        if sm.structure == "channel":
            return self._apply_channels(sm, step)
        current = [layer.masked.mask.clone() for layer in sm.layers]
        if sm.distribution == "global" and sm.structure == "unstructured":
            density = 1.0 - self._schedule(sm, step, 1.0 - _mean_density(sm))
            masks = sm.global_magnitude_masks(density, within=current if within else None)
        else:
            masks = [sm.magnitude_mask(layer, 1.0 - self.target(sm, layer, step),
                                       within=layer.masked.mask if within else None) for layer in sm.layers]
        changed = False
        for layer, old, mask in zip(sm.layers, current, masks):
            if not torch.equal(old, mask):
                sm.set_mask(layer, mask)
                changed = True
        return changed

    def is_update(self, sm: SparseModel, step: int) -> bool:
        """Every ``delta_t`` steps between the start and the end of the schedule, plus the
        first step at or after its end, so the target is reached whatever ``delta_t``."""
        begin = self.config.start_fraction * sm.total_steps
        end = self.config.end_fraction * sm.total_steps
        final = max(1, math.ceil(end))
        return step == final or (step % self.config.delta_t == 0 and begin <= step <= end)

    def update(self, sm: SparseModel, step: int) -> bool:
        return self._apply(sm, step, within=True)



@dataclass(frozen=True)
class IEEConfig:
    h: int = 150
    j: int = 150
    q: int = 150
    omega0: float = 0.3
    end_fraction: float = 0.75
    decay: str = "cosine"  # or "constant"
    criterion: str = "magnitude"
    seed: int = 0
    # structure="channel" (with a budget): channel criterion, kept counts' multiple, initial
    # selection ("magnitude": L1 of the channels' weights, or "random"), knapsack resolution
    channel_criterion: str = "taylor_bn"
    round_to: int = 1
    init: str = "magnitude"
    bins: int = 1024

    def __post_init__(self):
        if self.criterion not in CRITERIA:
            raise ValueError(f"iee: unknown criterion {self.criterion!r}; valid: {', '.join(sorted(CRITERIA))}")
        if self.channel_criterion not in IMPORTANCE:
            raise ValueError(f"iee: unknown channel_criterion {self.channel_criterion!r}; valid: "
                             f"{', '.join(sorted(IMPORTANCE))}")
        _check_positive_int("round_to", self.round_to)
        if self.init not in ("magnitude", "random"):
            raise ValueError(f"iee: init must be 'magnitude' or 'random', got {self.init!r}")
        if isinstance(self.bins, bool) or not isinstance(self.bins, int) or self.bins < 16:
            raise ValueError(f"iee: bins must be an integer >= 16, got {self.bins!r}")
        for name in ("h", "j", "q"):
            _check_positive_int(name, getattr(self, name))
        _check_fraction("omega0", self.omega0)
        _check_fraction("end_fraction", self.end_fraction, low_open=True)
        if self.decay not in ("cosine", "constant"):
            raise ValueError(f"decay must be 'cosine' or 'constant', got {self.decay!r}")


@register_method("iee")
class IEE(Method):
    """IEE (Algorithm 1 of papers/iee-enhanced-saliency.md): unstructured or N:M with magnitude
    importance; with structure="channel" and a budget, the latency-constrained version
    (:class:`~spruce.passes.sparsity.halp.ChannelIEE`: Taylor-BN importance, knapsack prune/grow).

    Cycles of dT = H + J + Q steps: Importance Estimation (H) -> Prune ArgTopK(-I(K), Omega^t)
    -> Accuracy Improvement (J) -> Reactivate & Explore (Q steps: every pruned weight P comes
    back with its most-recently-used value and trains while K is frozen bitwise) -> Grow
    ArgTopK(I(P), Omega^t). Omega^0 = 0.3 of the active set, decayed by a cosine; cycles
    start only before ``end_fraction`` of training."""

    Config = IEEConfig
    scheduled = True
    supports_channels = True
    budgeted = True  # takes sparsify(budget=...) with structure='channel'

    def __init__(self, config: IEEConfig):
        super().__init__(config)
        self.channels = None  # the ChannelIEE of structure="channel"
        self.cycle = 0  # t in Algorithm 1
        self.exploring = False  # flag in Algorithm 1
        self.budgets: dict[str, int] = {}  # Omega^t of the running cycle, per layer
        self.active: dict[str, torch.Tensor] = {}  # Theta_K per layer
        self.mru: dict[str, torch.Tensor] = {}  # most recently used value of every weight
        self.frozen: dict[str, torch.Tensor] = {}  # values of Theta_K during Reactivate & Explore

    @property
    def period(self) -> int:
        return self.config.h + self.config.j + self.config.q

    def n_cycles(self, sm: SparseModel) -> int:
        return max(1, int(self.config.end_fraction * sm.total_steps) // self.period)

    def omega(self, sm: SparseModel) -> float:
        """Omega^t as a fraction of the active set."""
        if self.config.decay == "constant":
            return self.config.omega0
        return self.config.omega0 / 2 * (1 + math.cos(math.pi * self.cycle / self.n_cycles(sm)))

    def stage(self, sm: SparseModel, step: int) -> str | None:
        """What happens before training batch ``step + 1`` (Algorithm 1's index i)."""
        i = step + 1
        c = self.config
        # a cycle starts only before end_fraction of training and if its grow fits in training
        starts = (self.cycle < self.n_cycles(sm) and i <= c.end_fraction * sm.total_steps
                  and i + c.j + c.q - 1 <= sm.total_steps)
        if (i + c.j + c.q) % self.period == 0 and starts:
            return "prune"
        if self.budgets and (i + c.q) % self.period == 0:
            return "explore"
        if self.budgets and i % self.period == 0:
            return "grow"
        return None

    def initialize(self, sm: SparseModel) -> None:
        if sm.structure == "channel":
            from spruce.passes.sparsity.halp import ChannelIEE  # halp imports this module

            self.channels = ChannelIEE(self, sm)
            return
        if getattr(sm, "budget", None) is not None:
            raise ValueError("iee: a cost budget selects channels: use structure='channel' (unstructured and N:M "
                             "IEE take sparsity=)")
        super().initialize(sm)
        for layer in sm.layers:
            self.mru[layer.name] = layer.module.weight.detach().clone()
            self.active[layer.name] = layer.masked.mask.clone()

    def is_update(self, sm: SparseModel, step: int) -> bool:
        return self.stage(sm, step) is not None

    def completes_update(self, sm: SparseModel, step: int) -> bool:
        return self.stage(sm, step) == "grow"

    @torch.no_grad()
    def update(self, sm: SparseModel, step: int) -> bool:
        stage = self.stage(sm, step)
        if self.channels is not None:
            return self.channels.update(sm, step, stage)
        if stage == "prune":
            fraction = self.omega(sm)
            for layer in sm.layers:
                active = self.active[layer.name]
                k = int(fraction * int(active.sum()))
                self.budgets[layer.name] = k
                weight = layer.module.weight
                saliency = importance(self.config.criterion, layer)
                scores = torch.where(active, -saliency, torch.full_like(saliency, -math.inf))
                dropped = topk_mask(scores, k)
                self.mru[layer.name][dropped] = weight[dropped]
                self.active[layer.name] = active & ~dropped
                layer.after_prune = self.active[layer.name].clone()
                layer.grown = torch.zeros_like(active)
                sm.set_mask(layer, self.active[layer.name])
            return True
        if stage == "explore":
            self.exploring = True
            for layer in sm.layers:
                active = self.active[layer.name]
                weight = layer.module.weight
                weight.copy_(torch.where(active, weight, self.mru[layer.name]))  # Theta_P from MRU
                self.frozen[layer.name] = weight.detach().clone()
                sm.set_mask(layer, torch.ones_like(active))
            return True
        # grow
        for layer in sm.layers:
            active = self.active[layer.name]
            weight = layer.module.weight
            saliency = importance(self.config.criterion, layer)
            scores = torch.where(active, torch.full_like(saliency, -math.inf), saliency)
            if sm.structure == "n:m":  # refill every group of M to exactly N
                grown = nm_refill(active, scores, sm.n, sm.m, layer.in_dim)
            else:
                grown = topk_mask(scores, self.budgets[layer.name])
            still_pruned = ~(active | grown)
            self.mru[layer.name][still_pruned] = weight[still_pruned]
            self.active[layer.name] = active | grown
            layer.grown = grown
            sm.set_mask(layer, self.active[layer.name])
        self.exploring = False
        self.frozen.clear()
        self.budgets.clear()
        self.cycle += 1
        return True

    @torch.no_grad()
    def on_step(self, sm: SparseModel, step: int) -> None:
        if self.channels is not None:
            self.channels.on_step(sm, step)
            return
        if not self.exploring:
            return
        for layer in sm.layers:  # Theta_K stays bitwise frozen whatever the optimizer does
            active = self.active[layer.name]
            weight = layer.module.weight
            weight.copy_(torch.where(active, self.frozen[layer.name], weight))

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update(cycle=self.cycle, exploring=self.exploring, budgets=dict(self.budgets),
                     active=dict(self.active), mru=dict(self.mru), frozen=dict(self.frozen))
        if self.channels is not None:
            state["channels"] = self.channels.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.cycle, self.exploring = state["cycle"], state["exploring"]
        self.budgets = dict(state["budgets"])
        self.active = {k: v.clone() for k, v in state["active"].items()}
        self.mru = {k: v.clone() for k, v in state["mru"].items()}
        self.frozen = {k: v.clone() for k, v in state["frozen"].items()}
        if self.channels is not None and "channels" in state:
            self.channels.load_state_dict(state["channels"])
