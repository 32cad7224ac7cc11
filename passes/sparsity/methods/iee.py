"""IEE (papers/iee-enhanced-saliency.md, Algorithm 1): unstructured, N:M and, under a budget,
on channels (the latency-constrained version with the HALP knapsack)."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from ...importance import importance_scores, param_table
from ..channel_budget import ChannelBudget, ImportanceMeter, check_channel_criterion
from ..context import MethodContext
from ..criteria import CRITERIA, importance
from ..masking import nm_refill, topk_mask
from ..method import Method, MethodConfig, RunLength, register_method

__all__ = ["ChannelIEE", "IEE", "IEEConfig"]

# IEE's H = J = Q default under `spruce compile`: a twelfth of the run (the paper's 150 each
# assume far longer runs than a compile recipe's)
PHASES_PER_RUN = 12
# budgeted channel counts under `spruce compile`: widths the kernels like (vector width, tensor-core tiles)
COMPILE_ROUND_TO = 8


class IEEConfig(MethodConfig):
    """``h``, ``j``, ``q``: steps of Importance Estimation, Accuracy Improvement and Reactivate &
    Explore; ``omega0``: the prune-grow fraction of the active set, decayed by ``decay`` over the
    cycles, which start before ``end_fraction`` of training; ``criterion``: weight importance.
    With ``structure="channel"`` and a budget: ``channel_criterion``, kept counts a multiple of
    ``round_to``, the initial selection ``init`` (``magnitude``: L1 of the channels' weights, or
    ``random``) and the knapsack's cost resolution ``bins``."""

    name: ClassVar[str] = "iee"
    structures: ClassVar[tuple[str, ...]] = ("unstructured", "n:m", "channel")
    budgeted: ClassVar[bool] = True

    h: int = Field(150, ge=1)
    j: int = Field(150, ge=1)
    q: int = Field(150, ge=1)
    omega0: float = Field(0.3, ge=0, le=1)
    end_fraction: float = Field(0.75, gt=0, le=1)
    decay: Literal["cosine", "constant"] = "cosine"
    criterion: str = "magnitude"
    seed: int = Field(0, ge=0)
    channel_criterion: str = "taylor_bn"
    round_to: int = Field(1, ge=1)
    init: Literal["magnitude", "random"] = "magnitude"
    bins: int = Field(1024, ge=16)

    @field_validator("criterion")
    @classmethod
    def _weight_criterion(cls, value: str) -> str:
        if value not in CRITERIA:
            raise ValueError(f"unknown criterion {value!r}; valid: {', '.join(sorted(CRITERIA))}")
        return value

    @field_validator("channel_criterion")
    @classmethod
    def _channel_criterion(cls, value: str) -> str:
        return check_channel_criterion("iee", value)

    def for_run(self, run: RunLength) -> MethodConfig:
        phase = max(1, run.total_steps // PHASES_PER_RUN)
        defaults: dict[str, Any] = {"h": phase, "j": phase, "q": phase}
        if run.structure == "channel":
            defaults["round_to"] = COMPILE_ROUND_TO
        return self.with_defaults(defaults)


@register_method(IEEConfig)
class IEE(Method):
    """IEE (Algorithm 1 of papers/iee-enhanced-saliency.md): unstructured or N:M with magnitude
    importance; with structure="channel" and a budget, the latency-constrained version
    (:class:`ChannelIEE`: Taylor-BN importance, knapsack prune/grow).

    Cycles of dT = H + J + Q steps: Importance Estimation (H) -> Prune ArgTopK(-I(K), Omega^t)
    -> Accuracy Improvement (J) -> Reactivate & Explore (Q steps: every pruned weight P comes
    back with its most-recently-used value and trains while K is frozen bitwise) -> Grow
    ArgTopK(I(P), Omega^t). Omega^0 = 0.3 of the active set, decayed by a cosine; cycles
    start only before ``end_fraction`` of training."""

    def __init__(self, config: IEEConfig):
        super().__init__(config)
        self.channels: ChannelIEE | None = None  # the channel path of structure="channel"
        self.cycle = 0  # t in Algorithm 1
        self.exploring = False  # flag in Algorithm 1
        self.budgets: dict[str, int] = {}  # Omega^t of the running cycle, per layer
        self.omega_cost = 0.0  # Omega^t in cost units (channel path)
        self.active: dict[str, torch.Tensor] = {}  # Theta_K per layer
        self.mru: dict[str, torch.Tensor] = {}  # most recently used value of every weight
        self.frozen: dict[str, torch.Tensor] = {}  # values of Theta_K during Reactivate & Explore

    @property
    def period(self) -> int:
        return self.config.h + self.config.j + self.config.q

    def n_cycles(self) -> int:
        return max(1, int(self.config.end_fraction * self.ctx.total_steps) // self.period)

    def omega(self) -> float:
        """Omega^t as a fraction of the active set."""
        if self.config.decay == "constant":
            return self.config.omega0
        return self.config.omega0 / 2 * (1 + math.cos(math.pi * self.cycle / self.n_cycles()))

    def stage(self, step: int) -> str | None:
        """What happens before training batch ``step + 1`` (Algorithm 1's index i)."""
        i = step + 1
        c = self.config
        total = self.ctx.total_steps
        # a cycle starts only before end_fraction of training and if its grow fits in training
        starts = self.cycle < self.n_cycles() and i <= c.end_fraction * total and i + c.j + c.q - 1 <= total
        if (i + c.j + c.q) % self.period == 0 and starts:
            return "prune"
        if self.budgets and (i + c.q) % self.period == 0:
            return "explore"
        if self.budgets and i % self.period == 0:
            return "grow"
        return None

    def set_initial_masks(self) -> None:
        ctx = self.ctx
        if ctx.structure.kind == "channel":
            self.channels = ChannelIEE(self, ctx)
            return
        if ctx.budget is not None:
            raise ValueError("iee: a cost budget selects channels: use structure='channel' (unstructured and N:M "
                             "IEE take sparsity=)")
        super().set_initial_masks()
        for layer in ctx.layers:
            self.mru[layer.name] = layer.module.weight.detach().clone()
            self.active[layer.name] = layer.masked.mask.clone()

    def is_update(self, step: int) -> bool:
        return self.stage(step) is not None

    def completes_update(self, step: int) -> bool:
        return self.stage(step) == "grow"

    @torch.no_grad()
    def update(self, step: int) -> bool:
        stage = self.stage(step)
        if self.channels is not None:
            return self.channels.update(step, stage)
        ctx = self.ctx
        if stage == "prune":
            fraction = self.omega()
            for layer in ctx.layers:
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
                ctx.set_mask(layer, self.active[layer.name])
            return True
        if stage == "explore":
            self.exploring = True
            for layer in ctx.layers:
                active = self.active[layer.name]
                weight = layer.module.weight
                weight.copy_(torch.where(active, weight, self.mru[layer.name]))  # Theta_P from MRU
                self.frozen[layer.name] = weight.detach().clone()
                ctx.set_mask(layer, torch.ones_like(active))
            return True
        # grow
        for layer in ctx.layers:
            active = self.active[layer.name]
            weight = layer.module.weight
            saliency = importance(self.config.criterion, layer)
            scores = torch.where(active, torch.full_like(saliency, -math.inf), saliency)
            if ctx.structure.kind == "n:m":  # refill every group of M to exactly N
                grown = nm_refill(active, scores, ctx.structure.n, ctx.structure.m, layer.in_dim)
            else:
                grown = topk_mask(scores, self.budgets[layer.name])
            still_pruned = ~(active | grown)
            self.mru[layer.name][still_pruned] = weight[still_pruned]
            self.active[layer.name] = active | grown
            layer.grown = grown
            ctx.set_mask(layer, self.active[layer.name])
        self.exploring = False
        self.frozen.clear()
        self.budgets.clear()
        self.cycle += 1
        return True

    @torch.no_grad()
    def on_step(self, step: int) -> None:
        if self.channels is not None:
            self.channels.on_step(step)
            return
        if not self.exploring:
            return
        for layer in self.ctx.layers:  # Theta_K stays bitwise frozen whatever the optimizer does
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


class ChannelIEE:
    """The channel path of the ``iee`` method: its stages (Algorithm 1) on channel groups,
    each prune and grow a knapsack under the budget (appendix §4: Taylor importance on
    BatchNorm). Owned by the :class:`IEE` handler, which keeps the schedule (``stage``,
    ``omega``, ``cycle``): start at the budget Psi; prune with Knapsack(I(Theta_K), R,
    Psi - Omega^t) over the active channels, Reactivate & Explore every pruned channel
    (most-recently-used values, Theta_K frozen bitwise), grow with Knapsack(I(Theta_P), R,
    Omega^t) over the pruned ones."""

    def __init__(self, iee: IEE, ctx: MethodContext):
        config = iee.config
        self.iee = iee
        self.ctx = ctx
        self.costs = ChannelBudget(ctx, "iee", config.round_to, config.bins)
        self.meter = ImportanceMeter(config.channel_criterion, config.seed)
        self.history: list[dict[str, Any]] = []
        # Theta_K: initialised at Psi by the knapsack on the initial importance
        if config.init == "random":
            rng = torch.Generator().manual_seed(config.seed)
            scores = {u.group.id: torch.rand(u.group.size, generator=rng).numpy() for u in ctx.units}
        else:
            params = param_table(ctx.source)
            scores = {u.group.id: importance_scores("l1", u.group, params, np.random.default_rng(0))
                      for u in ctx.units}
        for unit in ctx.units:
            unit.mask.fill_(True)
        selection = self.costs.select(ctx, scores, self.costs.target)
        ChannelBudget.apply(ctx, selection.kept)
        self.active = {u.group.id: u.mask.clone() for u in ctx.units}
        self.mru = {layer.name: layer.module.weight.detach().clone() for layer in ctx.layers}
        self.frozen: dict[str, torch.Tensor] = {}
        self.frozen_masks: dict[str, torch.Tensor] = {}
        self.frozen_entries: dict[str, torch.Tensor] = {}
        self.history.append({"step": 0, "stage": "init", "budget": self.costs.target, "cost": selection.cost})

    def active_cost(self) -> float:
        """Predicted cost of Theta_K (the active channels, whatever the masks during exploring)."""
        return self.costs.cost.cost({gid: int(mask.sum()) for gid, mask in self.active.items()})

    def on_step(self, step: int) -> None:
        self.meter.add(self.ctx)
        if self.iee.exploring:
            self._restore_frozen()

    @torch.no_grad()
    def update(self, step: int, stage: str) -> bool:
        ctx, iee = self.ctx, self.iee
        psi = self.costs.target
        if stage == "prune":
            omega = iee.omega() * psi
            budget = psi - omega
            before = {layer.name: layer.masked.mask.clone() for layer in ctx.layers}
            candidates = {gid: mask.numpy().copy() for gid, mask in self.active.items()}
            selection = self.costs.select(ctx, self.meter.mean(ctx), budget, candidates=candidates)
            ChannelBudget.apply(ctx, selection.kept)
            for layer in ctx.layers:
                dropped = before[layer.name] & ~layer.masked.mask
                self.mru[layer.name][dropped] = layer.module.weight[dropped]
                layer.after_prune = layer.masked.mask.clone()
                layer.grown = torch.zeros_like(layer.masked.mask)
            iee.budgets = {f"group{u.group.id}": int(self.active[u.group.id].sum() - u.mask.sum())
                           for u in ctx.units}
            iee.omega_cost = omega
            self.active = {u.group.id: u.mask.clone() for u in ctx.units}
        elif stage == "explore":
            iee.exploring = True
            self.frozen_masks = {layer.name: layer.masked.mask.clone() for layer in ctx.layers}
            for layer in ctx.layers:  # Theta_P comes back with its most recently used values
                weight = layer.module.weight
                weight.copy_(torch.where(self.frozen_masks[layer.name], weight, self.mru[layer.name]))
            self.frozen = self._snapshot()
            ChannelBudget.apply(ctx, {u.group.id: np.arange(u.group.size) for u in ctx.units})
            budget, selection = psi - iee.omega_cost, None
        else:  # grow
            omega = iee.omega_cost
            budget = min(psi, self.active_cost() + omega)
            required = {gid: mask.numpy().copy() for gid, mask in self.active.items()}
            start = {gid: int(mask.sum()) for gid, mask in self.active.items()}
            selection = self.costs.select(ctx, self.meter.mean(ctx), budget, required=required, start=start)
            ChannelBudget.apply(ctx, selection.kept)
            for layer in ctx.layers:
                mask = layer.masked.mask
                still_pruned = ~mask
                self.mru[layer.name][still_pruned] = layer.module.weight[still_pruned]
                layer.grown = mask & ~self.frozen_masks[layer.name]
            self.active = {u.group.id: u.mask.clone() for u in ctx.units}
            iee.exploring = False
            self.frozen, self.frozen_masks = {}, {}
            iee.budgets = {}
            iee.cycle += 1
        self.meter.reset()
        cost = self.active_cost()
        self.history.append({"step": step, "stage": stage, "budget": budget, "cost": cost})
        return True

    def _frozen_entries(self) -> dict[str, torch.Tensor]:
        """Bool masks of Theta_K over every parameter it covers: the sparse layers' active
        weights and the active channels' entries of 1-D group members (BatchNorm, biases)."""
        params = dict(self.ctx.source.named_parameters())
        entries = {f"{layer.name}.weight": self.frozen_masks[layer.name] for layer in self.ctx.layers}
        for unit in self.ctx.units:
            alive = self.active[unit.group.id].numpy()
            for member in unit.group.members:
                tensor = params.get(member.name)
                if tensor is None or tensor.dim() != 1:
                    continue
                mask = entries.setdefault(member.name, torch.zeros_like(tensor, dtype=torch.bool))
                mask[torch.as_tensor(member.index[alive].reshape(-1))] = True
        return entries

    def _snapshot(self) -> dict[str, torch.Tensor]:
        params = dict(self.ctx.source.named_parameters())
        self.frozen_entries = self._frozen_entries()
        return {name: params[name].detach().clone() for name in self.frozen_entries}

    def _restore_frozen(self) -> None:
        params = dict(self.ctx.source.named_parameters())
        with torch.no_grad():
            for name, value in self.frozen.items():
                params[name].copy_(torch.where(self.frozen_entries[name], value, params[name]))

    def state_dict(self) -> dict:
        return {"meter": self.meter.state_dict(), "active": {k: v.clone() for k, v in self.active.items()},
                "mru": {k: v.clone() for k, v in self.mru.items()}, "frozen": dict(self.frozen),
                "frozen_masks": dict(self.frozen_masks), "history": list(self.history),
                "omega_cost": self.iee.omega_cost}

    def load_state_dict(self, state: dict) -> None:
        self.meter.load_state_dict(state["meter"])
        self.active = {int(k): v.clone() for k, v in state["active"].items()}
        self.mru = {k: v.clone() for k, v in state["mru"].items()}
        self.frozen = {k: v.clone() for k, v in state["frozen"].items()}
        self.frozen_masks = {k: v.clone() for k, v in state["frozen_masks"].items()}
        self.history = list(state["history"])
        self.iee.omega_cost = state["omega_cost"]
        if self.frozen:
            self.frozen_entries = self._frozen_entries()
