"""The sensitivity rule of INT8 builds (``keep_fp32``), on real ONNX Runtime quantization: the
layer whose lone quantization moves the outputs most stays fp32 in the shipped file, and the
manifest names it with every layer's measured error."""

from __future__ import annotations

import onnx
import torch
from spruce.targets.onnxruntime import OnnxRuntimeCPU
from spruce.targets.quantize import MIN_CALIBRATION_SAMPLES
from torch import nn


def _model_with_a_fragile_layer() -> nn.Module:
    """Three convolutions; the middle one has one weight per output channel 60x the others,
    so its per-channel int8 scale leaves the rest of each channel a few levels (ReLU-free
    between the convolutions, so nothing hides the damage)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1),
                          nn.Conv2d(16, 8, 3, padding=1)).eval()
    with torch.no_grad():
        model[1].weight[:, 0, 0, 0] = 60 * model[1].weight.abs().max()
    return model


def _weight_is_quantized(graph: onnx.GraphProto, node: onnx.NodeProto) -> bool:
    producers = {output: n.op_type for n in graph.node for output in n.output}
    return producers.get(node.input[1]) == "DequantizeLinear"


def test_the_most_sensitive_layer_stays_fp32_and_is_named(tmp_path):
    model = _model_with_a_fragile_layer()
    generator = torch.Generator().manual_seed(1)
    calibration = [(torch.randn(16, 3, 12, 12, generator=generator),) for _ in range(MIN_CALIBRATION_SAMPLES // 16)]
    artifact = OnnxRuntimeCPU(threads=1, precision="int8", keep_fp32=1).build(
        model, (calibration[0][0][:1],), tmp_path / "m.onnx", calibration_data=calibration)
    record = artifact.info["quantization"]
    errors = record["sensitivity"]["relative_l2_by_layer"]
    assert len(errors) == 3 and all(value > 0 for value in errors.values())
    assert record["kept_fp32"] == [max(errors, key=errors.get)]
    graph = onnx.load(str(artifact.path)).graph
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert [n.name for n in convs if not _weight_is_quantized(graph, n)] == record["kept_fp32"]
    # the fragile layer is the middle convolution: the one whose weight carries the outliers
    kept = next(n for n in convs if n.name == record["kept_fp32"][0])
    assert kept is convs[1]


def test_without_the_rule_every_layer_is_quantized(tmp_path):
    model = _model_with_a_fragile_layer()
    calibration = [(torch.randn(MIN_CALIBRATION_SAMPLES, 3, 12, 12),)]
    artifact = OnnxRuntimeCPU(threads=1, precision="int8").build(model, (calibration[0][0][:1],),
                                                                 tmp_path / "m.onnx", calibration_data=calibration)
    assert artifact.info["quantization"]["kept_fp32"] == [] and artifact.info["quantization"]["sensitivity"] is None
    graph = onnx.load(str(artifact.path)).graph
    assert all(_weight_is_quantized(graph, n) for n in graph.node if n.op_type == "Conv")
