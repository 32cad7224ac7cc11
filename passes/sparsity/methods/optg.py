"""OptG (papers/optg-gradient-driven-sparsity.md, Algorithm 1, §3.3-3.4, Eq. 6, 7, 10, 16, 17).

Every sparse weight w_i has a mask score m̂_i (a ``scores`` buffer on its
:class:`~spruce.passes.sparsity.masking.MaskedWeight`, so ``state_dict`` carries it),
starting at 0 (Alg. 1 line 1). The forward uses w ⊙ m with the binary mask m fixed for a
whole epoch; the straight-through estimator of Eq. 7 sends the mask gradient

    ∂L/∂m̂_i ≈ ∂L/∂(m_i ⊙ w_i) · w_i        (dense: pruned weights get one too, Eq. 11)

to the scores, and after every optimizer step the scores take a plain SGD step (Eq. 10)

    m̂_i ← m̂_i − η_m̂,k · ∂L/∂m̂_i,    η_m̂,k = η_w,k / (1 + e^{−α(k − 0.5τ)})   (Eq. 17)

with η_w,k the learning rate the attached optimizer holds for the layer's weight at that
step. At the beginning of every epoch k = 1..τ (Alg. 1 lines 3-4) the mask is re-derived
from the scores by one global sort over all sparse layers (Eq. 6, §3.4): the
round(P_k · N) smallest scores are pruned, P_k = P / (1 + e^{−α(k − 0.5τ)}) (Eq. 16).
That is ``distribution='global'``. With ``'uniform'`` or ``'erk'`` the layer budgets are
fixed instead and each layer sorts its own scores, pruning round(s_l · σ_k · n_l) of its
n_l weights (s_l its final sparsity, σ_k = P_k / P): the budget ablation of §4.4, Tab. 5.

Pruned weights keep their values (w ⊙ m in the forward, not zeroed in storage): the
revival score of Eq. 11 is ∂L/∂(m_i ⊙ w_i) · w_i, so a pruned weight is revived with the
value it had (§4.4: other methods "revive weights to 0s").

The schedule, scaled to the run (deviations from Eq. 16-17 as printed, for runs shorter
than the paper's). The paper uses α = 0.5 over τ = 100-180 epochs: the sigmoid runs from
e^-25 to 1 - e^-25, so the last epoch is at P. Over τ = 12 epochs the same α ends at
0.95 P (85.7 % for a 90 % target). So by default α = 12.5 / τ, in units of the run: the
sparsity rises from 10 % to 90 % of the target over the middle 35 % of training whatever τ
(the largest jump of one derivation is about α P / 4, 5 % of the weights at τ = 50), and the
factor is normalised by its value at
k = τ, σ_k = σ(α(k − 0.5τ)) / σ(0.5 α τ), so the last epoch is at exactly P on any run
length and never below it (the normalisation changes the paper's own schedule by
e^-25). An explicit ``alpha`` is used as given, still normalised.

Why 12.5 and not the paper's α τ = 0.5 · 100 = 50 (its ResNet-50 ImageNet run; spruce's default
before issue 30): that ramp spans 9 % of the run, which on ImageNet is 9 epochs of thousands of
steps, but in issue 30's 280-step loops six derivations five steps apart took the sparsity from
6 % to 84 %. Under Adam (lr 1e-3, set-up B of ``bench/results/own_loop.md``) the training loss
went from 0.1 to 2.9-3.4 there, above the untrained model's 2.3, for about 30 steps (the loss
guard warned on all five seeds), and the runs ended 2.2 points below dense (median; worst 2.8).
With α τ = 12.5: no loss above the start, guard quiet, median 0.6 and worst 1.7 points below
dense; under SGD (set-up A) 0.0 / 0.0 at lr 0.05 and +0.6 / +0.3 at lr 0.01 (were -0.3 / -0.6 and
-0.3 / -1.1). The mask learning
rate of Eq. 17 uses the same σ_k. ``schedule="paper"`` keeps Eq. 16-17 as printed
(α = 0.5 unless given, not normalised; a warning when the last epoch ends below the
target): the behaviour before issue 15, which the golden test pins.

Ties: the first mask is derived from scores that are all 0, and later scores can tie
too: equal scores are ordered by weight magnitude (the larger kept), then by index, so
the first mask keeps the largest weights (magnitude pruning at initialisation) instead
of a random set. ``ties="random"`` orders them at random by the seeded generator (the
behaviour before issue 15).

The epoch length: ``steps_per_epoch`` (a config option, ``len(loader)``; ``spruce
compile`` sets it), or ``sm.attach(optimizer, steps_per_epoch=len(loader))``, or
``sm.attach(optimizer, loader=loader)`` (its ``len``). ``attach`` refuses at once when
none gave it, before the first step (the schedule cannot be known without it; before
issue 30 the first ``end_epoch()`` could give it, and a run without it stopped halfway).
"""

from __future__ import annotations

import math
import warnings
from typing import Annotated, ClassVar, Literal

import torch
from pydantic import Field

from ..layers import SparseLayer
from ..masking import WEIGHT_FNS, MaskedWeight, global_topk_masks
from ..method import Method, MethodConfig, RunLength, register_method

__all__ = ["OptGConfig", "OptG", "ALPHA_TAU"]

# the default α is this / τ: the ramp spans the middle 35 % of the run (the paper's ResNet-50 run,
# α = 0.5 over τ = 100 epochs, is 50: 9 % of it; too steep for a short run, see the module doc)
ALPHA_TAU = 12.5
# a run of fewer epochs than this re-derives its mask this many times instead (mask_period=None, schedule="run")
MIN_PERIODS = 50


class _MaskSTE(torch.autograd.Function):
    """w ⊙ m forward; backward gives the weight ∂L/∂(w⊙m) ⊙ m and accumulates the Eq. 7 mask
    gradient ∂L/∂(w⊙m) ⊙ w (dense) into ``owner.score_grad``."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, mask: torch.Tensor, owner: MaskedWeight) -> torch.Tensor:
        ctx.save_for_backward(weight, mask)
        ctx.owner = owner
        return weight * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, mask = ctx.saved_tensors
        owner = ctx.owner
        score_grad = (grad * weight).float()
        owner.score_grad = score_grad if owner.score_grad is None else owner.score_grad + score_grad
        return grad * mask, None, None


WEIGHT_FNS["optg"] = lambda mod, w: _MaskSTE.apply(w, mod.mask, mod)


def _sigmoid(z: float) -> float:
    """1 / (1 + e^{-z}) without overflow for long schedules."""
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


class OptGConfig(MethodConfig):
    """``steps_per_epoch``: optimizer steps in one epoch: the mask is re-derived once per epoch
    and τ = ceil(total_steps / steps_per_epoch). Under ``spruce compile`` it is the training
    loader's length; without it, ``sm.attach(optimizer, steps_per_epoch=...)`` (or
    ``loader=``) gives it, and ``attach`` refuses a run that has none. ``alpha``: the slope α
    of the sigmoid in Eq. 16-17; None (the default) scales it to the run, α = 12.5 / τ (the
    ramp over the middle 35 % of the run; the paper's α = 0.5 over τ = 100 epochs is 50 / τ,
    see the module doc); the factor is normalised so the last epoch is at the target.
    ``schedule="paper"``: Eq. 16-17 as printed (α = 0.5 unless given, not normalised). ``ties``:
    how equal scores are ordered when the mask is derived, by weight magnitude (default) or at
    random (``seed``). ``mask_period``: steps between mask
    derivations: ``"epoch"`` (Algorithm 1); None (the default) the epoch on a run of at least
    ``MIN_PERIODS`` (50) epochs and with ``schedule="paper"``, else ``total_steps // 50`` steps (at
    most an epoch), so a short run's mask follows the sigmoid in 50 steps as the paper's runs
    (100+ epochs) do, where τ and the epoch of Eq. 16-17 count these periods (a deviation:
    derived once per epoch, a 10-epoch run went from 0.6 % to 45 % to 89 % sparsity in two
    derivations and the test accuracy of the digits CNN fell from 0.85 to 0.30 at the first;
    it ended 4.5 points below the period of 5 steps's, see ``bench/results/own_loop.md``); an
    integer: that many steps."""

    name: ClassVar[str] = "optg"
    structures: ClassVar[tuple[str, ...]] = ("unstructured",)
    needs: ClassVar[tuple[str, ...]] = ("total_steps", "steps_per_epoch")

    steps_per_epoch: int | None = Field(None, ge=1)
    alpha: Annotated[float, Field(gt=0)] | None = None
    schedule: Literal["run", "paper"] = "run"
    ties: Literal["magnitude", "random"] = "magnitude"
    mask_period: Annotated[int, Field(ge=1, strict=True)] | Literal["epoch"] | None = None

    def for_run(self, run: RunLength) -> MethodConfig:
        return self.with_defaults({"steps_per_epoch": run.steps_per_epoch}) if run.steps_per_epoch else self

    def check_run(self, total_steps: int | None) -> None:
        super().check_run(total_steps)
        if self.steps_per_epoch is not None and self.steps_per_epoch > total_steps:
            raise ValueError(f"optg: steps_per_epoch ({self.steps_per_epoch}) exceeds total_steps "
                             f"({total_steps}): training must span at least one epoch")


@register_method(OptGConfig)
class OptG(Method):
    """OptG (Zhang et al. 2022): supermask scores trained by STE every step, one global sort
    per epoch, sigmoid sparsity (Eq. 16) and mask learning rate (Eq. 17) schedules scaled to
    the run (see the module doc).

    ``distribution='global'`` is OptG as in §3.4 (one sort decides the layer budgets);
    ``'uniform'``/``'erk'`` fix the layer budgets (Tab. 5). Needs unstructured sparsity,
    ``total_steps`` and an attached optimizer. Invariant: during epoch k exactly
    round(P σ_k · N) of the N sparse weights are masked, N counted over all layers (over each
    layer, with its own final sparsity, for fixed budgets), σ_τ = 1, and the mask changes
    only at epoch boundaries."""

    keeps_pruned_weights = True

    def __init__(self, config: OptGConfig):
        super().__init__(config)
        self.epoch = 1  # k of Algorithm 1: the epoch the current mask belongs to
        self.optimizer: torch.optim.Optimizer | None = None
        self.learned_steps_per_epoch: int | None = None  # from attach (steps_per_epoch= or a loader's len)

    def attach(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Keep the optimizer (Eq. 17: the mask learning rate follows the weights'); raises
        ``ValueError`` when the epoch length is still unknown (no step has run yet)."""
        self.check_epoch_length()
        self.optimizer = optimizer

    def check_epoch_length(self) -> None:
        """``ValueError`` naming the three ways to give the epoch length when none did."""
        if self.steps_per_epoch is None:
            raise ValueError("optg: the epoch length is unknown, so the sparsity schedule cannot be set: pass "
                             "steps_per_epoch=len(loader) to sparsify, or sm.attach(optimizer, "
                             "steps_per_epoch=len(loader)), or sm.attach(optimizer, loader=loader)")

    # ---- the epoch length ----------------------------------------------------------------
    @property
    def steps_per_epoch(self) -> int | None:
        """The epoch length: the option, else what attach gave (None while unknown)."""
        return self.config.steps_per_epoch or self.learned_steps_per_epoch

    def set_steps_per_epoch(self, steps_per_epoch: int) -> None:
        given = self.steps_per_epoch
        if given is not None and given != steps_per_epoch:
            raise ValueError(f"optg: steps_per_epoch is already {given}, got {steps_per_epoch}")
        if steps_per_epoch > self.ctx.total_steps:
            raise ValueError(f"optg: steps_per_epoch ({steps_per_epoch}) exceeds total_steps "
                             f"({self.ctx.total_steps}): training must span at least one epoch")
        if given is None:  # before the first step (attach needs it): epoch 1's mask on the known schedule
            self.learned_steps_per_epoch = steps_per_epoch
            self._derive_masks(self.epoch)

    def period(self) -> int | None:
        """Steps between mask derivations (see ``OptGConfig.mask_period``; None while the epoch
        length is unknown). The schedule's "epochs" (τ, k) count these periods."""
        per_epoch, option = self.steps_per_epoch, self.config.mask_period
        if per_epoch is None:
            return None
        if isinstance(option, int):
            return option
        total = self.ctx.total_steps
        if option == "epoch" or self.config.schedule == "paper" or math.ceil(total / per_epoch) >= MIN_PERIODS:
            return per_epoch
        return max(1, min(per_epoch, total // MIN_PERIODS))

    # ---- schedules -----------------------------------------------------------------
    def n_epochs(self) -> int:
        """τ: epochs (mask periods, :meth:`period`) in training (the last one may be partial)."""
        return math.ceil(self.ctx.total_steps / self.period())

    def alpha(self) -> float:
        """α of Eq. 16-17: the option, or ``ALPHA_TAU`` / τ scaled to the run (0.5 for ``schedule="paper"``)."""
        if self.config.alpha is not None:
            return self.config.alpha
        return 0.5 if self.config.schedule == "paper" else ALPHA_TAU / self.n_epochs()

    def epoch_of(self, step: int) -> int:
        """The epoch k (1-based) that optimizer step ``step`` (1-based) belongs to (1 while the
        epoch length is unknown)."""
        if self.steps_per_epoch is None:
            return 1
        return (step - 1) // self.period() + 1

    def schedule_factor(self, epoch: int) -> float:
        """σ_k = σ(α(k − 0.5τ)) / σ(0.5ατ), the factor shared by Eq. 16 and Eq. 17 (1 at k = τ;
        0 while the epoch length is unknown)."""
        if self.steps_per_epoch is None:
            return 0.0
        tau, alpha = self.n_epochs(), self.alpha()
        if self.config.schedule == "paper":
            return _sigmoid(alpha * (epoch - 0.5 * tau))
        return _sigmoid(alpha * (epoch - 0.5 * tau)) / _sigmoid(alpha * 0.5 * tau)

    def sparsity_at(self, epoch: int) -> float:
        """P_k of Eq. 16 (normalised): the global sparsity during epoch ``epoch``."""
        return target_sparsity(self.ctx.layers) * self.schedule_factor(epoch)

    def weight_lrs(self) -> list[float]:
        """η_w per layer: the lr of the attached optimizer's param group holding its weight."""
        optimizer = self.optimizer
        if optimizer is None:
            raise RuntimeError("optg: the mask learning rate follows the weights' (Eq. 17): "
                               "attach the optimizer with sm.attach(optimizer) before training")
        lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
        lrs = []
        for layer in self.ctx.layers:
            lr = lr_of.get(id(layer.module.weight))
            if lr is None:
                raise RuntimeError(f"optg: the weight of layer {layer.name} is not in the attached optimizer")
            lrs.append(float(lr))
        return lrs

    def mask_lrs(self, step: int) -> list[float]:
        """η_m̂,k of Eq. 17 per layer for optimizer step ``step``."""
        factor = self.schedule_factor(self.epoch_of(step))
        return [lr * factor for lr in self.weight_lrs()]

    # ---- the method ------------------------------------------------------------------
    def set_initial_masks(self) -> None:
        ctx = self.ctx
        for layer in ctx.layers:
            weight = layer.module.weight
            layer.masked.register_buffer("scores", torch.zeros(weight.shape, dtype=torch.float32,
                                                               device=weight.device))  # m̂ <- 0 (Alg. 1 line 1)
            layer.masked.score_grad = None
            layer.masked.kind = "optg"
        if self.config.schedule == "paper" and self.steps_per_epoch is not None:
            tau = self.n_epochs()
            final, target = self.sparsity_at(tau), target_sparsity(ctx.layers)
            if final < 0.99 * target:
                warnings.warn(f"optg: with schedule='paper' and alpha={self.alpha()} over {tau} epochs the last "
                              f"epoch's sparsity (Eq. 16) is {final:.4f}, below the target {target:.4f}; "
                              f"use schedule='run' (the default), train longer or raise alpha", stacklevel=5)
        self.epoch = 1
        self._derive_masks(1)

    def on_step(self, step: int) -> None:
        """Eq. 10 after every optimizer step: m̂ <- m̂ − η_m̂,k · ∂L/∂m̂ (Alg. 1 line 8)."""
        grads = [layer.masked.score_grad for layer in self.ctx.layers]
        if all(g is None for g in grads):
            raise RuntimeError("optg: no mask gradient reached the scores: call loss.backward() "
                               "before sm.step()")
        with torch.no_grad():
            for layer, grad, lr in zip(self.ctx.layers, grads, self.mask_lrs(step)):
                if grad is not None:  # a layer the loss does not reach has a zero mask gradient
                    layer.masked.scores.sub_(grad.to(layer.masked.scores.device) * lr)
                layer.masked.score_grad = None

    def is_update(self, step: int) -> bool:
        """True after the last step of every mask period (:meth:`period`) but the last: the next starts."""
        period = self.period()
        return period is not None and step % period == 0 and step < self.ctx.total_steps

    def update(self, step: int) -> bool:
        self.epoch = step // self.period() + 1
        return self._derive_masks(self.epoch)

    @torch.no_grad()
    def _derive_masks(self, epoch: int) -> bool:
        """Eq. 6 at the start of ``epoch``: one sort over all layers (``global``), else one per
        layer. True when some mask changed."""
        ctx = self.ctx
        for layer in ctx.layers:
            if not torch.isfinite(layer.masked.scores).all():
                raise ValueError(f"optg: mask scores are NaN/inf in layer {layer.name}: the model diverged")
        factor = self.schedule_factor(epoch)
        if ctx.distribution == "global":
            groups = [(ctx.layers, target_sparsity(ctx.layers) * factor)]
        else:
            groups = [([layer], (1.0 - layer.density) * factor) for layer in ctx.layers]
        changed = False
        for layers, sparsity in groups:
            scores = [layer.masked.scores.flatten() for layer in layers]
            if self.config.ties == "random":  # the rule before issue 15
                tie_order = torch.randperm(sum(s.numel() for s in scores), generator=self.generator)
            else:  # the larger weight first, then the lower index
                magnitudes = torch.cat([layer.module.weight.detach().abs().float().flatten() for layer in layers])
                tie_order = torch.sort(magnitudes, descending=True, stable=True).indices
            keep = _keep_largest(scores, sparsity, tie_order)
            offset = 0
            for layer in layers:
                old = layer.masked.mask
                new = keep[offset : offset + old.numel()].view_as(old)
                offset += old.numel()
                _note_moves(layer, old, new)
                if not torch.equal(old, new):
                    ctx.set_mask(layer, new)
                    changed = True
        return changed

    # ---- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["epoch"] = self.epoch
        state["learned_steps_per_epoch"] = self.learned_steps_per_epoch
        return state

    def load_state_dict(self, state: dict) -> None:
        # checkpoints from before mask_period was an option derived once per epoch or by the default
        saved, own = {"mask_period": None, **state["config"]}, self.config.model_dump()
        if saved != own:
            raise ValueError(f"optg: the checkpoint was made with options {saved}, this model has {own}")
        super().load_state_dict(state)
        self.epoch = state["epoch"]
        self.learned_steps_per_epoch = state.get("learned_steps_per_epoch")


def _keep_largest(scores: list[torch.Tensor], sparsity: float, tie_order: torch.Tensor) -> torch.Tensor:
    """Flat bool mask over the concatenated ``scores`` pruning the round(sparsity · n)
    smallest, each tensor keeping at least its largest; equal scores are ordered as in
    ``tie_order`` (a permutation of the flat indices, the first kept first)."""
    flat = torch.cat(scores)
    n_total = flat.numel()
    n_keep = max(len(scores), n_total - int(round(sparsity * n_total)))
    tie_order = tie_order.to(flat.device)
    ranked = tie_order[torch.sort(flat[tie_order], descending=True, stable=True).indices]
    rank_score = torch.empty(n_total, dtype=torch.float64, device=flat.device)
    rank_score[ranked] = -torch.arange(n_total, dtype=torch.float64, device=flat.device)
    chunks = rank_score.split([s.numel() for s in scores])
    return torch.cat([m.reshape(-1) for m in global_topk_masks(list(chunks), n_keep)])


def target_sparsity(layers: tuple[SparseLayer, ...]) -> float:
    """P: the final global sparsity (fraction of all sparse weights pruned)."""
    sizes = [layer.masked.mask.numel() for layer in layers]
    return 1.0 - sum(layer.density * n for layer, n in zip(layers, sizes)) / sum(sizes)


def _note_moves(layer: SparseLayer, old: torch.Tensor, new: torch.Tensor) -> None:
    # for the SparseModel metrics: the kept set, and the weights revived by this sort
    layer.after_prune = old & new
    layer.grown = new & ~old
