"""HALP (Shen et al.): iterative latency-constrained channel pruning with a knapsack.

Start dense; every ``interval`` steps prune, among the still-active channels, to a budget
that decreases from dense to the target (exponentially by default), so the last pruning
step meets the target. Channels are scored with Taylor importance on BatchNorm,
``|g_gamma * gamma + g_beta * beta|`` (appendix §4 of papers/iee-enhanced-saliency.md),
averaged over the steps between updates. Pruned channels never come back. Every channel
group keeps at least ``min_keep`` of its channels (its most important active ones), the floor
``spruce compile`` puts under its own selections (the recipe's ``min_keep``). Export the
result with :meth:`SparseModel.compact` (physical channel removal).

Why the floor (issue 30, set-up C: AdamW on a 1-16-32-64 CNN under latency 0.5): the Taylor
score of one channel is the loss change of removing that channel alone, so the knapsack, paid
little latency for the first convolution's channels, cut it to 2-4 of its 16 channels in four
of five seeds (to 3 in the seed that ended 3.6 points below dense; that seed with 8 kept:
0.972 against 0.950).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from ..channel_budget import ChannelBudget, ImportanceMeter, check_channel_criterion
from ..knapsack import DEFAULT_MIN_KEEP
from ..method import Method, MethodConfig, RunLength, register_method

__all__ = ["HALP", "HALPConfig"]

# Under `spruce compile`: 20 pruning intervals per run, kept counts multiples of 8
INTERVALS_PER_RUN = 20
COMPILE_ROUND_TO = 8


class HALPConfig(MethodConfig):
    """``interval``: steps between pruning steps (importance averaged over them);
    ``end_fraction``: pruning ends by this fraction of training; ``schedule``: how the
    budget falls from dense to the target over the pruning steps (``exponential`` or
    ``linear``); ``round_to``: kept channel counts are multiples of it; ``bins``: knapsack
    cost resolution; ``min_keep``: every channel group keeps at least this fraction of its
    channels (rounded up to a multiple of ``round_to``; 0 leaves the knapsack free)."""

    name: ClassVar[str] = "halp"
    structures: ClassVar[tuple[str, ...]] = ("channel",)
    budgeted: ClassVar[bool] = True

    interval: int = Field(100, ge=1)
    end_fraction: float = Field(0.5, gt=0, le=1)
    schedule: Literal["exponential", "linear"] = "exponential"
    criterion: str = "taylor_bn"
    round_to: int = Field(1, ge=1)
    bins: int = Field(1024, ge=16)
    seed: int = Field(0, ge=0)
    min_keep: float = Field(DEFAULT_MIN_KEEP, ge=0, le=1)

    @field_validator("criterion")
    @classmethod
    def _channel_criterion(cls, value: str) -> str:
        return check_channel_criterion("halp", value)

    def for_run(self, run: RunLength) -> MethodConfig:
        defaults: dict[str, Any] = {"interval": max(1, run.total_steps // INTERVALS_PER_RUN)}
        if run.structure == "channel" and run.kernel_widths:
            defaults["round_to"] = COMPILE_ROUND_TO
        return self.with_defaults(defaults)

    def n_prunes(self, total_steps: int) -> int:
        """Pruning steps in a run of ``total_steps``: one every ``interval`` steps before
        ``end_fraction`` of it."""
        return int(self.end_fraction * total_steps) // self.interval

    def check_fits(self, run: RunLength) -> None:
        if self.n_prunes(run.total_steps) < 1:
            horizon = self.end_fraction * run.total_steps
            fixes = (["lower interval"] if self.interval > 1 else []) \
                + (["raise end_fraction"] if self.end_fraction < 1 else []) + ["train longer"]
            advice = ", ".join(fixes[:-1]) + (" or " if len(fixes) > 1 else "") + fixes[-1]
            raise ValueError(f"halp: no pruning step fits: interval={self.interval} is longer than end_fraction x "
                             f"total_steps = {self.end_fraction:g} x {run.total_steps} = {horizon:g}; {advice}")


@register_method(HALPConfig)
class HALP(Method):
    """HALP: iterative latency-constrained channel pruning with a knapsack (see module doc).

    Invariant: after the ``s``-th pruning step the predicted cost is at most
    :meth:`budget_after` ``(s)``; the last one is the target Psi."""

    def __init__(self, config: HALPConfig):
        super().__init__(config)
        self.meter = ImportanceMeter(config.criterion, config.seed)
        self.prunes_done = 0
        self.n_prunes = 0
        self.history: list[dict[str, Any]] = []

    def set_initial_masks(self) -> None:
        ctx = self.ctx
        self.costs = ChannelBudget(ctx, "halp", self.config.round_to, self.config.bins, self.config.min_keep)
        self.config.check_fits(RunLength(ctx.total_steps))  # sparsify checked it already
        self.n_prunes = self.config.n_prunes(ctx.total_steps)
        for unit in ctx.units:
            unit.mask.fill_(True)
        ChannelBudget.apply(ctx, {u.group.id: np.arange(u.group.size) for u in ctx.units})

    def budget_after(self, prunes: int) -> float:
        """The cost budget once ``prunes`` pruning steps are done (dense at 0)."""
        fraction = self.costs.budget.fraction
        s = min(max(prunes, 0), self.n_prunes) / self.n_prunes
        if self.config.schedule == "linear":
            return self.costs.dense * (1.0 - (1.0 - fraction) * s)
        return self.costs.dense * fraction ** s

    def on_step(self, step: int) -> None:
        if self.prunes_done < self.n_prunes:
            self.meter.add(self.ctx)

    def is_update(self, step: int) -> bool:
        return step % self.config.interval == 0 and step // self.config.interval <= self.n_prunes

    @torch.no_grad()
    def update(self, step: int) -> bool:
        ctx = self.ctx
        budget = self.budget_after(self.prunes_done + 1)
        if self.prunes_done + 1 == self.n_prunes:
            budget = self.costs.target  # the last step lands on Psi exactly, not a rounding of it
        active = {u.group.id: u.mask.numpy().copy() for u in ctx.units}
        importance = self.meter.mean(ctx)
        selection = self.costs.select(ctx, importance, budget, candidates=active,
                                      required=self.costs.required(importance, active))
        for layer in ctx.layers:
            layer.after_prune = None
        ChannelBudget.apply(ctx, selection.kept)
        self.meter.reset()
        self.prunes_done += 1
        self.history.append({"step": step, "budget": budget, "cost": selection.cost})
        return True

    def activity(self) -> dict[str, int]:
        """Pruning steps run (each a knapsack selection) and those scored by the fallback."""
        return {"selections": len(self.history), "importance_fallbacks": self.meter.fallbacks}

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update(meter=self.meter.state_dict(), prunes_done=self.prunes_done, history=list(self.history))
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.meter.load_state_dict(state["meter"])
        self.prunes_done = state["prunes_done"]
        self.history = list(state["history"])
