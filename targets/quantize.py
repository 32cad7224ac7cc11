"""INT8 ONNX models for ONNX Runtime on the CPU, through ``onnxruntime.quantization``.

The ONNX Runtime target (``OnnxRuntimeCPU(precision="int8")``) exports the fp32 model as
usual, then hands the checked fp32 file to :func:`quantize_onnx`, which writes the INT8 file
with ONNX Runtime's own quantizer (nothing here quantizes a tensor itself):

- **static** (the default): QDQ format, weights per output channel and symmetric (zero point
  0), activations per tensor and asymmetric, scales calibrated on the caller's samples
  (:class:`SampleReader`; at least :data:`MIN_CALIBRATION_SAMPLES` for a build);
- **dynamic**, chosen by :func:`quantization_mode` from the graph's operators: recurrent
  layers (LSTM, GRU, RNN), whose activation ranges change with every step, and models whose
  heavy operators are all matrix products (MLPs, transformers: no Conv), whose activations
  vary too much per input for one calibrated scale. Weights are quantized ahead, activations
  per batch at run time (ONNX Runtime's DynamicQuantizeMatMul / DynamicQuantizeLSTM /
  MatMulInteger kernels); no calibration.

Types: **U8S8**, activations ``uint8`` and weights ``int8``. Two measured reasons, on ONNX
Runtime 1.32 and a Xeon with AVX-512 VNNI: (1) ONNX Runtime's CPU graph optimiser fuses every
``DequantizeLinear -> Conv -> QuantizeLinear`` group of a U8S8 QDQ model into QLinearConv, but
left 4 of the 5 convolutions of a small residual CNN as fp32 Conv between Q/DQ pairs with S8S8
(ORT's recommended default for QDQ) and 2 of 5 with symmetric S8S8, i.e. the artifact ran fp32
kernels; (2) u8 x s8 is the operand pair of the VNNI dot-product instruction (``vpdpbusd``),
the kernels ONNX Runtime's MLAS uses. Without VNNI, u8 x s8 products are summed in pairs into
int16 (``vpmaddubsw``) and can saturate, so on such a CPU the weights keep 7 bits
(``reduce_range``), as ONNX Runtime's documentation advises; the manifest records which.

**TensorRT** users need something else: TensorRT reads QDQ models with ``int8`` activations
*and* weights, both symmetric (zero point 0); quantize the fp32 ONNX file with
``activation_type=QuantType.QInt8`` and ``extra_options={"ActivationSymmetric": True,
"WeightSymmetric": True}``. The ONNX Runtime artifact here is U8S8 with asymmetric
activations and is not the file to give TensorRT.

Calibration: **MinMax** by default (ONNX Runtime's default too): one pass, deterministic,
and with ReLU activations quantized asymmetrically the observed range is the range to cover.
``calibration="percentile"`` (the 99.999th percentile of a 2048-bin histogram) clips outliers
instead, which pays for heavy-tailed activations; on the test's residual CNN it measured
slightly worse (0.87 % vs 0.85 % largest relative error). Both keep every calibration batch's
activations in memory until the end (ONNX Runtime 1.32's ``CalibMaxIntermediateOutputs``,
meant to bound that, drops the batches instead of merging their ranges). Entropy is not
offered: ``quantize_static`` of ONNX Runtime 1.32 builds its Entropy calibrator with 128
histogram bins and 128 quantized bins, so the threshold search has one candidate, the full
range, and its scales are MinMax's (measured: identical outputs).

**Sensitivity rule** (``keep_fp32=k``, default 0: everything quantized). Each convolution
and matrix product is quantized *alone* (the rest of the model fp32, the activation ranges of
the one calibration run, reused through ONNX Runtime's calibration cache) and run on the first
:data:`SENSITIVITY_SAMPLES` (32) calibration samples; its sensitivity is the relative L2 error
of the model's outputs against fp32 there (:func:`layer_sensitivity`). The ``k`` layers with
the largest error stay fp32 (``nodes_to_exclude``); the record names them, with every layer's
error. One calibration plus one quantization and one short run per layer: seconds for a small
CNN, minutes for a resnet18 at 224.

:func:`integer_mac_share` reads ONNX Runtime's optimised graph of a model and says which
share of its convolution and matrix-product multiply-accumulates run in integer kernels:
the check that an INT8 artifact does not silently run fp32.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from .files import atomic_path, scratch_path

__all__ = [
    "CALIBRATION_METHODS",
    "MIN_CALIBRATION_SAMPLES",
    "MacCount",
    "QuantizationRecord",
    "SampleReader",
    "count_samples",
    "cpu_isa_flags",
    "integer_layer",
    "integer_mac_share",
    "layer_sensitivity",
    "quantization_mode",
    "quantize_onnx",
]

Precision = Literal["fp32", "int8"]
Calibration = Literal["minmax", "percentile"]
CALIBRATION_METHODS = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}
MIN_CALIBRATION_SAMPLES = 128
SENSITIVITY_SAMPLES = 32  # calibration samples each lone-layer quantization is judged on

# Operators that make a model take dynamic quantization (see quantization_mode).
RECURRENT_OPS = frozenset({"LSTM", "GRU", "RNN"})
CONV_OPS = frozenset({"Conv", "ConvTranspose"})
MATMUL_OPS = frozenset({"MatMul", "Gemm", "Attention"})

# The ISA extensions integer and fp32 kernels depend on (x86 and Arm names of /proc/cpuinfo).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
             "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "i8mm", "sve")

# ONNX Runtime kernels (optimised graph, any domain) that multiply integers, and their fp32 kind.
# Per op: the input index of the weight for convolutions, None for matrix products.
INTEGER_KERNELS: dict[str, int | None] = {
    "QLinearConv": 3, "ConvInteger": 1, "QLinearConvTranspose": 3,
    "QLinearMatMul": None, "MatMulInteger": None, "QGemm": None, "DynamicQuantizeMatMul": None,
    "MatMulIntegerToFloat": None,
}
FLOAT_KERNELS: dict[str, int | None] = {
    "Conv": 1, "FusedConv": 1, "ConvTranspose": 1,
    "MatMul": None, "FusedMatMul": None, "Gemm": None, "FusedGemm": None,
}


def cpu_isa_flags() -> tuple[str, ...]:
    """The ISA extensions of :data:`ISA_FLAGS` that this CPU has, from the ``flags`` (x86) or
    ``Features`` (Arm) line of ``/proc/cpuinfo``, in :data:`ISA_FLAGS` order; ``()`` where that
    file cannot be read. VNNI (``avx512_vnni``, ``avx_vnni``) or AMX decides INT8 speed."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    present = set(value.split())
                    return tuple(flag for flag in ISA_FLAGS if flag in present)
    except OSError:
        pass
    return ()


def _has_dot_product(flags: Iterable[str]) -> bool:
    """Whether u8 x s8 products accumulate in int32 directly (no int16 saturation)."""
    return bool({"avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm"} & set(flags))


def quantization_mode(model: onnx.ModelProto) -> tuple[Literal["static", "dynamic"], str]:
    """``("dynamic", reason)`` when the graph has a recurrent operator (LSTM, GRU, RNN) or
    matrix products (MatMul, Gemm, Attention) but no convolution; ``("static", reason)``
    otherwise. Reads the top-level graph's operator types only."""
    ops = {node.op_type for node in model.graph.node}
    recurrent = sorted(ops & RECURRENT_OPS)
    if recurrent:
        return "dynamic", f"recurrent operators ({', '.join(recurrent)}): activation ranges change per step"
    if ops & MATMUL_OPS and not ops & CONV_OPS:
        return "dynamic", "matrix products and no convolution: activation ranges change per input"
    return "static", "convolutions: activation ranges calibrated once"


@dataclass(frozen=True)
class QuantizationRecord:
    """How an INT8 file was made (the ``quantization`` entry of its manifest)."""

    mode: Literal["static", "dynamic"]
    reason: str  # why this mode (quantization_mode)
    activation_type: str = "uint8"
    weight_type: str = "int8"
    per_channel: bool = True  # weights: one scale per output channel
    weight_symmetric: bool = True
    activation_symmetric: bool = False
    reduce_range: bool = False  # weights in 7 bits (CPUs without a u8 x s8 dot product)
    format: str = "QDQ"  # static: QDQ nodes; dynamic: ONNX Runtime's integer operators
    calibration: str | None = "minmax"  # static only
    calibration_samples: int = 0  # rows along dim 0 of the first input, summed
    isa_flags: tuple[str, ...] = field(default_factory=tuple)
    kept_fp32: tuple[str, ...] = ()  # nodes the sensitivity rule left fp32 (most sensitive first)
    sensitivity: dict[str, Any] | None = None  # the rule and every layer's lone-quantization error

    def to_dict(self) -> dict[str, Any]:
        document = asdict(self)
        document["isa_flags"] = list(self.isa_flags)
        document["kept_fp32"] = list(self.kept_fp32)
        return document


class SampleReader(CalibrationDataReader):
    """ONNX Runtime's calibration reader over in-memory samples.

    ``samples``: a sequence of the model's inputs, each a tuple (or list) of arrays or tensors
    in the graph's input order with the batch along dim 0. Consecutive samples of equal shapes
    are concatenated along dim 0 up to ``batch`` rows when ``batchable`` (the graph's batch is
    dynamic), so calibration runs few large batches instead of many of one."""

    def __init__(self, input_names: Sequence[str], samples: Sequence[Sequence[Any]], batch: int = 16,
                 batchable: bool = True):
        self.input_names = list(input_names)
        self.batches = _group(samples, batch if batchable else 1, len(self.input_names))
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.batches):
            return None
        feed = dict(zip(self.input_names, self.batches[self.position]))
        self.position += 1
        return feed

    def rewind(self) -> None:
        self.position = 0


def _as_array(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _group(samples: Sequence[Sequence[Any]], rows: int, count: int) -> list[list[np.ndarray]]:
    batches: list[list[np.ndarray]] = []
    pending: list[list[np.ndarray]] = []

    def flush() -> None:
        if pending:
            batches.append([np.concatenate([s[k] for s in pending]) for k in range(count)])
            pending.clear()

    for sample in samples:
        arrays = [_as_array(v) for v in (sample if isinstance(sample, (tuple, list)) else (sample,))]
        if len(arrays) != count:
            raise ValueError(f"a calibration sample has {len(arrays)} inputs, the model takes {count}")
        batchable = rows > 1 and all(a.ndim for a in arrays)
        if not batchable or (pending and [a.shape for a in arrays] != [a.shape for a in pending[0]]):
            flush()
        pending.append(arrays)
        if not batchable or sum(len(s[0]) for s in pending) >= rows:
            flush()
    flush()
    return batches


def count_samples(samples: Sequence[Sequence[Any]]) -> int:
    """Calibration samples given: rows along dim 0 of each sample's first input, summed (a
    0-d first input counts as one)."""
    total = 0
    for sample in samples:
        first = _as_array(sample[0] if isinstance(sample, (tuple, list)) else sample)
        total += int(first.shape[0]) if first.ndim else 1
    return total


def quantize_onnx(fp32_path: str | os.PathLike, int8_path: str | os.PathLike,
                  samples: Sequence[Sequence[Any]] | None, calibration: Calibration = "minmax",
                  isa_flags: Sequence[str] | None = None, keep_fp32: int = 0) -> QuantizationRecord:
    """Write the INT8 model of the fp32 ONNX file ``fp32_path`` to ``int8_path`` (atomically)
    with ``onnxruntime.quantization``; return how it was made.

    The mode is :func:`quantization_mode`'s; static mode calibrates with ``calibration``
    (``minmax`` or ``percentile``) on ``samples`` (see :class:`SampleReader`; the
    caller decides how many are enough) and raises ``ValueError`` when there are none. The fp32
    file first goes through ONNX Runtime's quantization pre-processing (shape inference and
    graph optimisation). ``isa_flags`` (default: this CPU's, :func:`cpu_isa_flags`) decide
    ``reduce_range``. ``keep_fp32``: how many of the most sensitive layers stay fp32 (static
    mode; see the module doc's sensitivity rule). Raises ``ValueError`` for an unknown
    calibration method."""
    if calibration not in CALIBRATION_METHODS:
        raise ValueError(f"calibration must be one of {', '.join(CALIBRATION_METHODS)}, got {calibration!r}")
    flags = tuple(cpu_isa_flags() if isa_flags is None else isa_flags)
    reduce_range = not _has_dot_product(flags)
    target = Path(int8_path)
    model = onnx.load(str(fp32_path))
    mode, reason = quantization_mode(model)
    with scratch_path(target, ".pre.onnx") as prepared, atomic_path(target) as temp:
        quant_pre_process(str(fp32_path), str(prepared))
        if mode == "dynamic":
            quantize_dynamic(str(prepared), str(temp), per_channel=True, reduce_range=reduce_range,
                             weight_type=QuantType.QInt8)
            return QuantizationRecord(mode, reason, format="integer operators", calibration=None,
                                      reduce_range=reduce_range, isa_flags=flags)
        if not samples:
            raise ValueError("static INT8 quantization needs calibration samples (none given)")
        inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
        batchable = all(i.type.tensor_type.shape.dim and not i.type.tensor_type.shape.dim[0].HasField("dim_value")
                        for i in inputs)
        names = [i.name for i in inputs]
        reader = SampleReader(names, samples, batchable=batchable)
        settings = dict(quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        per_channel=True, reduce_range=reduce_range, calibrate_method=CALIBRATION_METHODS[calibration],
                        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
        if keep_fp32 <= 0:
            quantize_static(str(prepared), str(temp), reader, **settings)
            kept, sensitivity = (), None
        else:
            _name_nodes(prepared)
            with tempfile.TemporaryDirectory(prefix="spruce-quant-") as folder:
                cache = Path(folder) / "ranges.json"  # one calibration, every quantization below reuses it
                quantize_static(str(prepared), str(Path(folder) / "all.onnx"), reader, calibration_cache_path=cache,
                                **settings)
                judged = SampleReader(names, _first_rows(samples, SENSITIVITY_SAMPLES), batchable=batchable).batches
                errors = layer_sensitivity(prepared, judged, names, settings, cache, Path(folder))
                kept = tuple(sorted(errors, key=errors.get, reverse=True)[:keep_fp32])
                quantize_static(str(prepared), str(temp), None, nodes_to_exclude=list(kept),
                                calibration_cache_path=cache, **settings)
            sensitivity = {"rule": f"the {keep_fp32} layer(s) whose lone quantization moves the outputs most "
                                   f"(relative L2 on {SENSITIVITY_SAMPLES} calibration samples) stay fp32",
                           "relative_l2_by_layer": errors}
    return QuantizationRecord(mode, reason, calibration=calibration, calibration_samples=count_samples(samples),
                              reduce_range=reduce_range, isa_flags=flags, kept_fp32=kept, sensitivity=sensitivity)


def layer_sensitivity(prepared: Path, batches: Sequence[Sequence[np.ndarray]], input_names: Sequence[str],
                      settings: Mapping[str, Any], cache: Path, folder: Path) -> dict[str, float]:
    """Per convolution / matrix product of the (pre-processed, named) fp32 file ``prepared``:
    the relative L2 error of the model's outputs on ``batches`` when that layer alone is
    quantized (``quantize_static`` with ``settings`` and the calibration ranges in ``cache``),
    against the fp32 model's. Files are written into ``folder``."""
    model = onnx.load(str(prepared))
    layers = [n.name for n in model.graph.node if n.op_type in CONV_OPS | MATMUL_OPS]
    feeds = [dict(zip(input_names, batch)) for batch in batches]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1

    def outputs(path: Path) -> list[np.ndarray]:
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        return [np.concatenate([np.asarray(o, np.float64).ravel() for o in session.run(None, f)]) for f in feeds]

    reference = outputs(prepared)
    scale = float(np.sqrt(sum(float(np.sum(r * r)) for r in reference))) or 1.0
    errors: dict[str, float] = {}
    for index, layer in enumerate(layers):
        lone = folder / f"layer{index}.onnx"
        quantize_static(str(prepared), str(lone), None, nodes_to_quantize=[layer], calibration_cache_path=cache,
                        **settings)
        got = outputs(lone)
        errors[layer] = float(np.sqrt(sum(float(np.sum((g - r) ** 2)) for g, r in zip(got, reference)))) / scale
    return errors


def _name_nodes(path: Path) -> None:
    """Give every unnamed node of the ONNX file ``path`` a unique name (the quantizer selects by name)."""
    model = onnx.load(str(path))
    taken = {n.name for n in model.graph.node if n.name}
    changed = False
    for index, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
            changed = True
    if changed:
        onnx.save(model, str(path))


def _first_rows(samples: Sequence[Sequence[Any]], rows: int) -> list[tuple[np.ndarray, ...]]:
    """The first ``rows`` rows (along dim 0) of ``samples``, as samples."""
    taken: list[tuple[np.ndarray, ...]] = []
    count = 0
    for sample in samples:
        arrays = tuple(_as_array(v) for v in (sample if isinstance(sample, (tuple, list)) else (sample,)))
        room = rows - count
        if arrays[0].ndim:
            arrays = tuple(a[:room] for a in arrays)
        taken.append(arrays)
        count += int(arrays[0].shape[0]) if arrays[0].ndim else 1
        if count >= rows:
            break
    return taken


# --- a lone layer as the whole INT8 graph runs it ------------------------------------------

# Nodes at a lone quantized layer's graph input / output that the whole INT8 model does not run
# per layer: there, consecutive layers hand each other uint8 tensors in ONNX Runtime's NHWC layout.
_BOUNDARY_IN = frozenset({"QuantizeLinear", "Transpose"})
_BOUNDARY_OUT = frozenset({"DequantizeLinear", "Transpose"})


def integer_layer(optimized: onnx.ModelProto, input_shape: Sequence[int]) -> tuple[onnx.ModelProto, tuple[int, ...]]:
    """A lone quantized layer as it runs inside a whole INT8 model, and the shape its input takes.

    ``optimized`` is ONNX Runtime's optimised graph (``optimized_model_filepath``) of a one-layer
    QDQ model, ``input_shape`` the shape of its fp32 input. ONNX Runtime runs such a file as
    ``QuantizeLinear -> Transpose (NCHW to NHWC) -> QLinearConv -> Transpose -> DequantizeLinear``,
    while inside a whole model only the ``QLinearConv`` runs per layer (its neighbours hand it
    uint8 NHWC tensors; measured on resnet18: one QuantizeLinear and two Transposes in the whole
    graph). The leading ``QuantizeLinear``/``Transpose`` and trailing ``Transpose``/``DequantizeLinear``
    nodes are removed, their inner tensors becoming the graph's input and output; the returned
    shape is ``input_shape`` permuted as the removed transposes permute it. A graph without such
    nodes (a dynamically quantized matrix product) comes back unchanged. Raises ``ValueError``
    for a graph that does not have exactly one input and one output."""
    model = onnx.ModelProto()
    model.CopyFrom(optimized)
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ValueError(f"integer_layer: expected a one-input, one-output layer graph, got {len(inputs)} input(s) "
                         f"and {len(graph.output)} output(s)")
    shape = tuple(int(d) for d in input_shape)
    name, elem_type = inputs[0].name, inputs[0].type.tensor_type.elem_type
    while True:
        consumers = [n for n in graph.node if name in n.input]
        if len(consumers) != 1 or consumers[0].op_type not in _BOUNDARY_IN or consumers[0].input[0] != name:
            break
        node = consumers[0]
        if node.op_type == "Transpose":
            perm = next(list(a.ints) for a in node.attribute if a.name == "perm")
            shape = tuple(shape[p] for p in perm)
        else:
            elem_type = _zero_point_type(graph, node)
        name = node.output[0]
        graph.node.remove(node)
    output, out_type = graph.output[0].name, graph.output[0].type.tensor_type.elem_type
    while True:
        producer = next((n for n in graph.node if output in n.output), None)
        if producer is None or producer.op_type not in _BOUNDARY_OUT or \
                sum(producer.input[0] in n.input for n in graph.node) != 1:
            break
        if producer.op_type == "DequantizeLinear":
            out_type = _zero_point_type(graph, producer)
        output = producer.input[0]
        graph.node.remove(producer)
    graph.ClearField("input")
    graph.input.append(onnx.helper.make_tensor_value_info(name, elem_type, None))
    graph.ClearField("output")
    graph.output.append(onnx.helper.make_tensor_value_info(output, out_type, None))
    return model, shape


def _zero_point_type(graph: onnx.GraphProto, node: onnx.NodeProto) -> int:
    """The element type of a Quantize/DequantizeLinear node's zero point (its integer side; uint8
    without one, as ONNX defines)."""
    if len(node.input) > 2:
        for tensor in graph.initializer:
            if tensor.name == node.input[2]:
                return tensor.data_type
    return onnx.TensorProto.UINT8


# --- which kernels run ------------------------------------------------------------------


@dataclass(frozen=True)
class MacCount:
    """Multiply-accumulates of the convolutions and matrix products of an optimised graph, per
    kind of kernel; ``nodes`` lists ``(op type, name, MACs, integer)`` per node."""

    integer_macs: int
    float_macs: int
    nodes: tuple[tuple[str, str, int, bool], ...]

    @property
    def integer_share(self) -> float:
        """Share of the MACs in integer kernels (0 where there are none at all)."""
        total = self.integer_macs + self.float_macs
        return self.integer_macs / total if total else 0.0


def integer_mac_share(model_path: str | os.PathLike, inputs: Sequence[Any],
                      session_options: ort.SessionOptions | None = None) -> MacCount:
    """Count the conv/matmul MACs of ONNX Runtime's optimised graph of ``model_path`` by kernel kind.

    ONNX Runtime optimises the model (``session_options``, default: all optimisations, one
    thread) and writes its graph (``optimized_model_filepath``); that graph, every value made
    a graph output, is run once on ``inputs`` (arrays in graph input order) to read each
    node's shapes. A convolution's MACs are ``numel(output) * numel(weight) / weight.shape[0]``,
    a matrix product's ``numel(output) * K`` with ``K = numel(A) / rows(output)``. Kernels of
    :data:`INTEGER_KERNELS` count as integer, of :data:`FLOAT_KERNELS` as float (both in any
    domain: ONNX Runtime's fused and NCHWc forms); other nodes are not counted."""
    options = session_options or ort.SessionOptions()
    if session_options is None:
        options.intra_op_num_threads = 1
    options.log_severity_level = 3
    with scratch_path(model_path, ".opt.onnx") as optimized, scratch_path(model_path, ".all.onnx") as exposed:
        options.optimized_model_filepath = str(optimized)
        ort.InferenceSession(str(model_path), sess_options=options, providers=["CPUExecutionProvider"])
        graph = onnx.load(str(optimized))
        counted = [n for n in graph.graph.node if n.op_type in INTEGER_KERNELS or n.op_type in FLOAT_KERNELS]
        known = {o.name for o in graph.graph.output}
        for node in counted:
            for name in [*node.input, *node.output]:
                if name and name not in known:
                    graph.graph.output.append(onnx.ValueInfoProto(name=name))
                    known.add(name)
        onnx.save(graph, str(exposed))
        plain = ort.SessionOptions()
        plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        plain.intra_op_num_threads = 1
        plain.log_severity_level = 3
        session = ort.InferenceSession(str(exposed), sess_options=plain, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        feed = {i.name: _as_array(v) for i, v in zip(session.get_inputs(), inputs)}
        shapes = {name: value.shape for name, value in zip(names, session.run(names, feed))}
    shapes.update({t.name: tuple(t.dims) for t in graph.graph.initializer})
    rows = []
    for node in counted:
        integer = node.op_type in INTEGER_KERNELS
        weight_index = (INTEGER_KERNELS if integer else FLOAT_KERNELS)[node.op_type]
        out = shapes.get(node.output[0])
        operand = shapes.get(node.input[0 if weight_index is None else weight_index])
        if out is None or operand is None or not out or not operand or not operand[0]:
            continue
        out_size = int(np.prod(out))
        if weight_index is None:
            out_rows = out_size // out[-1] if out[-1] else 0
            macs = out_size * (int(np.prod(operand)) // out_rows) if out_rows else 0
        else:
            macs = out_size * int(np.prod(operand)) // operand[0]
        rows.append((node.op_type, node.name, int(macs), integer))
    return MacCount(integer_macs=sum(r[2] for r in rows if r[3]), float_macs=sum(r[2] for r in rows if not r[3]),
                    nodes=tuple(rows))
