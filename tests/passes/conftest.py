"""Fixtures shared by the tests of channel selection."""

import numpy as np
import pytest
import torch
import torchvision
from helpers import analyze_model
from spruce.passes.importance import importance_scores, param_table


@pytest.fixture(scope="module")
def resnet18():
    """A resnet18 (10 classes, seeded random weights), a 32x32 input, its channel analysis and
    the L1 importance of every prunable group."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    analysis = analyze_model(model, x)
    params = param_table(model)
    importance = {g.id: importance_scores("l1", g, params, np.random.default_rng(0))
                  for g in analysis.groups if g.prunable}
    return model, x, analysis, importance
