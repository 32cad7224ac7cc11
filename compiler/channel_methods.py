"""Channels re-selected during recovery by a budgeted sparse-training method (issue #14).

``spruce compile --structure channel --recover distill|loss --method halp|iee`` (a method
*named* in the recipe or on the command line; without one, channels are chosen once, as
before). Three hooks of :mod:`spruce.compiler.stages` call this module:

1. ``sparsify`` (:func:`sparsify_with_method`): the one-shot selection runs first, exactly as
   without a method. Under a latency budget it is the measured closed loop, so an unreachable
   budget still raises :class:`~spruce.passes.sparsity.knapsack.InfeasibleBudget` before any
   recovery, and it calibrates the latency table: the *predicted* fraction of dense of the
   selection that *measured* within the band is the budget the method's knapsack is given,
   so the method aims where the target, not the table, puts the budget. (FLOPs and params
   budgets are exact counts and are given as asked.) The student then becomes a channel
   :class:`~spruce.passes.sparsity.model.SparseModel` of the method, its first channels
   from the trained weights (IEE: the knapsack on their L1 magnitude at the budget; HALP:
   dense, pruned on its schedule).
2. ``recover``: the recovery loop calls ``SparseModel.step()`` after every optimizer step,
   so the method re-selects channels under the budget: HALP's latency-aware knapsack every
   ``interval`` steps (the budget falling to the target by ``end_fraction`` of recovery),
   IEE's prune / reactivate-and-explore / grow cycles inside its early update horizon.
   Channel importance is the method's gradient criterion (``taylor_bn``); when every
   gradient it read is exactly zero (at the start of distillation the student equals its
   teacher) the documented fallback scores the channels instead
   (:data:`~spruce.passes.importance.GRADIENT_FALLBACK`: BatchNorm ``|gamma|``).
3. once the method has no update left in the run (:func:`updates_left`; HALP ends by half of
   recovery, IEE after its last grow), :func:`check_final` measures the compact model of the
   final masks against the dense model (interleaved, one run, at the budget's batch size).
   Above ``1.05 x`` the budget it is re-aimed: the measured closed loop again, over the kept
   channels only (the least L1-magnitude ones go), first aimed at the selection's predicted
   cost scaled by budget / measured ratio, then BatchNorm re-estimated on recovery batches;
   when not even that reaches the budget, ``InfeasibleBudget`` names the smallest reachable
   latency. The recovery steps left fine-tune what was chosen; the masks no longer change,
   so the check holds for what ships. ``export`` ships ``SparseModel.compact()``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..api.budget import meet_budget
from ..passes.graph import CapturedGraph
from ..passes.importance import GRADIENT_FALLBACK
from ..passes.sparsity.knapsack import DEFAULT_MIN_KEEP
from ..passes.sparsity.method import MethodConfig, RunLength
from ..passes.sparsity.model import SparseModel, StaleOptimizerWarning, sparsify_captured
from ..runtime.budget import MeasuredSelection
from ..targets.base import Target
from .recovery import reestimate_batchnorm

__all__ = ["FinalCheck", "MethodDrive", "check_final", "drives_channels", "method_activity", "sparsify_with_method",
           "updates_left"]

@dataclass(frozen=True)
class MethodDrive:
    """How a method drives the channels during recovery: its name, channel criterion and the
    criterion's zero-gradient fallback (None for a criterion that reads no gradient), the
    budget asked (``kind``, ``fraction`` of dense) and the fraction of the cost model's dense
    cost its knapsack was given (``aim``: the measured calibration for a latency budget)."""

    method: str
    criterion: str
    fallback: str | None
    kind: str
    fraction: float
    aim: float

    def record(self) -> dict[str, Any]:
        return {"method": self.method, "criterion": self.criterion, "zero_gradient_fallback": self.fallback,
                "budget": {self.kind: self.fraction}, "knapsack_aim": self.aim}


@dataclass(frozen=True)
class FinalCheck:
    """The method's final selection judged after recovery: compiled/dense ``ratio`` measured
    (latency: ms timed interleaved in one run) or counted (FLOPs, params) of what ships;
    ``in_band``: within [0.9, 1.05] x ``fraction`` (latency) or at most ``fraction`` (counts);
    ``method_ratio``: the method's own last selection, as measured; ``re_aimed``: that missed
    the budget and the closed loop chose again over its kept channels (``attempts`` measured
    selections in all; 1 when the method's selection held)."""

    kind: str
    fraction: float
    ratio: float
    in_band: bool
    method_ratio: float | None = None
    re_aimed: bool = False
    measured_ms: float | None = None
    measured_dense_ms: float | None = None
    attempts: int = 1
    step: int | None = None  # the recovery step after which it ran (recovery fine-tunes what follows)

    def record(self) -> dict[str, Any]:
        return {"kind": self.kind, "fraction": self.fraction, "ratio": self.ratio, "in_band": self.in_band,
                "method_ratio": self.method_ratio, "re_aimed": self.re_aimed, "measured_ms": self.measured_ms,
                "measured_dense_ms": self.measured_dense_ms, "attempts": self.attempts,
                "after_step": self.step}


def drives_channels(structure: str, mode: str, method: MethodConfig, method_named: bool,
                    budget: dict[str, float] | None) -> bool:
    """Does a method re-select channels during recovery? Only for ``structure="channel"``,
    recovery ``distill`` or ``loss``, a method named by the user (the recipe's default method
    is not a request), a budgeted method (halp, iee) and a budget."""
    return structure == "channel" and mode in ("distill", "loss") and method_named and method.budgeted \
        and budget is not None


def sparsify_with_method(graph: CapturedGraph, method: MethodConfig, run: RunLength, budget: dict[str, float],
                         selection: MeasuredSelection | None, latency_table: Any) -> tuple[SparseModel, MethodDrive]:
    """The channel SparseModel of ``method`` (the recipe's config; scaled here to ``run``, a
    run that must see mask updates) around the captured student, under ``budget``: a latency
    budget aimed at the predicted fraction of the one-shot ``selection`` that measured in band
    (the fraction asked when there is none). Raises ``ValueError`` from ``sparsify`` for a
    model plain fx cannot trace (named), before any recovery."""
    ((kind, fraction),) = budget.items()
    aim = fraction
    if kind == "latency" and selection is not None and selection.predicted_ratio is not None:
        aim = min(1.0, float(selection.predicted_ratio))
    config = method.for_run(replace(run, updates_required=True))
    sparse = sparsify_captured(graph, config, structure="channel", sparsity=0.0, distribution="uniform",
                               total_steps=run.total_steps, budget={kind: aim},
                               latency_table=latency_table if kind == "latency" else None)
    criterion = str(getattr(config, "channel_criterion", getattr(config, "criterion", "")))
    return sparse, MethodDrive(config.name, criterion, GRADIENT_FALLBACK.get(criterion), kind, fraction, aim)


def method_activity(sparse: SparseModel) -> dict[str, int]:
    """What the method did during recovery (:meth:`Method.activity`: knapsack ``selections``
    after the initial one, ``importance_fallbacks`` scored by the zero-gradient fallback)."""
    return dict(sparse.method.activity())


def updates_left(sparse: SparseModel, step: int, total_steps: int) -> bool:
    """Is a mask update of the method still due after optimizer step ``step`` of ``total_steps``?"""
    return any(sparse.method.is_update(s) for s in range(step + 1, total_steps + 1))


def _compact(sparse: SparseModel) -> nn.Module:
    """``sparse.compact()``; compile never trains the compact model, so the recovery
    optimizer's stale-optimizer warning does not apply."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StaleOptimizerWarning)
        return sparse.compact().eval()


def check_final(sparse: SparseModel, drive: MethodDrive, dense: nn.Module, target: Target, example: torch.Tensor,
                *, batch_size: int, round_to: int, latency_table: Any, calibration: Iterable,
                step: int | None = None, dense_target: Target | None = None,
                min_keep: float = DEFAULT_MIN_KEEP) -> FinalCheck:
    """Judge the final masks of ``sparse`` against the budget of ``drive`` (see the module
    doc) once the method has no update left (after recovery step ``step``, so the steps
    after it fine-tune what ships); re-aim a latency that measures above 1.05 x the budget,
    over the kept channels, and re-estimate BatchNorm on ``calibration`` batches. Raises
    :class:`InfeasibleBudget` when no subset of the kept channels reaches it. ``dense_target``
    times the dense model (default ``target``; fp32 while ``target`` times INT8); ``min_keep``
    (the recipe's) is the fraction of its channels every group keeps in a re-aim."""
    sparse.eval()
    if drive.kind != "latency":
        from ..api.stats import count_macs, count_params

        count = count_params if drive.kind == "params" else (lambda m: count_macs(m, (example,)))
        ratio = count(_compact(sparse)) / max(count(dense), 1)
        return FinalCheck(drive.kind, drive.fraction, ratio, ratio <= drive.fraction * (1 + 1e-9), ratio,
                          step=step)
    check = meet_budget(sparse, (example,), target, drive.fraction, dense=dense, batch_size=batch_size,
                        round_to=round_to, latency_table=latency_table, label=f"method {drive.method}'s final",
                        dense_target=dense_target, min_keep=min_keep)
    sparse.eval()
    if not check.re_aimed:
        return FinalCheck("latency", check.fraction, check.ratio, check.in_band, check.method_ratio, False,
                          check.measured_ms, check.measured_dense_ms, step=step)
    reestimate_batchnorm(sparse, calibration)
    sparse.eval()
    return FinalCheck("latency", check.fraction, check.ratio, check.in_band, check.method_ratio, True,
                      check.measured_ms, check.measured_dense_ms, check.attempts, step)
