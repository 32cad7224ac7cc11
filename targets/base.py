"""What every deployment target provides, and the one registry of targets.

A target turns a folded or compact torch model into an *artifact* (a file it
can run: an ``.onnx`` model, a TensorRT engine, an exported torch program),
runs it, and times it. Profiling (per-layer latency tables) and ``spruce
bench`` only talk to targets through this interface, so adding a target is
adding one module to this package with one class and its ``@register_target``
line: :func:`get_target` imports every module of the package.

Every artifact file has a manifest next to it (``<artifact>.spruce.json``)
naming the target that built it, so an artifact is never run by the wrong
target, and pinning the size and sha256 of the artifact and of every file it
reads (ONNX external data), so a swapped, edited or truncated artifact is
refused by :func:`read_artifact` instead of being timed or run.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os
import pkgutil
import platform
import sys
import tempfile
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..passes.config import Config, ConfigError, short_repr
from .files import atomic_write_text
from .timing import Timings, time_interleaved

__all__ = [
    "Artifact",
    "ArtifactError",
    "Runner",
    "TARGETS",
    "Target",
    "TargetUnavailable",
    "Timings",
    "check_precision",
    "get_target",
    "read_artifact",
    "register_target",
]

MANIFEST_SUFFIX = ".spruce.json"
MANIFEST_FORMAT = "spruce-artifact"
MANIFEST_VERSION = 2  # 2: "files" pins size and sha256 of every file of the artifact

# A runner takes the model's inputs (numpy arrays or tensors) and returns its outputs.
Runner = Callable[[Sequence[Any]], Any]


class TargetUnavailable(RuntimeError):
    """The target cannot run here (missing optional package, no CUDA driver, ...)."""


class ArtifactError(ValueError):
    """An artifact file is missing, corrupt, or was built for another target."""


@dataclass(frozen=True)
class Artifact:
    """A built artifact: its file, the target that built it and what it expects."""

    path: Path
    target: str
    input_shapes: tuple[tuple[int, ...], ...]
    input_dtype: str = "float32"
    info: dict[str, Any] = field(default_factory=dict)  # target-specific (precision, sparse layers, ...)
    data_files: tuple[str, ...] = ()  # names of files next to ``path`` that it reads (ONNX external data)

    @property
    def manifest_path(self) -> Path:
        return Path(str(self.path) + MANIFEST_SUFFIX)

    def write_manifest(self) -> None:
        """Write the manifest next to the artifact file, atomically."""
        document = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "target": self.target,
            "file": self.path.name,
            "input_shapes": [list(s) for s in self.input_shapes],
            "input_dtype": self.input_dtype,
            "info": self.info,
            "files": {name: _file_pin(self.path.parent / name) for name in (self.path.name, *self.data_files)},
        }
        atomic_write_text(self.manifest_path, json.dumps(document, indent=2) + "\n")


def read_artifact(path: str | os.PathLike, expected_target: str | None = None) -> Artifact:
    """The artifact at ``path`` from its manifest; checks it was built for ``expected_target``."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"artifact {path} does not exist or is not a file")
    manifest = Path(str(path) + MANIFEST_SUFFIX)
    if not manifest.is_file():
        raise ArtifactError(f"artifact {path} has no manifest {manifest.name}: it was not built by spruce")
    try:
        document = json.loads(manifest.read_text(encoding="utf-8"))
        if document.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"format is {document.get('format')!r}, not {MANIFEST_FORMAT!r}")
        if document.get("version") != MANIFEST_VERSION:
            raise ValueError(f"manifest version {document.get('version')!r} is not {MANIFEST_VERSION}")
        pins = document["files"]
        if not isinstance(pins, dict) or path.name not in pins:
            raise ValueError(f"'files' does not pin {path.name}")
        pins = {str(name): (int(pin["size"]), str(pin["sha256"])) for name, pin in pins.items()}
        for name in pins:
            if Path(name).name != name or name in (".", ".."):
                raise ValueError(f"'files' names {_bounded(name)!r}, not a file next to the artifact")
        artifact = Artifact(
            path=path,
            target=str(document["target"]),
            input_shapes=tuple(tuple(int(d) for d in s) for s in document["input_shapes"]),
            input_dtype=str(document.get("input_dtype", "float32")),
            info=dict(document.get("info", {})),
            data_files=tuple(name for name in pins if name != path.name),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ArtifactError(f"manifest {manifest} is not a valid spruce manifest: {_bounded(exc)}") from exc
    for name, (size, sha256) in pins.items():
        _check_pin(path.parent / name, size, sha256, manifest)
    if expected_target is not None and artifact.target != expected_target:
        raise ArtifactError(f"artifact {path} was built for target {artifact.target!r}, not {expected_target!r}")
    return artifact


def _file_pin(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": _sha256(path)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_pin(path: Path, size: int, sha256: str, manifest: Path) -> None:
    """Raise :class:`ArtifactError` unless ``path`` has the size and sha256 ``manifest`` pins."""
    if not path.is_file():
        raise ArtifactError(f"artifact file {path} named in {manifest.name} is missing")
    actual = path.stat().st_size
    if actual != size:
        raise ArtifactError(f"artifact file {path} has {actual} bytes, its manifest {manifest.name} pins {size}: "
                            f"it was changed or truncated after spruce built it (rebuild it)")
    if _sha256(path) != sha256:
        raise ArtifactError(f"artifact file {path} does not match the sha256 its manifest {manifest.name} pins: "
                            f"it was changed after spruce built it (rebuild it)")


def _bounded(value: object, limit: int = 200) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "..."


class TargetOptions(Config):
    """A target's constructor options: ``--option KEY=VALUE`` on the CLI, ``target_options`` in a
    recipe, keyword arguments of :func:`get_target`. Each target declares its own subclass, so these
    are validated by the same mechanism as recipes and method configs, and a recipe's target
    options fail when the recipe loads."""


class Target(ABC):
    """A place models run: builds artifacts, runs them, times them.

    Profiling (:mod:`spruce.runtime.measure`) times a layer as a one-layer model: it builds the
    layer at each channel count and hands the cases to :meth:`measure_models`, which builds and
    loads each through :meth:`model_runner`. That is the hook for a target that builds or runs a
    lone layer its own way (the ONNX Runtime target writes a lone Conv or Linear straight to ONNX,
    without a trace); a target that times differently overrides :meth:`measure_models`.
    """

    name: ClassVar[str]
    suffix: ClassVar[str]  # the artifact file's suffix, e.g. ".onnx"
    Options: ClassVar[type[TargetOptions]] = TargetOptions
    # The precisions its artifacts can run at (checked by check_precision before any work).
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)

    def call_cost_case(self) -> tuple[nn.Module, tuple[torch.Tensor, ...]] | None:
        """A one-layer model that does next to no work, or None (the default).

        Timed through :meth:`model_runner` like any lone layer, its figure is the cost every
        isolated layer timing carries per call beyond the layer's work (the runtime's per-run
        cost), which profiling then subtracts from each isolated timing instead of extrapolating
        each layer signature's timings to zero channels
        (:func:`~spruce.runtime.calibration.fixed_costs`)."""
        return None

    def unavailable_reason(self) -> str | None:
        """Why this target cannot run here, or None when it can."""
        return None

    def require(self) -> None:
        """Raise :class:`TargetUnavailable` with the reason when the target cannot run here."""
        reason = self.unavailable_reason()
        if reason is not None:
            raise TargetUnavailable(f"target {self.name!r} is unavailable: {reason}")

    def fingerprint(self) -> dict[str, str]:
        """What latency depends on: device, library versions, threads. Cache keys use it."""
        return {
            "target": self.name,
            "machine": platform.machine(),
            "processor": _cpu_name(),
            "torch": torch.__version__,
            "threads": str(torch.get_num_threads()),
        }

    @abstractmethod
    def build(self, model: nn.Module, example_inputs: Sequence[torch.Tensor], path: str | os.PathLike) -> Artifact:
        """Build the artifact for ``model`` at ``path`` (atomically) with its manifest; return it."""

    @abstractmethod
    def load(self, artifact: Artifact) -> Runner:
        """A runner for ``artifact`` (which must have been built by this target)."""

    def synchronize(self) -> None:  # noqa: B027 (a hook with a no-op default)
        """Wait for queued device work (CUDA targets); a no-op on the CPU."""

    def caller_cpu(self) -> int | None:
        """The CPU the timing thread is pinned to while it times this target's runners, for a
        target whose runtime pins its worker threads to the other CPUs (see
        :func:`~spruce.targets.timing.time_interleaved`); None (the default): nothing pinned."""
        return None

    def timing_runner(self, artifact: Artifact) -> Runner:
        """A runner for ``artifact`` set up for timing (:meth:`load` unless the target pins
        its threads while timing, :meth:`caller_cpu`)."""
        return self.load(artifact)

    def time_runner(self, runner: Runner, inputs: Sequence[Any], warmup: int = 10, repeats: int = 50) -> np.ndarray:
        """Seconds per call of ``runner(inputs)``: ``warmup`` untimed calls, then ``repeats`` timed ones."""
        for _ in range(warmup):
            runner(inputs)
        self.synchronize()
        seconds = np.empty(repeats)
        for i in range(repeats):
            start = time.perf_counter()
            runner(inputs)
            self.synchronize()
            seconds[i] = time.perf_counter() - start
        return seconds

    def time_model(self, model: nn.Module, example_inputs: Sequence[torch.Tensor], warmup: int = 10,
                   repeats: int = 50) -> np.ndarray:
        """Seconds per forward of ``model`` on this target (built into a temporary artifact)."""
        self.require()
        with tempfile.TemporaryDirectory(prefix="spruce-time-") as folder:
            runner, inputs = self.model_runner(model, example_inputs, Path(folder) / "model")
            return self.time_runner(runner, inputs, warmup, repeats)

    def model_runner(self, model: nn.Module, example_inputs: Sequence[torch.Tensor],
                     stem: Path) -> tuple[Runner, list[Any]]:
        """A runner of ``model`` on this target and the example inputs prepared for it; the
        artifact is built at ``stem`` plus the target's suffix (a folder the caller removes)."""
        artifact = self.build(model, example_inputs, Path(str(stem) + self.suffix))
        return self.load(artifact), self.prepare_inputs(artifact, example_inputs)

    def measure_models(self, cases: Sequence[tuple[nn.Module, Sequence[torch.Tensor]]], warmup: int = 3,
                       rounds: int = 20) -> list[Timings]:
        """Load-robust timings of several models compared with each other.

        ``cases`` are (model, example inputs) pairs. Every model is built (all at once, so
        keep the list short for large models), then timed interleaved: ``rounds`` rounds of
        one call each, after ``warmup`` calls each, with each call's run-queue waiting
        recorded (see :mod:`spruce.targets.timing`). Returns one :class:`Timings` per case,
        in order; ``Timings.robust_ms()`` is the figure to compare."""
        self.require()
        if not cases:
            raise ValueError("measure_models: no models given")
        modes = [model.training for model, _ in cases]
        try:
            with tempfile.TemporaryDirectory(prefix="spruce-time-") as folder:
                calls = []
                for k, (model, example_inputs) in enumerate(cases):
                    runner, inputs = self.model_runner(model.eval(), tuple(example_inputs),
                                                       Path(folder) / f"model{k}")
                    calls.append(functools.partial(runner, inputs))
                return time_interleaved(calls, warmup, rounds, self.synchronize, self.caller_cpu())
        finally:
            for (model, _), training in zip(cases, modes):
                model.train(training)  # timed in eval mode; the caller's models keep their mode

    def prepare_inputs(self, artifact: Artifact, example_inputs: Sequence[torch.Tensor]) -> list[Any]:
        """Inputs in the form this target's runner takes (numpy on the CPU by default)."""
        return [t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t) for t in example_inputs]


TARGETS: dict[str, type[Target]] = {}


def register_target(cls: type[Target]) -> type[Target]:
    TARGETS[cls.name] = cls
    return cls


def target_class(name: str) -> type[Target]:
    """The target class registered under ``name``; ``ValueError`` listing the valid names otherwise."""
    _load_target_modules()
    if name not in TARGETS:
        raise ValueError(f"unknown target {str(name)[:80]!r}; valid: {', '.join(sorted(TARGETS))}")
    return TARGETS[name]


def check_target_options(name: str, options: Mapping[str, Any]) -> TargetOptions:
    """``options`` validated against target ``name``'s :class:`TargetOptions` (nothing is built).

    Raises ``ValueError`` for an unknown target and :class:`~spruce.passes.config.ConfigError`
    naming the target, the option and the value, e.g. ``target onnxruntime: unknown option
    thread (valid: dynamic_batch, optimization, ...)``."""
    return target_class(name).Options.from_mapping(options, owner=f"target {name}")


def check_precision(name: str, precision: str) -> None:
    """Raise :class:`~spruce.passes.config.ConfigError` unless target ``name`` builds artifacts at
    ``precision`` (its class's ``precisions``), e.g. ``target torch: precision 'int8' is not
    supported (this target takes: fp32, fp16, bf16)``. Nothing is built or constructed: a command
    calls it on its arguments before any work. ``ValueError`` for an unknown target."""
    supported = target_class(name).precisions
    if precision not in supported:
        raise ConfigError(owner=f"target {name}", problems=[
            f"precision {short_repr(precision)} is not supported (this target takes: {', '.join(supported)})"])


def get_target(name: str, **options: Any) -> Target:
    """The target registered under ``name``, constructed with ``options`` (checked first, see
    :func:`check_target_options`)."""
    checked = check_target_options(name, options)
    return target_class(name)(**{key: getattr(checked, key) for key in checked.model_fields_set})


def _load_target_modules() -> None:
    """Import every module of this package (each registers its targets with ``@register_target``),
    and the modules other packages declare as ``spruce.targets`` entry points; lazily, so that
    ``spruce.targets.base`` stays importable without the heavier runtimes, and no module may
    import an optional runtime (tensorrt) at import time."""
    package = sys.modules[__package__]
    for module in pkgutil.iter_modules(package.__path__):
        if module.name not in _NOT_TARGETS:
            importlib.import_module(f"{__package__}.{module.name}")
    for entry in entry_points(group="spruce.targets"):
        try:
            entry.load()
        except Exception as exc:  # a broken plugin must not break the built-in targets
            warnings.warn(f"spruce: the target entry point {entry.name} = {entry.value} failed to import: "
                          f"{type(exc).__name__}: {exc}", stacklevel=3)


_NOT_TARGETS = ("base", "files")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
