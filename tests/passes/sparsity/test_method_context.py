"""The frozen context a method receives at ``initialize``: complete, read-only, the only source."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest
import torch
import torch.nn as nn
from helpers import sparsify
from spruce import IEEConfig, RigLConfig
from spruce.passes.sparsity.context import MethodContext, Structure
from spruce.passes.sparsity.knapsack import Budget
from spruce.passes.sparsity.method import METHODS, Method, MethodConfig, register_method

X = torch.randn(2, 3, 8, 8)


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


@pytest.fixture(scope="module")
def spy():
    """A method registered for these tests only: it records what it sees at initialize."""

    class SpyConfig(MethodConfig):
        name: ClassVar[str] = "spy_context"
        structures: ClassVar[tuple[str, ...]] = ("unstructured", "channel")
        budgeted: ClassVar[bool] = True

    @register_method(SpyConfig)
    class Spy(Method):
        def set_initial_masks(self) -> None:
            ctx = self.ctx
            self.seen = {"layers": [layer.name for layer in ctx.layers], "units": len(ctx.units),
                         "groups": len(ctx.groups)}
            if ctx.structure.kind == "channel":
                for unit in ctx.units:
                    ctx.set_channel_mask(unit, torch.ones(unit.group.size, dtype=torch.bool))
            else:
                super().set_initial_masks()

    yield SpyConfig
    METHODS.pop("spy_context", None)


def test_a_method_receives_the_complete_frozen_context_at_initialize(spy):
    model = cnn()
    table = object()
    sm = sparsify(model, X, spy(), structure="channel", budget={"flops": 0.5}, latency_table=table,
                  total_steps=12)
    ctx = sm.method.ctx
    assert isinstance(ctx, MethodContext) and ctx is sm.context
    # everything was there when the method first saw it
    assert sm.method.seen["layers"] == ["0", "3", "8"] and sm.method.seen["units"] == 2
    assert sm.method.seen["groups"] == len(ctx.analysis.groups) > 0
    assert ctx.source is model and ctx.graph is sm.graph
    assert ctx.layers == sm.layers and isinstance(ctx.layers, tuple) and isinstance(ctx.units, tuple)
    assert ctx.structure == Structure("channel") and ctx.total_steps == 12 and ctx.sparsity == 0.9
    assert ctx.budget == Budget("flops", 0.5) and ctx.latency_table is table
    # frozen: no field can be set after sparsify built it, on the context or the SparseModel
    for field in dataclasses.fields(ctx):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(ctx, field.name, None)
    for name in ("layers", "units", "analysis", "structure", "budget", "latency_table", "total_steps"):
        with pytest.raises(AttributeError):
            setattr(sm, name, None)


def test_the_context_is_the_same_for_every_method_and_carries_the_run():
    sm = sparsify(cnn(), X, RigLConfig(delta_t=2), sparsity=0.5, total_steps=10)
    ctx = sm.method.ctx
    assert ctx.units == () and ctx.analysis is None and ctx.budget is None and ctx.latency_table is None
    assert ctx.structure == Structure("unstructured") and ctx.distribution == "erk_floor" and ctx.total_steps == 10
    assert sm.spec.method == RigLConfig(delta_t=2)

    structured = sparsify(cnn(), X, IEEConfig(h=2, j=1, q=1), structure="channel", budget={"params": 0.6},
                          total_steps=12)
    assert structured.method.channels.ctx is structured.context  # the channel path reads the same context
    assert structured.context.budget == Budget("params", 0.6)


def test_mask_operations_go_through_the_context():
    sm = sparsify(cnn(), X, "static", sparsity=0.5, distribution="uniform")
    ctx, layer = sm.context, sm.layers[0]
    ctx.set_mask(layer, torch.zeros_like(layer.masked.mask))
    assert int(layer.masked.mask.sum()) == 0
    mask = ctx.random_mask(layer, 0.25, torch.Generator().manual_seed(0))
    assert int(mask.sum()) == ctx.keep_count(layer, 0.25) == round(0.25 * layer.masked.mask.numel())
