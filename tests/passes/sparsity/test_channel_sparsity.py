"""structure="channel": whole channels masked across coupled layers, exported compact."""

import pytest
import torch
import torch.nn as nn
import torchvision
from helpers import sparsify


def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


X = torch.randn(2, 3, 32, 32)


def test_static_channel_masks_are_whole_coupled_channels_and_compact_matches():
    model = resnet()
    sm = sparsify(model, X, method="static", structure="channel", sparsity=0.5, distribution="uniform",
                  init="magnitude")
    unit = next(u for u in sm.units if any(m.name == "layer1.0.conv1.weight" and m.dim == 0 for m in u.group.members))
    assert int(unit.mask.sum()) == 32
    conv1 = sm.graph.get_submodule("layer1.0.conv1")
    dead = (~unit.mask).nonzero().flatten()
    assert torch.all(conv1.weight[dead] == 0)  # producer rows
    assert torch.all(sm.graph.get_submodule("layer1.0.conv2").weight[:, dead] == 0)  # consumer columns
    opt = torch.optim.SGD(sm.parameters(), lr=0.01, momentum=0.9)
    sm.attach(opt)
    sm.train()
    for _ in range(3):
        loss = sm(torch.randn(4, 3, 32, 32)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sm.step()
    sm.eval()
    compact = sm.compact().eval()
    with torch.no_grad():
        assert torch.allclose(compact(X), sm(X), atol=1e-4, rtol=1e-4)
    n_dense = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in compact.parameters()) < 0.4 * n_dense


def test_gmp_on_channels_follows_the_schedule():
    sm = sparsify(resnet(), X, method="gmp", structure="channel", sparsity=0.5, distribution="uniform",
                  total_steps=20, delta_t=5)
    opt = torch.optim.SGD(sm.parameters(), lr=0.01)
    sm.attach(opt)
    sm.train()
    for _ in range(20):
        loss = sm(torch.randn(4, 3, 32, 32)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sm.step()
        for unit in sm.units:
            expected = unit.keep_count(1.0 - sm.method.schedule(sm.step_count, 0.5))
            if sm.method.is_update(sm.step_count):
                assert int(unit.mask.sum()) == expected
    assert all(int(u.mask.sum()) == u.keep_count() for u in sm.units)


def test_channel_structure_errors():
    with pytest.raises(ValueError, match="distribution='uniform'"):
        sparsify(resnet(), X, structure="channel", sparsity=0.5)
    with pytest.raises(ValueError, match="does not support structure='channel'"):
        sparsify(resnet(), X, method="rigl", structure="channel", distribution="uniform", total_steps=10)
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="no prunable channel group"):
        sparsify(model, torch.randn(2, 4), structure="channel", distribution="uniform")


def decoder():
    """#13 kind 1: a transposed conv between two convs."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 4, 3, padding=1)).eval()


def test_transposed_conv_consumer_is_masked_so_compact_equals_the_sparse_model():
    """compact() differed from the SparseModel by 0.065 relative (no training step): the
    transposed conv was never masked, so a masked channel's relu(bias) still flowed through it."""
    x = torch.randn(2, 4, 8, 8)
    sm = sparsify(decoder(), x, method="static", structure="channel", sparsity=0.5, distribution="uniform")
    assert "2" in {layer.name for layer in sm.layers}
    unit = next(u for u in sm.units if any(m.name == "0.weight" for m in u.group.members))
    dead = (~unit.mask).nonzero().flatten()
    assert len(dead) == 4
    assert torch.all(sm.graph.get_submodule("2").weight[dead] == 0)  # its input channels: dim 0
    sm.eval()
    with torch.no_grad():
        reference = sm(x)
        err = float((sm.compact()(x) - reference).abs().max()) / max(1.0, float(reference.abs().max()))
    assert err < 1e-5, f"compact() differs from the SparseModel by {err:.2e} (relative)"


def test_channel_group_whose_consumer_is_not_masked_stays_whole():
    """An excluded (dense) consumer would still read a masked channel: its group is left out,
    with a warning naming the group and the unmasked weight."""
    x = torch.randn(2, 4, 8, 8)
    with pytest.warns(UserWarning, match=r"channel groups kept whole: group\d+ \(8 channels; no mask reaches 4.weight"):
        sm = sparsify(decoder(), x, method="static", structure="channel", sparsity=0.5, distribution="uniform",
                      exclude=["4"])
    assert all(m.name != "4.weight" for u in sm.units for m in u.group.members)
    sm.eval()
    with torch.no_grad():
        assert torch.allclose(sm.compact()(x), sm(x), atol=1e-6)


class Scale(nn.Module):
    """A per-channel scale written as a depthwise conv whose group count is a literal."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.scale = nn.Parameter(torch.rand(channels) + 0.5)

    def forward(self, x):
        return nn.functional.conv2d(x, self.scale.view(self.channels, 1, 1, 1), groups=self.channels)


def test_compact_with_a_literal_group_count_runs_and_matches():
    """#13 kind 4: compact() returned a model that could not run (groups=8 written in the
    model's code, 4 channels left); #11 rewrites the literal to the kept count."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), Scale(8), nn.Conv2d(8, 4, 3, padding=1))
    x = torch.randn(2, 3, 8, 8)
    sm = sparsify(model, x, method="static", structure="channel", sparsity=0.5, distribution="uniform")
    compact = sm.compact()
    sm.eval()
    with torch.no_grad():
        assert torch.allclose(compact(x), sm(x), atol=1e-5)
    assert sum(p.numel() for p in compact.parameters()) < sum(p.numel() for p in model.parameters())
