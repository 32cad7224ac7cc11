"""``meet_budget(..., precision=)``: a precision the target given does not build is refused
before anything is timed."""

from __future__ import annotations

import pytest
import spruce
import torch
from spruce.api.budget import meet_budget
from spruce.targets.onnxruntime import OnnxRuntimeCPU
from torch import nn


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4)).eval()


def test_meet_budget_refuses_a_precision_its_target_does_not_build():
    sparse = spruce.sparsify(_cnn(), torch.randn(1, 3, 16, 16), spruce.StaticConfig(init="magnitude"),
                             structure="channel", sparsity=0.25, distribution="uniform")
    with pytest.raises(ValueError, match="precision='int8' but the target given builds fp32"):
        meet_budget(sparse, torch.randn(1, 3, 16, 16), OnnxRuntimeCPU(threads=1), 0.5, precision="int8")
    with pytest.raises(ValueError, match="precision 'int8' is not supported"):
        meet_budget(sparse, torch.randn(1, 3, 16, 16), "torch", 0.5, precision="int8")
