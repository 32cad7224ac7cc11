"""Calibration of a latency table against whole models: the widths timed whole, their timing, and the
fit of the :class:`~spruce.runtime.table.Calibration` (see :mod:`spruce.runtime.profile` for the model)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..targets.base import Target
from .cache import LatencyCache
from .measure import Reference
from .table import Calibration, LatencyTable, ProfileError, check_finite

__all__ = [
    "CALIBRATION_FRACTIONS",
    "calibration_samples",
    "call_cost_ms",
    "compact_at_widths",
    "fit_calibration",
    "fixed_costs",
    "model_key",
    "nonnegative_least_squares",
    "random_group_widths",
    "uniform_group_widths",
]

# Uniform widths (fractions of every prunable group) timed whole to calibrate the table.
CALIBRATION_FRACTIONS = (1.0, 0.75, 0.5, 0.25)


def random_group_widths(groups: Sequence[Any], rng: np.random.Generator, step: int = 8,
                        low: float = 0.2, high: float = 1.0, jitter: float = 0.3) -> dict[int, int]:
    """Random kept widths per prunable group: one base fraction in [low, high] for the
    configuration, each group's fraction jittered by +-``jitter`` relative, rounded to a
    multiple of ``step`` (at least ``step`` or 1 channel, at most the group's size)."""
    base = rng.uniform(low, high)
    widths = {}
    for group in groups:
        if not group.prunable:
            continue
        fraction = float(np.clip(base * rng.uniform(1 - jitter, 1 + jitter), 0.0, 1.0))
        widths[group.id] = _rounded_width(group.size, fraction, step)
    return widths


def uniform_group_widths(groups: Sequence[Any], fraction: float, step: int = 8) -> dict[int, int]:
    """Each prunable group keeps ``fraction`` of its channels, rounded to ``step``."""
    return {g.id: _rounded_width(g.size, fraction, step) for g in groups if g.prunable}


def _rounded_width(size: int, fraction: float, step: int) -> int:
    if size <= step:
        return size
    width = int(round(fraction * size / step)) * step
    return int(min(size, max(step, width)))


def compact_at_widths(analysis: Any, model: nn.Module, group_widths: Mapping[int, int]) -> nn.Module:
    """A compact copy of ``model`` whose groups keep their first ``group_widths[id]``
    channels (groups absent keep all). For latency only the counts matter."""
    from ..passes.export import remove_channels

    kept = {gid: np.arange(width) for gid, width in group_widths.items()}
    return remove_channels(analysis, model, kept)


def model_key(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> str:
    """What identifies a model's architecture for the calibration cache."""
    return json.dumps({"class": f"{type(model).__module__}.{type(model).__qualname__}", "repr": repr(model),
                       "inputs": [[list(t.shape), str(t.dtype)] for t in inputs]})


def calibration_samples(target: Target, model: nn.Module, inputs: tuple[torch.Tensor, ...], analysis: Any,
                        table: LatencyTable, cache: LatencyCache, reference: Reference, *, step: int, seed: int,
                        random_count: int, warmup: int, rounds: int, progress: bool) -> list[dict[str, Any]]:
    """Load-robust whole-model ms at the calibration configurations, with their widths: one sample
    ``{"widths": {layer: [in, out]}, "ms": ms}`` per configuration. The configurations are the
    dense model alone without ``analysis``; with it, the uniform widths of
    ``CALIBRATION_FRACTIONS`` and ``random_count`` random widths (seeded by ``seed``), rounded to
    ``step``. Timings are read from ``cache`` or timed (``warmup`` untimed calls and ``rounds``
    rounds each) interleaved with each other and the reference layer, scaled to its level
    (:meth:`Reference.measure <spruce.runtime.measure.Reference.measure>`), and cached."""
    configs: list[dict[int, int]] = [{}]
    if analysis is not None:
        groups = analysis.groups
        configs = [uniform_group_widths(groups, f, step) for f in CALIBRATION_FRACTIONS]
        rng = np.random.default_rng(10_000 + seed)
        configs += [random_group_widths(groups, rng, step) for _ in range(random_count)]
    architecture = model_key(model, inputs)
    cached = cache.read("model", architecture)
    keys = [json.dumps(sorted(widths.items())) for widths in configs]
    compacts = [compact_at_widths(analysis, model, widths) if widths else model for widths in configs]
    missing = [k for k, key in enumerate(keys) if key not in cached]
    if missing:
        if progress:
            print(f"profile: timing {len(missing)} whole models for the calibration", flush=True)
        measured = reference.measure(target, [(compacts[k], inputs) for k in missing], warmup, rounds)
        fresh = {keys[k]: ms for k, ms in zip(missing, measured)}
        cache.write("model", architecture, fresh)
        cached.update(fresh)
    return [{"widths": {n: list(w) for n, w in table.widths_of(compact).items()}, "ms": cached[key]}
            for compact, key in zip(compacts, keys)]


def call_cost_ms(target: Target, cache: LatencyCache, reference: Reference, warmup: int, rounds: int) -> float | None:
    """The target's measured per-call cost (ms) of a lone layer, or None where the target gives
    no case for it (:meth:`~spruce.targets.base.Target.call_cost_case`): its no-work layer timed
    like the points, interleaved with and scaled to the reference layer, cached with them."""
    case = target.call_cost_case()
    if case is None:
        return None
    cached = cache.read("model", "call cost").get("ms")
    if cached is not None:
        return cached
    ms = reference.measure(target, [case], warmup, rounds)[0]
    cache.write("model", "call cost", {"ms": ms})
    return ms


def fixed_costs(table: LatencyTable, call_ms: float | None = None) -> dict[str, float]:
    """Per layer signature, the fixed cost (ms) of one isolated run: ``call_ms`` (the target's
    measured per-call cost, :func:`call_cost_ms`) where given, else the measured points fitted
    by ``a + b in + c out + d in out`` (``a + b c`` for a depthwise layer) in least squares,
    ``a``; either clipped to [0, the signature's fastest point]."""
    depthwise = {e.signature: e.depthwise for e in table.layers.values()}
    fixed = {}
    for signature, points in table.points.items():
        if not points:
            continue
        grid = np.array(list(points), dtype=np.float64)
        ms = np.array(list(points.values()))
        if call_ms is not None:
            fixed[signature] = float(np.clip(call_ms, 0.0, ms.min()))
            continue
        if depthwise.get(signature, False) or len(points) < 4:
            design = np.c_[np.ones(len(grid)), grid[:, 0]]
        else:
            design = np.c_[np.ones(len(grid)), grid[:, 0], grid[:, 1], grid[:, 0] * grid[:, 1]]
        intercept = float(np.linalg.lstsq(design, ms, rcond=None)[0][0]) if len(points) >= design.shape[1] else 0.0
        fixed[signature] = float(np.clip(intercept, 0.0, ms.min()))
    return fixed


def fit_calibration(table: LatencyTable, samples: Sequence[Mapping[str, Any]],
                    call_ms: float | None = None, by_family: bool = False) -> Calibration:
    """Fit ``scale``, ``ms_per_melement``, ``ms_per_mweight`` and ``overhead_ms`` to
    whole-model measurements by non-negative least squares on relative errors (every sample
    weighs by its relative error); isolated timings enter less their signature's fixed cost
    (:func:`fixed_costs` with ``call_ms``).

    With ``by_family``, each layer family of the table (:attr:`LayerEntry.family
    <spruce.runtime.table.LayerEntry.family>`: depthwise, pointwise, conv, linear, recurrent)
    gets its own scale (``Calibration.family_scale``) when the table has more than one family
    and there are at least as many samples as coefficients; ``scale`` then keeps the one-scale
    fit's value for reference. A lone layer's timing relates to its share of the whole model
    differently per kernel family, which one scale cannot hold: measured on ONNX Runtime's INT8
    kernels (mobilenet_v2 at 224, its node profiler in the whole graph against the same layers
    timed alone, three configurations), a 1x1 QLinearConv ran 0.5-0.8 of its lone time in the
    graph, a depthwise one 0.55-0.85 (0.8-1.35 at channel counts not a multiple of 16), the
    first 3x3 convolution 1.1-1.4.

    Every coefficient of the result is >= 0 and ``scale`` > 0, so no configuration's
    prediction and no layer's share can be negative. Without samples the identity calibration
    (scale 1, no fixed costs) is returned; with fewer than four, scale alone is fitted.
    Raises :class:`ProfileError` for a sample with a non-positive or non-finite time."""
    if not samples:
        return Calibration()
    base = Calibration(fixed_ms=fixed_costs(table, call_ms))
    families = sorted({entry.family for entry in table.layers.values()})
    features, measured = [], []
    for sample in samples:
        ms = sample["ms"]
        check_finite("calibration sample time (ms)", ms)
        if ms <= 0:
            raise ProfileError(f"calibration sample time must be a positive number of ms, got {ms!r}")
        widths = {n: tuple(w) for n, w in sample["widths"].items()}
        by_kind = dict.fromkeys(families, 0.0)
        isolated = elements = weights = 0.0
        for name, entry in table.layers.items():
            active_in, active_out = widths.get(name, (entry.in_channels, entry.out_channels))
            net = entry.calls * base.net_ms(entry.signature, table.isolated_ms(name, active_in, active_out))
            isolated += net
            by_kind[entry.family] += net
            elements += entry.calls * (active_in * entry.in_elements + active_out * entry.out_elements) / 1e6
            weights += entry.calls * entry.weight_elements(active_in, active_out) / 1e6
        features.append((isolated, elements, weights, 1.0, *by_kind.values()))
        measured.append(float(ms))
    design = np.asarray(features) / np.asarray(measured)[:, None]
    coef = _fit_one_scale(design[:, :4])
    count = len(families)
    per_family = np.c_[design[:, 4:], design[:, 1:4]]
    family_scale: dict[str, float] = {}
    if by_family and count > 1 and len(samples) >= per_family.shape[1]:
        fitted = nonnegative_least_squares(per_family, np.ones(len(measured)))
        if (fitted[:count] > 0).any():
            family_scale = dict(zip(families, map(float, fitted[:count])))
            coef = np.r_[coef[0], fitted[count:]]
    return Calibration(scale=float(coef[0]), ms_per_melement=float(coef[1]), overhead_ms=float(coef[3]),
                       samples=tuple(samples), fixed_ms=base.fixed_ms, ms_per_mweight=float(coef[2]),
                       family_scale=family_scale)


def _fit_one_scale(a: np.ndarray) -> np.ndarray:
    """(scale, ms per M elements, ms per M weights, overhead) of the relative design ``a`` (one row per
    sample: isolated, elements, weights, 1, each over the measured ms): all four with at least four
    samples, else scale alone; scale alone too where the fit would ignore the layers' timings."""
    b = np.ones(len(a))
    columns = [0, 1, 2, 3] if len(a) >= 4 else [0]
    coef = np.zeros(4)
    coef[columns] = nonnegative_least_squares(a[:, columns], b)
    if not coef[0] > 0:  # a fit that ignores the layers' timings cannot rank configurations: scale alone
        coef = np.zeros(4)
        coef[0] = nonnegative_least_squares(a[:, [0]], b)[0]
    if not coef[0] > 0:
        coef[0] = 1.0  # every isolated timing is within its fixed cost: nothing to scale
    return coef


def nonnegative_least_squares(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``argmin ||a x - b||`` subject to ``x >= 0``, exactly, for a few columns.

    The solution is the unconstrained least-squares solution on its support (the columns
    with x > 0), so every support is tried and the best feasible one kept (2^columns
    solves; meant for the calibration's three). Raises ``ValueError`` for more than 12 columns."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    rows, cols = a.shape
    if cols > 12:
        raise ValueError(f"nonnegative_least_squares enumerates supports: at most 12 columns, got {cols}")
    best, best_residual = np.zeros(cols), float(b @ b)
    for mask in range(1, 2 ** cols):
        support = [c for c in range(cols) if mask >> c & 1]
        coef, *_ = np.linalg.lstsq(a[:, support], b, rcond=None)
        if (coef < 0).any():
            continue
        x = np.zeros(cols)
        x[support] = coef
        residual = float(np.sum((a @ x - b) ** 2))
        if residual < best_residual - 1e-15:
            best, best_residual = x, residual
    return best
