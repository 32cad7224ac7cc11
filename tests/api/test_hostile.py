"""Hostile models: modules called twice, tied weights, data-dependent control flow, wrong input shapes."""

from __future__ import annotations

import pytest
import spruce
import torch
from torch import nn


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        return self.head(self.b(y) + self.b(torch.relu(y)))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.c.weight = self.b.weight
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.c(torch.relu(self.b(self.a(x)))))


class Branches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.a(x)
        return x


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 1)
        self.body = Branches()

    def forward(self, x):
        return self.body(self.stem(x))


@pytest.mark.parametrize("make", [CalledTwice, Tied])
def test_shared_modules_and_tied_weights_prune_exactly(make):
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(2, 3, 8, 8)
    result = spruce.prune(model, x, ratio=0.5)
    assert result.kept and all(len(kept) == 4 for kept in result.kept.values())  # channels really removed
    probe = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(result.model(probe), result.masked(probe), rtol=1e-5, atol=1e-5)
    if make is Tied:
        assert result.model.c.weight is result.model.b.weight  # still one tensor after pruning
        assert result.model.b.weight.shape == (4, 4, 3, 3)


def test_control_flow_in_the_root_names_the_source_line():
    with pytest.raises(spruce.TraceError) as caught:
        spruce.trace(Branches(), torch.randn(1, 3, 8, 8))
    message = str(caught.value)
    assert "test_hostile.py" in message and "if x.sum() > 0" in message
    assert "data-dependent control flow" in message


def test_control_flow_in_a_submodule_names_the_module_and_the_line():
    with pytest.raises(spruce.TraceError) as caught:
        spruce.trace(Outer(), torch.randn(1, 3, 8, 8))
    message = str(caught.value)
    assert "'body'" in message and "if x.sum() > 0" in message and "leaf_modules" in message
    gm = spruce.trace(Outer(), torch.randn(1, 3, 8, 8), leaf_modules=["body"])  # the hint works
    assert any(node.target == "body" for node in gm.graph.nodes)


def test_wrong_input_shape_names_the_node():
    with pytest.raises(spruce.TraceError, match="'a'"):
        spruce.prune(CalledTwice(), torch.randn(2, 1, 8, 8), ratio=0.5)


class WithFrozenAndIntegers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))
        self.register_buffer("lut", torch.arange(8))

    def forward(self, x):
        return self.head(self.b(torch.relu(self.a(x))).mean((2, 3)))


@pytest.mark.parametrize("method, options", [
    ("static", {}), ("rigl", {"delta_t": 5}), ("iee", {"h": 2, "j": 2, "q": 2}),
])
def test_frozen_layers_stay_dense_and_untouched(method, options):
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = WithFrozenAndIntegers()
    model.a.requires_grad_(False)
    frozen = model.a.weight.detach().clone()
    x = torch.randn(4, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"a \(frozen: requires_grad=False\)"):
        sm = spruce.sparsify(model, x, method=method, sparsity=0.8, total_steps=20, **options)
    assert [layer.name for layer in sm.layers] == ["b", "head"]
    opt = torch.optim.SGD([p for p in sm.parameters() if p.requires_grad], lr=0.1)
    sm.attach(opt)
    for _ in range(20):
        loss = F.cross_entropy(sm(x), torch.tensor([0, 1, 2, 3]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sm.step()
    assert torch.equal(model.a.weight, frozen)  # bitwise: the frozen layer did not move
    assert sm.sparsities()["b"] > 0.5
    result = spruce.prune(model, x, ratio=0.5)  # integer buffers do not get in the way of pruning
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), result.masked(x), rtol=1e-5, atol=1e-5)
