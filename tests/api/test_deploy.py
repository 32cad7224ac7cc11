"""Deployment of a model whose ``forward`` takes ``*args, **kwargs`` (as a compact model that
switches between its train and eval graphs does): the ``.pt2`` binds the user's input names,
so the shape guards torch.export records reload and run in a fresh process. A pruned
network keeps the image height and width the user declared dynamic in its ONNX file and
``.pt2``."""

from __future__ import annotations

import inspect

import spruce
import torch
from spruce.api import deploy
from spruce.targets.onnxruntime import run_onnx
from torch import nn


class Pair(nn.Module):
    """Sizes computed from two inputs' batches: torch.export records guards naming both."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, tokens: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        h = self.lin(tokens)
        return h.reshape(other.shape[0], -1, 8).sum(1) * (tokens.shape[0] // other.shape[0])


class Forwarding(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def _part() -> deploy.Part:
    torch.manual_seed(0)
    model = Forwarding(Pair()).eval()
    first = {"tokens": torch.randn(2, 3, 8), "other": torch.randn(2, 5)}
    second = {"tokens": torch.randn(3, 3, 8), "other": torch.randn(3, 5)}
    return deploy.Part("model", model, ((), first), ((), second))


def test_call_signature_names_the_inputs_of_a_forwarding_model():
    part = _part()
    signature = deploy.call_signature(part.module, *part.inputs)
    assert list(signature.parameters) == ["tokens", "other"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in signature.parameters.values())
    positional = deploy.call_signature(part.module, (torch.zeros(1), torch.zeros(2)), {})
    assert list(positional.parameters) == ["args_0", "args_1"]
    plain = deploy.call_signature(Pair(), (torch.zeros(2, 3, 8),), {"other": torch.zeros(2, 5)})
    assert plain == inspect.signature(Pair().forward)  # a forward without *args/**kwargs keeps its own


def test_guarded_pt2_of_a_forwarding_model_reloads_in_a_fresh_process(tmp_path):
    part = _part()
    path = deploy.save_pt2(part, tmp_path / "model.pt2")
    guards = torch.export.load(path)._guards_code
    assert guards and all("L['kwargs']" not in g for g in guards), guards
    errors = deploy.check_pt2_in_fresh_process([(path, part)])
    assert len(errors) == 1 and errors[0] <= 1e-5, errors


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def test_declared_height_and_width_stay_dynamic_in_onnx_and_pt2(tmp_path):
    """Height and width declared dynamic at prune time stay dynamic in the deployed files:
    ONNX Runtime and a fresh process's reloaded .pt2 run at sizes other than the example's."""
    torch.manual_seed(0)
    height, width = torch.export.Dim("height", min=8, max=256), torch.export.Dim("width", min=8, max=256)
    result = spruce.prune(Net().eval(), torch.randn(2, 3, 32, 32), ratio=0.5,
                          dynamic_shapes={"x": {2: height, 3: width}})
    (part,) = deploy.parts(result.model, result.analysis.captured)
    path, error = deploy.save_onnx(part, tmp_path / "model.onnx")
    assert error <= 1e-4, error
    import onnx
    (graph_input,) = onnx.load(path).graph.input
    assert [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim] == ["batch", 3, "height",
                                                                                          "width"]
    compact = result.model.eval()
    others = [torch.randn(3, 3, 40, 24), torch.randn(1, 3, 17, 64)]
    for x in others:
        with torch.no_grad():
            want = compact(x)
        (got,) = run_onnx(path, [x])
        assert float((torch.as_tensor(got) - want).abs().max()) <= 1e-4 * max(1.0, float(want.abs().max()))
    program = deploy.save_pt2(part, tmp_path / "model.pt2")
    at_others = deploy.Part("model", compact, ((others[0],), {}), ((others[1],), {}))
    errors = deploy.check_pt2_in_fresh_process([(program, at_others)])
    assert errors[0] <= 1e-5, errors
