"""Inputs the user's ``forward`` makes optional stay optional in the compact model: a
transformers model pruned with an ``attention_mask`` runs without it (filled with ones: what
leaving it out computes), a keyword the model was not captured with is accepted as ``None``
and refused as a tensor, a captured input left out is named; a positional ``None`` (a
recogniser's ``forward(input, text=None)``) may be left out."""

from __future__ import annotations

import pytest
import spruce
import torch
from spruce.zoo.transformers import build
from torch import nn

pytest.importorskip("transformers")


def test_model_pruned_with_attention_mask_runs_without_it():
    example = build("LlamaForCausalLM")
    ids = example.inputs(2, 8)["input_ids"]
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    seq = torch.export.Dim("seq", min=2, max=64)
    result = spruce.prune(example.model, inputs, dynamic_shapes={"input_ids": {1: seq}, "attention_mask": {1: seq}})
    other = example.inputs(3, 11)["input_ids"]
    with torch.no_grad():
        without = result.model(input_ids=other)["logits"]
        with_ones = result.model(input_ids=other, attention_mask=torch.ones_like(other))["logits"]
        masked = result.masked(input_ids=other).logits  # the user's model, called without a mask
        assert torch.equal(without, with_ones)
        assert torch.allclose(without, masked, atol=1e-5)
        assert torch.equal(result.model(input_ids=other, position_ids=None)["logits"], without)
        with pytest.raises(TypeError, match="captured without 'position_ids'"):
            result.model(input_ids=other, position_ids=torch.arange(11)[None])
        with pytest.raises(TypeError, match="captured with 'input_ids'"):
            result.model(attention_mask=torch.ones_like(other))


class Recogniser(nn.Module):
    """A recogniser whose ``forward(input, text=None)`` branches on ``text is None``: traced as a
    tensor, plain fx would take the other branch."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, input, text=None):
        features = self.conv(input).mean((2, 3))
        return self.head(features.relu()) if text is None else self.head(features)


@pytest.mark.parametrize("example", ["positional None", "left out"])
def test_positional_none_is_traced_as_none_and_may_be_left_out(example):
    model = Recogniser().eval()
    x = torch.randn(2, 3, 8, 8)
    other = torch.randn(3, 3, 8, 8)
    unpruned = spruce.prune(model, (x, None) if example == "positional None" else (x,), ratio=0.01)
    result = spruce.prune(model, (x, None) if example == "positional None" else (x,), ratio=0.5)
    with torch.no_grad():
        assert torch.equal(unpruned.model(other), model(other))  # the branch the example runs
        assert torch.allclose(result.model(other), result.masked(other), atol=1e-5)
        assert torch.equal(result.model(other, None), result.model(other))
        with pytest.raises(AssertionError, match="text has been specialized to have value None"):
            result.model(other, torch.ones(3, 4))
