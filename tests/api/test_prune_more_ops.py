"""Equivalence of compact and masked models across more operator kinds."""

import pytest
import spruce
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import randomize, relative_error


class Transposed(nn.Module):
    def __init__(self, groups=1):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 8 if groups > 1 else 6, 2, stride=2, groups=groups)
        self.out = nn.Conv2d(8 if groups > 1 else 6, 4, 1)

    def forward(self, x):
        return self.out(F.relu(self.up(F.relu(self.a(x))))).mean((2, 3))


class OneD(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(3, 8, 3)
        self.norm = nn.InstanceNorm1d(8, affine=True)
        self.act = nn.PReLU(8)
        self.b = nn.Conv1d(8, 6, 3, groups=2)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(self.b(self.act(self.norm(self.a(x)))).amax(-1))


class ThreeD(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv3d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm3d(8)
        self.b = nn.Conv3d(8, 4, 1)

    def forward(self, x):
        y = F.max_pool3d(F.relu(self.bn(self.a(x))), 2)
        return self.b(F.interpolate(y, scale_factor=2.0)).flatten(1)


class Gated(nn.Module):
    """chunk into value and gate (GLU-like): the split must be rewritten with new sizes."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 16)
        self.proj = nn.Linear(8, 3)

    def forward(self, x):
        a, b = self.fc(x).chunk(2, dim=-1)
        return self.proj(a * torch.sigmoid(b))


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 12)
        self.fc = nn.Linear(12, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, ids):
        h = F.gelu(self.fc(self.emb(ids)))
        h = h * h.mean(1, keepdim=True)  # token mixing keeps channels independent
        return self.out(h).sum(1)


class Tiled(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.b = nn.Conv2d(12, 4, 1)
        self.bias = nn.Parameter(torch.zeros(1, 6, 1, 1))

    def forward(self, x):
        y = self.a(x) + self.bias.expand(x.shape[0], -1, x.shape[2], x.shape[3])
        return self.b(y.repeat(1, 2, 1, 1)).mean((2, 3))


class PixelShuffled(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 1)
        self.shuffle = nn.PixelShuffle(2)
        self.b = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.b(self.shuffle(self.a(x))).mean((2, 3))


CASES = {
    "conv_transpose": (Transposed, (2, 3, 6, 6)),
    "depthwise_transpose": (lambda: Transposed(groups=8), (2, 3, 6, 6)),
    "conv1d_instancenorm_prelu_group": (OneD, (2, 3, 12)),
    "conv3d_pool_interpolate": (ThreeD, (2, 3, 4, 4, 4)),
    "chunk_gate": (Gated, (3, 7, 5)),
    "repeat_expand": (Tiled, (2, 3, 5, 5)),
    "pixel_shuffle": (PixelShuffled, (2, 3, 4, 4)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_compact_equals_masked(case):
    factory, shape = CASES[case]
    model = randomize(factory()).eval()
    x = torch.randn(shape)
    result = spruce.prune(model, x, ratio=0.5)
    assert result.kept, [g.reason for g in result.groups]
    with torch.no_grad():
        masked, compact, original = result.masked(x), result.model(x), model(x)
    assert relative_error(masked, compact) <= 1e-4
    assert relative_error(original, masked) > 1e-4
    assert sum(p.numel() for p in result.model.parameters()) < sum(p.numel() for p in model.parameters())


def test_embedding_dim_prunes():
    model = randomize(Tokens()).eval()
    ids = torch.randint(0, 20, (2, 6))
    result = spruce.prune(model, ids, ratio=0.5)
    assert result.model.get_submodule("emb").embedding_dim == 6
    assert relative_error(result.masked(ids), result.model(ids)) <= 1e-4
