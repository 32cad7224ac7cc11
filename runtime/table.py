"""The latency table: its layers, measured points and calibration, its prediction, its file format.

A :class:`LatencyTable` holds, per profiled layer, a :class:`LayerEntry` (signature, full widths, the
grid of channel counts timed) and, per layer signature, the measured isolated ms at each (active in,
active out) point. It predicts a configuration's latency by interpolating those points (bilinear on
a coarse rectangle times the staircase measured along the full-width edges) and applying the
whole-model :class:`Calibration`. ``save``/``load`` write and read it as JSON (format
``TABLE_FORMAT``, versions ``READABLE_TABLE_VERSIONS``); :func:`spruce.runtime.profile.profile`
builds one.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from ..targets.files import atomic_write_text
from .options import ProfileError

__all__ = [
    "RECURRENT_GATES",
    "Calibration",
    "LatencyTable",
    "LayerEntry",
    "PROFILED_TYPES",
    "ProfileError",
    "check_finite",
    "check_fingerprint",
    "model_widths",
]

TABLE_FORMAT = "spruce-latency-table"
TABLE_VERSION = 3
# version 1 lacks kernel, fixed_ms and ms_per_mweight (read as 1, {}, 0); version 2 lacks family_scale (read as {})
READABLE_TABLE_VERSIONS = (1, 2, 3)
# The layer kinds profiled: what find_layers times and what a table reads widths of.
PROFILED_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                  nn.Linear, nn.LSTM, nn.GRU, nn.RNN)
# Recurrent layers among them: profiled over (input features, hidden size); their gate blocks per hidden unit
RECURRENT_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


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

    A recurrent layer (``nn.LSTM``/``nn.GRU``/``nn.RNN``) has ``gates`` > 0 (gate blocks per
    hidden unit), ``directions`` and ``stacked`` layers; its in/out channels are its input
    features and hidden size (every layer and direction together), its ``out_elements`` the
    output elements per hidden unit.
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
    gates: int = 0  # recurrent layers: gate blocks per hidden unit (LSTM 4, GRU 3, RNN 1); 0 otherwise
    directions: int = 1
    stacked: int = 1

    @property
    def recurrent(self) -> bool:
        return self.gates > 0

    @property
    def depthwise(self) -> bool:
        return self.multiplier > 0

    @property
    def family(self) -> str:
        """The kind of kernel the layer runs as, which a calibration may scale on its own
        (:attr:`Calibration.family_scale`): ``recurrent``, ``depthwise``, ``linear``, ``pointwise``
        (a convolution with a one-element kernel) or ``conv``."""
        if self.recurrent:
            return "recurrent"
        if self.depthwise:
            return "depthwise"
        if self.signature.startswith("Linear("):
            return "linear"
        return "pointwise" if self.kernel == 1 else "conv"

    def weight_elements(self, active_in: int, active_out: int) -> int:
        """Weights of the layer with the given active channels (biases aside)."""
        if self.recurrent:  # every direction: input and hidden matrices, the upper layers reading both directions
            first = active_in * active_out + active_out * active_out
            upper = (self.stacked - 1) * (self.directions * active_out * active_out + active_out * active_out)
            return self.gates * self.directions * (first + upper)
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
    ``layer_ms = scale_of(family) * max(isolated_ms - fixed_ms[signature], 0) + ms_per_melement *
    activation_elements / 1e6 + ms_per_mweight * weight_elements / 1e6``.

    ``family_scale`` maps a layer family (:attr:`LayerEntry.family`) to its own scale; families
    absent from it take ``scale`` (a table fitted with one scale has it empty).

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
    family_scale: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for label in ("scale", "ms_per_melement", "overhead_ms", "ms_per_mweight"):
            check_finite(f"calibration {label}", getattr(self, label))
        for label, values in (("fixed_ms", self.fixed_ms), ("family_scale", self.family_scale)):
            for key, value in values.items():
                check_finite(f"calibration {label}[{key!r}]", value)
                if value < 0:
                    raise ProfileError(f"calibration {label}[{key!r}] must be >= 0, got {value!r}")
        object.__setattr__(self, "fixed_ms", {str(k): float(v) for k, v in self.fixed_ms.items()})
        object.__setattr__(self, "family_scale", {str(k): float(v) for k, v in self.family_scale.items()})

    def scale_of(self, family: str) -> float:
        """The scale of a layer family's isolated timings: ``family_scale[family]``, else ``scale``."""
        return self.family_scale.get(family, self.scale)

    def net_ms(self, signature: str, isolated_ms: float) -> float:
        """An isolated timing less its signature's fixed cost (never below 0)."""
        return max(isolated_ms - self.fixed_ms.get(signature, 0.0), 0.0)


def check_finite(label: str, value: object) -> None:
    """Raise :class:`ProfileError` naming ``label`` unless ``value`` is a finite int or float (not a bool)."""
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
        return (cal.scale_of(entry.family) * cal.net_ms(entry.signature, self._grids[name](active_in, active_out))
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
        elif isinstance(module, nn.RNNBase):
            widths[name] = (module.input_size, module.hidden_size)
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
