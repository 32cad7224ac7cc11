"""The public acceptance set of capture (spruce.zoo.architectures): architectures users bring
(ultralytics YOLOv8n, torchvision detectors and RAFT, a block branching on x.shape, a
module with a literal group count in F.conv2d) prune exactly with a dynamic batch, train,
export to ONNX matching ONNX Runtime and reload from .pt2 in a fresh process.

Each model is built and pruned once per test session (the figures per model, with timings,
are in bench/results/coverage.md)."""

from __future__ import annotations

import functools

import pytest
import spruce
import torch
from helpers import assert_pt2_reloads_in_a_fresh_process
from spruce.api import checks, deploy
from spruce.zoo import architectures as examples
from torch.utils import _pytree as pytree

pytest.importorskip("ultralytics")
pytest.importorskip("torchvision")

NAMES = list(examples.EXAMPLES)
DETECTORS = {"fasterrcnn_mobilenet_v3_large_fpn", "retinanet_resnet50_fpn", "ssdlite320_mobilenet_v3_large"}


@functools.cache
def pruned(name: str):
    example = examples.build(name)
    result = spruce.prune(example.model, example.example, ratio=0.5)
    return example, result


@pytest.mark.parametrize("name", NAMES)
def test_prunes_exactly_at_two_batch_sizes(name):
    example, result = pruned(name)
    captured = result.analysis.captured
    reach, kept = checks.parameter_share(result.analysis, result.kept)
    assert kept <= 0.6 * reach, f"{name} keeps {kept / reach:.2f} of the parameters spruce reaches"
    for batch in (1, 3):
        assert checks.head_error(result.masked, result.model, captured, example.inputs(batch)) <= 1e-4
    # the check can fail: the original model differs from the masked one
    assert checks.head_error(example.model, result.masked, captured, example.inputs(1)) > 1e-3
    if name in DETECTORS:
        assert not captured.whole and {"backbone"} <= {p.path for p in captured.pieces}


@pytest.mark.parametrize("name", NAMES)
def test_compact_model_trains(name):
    example, result = pruned(name)
    compact = result.model
    compact.train()
    compact.zero_grad()
    inputs = example.inputs(2)
    args, kwargs = (inputs, {}) if isinstance(inputs, tuple) else ((), inputs) if isinstance(inputs, dict) else (
        (inputs,), {})
    if example.targets is not None:  # a detector: the loss dict, from the user's own code
        losses = compact(*args, example.targets(2), **kwargs)
        assert isinstance(losses, dict) and losses
        loss = sum(losses.values())
    else:
        out = compact(*args, **kwargs)
        loss = sum(t.float().mean() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
    assert torch.isfinite(loss)
    loss.backward()
    assert checks.missing_gradients(compact, result.analysis.captured) == []
    compact.eval()


@pytest.mark.parametrize("name", NAMES)
def test_compact_model_exports_to_onnx(name, tmp_path):
    """With a dynamic batch: ONNX Runtime matches torch at the example's batch and at the second
    batch size (save_onnx runs both; raft_small's correlation views read the batch through
    ``(b1 + b2 + 1) // 2`` after splitting the concatenated image pair, which the export
    writes as -1 so that no exporter freezes or specialises it)."""
    _, result = pruned(name)
    for part in deploy.parts(result.model, result.analysis.captured):
        assert part.second is not None or name != "raft_small"
        path, error = deploy.save_onnx(part, tmp_path / f"{part.name}.onnx")
        assert path.exists() and error <= 1e-4, (part.name, error)


def test_compact_models_reload_from_pt2_in_a_fresh_process(tmp_path):
    assert_pt2_reloads_in_a_fresh_process({name: pruned(name)[1] for name in NAMES}, tmp_path)
