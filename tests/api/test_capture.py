"""Capture at the example input: code plain fx cannot trace gets in through torch.export with a
dynamic batch, detection-style post-processing stays eager around captured pieces, and only
truly data-dependent control flow fails, with the right hint."""

from __future__ import annotations

import functools

import pytest
import spruce
import torch
from spruce.api import checks
from spruce.capture.capture import capture
from torch import nn


def exact(result, inputs) -> float:
    return checks.head_error(result.masked, result.model, result.analysis.captured, inputs)


def wrapped(forward):
    @functools.wraps(forward)
    def call(*args, **kwargs):  # a decorator hiding the signature: fx sees (*args, **kwargs)
        return forward(*args, **kwargs)

    return call


class Decorated(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(16, 4)

    @wrapped
    def forward(self, x):
        y, z = self.a(x).relu().chunk(2, dim=1)  # unpacking chunks: iteration over a traced value
        parts = [self.b(y), z]
        for size in x.shape[2:]:  # iteration over a shape
            assert size > 1
        return self.head(torch.cat(parts, 1).mean((2, 3)))


def test_decorated_forward_and_chunk_iteration_are_captured_by_export_and_prune_exactly():
    torch.manual_seed(0)
    model = Decorated().eval()
    captured = capture(model, torch.randn(1, 3, 8, 8))
    assert captured.method == "export" and captured.whole
    result = spruce.prune(model, torch.randn(1, 3, 8, 8), ratio=0.5)
    assert result.kept
    for batch in (1, 4):
        assert exact(result, torch.randn(batch, 3, 8, 8)) <= 1e-5


class KeywordsAndContainers(nn.Module):
    def __init__(self):
        super().__init__()
        self.image = nn.Conv2d(3, 8, 3, padding=1)
        self.extra = nn.Linear(5, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, images: list, extras: dict, scale: float = 1.0):
        fused = sum(self.image(x).mean((2, 3)) for x in images)  # iteration over a list input
        fused = fused + self.extra(extras["features"])
        return {"logits": self.head(fused * scale)}


def test_keyword_list_and_dict_inputs_are_captured_with_a_dynamic_batch():
    torch.manual_seed(0)
    model = KeywordsAndContainers().eval()

    def inputs(n):
        return {"images": [torch.randn(n, 3, 6, 6), torch.randn(n, 3, 6, 6)],
                "extras": {"features": torch.randn(n, 5)}, "scale": 2.0}

    result = spruce.prune(model, inputs(1), ratio=0.5)
    assert result.analysis.captured.method == "export"
    assert result.kept
    for n in (1, 3):
        assert exact(result, inputs(n)) <= 1e-5
    out = result.model(**inputs(2))
    assert set(out) == {"logits"} and out["logits"].shape == (2, 2)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:  # control flow on a tensor value
            return y
        return -y


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 1)
        self.body = DataDependent()

    def forward(self, x):
        return self.body(self.stem(x))


def test_data_dependent_control_flow_names_the_line_and_hints_torch_cond():
    with pytest.raises(spruce.TraceError) as caught:
        spruce.prune(DataDependent(), torch.randn(1, 3, 8, 8))
    message = str(caught.value)
    assert "test_capture.py" in message and "if y.sum() > 0" in message
    assert "data-dependent control flow" in message and "torch.cond" in message
    assert "co_varnames" not in message and "Proxy" not in message


def test_data_dependent_control_flow_in_a_submodule_hints_a_leaf_module_which_then_works():
    with pytest.raises(spruce.TraceError) as caught:
        spruce.channel_groups(Outer(), torch.randn(1, 3, 8, 8))
    assert "'body'" in str(caught.value) and "leaf_modules" in str(caught.value)
    groups = spruce.channel_groups(Outer(), torch.randn(1, 3, 8, 8), leaf_modules=["body"])
    assert groups  # the leaf keeps its channels; the rest is analysed


class ItemAssignment(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        y = self.conv(x)
        y[:, int(y.argmax()) % 8] = 0
        return y


def test_item_assignment_gets_its_own_hint():
    with pytest.raises(spruce.TraceError) as caught:
        spruce.prune(ItemAssignment(), torch.randn(1, 3, 8, 8))
    message = str(caught.value)
    assert "item assignment" in message and "torch.where" in message


class UnknownOp(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 4, 3, padding=1)

    @wrapped
    def forward(self, x):
        return self.c(torch.special.erfcx(self.a(x)) + self.b(self.a(x)))


def test_an_operator_without_a_rule_pins_its_channels_with_a_reason():
    groups = spruce.channel_groups(UnknownOp(), torch.randn(1, 3, 8, 8))
    pinned = next(g for g in groups if any(m.name == "a.weight" and m.dim == 0 for m in g.members))
    assert not pinned.prunable and "unknown operator" in pinned.reason and "erfcx" in pinned.reason
    result = spruce.prune(UnknownOp().eval(), torch.randn(1, 3, 8, 8))
    assert exact(result, torch.randn(2, 3, 8, 8)) <= 1e-5


class Spatial(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.head = nn.Linear(16, 3)

    @wrapped
    def forward(self, x):
        y = self.b(self.a(x).relu())
        n, c, h, w = y.shape
        return self.head(y.reshape(n, c, h * w).mean(-1))


def test_declared_dynamic_dims_stay_dynamic_in_the_compact_model():
    torch.manual_seed(0)
    dims = {"x": {2: torch.export.Dim("h", min=4, max=64), 3: torch.export.Dim("w", min=4, max=64)}}
    result = spruce.prune(Spatial().eval(), torch.randn(1, 3, 16, 16), ratio=0.5, dynamic_shapes=dims)
    assert result.kept
    for shape in ((1, 3, 16, 16), (3, 3, 24, 12)):
        assert exact(result, torch.randn(*shape)) <= 1e-5


class BakedBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8 * 16, 2)

    def forward(self, x):
        return self.head(self.conv(x).mean(2).reshape(2, -1))  # the batch of two written into the code


def test_a_compact_model_that_cannot_run_at_a_second_batch_size_is_refused():
    with pytest.raises(RuntimeError, match="second batch size"):
        spruce.prune(BakedBatch().eval(), torch.randn(2, 3, 16, 16), ratio=0.5)


class ToyDetector(nn.Module):
    """A backbone, a head, then NMS over data-dependent boxes: post-processing that stays eager."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(16, 5, 1)

    def forward(self, x):
        features = self.backbone(x)
        raw = self.head(features).flatten(2).transpose(1, 2)  # (n, positions, 4 box + 1 score)
        keep = raw[..., 4] > 0  # a data-dependent filter
        return [self._nms(r[k]) for r, k in zip(raw, keep)]

    @staticmethod
    def _nms(rows):
        boxes = torch.cat([rows[:, :2], rows[:, :2] + rows[:, 2:4].abs() + 0.1], 1)
        return rows[torch.ops.torchvision.nms(boxes, rows[:, 4], 0.5)] if rows.numel() else rows


def test_post_processing_stays_eager_around_captured_pieces():
    pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = ToyDetector().eval()
    checks.make_nondegenerate(model, torch.randn(1, 3, 8, 8))
    result = spruce.prune(model, torch.randn(1, 3, 8, 8), ratio=0.5)
    captured = result.analysis.captured
    assert not captured.whole and [p.path for p in captured.pieces] == ["backbone", "head"]
    assert any(link.src == 0 and link.dst == 1 for link in captured.links)  # coupled across pieces
    assert result.model.backbone[0].out_channels == 8  # pruned inside a piece
    for batch in (1, 3):
        assert exact(result, torch.randn(batch, 3, 8, 8)) <= 1e-5
    assert isinstance(result.model, ToyDetector)  # the user's own class, its eager code around compact graphs


def test_a_module_type_with_a_rule_is_one_call_so_stochastic_depth_keeps_one_graph():
    """torchvision's StochasticDepth has a module rule, so fx captures it as one call that reads
    ``self.training`` when it runs: the eval and training graphs are one graph (no second trace
    and compaction), and the compact model still drops residual rows in training mode only."""
    from spruce.passes.export import ModeSwitch
    from torchvision.ops import StochasticDepth

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 16, 3, padding=1)
            self.back = nn.Conv2d(16, 8, 1)
            self.drop = StochasticDepth(0.5, "row")

        def forward(self, x):
            return x + self.drop(self.back(self.conv(x).relu()))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Block(), Block()).eval()
    x = torch.randn(2, 3, 8, 8)
    captured = capture(model, x)
    assert captured.method == "fx" and captured.pieces[0].train is None
    assert {n.target for n in captured.graphs[0].graph.nodes if n.op == "call_module"} >= {"1.drop", "2.drop"}
    result = spruce.prune(model, x, ratio=0.5)
    assert result.kept and not isinstance(result.model, ModeSwitch)
    assert exact(result, torch.randn(3, 3, 8, 8)) <= 1e-5
    compact = result.model.train()
    with torch.no_grad():
        draws = {tuple(compact(torch.ones(16, 3, 8, 8)).flatten(1).sum(1).round(decimals=3).tolist()) for _ in range(4)}
    assert len(draws) > 1  # rows dropped at random in training mode
