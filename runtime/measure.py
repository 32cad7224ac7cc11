"""Measuring a layer's isolated latency: single-layer cases at given channel counts, timed in chunks
interleaved with a reference layer, with load bursts timed again.

A layer is timed as a one-layer model through :meth:`~spruce.targets.base.Target.measure_models`, so a
target's own way to build and run a model (:meth:`~spruce.targets.base.Target.model_runner`) applies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..targets.base import Target
from .cache import LatencyCache, point_key
from .options import OUTLIER_RETRIES, POINTS_PER_BATCH
from .table import LayerEntry

__all__ = [
    "OUTLIER_RETRIES",
    "OUTLIER_TOLERANCE",
    "POINTS_PER_BATCH",
    "Reference",
    "SequenceOutput",
    "layer_case",
    "measure_layers",
    "measure_points",
    "resized_layer",
    "time_layer",
]

# A measured point slower by this fraction than one with more channels is timed again (load bursts);
# POINTS_PER_BATCH and OUTLIER_RETRIES are the options' defaults (spruce.runtime.options)
OUTLIER_TOLERANCE = 0.15


class SequenceOutput(nn.Module):
    """A recurrent layer returning its output sequence only (what a model reads of it; the final
    states stay out of the timed graph's outputs)."""

    def __init__(self, recurrent: nn.RNNBase):
        super().__init__()
        self.recurrent = recurrent

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.recurrent(x)[0]


def resized_layer(layer: nn.Module, active_in: int, active_out: int) -> nn.Module:
    """A fresh layer like ``layer`` (same kind and hyper-parameters) with the given channel counts.

    A depthwise convolution (one input channel per group) keeps its channel multiplier, so its
    group count follows ``active_in`` and ``active_out`` must be ``active_in`` times the multiplier;
    any other grouped convolution keeps its group count, so both counts must be multiples of it.
    Weights are random (their values do not matter for dense kernels' latency). Raises
    ``ValueError`` for another layer type or channel counts the layer cannot take.
    """
    for label, count in (("active_in", active_in), ("active_out", active_out)):
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"{label} must be a positive integer, got {count!r}")
    factory = {"dtype": layer.weight.dtype} if isinstance(getattr(layer, "weight", None), torch.Tensor) else {}
    if isinstance(layer, nn.Linear):
        return nn.Linear(active_in, active_out, bias=layer.bias is not None, **factory)
    if type(layer) in (nn.LSTM, nn.GRU, nn.RNN):
        if getattr(layer, "proj_size", 0):
            raise ValueError(f"cannot time a {type(layer).__name__} with proj_size {layer.proj_size}")
        extra = {"nonlinearity": layer.nonlinearity} if isinstance(layer, nn.RNN) else {}
        factory = {"dtype": layer.weight_ih_l0.dtype}
        return SequenceOutput(type(layer)(active_in, active_out, layer.num_layers, bias=layer.bias,
                                          batch_first=layer.batch_first, bidirectional=layer.bidirectional,
                                          **extra, **factory))
    if type(layer) not in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                           nn.ConvTranspose3d):
        raise ValueError(f"cannot time a layer of type {type(layer).__name__}: "
                         "expected Conv1d/2d/3d, ConvTranspose1d/2d/3d, Linear, LSTM, GRU or RNN")
    groups = layer.groups
    if groups > 1 and layer.in_channels == groups:  # depthwise: groups follow the channels
        multiplier = layer.out_channels // groups
        if active_out != active_in * multiplier:
            raise ValueError(f"depthwise convolution with channel multiplier {multiplier}: active_out must be "
                             f"{multiplier} x active_in = {active_in * multiplier}, got {active_out}")
        groups = active_in
    elif active_in % groups or active_out % groups:
        raise ValueError(f"grouped convolution with {groups} groups: active_in ({active_in}) and active_out "
                         f"({active_out}) must be multiples of {groups}")
    extra = {"output_padding": layer.output_padding} if layer.transposed else {}
    return type(layer)(active_in, active_out, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                       dilation=layer.dilation, groups=groups, bias=layer.bias is not None,
                       padding_mode=layer.padding_mode, **extra, **factory)


def layer_case(layer: nn.Module, input_shape: Sequence[int], active_in: int, active_out: int,
               batch_size: int | None = None) -> tuple[nn.Module, torch.Tensor]:
    """A fresh eval-mode layer like ``layer`` with the given channel counts (:func:`resized_layer`)
    and a seeded random input for it (``input_shape`` with its channel dim, 1 for a convolution and
    the last for a linear or recurrent layer, set to ``active_in`` and, when given, its batch dim
    (1 for a time-major recurrent layer, else 0) to ``batch_size``). Raises ``ValueError`` for an
    empty shape, a bad batch size or channel counts the layer cannot take."""
    resized = resized_layer(layer, active_in, active_out)
    shape = list(input_shape)
    if not shape:
        raise ValueError("time_layer: input_shape is empty")
    recurrent = isinstance(layer, nn.RNNBase)
    channel_dim = -1 if isinstance(layer, nn.Linear) or recurrent else 1
    shape[channel_dim] = active_in
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"time_layer: batch_size must be a positive integer, got {batch_size!r}")
        shape[1 if recurrent and not layer.batch_first else 0] = batch_size
    dtype = next(resized.parameters()).dtype
    example = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    return resized.eval(), example


def time_layer(target: Target, layer: nn.Module, input_shape: Sequence[int], active_in: int, active_out: int,
               batch_size: int | None = None, warmup: int = 10, repeats: int = 50) -> np.ndarray:
    """Seconds per forward (shape ``(repeats,)``) of one layer shaped like ``layer`` with
    ``active_in``/``active_out`` channels on ``target``.

    ``layer`` (a Conv1d/2d/3d or ConvTranspose1d/2d/3d, grouped or depthwise, a Linear, or an
    LSTM/GRU/RNN without ``proj_size``, timed over (input features, hidden size)) gives the
    kind and the hyper-parameters (kernel, stride, padding, dilation, groups, bias, dtype);
    ``input_shape`` is its full input shape, whose batch dim is replaced by ``batch_size`` when given
    (:func:`layer_case`). The layer is built fresh with random weights and timed through
    :meth:`~spruce.targets.base.Target.time_model`, so the target's own timing path applies.
    Raises ``ValueError`` for channel counts the layer cannot take (see :func:`resized_layer`).
    """
    resized, example = layer_case(layer, input_shape, active_in, active_out, batch_size)
    return target.time_model(resized, (example,), warmup, repeats)


class Reference:
    """The reference layer: timed interleaved with every chunk of points and with the
    calibration models, whose figures are then scaled by ``level / the reference's figure in
    that run``. The machine's speed drifts while a profile runs (noisy neighbours, frequency:
    the dense mobilenet_v2 measured 5.5 ms and, minutes later, 7.9 ms, with run-queue waiting
    excluded); without the reference, signatures timed minutes apart carry different speeds
    into one table. The level is the reference's first figure under this cache's fingerprint,
    kept in the cache, so points cached by an earlier run stay on the same scale. The
    reference is the full-width point of the signature with the most multiply-accumulates
    (the steadiest figure)."""

    def __init__(self, signature: str, layer: nn.Module, input_shape: tuple[int, ...], point: tuple[int, int],
                 cache: LatencyCache):
        self.signature, self.point, self.cache = signature, point, cache
        self.case = (layer, input_shape, point)
        self._key = f"{signature}@{point_key(*point)}"
        self.level: float | None = cache.read("reference", self._key).get("ms")

    @classmethod
    def of(cls, entries: Mapping[str, LayerEntry], prototypes: Mapping[str, tuple], cache: LatencyCache) -> Reference:
        """The reference of a profile: the full-width point of the entry with the most multiply-accumulates
        (ties broken by signature); ``prototypes[signature]`` is a (layer, input shape) of that signature."""
        entry = max(entries.values(), key=lambda e: (e.weight_elements(e.in_channels, e.out_channels)
                                                    * e.out_elements, e.signature))
        layer, input_shape = prototypes[entry.signature]
        return cls(entry.signature, layer, tuple(input_shape), (entry.in_channels, entry.out_channels), cache)

    def factor(self, measured_ms: float) -> float:
        """``level / measured_ms`` for the reference's figure in one run (the first one sets the level)."""
        if self.level is None:
            self.level = measured_ms
            self.cache.write("reference", self._key, {"ms": measured_ms})
        return self.level / measured_ms if measured_ms > 0 else 1.0

    def measure(self, target: Target, cases: Sequence[tuple[nn.Module, Sequence[torch.Tensor]]], warmup: int,
                rounds: int) -> list[float]:
        """Load-robust ms of each (model, example inputs) case, timed interleaved with each other and
        with the reference layer (appended last, :meth:`Target.measure_models
        <spruce.targets.base.Target.measure_models>`) and scaled to the reference's level."""
        layer, input_shape, (active_in, active_out) = self.case
        reference_layer, example = layer_case(layer, input_shape, active_in, active_out)
        timings = target.measure_models([*cases, (reference_layer, (example,))], warmup, rounds)
        factor = self.factor(timings[-1].robust_ms())
        return [factor * timing.robust_ms() for timing in timings[:-1]]


def measure_points(target: Target, entries: Mapping[str, LayerEntry], prototypes: Mapping[str, tuple],
                   cache: LatencyCache, reference: Reference, *, batch_points: int, warmup: int, rounds: int,
                   retries: int, progress: bool) -> dict[str, dict[tuple[int, int], float]]:
    """Load-robust isolated ms of every point the entries need (``[signature][(in, out)]``), each
    (signature, point) timed once: read from ``cache`` or timed in chunks of ``batch_points``
    (:func:`measure_layers`, ``warmup`` untimed calls and ``rounds`` rounds each) and written to it
    chunk by chunk; a fresh point slower than one with more channels is timed again up to
    ``retries`` times, keeping the lower value. ``prototypes[signature]`` is a (layer, input
    shape) of that signature."""
    wanted: dict[str, set[tuple[int, int]]] = {}
    for entry in entries.values():
        wanted.setdefault(entry.signature, set()).update(entry.points())
    points: dict[str, dict[tuple[int, int], float]] = {}
    todo: dict[str, list[tuple[int, int]]] = {}
    for signature, needed in wanted.items():
        cached = cache.read("layer", signature)
        points[signature] = {}
        for point in sorted(needed):
            key = point_key(*point)
            if key in cached:
                points[signature][point] = cached[key]
            else:
                todo.setdefault(signature, []).append(point)
    total = sum(map(len, todo.values()))
    with tqdm(total=total, desc="profile layers", unit="point", disable=not progress or not total) as bar:
        for signature, batch in todo.items():
            for start in range(0, len(batch), batch_points):
                chunk = batch[start:start + batch_points]
                measured = measure_layers(target, *prototypes[signature], chunk, reference, warmup, rounds)
                points[signature].update(measured)
                # persisted as measured: a killed run keeps every chunk it finished
                cache.write("layer", signature, {point_key(*point): ms for point, ms in measured.items()})
                bar.update(len(chunk))
    # A burst of load can still inflate a point; such a point costs more than a point with more
    # channels in both dims. Time those again and keep the lower value (a real non-monotonic
    # point stays: it is slow every time).
    for _ in range(retries):
        suspects: dict[str, set[tuple[int, int]]] = {}
        for entry in entries.values():
            fresh = set(todo.get(entry.signature, ()))
            for point in _non_monotonic(entry.points(), points[entry.signature]):
                if point in fresh:
                    suspects.setdefault(entry.signature, set()).add(point)
        for signature, again in suspects.items():
            retimed = measure_layers(target, *prototypes[signature], sorted(again), reference, warmup, rounds)
            for point, ms in retimed.items():
                points[signature][point] = min(points[signature][point], ms)
    for signature, done in todo.items():
        cache.write("layer", signature, {point_key(*p): points[signature][p] for p in done})
    return points


def measure_layers(target: Target, layer: nn.Module, input_shape: Sequence[int], points: Sequence[tuple[int, int]],
                   reference: Reference, warmup: int = 3, rounds: int = 20) -> dict[tuple[int, int], float]:
    """Load-robust ms of ``layer`` at each (active in, active out) point of ``points`` (one fresh layer
    per point, :func:`layer_case`), timed interleaved with each other and the reference layer and
    scaled to its level (:meth:`Reference.measure`)."""
    cases = []
    for active_in, active_out in points:
        resized, example = layer_case(layer, input_shape, active_in, active_out)
        cases.append((resized, (example,)))
    return dict(zip(map(tuple, points), reference.measure(target, cases, warmup, rounds)))


def _non_monotonic(wanted: Sequence[tuple[int, int]], measured: Mapping[tuple[int, int], float],
                   tolerance: float = OUTLIER_TOLERANCE) -> list[tuple[int, int]]:
    """Points slower by more than ``tolerance`` than a point with at least as many channels in both dims."""
    pts = sorted(set(wanted))
    values = np.array([measured[p] for p in pts])
    arr = np.array(pts)
    suspects = []
    for k, (i, o) in enumerate(pts):
        larger = (arr[:, 0] >= i) & (arr[:, 1] >= o)
        larger[k] = False
        if larger.any() and values[k] > (1 + tolerance) * values[larger].min():
            suspects.append((i, o))
    return suspects
