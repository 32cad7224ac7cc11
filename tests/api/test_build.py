"""``spruce.build`` from the user's own code: a real ONNX Runtime artifact with the manifest
that pins its bytes, timed by ``spruce.bench``; ``save_onnx``'s files carry a manifest too."""

from __future__ import annotations

import numpy as np
import pytest
import spruce
import torch
from spruce.api import deploy
from spruce.targets.base import ArtifactError, read_artifact
from spruce.targets.onnxruntime import run_onnx
from torch import nn


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()


def test_build_gives_an_artifact_that_bench_times_and_its_manifest_pins_its_bytes(tmp_path):
    model, x = _cnn(), torch.randn(1, 1, 16, 16)
    artifact = spruce.build(model, x, "onnxruntime", out=tmp_path / "cnn.onnx", threads=1)
    assert artifact.path == tmp_path / "cnn.onnx" and artifact.target == "onnxruntime"
    assert artifact.input_shapes == ((1, 1, 16, 16),) and artifact.manifest_path.is_file()
    assert read_artifact(artifact.path, expected_target="onnxruntime") == artifact
    batch = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        want = model(batch).numpy()
    (got,) = run_onnx(artifact.path, [batch])  # the batch stays dynamic
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    report = spruce.bench(artifact, "onnxruntime", batch_sizes=(1, 2), warmup=1, iters=3)
    assert {(row.which, row.batch_size) for row in report.rows} == {("compiled", 1), ("compiled", 2)}
    assert all(row.median_ms > 0 for row in report.rows)
    data = bytearray(artifact.path.read_bytes())
    data[-1] ^= 0xFF
    artifact.path.write_bytes(bytes(data))  # the same size, other bytes
    with pytest.raises(ArtifactError, match="sha256"):
        spruce.bench(artifact, "onnxruntime", batch_sizes=(1,), warmup=1, iters=1)


def test_build_into_a_folder_keeps_the_model_in_its_mode_and_bench_compares_with_dense(tmp_path):
    dense = _cnn()
    result = spruce.prune(dense, torch.randn(1, 1, 16, 16), ratio=0.5)
    compact = result.model.train()
    (tmp_path / "dense").mkdir()
    (tmp_path / "compact").mkdir()
    dense_artifact = spruce.build(dense, (torch.randn(1, 1, 16, 16),), out=tmp_path / "dense")
    compact_artifact = spruce.build(compact, [torch.randn(1, 1, 16, 16)], out=tmp_path / "compact")
    assert compact.training, "build puts the model back in the mode it was given in"
    assert dense_artifact.path == tmp_path / "dense" / "model.onnx"
    assert compact_artifact.path == tmp_path / "compact" / "model.onnx"
    report = spruce.bench(compact_artifact, "onnxruntime", batch_sizes=(1,), warmup=1, iters=3,
                          dense=dense_artifact)
    assert set(report.speedup) == {1} and report.speedup[1] > 0


@pytest.mark.parametrize("inputs, match", [
    ((torch.randn(1, 1, 16, 16), None), r"got tuple of \['Tensor', 'NoneType'\]"),
    ((), "non-empty"),
    (np.zeros((1, 1, 16, 16), np.float32), "got ndarray"),
])
def test_build_refuses_example_inputs_that_are_not_tensors(tmp_path, inputs, match):
    with pytest.raises(ValueError, match=match):
        spruce.build(_cnn(), inputs, out=tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


def test_build_refuses_a_bad_target_or_option_before_writing(tmp_path):
    with pytest.raises(ValueError, match="nosuch"):
        spruce.build(_cnn(), torch.randn(1, 1, 16, 16), "nosuch", out=tmp_path / "model.onnx")
    with pytest.raises(ValueError, match="thread"):
        spruce.build(_cnn(), torch.randn(1, 1, 16, 16), out=tmp_path / "model.onnx", thread=2)
    assert list(tmp_path.iterdir()) == []


def test_save_onnx_writes_a_manifest_that_bench_reads(tmp_path):
    result = spruce.prune(_cnn(), torch.randn(2, 1, 16, 16), ratio=0.5)
    (part,) = deploy.parts(result.model, result.analysis.captured)
    path, error = deploy.save_onnx(part, tmp_path / "model.onnx")
    assert error <= 1e-4
    artifact = read_artifact(path, expected_target="onnxruntime")
    assert artifact.input_shapes == ((2, 1, 16, 16),) and artifact.info["built_by"] == "save_onnx"
    report = spruce.bench(path, "onnxruntime", batch_sizes=(1, 3), warmup=1, iters=2)
    assert {row.batch_size for row in report.rows} == {1, 3}


def test_to_transformers_is_public():
    from spruce.api.transformers import to_transformers

    assert spruce.to_transformers is to_transformers
    assert {"build", "to_transformers"} <= set(spruce.__all__)
