"""ONNX Runtime (CPU) target: export a torch model to ONNX, run it, check it.

Export tries the TorchScript-based exporter first (fast, handles fx
GraphModules of plain torch modules well) and falls back to the
``torch.export``-based exporter. The file appears at its path only once it
has been written completely and passed ``onnx.checker``.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from .base import Artifact, ArtifactError, Runner, Target, register_target
from .files import atomic_path, scratch_path

OPSET = 17
# The torch.export-based exporter's lowest supported opset.
DYNAMO_OPSET = 18


class OnnxExportError(RuntimeError):
    """Neither exporter could turn the model into a valid ONNX file."""


class OnnxMismatchError(OnnxExportError):
    """The exported model's outputs differ from torch's beyond the build tolerance."""


def export_onnx(
    model: nn.Module, example_inputs: Sequence[torch.Tensor], path: str | os.PathLike, dynamic_batch: bool = False,
    prefer_dynamo: bool = False,
) -> Path:
    """Export ``model`` traced on ``example_inputs`` to an ONNX file at ``path``.

    With ``dynamic_batch`` the first axis of every input (and output) is symbolic
    (``batch``), so one file runs at any batch size: checked by running it at two more
    than the example's batch (an exporter that baked the batch into the graph, as
    TorchScript tracing does with sizes read through ATen ``sym_size``, is passed over for
    the next). Returns the path. The file
    is written to a temporary name in the same folder, checked with ``onnx.checker`` and then renamed, so ``path`` never
    holds a partial or invalid model. Raises :class:`OnnxExportError` if both
    exporters fail. ``prefer_dynamo`` tries the torch.export-based exporter first (the
    better one for graphs of ATen operators, as ``torch.export`` captures them).
    """
    target = Path(path)
    failures: list[str] = []
    exporters = (_export_dynamo, _export_torchscript) if prefer_dynamo else (_export_torchscript, _export_dynamo)
    for exporter in exporters:
        try:
            with atomic_path(target) as temp_path:
                exporter(model, tuple(example_inputs), temp_path, dynamic_batch)
                onnx.checker.check_model(str(temp_path), full_check=True)
                if dynamic_batch:
                    _check_other_batch(temp_path, model, tuple(example_inputs))
            return target
        except Exception as exc:
            failures.append(f"{exporter.__name__.removeprefix('_export_')}: "
                            f"{type(exc).__name__}: {exc}")
    raise OnnxExportError("ONNX export failed:\n  " + "\n  ".join(failures))


def _check_other_batch(path: Path, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    """Raise if the ONNX file at ``path`` does not compute ``model`` at two more than the
    example's batch size (dim 0 of every input repeated cyclically; not 2, the batch the
    torch.export-based exporter traces a batch of one at)."""
    bigger = tuple(t.index_select(0, torch.arange(t.shape[0] + 2) % t.shape[0]) if t.dim() and t.shape[0] else t
                   for t in inputs)
    error = check_onnx(path, model, bigger)
    if not error <= 1e-3:
        raise OnnxMismatchError(f"the exported graph does not keep the batch dynamic (relative error {error:.3g} at "
                                f"batch {bigger[0].shape[0] if bigger and bigger[0].dim() else '?'})")


def run_onnx(
    path: str | os.PathLike, inputs: Sequence[torch.Tensor | np.ndarray]
) -> list[np.ndarray]:
    """Run the ONNX model at ``path`` on CPU with ONNX Runtime; outputs in graph order."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    graph_inputs = session.get_inputs()
    if len(graph_inputs) != len(inputs):
        raise ValueError(
            f"{path} takes {len(graph_inputs)} inputs, {len(inputs)} were given"
        )
    feed = {graph_input.name: _as_numpy(value) for graph_input, value in zip(graph_inputs, inputs)}
    return session.run(None, feed)


def check_onnx(
    path: str | os.PathLike, model: nn.Module, example_inputs: Sequence[torch.Tensor]
) -> float:
    """Largest difference between torch and ONNX Runtime outputs, relative to output scale.

    For each output pair the error is ``max|a - b| / max(1, max|a|)`` with
    ``a`` the torch output; the largest over all outputs is returned.
    """
    with torch.no_grad():
        expected = [_as_numpy(t) for t in _flatten_tensors(model(*example_inputs))]
    actual = run_onnx(path, example_inputs)
    if len(expected) != len(actual):
        raise ValueError(
            f"torch model gives {len(expected)} outputs, {path} gives {len(actual)}"
        )
    return max((_relative_error(a, b) for a, b in zip(expected, actual)), default=0.0)


# --- exporters ---------------------------------------------------------------------


def _export_torchscript(model: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path,
                        dynamic_batch: bool = False) -> None:
    """The TorchScript-based exporter; its deprecation and tracer warnings are expected."""
    names = _input_names(len(inputs))
    dynamic_axes = {name: {0: "batch"} for name in names} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            model, inputs, str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=names,
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )


def _export_dynamo(model: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path,
                   dynamic_batch: bool = False) -> None:
    """The torch.export-based exporter, weights kept inside the file."""
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=4096)
        dynamic_shapes = tuple({0: batch} for _ in inputs)
        params = list(inspect.signature(model.forward).parameters.values())
        if params and params[0].kind is inspect.Parameter.VAR_POSITIONAL:  # forward(*tensors)
            dynamic_shapes = (dynamic_shapes,)
        # torch.export specialises size-1 axes: trace a batch of one as a batch of two copies.
        inputs = tuple(t.expand(2, *t.shape[1:]).contiguous() if t.dim() and t.shape[0] == 1 else t for t in inputs)
    with _quiet():
        torch.onnx.export(
            model, inputs, str(path),
            dynamo=True,
            opset_version=DYNAMO_OPSET,
            input_names=_input_names(len(inputs)),
            external_data=False,
            dynamic_shapes=dynamic_shapes,
            verbose=False,
        )


# --- helpers -----------------------------------------------------------------------


def _input_names(count: int) -> list[str]:
    return [f"input_{i}" for i in range(count)]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hide the progress lines and warnings the dynamo exporter prints."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _as_numpy(value: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _flatten_tensors(value: Any) -> list[torch.Tensor]:
    """Tensors of a (nested) output in the order the exporters flatten them."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for item in value.values() for t in _flatten_tensors(item)]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _flatten_tensors(item)]
    return []


def _relative_error(expected: np.ndarray, actual: np.ndarray) -> float:
    if expected.shape != actual.shape:
        raise ValueError(f"output shape {actual.shape} differs from torch's {expected.shape}")
    if expected.size == 0:
        return 0.0
    expected = expected.astype(np.float64)
    scale = max(1.0, float(np.abs(expected).max()))
    return float(np.abs(expected - actual.astype(np.float64)).max()) / scale


# --- the target ----------------------------------------------------------------------


@register_target
class OnnxRuntimeCPU(Target):
    """ONNX Runtime on the CPU: artifact = a checked ``.onnx`` file.

    ``threads`` fixes ONNX Runtime's intra-op threads (default: torch's thread
    count, so that timings are comparable with the torch CPU target).
    """

    name = "onnxruntime"
    suffix = ".onnx"

    def __init__(self, threads: int | None = None, optimization: str = "all", dynamic_batch: bool = True,
                 tolerance: float = 1e-3, save_optimized: bool = False):
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"onnxruntime: threads must be a positive integer, got {threads!r}")
        if optimization not in _OPT_LEVELS:
            raise ValueError(f"onnxruntime: optimization must be one of {', '.join(_OPT_LEVELS)}, got {optimization!r}")
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance > 0:
            raise ValueError(f"onnxruntime: tolerance must be a positive number, got {tolerance!r}")
        self.threads = threads or torch.get_num_threads()
        self.optimization = optimization
        self.dynamic_batch = bool(dynamic_batch)
        self.tolerance = float(tolerance)
        self.save_optimized = bool(save_optimized)

    def fingerprint(self) -> dict[str, str]:
        return {**super().fingerprint(), "onnxruntime": ort.__version__, "threads": str(self.threads),
                "optimization": self.optimization}

    def build(self, model: nn.Module, example_inputs: Sequence[torch.Tensor], path: str | os.PathLike) -> Artifact:
        """Export, check with ``onnx.checker``, optionally save ORT's optimised graph, compare with torch.

        The artifact appears at ``path`` only once its outputs match torch's within ``tolerance``
        (relative to the output scale, see :func:`check_onnx`); otherwise :class:`OnnxMismatchError`
        is raised and nothing is left behind.
        """
        path = Path(path)
        model = model.eval()
        with atomic_path(path) as temp:
            if self.save_optimized:  # ORT writes its optimised graph of the exported file into temp
                with scratch_path(path) as exported:
                    export_onnx(model, example_inputs, exported, dynamic_batch=self.dynamic_batch)
                    options = self._options()
                    options.optimized_model_filepath = str(temp)
                    ort.InferenceSession(str(exported), sess_options=options, providers=["CPUExecutionProvider"])
            else:
                export_onnx(model, example_inputs, temp, dynamic_batch=self.dynamic_batch)
            error = check_onnx(temp, model, example_inputs)
            if not error <= self.tolerance:
                raise OnnxMismatchError(f"{path.name}: ONNX Runtime output differs from torch by {error:.3g} "
                                        f"(relative), above the tolerance {self.tolerance:g}")
        shapes = tuple(tuple(t.shape) for t in example_inputs)
        artifact = Artifact(path=path, target=self.name, input_shapes=shapes,
                            input_dtype=str(example_inputs[0].dtype).removeprefix("torch."),
                            info={"opset": OPSET, "dynamic_batch": self.dynamic_batch,
                                  "optimization": self.optimization, "optimized_graph_saved": self.save_optimized,
                                  "max_relative_error": error, "tolerance": self.tolerance})
        artifact.write_manifest()
        return artifact

    def _options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = _OPT_LEVELS[self.optimization]
        return options

    def session(self, path: str | os.PathLike) -> ort.InferenceSession:
        """An ONNX Runtime CPU session on ``path`` with this target's threads and graph optimisation."""
        options = self._options()
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])

    def load(self, artifact: Artifact) -> Runner:
        if artifact.target != self.name:
            raise ArtifactError(f"artifact {artifact.path} was built for target {artifact.target!r}, not {self.name!r}")
        session = self.session(artifact.path)
        names = [i.name for i in session.get_inputs()]

        def run(inputs: Sequence[Any]) -> list[np.ndarray]:
            return session.run(None, {n: _as_numpy(v) for n, v in zip(names, inputs)})

        return run


_OPT_LEVELS = {
    "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
