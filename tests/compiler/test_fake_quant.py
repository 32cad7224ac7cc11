"""Fake quantization for INT8-aware recovery: the student inside the block computes what ONNX
Runtime's INT8 artifact computes (closer to it than the fp32 model is), gradients reach the
weights, and the block leaves the plain trained weights behind."""

from __future__ import annotations

import numpy as np
import torch
from spruce.compiler.fake_quant import fake_quantized
from spruce.targets.onnxruntime import OnnxRuntimeCPU
from spruce.targets.quantize import MIN_CALIBRATION_SAMPLES
from torch import nn


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 8 * 8, 4)).eval()


def test_the_fake_quantized_student_is_closer_to_the_int8_artifact_than_fp32(tmp_path):
    model = _cnn()
    generator = torch.Generator().manual_seed(1)
    calibration = torch.rand(MIN_CALIBRATION_SAMPLES, 3, 8, 8, generator=generator)
    artifact = OnnxRuntimeCPU(threads=1, precision="int8").build(model, (calibration[:1],), tmp_path / "m.onnx",
                                                                 calibration_data=[(calibration,)])
    held_out = torch.rand(64, 3, 8, 8, generator=generator)
    int8 = torch.from_numpy(np.asarray(OnnxRuntimeCPU(threads=1).load(artifact)([held_out.numpy()])[0]))
    with torch.no_grad():
        fp32 = model(held_out)
        with fake_quantized(model, [calibration]) as layers:
            fake = model(held_out)
    assert layers == 3
    fp32_gap, fake_gap = float((fp32 - int8).norm()), float((fake - int8).norm())
    assert fake_gap < 0.25 * fp32_gap, (fake_gap, fp32_gap)  # measured 0.06 (0.0005 vs 0.0081)


def test_gradients_reach_the_weights_and_the_trained_weights_stay():
    model = _cnn().train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    first = model[0].weight
    x = torch.rand(4, 3, 8, 8)
    with fake_quantized(model, [x]):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model(x).square().mean().backward()
        optimizer.step()
    assert model[0].weight is first  # the same parameter, no parametrization left
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    changed = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    assert "0.weight" in changed and "5.weight" in changed
