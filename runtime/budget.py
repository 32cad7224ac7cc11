"""A latency budget met as *measured* on the target: the closed loop around the knapsack.

A latency table predicts; the target decides. :func:`meet_latency_budget` chooses channels
with the knapsack (:func:`~spruce.passes.sparsity.knapsack.select_channels`) over the
table's cost model (or any other cost model, e.g. FLOPs, when no table was profiled: the
loop then steers by measurements alone), removes them physically, and times the compact model *interleaved with
the dense model in one run* on the target, at the batch size the budget names (load-robust
timings, :mod:`spruce.targets.timing`). The budget is a fraction ``B`` of the dense model's
measured latency; a selection is accepted when

    0.9 * B  <=  measured compact / measured dense  <=  1.05 * B.

When the measured ratio falls outside that band, the knapsack's aim (a budget in predicted
ms) is re-aimed from the measurements: by the secant between the predicted costs of the two
nearest attempts on either side of the budget, else by scaling with B / measured ratio.
When every selection measures too slow, even the cost model's cheapest configuration, the
cost model mis-ranks (issue 30: a latency table with no point below 8
channels priced a first convolution's channels at almost nothing, and its cheapest configuration
kept them): every group is then shrunk alike (:func:`~spruce.passes.sparsity.knapsack.shrunk_selection`)
and steered by measurements alone. When no configuration reaches ``1.05 * B`` (the fewest
channels are measured too), :class:`~spruce.passes.sparsity.knapsack.InfeasibleBudget` is raised
naming the smallest reachable measured latency, before anything else (recovery, export) runs.

**Noise.** One interleaved timing under a changing load can put a selection just outside the band
that its next timing puts inside (issue 31's CRAFT loop: the dense fp32 reference measured
196-430 ms over six attempts, and the rounds ended at 0.223 against a band from 0.225). Before any
fallback, the out-of-band selections nearest the band on either side, when within
``RETIME_WITHIN`` (15 %) of its edge, are timed once more; their ratio is then that of the mean
compact ms to the mean dense ms of both timings, and the first one in the band is taken.

**Precision.** The compact model is timed as ``target`` builds it: on an INT8 target
(``OnnxRuntimeCPU(precision="int8")``) each selection is quantized and timed as the INT8 model
that ships. The dense model is timed on ``reference_target`` (default: ``target``), e.g. the
same runtime at fp32, interleaved with the compact one in the same run
(:func:`time_against_reference`): the budget is then a fraction of the dense *fp32* latency, the
model the user would otherwise deploy, and a selection is judged by what INT8 and pruning
together measure.

:func:`smallest_selectable` times that smallest configuration alone, without a table, so a
compile refuses such a budget before it profiles one.
"""

from __future__ import annotations

import functools
import math
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..passes.export import remove_channels
from ..passes.sparsity.count_rules import CountRule, fit_selection
from ..passes.sparsity.knapsack import (
    CostModel,
    InfeasibleBudget,
    build_cost_model,
    minimum_cost,
    select_channels,
    shrunk_selection,
)
from ..passes.sparsity.uniform import Ties, tie_problem, untie
from ..targets.base import Target
from ..targets.timing import Timings, time_interleaved

__all__ = ["BAND_HIGH", "BAND_LOW", "Attempt", "MeasuredSelection", "meet_latency_budget", "smallest_selectable",
           "time_against_reference"]

# A measured compact/dense ratio within [BAND_LOW * B, BAND_HIGH * B] meets the budget B.
BAND_LOW = 0.9
BAND_HIGH = 1.05
# Selections bisected between the lowest aim tried and the smallest configuration when every round
# measured too slow (before the smallest configuration itself is taken)
FALLBACK_ROUNDS = 3
# A selection measured out of the band but within this fraction of the band's nearer edge is timed
# once more before any fallback, and the two timings pooled decide (noise under load, see the module doc)
RETIME_WITHIN = 0.15


@dataclass(frozen=True)
class Attempt:
    """One selection of the loop: the aim given to the knapsack and the selection's cost, in
    the cost model's unit (ms for a latency table), and its measured ms next to the dense
    model's (same run)."""

    aim: float
    predicted: float
    measured_ms: float
    measured_dense_ms: float

    @property
    def ratio(self) -> float:
        """Measured compact / measured dense."""
        return self.measured_ms / self.measured_dense_ms


@dataclass
class MeasuredSelection:
    """What :func:`meet_latency_budget` chose and measured.

    ``kept[group id]`` are the kept channel indices of each variable group (sorted);
    ``counts`` their numbers; ``compact`` the physically pruned model; latencies in ms at
    ``batch_size``: ``predicted_ms`` / ``predicted_dense_ms`` from the table (at the table's
    own batch size; None without a table), ``measured_ms`` / ``measured_dense_ms`` timed
    interleaved in one run. ``cost_unit`` is the unit the knapsack counted in.
    ``in_band`` says whether the measured ratio is within [0.9, 1.05] x ``budget``; it is
    False only when the loop ran out of rounds with a ratio below the band (pruned more
    than asked). ``attempts`` lists every selection tried, in order."""

    kept: dict[int, np.ndarray]
    counts: dict[int, int]
    compact: nn.Module
    budget: float
    batch_size: int
    predicted_ms: float | None
    predicted_dense_ms: float | None
    measured_ms: float
    measured_dense_ms: float
    in_band: bool
    cost_unit: str = "ms"
    attempts: list[Attempt] = field(default_factory=list)
    precision: str = "fp32"  # the compact model's, as timed
    dense_precision: str = "fp32"  # the dense model's, as timed

    @property
    def ratio(self) -> float:
        """Measured compact / measured dense latency."""
        return self.measured_ms / self.measured_dense_ms

    @property
    def predicted_ratio(self) -> float | None:
        """Predicted compact / predicted dense latency (None without a table)."""
        if self.predicted_ms is None or not self.predicted_dense_ms:
            return None
        return self.predicted_ms / self.predicted_dense_ms

    def summary(self) -> dict[str, Any]:
        """A JSON-ready record (for reports)."""
        return {"budget": self.budget, "batch_size": self.batch_size, "predicted_ms": self.predicted_ms,
                "predicted_dense_ms": self.predicted_dense_ms, "measured_ms": self.measured_ms,
                "measured_dense_ms": self.measured_dense_ms, "ratio": self.ratio,
                "predicted_ratio": self.predicted_ratio, "in_band": self.in_band,
                "cost_unit": self.cost_unit, "precision": self.precision,
                "dense_precision": self.dense_precision, "counts": {str(g): c for g, c in sorted(self.counts.items())},
                "attempts": [{"aim": a.aim, "predicted": a.predicted, "measured_ms": a.measured_ms,
                              "measured_dense_ms": a.measured_dense_ms, "ratio": a.ratio} for a in self.attempts]}


def meet_latency_budget(
    analysis: Any,
    model: nn.Module,
    table: Any,
    target: Target,
    budget: float,
    importance: Mapping[int, np.ndarray | torch.Tensor],
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    *,
    batch_size: int = 1,
    round_to: int = 1,
    rounds: int = 6,
    warmup: int = 3,
    timing_rounds: int = 15,
    candidates: Mapping[int, np.ndarray] | None = None,
    required: Mapping[int, np.ndarray] | None = None,
    cost_model: CostModel | None = None,
    first_aim: float | None = None,
    ties: Ties | None = None,
    reference_target: Target | None = None,
    then: Callable[[nn.Module], nn.Module] | None = None,
    rule: CountRule | None = None,
) -> MeasuredSelection:
    """Channels of ``model`` whose compact model measures within the latency ``budget``.

    ``analysis`` is the model's :class:`~spruce.passes.analysis.ChannelAnalysis`, ``table``
    its :class:`~spruce.runtime.table.LatencyTable` on ``target`` (or None when
    ``cost_model``, e.g. ``build_cost_model("flops", ...)``, steers the knapsack instead; a
    given ``cost_model`` is used even with a table), ``budget`` a fraction of
    the dense model's measured latency in (0, 1], ``importance[group id]`` one score per
    channel of every prunable group (higher keeps). Latency is measured at ``batch_size``
    (the example inputs' batch dim is replaced; the target must accept it): compact and dense
    interleaved in one run, ``timing_rounds`` rounds after ``warmup`` calls each. At most
    ``rounds`` selections are made; kept counts are multiples of ``round_to`` (or a whole
    group); ``candidates`` and ``required`` (channels every selection keeps, e.g.
    :func:`~spruce.passes.sparsity.knapsack.minimum_kept`) as for ``select_channels``. The
    first selection aims at ``first_aim`` (cost units; default ``budget`` x the predicted dense
    cost), e.g. an aim already calibrated by an earlier measurement. ``ties``
    (:func:`~spruce.passes.sparsity.uniform.uniform_classes`): the groups of each class keep
    one count (uniform counts across layers; not with ``candidates``). ``reference_target``
    (default ``target``) times the dense model, e.g. fp32 while ``target`` times INT8 (see the
    module doc); the table, if any, is ``target``'s. ``then`` (a compact model -> a smaller
    one, e.g. whole blocks removed: :func:`spruce.api.depth.remove_blocks`) is applied to every
    selection's compact model before it is timed and returned; the knapsack's cost model does
    not see it (the measured loop re-aims by what is timed). ``rule``
    (:class:`~spruce.passes.sparsity.count_rules.CountRule`, e.g. what a transformers config
    takes as its residual width beside the kept heads) moves its group in every selection
    before it is timed (:func:`~spruce.passes.sparsity.count_rules.fit_selection`).

    Returns the first selection measured within [0.9, 1.05] x ``budget`` of dense; when the
    rounds run out, the out-of-band selections nearest the band (within ``RETIME_WITHIN`` of
    it) are timed once more and judged on both timings pooled (see the module doc); then, with
    every selection too slow, up to ``FALLBACK_ROUNDS`` more are bisected
    between the lowest aim tried and the cost model's cheapest configuration, which is measured
    too; when that is too slow as well, or when one was too slow and every one that fits is
    below the band, every group is shrunk alike (``shrunk_selection``: the fewest channels, then
    ``FALLBACK_ROUNDS`` + 2 bisections by measurement); then the
    slowest selection measured at most 1.05 x ``budget`` (``in_band`` False). Raises
    :class:`InfeasibleBudget` (``minimum`` = the smallest measured ms, its message naming it
    and its fraction of dense) when even the fewest channels measure above 1.05 x ``budget``;
    ``ValueError`` for a bad budget, batch size or option, importance that does not cover the
    prunable groups, or neither a table nor a cost model."""
    _check_budget_and_batch(budget, batch_size)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
    timed_inputs = _timed_inputs(example_inputs, batch_size)
    if cost_model is None and table is None:
        raise ValueError("meet_latency_budget needs a latency table or a cost_model")
    cost = cost_model if cost_model is not None else build_cost_model("latency", model, analysis,
                                                                      latency_table=table)
    group_ids, scores, untied_cost, untied_required = sorted(cost.sizes), importance, cost, required
    if ties is not None:
        if candidates is not None:
            raise ValueError("meet_latency_budget: uniform counts (ties) with candidates are not supported")
        cost, importance, required = tie_problem(cost, scores, ties, required)
    sample = table.step if cost.kind == "latency" and table is not None else 1
    dense_predicted = cost.dense()
    floor_predicted = minimum_cost(cost, round_to=round_to, sample=sample, required=required, candidates=candidates)
    low, high = BAND_LOW * budget, BAND_HIGH * budget
    options = dict(round_to=round_to, sample=sample, candidates=candidates, required=required)

    measured: dict[tuple, tuple[Any, Attempt, nn.Module]] = {}  # kept counts -> (selection, attempt, compact)
    attempts: list[Attempt] = []
    timed: dict[tuple, list[tuple[float, float]]] = {}  # kept counts -> each timing's (compact ms, dense ms)

    def time_once(compact: nn.Module) -> tuple[float, float]:
        """(compact ms, dense ms) of one interleaved timing against the reference."""
        dense_timing, compact_timing = time_against_reference(target, compact, model, timed_inputs,
                                                              reference_target, warmup, timing_rounds)
        return compact_timing.robust_ms(), dense_timing.robust_ms()

    def try_aim(aim: float) -> tuple[Any, Attempt]:
        selection = select_channels(cost, importance, max(aim, floor_predicted), **options)
        return measure(selection, aim)

    def measure(selection: Any, aim: float) -> tuple[Any, Attempt]:
        if ties is not None:
            selection = untie(selection, scores, ties, group_ids)
        selection = _fit(selection, rule, scores, untied_cost, untied_required, round_to)
        key = tuple(sorted(selection.counts.items()))
        if key not in measured:
            compact = _compact(analysis, model, selection.kept, then)
            timed[key] = [time_once(compact)]
            attempt = Attempt(aim, selection.cost, *timed[key][0])
            measured[key] = (selection, attempt, compact)
        selection, attempt, _ = measured[key]
        attempt = Attempt(aim, attempt.predicted, attempt.measured_ms, attempt.measured_dense_ms)
        attempts.append(attempt)
        return selection, attempt

    def result(selection: Any, attempt: Attempt, in_band: bool) -> MeasuredSelection:
        compact = measured[tuple(sorted(selection.counts.items()))][2]
        if cost.kind == "latency":
            predicted_ms, predicted_dense_ms = attempt.predicted, dense_predicted
        elif table is not None:
            predicted_ms, predicted_dense_ms = table.predict_model(compact), table.dense_ms()
        else:
            predicted_ms = predicted_dense_ms = None
        return MeasuredSelection(kept=dict(selection.kept), counts=dict(selection.counts), compact=compact,
                                 budget=budget, batch_size=batch_size, predicted_ms=predicted_ms,
                                 predicted_dense_ms=predicted_dense_ms, measured_ms=attempt.measured_ms,
                                 measured_dense_ms=attempt.measured_dense_ms, in_band=in_band,
                                 cost_unit=cost.unit, attempts=list(attempts), precision=_precision(target),
                                 dense_precision=_precision(reference_target or target))

    def retime_near_misses() -> MeasuredSelection | None:
        """The selections nearest the band below and above it, each when within ``RETIME_WITHIN``
        of the band's edge and timed once: timed again, their ratio pooled over both timings (mean
        compact ms / mean dense ms; the pooled attempt is recorded); the first then in the band."""
        below = [key for key, (_, a, _) in measured.items() if a.ratio < low]
        above = [key for key, (_, a, _) in measured.items() if a.ratio > high]
        nearest = []
        if below:
            key = max(below, key=lambda k: measured[k][1].ratio)
            nearest += [key] if measured[key][1].ratio >= low * (1 - RETIME_WITHIN) else []
        if above:
            key = min(above, key=lambda k: measured[k][1].ratio)
            nearest += [key] if measured[key][1].ratio <= high * (1 + RETIME_WITHIN) else []
        for key in nearest:
            if len(timed[key]) > 1:
                continue
            selection, first, compact = measured[key]
            timed[key].append(time_once(compact))
            compact_ms, dense_ms = np.mean(timed[key], axis=0)
            attempt = Attempt(first.aim, first.predicted, float(compact_ms), float(dense_ms))
            measured[key] = (selection, attempt, compact)
            attempts.append(attempt)
            if low <= attempt.ratio <= high:
                return result(selection, attempt, True)
        return None

    def shrink_alike(cheapest: Attempt | None) -> MeasuredSelection | None:
        """When the cost model's choices miss the band, its cheapest configuration (``cheapest``)
        too slow, or one too slow and every one that fits below the band (latency that jumps at a channel count the
        table's grid does not resolve): the one-dimensional family of :func:`shrunk_selection`
        (every group shrunk alike, down to its fewest channels), steered by measurement alone.
        Bisects between the fewest channels (when they fit) and all candidates for
        ``FALLBACK_ROUNDS`` + 2 measurements; the selection in the band, else None (the caller
        takes the slowest one that fits). Raises :class:`InfeasibleBudget` when nothing measured
        fits (``cheapest`` given) and even the fewest channels measure too slow."""
        shrink = dict(candidates=candidates, required=required, round_to=round_to)
        fewest, smallest = measure(shrunk_selection(cost, importance, 0.0, **shrink), floor_predicted)
        if smallest.ratio > high:
            if cheapest is None:
                return None
            raise _infeasible(budget, target, batch_size, min((cheapest, smallest), key=lambda a: a.ratio),
                              cost.unit, reference_target)
        if low <= smallest.ratio:
            return result(fewest, smallest, True)

        def at_fraction(fraction: float) -> tuple[Any, Attempt]:
            selection = shrunk_selection(cost, importance, fraction, **shrink)
            return measure(selection, selection.cost)

        return bisect(at_fraction, 0.0, 1.0, FALLBACK_ROUNDS + 2)

    def bisect(attempt_at: Callable[[float], tuple[Any, Attempt]], fits: float, too_slow: float,
               steps: int) -> MeasuredSelection | None:
        """Bisect a parameter whose larger values keep more (an aim, a shrink fraction) between
        ``fits`` and ``too_slow`` for ``steps`` measurements: the first selection in the band,
        else None."""
        for _ in range(steps):
            middle = (too_slow + fits) / 2
            selection, attempt = attempt_at(middle)
            if low <= attempt.ratio <= high:
                return result(selection, attempt, True)
            if attempt.ratio > high:
                too_slow = middle
            else:
                fits = middle
        return None

    aim = budget * dense_predicted if first_aim is None else float(np.clip(first_aim, floor_predicted, dense_predicted))
    for _ in range(rounds):
        selection, attempt = try_aim(aim)
        if low <= attempt.ratio <= high:
            return result(selection, attempt, True)
        if attempt.ratio > high and aim <= floor_predicted:
            break  # the smallest configuration is already too slow
        aim = _reaim(attempts, aim, budget, floor_predicted, dense_predicted)
    settled = retime_near_misses()
    if settled is not None:
        return settled
    fitting = [(s, a) for s, a, _ in measured.values() if a.ratio <= high]
    if not fitting:  # every attempt too slow: bisect between the lowest aim and the smallest configuration
        too_slow = min(a.aim for a in attempts)
        found = bisect(try_aim, floor_predicted, too_slow, FALLBACK_ROUNDS if too_slow > floor_predicted else 0)
        if found is not None:
            return found
        fitting = [(s, a) for s, a, _ in measured.values() if a.ratio <= high]
    if not fitting:
        selection, attempt = try_aim(floor_predicted)
        if attempt.ratio > high:  # the cost model's cheapest is too slow: shrink every group alike instead
            shrunk = shrink_alike(attempt)
            if shrunk is not None:
                return shrunk
    elif any(a.ratio > high for a in attempts):  # selections on both sides of the band, none in it
        shrunk = shrink_alike(None)
        if shrunk is not None:
            return shrunk
    fitting = [(s, a) for s, a, _ in measured.values() if a.ratio <= high]
    selection, attempt = max(fitting, key=lambda pair: pair[1].ratio)
    return result(selection, attempt, low <= attempt.ratio <= high)


def time_against_reference(target: Target, compact: nn.Module, dense: nn.Module, inputs: Sequence[torch.Tensor],
                           reference_target: Target | None = None, warmup: int = 3,
                           rounds: int = 15) -> tuple[Timings, Timings]:
    """``(dense timing, compact timing)``: ``dense`` built by ``reference_target`` (default
    ``target``) and ``compact`` by ``target``, timed interleaved in one run (``warmup`` calls
    each, then ``rounds`` rounds of one call each; see :mod:`spruce.targets.timing`). Both
    targets must time on this host; the timing thread is placed as ``target`` places it. The
    models are timed in eval mode and keep their modes."""
    if reference_target is None or reference_target is target:
        return tuple(target.measure_models([(dense, inputs), (compact, inputs)], warmup=warmup, rounds=rounds))
    target.require()
    reference_target.require()
    modes = dense.training, compact.training
    try:
        with tempfile.TemporaryDirectory(prefix="spruce-time-") as folder:
            dense_run, dense_inputs = reference_target.model_runner(dense.eval(), tuple(inputs), Path(folder) / "dense")
            compact_run, compact_inputs = target.model_runner(compact.eval(), tuple(inputs), Path(folder) / "compact")
            calls = [functools.partial(dense_run, dense_inputs), functools.partial(compact_run, compact_inputs)]
            dense_timing, compact_timing = time_interleaved(calls, warmup, rounds, target.synchronize,
                                                            target.caller_cpu())
            return dense_timing, compact_timing
    finally:
        dense.train(modes[0])
        compact.train(modes[1])


def _precision(target: Target) -> str:
    return str(getattr(target, "precision", "fp32"))


def _label(target: Target, reference_target: Target | None) -> str:
    """`` fp32`` where the dense model is timed at another precision than the compact one."""
    dense = _precision(reference_target or target)
    return f" {dense} (compact timed {_precision(target)})" if dense != _precision(target) else ""


def smallest_selectable(
    analysis: Any,
    model: nn.Module,
    target: Target,
    budget: float,
    importance: Mapping[int, np.ndarray | torch.Tensor],
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    *,
    batch_size: int = 1,
    round_to: int = 1,
    required: Mapping[int, np.ndarray] | None = None,
    warmup: int = 3,
    timing_rounds: int = 15,
    reference_target: Target | None = None,
    then: Callable[[nn.Module], nn.Module] | None = None,
    cost_model: CostModel | None = None,
    rule: CountRule | None = None,
) -> Attempt:
    """The smallest configuration a selection can choose (every prunable group of ``analysis``
    at its fewest channels: the ``required`` ones, else one multiple of ``round_to``), timed
    interleaved with the dense ``model`` on ``target`` at ``batch_size`` (as
    :func:`meet_latency_budget` times): its :class:`Attempt` (aim and predicted: the smallest
    MACs). Needs no latency table, so a budget no selection can reach is refused before one is
    profiled. ``reference_target`` (default ``target``) times the dense model, as in
    :func:`meet_latency_budget` (e.g. fp32 while the compact model is timed INT8); ``then``
    as in :func:`meet_latency_budget` (e.g. blocks removed too). ``cost_model`` (default: MACs)
    finds the fewest channels: it must give every channel a cost (MACs are 0 for a graph that
    calls linear layers as functions, as torch.export writes a transformer: then every channel
    is free and the "smallest" keeps all; steer such a model by ``build_cost_model("params",
    ...)``, as its measured loop is); ``rule`` as in :func:`meet_latency_budget`. Raises
    :class:`InfeasibleBudget` (as :func:`meet_latency_budget` does) when it measures above 1.05 x
    ``budget``; ``ValueError`` for a bad budget or batch size."""
    _check_budget_and_batch(budget, batch_size)
    timed_inputs = _timed_inputs(example_inputs, batch_size)
    cost = cost_model if cost_model is not None else build_cost_model("flops", model, analysis)
    if cost_model is None and cost.dense() <= 0:  # no MAC seen: every channel would be free
        cost = build_cost_model("params", model, analysis)
    floor = minimum_cost(cost, round_to=round_to, required=required)
    selection = select_channels(cost, importance, floor, round_to=round_to, required=required)
    selection = _fit(selection, rule, importance, cost, required, round_to)
    compact = _compact(analysis, model, selection.kept, then)
    dense_timing, compact_timing = time_against_reference(target, compact, model, timed_inputs, reference_target,
                                                          warmup, timing_rounds)
    attempt = Attempt(floor, selection.cost, compact_timing.robust_ms(), dense_timing.robust_ms())
    if attempt.ratio > BAND_HIGH * budget:
        raise _infeasible(budget, target, batch_size, attempt, cost.unit, reference_target)
    return attempt


def _fit(selection: Any, rule: CountRule | None, importance: Mapping[int, np.ndarray | torch.Tensor],
         cost: CostModel, required: Mapping[int, np.ndarray] | None, round_to: int) -> Any:
    """``selection`` with ``rule``'s group moved to a count the rule accepts (never below the
    channels ``required`` of it, counts multiples of ``round_to``); as is without a rule."""
    if rule is None:
        return selection
    return fit_selection(selection, rule, importance, cost, rule.least(required), round_to)


def _compact(analysis: Any, model: nn.Module, kept: Mapping[int, np.ndarray],
             then: Callable[[nn.Module], nn.Module] | None) -> nn.Module:
    """The compact model of a selection (channels removed), then ``then`` applied, if given."""
    compact = remove_channels(analysis, model, kept)
    return compact if then is None else then(compact)


def _check_budget_and_batch(budget: float, batch_size: int) -> None:
    """``ValueError`` for a budget outside (0, 1] or a batch size that is not a positive integer."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) \
            or not 0 < budget <= 1:
        raise ValueError(f"latency budget must be a fraction of dense in (0, 1], got {budget!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def _timed_inputs(example_inputs: Sequence[torch.Tensor] | torch.Tensor, batch_size: int) -> tuple[torch.Tensor, ...]:
    """The example inputs at ``batch_size``, as the measured loop times them."""
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    return tuple(_at_batch(t, batch_size) for t in inputs)


def _infeasible(budget: float, target: Target, batch_size: int, smallest: Attempt, unit: str,
                reference_target: Target | None = None) -> InfeasibleBudget:
    """The error for a budget the smallest selectable configuration, measured as ``smallest``, misses."""
    return InfeasibleBudget(
        f"no channel configuration meets the latency budget {budget:g} of dense"
        f"{_label(target, reference_target)} on target "
        f"{target.name!r} at batch {batch_size}: the smallest reachable latency is "
        f"{smallest.measured_ms:.4g} ms, {smallest.ratio:.3f} of dense {smallest.measured_dense_ms:.4g} ms "
        f"(measured; predicted {smallest.predicted:.4g} {unit})", smallest.measured_ms)


def _reaim(attempts: Sequence[Attempt], aim: float, budget: float, floor: float, dense: float) -> float:
    """The next aim (cost units): with attempts on both sides of the budget, the secant through
    the nearest ones, interpolated in their *predicted* costs (the selections' costs, not the
    aims: every aim from a selection's cost up to the next selection's gives the same
    selection, so a secant between aims can land on an aim that selects the selection above
    again, forever) and kept strictly inside the aims not yet known to give one of the two:
    above the largest aim that gave the selection below, below the cost of the selection above
    (the middle of that interval when the secant leaves it). Else the last aim scaled by budget /
    measured ratio. Within [floor, dense]."""
    below = [a for a in attempts if a.ratio < budget]
    above = [a for a in attempts if a.ratio > budget]
    if below and above:
        lo = max(below, key=lambda a: a.ratio)
        hi = min(above, key=lambda a: a.ratio)
        start = max([lo.predicted] + [a.aim for a in below if a.predicted == lo.predicted])
        stop = hi.predicted
        if hi.ratio != lo.ratio and hi.predicted != lo.predicted:
            nxt = lo.predicted + (budget - lo.ratio) * (hi.predicted - lo.predicted) / (hi.ratio - lo.ratio)
            if start < nxt < stop:
                return float(np.clip(nxt, floor, dense))
        return float(np.clip((start + stop) / 2, floor, dense))
    last = attempts[-1]
    return float(np.clip(aim * budget / last.ratio, floor, dense))


def _at_batch(tensor: torch.Tensor, batch_size: int) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or tensor.dim() == 0:
        raise ValueError("example inputs must be tensors with a batch dimension")
    if tensor.shape[0] == batch_size:
        return tensor
    generator = torch.Generator().manual_seed(0)
    return torch.randn((batch_size, *tensor.shape[1:]), generator=generator).to(tensor.dtype)
