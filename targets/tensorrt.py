"""TensorRT target: ONNX -> serialised engine (FP16, 2:4 sparse weights), run and profiled per layer.

Nothing here imports ``tensorrt`` at module import time, and no TensorRT
object is created before :meth:`TensorRTTarget.unavailable_reason` has
confirmed a CUDA driver and device through torch: creating a TensorRT builder
or runtime without a driver crashes the process instead of raising.

API names follow the TensorRT (10.x) Python documentation: ``trt.Builder``,
``Builder.create_network``, ``trt.OnnxParser``, ``IBuilderConfig.set_flag``
(``BuilderFlag.FP16``, ``BuilderFlag.SPARSE_WEIGHTS``),
``IBuilderConfig.create_timing_cache`` / ``set_timing_cache``,
``Builder.create_optimization_profile`` + ``IOptimizationProfile.set_shape``,
``Builder.build_serialized_network``, ``Runtime.deserialize_cuda_engine``,
``ICudaEngine.create_engine_inspector`` + ``IEngineInspector.get_engine_information
(LayerInformationFormat.JSON)``, ``IExecutionContext.set_input_shape`` /
``set_tensor_address`` / ``execute_async_v3`` and ``IProfiler.report_layer_time``.

The pure-ONNX parts (preparing the graph, checking 2:4 patterns of the
exported weights) run everywhere and are what the tests cover without a GPU.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from pydantic import Field, field_validator
from torch import nn

from .base import Artifact, ArtifactError, Runner, Target, TargetOptions, TargetUnavailable, register_target
from .files import atomic_path, atomic_write_bytes, atomic_write_text, scratch_path
from .onnxruntime import export_onnx

_WEIGHT_OPS = ("Conv", "Gemm", "MatMul")


# --- ONNX preparation and the 2:4 checker (no TensorRT needed) --------------------------------


@dataclass(frozen=True)
class SparsityCheck:
    """Whether one weight initializer follows the 2:4 pattern TensorRT's sparse kernels need."""

    node: str
    op_type: str
    initializer: str
    shape: tuple[int, ...]
    qualifies: bool
    reason: str  # why not, or "2:4" when it qualifies


def check_2_4(model: onnx.ModelProto | str | os.PathLike) -> list[SparsityCheck]:
    """For each Conv/Gemm/MatMul weight initializer: does every group of 4 input channels hold <= 2 non-zeros?

    Groups run along the input-channel axis, one sequence per output channel and kernel position
    (Conv weight ``[out, in/groups, *kernel]``; Gemm weight ``[out, in]`` or ``[in, out]`` with
    ``transB=0``; MatMul right operand ``[in, out]``). A layer whose input channels are not a
    multiple of 4 cannot qualify. Results are in graph order.
    """
    proto = onnx.load(str(model)) if not isinstance(model, onnx.ModelProto) else model
    initializers = {init.name: init for init in proto.graph.initializer}
    checks = []
    for node in proto.graph.node:
        if node.op_type not in _WEIGHT_OPS or len(node.input) < 2 or node.input[1] not in initializers:
            continue
        weight = numpy_helper.to_array(initializers[node.input[1]])
        checks.append(_check_weight(node, weight))
    return checks


def _check_weight(node: onnx.NodeProto, weight: np.ndarray) -> SparsityCheck:
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Conv":
        if weight.ndim < 3:
            return _result(node, weight, False, f"Conv weight of rank {weight.ndim}")
        in_last = np.moveaxis(weight, 1, -1).reshape(-1, weight.shape[1])  # rows: (out, kernel position)
    elif node.op_type == "Gemm":
        if weight.ndim != 2:
            return _result(node, weight, False, f"Gemm weight of rank {weight.ndim}")
        in_last = weight if attributes.get("transB", 0) else weight.T
    else:  # MatMul: x @ W with W [in, out] (possibly batched)
        if weight.ndim < 2:
            return _result(node, weight, False, f"MatMul weight of rank {weight.ndim}")
        in_last = np.swapaxes(weight, -1, -2).reshape(-1, weight.shape[-2])
    channels = in_last.shape[1]
    if channels % 4:
        return _result(node, weight, False, f"{channels} input channels, not a multiple of 4")
    nonzero_per_group = (in_last.reshape(in_last.shape[0], channels // 4, 4) != 0).sum(axis=2)
    worst = int(nonzero_per_group.max()) if nonzero_per_group.size else 0
    if worst > 2:
        dense_groups = int((nonzero_per_group > 2).sum())
        return _result(node, weight, False, f"{dense_groups} of {nonzero_per_group.size} groups of 4 hold "
                                            f"more than 2 non-zeros (up to {worst})")
    return _result(node, weight, True, "2:4")


def _result(node: onnx.NodeProto, weight: np.ndarray, qualifies: bool, reason: str) -> SparsityCheck:
    return SparsityCheck(node=node.name or node.output[0], op_type=node.op_type, initializer=node.input[1],
                         shape=tuple(int(d) for d in weight.shape), qualifies=qualifies, reason=reason)


def prepare_onnx(model: nn.Module, example_inputs: Sequence[torch.Tensor], path: str | os.PathLike,
                 dynamic_batch: bool = True) -> Path:
    """Export ``model`` for TensorRT: fp32 weights (TensorRT lowers to fp16 itself), constants folded.

    With ``dynamic_batch`` the batch axis is symbolic so one engine serves an optimisation
    profile of batch sizes; otherwise every input keeps its example shape. fp16/bf16 models are
    exported in fp32 (a copy) so that TensorRT, not the exporter, picks the fp16 kernels.
    Returns the path; the file is written atomically.
    """
    if not example_inputs:
        raise ValueError("prepare_onnx: at least one example input is needed")
    float_model = model
    if any(p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters()):
        import copy

        float_model = copy.deepcopy(model).float()
    inputs = tuple(t.float() if t.is_floating_point() else t for t in example_inputs)
    return export_onnx(float_model.eval().cpu(), tuple(t.cpu() for t in inputs), path, dynamic_batch=dynamic_batch)


def input_batch_axes(model: onnx.ModelProto | str | os.PathLike) -> dict[str, int | str]:
    """Each graph input's batch axis: its fixed size, or the symbolic name when dynamic."""
    proto = onnx.load(str(model)) if not isinstance(model, onnx.ModelProto) else model
    initializer_names = {i.name for i in proto.graph.initializer}
    axes: dict[str, int | str] = {}
    for graph_input in proto.graph.input:
        if graph_input.name in initializer_names:
            continue
        dim = graph_input.type.tensor_type.shape.dim[0]
        axes[graph_input.name] = dim.dim_param if dim.dim_param else int(dim.dim_value)
    return axes


# --- the target ----------------------------------------------------------------------


@register_target
class TensorRTTarget(Target):
    """TensorRT on one CUDA GPU: artifact = a serialised engine (``.engine``).

    ``precision`` "fp16" sets ``BuilderFlag.FP16``; ``sparse`` sets ``BuilderFlag.SPARSE_WEIGHTS`` so
    layers whose weights follow 2:4 may get sparse tensor-core kernels. ``batch_sizes`` span the
    optimisation profile (min, opt = the first, max). ``timing_cache`` (a file) is read if present
    and written back after each build, so rebuilding similar engines is fast.
    """

    name = "tensorrt"
    precisions = ("fp32", "fp16")  # the precision option
    suffix = ".engine"

    class Options(TargetOptions):
        owner = "tensorrt"
        precision: Literal["fp16", "fp32"] = "fp16"
        sparse: bool = True  # let TensorRT pick 2:4 sparse tactics
        batch_sizes: Annotated[tuple[Annotated[int, Field(ge=1)], ...], Field(min_length=1, strict=False)] = (1, 8)
        timing_cache: Annotated[Path, Field(strict=False)] | None = None
        workspace_mb: int = Field(4096, ge=1)

        @field_validator("batch_sizes", mode="before")
        @classmethod
        def _sizes(cls, value):
            """One size, a sequence, or ``"1,8"`` from the command line."""
            if isinstance(value, int) and not isinstance(value, bool):
                return (value,)
            if isinstance(value, str):
                try:
                    return tuple(int(part) for part in value.split(","))
                except ValueError:
                    raise ValueError(f"batch_sizes must be positive integers, e.g. 1,8, got {value!r}") from None
            return value

    def __init__(self, precision: str = "fp16", sparse: bool = True, batch_sizes: Sequence[int] = (1, 8),
                 timing_cache: str | os.PathLike | None = None, workspace_mb: int = 4096):
        checked = self.Options(precision=precision, sparse=sparse, batch_sizes=batch_sizes,
                               timing_cache=timing_cache, workspace_mb=workspace_mb)
        sizes = checked.batch_sizes
        self.precision = precision
        self.sparse = bool(sparse)
        self.batch_sizes = sizes
        self.timing_cache = Path(timing_cache) if timing_cache is not None else None
        self.workspace_mb = workspace_mb

    def unavailable_reason(self) -> str | None:
        """The driver and device are checked through torch first; only then is ``tensorrt`` imported."""
        if not torch.cuda.is_available():
            return "no CUDA driver or device is available (torch.cuda.is_available() is False)"
        try:
            trt = importlib.import_module("tensorrt")
        except ImportError as exc:
            return f"the Python package 'tensorrt' is not installed ({exc}); install it with `pip install tensorrt`"
        if int(str(getattr(trt, "__version__", "0")).split(".")[0]) < 10:
            return f"TensorRT {trt.__version__} is too old: spruce needs TensorRT 10 or newer"
        return None

    def _trt(self) -> Any:
        self.require()
        return importlib.import_module("tensorrt")

    def fingerprint(self) -> dict[str, str]:
        record = {**super().fingerprint(), "precision": self.precision, "sparse": str(self.sparse)}
        if self.unavailable_reason() is None:
            record["tensorrt"] = importlib.import_module("tensorrt").__version__
            record["gpu"] = torch.cuda.get_device_name()
            record["cuda"] = str(torch.version.cuda)
        return record

    def synchronize(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def build(self, model: nn.Module, example_inputs: Sequence[torch.Tensor], path: str | os.PathLike) -> Artifact:
        """ONNX export, 2:4 check, engine build; the engine file and manifest appear only on success."""
        trt = self._trt()
        path = Path(path)
        with scratch_path(path, suffix=".onnx") as onnx_path, atomic_path(path, suffix=".engine.tmp") as engine_temp:
            prepare_onnx(model, example_inputs, onnx_path, dynamic_batch=True)
            checks = check_2_4(onnx_path)
            logger = trt.Logger(trt.Logger.WARNING)
            builder = trt.Builder(logger)
            network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
            parser = trt.OnnxParser(network, logger)
            if not parser.parse(onnx_path.read_bytes()):
                errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
                raise ArtifactError(f"TensorRT's ONNX parser rejected the model: {errors}")
            config = builder.create_builder_config()
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_mb << 20)
            if self.precision == "fp16":
                config.set_flag(trt.BuilderFlag.FP16)
            if self.sparse:
                config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
            config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
            cache_bytes = self.timing_cache.read_bytes() if self.timing_cache and self.timing_cache.is_file() else b""
            timing_cache = config.create_timing_cache(cache_bytes)
            config.set_timing_cache(timing_cache, ignore_mismatch=False)
            profile = builder.create_optimization_profile()
            low, high = min(self.batch_sizes), max(self.batch_sizes)
            for i in range(network.num_inputs):
                tensor = network.get_input(i)
                shape = tuple(example_inputs[i].shape[1:])
                profile.set_shape(tensor.name, (low, *shape), (self.batch_sizes[0], *shape), (high, *shape))
            config.add_optimization_profile(profile)
            serialized = builder.build_serialized_network(network, config)
            if serialized is None:
                raise ArtifactError(f"TensorRT could not build an engine for {path.name} (see its log above)")
            engine_temp.write_bytes(bytes(serialized))
            if self.timing_cache is not None:
                self.timing_cache.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(self.timing_cache, bytes(config.get_timing_cache().serialize()))
            sparse_layers = self._sparse_layers(trt, logger, bytes(serialized))
        artifact = Artifact(path=path, target=self.name, input_shapes=tuple(tuple(t.shape) for t in example_inputs),
                            input_dtype="float32",
                            info={"precision": self.precision, "sparse_weights": self.sparse,
                                  "batch_sizes": list(self.batch_sizes),
                                  "two_four_layers": [c.node for c in checks if c.qualifies],
                                  "dense_layers": {c.node: c.reason for c in checks if not c.qualifies},
                                  "sparse_kernel_layers": sparse_layers})
        artifact.write_manifest()
        return artifact

    @staticmethod
    def _sparse_layers(trt: Any, logger: Any, serialized: bytes) -> list[str]:
        """Layers whose chosen tactic is a sparse kernel, read through the engine inspector (JSON)."""
        engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
        inspector = engine.create_engine_inspector()
        document = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
        return sparse_layers_from_engine_info(document)

    def load(self, artifact: Artifact) -> Runner:
        if artifact.target != self.name:
            raise ArtifactError(f"artifact {artifact.path} was built for target {artifact.target!r}, not {self.name!r}")
        return _EngineRunner(self._trt(), artifact.path)

    def prepare_inputs(self, artifact: Artifact, example_inputs: Sequence[torch.Tensor]) -> list[Any]:
        return [torch.as_tensor(t).float().cuda().contiguous() for t in example_inputs]

    def model_runner(self, model: nn.Module, example_inputs: Sequence[torch.Tensor],
                     stem: Path) -> tuple[Runner, list[Any]]:
        """A runner of ``model`` as a TensorRT engine built with this target's settings (an engine
        for the example's batch size when it is not one of ``batch_sizes``)."""
        if example_inputs[0].shape[0] not in self.batch_sizes:
            target = TensorRTTarget(self.precision, self.sparse, (int(example_inputs[0].shape[0]),),
                                    self.timing_cache, self.workspace_mb)
            return Target.model_runner(target, model, example_inputs, stem)
        return super().model_runner(model, example_inputs, stem)

    def time_layers(self, artifact: Artifact, batch_size: int = 1, warmup: int = 10,
                    repeats: int = 50) -> dict[str, float]:
        """Median milliseconds per engine layer at ``batch_size``, reported by TensorRT through ``IProfiler``."""
        trt = self._trt()
        runner = self.load(artifact)
        assert isinstance(runner, _EngineRunner)
        inputs = [torch.randn((batch_size, *s[1:]), device="cuda") for s in artifact.input_shapes]
        for _ in range(warmup):
            runner(inputs)
        self.synchronize()
        profiler = _make_profiler(trt)
        runner.context.profiler = profiler
        for _ in range(repeats):
            runner(inputs)
            self.synchronize()
        return {layer: float(np.median(times)) for layer, times in profiler.times.items()}


def sparse_layers_from_engine_info(document: dict[str, Any]) -> list[str]:
    """Names of the layers whose tactic or metadata names a sparse kernel in an inspector JSON document."""
    names = []
    for layer in document.get("Layers", []):
        if not isinstance(layer, dict):
            continue
        text = json.dumps({k: v for k, v in layer.items() if k != "Name"}).lower()
        if "sparse" in text or "sparsity" in text:
            names.append(str(layer.get("Name", "?")))
    return names


def _make_profiler(trt: Any) -> Any:
    """An ``IProfiler`` collecting every ``report_layer_time`` call per layer."""

    class LayerTimes(trt.IProfiler):
        def __init__(self) -> None:
            trt.IProfiler.__init__(self)
            self.times: dict[str, list[float]] = {}

        def report_layer_time(self, layer_name: str, ms: float) -> None:
            self.times.setdefault(layer_name, []).append(ms)

    return LayerTimes()


class _EngineRunner:
    """Runs a deserialised engine on torch CUDA tensors (inputs of any batch size in the profile)."""

    def __init__(self, trt: Any, path: Path) -> None:
        self.trt = trt
        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise ArtifactError(f"{path} is not a TensorRT engine this TensorRT version can load")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def __call__(self, inputs: Sequence[Any]) -> list[torch.Tensor]:
        if len(inputs) != len(self.inputs):
            raise ValueError(f"engine takes {len(self.inputs)} inputs, {len(inputs)} were given")
        stream = torch.cuda.current_stream()
        for name, value in zip(self.inputs, inputs):
            tensor = torch.as_tensor(value).float().cuda().contiguous()
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = []
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            output = torch.empty(shape, device="cuda", dtype=torch.float32)
            self.context.set_tensor_address(name, output.data_ptr())
            outputs.append(output)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise TargetUnavailable("TensorRT failed to run the engine")
        return outputs


def write_2_4_report(checks: Sequence[SparsityCheck], path: str | os.PathLike) -> None:
    """The 2:4 check as JSON at ``path`` (atomically): one record per weight layer."""
    records = [{"node": c.node, "op_type": c.op_type, "initializer": c.initializer, "shape": list(c.shape),
                "qualifies": c.qualifies, "reason": c.reason} for c in checks]
    atomic_write_text(Path(path), json.dumps(records, indent=2) + "\n")
