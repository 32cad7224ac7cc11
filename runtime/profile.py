"""Per-layer latency profiling on a target and a table that predicts whole-model latency.

``profile(model, example_inputs, target)`` times every prunable layer (Conv1d/2d/3d, ConvTranspose1d/2d/3d,
grouped and depthwise included, and Linear) of ``model`` on the target over a grid of
(active input, active output) channel counts and returns a :class:`LatencyTable`.

How the grid stays cheap without losing accuracy:

- layers with the same *signature* (kind, kernel, stride, padding, groups, dilation,
  input spatial size, batch, dtype) share measured points: a point is timed once;
- per layer, a *coarse* rectangle of channel counts is timed, plus the two *edges*
  (every ``step`` of one axis at the other axis' full width). Latency is close to
  bilinear in (in, out) but has a staircase from vector blocks and thread partitions;
  the prediction is the bilinear interpolation on the coarse grid times the staircase
  ratios measured along each edge (exact on every measured point);
- a dimension no prunable channel group reaches (the first convolution's input, the
  classifier's output) is not varied at all;
- every measured point is cached on disk, keyed by the target's fingerprint and the
  layer signature, so a second run times nothing.

Isolated layers are not the model: each isolated run pays the runtime's per-run cost and
layout conversions and the model has operators that are not profiled layers (pooling,
additions, activations). ``profile`` therefore times a few whole compact models (dense,
uniform widths, random widths) and fits, in relative non-negative least squares,

    predict(widths) = overhead_ms + sum over layers of calls * layer_ms(layer, in, out)
    layer_ms(layer, in, out) = scale * max(isolated_ms(layer, in, out) - fixed_ms[signature], 0)
                               + ms_per_element * activation_elements(in, out)
                               + ms_per_weight * weight_elements(in, out)

``fixed_ms`` is each layer signature's fixed cost per isolated run (its grid extrapolated to
zero channels: thread hand-off, allocation), which the whole model does not pay per layer;
``activation_elements`` counts the layer's input and output activation elements and
``weight_elements`` its weights (which a whole model streams from memory while an isolated
layer finds them in cache). ``scale``, ``ms_per_element``, ``ms_per_weight`` and
``overhead_ms`` are never negative, so neither is any prediction nor any layer's share. The
calibrated ``layer_ms`` is what a knapsack should take differences of.

Timing resists load (:mod:`spruce.targets.timing`): the points of a layer are timed
interleaved with each other in rounds, the calibration models interleaved with each other;
each call's run-queue waiting (time the scheduler gave the CPU to other processes; the mean
over the threads of the process that ran during the call, the runtime's workers included) is
excluded, and a series' value is the mean of its inliers (median +- 3 scaled MADs).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import platform
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import Field
from torch import nn
from tqdm.auto import tqdm

from ..passes.config import Config, ConfigError
from ..targets.base import Target, get_target, layer_case
from ..targets.files import atomic_write_text, locked

__all__ = [
    "Calibration",
    "LatencyTable",
    "LayerEntry",
    "ProfileError",
    "compact_at_widths",
    "default_cache_dir",
    "find_layers",
    "fit_calibration",
    "fixed_costs",
    "nonnegative_least_squares",
    "profile",
    "random_group_widths",
]

TABLE_FORMAT = "spruce-latency-table"
TABLE_VERSION = 2
READABLE_TABLE_VERSIONS = (1, 2)  # version 1 lacks kernel, fixed_ms and ms_per_mweight (read as 1, {}, 0)
# Version 2: points and model timings are load-robust (run-queue waiting excluded, inlier mean);
# version-1 files (wall-clock medians) are not mixed with them.
# Version 3: the waiting excluded is the mean run-queue delay of the threads that ran during a call
# (``ThreadsClock``), no longer the calling thread's alone.
# Version 4: every chunk of points and the calibration models are scaled to the reference
# layer's level (``_Reference``), which the cache keeps.
CACHE_VERSION = 4
PROFILED_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                  nn.Linear)
# Uniform widths (fractions of every prunable group) timed whole to calibrate the table.
CALIBRATION_FRACTIONS = (1.0, 0.75, 0.5, 0.25)
# Points of one layer signature timed interleaved at once (bounds the sessions held in memory).
POINTS_PER_BATCH = 16
# A measured point slower by this fraction than one with more channels is timed again (load bursts).
OUTLIER_TOLERANCE = 0.15
OUTLIER_RETRIES = 2


class ProfileError(ConfigError):
    """A model, option or table file that profiling cannot use."""


# --- the table -----------------------------------------------------------------------


@dataclass(frozen=True)
class LayerEntry:
    """One profiled layer of the model: its qualified name, signature and full widths.

    ``in_elements``/``out_elements`` are the activation elements per input/output
    channel (batch included); ``calls`` how often one forward runs the layer. Depthwise
    convolutions have ``multiplier`` = out/in channels; ``groups`` is the group count of
    other grouped convolutions (1 otherwise). ``in_varies``/``out_varies`` say whether a
    prunable channel group reaches that dimension (else only the full width was timed).
    The axes list the channel counts timed: a coarse rectangle plus, when ``edges``, the
    fine axes at the other dimension's full width.
    """

    name: str
    signature: str
    in_channels: int
    out_channels: int
    groups: int = 1
    multiplier: int = 0  # depthwise channel multiplier; 0 for any other layer
    in_elements: int = 1
    out_elements: int = 1
    calls: int = 1
    in_varies: bool = True
    out_varies: bool = True
    in_coarse: tuple[int, ...] = ()
    out_coarse: tuple[int, ...] = ()
    in_fine: tuple[int, ...] = ()
    out_fine: tuple[int, ...] = ()
    kernel: int = 1  # kernel elements (product of the kernel size); 1 for a linear layer

    @property
    def depthwise(self) -> bool:
        return self.multiplier > 0

    def weight_elements(self, active_in: int, active_out: int) -> int:
        """Weights of the layer with the given active channels (biases aside)."""
        if self.depthwise:
            return active_out * self.kernel
        return active_in * active_out * self.kernel // self.groups

    def points(self) -> list[tuple[int, int]]:
        """Every (active in, active out) point this layer's interpolation reads."""
        if self.depthwise:
            return [(c, c * self.multiplier) for c in self.in_fine]
        wanted = {(i, o) for i in self.in_coarse for o in self.out_coarse}
        wanted.update((i, self.out_channels) for i in self.in_fine)
        wanted.update((self.in_channels, o) for o in self.out_fine)
        return sorted(wanted)


@dataclass(frozen=True)
class Calibration:
    """The whole-model correction: ``predict = overhead_ms + sum(calls * layer_ms)`` with
    ``layer_ms = scale * max(isolated_ms - fixed_ms[signature], 0) + ms_per_melement *
    activation_elements / 1e6 + ms_per_mweight * weight_elements / 1e6``.

    ``fixed_ms`` maps a layer signature to the fixed cost every isolated timing of it carries
    (absent: 0). ``samples`` are the whole-model measurements it was fitted on: per sample the
    widths {layer: [in, out]} and the measured ms. Fitted calibrations have every coefficient
    >= 0; a hand-made one may have a negative overhead (tables of version 1 did)."""

    scale: float = 1.0
    ms_per_melement: float = 0.0
    overhead_ms: float = 0.0
    samples: tuple[dict[str, Any], ...] = ()
    fixed_ms: Mapping[str, float] = field(default_factory=dict)
    ms_per_mweight: float = 0.0

    def __post_init__(self) -> None:
        for label in ("scale", "ms_per_melement", "overhead_ms", "ms_per_mweight"):
            _check_finite(f"calibration {label}", getattr(self, label))
        for signature, ms in self.fixed_ms.items():
            _check_finite(f"calibration fixed_ms[{signature!r}]", ms)
            if ms < 0:
                raise ProfileError(f"calibration fixed_ms[{signature!r}] must be >= 0, got {ms!r}")
        object.__setattr__(self, "fixed_ms", {str(k): float(v) for k, v in self.fixed_ms.items()})

    def net_ms(self, signature: str, isolated_ms: float) -> float:
        """An isolated timing less its signature's fixed cost (never below 0)."""
        return max(isolated_ms - self.fixed_ms.get(signature, 0.0), 0.0)


def _check_finite(label: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProfileError(f"{label} must be a finite number, got {value!r}")


class LatencyTable:
    """Predicted latency (ms, at the profiled batch size) of any channel configuration.

    ``layers`` maps each profiled layer's qualified name to its :class:`LayerEntry`;
    ``points[signature][(in, out)]`` holds the measured isolated median ms;
    ``fingerprint`` is the target's, so a table is never used for another target.
    Invariant: ``predict(w) == calibration.overhead_ms + sum(calls * layer_ms(...))``.
    """

    def __init__(self, layers: Mapping[str, LayerEntry], points: Mapping[str, Mapping[tuple[int, int], float]],
                 fingerprint: Mapping[str, str], calibration: Calibration | None = None,
                 step: int = 8, info: Mapping[str, Any] | None = None):
        self.layers: dict[str, LayerEntry] = dict(layers)
        self.points = {sig: dict(pts) for sig, pts in points.items()}
        self.fingerprint: dict[str, str] = {str(k): str(v) for k, v in fingerprint.items()}
        self.calibration = calibration or Calibration()
        self.step = step
        self.info: dict[str, Any] = dict(info or {})
        self._grids = {name: _LayerGrid(entry, self.points.get(entry.signature, {}))
                       for name, entry in self.layers.items()}

    # -- prediction --

    def isolated_ms(self, name: str, active_in: int, active_out: int) -> float:
        """The layer's isolated latency (ms) interpolated from the measured points."""
        entry = self._entry(name)
        active_in, active_out = self._checked(entry, active_in, active_out)
        return self._grids[name](active_in, active_out)

    def layer_ms(self, name: str, active_in: int, active_out: int) -> float:
        """The layer's share (ms) of the whole-model latency with the given active channels:
        its calibrated isolated latency plus its activations' memory cost, per call."""
        entry = self._entry(name)
        active_in, active_out = self._checked(entry, active_in, active_out)
        cal = self.calibration
        elements = active_in * entry.in_elements + active_out * entry.out_elements
        return (cal.scale * cal.net_ms(entry.signature, self._grids[name](active_in, active_out))
                + cal.ms_per_melement * elements / 1e6
                + cal.ms_per_mweight * entry.weight_elements(active_in, active_out) / 1e6)

    def predict(self, widths: Mapping[str, tuple[int, int]] | None = None) -> float:
        """Whole-model latency (ms) with ``widths[name] = (active_in, active_out)``;
        layers not given are at full width. Raises :class:`ProfileError` for an unknown
        layer name or a width outside [1, full]."""
        widths = dict(widths or {})
        unknown = [name for name in widths if name not in self.layers]
        if unknown:
            raise ProfileError(_unknown_layer_message(unknown[0], self.layers))
        total = self.calibration.overhead_ms
        for name, entry in self.layers.items():
            active_in, active_out = widths.get(name, (entry.in_channels, entry.out_channels))
            total += entry.calls * self.layer_ms(name, active_in, active_out)
        return total

    def predict_model(self, model: nn.Module) -> float:
        """Latency (ms) of a compact model whose layers keep the profiled module names."""
        return self.predict(model_widths(model, self.layers))

    def dense_ms(self) -> float:
        """Predicted latency (ms) of the model at full width."""
        return self.predict()

    def widths_of(self, model: nn.Module) -> dict[str, tuple[int, int]]:
        """(in, out) channels of every profiled layer as found in ``model``."""
        return model_widths(model, self.layers)

    # -- persistence --

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": TABLE_FORMAT,
            "version": TABLE_VERSION,
            "fingerprint": self.fingerprint,
            "step": self.step,
            "info": self.info,
            "calibration": asdict(self.calibration),
            "layers": [_entry_record(entry) for entry in self.layers.values()],
            "points": {sig: [[i, o, ms] for (i, o), ms in sorted(pts.items())] for sig, pts in self.points.items()},
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the table as JSON to ``path`` atomically; return the path."""
        path = Path(path)
        if path.parent and not path.parent.is_dir():
            raise ProfileError(f"cannot write latency table {path}: folder {path.parent} does not exist")
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, expected_fingerprint: Mapping[str, str] | None = None) -> LatencyTable:
        """The table saved at ``path``. With ``expected_fingerprint`` (a target's), a table
        profiled on another target, machine or library version is refused."""
        path = Path(path)
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ProfileError(f"cannot read latency table {path}: {exc.strerror or exc}") from exc
        except ValueError as exc:
            raise ProfileError(f"latency table {path} is not valid JSON: {exc}") from exc
        try:
            table = cls.from_dict(document)
        except (KeyError, TypeError, ValueError) as exc:
            raise ProfileError(f"latency table {path} is not a valid spruce latency table: {exc}") from exc
        if expected_fingerprint is not None:
            check_fingerprint(table.fingerprint, expected_fingerprint, f"latency table {path}")
        return table

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> LatencyTable:
        if document.get("format") != TABLE_FORMAT:
            raise ValueError(f"format is {document.get('format')!r}, not {TABLE_FORMAT!r}")
        if document.get("version") not in READABLE_TABLE_VERSIONS:
            raise ValueError(f"version {document.get('version')!r} is not one of {READABLE_TABLE_VERSIONS}")
        layers = {}
        for record in document["layers"]:
            entry = LayerEntry(**{k: tuple(v) if isinstance(v, list) else v for k, v in record.items()})
            layers[entry.name] = entry
        points = {sig: {(int(i), int(o)): float(ms) for i, o, ms in rows} for sig, rows in document["points"].items()}
        cal = dict(document.get("calibration", {}))
        cal["samples"] = tuple(cal.get("samples", ()))
        table = cls(layers, points, document["fingerprint"], Calibration(**cal), int(document.get("step", 8)),
                    document.get("info", {}))
        for entry in layers.values():
            missing = [p for p in entry.points() if p not in points.get(entry.signature, {})]
            if missing:
                raise ValueError(f"layer {entry.name!r} lacks measured points {missing[:3]}")
        return table

    # -- helpers --

    def _entry(self, name: str) -> LayerEntry:
        try:
            return self.layers[name]
        except KeyError:
            raise ProfileError(_unknown_layer_message(name, self.layers)) from None

    @staticmethod
    def _checked(entry: LayerEntry, active_in: int, active_out: int) -> tuple[int, int]:
        for label, value, full in (("in", active_in, entry.in_channels), ("out", active_out, entry.out_channels)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= full:
                raise ProfileError(f"layer {entry.name!r}: active {label} channels must be an integer in "
                                   f"[1, {full}], got {value!r}")
        if entry.depthwise and active_out != active_in * entry.multiplier:
            raise ProfileError(f"layer {entry.name!r} is depthwise (multiplier {entry.multiplier}): active out "
                               f"must be {entry.multiplier} x active in = {active_in * entry.multiplier}, "
                               f"got {active_out}")
        return int(active_in), int(active_out)

    def __repr__(self) -> str:
        return (f"LatencyTable({len(self.layers)} layers, {sum(map(len, self.points.values()))} points, "
                f"dense {self.dense_ms():.3f} ms, target {self.fingerprint.get('target')!r})")


class _LayerGrid:
    """Interpolation of one layer's isolated latency: bilinear on the coarse rectangle
    times the staircase ratios measured along the two full-width edges."""

    def __init__(self, entry: LayerEntry, points: Mapping[tuple[int, int], float]):
        self.entry = entry
        self.points = points
        if entry.depthwise:
            self.fine_in = np.asarray(entry.in_fine, dtype=float)
            self.fine_ms = np.array([points.get((c, c * entry.multiplier), np.nan) for c in entry.in_fine])
            return
        self.in_axis = np.asarray(entry.in_coarse, dtype=float)
        self.out_axis = np.asarray(entry.out_coarse, dtype=float)
        self.grid = np.array([[points.get((i, o), np.nan) for o in entry.out_coarse] for i in entry.in_coarse])
        full_in, full_out = entry.in_channels, entry.out_channels
        self.in_fine = np.asarray(entry.in_fine, dtype=float)
        self.out_fine = np.asarray(entry.out_fine, dtype=float)
        self.in_ratio = np.array([points.get((i, full_out), np.nan) / self._bilinear(i, full_out)
                                  for i in entry.in_fine])
        self.out_ratio = np.array([points.get((full_in, o), np.nan) / self._bilinear(full_in, o)
                                   for o in entry.out_fine])

    def _bilinear(self, active_in: float, active_out: float) -> float:
        rows = np.array([np.interp(active_out, self.out_axis, row) for row in self.grid])
        return float(np.interp(active_in, self.in_axis, rows))

    def __call__(self, active_in: int, active_out: int) -> float:
        if self.entry.depthwise:
            return float(np.interp(active_in, self.fine_in, self.fine_ms))
        value = self._bilinear(active_in, active_out)
        if self.in_fine.size:
            value *= float(np.interp(active_in, self.in_fine, self.in_ratio))
        if self.out_fine.size:
            value *= float(np.interp(active_out, self.out_fine, self.out_ratio))
        return value


def model_widths(model: nn.Module, layers: Mapping[str, LayerEntry]) -> dict[str, tuple[int, int]]:
    """(in, out) channels of each layer in ``layers`` as found in ``model`` (a compact
    model from channel removal, possibly a train/eval :class:`ModeSwitch`)."""
    modules = dict(model.named_modules())
    inner = getattr(model, "eval_graph", None)
    if isinstance(inner, nn.Module):
        modules.update(inner.named_modules())
    widths = {}
    for name in layers:
        module = modules.get(name)
        if module is None:
            raise ProfileError(f"model has no module {name!r} of the profiled model")
        if isinstance(module, nn.Linear):
            widths[name] = (module.in_features, module.out_features)
        elif isinstance(module, PROFILED_TYPES):
            widths[name] = (module.in_channels, module.out_channels)
        else:
            raise ProfileError(f"module {name!r} is a {type(module).__name__}, not a profiled layer type")
    return widths


def check_fingerprint(found: Mapping[str, str], expected: Mapping[str, str], what: str) -> None:
    """Raise :class:`ProfileError` naming every difference when two fingerprints differ."""
    if dict(found) == dict(expected):
        return
    keys = sorted(set(found) | set(expected))
    diffs = "; ".join(f"{k} is {found.get(k)!r} there, {expected.get(k)!r} here"
                      for k in keys if found.get(k) != expected.get(k))
    raise ProfileError(f"{what} was profiled on another target/machine: {diffs}")


def _unknown_layer_message(name: str, layers: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(layers), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown layer {name!r}: not a profiled layer of this table{hint}"


def _entry_record(entry: LayerEntry) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(entry).items()}


# --- finding the layers ----------------------------------------------------------------


@dataclass
class _Found:
    module: nn.Module
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    dtype: torch.dtype
    calls: int = 1


def find_layers(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> dict[str, _Found]:
    """Every Conv1d/2d/3d, ConvTranspose1d/2d/3d and Linear module a forward on ``example_inputs`` calls, with its
    input/output shapes and call count, in call order. Raises :class:`ProfileError` when a
    shared module is called with different input shapes, or a layer unbatched (a Conv input
    without its batch dimension, a 1-D Linear input)."""
    names = {module: name for name, module in model.named_modules(remove_duplicate=True)}
    found: dict[str, _Found] = {}

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        name = names[module]
        x = args[0]
        if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor):
            return
        batched_rank = 2 if isinstance(module, nn.Linear) else len(module.kernel_size) + 2
        if x.dim() < batched_rank:
            raise ProfileError(f"layer {name!r} ({type(module).__name__}) is called unbatched, with input shape "
                               f"{tuple(x.shape)}: a profiled layer is timed at a batch size, so give the example "
                               f"input a batch dimension first")
        if name in found:
            if tuple(x.shape) != found[name].input_shape:
                raise ProfileError(f"layer {name!r} is called with input shapes {found[name].input_shape} and "
                                   f"{tuple(x.shape)}: a profiled layer must see one shape")
            found[name].calls += 1
        else:
            found[name] = _Found(module, tuple(x.shape), tuple(output.shape), x.dtype)

    handles = [m.register_forward_hook(hook) for m in names if type(m) in PROFILED_TYPES]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return found


def layer_signature(module: nn.Module, input_shape: Sequence[int], dtype: torch.dtype) -> str:
    """What a layer's latency depends on besides its channel counts."""
    batch = input_shape[0]
    dtype_name = str(dtype).removeprefix("torch.")
    if isinstance(module, nn.Linear):
        return f"Linear(bias={module.bias is not None})|rows={list(input_shape[1:-1])}|batch={batch}|{dtype_name}"
    if module.groups > 1 and module.in_channels == module.groups:
        groups = f"depthwise*{module.out_channels // module.groups}"
    else:
        groups = str(module.groups)
    output_padding = f",op={list(module.output_padding)}" if module.transposed else ""
    return (f"{type(module).__name__}(k={list(module.kernel_size)},s={list(module.stride)},p={module.padding},"
            f"d={list(module.dilation)},g={groups},bias={module.bias is not None},pad={module.padding_mode}"
            f"{output_padding})"
            f"|in={list(input_shape[2:])}|batch={batch}|{dtype_name}")


def _fine_axis(full: int, quantum: int) -> tuple[int, ...]:
    """Multiples of ``quantum`` below ``full``, and ``full``."""
    return (*range(quantum, full, quantum), full)


def _coarse_axis(fine: Sequence[int], count: int) -> tuple[int, ...]:
    """About ``count`` points of ``fine``, evenly spread, always its first and last."""
    if len(fine) <= count:
        return tuple(fine)
    picks = np.unique(np.round(np.linspace(0, len(fine) - 1, count)).astype(int))
    return tuple(int(fine[i]) for i in picks)


def _make_entry(name: str, found: _Found, step: int, coarse: int, edges: bool,
                in_unit: int, out_unit: int) -> LayerEntry:
    """The layer's entry; ``in_unit``/``out_unit`` as from :func:`_varying_dims` (0: fixed)."""
    in_varies, out_varies = in_unit > 0, out_unit > 0
    module = found.module
    linear = isinstance(module, nn.Linear)
    full_in = module.in_features if linear else module.in_channels
    full_out = module.out_features if linear else module.out_channels
    groups = 1 if linear else module.groups
    depthwise = groups > 1 and full_in == groups
    in_elements = math.prod(found.input_shape) // full_in
    out_elements = math.prod(found.output_shape) // full_out
    common = dict(name=name, signature=layer_signature(module, found.input_shape, found.dtype),
                  in_channels=full_in, out_channels=full_out, in_elements=in_elements, out_elements=out_elements,
                  calls=found.calls, kernel=1 if linear else math.prod(module.kernel_size))
    if depthwise:
        varies = in_varies or out_varies
        fine = _fine_axis(full_in, step * max(in_unit, out_unit)) if varies else (full_in,)
        return LayerEntry(**common, groups=groups, multiplier=full_out // full_in, in_varies=varies,
                          out_varies=varies, in_fine=fine)
    fine_in = _fine_axis(full_in, math.lcm(step * in_unit, groups)) if in_varies else (full_in,)
    fine_out = _fine_axis(full_out, math.lcm(step * out_unit, groups)) if out_varies else (full_out,)
    return LayerEntry(**common, groups=groups, in_varies=in_varies, out_varies=out_varies,
                      in_coarse=_coarse_axis(fine_in, coarse), out_coarse=_coarse_axis(fine_out, coarse),
                      in_fine=fine_in if edges else (), out_fine=fine_out if edges else ())


def _varying_dims(analysis: Any, layers: Mapping[str, _Found]) -> dict[str, tuple[int, int]]:
    """Per layer and dimension (input, output): 0 when channel pruning cannot change it, else
    how many entries of that dimension one pruned channel removes (e.g. 49 for a Linear
    after flattening a 7x7 feature map), so the grid steps by whole channels."""
    units: dict[tuple[str, int], int] = {}
    for group in analysis.groups:
        if group.prunable:
            for member in group.members:
                key = (member.name, member.dim)
                units[key] = max(units.get(key, 1), int(member.index.shape[1]))
    result = {}
    for name, found in layers.items():
        weight = f"{name}.weight" if name else "weight"
        module = found.module
        out_dim, in_dim = (1, 0) if getattr(module, "transposed", False) else (0, 1)  # (in, out / g, *k)
        out_unit, in_unit = units.get((weight, out_dim), 0), units.get((weight, in_dim), 0)
        if not isinstance(module, nn.Linear) and module.groups > 1 and module.in_channels == module.groups:
            in_unit = out_unit  # depthwise: input and output channels go together
        result[name] = (in_unit, out_unit)
    return result


# --- calibration configurations ------------------------------------------------------------


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


# --- cache -----------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$SPRUCE_CACHE`` or ``~/.cache/spruce/latency``."""
    env = os.environ.get("SPRUCE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "spruce" / "latency"


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:20]


class _Cache:
    """Measured points on disk: one JSON file per (target fingerprint, signature) under
    ``<root>/<fingerprint digest>/``, each holding its full fingerprint and signature, so a
    file is only ever used for exactly the fingerprint it was measured with."""

    def __init__(self, root: Path | None, fingerprint: Mapping[str, str]):
        self.fingerprint = dict(fingerprint)
        self.folder = None if root is None else Path(root) / _digest(self.fingerprint)

    def _path(self, kind: str, key: str) -> Path:
        return self.folder / f"{kind}-{_digest(key)}.json"

    def check(self) -> None:
        """Raise :class:`ProfileError` naming the cache folder when it cannot be a folder (a file
        stands at it or above it, or it cannot be created): before anything is measured."""
        if self.folder is None:
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            source = " ($SPRUCE_CACHE)" if os.environ.get("SPRUCE_CACHE") else ""
            raise ProfileError(f"the latency cache folder {self.folder.parent}{source} cannot be used: "
                               f"{exc.strerror or exc}; point SPRUCE_CACHE at a folder, or pass "
                               f"use_cache=False") from exc

    def read(self, kind: str, key: str) -> dict[str, float]:
        """The valid cached values of ``(kind, key)``. A file or entry that is not what spruce
        writes (not JSON, not a mapping, a value that is not a finite non-negative number) is
        ignored with a warning naming the file, so its points are measured again."""
        if self.folder is None:
            return {}
        path = self._path(kind, key)
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            warnings.warn(f"ignoring unreadable latency cache file {path}", stacklevel=3)
            return {}
        if not isinstance(document, dict):
            warnings.warn(f"ignoring latency cache file {path}: not a JSON object", stacklevel=3)
            return {}
        if (document.get("version") != CACHE_VERSION or document.get("fingerprint") != self.fingerprint
                or document.get("key") != key):
            return {}  # another fingerprint or key (a digest collision): never used
        values = document.get("values")
        if not isinstance(values, dict):
            warnings.warn(f"ignoring latency cache file {path}: its values are not a mapping", stacklevel=3)
            return {}
        valid = {str(k): float(v) for k, v in values.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0}
        if len(valid) != len(values):
            bad = sorted(str(k) for k in values if str(k) not in valid)
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            warnings.warn(f"ignoring {len(bad)} latency cache entr{'y' if len(bad) == 1 else 'ies'} of {path} "
                          f"that {'is' if len(bad) == 1 else 'are'} not a finite non-negative number ({shown}): "
                          f"measuring again", stacklevel=3)
        return valid

    def write(self, kind: str, key: str, values: Mapping[str, float]) -> None:
        """Merge ``values`` into the file of ``(kind, key)`` under a lock, so concurrent profiles of
        one target keep each other's points; the file is replaced atomically."""
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(kind, key)
        with locked(path), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read() already warned about what it drops
            merged = {**self.read(kind, key), **values}
            document = {"version": CACHE_VERSION, "fingerprint": self.fingerprint, "key": key, "values": merged}
            atomic_write_text(path, json.dumps(document, sort_keys=True) + "\n")


def _point_key(active_in: int, active_out: int) -> str:
    return f"{active_in},{active_out}"


# --- profiling ---------------------------------------------------------------------------


class ProfileConfig(Config):
    """Options of :func:`profile` and ``spruce profile`` (the one place they are validated and defaulted)."""

    owner: ClassVar[str] = "profile"
    error_type: ClassVar[type[ConfigError]] = ProfileError

    step: int = Field(8, ge=1)
    coarse: int = Field(6, ge=2)
    edges: bool = True
    warmup: int = Field(3, ge=0)
    repeats: int = Field(12, ge=1)
    calibration_random: int = Field(6, ge=0)
    retries: int = Field(OUTLIER_RETRIES, ge=0)
    model_warmup: int = Field(2, ge=0)
    model_repeats: int = Field(30, ge=1)
    seed: int = Field(0, ge=0)
    batch_points: int = Field(POINTS_PER_BATCH, ge=1)


_DEFAULTS = ProfileConfig()


def profile(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    target: str | Target = "onnxruntime",
    step: int = _DEFAULTS.step,
    *,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: bool = True,
    warmup: int = _DEFAULTS.warmup,
    repeats: int = _DEFAULTS.repeats,
    coarse: int = _DEFAULTS.coarse,
    edges: bool = _DEFAULTS.edges,
    calibration_random: int = _DEFAULTS.calibration_random,
    retries: int = _DEFAULTS.retries,
    seed: int = _DEFAULTS.seed,
    analysis: Any = None,
) -> LatencyTable:
    """Profile every prunable layer of ``model`` on ``target`` and return a :class:`LatencyTable`.

    Channel counts are timed at multiples of ``step`` (see the module docstring for which
    ones). The points of one layer signature are timed interleaved, up to
    ``POINTS_PER_BATCH`` at a time: ``warmup`` untimed calls each, then ``repeats`` rounds
    of one call each; a point's value is the load-robust mean of its calls
    (:meth:`~spruce.targets.timing.Timings.robust_ms`: run-queue waiting excluded, outliers
    rejected). Measured points, the per-run cost and whole-model calibration timings are
    cached under ``cache_dir`` (default :func:`default_cache_dir`) keyed by the target's
    fingerprint, so a second run on the same target times nothing; ``use_cache=False``
    neither reads nor writes it. A freshly timed point slower than a point with more
    channels is timed again up to ``retries`` times (load bursts), keeping the lower value.
    Besides the dense and three uniform-width models, ``calibration_random`` random-width
    models are timed whole (interleaved with each other) to fit the correction.
    ``analysis`` (a :class:`~spruce.passes.analysis.ChannelAnalysis` of ``model``, which
    ``spruce.profile`` computes) says which layer dimensions can shrink; without it every
    layer dimension is profiled and only the dense model calibrates the table.
    Raises :class:`ProfileError` for bad options and ``ValueError`` for an unknown target.
    """
    config = ProfileConfig(step=step, coarse=coarse, edges=edges, warmup=warmup, repeats=repeats,
                           calibration_random=calibration_random, retries=retries, seed=seed)
    if isinstance(target, str):
        target = get_target(target)
    if not isinstance(target, Target):
        raise ProfileError(f"profile: target must be a target name or a Target, got {type(target).__name__}")
    target.require()
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    was_training = model.training
    try:
        return _profile(model, inputs, target, config, cache_dir, use_cache, progress, analysis)
    finally:
        model.train(was_training)  # targets put the model in eval mode to export it


def _profile(model: nn.Module, inputs: tuple[torch.Tensor, ...], target: Target, config: ProfileConfig,
             cache_dir: str | os.PathLike | None, use_cache: bool, progress: bool, analysis: Any) -> LatencyTable:
    fingerprint = target.fingerprint()
    cache = _Cache(Path(cache_dir) if cache_dir is not None else default_cache_dir(), fingerprint) \
        if use_cache else _Cache(None, fingerprint)
    cache.check()

    found = find_layers(model, inputs)
    if not found:
        raise ProfileError(f"profile: {type(model).__name__} has no Conv, ConvTranspose or Linear layer to profile")
    varying = _varying_dims(analysis, found) if analysis is not None else {n: (1, 1) for n in found}
    entries = {name: _make_entry(name, f, config.step, config.coarse, config.edges, *varying[name])
               for name, f in found.items()}

    prototypes = {}
    for name, entry in entries.items():
        prototypes.setdefault(entry.signature, (found[name].module, found[name].input_shape))
    reference = _Reference.of(entries, prototypes, cache)
    points = _measure_points(target, entries, prototypes, cache, config, progress, reference)
    table = LatencyTable(entries, points, fingerprint, step=config.step,
                         info=_table_info(model, inputs, config))
    samples = _calibration_samples(target, model, inputs, analysis, table, cache, config, progress, reference)
    calibration = fit_calibration(table, samples)
    info = {**table.info, "reference": {"signature": reference.signature, "point": list(reference.point),
                                        "ms": reference.level}}
    return LatencyTable(entries, points, fingerprint, calibration, config.step, info)


class _Reference:
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
                 cache: _Cache):
        self.signature, self.point, self.cache = signature, point, cache
        self.case = (layer, input_shape, point)
        self._key = f"{signature}@{_point_key(*point)}"
        self.level: float | None = cache.read("reference", self._key).get("ms")

    @classmethod
    def of(cls, entries: Mapping[str, LayerEntry], prototypes: Mapping[str, tuple], cache: _Cache) -> _Reference:
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


def _table_info(model: nn.Module, inputs: tuple[torch.Tensor, ...], config: ProfileConfig) -> dict[str, Any]:
    return {"model": type(model).__name__, "input_shapes": [list(t.shape) for t in inputs],
            "coarse": config.coarse, "edges": config.edges, "warmup": config.warmup, "repeats": config.repeats,
            "timing": "interleaved rounds, threads' run-queue waiting excluded, inlier mean", "host": platform.node()}


def _measure_points(target: Target, entries: Mapping[str, LayerEntry], prototypes: Mapping[str, tuple],
                    cache: _Cache, config: ProfileConfig, progress: bool,
                    reference: _Reference) -> dict[str, dict[tuple[int, int], float]]:
    """Load-robust isolated ms of every point the entries need, each (signature, point) timed once."""
    wanted: dict[str, set[tuple[int, int]]] = {}
    for entry in entries.values():
        wanted.setdefault(entry.signature, set()).update(entry.points())
    points: dict[str, dict[tuple[int, int], float]] = {}
    todo: dict[str, list[tuple[int, int]]] = {}
    for signature, needed in wanted.items():
        cached = cache.read("layer", signature)
        points[signature] = {}
        for point in sorted(needed):
            key = _point_key(*point)
            if key in cached:
                points[signature][point] = cached[key]
            else:
                todo.setdefault(signature, []).append(point)
    total = sum(map(len, todo.values()))
    with tqdm(total=total, desc="profile layers", unit="point", disable=not progress or not total) as bar:
        for signature, batch in todo.items():
            for start in range(0, len(batch), config.batch_points):
                chunk = batch[start:start + config.batch_points]
                measured = _time_points(target, prototypes[signature], chunk, config, reference)
                points[signature].update(measured)
                # persisted as measured: a killed run keeps every chunk it finished
                cache.write("layer", signature, {_point_key(*point): ms for point, ms in measured.items()})
                bar.update(len(chunk))
    # A burst of load can still inflate a point; such a point costs more than a point with more
    # channels in both dims. Time those again and keep the lower value (a real non-monotonic
    # point stays: it is slow every time).
    for _ in range(config.retries):
        suspects: dict[str, set[tuple[int, int]]] = {}
        for entry in entries.values():
            fresh = set(todo.get(entry.signature, ()))
            for point in _non_monotonic(entry.points(), points[entry.signature]):
                if point in fresh:
                    suspects.setdefault(entry.signature, set()).add(point)
        for signature, again in suspects.items():
            retimed = _time_points(target, prototypes[signature], sorted(again), config, reference)
            for point, ms in retimed.items():
                points[signature][point] = min(points[signature][point], ms)
    for signature, done in todo.items():
        cache.write("layer", signature, {_point_key(*p): points[signature][p] for p in done})
    return points


def _time_points(target: Target, prototype: tuple, chunk: Sequence[tuple[int, int]],
                 config: ProfileConfig, reference: _Reference) -> dict[tuple[int, int], float]:
    """Load-robust ms of the ``chunk`` points of one signature, timed interleaved with the
    reference layer and scaled to its level."""
    layer, input_shape = prototype
    timings = target.measure_layers(layer, input_shape, list(chunk), warmup=config.warmup, rounds=config.repeats,
                                    reference=reference.case)
    factor = reference.factor(timings[-1].robust_ms())
    return {tuple(point): factor * timing.robust_ms() for point, timing in zip(chunk, timings)}


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


def _model_key(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> str:
    """What identifies a model's architecture for the calibration cache."""
    return json.dumps({"class": f"{type(model).__module__}.{type(model).__qualname__}", "repr": repr(model),
                       "inputs": [[list(t.shape), str(t.dtype)] for t in inputs]})


def _calibration_samples(target: Target, model: nn.Module, inputs: tuple[torch.Tensor, ...], analysis: Any,
                         table: LatencyTable, cache: _Cache, config: ProfileConfig,
                         progress: bool, reference: _Reference) -> list[dict[str, Any]]:
    """Load-robust whole-model ms at the calibration configurations (timed interleaved with
    each other and the reference layer, scaled to its level), with their widths."""
    configs: list[dict[int, int]] = [{}]
    if analysis is not None:
        groups = analysis.groups
        configs = [uniform_group_widths(groups, f, config.step) for f in CALIBRATION_FRACTIONS]
        rng = np.random.default_rng(10_000 + config.seed)
        configs += [random_group_widths(groups, rng, config.step) for _ in range(config.calibration_random)]
    model_key = _model_key(model, inputs)
    cached = cache.read("model", model_key)
    keys = [json.dumps(sorted(widths.items())) for widths in configs]
    compacts = [compact_at_widths(analysis, model, widths) if widths else model for widths in configs]
    missing = [k for k, key in enumerate(keys) if key not in cached]
    if missing:
        if progress:
            print(f"profile: timing {len(missing)} whole models for the calibration", flush=True)
        ref_layer, ref_shape, (ref_in, ref_out) = reference.case
        ref_model, ref_example = layer_case(ref_layer, ref_shape, ref_in, ref_out)
        timings = target.measure_models([(compacts[k], inputs) for k in missing] + [(ref_model, (ref_example,))],
                                        warmup=config.model_warmup, rounds=config.model_repeats)
        factor = reference.factor(timings[-1].robust_ms())
        fresh = {keys[k]: factor * timing.robust_ms() for k, timing in zip(missing, timings)}
        cache.write("model", model_key, fresh)
        cached.update(fresh)
    return [{"widths": {n: list(w) for n, w in table.widths_of(compact).items()}, "ms": cached[key]}
            for compact, key in zip(compacts, keys)]


def fixed_costs(table: LatencyTable) -> dict[str, float]:
    """Per layer signature, the fixed cost (ms) of one isolated run: the measured points fitted
    by ``a + b in + c out + d in out`` (``a + b c`` for a depthwise layer) in least squares,
    ``a`` clipped to [0, the signature's fastest point]."""
    depthwise = {e.signature: e.depthwise for e in table.layers.values()}
    fixed = {}
    for signature, points in table.points.items():
        if not points:
            continue
        grid = np.array(list(points), dtype=np.float64)
        ms = np.array(list(points.values()))
        if depthwise.get(signature, False) or len(points) < 4:
            design = np.c_[np.ones(len(grid)), grid[:, 0]]
        else:
            design = np.c_[np.ones(len(grid)), grid[:, 0], grid[:, 1], grid[:, 0] * grid[:, 1]]
        intercept = float(np.linalg.lstsq(design, ms, rcond=None)[0][0]) if len(points) >= design.shape[1] else 0.0
        fixed[signature] = float(np.clip(intercept, 0.0, ms.min()))
    return fixed


def fit_calibration(table: LatencyTable, samples: Sequence[Mapping[str, Any]]) -> Calibration:
    """Fit ``scale``, ``ms_per_melement``, ``ms_per_mweight`` and ``overhead_ms`` to
    whole-model measurements by non-negative least squares on relative errors (every sample
    weighs by its relative error); isolated timings enter less their signature's fixed cost
    (:func:`fixed_costs`).

    Every coefficient of the result is >= 0 and ``scale`` > 0, so no configuration's
    prediction and no layer's share can be negative. Without samples the identity calibration
    (scale 1, no fixed costs) is returned; with fewer than four, scale alone is fitted.
    Raises :class:`ProfileError` for a sample with a non-positive or non-finite time."""
    if not samples:
        return Calibration()
    base = Calibration(fixed_ms=fixed_costs(table))
    features, measured = [], []
    for sample in samples:
        ms = sample["ms"]
        _check_finite("calibration sample time (ms)", ms)
        if ms <= 0:
            raise ProfileError(f"calibration sample time must be a positive number of ms, got {ms!r}")
        widths = {n: tuple(w) for n, w in sample["widths"].items()}
        isolated = elements = weights = 0.0
        for name, entry in table.layers.items():
            active_in, active_out = widths.get(name, (entry.in_channels, entry.out_channels))
            isolated += entry.calls * base.net_ms(entry.signature, table.isolated_ms(name, active_in, active_out))
            elements += entry.calls * (active_in * entry.in_elements + active_out * entry.out_elements) / 1e6
            weights += entry.calls * entry.weight_elements(active_in, active_out) / 1e6
        features.append((isolated, elements, weights, 1.0))
        measured.append(float(ms))
    x = np.asarray(features)
    a = x / np.asarray(measured)[:, None]
    b = np.ones(len(measured))
    columns = [0, 1, 2, 3] if len(samples) >= 4 else [0]
    coef = np.zeros(4)
    coef[columns] = nonnegative_least_squares(a[:, columns], b)
    if not coef[0] > 0:  # a fit that ignores the layers' timings cannot rank configurations: scale alone
        coef = np.zeros(4)
        coef[0] = nonnegative_least_squares(a[:, [0]], b)[0]
    if not coef[0] > 0:
        coef[0] = 1.0  # every isolated timing is within its fixed cost: nothing to scale
    return Calibration(scale=float(coef[0]), ms_per_melement=float(coef[1]), overhead_ms=float(coef[3]),
                       samples=tuple(samples), fixed_ms=base.fixed_ms, ms_per_mweight=float(coef[2]))


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
