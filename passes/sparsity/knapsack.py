"""Channel selection under a cost budget: HALP's knapsack over channel groups.

The problem (HALP, appendix §4 of papers/iee-enhanced-saliency.md): keep the channels of
largest total importance such that the model's predicted cost (latency from a target's
:class:`~spruce.runtime.profile.LatencyTable`, FLOPs or parameters) stays within a budget.

- Coupled channels are one item: a prunable :class:`~spruce.passes.analysis.ChannelGroup`
  chooses how many channels ``k_g`` it keeps, and always keeps a *prefix* of its channels
  sorted by importance, so the problem is a multiple-choice knapsack over groups (one option
  per kept count), solved exactly by dynamic programming over a discretised cost axis
  (:func:`solve_mckp`; costs are rounded *up*, so a chosen set always fits the budget).
- A channel's cost is a table difference ``R_j = T(p, j) - T(p, j - 1)``: the cost of a
  group keeping ``k`` channels is the change of every layer it reaches when only this group
  moves from its current width ``p`` (a first-order linearisation, exact at ``p``).
  Costs may be negative (a latency staircase): options are shifted by each group's minimum.
- The true cost is not separable (a convolution's latency depends on its input *and* output
  widths), so :func:`select_channels` re-linearises at the chosen widths and re-solves until
  the chosen configuration's exact predicted cost is within the budget (best one kept).
- Groups that are not prunable (the first convolution's input, the classifier's output)
  never vary: they are part of the constant cost.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view
from torch import fx, nn

from ..config import check_choice, short_repr

__all__ = [
    "COST_MODELS",
    "DEFAULT_MIN_KEEP",
    "Budget",
    "CostModel",
    "InfeasibleBudget",
    "minimum_cost",
    "minimum_kept",
    "normalise_importance",
    "Selection",
    "as_scores",
    "shrunk_selection",
    "build_cost_model",
    "register_cost_model",
    "select_channels",
    "select_measured",
    "solve_mckp",
]


# The fraction of every channel group a selection keeps at least, by default (compile's recipe
# ``min_keep``, HALP's and ``meet_budget``'s): without it a knapsack empties the groups it finds cheapest
DEFAULT_MIN_KEEP = 0.25


def as_scores(value: np.ndarray | torch.Tensor) -> np.ndarray:
    """One channel group's importance (a tensor or an array, one score per channel) as a float64
    NumPy array on the CPU."""
    return np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value, dtype=np.float64)


class InfeasibleBudget(ValueError):
    """No configuration meets the budget; ``minimum`` is the smallest reachable cost."""

    def __init__(self, message: str, minimum: float):
        super().__init__(message)
        self.minimum = minimum


@dataclass(frozen=True)
class Budget:
    """A structured budget: ``kind`` (a :data:`COST_MODELS` name) at ``fraction`` of dense."""

    kind: str
    fraction: float

    def __post_init__(self) -> None:
        check_choice("budget kind", self.kind, COST_MODELS)
        f = self.fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or not 0.0 < f <= 1.0:
            raise ValueError(f"budget {short_repr(self.kind)} must be a fraction of dense in (0, 1], "
                             f"got {short_repr(f)}")

    @classmethod
    def parse(cls, budget: object) -> Budget:
        """From ``{"latency": 0.5}`` (or ``flops``/``params``) or a :class:`Budget`."""
        if isinstance(budget, Budget):
            return budget
        if not isinstance(budget, Mapping) or len(budget) != 1:
            raise ValueError(f"budget must be one of {{'latency': f}}, {{'flops': f}}, {{'params': f}} "
                             f"(f a fraction of dense), got {short_repr(budget)}")
        (kind, fraction), = budget.items()
        return cls(str(kind), fraction)


# --- cost models -------------------------------------------------------------------------


@dataclass(frozen=True)
class Width:
    """A dimension's width as a function of kept counts: ``full - sum(e * (size_g - k_g))``."""

    full: int
    parts: tuple[tuple[int, int], ...] = ()  # (group id, entries of this dim per channel)


@dataclass
class Term:
    """One additive part of the cost: ``fn(widths)`` of a few dimensions (a layer, a parameter)."""

    name: str
    dims: tuple[Width, ...]
    fn: Callable[[tuple], Any]  # vectorised over numpy arrays of widths


@dataclass
class CostModel:
    """``cost(kept) = constant + sum(term.fn(widths))``; ``kept`` maps a variable group id to
    its kept channel count (groups not given keep all). ``sizes`` are the variable groups'."""

    kind: str
    unit: str
    terms: list[Term]
    sizes: dict[int, int]
    constant: float = 0.0
    by_group: dict[int, list[int]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for t, term in enumerate(self.terms):
            for gid in {g for dim in term.dims for g, _ in dim.parts}:
                self.by_group.setdefault(gid, []).append(t)

    def widths(self, term: Term, kept: Mapping[int, int]) -> tuple[int, ...]:
        return tuple(dim.full - sum(e * (self.sizes[g] - kept.get(g, self.sizes[g])) for g, e in dim.parts)
                     for dim in term.dims)

    def cost(self, kept: Mapping[int, int] | None = None) -> float:
        """The exact predicted cost of the configuration ``kept``."""
        kept = kept or {}
        return float(self.constant + sum(float(np.sum(term.fn(self.widths(term, kept)))) for term in self.terms))

    def dense(self) -> float:
        return self.cost({})

    def group_costs(self, gid: int, counts: np.ndarray, at: Mapping[int, int], sample: int = 1) -> np.ndarray:
        """Cost change when only group ``gid`` moves from ``at[gid]`` to each of ``counts``
        (the other groups at ``at``): the sum of its channels' ``R_j``. With ``sample`` > 1
        only every ``sample``-th count (and the ends) is evaluated, the rest interpolated."""
        counts = np.asarray(counts, dtype=np.int64)
        exact = np.unique(np.concatenate([counts[counts % sample == 0], counts[[0, -1]]])) if sample > 1 else counts
        total = np.zeros(len(exact))
        size = self.sizes[gid]
        for t in self.by_group.get(gid, []):
            term = self.terms[t]
            widths = []
            for dim, fixed in zip(term.dims, self.widths(term, at)):
                per_channel = sum(e for g, e in dim.parts if g == gid)
                moved = fixed + per_channel * (exact - at.get(gid, size))
                widths.append(moved)
            total += term.fn(tuple(widths)) - term.fn(self.widths(term, at))
        return total if sample <= 1 else np.interp(counts, exact, total)


COST_MODELS: dict[str, Callable[..., CostModel]] = {}


def register_cost_model(name: str):
    """Decorator adding a cost-model builder ``fn(context) -> CostModel`` under ``name``."""

    def register(fn: Callable[..., CostModel]) -> Callable[..., CostModel]:
        COST_MODELS[name] = fn
        return fn

    return register


@dataclass
class _Context:
    model: nn.Module
    groups: list[Any]  # the variable (prunable) ChannelGroups
    analysis: Any
    table: Any = None

    def dims_of(self, param: str, shape: Sequence[int]) -> tuple[Width, ...]:
        parts: dict[int, list[tuple[int, int]]] = {}
        for group in self.groups:
            for member in group.members:
                if member.name == param:
                    parts.setdefault(member.dim, []).append((group.id, int(member.index.shape[1])))
        return tuple(Width(int(size), tuple(parts.get(d, ()))) for d, size in enumerate(shape))

    def layer_calls(self) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
        """(module name, module, positions) of every Conv/Linear call in the eval graph:
        ``positions`` is the number of times the whole weight is applied (output positions;
        input positions for a transposed convolution, which scatters each input)."""
        gm = self.analysis.captured.eval
        calls = []
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            module = gm.get_submodule(node.target)
            if not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) or "tensor_meta" not in node.meta:
                continue
            shape = tuple(node.meta["tensor_meta"].shape)
            source = node.args[0] if node.args else None
            if isinstance(module, nn.modules.conv._ConvTransposeNd) and isinstance(source, fx.Node) \
                    and "tensor_meta" in source.meta:
                shape = tuple(source.meta["tensor_meta"].shape)
            channels = shape[-1] if isinstance(module, nn.Linear) else shape[1] if len(shape) > 1 else shape[0]
            calls.append((str(node.target), module, math.prod(shape) // max(channels, 1)))
        return calls

    def recurrent_calls(self) -> list[tuple[str, nn.Module, int]]:
        """(module name, module, time steps) of every recurrent layer call (``nn.LSTM``,
        ``nn.GRU``, ``nn.RNN``) in the eval graph whose input has a known shape: each of its
        weight matrices (every layer and direction) is applied once per time step."""
        gm = self.analysis.captured.eval
        calls = []
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            module = gm.get_submodule(node.target)
            source = node.args[0] if node.args else None
            if not isinstance(module, nn.RNNBase) or not isinstance(source, fx.Node) \
                    or "tensor_meta" not in source.meta:
                continue
            shape = tuple(source.meta["tensor_meta"].shape)
            steps = shape[1] if module.batch_first and len(shape) == 3 else shape[0]
            calls.append((str(node.target), module, int(steps)))
        return calls


def _product(coefficient: float) -> Callable:
    def fn(widths: tuple) -> Any:
        result = coefficient
        for width in widths:
            result = result * np.asarray(width, dtype=np.float64)
        return result

    return fn


@register_cost_model("params")
def _params_model(ctx: _Context) -> CostModel:
    """Every parameter's element count (the product of its dims' widths)."""
    terms = [Term(name, ctx.dims_of(name, p.shape), _product(1.0))
             for name, p in ctx.model.named_parameters()]
    return CostModel("params", "params", terms, {g.id: g.size for g in ctx.groups})


@register_cost_model("flops")
def _flops_model(ctx: _Context) -> CostModel:
    """Multiply-accumulates of every Conv/Linear call (output positions x active weights) and
    of every recurrent layer call (time steps x the active entries of each of its weight
    matrices: input, hidden and projection, every layer and direction)."""
    terms = []
    for name, module, positions in ctx.layer_calls():
        terms.append(Term(name, ctx.dims_of(f"{name}.weight", module.weight.shape), _product(float(positions))))
    for name, module, steps in ctx.recurrent_calls():
        for param, weight in module.named_parameters():
            if param.startswith("weight_"):
                terms.append(Term(f"{name}.{param}", ctx.dims_of(f"{name}.{param}", weight.shape),
                                  _product(float(steps))))
    return CostModel("flops", "MACs", terms, {g.id: g.size for g in ctx.groups})


@register_cost_model("latency")
def _latency_model(ctx: _Context) -> CostModel:
    """The table's prediction: overhead + sum of calls x calibrated layer latency."""
    table = ctx.table
    if table is None:
        raise ValueError("a latency budget needs latency_table=spruce.profile(model, example_inputs, target)")
    modules = dict(ctx.model.named_modules())
    terms = []
    for name, entry in table.layers.items():
        module = modules.get(name)
        if getattr(entry, "gates", 0) and isinstance(module, nn.RNNBase):
            terms.append(_recurrent_latency_term(ctx, table, entry, name, module))
            continue
        if module is None or not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            raise ValueError(f"latency table does not match the model: it has no Conv/Linear layer {name!r}")
        weight = module.weight
        full_out, full_in = weight.shape[0], weight.shape[1] * (1 if isinstance(module, nn.Linear) else module.groups)
        if (full_in, full_out) != (entry.in_channels, entry.out_channels):
            raise ValueError(f"latency table does not match the model: layer {name!r} is {full_in}->{full_out} "
                             f"channels here, {entry.in_channels}->{entry.out_channels} in the table")
        terms.append(Term(name, ctx.dims_of(f"{name}.weight", weight.shape[:2]), _layer_latency(table, entry)))
    missing = sorted({name for name, _, _ in ctx.layer_calls()} - set(table.layers))
    if missing:
        raise ValueError(f"latency table does not match the model: layer {missing[0]!r} was not profiled")
    return CostModel("latency", "ms", terms, {g.id: g.size for g in ctx.groups}, table.calibration.overhead_ms)


def _recurrent_latency_term(ctx: _Context, table: Any, entry: Any, name: str, module: nn.RNNBase) -> Term:
    """A recurrent layer's table latency over the widths of its first input matrix
    ``weight_ih_l0`` (gates x hidden rows, input feature columns): the hidden units and input
    features it is timed over."""
    if (module.input_size, module.hidden_size) != (entry.in_channels, entry.out_channels):
        raise ValueError(f"latency table does not match the model: recurrent layer {name!r} is "
                         f"{module.input_size}->{module.hidden_size} here, "
                         f"{entry.in_channels}->{entry.out_channels} in the table")
    weight = module.weight_ih_l0
    memo: dict[tuple[int, int], float] = {}

    def one(rows: int, active_in: int) -> float:
        key = (active_in, max(1, rows // entry.gates))
        if key not in memo:
            memo[key] = entry.calls * table.layer_ms(entry.name, *key)
        return memo[key]

    return Term(name, ctx.dims_of(f"{name}.weight_ih_l0", weight.shape), _elementwise(one))


def _layer_latency(table: Any, entry: Any) -> Callable[[tuple[int, ...]], float]:
    memo: dict[tuple[int, int], float] = {}

    def one(out: int, per_group_in: int) -> float:
        active_in = max(1, out // entry.multiplier) if entry.depthwise else per_group_in * entry.groups
        key = (active_in, out)
        if key not in memo:
            memo[key] = entry.calls * table.layer_ms(entry.name, active_in, out)
        return memo[key]

    return _elementwise(one)


def _elementwise(one: Callable[[int, int], float]) -> Callable[[tuple[int, ...]], Any]:
    """A term's cost function from ``one`` (the cost at one pair of widths): a float for scalar
    widths, else an array of ``one`` over the two width arrays broadcast together."""
    def fn(widths: tuple) -> Any:
        first, second = np.broadcast_arrays(*(np.asarray(w, dtype=np.int64) for w in widths))
        if first.ndim == 0:
            return one(int(first), int(second))
        return np.array([one(int(a), int(b)) for a, b in zip(first.ravel(), second.ravel())]).reshape(first.shape)

    return fn


def build_cost_model(kind: str, model: nn.Module, analysis: Any, group_ids: Sequence[int] | None = None,
                     latency_table: Any = None) -> CostModel:
    """The ``kind`` cost model of ``model`` whose variable channel groups are ``group_ids``
    (default: every prunable group of ``analysis``, from ``spruce.passes.analysis.analyze``)."""
    check_choice("cost model", kind, COST_MODELS)
    wanted = None if group_ids is None else set(group_ids)
    groups = [g for g in analysis.groups if g.prunable and (wanted is None or g.id in wanted)]
    return COST_MODELS[kind](_Context(model, groups, analysis, latency_table))


# --- the knapsack ----------------------------------------------------------------------------


def solve_mckp(values: Sequence[np.ndarray], costs: Sequence[np.ndarray], budget: float,
               bins: int = 1024) -> np.ndarray:
    """One option per group maximising ``sum(values)`` subject to ``sum(costs) <= budget``.

    Exact dynamic programming over the cost axis: integer costs spanning at most ``bins``
    units are used as they are; otherwise the span ``budget - sum(min costs)`` is cut into
    ``bins`` units and every cost is rounded up, so the result always fits (and is optimal
    for the rounded costs). Negative costs are fine. Returns the chosen option per group;
    raises :class:`InfeasibleBudget` when even the cheapest options exceed the budget."""
    lows = [float(np.min(c)) for c in costs]
    floor = float(sum(lows))
    span = budget - floor
    if span < -1e-9 * max(1.0, abs(budget)):
        raise InfeasibleBudget(f"budget {budget:.6g} is below the cheapest configuration {floor:.6g}", floor)
    span = max(span, 0.0)
    shifted = [np.asarray(c, dtype=np.float64) - low for c, low in zip(costs, lows)]
    integral = all(np.allclose(c, np.round(c)) for c in shifted)
    if integral and span <= bins:
        unit, capacity = 1.0, int(math.floor(span + 1e-9))
        weights = [np.round(c).astype(np.int64) for c in shifted]
    else:
        unit, capacity = (span / bins if span > 0 else 1.0), (bins if span > 0 else 0)
        # clipped before the cast: a span near 0 makes c / unit overflow int64 (such options never fit)
        weights = [np.minimum(np.ceil(c / unit - 1e-9), capacity + 1).astype(np.int64) for c in shifted]
    layers = [np.zeros(capacity + 1)]  # best value with total cost <= b, after each group
    for value, weight in zip(values, weights):
        value = np.asarray(value, dtype=np.float64)
        # row r of the window is the previous row shifted right by capacity - r (-inf shifted in)
        window = sliding_window_view(np.concatenate([np.full(capacity, -np.inf), layers[-1]]), capacity + 1)
        index = np.flatnonzero(weight <= capacity)
        new = np.full(capacity + 1, -np.inf)
        for start in range(0, len(index), 256):  # bounded memory: 256 options x capacity at a time
            part = index[start:start + 256]
            np.maximum(new, (window[capacity - weight[part]] + value[part, None]).max(axis=0), out=new)
        layers.append(new)
    chosen = np.zeros(len(values), dtype=np.int64)
    b = capacity
    for g in range(len(values) - 1, -1, -1):  # walk back: the option that reached layers[g + 1][b]
        weight, value = weights[g], np.asarray(values[g], dtype=np.float64)
        before = np.where(weight <= b, layers[g][np.clip(b - weight, 0, capacity)], -np.inf) + value
        chosen[g] = int(np.argmax(before))
        b -= int(weight[chosen[g]])
    return chosen


@dataclass
class Selection:
    """What :func:`select_channels` chose: kept channel indices per group, kept counts, the
    exact predicted cost, the total importance kept and the solver rounds used."""

    kept: dict[int, np.ndarray]
    counts: dict[int, int]
    cost: float
    value: float
    rounds: int


def _aim(values: list[np.ndarray], costs: list[np.ndarray], base: float, budget: float,
         exact: Callable[[Mapping[int, int]], float], gids: list[int], options: Mapping[int, Any], bins: int,
         tolerance: float, steps: int = 8) -> tuple[float, dict[int, int], bool] | None:
    """Search the linearised knapsack's aim (secant, then bisection) for the most valuable
    choice whose *exact* cost fits ``budget``: (value, counts, fits) of the best one tried."""
    floor = base + sum(float(np.min(c)) for c in costs)
    low: tuple[float, float] | None = None  # (aim, exact cost) that fit
    high: tuple[float, float] | None = None  # (aim, exact cost) that did not
    aim, best, last = budget, None, None
    for _ in range(steps):
        if aim < floor:
            aim = floor
        try:
            chosen = solve_mckp(values, costs, aim - base, bins)
        except InfeasibleBudget:
            return best or last
        choice = {g: int(options[g].counts[i]) for g, i in zip(gids, chosen)}
        value = float(sum(v[i] for v, i in zip(values, chosen)))
        real = exact(choice)
        fits = real <= budget
        last = (value, choice, fits)
        if fits:
            if best is None or value > best[0]:
                best = last
            if real >= budget * (1 - tolerance):
                break
            low = (aim, real) if low is None or aim > low[0] else low
        else:
            high = (aim, real) if high is None or aim < high[0] else high
        if low is not None and high is not None:
            (a0, c0), (a1, c1) = low, high
            aim = a0 + (budget - c0) * (a1 - a0) / (c1 - c0) if c1 > c0 else (a0 + a1) / 2
            if not a0 < aim < a1:
                aim = (a0 + a1) / 2
        elif high is not None:
            aim = max(floor, aim - 1.5 * (real - budget))
        else:
            aim = aim + 1.5 * (budget - real)
        if low is not None and aim == low[0]:
            break
    return best or last


@dataclass
class _Options:
    order: np.ndarray  # channel indices, keep-priority order
    gains: np.ndarray  # importance of each channel in that order
    counts: np.ndarray  # allowed kept counts, ascending

    def values(self) -> np.ndarray:
        prefix = np.concatenate([[0.0], np.cumsum(self.gains)])
        return prefix[self.counts]


def _options(size: int, scores: np.ndarray, candidates: np.ndarray, required: np.ndarray,
             round_to: int) -> _Options:
    required = required & candidates
    free = np.flatnonzero(candidates & ~required)
    free = free[np.argsort(-scores[free], kind="stable")]
    order = np.concatenate([np.flatnonzero(required), free])
    lo_req, hi = int(required.sum()), int(candidates.sum())
    lo = max(lo_req, min(round_to, hi)) if hi else 0
    counts = {k for k in range(lo, hi + 1) if k % round_to == 0 or k == size}
    counts.add(lo)
    return _Options(order, scores[order], np.array(sorted(counts), dtype=np.int64))


def _cheapest(cost: CostModel, options: Mapping[int, _Options], sample: int) -> tuple[dict[int, int], float]:
    """The cheapest configuration found: every group at its smallest count, or the mix the
    linearisation there prefers (negative costs can make a few more channels cheaper)."""
    lowest = {g: int(o.counts[0]) for g, o in options.items()}
    costs = {g: cost.group_costs(g, o.counts, lowest, sample) for g, o in options.items()}
    mix = {g: int(options[g].counts[int(np.argmin(c))]) for g, c in costs.items()}
    return min(((lowest, cost.cost(lowest)), (mix, cost.cost(mix))), key=lambda pair: pair[1])


def minimum_cost(cost: CostModel, round_to: int = 1, sample: int = 1,
                 required: Mapping[int, np.ndarray] | None = None,
                 candidates: Mapping[int, np.ndarray] | None = None) -> float:
    """The smallest predicted cost reachable by channel selection with ``round_to``, keeping
    at least the ``required[g]`` channels (bool per channel) of each group given, and choosing
    only among the ``candidates[g]`` of each group given (a measured latency need not fall with
    the channel count, so a subset's cheapest configuration can cost more than the whole's)."""
    options = {g: _options(size, np.zeros(size),
                           np.asarray(candidates[g], bool) if candidates and g in candidates else np.ones(size, bool),
                           np.asarray(required[g], bool) if required and g in required else np.zeros(size, bool),
                           round_to)
               for g, size in cost.sizes.items()}
    return _cheapest(cost, options, sample)[1]


NORMALISATIONS = ("none", "group_mean")


def normalise_importance(importance: Mapping[int, np.ndarray], how: str = "group_mean") -> dict[int, np.ndarray]:
    """Channel importance made comparable across groups. ``group_mean`` divides each
    group's scores by their mean (a group of all-zero scores stays zero): a weight-magnitude
    score sums |w| over the channel's fan-in and fan-out, so raw scores of a 3 x 3 x 64-input
    layer and of a 3 x 3 x 512-input one differ by their fan-in alone, and a knapsack on raw
    scores empties the small-fan-in (early, high-resolution) layers first. ``none`` returns the
    scores as they are. Raises ``ValueError`` for another ``how``."""
    if how not in NORMALISATIONS:
        raise ValueError(f"unknown importance normalisation {short_repr(how)}; valid: {', '.join(NORMALISATIONS)}")
    out = {}
    for gid, scores in importance.items():
        scores = as_scores(scores)
        mean = float(np.mean(np.abs(scores))) if scores.size else 0.0
        out[gid] = scores / mean if how == "group_mean" and mean > 0 else scores
    return out


def minimum_kept(importance: Mapping[int, np.ndarray], fraction: float, round_to: int = 1,
                 candidates: Mapping[int, np.ndarray] | None = None) -> dict[int, np.ndarray]:
    """Per group, the channels that must be kept so that every group keeps at least
    ``fraction`` of its channels (rounded up to a multiple of ``round_to``, at most the
    group): its most important ones, as a bool mask per channel (``required`` of
    :func:`select_channels`). With ``candidates[g]`` (bool per channel), only those may be
    required: the most important candidates, all of them when fewer. ``fraction`` 0 requires
    nothing. Raises ``ValueError`` unless 0 <= ``fraction`` <= 1."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"minimum kept fraction must be in [0, 1], got {short_repr(fraction)}")
    required = {}
    for gid, scores in importance.items():
        scores = as_scores(scores)
        size = scores.shape[0]
        count = min(size, int(math.ceil(fraction * size / round_to - 1e-9)) * round_to) if fraction > 0 else 0
        allowed = np.ones(size, bool) if candidates is None or gid not in candidates \
            else np.asarray(candidates[gid], bool)
        order = np.argsort(-np.where(allowed, scores, -np.inf), kind="stable")
        mask = np.zeros(size, bool)
        mask[order[:min(count, int(allowed.sum()))]] = True
        required[gid] = mask
    return required


def _group_options(cost: CostModel, importance: Mapping[int, np.ndarray | torch.Tensor],
                   candidates: Mapping[int, np.ndarray] | None, required: Mapping[int, np.ndarray] | None,
                   round_to: int, caller: str) -> dict[int, _Options]:
    """Every group's keep order and allowed counts; ``ValueError`` (naming ``caller``) for a bad
    ``round_to`` or importance that does not cover the groups with finite scores."""
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be a positive integer, got {round_to!r}")
    options = {}
    for gid in sorted(cost.sizes):
        size = cost.sizes[gid]
        if gid not in importance:
            raise ValueError(f"{caller}: no importance for channel group {gid}")
        scores = as_scores(importance[gid])
        if scores.shape != (size,) or not np.isfinite(scores).all():
            raise ValueError(f"{caller}: importance of group {gid} must be {size} finite numbers")
        cand = np.ones(size, bool) if candidates is None or gid not in candidates else np.asarray(candidates[gid], bool)
        req = np.zeros(size, bool) if required is None or gid not in required else np.asarray(required[gid], bool)
        options[gid] = _options(size, scores, cand, req, round_to)
    return options


def shrunk_selection(cost: CostModel, importance: Mapping[int, np.ndarray | torch.Tensor], fraction: float, *,
                     candidates: Mapping[int, np.ndarray] | None = None,
                     required: Mapping[int, np.ndarray] | None = None, round_to: int = 1) -> Selection:
    """Every group shrunk alike, without the cost model's say: group ``g`` keeps the allowed count
    nearest to ``lo + fraction * (hi - lo)`` (``lo`` its fewest allowed channels, ``hi`` all its
    ``candidates``), its required channels and then its most important candidates. ``fraction``
    0 is the physically smallest model the options allow, 1 keeps every candidate. What a
    measured loop falls back on when a cost model's cheapest configuration measures slower
    than smaller ones (a latency table that misses an operator's cost). ``cost`` only names the
    groups and prices the result (``Selection.cost``). Raises ``ValueError`` for ``fraction``
    outside [0, 1] and as :func:`select_channels` for bad importance or ``round_to``."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"shrunk_selection: fraction must be in [0, 1], got {short_repr(fraction)}")
    options = _group_options(cost, importance, candidates, required, round_to, "shrunk_selection")
    counts = {}
    for gid, option in options.items():
        allowed = option.counts
        want = allowed[0] + fraction * (allowed[-1] - allowed[0])
        counts[gid] = int(allowed[int(np.argmin(np.abs(allowed - want)))])
    kept = {gid: np.sort(options[gid].order[: counts[gid]]) for gid in options}
    value = float(sum(options[g].values()[int(np.searchsorted(options[g].counts, counts[g]))] for g in options))
    return Selection(kept, counts, cost.cost(counts), value, 0)


def select_channels(cost: CostModel, importance: Mapping[int, np.ndarray | torch.Tensor], budget: float, *,
                    candidates: Mapping[int, np.ndarray] | None = None,
                    required: Mapping[int, np.ndarray] | None = None, round_to: int = 1, bins: int = 1024,
                    rounds: int = 4, sample: int = 1, tolerance: float = 0.002,
                    start: Mapping[int, int] | None = None) -> Selection:
    """Channels to keep, per variable group of ``cost``, maximising the summed ``importance``
    with ``cost.cost(kept) <= budget``.

    ``candidates[g]`` (bool per channel; default all) may be kept, ``required[g]`` must be;
    within a group the kept channels are the required ones plus the most important other
    candidates (a prefix). Kept counts are multiples of ``round_to`` (or the group's size).
    ``sample`` evaluates the cost of every ``sample``-th count only (latency tables are
    measured on a grid). Each of at most ``rounds`` linearisations searches the knapsack's
    aim until the exact cost is within ``tolerance`` (relative) below the budget; the first
    linearisation is at ``start`` (kept counts; default the widest). Raises
    :class:`InfeasibleBudget` with the smallest reachable cost."""
    gids = sorted(cost.sizes)
    options = _group_options(cost, importance, candidates, required, round_to, "select_channels")
    values = [options[g].values() for g in gids]

    def exact(choice: Mapping[int, int]) -> float:
        return cost.cost(choice)

    floor_choice, floor_cost = _cheapest(cost, options, sample)
    if floor_cost > budget:
        raise InfeasibleBudget(
            f"no channel configuration meets the {cost.kind} budget {budget:.6g} {cost.unit}: the smallest "
            f"reachable {cost.kind} is {floor_cost:.6g} {cost.unit} ({floor_cost / cost.dense():.1%} of dense "
            f"{cost.dense():.6g})", floor_cost)

    best: tuple[float, dict[int, int]] | None = None
    anchor = {}
    for g in gids:  # linearise first at the current widths (``start``), else at the widest
        counts = options[g].counts
        want = counts[-1] if start is None or g not in start else start[g]
        anchor[g] = int(counts[int(np.argmin(np.abs(counts - want)))])
    used = 0
    for round_number in range(1, rounds + 1):
        used = round_number
        costs = [cost.group_costs(g, options[g].counts, anchor, sample) for g in gids]
        base = exact(anchor) - sum(float(c[np.searchsorted(options[g].counts, anchor[g])]) for g, c in zip(gids, costs))
        found = _aim(values, costs, base, budget, exact, gids, options, bins, tolerance)
        if found is None:
            break
        value, choice, feasible = found
        if feasible and (best is None or value > best[0]):
            best = (value, choice)
        if choice == anchor:
            break
        anchor = choice
    if best is None:  # even the linearised minimum did not fit: the smallest widths do
        best = (float(sum(v[int(np.searchsorted(options[g].counts, floor_choice[g]))]
                          for g, v in zip(gids, values))), floor_choice)
    value, choice = best
    kept = {g: np.sort(options[g].order[: choice[g]]) for g in gids}
    return Selection(kept, choice, exact(choice), value, used)


def select_measured(cost: CostModel, importance: Mapping[int, np.ndarray | torch.Tensor], goal: float,
                    measure: Callable[[dict[int, np.ndarray]], float], rounds: int = 4,
                    **options: Any) -> tuple[Selection, float, int]:
    """Closed-loop selection: choose channels for ``goal`` with :func:`select_channels`, then
    ``measure`` the chosen configuration on the target (``measure(kept) -> cost``, e.g. the
    compact model's measured latency); while it measures above ``goal``, select again with
    the budget scaled by goal/measured, at most ``rounds`` selections. A table's prediction
    errors are what the knapsack exploits most, so this is how a measured budget is hit.
    Returns (selection, its measured cost, selections made); the last one when none met
    ``goal``."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
    budget = goal
    for attempt in range(1, rounds + 1):
        selection = select_channels(cost, importance, budget, **options)
        measured = float(measure(selection.kept))
        if measured <= goal or attempt == rounds:
            return selection, measured, attempt
        budget *= goal / measured
    raise AssertionError("unreachable")
