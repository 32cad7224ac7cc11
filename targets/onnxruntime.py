"""ONNX Runtime (CPU) target: export a torch model to ONNX, run it, check it.

Export tries the TorchScript-based exporter first (fast, handles fx
GraphModules of plain torch modules well) and falls back to the
``torch.export``-based exporter. The file appears at its path only once it
has been written completely and passed ``onnx.checker``.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import io
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
import torch
from pydantic import Field
from torch import nn

from .base import Artifact, ArtifactError, Runner, Target, TargetOptions, register_target
from .console import CapturedOutput, captured_output
from .files import OutputError, atomic_path, scratch_path
from .quantize import (
    MIN_CALIBRATION_SAMPLES,
    Calibration,
    Precision,
    count_samples,
    cpu_isa_flags,
    integer_layer,
    integer_mac_share,
    quantization_mode,
    quantize_onnx,
)

OPSET = 17
# The torch.export-based exporter's lowest supported opset.
DYNAMO_OPSET = 18


class OnnxExportError(RuntimeError):
    """Neither exporter could turn the model into a valid ONNX file."""


class OnnxMismatchError(OnnxExportError):
    """The exported model's outputs differ from torch's beyond the build tolerance."""


def export_onnx(
    model: nn.Module, example_inputs: Sequence[torch.Tensor], path: str | os.PathLike, dynamic_batch: bool = False,
    prefer_dynamo: bool = False, dynamo_model: nn.Module | None = None,
    dynamic_dims: Sequence[Mapping[int, object]] | None = None, remembered: dict[tuple[str, ...], str] | None = None,
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
    better one for graphs of ATen operators, as ``torch.export`` captures them);
    ``dynamo_model``, computing what ``model`` computes, is what that exporter exports
    instead of ``model`` (a graph written for TorchScript tracing can make it specialise).
    ``dynamic_dims`` (with ``dynamic_batch``): per input, more dims to keep dynamic, as
    ``{dim: torch.export Dim}`` (a named ``Dim`` names the ONNX axis, and inputs sharing one
    ``Dim`` share the axis name); a transformer's sequence length, say. An exporter whose
    file does not compute ``model`` with each of these dims doubled (within the ``Dim``'s
    max; inputs repeated cyclically along them) is passed over, as for the batch; where
    ``model`` itself does not run at the doubled sizes that check is skipped.
    ``remembered`` (a target's, kept across its exports) maps a model's kinds of modules
    (:func:`module_kinds`) to the exporter that succeeded after the first one failed: a model of
    those kinds is then given to that exporter first (a compile exports its model's compact
    variants many times; a failing exporter costs each of them a trace).
    """
    target = Path(path)
    failures: list[str] = []
    kinds = module_kinds(model) if remembered is not None else ()
    if remembered is not None and kinds in remembered:
        prefer_dynamo = remembered[kinds] == _exporter_name(_export_dynamo)
    exporters = (_export_dynamo, _export_torchscript) if prefer_dynamo else (_export_torchscript, _export_dynamo)
    for index, exporter in enumerate(exporters):
        printed = CapturedOutput()
        try:
            # what the exporters print (graph dumps on a failure, progress lines) stays off the console
            with atomic_path(target) as temp_path, captured_output() as printed:
                exported = dynamo_model if exporter is _export_dynamo and dynamo_model is not None else model
                extra = dynamic_dims if dynamic_batch else None
                exporter(exported, tuple(example_inputs), temp_path, dynamic_batch, extra)
                onnx.checker.check_model(str(temp_path), full_check=True)
                if dynamic_batch:
                    _check_other_batch(temp_path, exported, tuple(example_inputs))
                if extra:
                    _check_other_dims(temp_path, exported, tuple(example_inputs), extra)
            if remembered is not None and index > 0:
                remembered[kinds] = _exporter_name(exporter)
            return target
        except OutputError:  # the destination cannot take the file: the other exporter would fail too
            raise
        except Exception as exc:
            full = _disk_full(exc)
            if full is not None:  # an exporter that wrapped the OSError of a full disk in its own error
                raise OutputError(f"cannot write {target}: {full.strerror or full}") from exc
            failures.append(f"{_exporter_name(exporter)}: {type(exc).__name__}: {_first_line(exc, 300)}")
            if index + 1 < len(exporters) and printed.lines:  # its dump, summarised (a silent failure stays so)
                print(_fallback_line(exporter, exporters[index + 1], exc, printed), file=sys.stderr)
    raise OnnxExportError("ONNX export failed:\n  " + "\n  ".join(failures))


def module_kinds(model: nn.Module) -> tuple[str, ...]:
    """The sorted qualified type names of ``model``'s modules: what decides which exporter handles
    it (a model's compact variants share them)."""
    return tuple(sorted({f"{type(m).__module__}.{type(m).__qualname__}" for m in model.modules()}))


def _exporter_name(exporter: Callable[..., None]) -> str:
    return exporter.__name__.removeprefix("_export_")


def _first_line(exc: BaseException, limit: int) -> str:
    """The first non-empty line of ``exc``'s message, at most ``limit`` characters (an exporter's
    message can hold a whole graph)."""
    line = next((text.strip() for text in str(exc).splitlines() if text.strip()), "")
    line = line.removeprefix(f"{type(exc).__name__}: ")  # some exporters' messages repeat their type
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _fallback_line(failed: Callable[..., None], following: Callable[..., None], exc: BaseException,
                   printed: CapturedOutput) -> str:
    """One line for an exporter that failed, printing, while another follows: which, why (the
    first line of its error, shortened), and how much of its output was held back."""
    reason = _first_line(exc, 160)
    return (f"spruce: ONNX export: the {_exporter_name(failed)} exporter failed ({type(exc).__name__}: {reason}); "
            f"{printed.lines} lines of its output hidden; trying the {_exporter_name(following)} exporter")


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


def _check_other_dims(path: Path, model: nn.Module, inputs: tuple[torch.Tensor, ...],
                     dims: Sequence[Mapping[int, object]]) -> None:
    """Raise if the ONNX file at ``path`` does not compute ``model`` with every declared dim
    of ``dims`` doubled (capped at its ``Dim``'s max; inputs repeated cyclically along it).
    Skipped where no dim can grow or ``model`` does not run at those sizes."""
    grown = []
    for t, spec in zip(inputs, list(dims) + [{}] * (len(inputs) - len(dims))):
        for d, dim in spec.items():
            if d == 0 or d >= t.dim() or not t.shape[d]:
                continue
            size = min(2 * t.shape[d], getattr(dim, "max", None) or 2 * t.shape[d])
            t = t.index_select(d, torch.arange(size) % t.shape[d])
        grown.append(t)
    if all(a.shape == b.shape for a, b in zip(grown, inputs)):
        return
    try:
        with torch.no_grad():
            model(*grown)
    except Exception:  # noqa: BLE001 - the model itself does not take these sizes: nothing to check
        return
    error = check_onnx(path, model, grown)
    if not error <= 1e-3:
        shapes = ", ".join(str(tuple(t.shape)) for t in grown)
        raise OnnxMismatchError(f"the exported graph does not keep the declared dims dynamic (relative error "
                                f"{error:.3g} at input shapes {shapes})")


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


class _Calling(nn.Module):
    """A module calling ``inner``: what the TorchScript exporter traces for an fx GraphModule."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any) -> Any:
        return self.inner(*args)


class _MeanPool(nn.Module):
    """An adaptive average pool whose output sizes are each ``None`` (kept) or 1: a mean over
    the dims sized 1 (what it computes, in a form the TorchScript exporter takes at any input size)."""

    def __init__(self, dims: tuple[int, ...]):
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=self.dims, keepdim=True)


@contextlib.contextmanager
def _means_for_partial_pools(model: nn.Module) -> Iterator[None]:
    """``model``'s adaptive average pools with a ``None`` output size (``AdaptiveAvgPool2d((None,
    1))``, a CRNN's height pool) replaced, while the context lasts, by :class:`_MeanPool` where
    every other size is 1: the TorchScript exporter refuses them ("output_size is not constant")."""
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
                continue
            rank = {nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3}[type(child)]
            sizes = child.output_size if isinstance(child.output_size, tuple) else (child.output_size,) * rank
            if None in sizes and all(size in (None, 1) for size in sizes):
                swapped.append((parent, name, child))
                setattr(parent, name, _MeanPool(tuple(d - rank for d, size in enumerate(sizes) if size == 1)))
    try:
        yield
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


def _export_torchscript(model: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path,
                        dynamic_batch: bool = False, dynamic_dims: Sequence[Mapping[int, object]] | None = None,
                        ) -> None:
    """The TorchScript-based exporter; its deprecation and tracer warnings are expected."""
    names = _input_names(len(inputs))
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {name: {0: "batch"} for name in names}
        for name, spec in zip(names, dynamic_dims or ()):
            dynamic_axes[name].update({d: _axis_name(name, d, dim) for d, dim in spec.items() if d != 0})
    # torch's TorchScript exporter reads ``model.graph`` as a TorchScript graph when the model has one;
    # an fx GraphModule's is an fx graph ("'Graph' object has no attribute 'outputs'"): export a wrapper
    traced = _Calling(model).train(model.training) if isinstance(getattr(model, "graph", None), torch.fx.Graph) \
        else model  # (in the model's mode: the exporter restores the wrapper's mode, recursively, when done)
    with warnings.catch_warnings(), _means_for_partial_pools(model):
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            traced, inputs, str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=names,
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )


def _export_dynamo(model: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path,
                   dynamic_batch: bool = False, dynamic_dims: Sequence[Mapping[int, object]] | None = None,
                   ) -> None:
    """The torch.export-based exporter, weights kept inside the file."""
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=4096)
        extra = list(dynamic_dims or ()) + [{}] * (len(inputs) - len(dynamic_dims or ()))
        dynamic_shapes = tuple({0: batch, **{d: dim for d, dim in spec.items() if d != 0}}
                               for spec in extra[:len(inputs)])
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


# --- single layers, for timing --------------------------------------------------------


def layer_onnx(layer: nn.Module, example: torch.Tensor, dynamic_batch: bool = True) -> onnx.ModelProto | None:
    """The ONNX graph the exporter writes for a lone Conv1d/2d/3d or Linear ``layer`` at input
    ``example`` (one Conv node; Gemm for a 2-d Linear input, MatMul + Add otherwise), built
    directly in a few milliseconds instead of a trace. None for anything else (other module
    types, string or non-zero-mode padding, non-float32 weights): export those.

    Used to time the many layer shapes of a latency table; its outputs equal torch's
    (tested), so it is the same work the exported layer would do."""
    if type(layer) not in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear) or example.dtype != torch.float32:
        return None
    if layer.weight.dtype != torch.float32:
        return None
    weight = layer.weight.detach().cpu().numpy()
    initializers = [onnx.numpy_helper.from_array(weight, "weight")]
    has_bias = layer.bias is not None
    if has_bias:
        initializers.append(onnx.numpy_helper.from_array(layer.bias.detach().cpu().numpy(), "bias"))
    name_in, name_out = _input_names(1)[0], "output"
    if isinstance(layer, nn.Linear):
        if example.dim() == 2:
            nodes = [onnx.helper.make_node("Gemm", [name_in, "weight"] + (["bias"] if has_bias else []), [name_out],
                                           alpha=1.0, beta=1.0, transB=1)]
        else:
            initializers[0] = onnx.numpy_helper.from_array(np.ascontiguousarray(weight.T), "weight")
            product = "product" if has_bias else name_out
            nodes = [onnx.helper.make_node("MatMul", [name_in, "weight"], [product])]
            if has_bias:
                nodes.append(onnx.helper.make_node("Add", [product, "bias"], [name_out]))
        out_shape = [*example.shape[:-1], layer.out_features]
    else:
        if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
            return None
        pads = list(layer.padding) * 2
        nodes = [onnx.helper.make_node("Conv", [name_in, "weight"] + (["bias"] if has_bias else []), [name_out],
                                       dilations=list(layer.dilation), group=layer.groups,
                                       kernel_shape=list(layer.kernel_size), pads=pads, strides=list(layer.stride))]
        with torch.no_grad():
            out_shape = list(layer(example[:1]).shape)
        out_shape[0] = example.shape[0]
    float_type = onnx.TensorProto.FLOAT

    def shape(dims: Sequence[int]) -> list[int | str]:
        return ["batch" if dynamic_batch and k == 0 else int(d) for k, d in enumerate(dims)]

    graph = onnx.helper.make_graph(nodes, "layer", [onnx.helper.make_tensor_value_info(name_in, float_type,
                                                                                          shape(example.shape))],
                                   [onnx.helper.make_tensor_value_info(name_out, float_type, shape(out_shape))],
                                   initializer=initializers)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


# --- helpers -----------------------------------------------------------------------


def external_data_files(path: str | os.PathLike) -> tuple[str, ...]:
    """Names of the external-data files the ONNX model at ``path`` reads (next to it), sorted."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not a readable ONNX file: it has no external data we can name
        return ()
    locations = set()
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if onnx.external_data_helper.uses_external_data(tensor):
            locations.update(entry.value for entry in tensor.external_data if entry.key == "location")
    return tuple(sorted(locations))


def _first_line(exc: BaseException, limit: int = 300) -> str:
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[:limit] + "..."


def _disk_full(exc: BaseException) -> OSError | None:
    """The OSError of a full disk (or quota, or file size limit) behind ``exc``, if any."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _axis_name(input_name: str, dim: int, declared: object) -> str:
    """The ONNX axis name of a declared dynamic dim: its named ``Dim``'s name, else
    ``<input>_dim<k>``."""
    name = getattr(declared, "__name__", None)
    return name if isinstance(name, str) and name.isidentifier() else f"{input_name}_dim{dim}"


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


def timing_cpus(threads: int) -> tuple[int, ...] | None:
    """The CPUs a timed session's ``threads`` threads are pinned to, one each: the first
    ``threads`` CPUs this process may use (``os.sched_getaffinity``), the timing thread on the
    first. None where the OS cannot set affinities or the process may use fewer CPUs."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    return tuple(cpus[:threads]) if len(cpus) >= threads else None


@register_target
class OnnxRuntimeCPU(Target):
    """ONNX Runtime on the CPU: artifact = a checked ``.onnx`` file.

    ``threads`` fixes ONNX Runtime's intra-op threads (default: torch's thread
    count, so that timings are comparable with the torch CPU target).

    ``spinning`` sets ONNX Runtime's ``session.intra_op.allow_spinning``. It is off by
    default, unlike ONNX Runtime's own default: a spinning session's worker threads keep
    busy-waiting after each run, so when several sessions are timed interleaved (latency
    tables, the compiled-vs-dense check) the idle ones take the cores from the one being
    timed. Measured with ``bench/ort_spinning.py``: 4 copies of one model timed 8-11 % apart
    and at 1.4-1.7x their lone latency with spinning on, 1.7 % apart with it off. Tables are
    profiled and models checked with the same setting (it is part of :meth:`fingerprint`).

    ``pin_threads`` (default on) pins the threads of the sessions it times (latency tables,
    budget checks, :func:`spruce.bench`), one per CPU: the timing thread to the first CPU
    this process may use, each intra-op worker to one of the next ``threads - 1``
    (``session.intra_op_thread_affinities``). A busy process on the machine then always
    shares a core with the same thread, and the timing subtracts the delay that caused
    (:mod:`spruce.targets.timing`). Measured next to a busy loop on 2 cores: a model and a
    second session of it timed within 1.8 % pinned (``bench/results/latency.md``), up to
    27.5 % apart unpinned. Sessions for anything else (:meth:`load`) are not pinned. Pinning
    is off where the process may use fewer CPUs than ``threads`` or cannot set affinities.

    ``precision="int8"`` builds an INT8 artifact with ``onnxruntime.quantization`` (see
    :mod:`spruce.targets.quantize`: static QDQ U8S8, per-channel symmetric weights, per-tensor
    activations, or dynamic for recurrent and convolution-free models) after the fp32 export,
    which must still match torch within ``tolerance``. Static quantization calibrates with
    ``calibration`` (``minmax`` or ``percentile``) on the samples given to :meth:`build` as
    ``calibration_data``; ``keep_fp32=k`` leaves the ``k`` layers most sensitive to quantization
    fp32 (the sensitivity rule of :mod:`spruce.targets.quantize`; the manifest names them). The
    fingerprint names the precision and the CPU's ISA extensions
    (VNNI or AMX decide what INT8 costs).
    """

    name = "onnxruntime"
    suffix = ".onnx"

    class Options(TargetOptions):
        owner = "onnxruntime"
        threads: int | None = Field(None, ge=1)  # intra-op threads; None: torch's thread count
        optimization: Literal["none", "basic", "extended", "all"] = "all"  # ORT graph optimisation level
        dynamic_batch: bool = True
        tolerance: float = Field(1e-3, gt=0)  # largest relative ORT-vs-torch difference accepted
        save_optimized: bool = False
        spinning: bool = False  # ORT's session.intra_op.allow_spinning (ORT's own default is on)
        pin_threads: bool = True  # timed sessions: one thread per CPU (see the class docstring)
        precision: Precision = "fp32"  # int8: quantized with onnxruntime.quantization after the export
        calibration: Calibration = "minmax"  # static INT8 calibration method
        keep_fp32: int = Field(0, ge=0)  # INT8: the most quantization-sensitive layers left fp32 (quantize.py)

    precisions = ("fp32", "int8")

    def __init__(self, threads: int | None = None, optimization: str = "all", dynamic_batch: bool = True,
                 tolerance: float = 1e-3, save_optimized: bool = False, spinning: bool = False,
                 pin_threads: bool = True, precision: str = "fp32", calibration: str = "minmax", keep_fp32: int = 0):
        self.Options(threads=threads, optimization=optimization, dynamic_batch=dynamic_batch, tolerance=tolerance,
                     save_optimized=save_optimized, spinning=spinning, pin_threads=pin_threads, precision=precision,
                     calibration=calibration, keep_fp32=keep_fp32)
        self.precision = precision
        self.keep_fp32 = int(keep_fp32)
        self.calibration = calibration
        self.spinning = bool(spinning)
        self.threads = threads or torch.get_num_threads()
        self.optimization = optimization
        self.dynamic_batch = bool(dynamic_batch)
        self.tolerance = float(tolerance)
        self.save_optimized = bool(save_optimized)
        self.pinned_cpus = timing_cpus(self.threads) if pin_threads else None
        # model kinds -> the exporter that handled them after the other failed (export_onnx's ``remembered``)
        self.exporters: dict[tuple[str, ...], str] = {}

    def call_cost_case(self) -> tuple[nn.Module, tuple[torch.Tensor, ...]] | None:
        """At INT8, a 1x1 convolution of one channel on one pixel: a lone layer timed as the whole
        graph runs it (:meth:`model_runner`) carries ONNX Runtime's per-run cost, which the
        whole model pays once; extrapolating a signature's timings to zero channels overshoots
        it there (clipped to the signature's fastest point, a layer's narrowest widths would
        cost nothing). fp32 tables keep the extrapolation (None)."""
        if self.precision != "int8":
            return None
        generator = torch.Generator().manual_seed(0)
        layer = nn.Conv2d(1, 1, 1, bias=False)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator))
        return layer, (torch.randn(1, 1, 1, 1, generator=generator),)

    def fingerprint(self) -> dict[str, str]:
        pinned = ",".join(map(str, self.pinned_cpus)) if self.pinned_cpus else "off"
        return {**super().fingerprint(), "onnxruntime": ort.__version__, "threads": str(self.threads),
                "optimization": self.optimization, "spinning": str(self.spinning), "pinned cpus": pinned,
                "precision": self.precision, "isa": ",".join(cpu_isa_flags()) or "unknown",
                **({"int8 layers": "integer in and out"} if self.precision == "int8" else {})}

    def caller_cpu(self) -> int | None:
        return self.pinned_cpus[0] if self.pinned_cpus else None

    def build(self, model: nn.Module, example_inputs: Sequence[torch.Tensor], path: str | os.PathLike,
              calibration_data: Sequence[Sequence[torch.Tensor]] | None = None,
              dynamic_dims: Sequence[Mapping[int, object]] | None = None) -> Artifact:
        """Export, check with ``onnx.checker``, optionally save ORT's optimised graph, compare with torch.

        The artifact appears at ``path`` only once its outputs match torch's within ``tolerance``
        (relative to the output scale, see :func:`check_onnx`); otherwise :class:`OnnxMismatchError`
        is raised and nothing is left behind. At ``precision="int8"`` the fp32 export is checked so,
        then quantized (:meth:`_build_int8`); ``calibration_data`` holds its samples, each a tuple of the
        model's inputs (at least :data:`~spruce.targets.quantize.MIN_CALIBRATION_SAMPLES` rows in
        all, along dim 0; needed unless the model takes dynamic quantization). ``dynamic_dims``
        (with ``dynamic_batch``): per input, more dims kept dynamic (a language model's sequence
        length), as :func:`export_onnx` takes them.
        """
        path = Path(path)
        model = model.eval()
        if self.precision == "int8":
            return self._build_int8(model, example_inputs, path, calibration_data)
        with atomic_path(path) as temp:
            if self.save_optimized:  # ORT writes its optimised graph of the exported file into temp
                with scratch_path(path) as exported:
                    export_onnx(model, example_inputs, exported, dynamic_batch=self.dynamic_batch,
                                dynamic_dims=dynamic_dims, remembered=self.exporters)
                    options = self._options()
                    options.optimized_model_filepath = str(temp)
                    ort.InferenceSession(str(exported), sess_options=options, providers=["CPUExecutionProvider"])
            else:
                export_onnx(model, example_inputs, temp, dynamic_batch=self.dynamic_batch, dynamic_dims=dynamic_dims,
                            remembered=self.exporters)
            error = check_onnx(temp, model, example_inputs)
            if not error <= self.tolerance:
                raise OnnxMismatchError(f"{path.name}: ONNX Runtime output differs from torch by {error:.3g} "
                                        f"(relative), above the tolerance {self.tolerance:g}")
        shapes = tuple(tuple(t.shape) for t in example_inputs)
        artifact = Artifact(path=path, target=self.name, input_shapes=shapes, data_files=external_data_files(path),
                            input_dtype=str(example_inputs[0].dtype).removeprefix("torch."),
                            info={"opset": OPSET, "dynamic_batch": self.dynamic_batch,
                                  "optimization": self.optimization, "optimized_graph_saved": self.save_optimized,
                                  "max_relative_error": error, "tolerance": self.tolerance, "precision": "fp32"})
        artifact.write_manifest()
        return artifact

    def _build_int8(self, model: nn.Module, example_inputs: Sequence[torch.Tensor], path: Path,
                    calibration_data: Sequence[Sequence[torch.Tensor]] | None) -> Artifact:
        """The INT8 artifact: the fp32 export (checked against torch within ``tolerance``) quantized
        by :func:`~spruce.targets.quantize.quantize_onnx`. Its manifest records the precision, how
        it was quantized and calibrated, its error against torch on ``example_inputs`` (not
        gated: fidelity is the caller's to judge) and the share of conv/matmul MACs ONNX Runtime
        runs in integer kernels. Raises ``ValueError`` naming ``calibration_data`` when fewer than
        :data:`~spruce.targets.quantize.MIN_CALIBRATION_SAMPLES` samples are given (before any
        export when some are given, after it when none are and the model needs them)."""
        given = None if calibration_data is None else count_samples(calibration_data)
        if given is not None and given < MIN_CALIBRATION_SAMPLES:
            raise ValueError(f"precision='int8': calibration_data has {given} samples, at least "
                             f"{MIN_CALIBRATION_SAMPLES} are needed")
        with atomic_path(path) as temp, scratch_path(path, ".fp32.onnx") as exported, \
                scratch_path(path, ".int8.onnx") as quantized:
            export_onnx(model, example_inputs, exported, dynamic_batch=self.dynamic_batch, remembered=self.exporters)
            fp32_error = check_onnx(exported, model, example_inputs)
            if not fp32_error <= self.tolerance:
                raise OnnxMismatchError(f"{path.name}: ONNX Runtime output differs from torch by {fp32_error:.3g} "
                                        f"(relative), above the tolerance {self.tolerance:g}")
            if given is None and quantization_mode(onnx.load(str(exported)))[0] == "static":
                raise ValueError(f"precision='int8': {path.name} takes static quantization, which needs "
                                 f"calibration_data (at least {MIN_CALIBRATION_SAMPLES} samples); none was given")
            # the quantized file is the artifact (written into temp), or, with save_optimized, the
            # input of the ONNX Runtime session that writes its optimised graph into temp
            record = quantize_onnx(exported, quantized if self.save_optimized else temp, calibration_data,
                                   self.calibration, keep_fp32=self.keep_fp32)
            if self.save_optimized:
                options = self._options()
                options.optimized_model_filepath = str(temp)
                ort.InferenceSession(str(quantized), sess_options=options, providers=["CPUExecutionProvider"])
            error = check_onnx(temp, model, example_inputs)
            macs = integer_mac_share(temp, [_as_numpy(t) for t in example_inputs], self._options())
        shapes = tuple(tuple(t.shape) for t in example_inputs)
        artifact = Artifact(path=path, target=self.name, input_shapes=shapes, data_files=external_data_files(path),
                            input_dtype=str(example_inputs[0].dtype).removeprefix("torch."),
                            info={"opset": OPSET, "dynamic_batch": self.dynamic_batch,
                                  "optimization": self.optimization, "optimized_graph_saved": self.save_optimized,
                                  "max_relative_error": error, "fp32_max_relative_error": fp32_error,
                                  "tolerance": self.tolerance, "precision": "int8",
                                  "quantization": record.to_dict(), "integer_mac_share": macs.integer_share})
        artifact.write_manifest()
        return artifact

    def _options(self, timing: bool = False) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = _OPT_LEVELS[self.optimization]
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        if timing and self.pinned_cpus and len(self.pinned_cpus) > 1:  # ORT numbers processors from 1
            options.add_session_config_entry("session.intra_op_thread_affinities",
                                             ";".join(str(cpu + 1) for cpu in self.pinned_cpus[1:]))
        return options

    def session(self, path: str | os.PathLike, timing: bool = False) -> ort.InferenceSession:
        """An ONNX Runtime CPU session on ``path`` with this target's threads, graph optimisation
        and spinning setting; ``timing``: its workers pinned (see the class docstring)."""
        options = self._options(timing)
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])

    def model_runner(self, model: nn.Module, example_inputs: Sequence[torch.Tensor],
                     stem: Path) -> tuple[Runner, list[Any]]:
        """A session on ``model`` exported to ``stem.onnx``, for timing only: the file is
        checked by ``onnx.checker`` but not compared with torch (that is :meth:`build`'s job
        for artifacts), which halves the cost of timing many small models (profiling). A lone
        Conv/Linear layer is written directly (:func:`layer_onnx`), without a trace. At INT8 a lone
        layer is timed as a whole INT8 model runs it: integer tensors in and out, without the
        quantize, dequantize and layout transposes of its fp32 boundary (:meth:`_integer_layer`);
        the runner's input is then an integer tensor in ONNX Runtime's layout (NHWC for a
        convolution), and so is its output."""
        path = Path(str(stem) + self.suffix)
        single = layer_onnx(model, example_inputs[0], self.dynamic_batch) if len(example_inputs) == 1 else None
        if single is not None:
            onnx.save(single, str(path))
        else:
            export_onnx(model.eval(), tuple(example_inputs), path, dynamic_batch=self.dynamic_batch,
                        remembered=self.exporters)
        feed_shape = None
        if self.precision == "int8":  # timed as it ships; the example calibrates (scales do not change speed)
            fp32_path, path = path, Path(str(stem) + ".int8" + self.suffix)
            quantize_onnx(fp32_path, path, [tuple(example_inputs)], self.calibration)
            if single is not None:
                path, feed_shape = self._integer_layer(path, tuple(example_inputs[0].shape))
        session = self.session(path, timing=True)
        names = [i.name for i in session.get_inputs()]
        feed = {n: _as_numpy(v) for n, v in zip(names, example_inputs)}
        if feed_shape is not None:  # the lone layer's integer input: any values time alike
            integer = np.random.default_rng(0).integers(0, 256, size=feed_shape)
            feed = {names[0]: integer.astype(_NUMPY_TYPES[session.get_inputs()[0].type])}

        def run(inputs: Sequence[Any]) -> list[np.ndarray]:
            return session.run(None, {n: _as_numpy(v) for n, v in zip(names, inputs)})

        return run, [feed[n] for n in names]

    def _integer_layer(self, quantized: Path, input_shape: tuple[int, ...]) -> tuple[Path, tuple[int, ...] | None]:
        """The lone INT8 layer in ``quantized`` as a whole INT8 model runs it (integer NHWC tensors in and
        out, :func:`~spruce.targets.quantize.integer_layer`), written next to it, and its input's shape;
        ``(quantized, None)`` where ONNX Runtime runs no boundary to remove."""
        optimized = quantized.with_suffix(".opt.onnx")
        options = self._options()
        options.optimized_model_filepath = str(optimized)
        options.log_severity_level = 3  # ORT warns that the saved graph is for this CPU: it is, and only timed here
        ort.InferenceSession(str(quantized), sess_options=options, providers=["CPUExecutionProvider"])
        before = onnx.load(str(optimized))
        stripped, shape = integer_layer(before, input_shape)
        if len(stripped.graph.node) == len(before.graph.node):
            return quantized, None
        path = quantized.with_suffix(".integer.onnx")
        onnx.save(stripped, str(path))
        return path, shape

    def load(self, artifact: Artifact) -> Runner:
        return self._load(artifact, timing=False)

    def timing_runner(self, artifact: Artifact) -> Runner:
        return self._load(artifact, timing=True)

    def _load(self, artifact: Artifact, timing: bool) -> Runner:
        if artifact.target != self.name:
            raise ArtifactError(f"artifact {artifact.path} was built for target {artifact.target!r}, not {self.name!r}")
        unpinned = sorted(set(external_data_files(artifact.path)) - set(artifact.data_files))
        if unpinned:
            raise ArtifactError(f"artifact {artifact.path} reads external data {unpinned} that its manifest does "
                                f"not pin: rebuild it")
        try:
            session = self.session(artifact.path, timing)
        except Exception as exc:  # noqa: BLE001 - ORT's own error types for a file it cannot parse
            raise ArtifactError(f"artifact {artifact.path} cannot be loaded by ONNX Runtime: "
                                f"{_first_line(exc)}") from exc
        declared = session.get_inputs()
        names = [i.name for i in declared]
        if len(declared) != len(artifact.input_shapes) or any(
                len(i.shape) != len(s) or any(isinstance(d, int) and d != e for d, e in zip(i.shape[1:], s[1:]))
                for i, s in zip(declared, artifact.input_shapes)):
            raise ArtifactError(f"manifest {artifact.manifest_path} says the inputs are "
                                f"{[list(s) for s in artifact.input_shapes]}, the ONNX model takes "
                                f"{[list(i.shape) for i in declared]}: the manifest was edited (rebuild the artifact)")

        def run(inputs: Sequence[Any]) -> list[np.ndarray]:
            return session.run(None, {n: _as_numpy(v) for n, v in zip(names, inputs)})

        return run


_NUMPY_TYPES = {"tensor(uint8)": np.uint8, "tensor(int8)": np.int8}

_OPT_LEVELS = {
    "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
