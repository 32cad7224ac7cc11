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
"""

from __future__ import annotations

import math
import warnings
from typing import ClassVar

import torch
from pydantic import Field

from ..layers import SparseLayer
from ..masking import WEIGHT_FNS, MaskedWeight, global_topk_masks
from ..method import Method, MethodConfig, RunLength, register_method

__all__ = ["OptGConfig", "OptG"]


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
    """``steps_per_epoch``: optimizer steps in one epoch (a schedule input the method needs:
    the mask is re-derived once per epoch and τ = ceil(total_steps / steps_per_epoch); under
    ``spruce compile`` it is the training loader's length). ``alpha``: the slope α of the
    sigmoid in Eq. 16-17 (0.5 in all the paper's experiments). ``seed``: breaks ties among
    equal scores (all scores are 0 when the first mask is derived)."""

    name: ClassVar[str] = "optg"
    structures: ClassVar[tuple[str, ...]] = ("unstructured",)
    needs: ClassVar[tuple[str, ...]] = ("total_steps", "steps_per_epoch")

    steps_per_epoch: int | None = Field(None, ge=1)
    alpha: float = Field(0.5, gt=0)
    seed: int = Field(0, ge=0)

    def for_run(self, run: RunLength) -> MethodConfig:
        return self.with_defaults({"steps_per_epoch": run.steps_per_epoch}) if run.steps_per_epoch else self

    def check_run(self, total_steps: int | None) -> None:
        if self.steps_per_epoch is None:
            raise ValueError("optg: steps_per_epoch is required (optimizer steps in one epoch, e.g. len(loader))")
        super().check_run(total_steps)
        if self.steps_per_epoch > total_steps:
            raise ValueError(f"optg: steps_per_epoch ({self.steps_per_epoch}) exceeds total_steps "
                             f"({total_steps}): training must span at least one epoch")


@register_method(OptGConfig)
class OptG(Method):
    """OptG (Zhang et al. 2022): supermask scores trained by STE every step, one global sort
    per epoch, sigmoid sparsity (Eq. 16) and mask learning rate (Eq. 17) schedules.

    ``distribution='global'`` is OptG as in §3.4 (one sort decides the layer budgets);
    ``'uniform'``/``'erk'`` fix the layer budgets (Tab. 5). Needs unstructured sparsity,
    ``total_steps`` and an attached optimizer. Invariant: during epoch k exactly
    round(P_k · N) of the N sparse weights are masked, N counted over all layers (over each
    layer, with its own final sparsity, for fixed budgets), and the mask changes only at
    epoch boundaries."""

    keeps_pruned_weights = True

    def __init__(self, config: OptGConfig):
        super().__init__(config)
        self.epoch = 1  # k of Algorithm 1: the epoch the current mask belongs to
        self.optimizer: torch.optim.Optimizer | None = None

    def attach(self, optimizer: torch.optim.Optimizer | None) -> None:
        self.optimizer = optimizer  # Eq. 17: the mask learning rate follows the weights'

    # ---- schedules -----------------------------------------------------------------
    def n_epochs(self) -> int:
        """τ: epochs in training (the last one may be partial)."""
        return math.ceil(self.ctx.total_steps / self.config.steps_per_epoch)

    def epoch_of(self, step: int) -> int:
        """The epoch k (1-based) that optimizer step ``step`` (1-based) belongs to."""
        return (step - 1) // self.config.steps_per_epoch + 1

    def schedule_factor(self, epoch: int) -> float:
        """1 / (1 + e^{−α(k − 0.5τ)}), the factor shared by Eq. 16 and Eq. 17."""
        return _sigmoid(self.config.alpha * (epoch - 0.5 * self.n_epochs()))

    def sparsity_at(self, epoch: int) -> float:
        """P_k of Eq. 16: the global sparsity during epoch ``epoch``."""
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
        tau = self.n_epochs()
        final = self.sparsity_at(tau)
        target = target_sparsity(ctx.layers)
        if final < 0.99 * target:
            warnings.warn(f"optg: with alpha={self.config.alpha} over {tau} epochs the last epoch's sparsity "
                          f"(Eq. 16) is {final:.4f}, below the target {target:.4f}; "
                          f"train longer or raise alpha", stacklevel=5)
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
        """True after the last step of every epoch but the last: the next epoch starts."""
        return step % self.config.steps_per_epoch == 0 and step < self.ctx.total_steps

    def update(self, step: int) -> bool:
        self.epoch = step // self.config.steps_per_epoch + 1
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
            keep = self._keep_largest([layer.masked.scores.flatten() for layer in layers], sparsity)
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

    def _keep_largest(self, scores: list[torch.Tensor], sparsity: float) -> torch.Tensor:
        """Flat bool mask over the concatenated ``scores`` pruning the round(sparsity · n)
        smallest, each tensor keeping at least its largest; ties (all scores are 0 for the
        first mask) broken at random by the seeded generator."""
        flat = torch.cat(scores)
        n_total = flat.numel()
        n_keep = max(len(scores), n_total - int(round(sparsity * n_total)))
        order = torch.randperm(n_total, generator=self.generator).to(flat.device)
        ranked = torch.sort(flat[order], descending=True, stable=True).indices
        rank_score = torch.empty(n_total, dtype=torch.float64, device=flat.device)
        rank_score[order[ranked]] = -torch.arange(n_total, dtype=torch.float64, device=flat.device)
        chunks = rank_score.split([s.numel() for s in scores])
        return torch.cat([m.reshape(-1) for m in global_topk_masks(list(chunks), n_keep)])

    # ---- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["epoch"] = self.epoch
        return state

    def load_state_dict(self, state: dict) -> None:
        saved, own = state["config"], self.config.model_dump()
        if saved != own:
            raise ValueError(f"optg: the checkpoint was made with options {saved}, this model has {own}")
        super().load_state_dict(state)
        self.epoch = state["epoch"]


def target_sparsity(layers: tuple[SparseLayer, ...]) -> float:
    """P: the final global sparsity (fraction of all sparse weights pruned)."""
    sizes = [layer.masked.mask.numel() for layer in layers]
    return 1.0 - sum(layer.density * n for layer, n in zip(layers, sizes)) / sum(sizes)


def _note_moves(layer: SparseLayer, old: torch.Tensor, new: torch.Tensor) -> None:
    # for the SparseModel metrics: the kept set, and the weights revived by this sort
    layer.after_prune = old & new
    layer.grown = new & ~old
