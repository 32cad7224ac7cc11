"""Latency-constrained channel sparsity: HALP, and the channel path of IEE.

Both choose channels with the knapsack of :mod:`spruce.passes.sparsity.knapsack` under a
budget that is a fraction of the dense model's cost (``{"latency": 0.5}`` with a
:class:`~spruce.runtime.profile.LatencyTable`, or ``{"flops": f}`` / ``{"params": f}``),
scoring channels with Taylor importance on BatchNorm, ``|g_gamma * gamma + g_beta * beta|``
(appendix §4 of papers/iee-enhanced-saliency.md), accumulated over the steps between
updates.

- ``halp`` (Shen et al., HALP): start dense; every ``interval`` steps prune, among the
  still-active channels, to a budget that decreases from dense to the target
  (exponentially by default), so the last pruning step meets the target. Pruned channels
  never come back.
- ``iee`` with ``structure="channel"`` (:class:`ChannelIEE`, driven by the ``iee``
  method's Algorithm-1 schedule): start at the budget Psi; prune with
  Knapsack(I(Theta_K), R, Psi - Omega^t) over the active channels, Reactivate & Explore
  every pruned channel (most-recently-used values, Theta_K frozen bitwise), grow with
  Knapsack(I(Theta_P), R, Omega^t) over the pruned ones.

Export the result with :meth:`SparseModel.compact` (physical channel removal).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from spruce.passes.importance import IMPORTANCE, importance_scores, param_table
from spruce.passes.sparsity.channels import expand_channel_masks
from spruce.passes.sparsity.knapsack import (
    Budget,
    InfeasibleBudget,
    Selection,
    build_cost_model,
    minimum_cost,
    select_channels,
)
from spruce.passes.sparsity.methods import Method, _check_fraction, _check_positive_int, register_method

if TYPE_CHECKING:
    from spruce.passes.sparsity.model import SparseModel

__all__ = ["ChannelBudget", "ChannelIEE", "HALP", "HALPConfig", "ImportanceMeter"]


class ChannelBudget:
    """The cost model of a channel-structured :class:`SparseModel` and its budget Psi."""

    def __init__(self, sm: SparseModel, method: str, round_to: int = 1, bins: int = 1024):
        if sm.structure != "channel":
            raise ValueError(f"{method}: a cost budget selects channels: use structure='channel'")
        raw = getattr(sm, "budget", None)
        if raw is None:
            raise ValueError(f"{method} with structure='channel' needs a budget: sparsify(..., "
                             "budget={'latency': f}, latency_table=spruce.profile(...)) or {'flops': f} / "
                             "{'params': f}, f a fraction of the dense model")
        self.budget = Budget.parse(raw)
        table = getattr(sm, "latency_table", None)
        self.cost = build_cost_model(self.budget.kind, sm._source[0], sm.analysis, [u.group.id for u in sm.units],
                                     table)
        self.dense = self.cost.dense()
        self.target = self.budget.fraction * self.dense  # Psi, in the cost model's unit
        self.sample = int(getattr(table, "step", 1)) if self.budget.kind == "latency" else 1
        self.round_to, self.bins = round_to, bins
        whole = [f"group{u.group.id} ({u.group.size} channels)" for u in sm.units if u.group.size <= round_to]
        if whole:  # kept counts are multiples of round_to or the whole group: these cannot shrink
            warnings.warn(f"{method}: round_to={round_to} is not below the size of {len(whole)} channel group(s), "
                          f"which therefore keep all their channels: {', '.join(whole)}", stacklevel=3)
        floor = minimum_cost(self.cost, round_to, self.sample)
        if floor > self.target:
            raise InfeasibleBudget(
                f"{method}: no channel configuration meets the budget {self.budget.kind}={self.budget.fraction:g} "
                f"({self.target:.6g} {self.cost.unit}): the smallest reachable {self.budget.kind} is {floor:.6g} "
                f"{self.cost.unit} ({floor / self.dense:.1%} of dense)", floor)

    @staticmethod
    def counts(sm: SparseModel) -> dict[int, int]:
        return {u.group.id: int(u.mask.sum()) for u in sm.units}

    def current(self, sm: SparseModel) -> float:
        """Predicted cost of the channels the masks keep now."""
        return self.cost.cost(self.counts(sm))

    def select(self, sm: SparseModel, importance: dict[int, np.ndarray], budget: float,
               candidates: dict[int, np.ndarray] | None = None,
               required: dict[int, np.ndarray] | None = None, start: dict[int, int] | None = None) -> Selection:
        """The knapsack's choice under ``budget`` (see :func:`select_channels`), linearised
        first at ``start`` (default: the current kept counts)."""
        return select_channels(self.cost, importance, budget, candidates=candidates, required=required,
                               round_to=self.round_to, bins=self.bins, sample=self.sample,
                               start=self.counts(sm) if start is None else start)

    @staticmethod
    def apply(sm: SparseModel, kept: dict[int, np.ndarray]) -> None:
        """Set every unit's mask to its ``kept`` channels (one weight-mask expansion)."""
        for unit in sm.units:
            mask = torch.zeros(unit.group.size, dtype=torch.bool)
            mask[torch.as_tensor(kept[unit.group.id], dtype=torch.long)] = True
            unit.mask.copy_(mask)
        expand_channel_masks(sm.units, sm.layers)


class ImportanceMeter:
    """Channel importance of every unit summed over steps (HALP averages it between updates)."""

    def __init__(self, criterion: str, seed: int = 0):
        self.criterion = criterion
        self.rng = np.random.default_rng(seed)
        self.total: dict[int, np.ndarray] = {}
        self.steps = 0

    def add(self, sm: SparseModel) -> None:
        params = param_table(sm._source[0])
        for unit in sm.units:
            score = importance_scores(self.criterion, unit.group, params, self.rng)
            gid = unit.group.id
            self.total[gid] = self.total.get(gid, 0.0) + score
        self.steps += 1

    def mean(self, sm: SparseModel) -> dict[int, np.ndarray]:
        """Average importance since the last :meth:`reset` (scored now if no step was seen)."""
        if self.steps == 0:
            self.add(sm)
        return {gid: total / self.steps for gid, total in self.total.items()}

    def reset(self) -> None:
        self.total, self.steps = {}, 0

    def state_dict(self) -> dict:
        return {"total": {k: v.copy() for k, v in self.total.items()}, "steps": self.steps,
                "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.total = {int(k): np.asarray(v) for k, v in state["total"].items()}
        self.steps = state["steps"]
        self.rng.bit_generator.state = state["rng"]


def _check_criterion(method: str, criterion: str) -> None:
    if criterion not in IMPORTANCE:
        raise ValueError(f"{method}: unknown channel criterion {criterion!r}; valid: {', '.join(sorted(IMPORTANCE))}")


# --- HALP --------------------------------------------------------------------------------


@dataclass(frozen=True)
class HALPConfig:
    """``interval``: steps between pruning steps (importance averaged over them);
    ``end_fraction``: pruning ends by this fraction of training; ``schedule``: how the
    budget falls from dense to the target over the pruning steps (``exponential`` or
    ``linear``); ``round_to``: kept channel counts are multiples of it; ``bins``: knapsack
    cost resolution."""

    interval: int = 100
    end_fraction: float = 0.5
    schedule: str = "exponential"
    criterion: str = "taylor_bn"
    round_to: int = 1
    bins: int = 1024
    seed: int = 0

    def __post_init__(self):
        _check_positive_int("interval", self.interval)
        _check_positive_int("round_to", self.round_to)
        _check_fraction("end_fraction", self.end_fraction, low_open=True)
        if isinstance(self.bins, bool) or not isinstance(self.bins, int) or self.bins < 16:
            raise ValueError(f"bins must be an integer >= 16, got {self.bins!r}")
        if self.schedule not in ("exponential", "linear"):
            raise ValueError(f"halp: schedule must be 'exponential' or 'linear', got {self.schedule!r}")
        _check_criterion("halp", self.criterion)


@register_method("halp")
class HALP(Method):
    """HALP: iterative latency-constrained channel pruning with a knapsack (see module doc).

    Invariant: after the ``s``-th pruning step the predicted cost is at most
    :meth:`budget_after` ``(s)``; the last one is the target Psi."""

    Config = HALPConfig
    scheduled = True
    supports_channels = True
    budgeted = True

    def __init__(self, config: HALPConfig):
        super().__init__(config)
        self.meter = ImportanceMeter(config.criterion, config.seed)
        self.prunes_done = 0
        self.history: list[dict[str, Any]] = []

    def initialize(self, sm: SparseModel) -> None:
        self.costs = ChannelBudget(sm, "halp", self.config.round_to, self.config.bins)
        self.n_prunes = int(self.config.end_fraction * sm.total_steps) // self.config.interval
        if self.n_prunes < 1:
            raise ValueError(f"halp: no pruning step fits: interval={self.config.interval} is longer than "
                             f"end_fraction x total_steps = {self.config.end_fraction * sm.total_steps:g}")
        for unit in sm.units:
            unit.mask.fill_(True)
        ChannelBudget.apply(sm, {u.group.id: np.arange(u.group.size) for u in sm.units})

    def budget_after(self, prunes: int) -> float:
        """The cost budget once ``prunes`` pruning steps are done (dense at 0)."""
        fraction = self.costs.budget.fraction
        s = min(max(prunes, 0), self.n_prunes) / self.n_prunes
        if self.config.schedule == "linear":
            return self.costs.dense * (1.0 - (1.0 - fraction) * s)
        return self.costs.dense * fraction ** s

    def on_step(self, sm: SparseModel, step: int) -> None:
        if self.prunes_done < self.n_prunes:
            self.meter.add(sm)

    def is_update(self, sm: SparseModel, step: int) -> bool:
        return step % self.config.interval == 0 and step // self.config.interval <= self.n_prunes

    @torch.no_grad()
    def update(self, sm: SparseModel, step: int) -> bool:
        budget = self.budget_after(self.prunes_done + 1)
        if self.prunes_done + 1 == self.n_prunes:
            budget = self.costs.target  # the last step lands on Psi exactly, not a rounding of it
        active = {u.group.id: u.mask.numpy().copy() for u in sm.units}
        selection = self.costs.select(sm, self.meter.mean(sm), budget, candidates=active)
        for layer in sm.layers:
            layer.after_prune = None
        ChannelBudget.apply(sm, selection.kept)
        self.meter.reset()
        self.prunes_done += 1
        self.history.append({"step": step, "budget": budget, "cost": selection.cost})
        return True

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update(meter=self.meter.state_dict(), prunes_done=self.prunes_done, history=list(self.history))
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.meter.load_state_dict(state["meter"])
        self.prunes_done = state["prunes_done"]
        self.history = list(state["history"])


# --- IEE on channels ------------------------------------------------------------------------


class ChannelIEE:
    """The channel path of the ``iee`` method: its stages (Algorithm 1) on channel groups,
    each prune and grow a knapsack under the budget. Owned by the ``iee`` method object,
    which keeps the schedule (``stage``, ``omega``, ``cycle``)."""

    def __init__(self, iee: Any, sm: SparseModel):
        config = iee.config
        _check_criterion("iee", config.channel_criterion)
        self.iee = iee
        self.sm = sm
        self.costs = ChannelBudget(sm, "iee", config.round_to, config.bins)
        self.meter = ImportanceMeter(config.channel_criterion, config.seed)
        self.history: list[dict[str, Any]] = []
        # Theta_K: initialised at Psi by the knapsack on the initial importance
        if config.init == "random":
            rng = torch.Generator().manual_seed(config.seed)
            scores = {u.group.id: torch.rand(u.group.size, generator=rng).numpy() for u in sm.units}
        else:
            params = param_table(sm._source[0])
            scores = {u.group.id: importance_scores("l1", u.group, params, np.random.default_rng(0))
                      for u in sm.units}
        for unit in sm.units:
            unit.mask.fill_(True)
        selection = self.costs.select(sm, scores, self.costs.target)
        ChannelBudget.apply(sm, selection.kept)
        self.active = {u.group.id: u.mask.clone() for u in sm.units}
        self.mru = {layer.name: layer.module.weight.detach().clone() for layer in sm.layers}
        self.frozen: dict[str, torch.Tensor] = {}
        self.frozen_masks: dict[str, torch.Tensor] = {}
        self.history.append({"step": 0, "stage": "init", "budget": self.costs.target, "cost": selection.cost})

    def active_cost(self) -> float:
        """Predicted cost of Theta_K (the active channels, whatever the masks during exploring)."""
        return self.costs.cost.cost({gid: int(mask.sum()) for gid, mask in self.active.items()})

    def on_step(self, sm: SparseModel, step: int) -> None:
        self.meter.add(sm)
        if self.iee.exploring:
            self._restore_frozen(sm)

    @torch.no_grad()
    def update(self, sm: SparseModel, step: int, stage: str) -> bool:
        psi = self.costs.target
        if stage == "prune":
            omega = self.iee.omega(sm) * psi
            budget = psi - omega
            before = {layer.name: layer.masked.mask.clone() for layer in sm.layers}
            candidates = {gid: mask.numpy().copy() for gid, mask in self.active.items()}
            selection = self.costs.select(sm, self.meter.mean(sm), budget, candidates=candidates)
            ChannelBudget.apply(sm, selection.kept)
            for layer in sm.layers:
                dropped = before[layer.name] & ~layer.masked.mask
                self.mru[layer.name][dropped] = layer.module.weight[dropped]
                layer.after_prune = layer.masked.mask.clone()
                layer.grown = torch.zeros_like(layer.masked.mask)
            self.iee.budgets = {f"group{u.group.id}": int(self.active[u.group.id].sum() - u.mask.sum())
                                for u in sm.units}
            self.iee.omega_cost = omega
            self.active = {u.group.id: u.mask.clone() for u in sm.units}
        elif stage == "explore":
            self.iee.exploring = True
            self.frozen_masks = {layer.name: layer.masked.mask.clone() for layer in sm.layers}
            for layer in sm.layers:  # Theta_P comes back with its most recently used values
                weight = layer.module.weight
                weight.copy_(torch.where(self.frozen_masks[layer.name], weight, self.mru[layer.name]))
            self.frozen = self._snapshot(sm)
            ChannelBudget.apply(sm, {u.group.id: np.arange(u.group.size) for u in sm.units})
            budget, selection = psi - self.iee.omega_cost, None
        else:  # grow
            omega = self.iee.omega_cost
            budget = min(psi, self.active_cost() + omega)
            required = {gid: mask.numpy().copy() for gid, mask in self.active.items()}
            start = {gid: int(mask.sum()) for gid, mask in self.active.items()}
            selection = self.costs.select(sm, self.meter.mean(sm), budget, required=required, start=start)
            ChannelBudget.apply(sm, selection.kept)
            for layer in sm.layers:
                mask = layer.masked.mask
                still_pruned = ~mask
                self.mru[layer.name][still_pruned] = layer.module.weight[still_pruned]
                layer.grown = mask & ~self.frozen_masks[layer.name]
            self.active = {u.group.id: u.mask.clone() for u in sm.units}
            self.iee.exploring = False
            self.frozen, self.frozen_masks = {}, {}
            self.iee.budgets = {}
            self.iee.cycle += 1
        self.meter.reset()
        cost = self.active_cost()
        self.history.append({"step": step, "stage": stage, "budget": budget, "cost": cost})
        return True

    def _frozen_entries(self, sm: SparseModel) -> dict[str, torch.Tensor]:
        """Bool masks of Theta_K over every parameter it covers: the sparse layers' active
        weights and the active channels' entries of 1-D group members (BatchNorm, biases)."""
        params = dict(sm._source[0].named_parameters())
        entries = {f"{layer.name}.weight": self.frozen_masks[layer.name] for layer in sm.layers}
        for unit in sm.units:
            alive = self.active[unit.group.id].numpy()
            for member in unit.group.members:
                tensor = params.get(member.name)
                if tensor is None or tensor.dim() != 1:
                    continue
                mask = entries.setdefault(member.name, torch.zeros_like(tensor, dtype=torch.bool))
                mask[torch.as_tensor(member.index[alive].reshape(-1))] = True
        return entries

    def _snapshot(self, sm: SparseModel) -> dict[str, torch.Tensor]:
        params = dict(sm._source[0].named_parameters())
        self.frozen_entries = self._frozen_entries(sm)
        return {name: params[name].detach().clone() for name in self.frozen_entries}

    def _restore_frozen(self, sm: SparseModel) -> None:
        params = dict(sm._source[0].named_parameters())
        with torch.no_grad():
            for name, value in self.frozen.items():
                params[name].copy_(torch.where(self.frozen_entries[name], value, params[name]))

    def state_dict(self) -> dict:
        return {"meter": self.meter.state_dict(), "active": {k: v.clone() for k, v in self.active.items()},
                "mru": {k: v.clone() for k, v in self.mru.items()}, "frozen": dict(self.frozen),
                "frozen_masks": dict(self.frozen_masks), "history": list(self.history),
                "omega_cost": getattr(self.iee, "omega_cost", 0.0)}

    def load_state_dict(self, state: dict) -> None:
        self.meter.load_state_dict(state["meter"])
        self.active = {int(k): v.clone() for k, v in state["active"].items()}
        self.mru = {k: v.clone() for k, v in state["mru"].items()}
        self.frozen = {k: v.clone() for k, v in state["frozen"].items()}
        self.frozen_masks = {k: v.clone() for k, v in state["frozen_masks"].items()}
        self.history = list(state["history"])
        self.iee.omega_cost = state["omega_cost"]
        if self.frozen:
            self.frozen_entries = self._frozen_entries(self.sm)
