"""`spruce bench` on real ONNX Runtime and torch artifacts; bad input exits 2 with a clear message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import bench_artifacts, copy_artifact
from spruce.cli import main as cli


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    return bench_artifacts(tmp_path_factory.mktemp("artifacts"))


@pytest.fixture
def spruce_main():
    return cli.main


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


def test_a_swapped_model_onnx_is_refused_not_timed_as_compiled(artifacts, spruce_main, tmp_path, capsys) -> None:
    compiled = copy_artifact(artifacts["pruned"], tmp_path)
    dense = copy_artifact(artifacts["dense"], tmp_path, "dense.onnx")
    compiled.write_bytes(dense.read_bytes())  # the example: the dense model put in the compiled one's place
    assert spruce_main(["bench", str(compiled), "--dense", str(dense), "--target", "onnxruntime"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spruce: error:") and "Traceback" not in err
    assert f"{compiled} has " in err and "its manifest model.onnx.spruce.json pins" in err
