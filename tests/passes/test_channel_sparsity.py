"""structure="channel": whole channels masked across coupled layers, exported compact."""

import pytest
import torch
import torch.nn as nn
import torchvision
from spruce.compiler.api import sparsify


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
