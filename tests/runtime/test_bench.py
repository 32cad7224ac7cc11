"""spruce.bench and `spruce bench` on real ONNX Runtime and torch artifacts; bad input exits 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from spruce.compiler import cli
from spruce.compiler.cli_bench import SUBCOMMAND
from spruce.runtime.bench import BenchReport, bench
from spruce.targets.base import ArtifactError, get_target
from torch import nn


def cnn(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)).eval()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("artifacts")
    x = (torch.randn(1, 3, 32, 32),)
    ort = get_target("onnxruntime", threads=1)
    return {
        "dense": ort.build(cnn(64), x, folder / "dense.onnx").path,
        "pruned": ort.build(cnn(16), x, folder / "pruned.onnx").path,
        "torch": get_target("torch").build(cnn(16), x, folder / "pruned.pt2").path,
    }


@pytest.fixture
def spruce_main(monkeypatch):
    monkeypatch.setitem(cli.SUBCOMMANDS, "bench", SUBCOMMAND)
    return cli.main


def check_rows(report: BenchReport, which: tuple[str, ...], batch_sizes: tuple[int, ...]) -> None:
    assert [(r.which, r.batch_size) for r in report.rows] == [(w, b) for b in batch_sizes for w in which]
    for row in report.rows:
        assert 0 < row.median_ms <= row.p90_ms <= row.p99_ms
        assert row.images_per_s == pytest.approx(row.batch_size * 1e3 / row.median_ms)


def test_bench_compares_with_dense_on_onnxruntime(artifacts) -> None:
    report = bench(artifacts["pruned"], get_target("onnxruntime", threads=1), batch_sizes=(1, 4), warmup=3,
                   iters=15, dense=artifacts["dense"])
    check_rows(report, ("compiled", "dense"), (1, 4))
    for batch in (1, 4):
        assert report.speedup[batch] == pytest.approx(report.row("dense", batch).median_ms
                                                      / report.row("compiled", batch).median_ms)
    assert report.speedup[4] > 1.0  # 16 channels instead of 64: 12x fewer MACs
    assert report.fingerprint["target"] == "onnxruntime"
    table = report.format_table()
    assert "speedup" in table and len(table.splitlines()) == 2 + 4
    assert json.loads(json.dumps(report.to_dict()))["speedup"].keys() == {"1", "4"}


def test_bench_torch_artifact(artifacts) -> None:
    report = bench(artifacts["torch"], "torch", batch_sizes=(2,), warmup=2, iters=10)
    check_rows(report, ("compiled",), (2,))
    assert report.speedup == {}


def test_bench_refuses_another_targets_artifact_and_bad_options(artifacts) -> None:
    with pytest.raises(ArtifactError, match="built for target 'onnxruntime', not 'torch'"):
        bench(artifacts["pruned"], "torch")
    with pytest.raises(ValueError, match="batch_sizes"):
        bench(artifacts["pruned"], "onnxruntime", batch_sizes=(0,))
    with pytest.raises(ValueError, match="iters"):
        bench(artifacts["pruned"], "onnxruntime", iters=0)


def test_cli_prints_a_table_and_json(artifacts, spruce_main, capsys) -> None:
    code = spruce_main(["bench", str(artifacts["pruned"]), "--target", "onnxruntime", "--option", "threads=1",
                        "--dense", str(artifacts["dense"]), "--batch-sizes", "1,2", "--iters", "5", "--warmup", "1"])
    assert code == 0
    assert "speedup" in capsys.readouterr().out
    assert spruce_main(["bench", str(artifacts["torch"]), "--target", "torch", "--batch-sizes", "1", "--iters", "3",
                        "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert [r["batch_size"] for r in document["rows"]] == [1]


@pytest.mark.parametrize("case", ["wrong target", "unknown target", "missing tensorrt", "missing file",
                                  "corrupt manifest", "bad batch sizes", "bad option"])
def test_cli_bad_input_exits_2_with_a_clear_message(case, artifacts, spruce_main, tmp_path, capsys) -> None:
    artifact = str(artifacts["pruned"])
    argv, expected = {
        "wrong target": (["--target", "torch"], "built for target 'onnxruntime', not 'torch'"),
        "unknown target": (["--target", "tpu9"], "unknown target 'tpu9'"),
        "missing tensorrt": (["--target", "tensorrt"], "target 'tensorrt' is unavailable"),
        "bad batch sizes": (["--target", "onnxruntime", "--batch-sizes", "1,x"], "bad batch sizes"),
        "bad option": (["--target", "onnxruntime", "--option", "colour=red"], "unknown option colour"),
        "missing file": (["--target", "onnxruntime"], "does not exist"),
        "corrupt manifest": (["--target", "onnxruntime"], "not a valid spruce manifest"),
    }[case]
    if case == "missing file":
        artifact = str(tmp_path / "nothing.onnx")
    if case == "corrupt manifest":
        copy = tmp_path / "copy.onnx"
        copy.write_bytes(artifacts["pruned"].read_bytes())
        Path(str(copy) + ".spruce.json").write_text('{"format": "spruce-artifact", "version": 1, "tar')
        artifact = str(copy)
    assert spruce_main(["bench", artifact, *argv]) == 2
    captured = capsys.readouterr()
    assert expected in captured.err and "Traceback" not in captured.err
    assert captured.err.startswith("spruce: error:") or "usage:" in captured.err
