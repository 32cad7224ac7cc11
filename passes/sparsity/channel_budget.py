"""What the budgeted channel methods (HALP, IEE with ``structure="channel"``) share: the cost
model of a channel-structured model under its budget, and channel importance summed over steps.

Both choose channels with the knapsack of :mod:`spruce.passes.sparsity.knapsack` under a
budget that is a fraction of the dense model's cost (``{"latency": 0.5}`` with a
:class:`~spruce.runtime.profile.LatencyTable`, or ``{"flops": f}`` / ``{"params": f}``).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ..config import check_choice
from ..importance import GRADIENT_FALLBACK, IMPORTANCE, importance_scores, param_table
from .channels import expand_channel_masks
from .context import MethodContext
from .knapsack import InfeasibleBudget, Selection, build_cost_model, minimum_cost, minimum_kept, select_channels

__all__ = ["ChannelBudget", "ImportanceMeter", "check_channel_criterion"]


class ChannelBudget:
    """The cost model of a channel-structured model and its budget Psi. ``min_keep``: the
    fraction of every group's channels each selection keeps at least (:meth:`required`)."""

    def __init__(self, ctx: MethodContext, method: str, round_to: int = 1, bins: int = 1024,
                 min_keep: float = 0.0):
        if ctx.structure.kind != "channel":
            raise ValueError(f"{method}: a cost budget selects channels: use structure='channel'")
        if ctx.budget is None:
            raise ValueError(f"{method} with structure='channel' needs a budget: sparsify(..., "
                             "budget={'latency': f}, latency_table=spruce.profile(...)) or {'flops': f} / "
                             "{'params': f}, f a fraction of the dense model")
        self.budget = ctx.budget
        table = ctx.latency_table
        self.cost = build_cost_model(self.budget.kind, ctx.source, ctx.analysis, [u.group.id for u in ctx.units],
                                     table)
        self.dense = self.cost.dense()
        self.target = self.budget.fraction * self.dense  # Psi, in the cost model's unit
        self.sample = int(getattr(table, "step", 1)) if self.budget.kind == "latency" else 1
        self.round_to, self.bins, self.min_keep = round_to, bins, min_keep
        whole = [f"group{u.group.id} ({u.group.size} channels)" for u in ctx.units if u.group.size <= round_to]
        if whole:  # kept counts are multiples of round_to or the whole group: these cannot shrink
            warnings.warn(f"{method}: round_to={round_to} is not below the size of {len(whole)} channel group(s), "
                          f"which therefore keep all their channels: {', '.join(whole)}", stacklevel=3)
        sizes = {gid: np.zeros(size) for gid, size in self.cost.sizes.items()}
        floor = minimum_cost(self.cost, round_to, self.sample, required=self.required(sizes))
        if floor > self.target:
            raise InfeasibleBudget(
                f"{method}: no channel configuration meets the budget {self.budget.kind}={self.budget.fraction:g} "
                f"({self.target:.6g} {self.cost.unit}): the smallest reachable {self.budget.kind} is {floor:.6g} "
                f"{self.cost.unit} ({floor / self.dense:.1%} of dense)"
                + (f" with kept counts multiples of round_to={round_to}" if round_to > 1 else "")
                + (f" and every group keeping min_keep={min_keep:g} of its channels" if min_keep > 0 else ""), floor)

    def required(self, importance: dict[int, np.ndarray], candidates: dict[int, np.ndarray] | None = None
                 ) -> dict[int, np.ndarray] | None:
        """The channels a selection must keep (``required`` of :func:`select_channels`): in every
        group the ``min_keep`` fraction of its channels (rounded up to ``round_to``) with the
        highest ``importance`` among its ``candidates`` (fewer when fewer are candidates); None
        when ``min_keep`` is 0."""
        if self.min_keep <= 0:
            return None
        return minimum_kept(importance, self.min_keep, self.round_to, candidates)

    def floor(self, candidates: dict[int, np.ndarray] | None = None) -> float:
        """The smallest reachable cost choosing among ``candidates[g]`` (bool per channel; all
        channels by default): a method's intermediate budgets stay at or above it."""
        return minimum_cost(self.cost, self.round_to, self.sample, candidates=candidates)

    @staticmethod
    def counts(ctx: MethodContext) -> dict[int, int]:
        return {u.group.id: int(u.mask.sum()) for u in ctx.units}

    def current(self, ctx: MethodContext) -> float:
        """Predicted cost of the channels the masks keep now."""
        return self.cost.cost(self.counts(ctx))

    def select(self, ctx: MethodContext, importance: dict[int, np.ndarray], budget: float,
               candidates: dict[int, np.ndarray] | None = None,
               required: dict[int, np.ndarray] | None = None, start: dict[int, int] | None = None) -> Selection:
        """The knapsack's choice under ``budget`` (see :func:`select_channels`), linearised
        first at ``start`` (default: the current kept counts)."""
        return select_channels(self.cost, importance, budget, candidates=candidates, required=required,
                               round_to=self.round_to, bins=self.bins, sample=self.sample,
                               start=self.counts(ctx) if start is None else start)

    @staticmethod
    def apply(ctx: MethodContext, kept: dict[int, np.ndarray]) -> None:
        """Set every unit's mask to its ``kept`` channels (one weight-mask expansion)."""
        for unit in ctx.units:
            mask = torch.zeros(unit.group.size, dtype=torch.bool)
            mask[torch.as_tensor(kept[unit.group.id], dtype=torch.long)] = True
            unit.mask.copy_(mask)
        expand_channel_masks(ctx.units, ctx.layers)


class ImportanceMeter:
    """Channel importance of every unit summed over steps (HALP averages it between updates).

    A gradient criterion (``taylor``, ``taylor_bn``) whose summed scores are exactly zero in
    every unit carries no signal: the loss had no gradient, as at the start of distillation,
    where the student equals its teacher. :meth:`mean` then scores the channels by the
    criterion's fallback (:data:`~spruce.passes.importance.GRADIENT_FALLBACK`: BatchNorm
    ``|gamma|`` for ``taylor_bn``, L1 magnitude for ``taylor``), computed from the weights as
    they are then, and counts it in ``fallbacks``; otherwise the knapsack would choose among
    ties. A signal in any unit is used as is (zero scores elsewhere are a real signal)."""

    def __init__(self, criterion: str, seed: int = 0):
        self.criterion = criterion
        self.fallback = GRADIENT_FALLBACK.get(criterion)
        self.rng = np.random.default_rng(seed)
        self.total: dict[int, np.ndarray] = {}
        self.steps = 0
        self.fallbacks = 0  # selections scored by the fallback (no gradient signal)

    def add(self, ctx: MethodContext) -> None:
        params = param_table(ctx.source)
        for unit in ctx.units:
            score = importance_scores(self.criterion, unit.group, params, self.rng)
            gid = unit.group.id
            self.total[gid] = self.total.get(gid, 0.0) + score
        self.steps += 1

    def mean(self, ctx: MethodContext) -> dict[int, np.ndarray]:
        """Average importance since the last :meth:`reset` (scored now if no step was seen),
        or the fallback's scores when a gradient criterion saw no gradient at all."""
        if self.steps == 0:
            self.add(ctx)
        scores = {gid: total / self.steps for gid, total in self.total.items()}
        if self.fallback is not None and scores and not any(np.any(s != 0) for s in scores.values()):
            self.fallbacks += 1
            params = param_table(ctx.source)
            return {u.group.id: importance_scores(self.fallback, u.group, params, self.rng) for u in ctx.units}
        return scores

    def reset(self) -> None:
        self.total, self.steps = {}, 0

    def state_dict(self) -> dict:
        return {"total": {k: v.copy() for k, v in self.total.items()}, "steps": self.steps,
                "rng": self.rng.bit_generator.state, "fallbacks": self.fallbacks}

    def load_state_dict(self, state: dict) -> None:
        self.total = {int(k): np.asarray(v) for k, v in state["total"].items()}
        self.steps = state["steps"]
        self.rng.bit_generator.state = state["rng"]
        self.fallbacks = state.get("fallbacks", 0)  # checkpoints from before the fallback


def check_channel_criterion(method: str, criterion: str) -> str:
    """``criterion`` when it names a channel criterion (:data:`~spruce.passes.importance.IMPORTANCE`)."""
    return check_choice("channel criterion", criterion, IMPORTANCE, prefix=f"{method}: ")
