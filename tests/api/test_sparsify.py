"""spruce.sparsify, the verb: how it captures a model about to be trained sparse."""

import pytest
import torch
import torch.nn as nn
from spruce.api.verbs import sparsify


class UntraceableInTraining(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.a(x)
        if self.training and y.sum() > 0:  # data-dependent control flow, in training mode only
            y = y * 2
        return y


def test_training_code_that_cannot_be_traced():
    import spruce

    x = torch.randn(1, 3, 6, 6)
    with pytest.raises(spruce.TraceError, match="control flow"):
        sparsify(UntraceableInTraining().train(), x, method="static", sparsity=0.5)
    with pytest.warns(UserWarning, match="runs its eval-mode graph in training mode too"):
        sm = sparsify(UntraceableInTraining().eval(), x, method="static", sparsity=0.5)
    sm.train()
    assert sm(x).shape == (1, 4, 4, 4)
