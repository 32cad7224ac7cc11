"""Which ONNX exporter handles a model: a CRNN's height pool exported by TorchScript, and a model
the first exporter fails on given to the other one first from then on."""

from __future__ import annotations

import pytest
import torch
from spruce.targets import onnxruntime as ort_target
from spruce.targets.onnxruntime import OnnxRuntimeCPU, check_onnx, export_onnx, module_kinds
from torch import fx, nn


class HeightPool(nn.Module):
    """A CRNN's tail as easyocr writes it: a convolution, the feature map permuted to (N, W, C, H)
    and ``AdaptiveAvgPool2d((None, 1))`` averaging the height away (the TorchScript exporter
    refuses a pool whose output size follows the input)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d((None, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(x).permute(0, 3, 1, 2)).squeeze(3)


@pytest.mark.parametrize("graph", [False, True], ids=["module", "fx_graph_module"])
def test_a_pool_with_a_kept_size_exports_through_torchscript(graph, tmp_path, monkeypatch, capsys):
    """... as a module and as the fx GraphModule a compact model is (whose ``graph`` torch's
    TorchScript exporter would read as a TorchScript graph), the model's eval mode kept."""
    model, x = HeightPool().eval(), torch.randn(2, 1, 6, 9)
    if graph:
        model = fx.symbolic_trace(model).eval()
    used = []
    real = ort_target._export_torchscript

    def _export_torchscript(*args, **kwargs):
        used.append("torchscript")
        return real(*args, **kwargs)

    def _export_dynamo(*args, **kwargs):
        raise AssertionError("the torchscript exporter should have handled this model")

    monkeypatch.setattr(ort_target, "_export_torchscript", _export_torchscript)
    monkeypatch.setattr(ort_target, "_export_dynamo", _export_dynamo)
    path = export_onnx(model, (x,), tmp_path / "pool.onnx", dynamic_batch=True)
    assert used == ["torchscript"] and "failed" not in capsys.readouterr().err
    assert check_onnx(path, model, (torch.randn(3, 1, 6, 9),)) <= 1e-5
    assert isinstance(model.pool, nn.AdaptiveAvgPool2d)  # the model is left as it was
    assert not any(module.training for module in model.modules())


def test_the_exporter_that_worked_goes_first_for_models_of_the_same_kinds(tmp_path, monkeypatch):
    calls = []
    real_dynamo = ort_target._export_dynamo

    def _export_torchscript(*args, **kwargs):
        calls.append("torchscript")
        raise RuntimeError("unsupported operator")

    def _export_dynamo(*args, **kwargs):
        calls.append("dynamo")
        return real_dynamo(*args, **kwargs)

    monkeypatch.setattr(ort_target, "_export_torchscript", _export_torchscript)
    monkeypatch.setattr(ort_target, "_export_dynamo", _export_dynamo)
    target = OnnxRuntimeCPU(threads=1)
    model, x = nn.Sequential(nn.Linear(4, 3), nn.ReLU()).eval(), torch.randn(2, 4)
    target.build(model, (x,), tmp_path / "a.onnx")
    assert calls == ["torchscript", "dynamo"] and target.exporters == {module_kinds(model): "dynamo"}
    calls.clear()
    smaller = nn.Sequential(nn.Linear(4, 2), nn.ReLU()).eval()  # a compact variant: the same kinds of modules
    target.build(smaller, (x,), tmp_path / "b.onnx")
    assert calls == ["dynamo"]
