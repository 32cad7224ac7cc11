"""Residual blocks found in a graph and bypassed (spruce.passes.depth): a post-norm block is
no residual block, and the bypassed graph equals the model with the block's branch zeroed
(ResNet blocks and transformers layers: tests/api/test_depth.py)."""

from __future__ import annotations

import pytest
import torch
from spruce.capture.capture import capture
from spruce.passes.depth import bypass_blocks, residual_blocks, zero_blocks
from torch import nn


class PostNorm(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x):
        return self.norm(x + self.fc(x))


class Residual(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        return x + self.fc2(torch.tanh(self.fc1(x)))


def test_only_blocks_whose_zero_branch_gives_the_input_back():
    model = nn.Sequential(nn.Linear(4, 8), PostNorm(), Residual(), Residual(), nn.Linear(8, 3)).eval()
    x = torch.randn(5, 4)
    gm = capture(model, x).eval
    blocks = residual_blocks(gm)
    assert [b.path for b in blocks] == ["2", "3"]
    assert blocks[0].zeroed == ("2.fc2.weight", "2.fc2.bias")
    assert blocks[0].cost == 2 * (8 * 8 + 8)
    with torch.no_grad():
        assert torch.equal(bypass_blocks(gm, ["3"])(x), zero_blocks(model, [blocks[1]])(x))
    with pytest.raises(ValueError, match=r"'1' is not a residual block.*: 2, 3"):
        bypass_blocks(gm, ["1"])
