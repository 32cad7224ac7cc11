"""The measured budget loop when INT8 ships: every compact model it times is the INT8 model
ONNX Runtime runs (quantize/dequantize nodes in the file the session loads), every dense model
the fp32 reference, interleaved in one run."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from helpers import analyze_model
from spruce.passes.importance import importance_scores, param_table
from spruce.passes.sparsity.knapsack import build_cost_model
from spruce.runtime.budget import meet_latency_budget, time_against_reference
from spruce.targets.onnxruntime import OnnxRuntimeCPU
from torch import nn

QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear"}


class Recording(OnnxRuntimeCPU):
    """The ONNX Runtime target, recording the operator types of every file it opens a session on."""

    def __init__(self, **options):
        super().__init__(**options)
        self.opened: list[set[str]] = []

    def session(self, path, timing=False):
        self.opened.append({node.op_type for node in onnx.load(str(path)).graph.node})
        return super().session(path, timing)


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4)).eval()


def test_the_budget_loop_times_the_int8_model_against_dense_fp32():
    model, inputs = _cnn(), (torch.randn(1, 3, 16, 16),)
    analysis = analyze_model(model, inputs)
    params = param_table(model)
    importance = {g.id: importance_scores("l1", g, params, np.random.default_rng(0))
                  for g in analysis.groups if g.prunable}
    int8, fp32 = Recording(threads=1, precision="int8"), Recording(threads=1)
    result = meet_latency_budget(analysis, model, None, int8, 1.0, importance, inputs, round_to=8, rounds=2,
                                 warmup=1, timing_rounds=3, reference_target=fp32,
                                 cost_model=build_cost_model("flops", model, analysis))
    assert int8.opened and fp32.opened
    assert all(ops & QUANTIZED_OPS for ops in int8.opened), "the budget loop timed an fp32 compact model"
    assert not any(ops & QUANTIZED_OPS for ops in fp32.opened), "the dense reference was not fp32"
    assert (result.precision, result.dense_precision) == ("int8", "fp32")
    assert result.summary()["precision"] == "int8"


def test_time_against_reference_keeps_the_models_modes():
    model, inputs = _cnn(), (torch.randn(1, 3, 16, 16),)
    compact = _cnn().train()
    dense_timing, compact_timing = time_against_reference(OnnxRuntimeCPU(threads=1, precision="int8"), compact,
                                                           model, inputs, OnnxRuntimeCPU(threads=1), 1, 2)
    assert compact.training and not model.training
    assert dense_timing.robust_ms() > 0 and compact_timing.robust_ms() > 0
