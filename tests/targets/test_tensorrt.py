"""TensorRT target: ONNX preparation and the 2:4 checker on real exported models; guarded entry points.

Building and running engines needs TensorRT and a CUDA GPU; those tests skip with the reason here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torchvision
from helpers import sparsify
from onnx import numpy_helper
from spruce.targets.base import TargetUnavailable, get_target
from spruce.targets.onnxruntime import run_onnx
from spruce.targets.tensorrt import (
    TensorRTTarget,
    check_2_4,
    input_batch_axes,
    prepare_onnx,
    sparse_layers_from_engine_info,
    write_2_4_report,
)
from torch import nn


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()


def test_prepare_onnx_has_a_dynamic_batch_and_matches_torch(tmp_path: Path) -> None:
    model = small_cnn()
    x = torch.randn(2, 3, 12, 12)
    path = prepare_onnx(model, (x,), tmp_path / "m.onnx")
    assert input_batch_axes(path) == {"input_0": "batch"}
    for batch in (1, 8):
        xb = torch.randn(batch, 3, 12, 12)
        (out,) = run_onnx(path, (xb,))
        np.testing.assert_allclose(out, model(xb).detach().numpy(), rtol=1e-4, atol=1e-5)
    static = prepare_onnx(model, (x,), tmp_path / "s.onnx", dynamic_batch=False)
    assert input_batch_axes(static) == {"input_0": 2}


def test_prepare_onnx_exports_fp16_models_in_fp32_without_touching_them(tmp_path: Path) -> None:
    model = mlp().half()
    path = prepare_onnx(model, (torch.randn(4, 16).half(),), tmp_path / "h.onnx")
    weights = [numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer]
    assert weights and all(w.dtype == np.float32 for w in weights)
    assert next(model.parameters()).dtype == torch.float16
    with pytest.raises(ValueError, match="example input"):
        prepare_onnx(model, (), tmp_path / "none.onnx")


def test_2_4_checker_accepts_a_sparsified_mlp_and_rejects_the_dense_one(tmp_path: Path) -> None:
    model = mlp()
    x = torch.randn(4, 16)
    dense = check_2_4(prepare_onnx(model, (x,), tmp_path / "dense.onnx"))
    assert len(dense) == 3 and not any(c.qualifies for c in dense)
    folded = sparsify(model, x, structure="2:4").fold()
    checks = check_2_4(prepare_onnx(folded, (x,), tmp_path / "sparse.onnx"))
    assert [c.shape for c in checks] == [(32, 16), (8, 32), (3, 8)]
    # Each sparsified layer with a multiple-of-4 input width qualifies; the oracle is the folded weights.
    for check, linear in zip(checks, [m for m in folded.modules() if isinstance(m, nn.Linear)]):
        groups = (linear.weight.detach().reshape(linear.out_features, -1, 4) != 0).sum(-1)
        assert check.qualifies == bool((groups <= 2).all()), check
    assert sum(c.qualifies for c in checks) >= 2


def test_2_4_checker_on_a_sparsified_resnet18_convolutions(tmp_path: Path) -> None:
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    with pytest.warns(UserWarning, match="conv1"):
        folded = sparsify(model, x, structure="2:4").fold()
    checks = check_2_4(prepare_onnx(folded, (x,), tmp_path / "r18.onnx"))
    convs = [c for c in checks if c.op_type == "Conv"]
    assert len(convs) == 20  # BatchNorm folded into the 20 convolutions by the exporter
    stem = convs[0]
    assert not stem.qualifies and "3 input channels" in stem.reason  # the RGB stem cannot hold 2:4
    assert all(c.qualifies for c in convs[1:]), [c for c in convs[1:] if not c.qualifies]
    report = tmp_path / "report.json"
    write_2_4_report(checks, report)
    records = json.loads(report.read_text())
    assert [r["node"] for r in records] == [c.node for c in checks]


def test_2_4_checker_counts_groups_along_input_channels(tmp_path: Path) -> None:
    # Two non-zeros per group of 4 input channels, but 4 along the output axis: qualifies.
    layer = nn.Linear(8, 4, bias=False)
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[:, [0, 1, 4, 5]] = 1.0
    (check,) = check_2_4(prepare_onnx(layer, (torch.randn(1, 8),), tmp_path / "a.onnx"))
    assert check.qualifies
    with torch.no_grad():
        layer.weight[0, 2] = 1.0  # three non-zeros in one group of output channel 0
    (check,) = check_2_4(prepare_onnx(layer, (torch.randn(1, 8),), tmp_path / "b.onnx"))
    assert not check.qualifies and "1 of 8 groups" in check.reason


def test_engine_info_parsing_finds_sparse_tactics() -> None:
    document = {"Layers": [{"Name": "conv1", "TacticName": "sm80_xmma_fprop_sparse_conv"},
                           {"Name": "fc", "TacticName": "sm80_xmma_gemm_f16"}, "a plain string layer"]}
    assert sparse_layers_from_engine_info(document) == ["conv1"]


def test_options_are_validated() -> None:
    for bad in ({"precision": "int3"}, {"batch_sizes": ()}, {"batch_sizes": (0,)}, {"workspace_mb": 0}):
        with pytest.raises(ValueError, match="tensorrt"):
            TensorRTTarget(**bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA; the no-driver path is not reachable")
def test_without_cuda_every_entry_point_refuses_with_the_reason(tmp_path: Path) -> None:
    target = get_target("tensorrt")
    assert "CUDA" in target.unavailable_reason()
    with pytest.raises(TargetUnavailable, match="tensorrt.*CUDA"):
        target.build(mlp(), (torch.randn(1, 16),), tmp_path / "m.engine")
    assert list(tmp_path.iterdir()) == []
    assert "tensorrt" not in target.fingerprint()


def _tensorrt_reason() -> str | None:
    return TensorRTTarget().unavailable_reason()


@pytest.mark.skipif(_tensorrt_reason() is not None, reason=f"needs TensorRT and CUDA: {_tensorrt_reason()}")
def test_engine_builds_runs_and_reports_layers(tmp_path: Path) -> None:  # pragma: no cover - GPU only
    model = mlp()
    x = torch.randn(1, 16)
    folded = sparsify(model, x, structure="2:4").fold()
    target = TensorRTTarget(batch_sizes=(1, 8), timing_cache=tmp_path / "cache.bin")
    artifact = target.build(folded, (x,), tmp_path / "m.engine")
    assert (tmp_path / "cache.bin").is_file() and artifact.info["two_four_layers"]
    runner = target.load(artifact)
    for batch in (1, 8):
        xb = torch.randn(batch, 16)
        (out,) = runner([xb.cuda()])
        torch.cuda.synchronize()
        np.testing.assert_allclose(out.cpu().numpy(), folded(xb).detach().numpy(), rtol=2e-2, atol=2e-2)
    layer_ms = target.time_layers(artifact, batch_size=8, warmup=2, repeats=5)
    assert layer_ms and all(ms >= 0 for ms in layer_ms.values())
