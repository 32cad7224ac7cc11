"""``meet_budget``: a channel SparseModel's selection judged on the target's measured latency,
and re-aimed over its kept channels when it misses (what ``spruce compile`` does after a
method's last update; compile calls this function).

The method's knapsack chose channels by a prediction (a latency table, or FLOPs); the
budget is judged on measurement: the compact model of the current masks and the dense
model are timed interleaved in one run on the target. Within ``1.05 x`` the budget the
selection stands. Above it, the measured closed loop
(:func:`spruce.runtime.budget.meet_latency_budget`) chooses again among the kept channels
only (the least L1-magnitude ones go, the magnitude divided by its group's mean so that
layers of small fan-in are not emptied first; every group keeps at least ``min_keep`` of its
channels, as compile's selections do), first aimed at the selection's predicted cost scaled
by budget / measured ratio, and the SparseModel's channel masks are set to what it chose.
Issue 30's set-up C without either: the re-aim cut a 1-16-32-64 CNN's selection from 8, 22 and
14 channels to 1, 1 and 14 (the raw L1 of a 1-input convolution's channels is small), test
accuracy 0.98 -> 0.13 (0.19 with BatchNorm re-estimated).

With ``precision="int8"`` the compact model is timed as the INT8 artifact that ships
(quantized by the target, e.g. ``OnnxRuntimeCPU(precision="int8")``) and the dense model at
fp32, interleaved in the same run: the budget is a fraction of dense fp32, met by pruning and
quantization together (:func:`spruce.runtime.budget.time_against_reference`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..passes.importance import importance_scores, param_table
from ..passes.sparsity.channel_budget import ChannelBudget
from ..passes.sparsity.knapsack import (
    DEFAULT_MIN_KEEP,
    InfeasibleBudget,
    build_cost_model,
    minimum_kept,
    normalise_importance,
)
from ..passes.sparsity.model import SparseModel
from ..runtime.budget import BAND_HIGH, BAND_LOW, meet_latency_budget, time_against_reference
from ..runtime.decode import DecodeTimer, has_kv_cache
from ..targets.base import Target, check_precision, get_target
from .transformers import to_transformers

__all__ = ["MEASURED_BUDGETS", "BudgetCheck", "decode_timer", "meet_budget", "reestimate_batchnorm"]

# The budget kinds judged on a measurement: latency on the target, decode on a DecodeTimer.
MEASURED_BUDGETS = ("latency", "decode")


def decode_timer(source: nn.Module, prompt_tokens: int | None = None, new_tokens: int = 16) -> DecodeTimer:
    """The measurement of a ``decode`` budget for the transformers decoder ``source``: per-token
    decode latency at batch 1 with a key/value cache (:class:`~spruce.runtime.decode.DecodeTimer`),
    given where the measured budget loop takes a target (``meet_latency_budget(..., target=timer)``,
    :func:`meet_budget`). A model with a key/value cache (``source`` or a copy) is timed as it is; a
    compact graph of it (``remove_channels`` / ``spruce.prune``) is first written back into
    ``source``'s class (:func:`~spruce.api.transformers.to_transformers`, which needs the same
    widths in every layer and raises ``ValueError`` otherwise). The prompt is the example input's
    first row (its first ``prompt_tokens`` tokens); ``new_tokens`` are decoded per timed call."""

    def as_decoder(model: nn.Module) -> nn.Module:
        return model if has_kv_cache(model) else to_transformers(model, source).eval()

    return DecodeTimer(as_decoder, prompt_tokens, new_tokens)


@dataclass(frozen=True)
class BudgetCheck:
    """What :func:`meet_budget` measured: ``ratio``, the compact/dense latency of the masks it
    leaves (``measured_ms`` / ``measured_dense_ms``, robust ms at the budget's batch size);
    ``in_band``: ``ratio`` within [0.9, 1.05] x ``fraction``; ``method_ratio``: the selection
    it was given, as measured; ``re_aimed``: that missed and the closed loop chose again over
    its kept channels (``attempts`` measured selections in all; 1 when the selection held)."""

    fraction: float
    ratio: float
    in_band: bool
    method_ratio: float
    re_aimed: bool
    measured_ms: float
    measured_dense_ms: float
    attempts: int = 1
    precision: str = "fp32"  # the compact model's as timed (the dense model's is fp32 unless a Target said otherwise)
    batchnorm_reestimated: int = 0  # BatchNorm layers re-estimated over ``calibration`` after the re-aim


def meet_budget(sparse: SparseModel, example_inputs: torch.Tensor | Sequence[torch.Tensor],
                target: str | Target | DecodeTimer = "onnxruntime", budget: float | Mapping[str, float] = 0.5, *,
                dense: nn.Module | None = None, batch_size: int = 1, round_to: int = 1,
                latency_table: Any = None, label: str = "the SparseModel's", precision: str | None = None,
                dense_target: Target | None = None, calibration: Iterable[Any] | None = None,
                min_keep: float = DEFAULT_MIN_KEEP) -> BudgetCheck:
    """Meet a latency ``budget`` (a fraction of dense, or ``{"latency": f}``) as measured on
    ``target`` (a name or a :class:`~spruce.targets.base.Target`), or a ``{"decode": f}`` budget
    measured by ``target`` = :func:`decode_timer` (per-token decode latency), with the channels of the
    ``structure="channel"`` SparseModel ``sparse``, re-aiming its selection over the kept
    channels when it measures above ``1.05 x`` the budget (see the module doc). Call it once
    the method has no mask update left (e.g. after training, or after ``end_fraction`` of
    it); fine-tune, or re-estimate BatchNorm statistics, after a re-aim: ``calibration`` (training
    inputs: tensors, or tuples of positional inputs, at most 32 batches used) re-estimates them
    (:func:`reestimate_batchnorm`) when the selection was re-aimed. Without it the running
    statistics are the dense channels' (issue 30's digits CNN: test accuracy 0.994 before a
    re-aim, 0.67 after it, 0.99 with BatchNorm re-estimated over 10 training batches).

    ``dense``: the model timed as dense (default: the model ``sparse`` was made from, whose
    layers have their dense widths). ``example_inputs``: a tensor or tuple of tensors; their
    batch dim is replaced by ``batch_size``. The cost model steering the re-aim is
    ``latency_table`` (default: the one given to ``sparsify``), else FLOPs. ``label`` names
    the channels in messages. The SparseModel's training mode is kept.

    ``precision`` (``fp32``, ``int8``; default: the target's own) is the precision that ships:
    the compact model is timed at it. Given a target *name*, the dense model is timed on the
    same target at fp32; given a :class:`Target`, its own precision must be ``precision`` and
    the dense model is timed on ``dense_target`` (default: that target). The latency table,
    when given, should be profiled at ``precision`` too. ``min_keep``: every group keeps at least
    this fraction of its channels through a re-aim (its most important kept ones; all of them
    when fewer are kept; 0 leaves the re-aim free).

    Raises ``ValueError`` for a SparseModel that does not select channels or a budget that
    is not a latency fraction in (0, 1], and
    :class:`~spruce.passes.sparsity.knapsack.InfeasibleBudget` when no subset of the kept
    channels measures within the budget (it names the smallest reachable latency)."""
    fraction = _latency_fraction(budget)
    if isinstance(budget, Mapping) and "decode" in budget and not isinstance(target, DecodeTimer):
        raise ValueError("meet_budget: a decode budget is measured by a DecodeTimer: pass target=decode_timer(source)")
    if not isinstance(sparse, SparseModel) or sparse.structure != "channel":
        raise ValueError("meet_budget needs a SparseModel with structure='channel' (its channel masks are re-aimed)")
    target, dense_target = _targets(target, precision, dense_target)
    table = latency_table if latency_table is not None else sparse.latency_table
    ctx = sparse.context
    dense = ctx.source if dense is None else dense
    tensors = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    inputs = tuple(_at_batch(t, batch_size) for t in tensors)
    shipped = str(getattr(target, "precision", "fp32"))
    was_training = sparse.training
    sparse.eval()
    try:
        dense_timing, compact_timing = time_against_reference(target, sparse.compact().eval(), dense.eval(), inputs,
                                                              dense_target, warmup=3, rounds=15)
        measured, measured_dense = compact_timing.robust_ms(), dense_timing.robust_ms()
        ratio = measured / measured_dense
        if ratio <= BAND_HIGH * fraction:
            return BudgetCheck(fraction, ratio, ratio >= BAND_LOW * fraction, ratio, False, measured, measured_dense,
                               precision=shipped)
        groups = [u.group.id for u in ctx.units]
        params = param_table(ctx.source)
        importance = normalise_importance({u.group.id: importance_scores("l1", u.group, params,
                                                                         np.random.default_rng(0))
                                           for u in ctx.units})
        kept_now = {u.group.id: u.mask.numpy().copy() for u in ctx.units}
        required = minimum_kept(importance, min_keep, round_to, kept_now) if min_keep > 0 else None
        cost = build_cost_model("latency" if table is not None else "flops", ctx.source, ctx.analysis, groups, table)
        # first aim: the selection's predicted cost scaled by what its measurement says is missing
        now = cost.cost({gid: int(mask.sum()) for gid, mask in kept_now.items()})
        try:
            chosen = meet_latency_budget(ctx.analysis, ctx.source, table, target, fraction, importance, inputs,
                                         batch_size=batch_size, round_to=round_to, candidates=kept_now,
                                         required=required, cost_model=cost, first_aim=now * fraction / ratio,
                                         reference_target=dense_target)
        except InfeasibleBudget as exc:
            raise InfeasibleBudget(f"{label} channels measure {ratio:.3f} of dense, above the latency budget "
                                   f"{fraction:g}, and no subset of them reaches it: {exc}", exc.minimum) from None
        full = {u.group.id: np.arange(u.group.size) for u in ctx.units}
        ChannelBudget.apply(ctx, {**full, **{g: np.asarray(k) for g, k in chosen.kept.items() if g in full}})
        sparse.apply_masks()
        norms = reestimate_batchnorm(sparse, calibration) if calibration is not None else 0
        return BudgetCheck(fraction, chosen.ratio, chosen.in_band, ratio, True, chosen.measured_ms,
                           chosen.measured_dense_ms, 1 + len(chosen.attempts), shipped, norms)
    finally:
        sparse.train(was_training)


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, batches: Iterable[Any], max_batches: int = 32,
                         inputs_of: Callable[[Any], Any] | None = None) -> int:
    """Recompute every BatchNorm's running mean/var of ``model`` from at most ``max_batches`` of
    ``batches`` (a tensor or a tuple of positional inputs each, or what ``inputs_of`` takes
    them from); returns how many BatchNorm layers were re-estimated. A cumulative average over
    the batches, in train mode, without any gradient step; the model's mode and each layer's
    momentum are restored."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    was_training = model.training
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative moving average over the calibration batches
    model.train()
    try:
        for index, batch in enumerate(batches):
            if index >= max_batches:
                break
            inputs = inputs_of(batch) if inputs_of is not None else batch
            model(*inputs) if isinstance(inputs, tuple) else model(inputs)
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        model.train(was_training)
    return len(norms)


def _targets(target: str | Target, precision: str | None, dense_target: Target | None) -> tuple[Target, Target]:
    """(the target timing the compact model at ``precision``, the one timing the dense model)."""
    if isinstance(target, str):
        if precision is None:
            built = get_target(target)
            return built, dense_target or built
        check_precision(target, precision)
        built = get_target(target, precision=precision)
        return built, dense_target or (get_target(target, precision="fp32") if precision != "fp32" else built)
    own = str(getattr(target, "precision", "fp32"))
    if precision is not None and precision != own:
        raise ValueError(f"meet_budget: precision={precision!r} but the target given builds {own} (give the target's "
                         "name to have it built at that precision, or a target built at it)")
    return target, dense_target or target


def _latency_fraction(budget: float | Mapping[str, float]) -> float:
    if isinstance(budget, Mapping):
        if len(budget) != 1 or next(iter(budget)) not in MEASURED_BUDGETS:
            raise ValueError(f"meet_budget measures latency: give budget=f, {{'latency': f}} or {{'decode': f}}, got "
                             f"{dict(budget)!r} (FLOPs and params budgets are exact counts, which the method's "
                             "knapsack meets)")
        budget = next(iter(budget.values()))
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < budget <= 1.0:
        raise ValueError(f"meet_budget: the latency budget must be a fraction of dense in (0, 1], got {budget!r}")
    return float(budget)


def _at_batch(example: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``example`` with its batch dim ``batch_size`` (its first row repeated when it differs)."""
    return example if example.shape[0] == batch_size else example[:1].repeat(batch_size, *([1] * (example.dim() - 1)))
