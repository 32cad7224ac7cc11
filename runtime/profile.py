"""Per-layer latency profiling on a target and a table that predicts whole-model latency.

``profile(model, example_inputs, target)`` times every prunable layer (Conv1d/2d/3d,
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

Isolated layers are not the model: each isolated run pays session overhead and
layout conversions and the model has operators that are not profiled layers (pooling,
additions, activations). ``profile`` therefore times a few whole compact models (dense,
uniform widths, random widths) and fits, in relative least squares,

    predict(widths) = overhead_ms + sum over layers of calls * layer_ms(layer, in, out)
    layer_ms(layer, in, out) = scale * isolated_ms(layer, in, out) + ms_per_element * elements(in, out)

where ``elements`` counts the layer's input and output activation elements. The
calibrated ``layer_ms`` is what a knapsack should take differences of.
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import Field
from torch import nn
from tqdm.auto import tqdm

from ..passes.config import Config, ConfigError
from ..targets.base import Target, get_target
from ..targets.files import atomic_write_text

__all__ = [
    "Calibration",
    "LatencyTable",
    "LayerEntry",
    "ProfileError",
    "compact_at_widths",
    "default_cache_dir",
    "find_layers",
    "profile",
    "random_group_widths",
]

TABLE_FORMAT = "spruce-latency-table"
TABLE_VERSION = 1
CACHE_VERSION = 1
PROFILED_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# Uniform widths (fractions of every prunable group) timed whole to calibrate the table.
CALIBRATION_FRACTIONS = (1.0, 0.75, 0.5, 0.25)
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

    @property
    def depthwise(self) -> bool:
        return self.multiplier > 0

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
    """The whole-model correction: ``predict = overhead_ms + sum(calls * layer_ms)``,
    ``layer_ms = scale * isolated_ms + ms_per_melement * activation_elements / 1e6``.
    ``samples`` are the whole-model measurements it was fitted on: per sample the widths
    {layer: [in, out]} and the measured median ms."""

    scale: float = 1.0
    ms_per_melement: float = 0.0
    overhead_ms: float = 0.0
    samples: tuple[dict[str, Any], ...] = ()

    def __post_init__(self) -> None:
        for label in ("scale", "ms_per_melement", "overhead_ms"):
            value = getattr(self, label)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ProfileError(f"calibration {label} must be a finite number, got {value!r}")


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
        return cal.scale * self._grids[name](active_in, active_out) + cal.ms_per_melement * elements / 1e6

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
        if document.get("version") != TABLE_VERSION:
            raise ValueError(f"version {document.get('version')!r} is not {TABLE_VERSION}")
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
    """Raise :class:`ProfileError` naming the first difference when two fingerprints differ."""
    if dict(found) == dict(expected):
        return
    keys = sorted(set(found) | set(expected))
    diff = next(k for k in keys if found.get(k) != expected.get(k))
    raise ProfileError(f"{what} was profiled on another target/machine: {diff} is {found.get(diff)!r} there, "
                       f"{expected.get(diff)!r} here")


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
    """Every Conv1d/2d/3d and Linear module a forward on ``example_inputs`` calls, with its
    input/output shapes and call count, in call order. Raises :class:`ProfileError` when a
    shared module is called with different input shapes."""
    names = {module: name for name, module in model.named_modules(remove_duplicate=True)}
    found: dict[str, _Found] = {}

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        name = names[module]
        x = args[0]
        if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor):
            return
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
    return (f"{type(module).__name__}(k={list(module.kernel_size)},s={list(module.stride)},p={module.padding},"
            f"d={list(module.dilation)},g={groups},bias={module.bias is not None},pad={module.padding_mode})"
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
                  calls=found.calls)
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
        out_unit, in_unit = units.get((weight, 0), 0), units.get((weight, 1), 0)
        module = found.module
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

    def read(self, kind: str, key: str) -> dict[str, float]:
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
        if (document.get("version") != CACHE_VERSION or document.get("fingerprint") != self.fingerprint
                or document.get("key") != key):
            return {}  # another fingerprint or key (a digest collision): never used
        return {str(k): float(v) for k, v in document.get("values", {}).items()}

    def write(self, kind: str, key: str, values: Mapping[str, float]) -> None:
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        merged = {**self.read(kind, key), **values}
        document = {"version": CACHE_VERSION, "fingerprint": self.fingerprint, "key": key, "values": merged}
        atomic_write_text(self._path(kind, key), json.dumps(document, sort_keys=True) + "\n")


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
    warmup: int = Field(5, ge=0)
    repeats: int = Field(20, ge=1)
    calibration_random: int = Field(4, ge=0)
    retries: int = Field(OUTLIER_RETRIES, ge=0)
    model_warmup: int = Field(3, ge=0)
    model_repeats: int = Field(10, ge=1)
    seed: int = Field(0, ge=0)


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
    ones); each point is the median of ``repeats`` runs after ``warmup``. Measured points
    and whole-model calibration runs are cached under ``cache_dir`` (default
    :func:`default_cache_dir`) keyed by the target's fingerprint, so a second run on the
    same target times nothing; ``use_cache=False`` neither reads nor writes it. A freshly
    timed point slower than a point with more channels is timed again up to ``retries``
    times (load bursts), keeping the lowest median. Besides the dense and three uniform-width
    models, ``calibration_random`` random-width models are timed whole to fit the correction.
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

    found = find_layers(model, inputs)
    if not found:
        raise ProfileError(f"profile: {type(model).__name__} has no Conv1d/2d/3d or Linear layer to profile")
    varying = _varying_dims(analysis, found) if analysis is not None else {n: (1, 1) for n in found}
    entries = {name: _make_entry(name, f, config.step, config.coarse, config.edges, *varying[name])
               for name, f in found.items()}

    prototypes = {}
    for name, entry in entries.items():
        prototypes.setdefault(entry.signature, (found[name].module, found[name].input_shape))
    points = _measure_points(target, entries, prototypes, cache, config, progress)
    table = LatencyTable(entries, points, fingerprint, step=config.step,
                         info=_table_info(model, inputs, config))
    samples = _calibration_samples(target, model, inputs, analysis, table, cache, config, progress)
    calibration = fit_calibration(table, samples)
    return LatencyTable(entries, points, fingerprint, calibration, config.step, table.info)


def _table_info(model: nn.Module, inputs: tuple[torch.Tensor, ...], config: ProfileConfig) -> dict[str, Any]:
    return {"model": type(model).__name__, "input_shapes": [list(t.shape) for t in inputs],
            "coarse": config.coarse, "edges": config.edges, "warmup": config.warmup, "repeats": config.repeats,
            "host": platform.node()}


def _measure_points(target: Target, entries: Mapping[str, LayerEntry], prototypes: Mapping[str, tuple],
                    cache: _Cache, config: ProfileConfig, progress: bool) -> dict[str, dict[tuple[int, int], float]]:
    """Median isolated ms of every point the entries need, each (signature, point) timed once."""
    wanted: dict[str, set[tuple[int, int]]] = {}
    for entry in entries.values():
        wanted.setdefault(entry.signature, set()).update(entry.points())
    points: dict[str, dict[tuple[int, int], float]] = {}
    todo: list[tuple[str, tuple[int, int]]] = []
    for signature, needed in wanted.items():
        cached = cache.read("layer", signature)
        points[signature] = {}
        for point in sorted(needed):
            key = _point_key(*point)
            if key in cached:
                points[signature][point] = cached[key]
            else:
                todo.append((signature, point))
    fresh: dict[str, set[tuple[int, int]]] = {}
    with tqdm(total=len(todo), desc="profile layers", unit="point", disable=not progress or not todo) as bar:
        for signature in wanted:
            batch = [point for sig, point in todo if sig == signature]
            if not batch:
                continue
            for point in batch:
                points[signature][point] = _time_point(target, prototypes[signature], point, config)
                bar.update(1)
            fresh[signature] = set(batch)
    # A burst of load from other processes inflates a few short timing windows; such a point costs
    # more than a point with more channels in both dims. Time those again and keep the lower median
    # (a real non-monotonic point stays: it is slow every time).
    for _ in range(config.retries):
        suspects = {(entry.signature, p) for entry in entries.values()
                    for p in _non_monotonic(entry.points(), points[entry.signature])
                    if p in fresh.get(entry.signature, ())}
        for signature, point in sorted(suspects):
            again = _time_point(target, prototypes[signature], point, config)
            points[signature][point] = min(points[signature][point], again)
    for signature, done in fresh.items():
        cache.write("layer", signature, {_point_key(*p): points[signature][p] for p in done})
    return points


def _time_point(target: Target, prototype: tuple, point: tuple[int, int], config: ProfileConfig) -> float:
    layer, input_shape = prototype
    seconds = target.time_layer(layer, input_shape, point[0], point[1], warmup=config.warmup,
                                repeats=config.repeats)
    return float(np.median(seconds)) * 1e3


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
                         progress: bool) -> list[dict[str, Any]]:
    """Measured whole-model median ms at the calibration configurations, with their widths."""
    configs: list[dict[int, int]] = [{}]
    if analysis is not None:
        groups = analysis.groups
        configs = [uniform_group_widths(groups, f, config.step) for f in CALIBRATION_FRACTIONS]
        rng = np.random.default_rng(10_000 + config.seed)
        configs += [random_group_widths(groups, rng, config.step) for _ in range(config.calibration_random)]
    model_key = _model_key(model, inputs)
    cached = cache.read("model", model_key)
    samples = []
    all_cached = all(json.dumps(sorted(widths.items())) in cached for widths in configs)
    for group_widths in tqdm(configs, desc="profile models", unit="model", disable=not progress or all_cached):
        key = json.dumps(sorted(group_widths.items()))
        compact = compact_at_widths(analysis, model, group_widths) if group_widths else model
        widths = table.widths_of(compact)
        if key not in cached:
            # two timings, the lower median kept: a load burst rarely hits both
            cached[key] = min(float(np.median(target.time_model(compact.eval(), inputs, config.model_warmup,
                                                                config.model_repeats))) * 1e3
                              for _ in range(2))
            cache.write("model", model_key, {key: cached[key]})
        samples.append({"widths": {n: list(w) for n, w in widths.items()}, "ms": cached[key]})
    return samples


def fit_calibration(table: LatencyTable, samples: Sequence[Mapping[str, Any]]) -> Calibration:
    """Fit ``scale``, ``ms_per_melement`` and ``overhead_ms`` to whole-model measurements in
    relative least squares (every sample weighs by its relative error).

    ``overhead_ms`` may be negative: every isolated timing carries the runtime's per-run
    cost, which the whole model pays once. A fit with a non-positive scale, a negative
    memory cost or a non-positive prediction falls back to (scale, overhead), then to
    scale alone (also with fewer than three samples)."""
    if not samples:
        return Calibration()
    features, measured = [], []
    for sample in samples:
        widths = {n: tuple(w) for n, w in sample["widths"].items()}
        isolated = elements = 0.0
        for name, entry in table.layers.items():
            active_in, active_out = widths.get(name, (entry.in_channels, entry.out_channels))
            isolated += entry.calls * table.isolated_ms(name, active_in, active_out)
            elements += entry.calls * (active_in * entry.in_elements + active_out * entry.out_elements) / 1e6
        features.append((isolated, elements, 1.0))
        measured.append(float(sample["ms"]))
    x = np.asarray(features)
    a = x / np.asarray(measured)[:, None]
    b = np.ones(len(measured))
    if len(samples) >= 3:
        for columns in ([0, 1, 2], [0, 2]):
            coef, *_ = np.linalg.lstsq(a[:, columns], b, rcond=None)
            full = np.zeros(3)
            full[columns] = coef
            if full[0] > 0 and full[1] >= 0 and (x @ full > 0).all():
                return Calibration(float(full[0]), float(full[1]), float(full[2]), tuple(samples))
    scale = float(a[:, 0] @ b / (a[:, 0] @ a[:, 0]))
    return Calibration(scale, 0.0, 0.0, tuple(samples))
