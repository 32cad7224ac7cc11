"""IEE (papers/iee-enhanced-saliency.md, Algorithm 1): unstructured, N:M and, under a budget,
on channels (the latency-constrained version with the HALP knapsack)."""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from ...config import check_choice
from ...importance import importance_scores, param_table
from ..channel_budget import ChannelBudget, ImportanceMeter, check_channel_criterion
from ..context import MethodContext
from ..criteria import CRITERIA, importance
from ..masking import nm_refill, topk_mask
from ..method import Method, MethodConfig, RunLength, register_method

__all__ = ["ChannelIEE", "IEE", "IEEConfig"]

# budgeted channel counts under `spruce compile`: widths the kernels like (vector width, tensor-core tiles)
COMPILE_ROUND_TO = 8
# where prune-grow cycles end (a fraction of training) unless ``end_fraction`` is given: 3/4 of training
# (§3.1) for unstructured and N:M sparsity; for latency-constrained channels the paper follows HALP's
# scheduler and ends the updates at the 5th of 130 epochs (appendix §3, the training-cost paragraph)
UNSTRUCTURED_END_FRACTION = 0.75
STRUCTURED_END_FRACTION = 5 / 130
# cycles `spruce compile` fits in the update horizon: H = J = Q = horizon / (3 * 3) (a twelfth of the
# run for the 3/4 horizon, as before issue 15)
CYCLES_PER_HORIZON = 3
# the shortest phase (H = J = Q) with which a cycle can start when a run must see one (RunLength.updates_required)
MIN_PHASE = 2


class IEEConfig(MethodConfig):
    """``h``, ``j``, ``q``: steps of Importance Estimation, Accuracy Improvement and Reactivate &
    Explore; ``omega0``: the prune-grow fraction of the active set, decayed by ``decay`` over the
    cycles, which start before ``end_fraction`` of training (None: 3/4 for unstructured and N:M,
    5/130 for channels as the paper's HALP-style schedule; the first cycle always runs);
    ``freeze``: what Reactivate & Explore holds bitwise, the whole active structure
    (``structure``: every parameter and buffer but the reactivated entries, and their optimizer
    state) or only the active sparse weights (``weights``, the rule before issue 15);
    ``criterion``: weight importance.
    With ``structure="channel"`` and a budget: ``channel_criterion``, kept counts a multiple of
    ``round_to``, the initial selection ``init`` (``magnitude``: L1 of the channels' weights, or
    ``random``), the knapsack's cost resolution ``bins`` and the grow's budget ``grow``
    (``psi``: back up to the budget Psi, the paper's R(Theta_K) = Psi after every step; ``omega``:
    Omega^t on top of what the prune kept, the rule before issue 15, see :class:`ChannelIEE`)."""

    name: ClassVar[str] = "iee"
    structures: ClassVar[tuple[str, ...]] = ("unstructured", "n:m", "channel")
    budgeted: ClassVar[bool] = True

    h: int = Field(150, ge=1)
    j: int = Field(150, ge=1)
    q: int = Field(150, ge=1)
    omega0: float = Field(0.3, ge=0, le=1)
    end_fraction: Annotated[float, Field(gt=0, le=1)] | None = None
    decay: Literal["cosine", "constant"] = "cosine"
    freeze: Literal["structure", "weights"] = "structure"
    criterion: str = "magnitude"
    seed: int = Field(0, ge=0)
    channel_criterion: str = "taylor_bn"
    round_to: int = Field(1, ge=1)
    init: Literal["magnitude", "random"] = "magnitude"
    bins: int = Field(1024, ge=16)
    grow: Literal["psi", "omega"] = "psi"

    _criterion = field_validator("criterion")(lambda value: check_choice("criterion", value, CRITERIA))

    @field_validator("channel_criterion")
    @classmethod
    def _channel_criterion(cls, value: str) -> str:
        return check_channel_criterion("iee", value)

    def horizon_fraction(self, structure_kind: str) -> float:
        """The fraction of training before which cycles start: ``end_fraction``, or its default
        for the structure (3/4; 5/130 for channels)."""
        if self.end_fraction is not None:
            return self.end_fraction
        return STRUCTURED_END_FRACTION if structure_kind == "channel" else UNSTRUCTURED_END_FRACTION

    def for_run(self, run: RunLength) -> MethodConfig:
        kind = "channel" if run.structure == "channel" else "unstructured"
        horizon = int(self.horizon_fraction(kind) * run.total_steps)
        phase = max(1, horizon // (3 * CYCLES_PER_HORIZON))
        if run.updates_required and run.total_steps >= 3 * MIN_PHASE:
            # the first prune comes before batch h + 1: h = 1 would put it before the first batch, where
            # no update runs, and a run this short would see no cycle at all
            phase = max(phase, MIN_PHASE)
        defaults: dict[str, Any] = {"h": phase, "j": phase, "q": phase}
        if run.structure == "channel" and run.kernel_widths:
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
    start only before the horizon (``end_fraction``: 3/4 of training, 5/130 for channels),
    the first one always.

    Frozen during Reactivate & Explore (``freeze="structure"``, Algorithm 1's "Theta_K
    frozen"): every parameter and buffer of the model (biases, BatchNorm affine parameters
    and running statistics, excluded layers) except the reactivated entries Theta_P, and
    the attached optimizer's per-entry state (momentum, Adam moments) of everything frozen,
    restored bitwise after every step, so the dense network's gradients neither move Theta_K
    nor reach it later through momentum."""

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
        self.freezer: StructureFreeze | None = None  # freeze="structure": Theta_K during Reactivate & Explore
        self.optimizer: torch.optim.Optimizer | None = None
        self.freeze = config.freeze  # a checkpoint from before the option resumes with its own rule

    def attach(self, optimizer: torch.optim.Optimizer | None) -> None:
        self.optimizer = optimizer  # freeze="structure" holds the optimizer state of Theta_K too

    def horizon(self) -> float:
        """The step before which cycles start (the first cycle always runs)."""
        return self.config.horizon_fraction(self.ctx.structure.kind) * self.ctx.total_steps

    @property
    def period(self) -> int:
        return self.config.h + self.config.j + self.config.q

    def n_cycles(self) -> int:
        return max(1, int(self.horizon()) // self.period)

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
        # a cycle starts only before the horizon (the first one always) and if its grow fits in training
        starts = self.cycle < self.n_cycles() and i <= max(self.horizon(), c.h) and i + c.j + c.q - 1 <= total
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
                if self.freeze == "weights":
                    self.frozen[layer.name] = weight.detach().clone()
                ctx.set_mask(layer, torch.ones_like(active))
            if self.freeze == "structure":
                self.freezer = StructureFreeze(ctx.source, self.explorable(), self.optimizer)
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
        self.freezer = None
        self.budgets.clear()
        self.cycle += 1
        return True

    def explorable(self) -> dict[str, torch.Tensor]:
        """Theta_P during Reactivate & Explore: the pruned entries of each sparse weight (by
        parameter name); everything else is Theta_K."""
        return {f"{layer.name}.weight": ~self.active[layer.name] for layer in self.ctx.layers}

    @torch.no_grad()
    def on_step(self, step: int) -> None:
        if self.channels is not None:
            self.channels.on_step(step)
            return
        if not self.exploring:
            return
        if self.freezer is not None:
            self.freezer.restore(self.optimizer)
            return
        for layer in self.ctx.layers:  # Theta_K stays bitwise frozen whatever the optimizer does
            active = self.active[layer.name]
            weight = layer.module.weight
            weight.copy_(torch.where(active, self.frozen[layer.name], weight))

    def activity(self) -> dict[str, int]:
        """Channel path: knapsack selections after the initial one (prunes and grows) and those
        scored by the zero-gradient fallback; unstructured and N:M: completed cycles."""
        if self.channels is None:
            return {"cycles": self.cycle}
        selections = [h for h in self.channels.history if h["stage"] in ("prune", "grow")]
        return {"selections": len(selections), "importance_fallbacks": self.channels.meter.fallbacks,
                "cycles": self.cycle}

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update(cycle=self.cycle, exploring=self.exploring, budgets=dict(self.budgets),
                     active=dict(self.active), mru=dict(self.mru), frozen=dict(self.frozen), freeze=self.freeze)
        if self.freezer is not None:
            state["freezer"] = self.freezer.state_dict()
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
        # checkpoints from before issue 15 froze only the sparse weights; they resume with that rule
        self.freeze = state.get("freeze", "weights")
        if self.channels is not None and "channels" in state:
            self.channels.load_state_dict(state["channels"])
        self.freezer = None
        if "freezer" in state:
            explorable = self.explorable() if self.channels is None else self.channels.explorable()
            self.freezer = StructureFreeze.from_state(self.ctx.source, explorable, self.optimizer, state["freezer"])


class ChannelIEE:
    """The channel path of the ``iee`` method: its stages (Algorithm 1) on channel groups,
    each prune and grow a knapsack under the budget (appendix §4: Taylor importance on
    BatchNorm). Owned by the :class:`IEE` handler, which keeps the schedule (``stage``,
    ``omega``, ``cycle``): start at the budget Psi; prune with Knapsack(I(Theta_K), R,
    Psi - Omega^t) over the active channels, Reactivate & Explore every pruned channel
    (most-recently-used values, Theta_K frozen bitwise), grow with the knapsack over the pruned
    ones (Knapsack(I(Theta_P), R, Omega^t)) up to Psi: the paper keeps R(Theta_K) = Psi after
    every step (§3.2, "the computational resource budget of the model remains constant"), so
    the grow gets Psi - R(Theta_K), which is Omega^t when the prune landed exactly at
    Psi - Omega^t and more by the prune's slack when channel counts come in steps (a grow of
    only Omega^t loses that slack at every cycle: on ``bench/structured.py``'s CNN, IEE's final
    channels predicted 0.81 of the budget that way, HALP's 0.90; with this rule IEE lands at
    0.88-0.98 and HALP at 0.99)."""

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
            if self.iee.freezer is not None:
                self.iee.freezer.restore(self.iee.optimizer)
            else:
                self._restore_frozen()

    def explorable(self) -> dict[str, torch.Tensor]:
        """Theta_P during Reactivate & Explore, by parameter/buffer name: the masked-out
        entries of each sparse weight and every entry of a pruned channel in any member
        (BatchNorm parameters and running statistics, biases)."""
        tensors = {**dict(self.ctx.source.named_parameters()), **dict(self.ctx.source.named_buffers())}
        entries = {f"{layer.name}.weight": ~self.frozen_masks[layer.name] for layer in self.ctx.layers}
        for unit in self.ctx.units:
            pruned = ~self.active[unit.group.id].numpy()
            if not pruned.any():
                continue
            for member in unit.group.members:
                tensor = tensors.get(member.name)
                if tensor is None:
                    continue
                mask = entries.setdefault(member.name, torch.zeros_like(tensor, dtype=torch.bool))
                index = torch.as_tensor(member.index[pruned].reshape(-1), device=mask.device)
                mask.index_fill_(member.dim, index, True)
        return entries

    @torch.no_grad()
    def update(self, step: int, stage: str) -> bool:
        ctx, iee = self.ctx, self.iee
        psi = self.costs.target
        if stage == "prune":
            # the prune goes to Psi - Omega^t, but never below the smallest cost reachable within Theta_K:
            # under a tight latency budget (0.5 on an 8x8 CNN whose smallest configuration measured 0.37 of dense)
            # Psi - Omega^t fell below it and the knapsack raised InfeasibleBudget at the first prune
            candidates = {gid: mask.numpy().copy() for gid, mask in self.active.items()}
            budget = max(psi - iee.omega() * psi, self.costs.floor(candidates))
            omega = psi - budget
            before = {layer.name: layer.masked.mask.clone() for layer in ctx.layers}
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
            if iee.freeze == "structure":
                iee.freezer = StructureFreeze(ctx.source, self.explorable(), iee.optimizer)
            else:
                self.frozen = self._snapshot()
            ChannelBudget.apply(ctx, {u.group.id: np.arange(u.group.size) for u in ctx.units})
            budget, selection = psi - iee.omega_cost, None
        else:  # grow: back to Psi, the paper's invariant R(Theta_K) = Psi after every IEE step (§3.2)
            # Knapsack(I(Theta_P), R, Omega^t) on top of Theta_K is this budget when the prune's knapsack
            # landed exactly at Psi - Omega^t; where channel counts come in steps it lands below, and
            # growing only Omega^t back would lose that slack again at every cycle.
            budget = psi if iee.config.grow == "psi" else min(psi, self.active_cost() + iee.omega_cost)
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
            iee.freezer = None
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


class StructureFreeze:
    """Theta_K held bitwise during Reactivate & Explore: a snapshot, taken when exploring
    starts, of every parameter and buffer of ``model`` and of the ``optimizer``'s per-entry
    state of every parameter (tensors of the parameter's shape: momentum, Adam moments),
    restored by :meth:`restore` after every optimizer step except at the entries
    ``explorable`` names (Theta_P, by parameter/buffer name). Scalar optimizer state (Adam's
    step count) is per tensor and not held."""

    def __init__(self, model: torch.nn.Module, explorable: dict[str, torch.Tensor],
                 optimizer: torch.optim.Optimizer | None, saved: dict | None = None):
        self.tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        unknown = set(explorable) - set(self.tensors)
        if unknown:
            raise KeyError(f"iee: no parameter or buffer named {sorted(unknown)} in the model")
        self.keep = {name: ~mask for name, mask in explorable.items()}  # None: all of it frozen
        if saved is None:
            self.values = {name: t.detach().clone() for name, t in self.tensors.items()}
            self.optimizer_state = {name: {key: value.clone() for key, value in state.items()}
                                    for name, state in self._optimizer_states(optimizer).items()}
        else:
            self.values = {name: v.clone() for name, v in saved["values"].items()}
            self.optimizer_state = {name: {k: v.clone() for k, v in st.items()}
                                    for name, st in saved["optimizer"].items()}

    @classmethod
    def from_state(cls, model: torch.nn.Module, explorable: dict[str, torch.Tensor],
                   optimizer: torch.optim.Optimizer | None, state: dict) -> StructureFreeze:
        """The freeze :meth:`state_dict` saved, on ``model`` (a resumed run)."""
        return cls(model, explorable, optimizer, saved=state)

    def _optimizer_states(self, optimizer: torch.optim.Optimizer | None) -> dict[str, dict[str, torch.Tensor]]:
        """The optimizer's per-entry state tensors of each parameter, by parameter name."""
        if optimizer is None:
            return {}
        states = {}
        for name, tensor in self.tensors.items():
            state = optimizer.state.get(tensor) if isinstance(tensor, torch.nn.Parameter) else None
            if state:
                held = {key: value for key, value in state.items()
                        if torch.is_tensor(value) and value.shape == tensor.shape}
                if held:
                    states[name] = held
        return states

    @torch.no_grad()
    def restore(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Put Theta_K (and its state in ``optimizer``) back to the snapshot; Theta_P keeps training."""
        for name, tensor in self.tensors.items():
            self._put(tensor, self.values[name], self.keep.get(name))
        current = self._optimizer_states(optimizer)
        for name, saved in self.optimizer_state.items():
            for key, value in saved.items():
                if key in current.get(name, {}):
                    self._put(current[name][key], value, self.keep.get(name))

    @staticmethod
    def _put(tensor: torch.Tensor, value: torch.Tensor, keep: torch.Tensor | None) -> None:
        if keep is None:
            tensor.copy_(value)
        else:
            tensor.copy_(torch.where(keep.to(tensor.device), value, tensor))

    def state_dict(self) -> dict:
        return {"values": dict(self.values), "optimizer": {k: dict(v) for k, v in self.optimizer_state.items()}}
