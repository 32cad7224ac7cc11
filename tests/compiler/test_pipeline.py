"""End to end: `spruce compile` on the embedded default (shortened), then `spruce bench` on its artifact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from spruce.cli.main import main
from spruce.targets.base import read_artifact
from spruce.targets.onnxruntime import run_onnx

SHORT = ["--epochs", "2", "--bench-iters", "5", "--quiet"]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("compile") / "out"
    # two epochs train a weaker dense model than the default's ten (top-1 agreement 0.99 >= its floor 0.9
    # at ten): the floor is lowered to what the shortened run keeps
    assert main(["compile", "--out", str(out), *SHORT, "--floor", "top1_agreement>=0.3", "--json"]) == 0
    return out, json.loads((out / "report.json").read_text())


def test_compile_default_writes_a_complete_report(compiled):
    out, report = compiled
    assert report["format"] == "spruce-compile-report"
    assert report["recipe"]["method"] == {"name": "iee"} and report["recipe"]["budget"] == {"latency": 0.5}
    for which in ("dense", "compiled"):
        assert 0.0 <= report[which]["accuracy"] <= 1.0
        artifact = read_artifact(out / report[which]["artifact"], expected_target="onnxruntime")
        assert artifact.path.stat().st_size > 0
    # the compiled model really is smaller, and its channel counts are the kernel-friendly multiples of 8
    assert report["compiled"]["macs"] < report["dense"]["macs"]
    assert report["compiled"]["params"] < report["dense"]["params"]
    for layer in report["layers"]:
        if layer["compiled_out"] != layer["dense_out"]:
            assert layer["compiled_out"] % 8 == 0, layer
    # the budget is met as measured (compiled / dense interleaved in one run), not as predicted
    budget = report["budget"]
    assert budget["measured_ratio"] <= 1.05 * 0.5, budget
    assert budget["bench_ratio"] <= 1.3 * 1.05 * 0.5, budget  # an independent run: a tolerance for load
    table = report["latency_table"]
    assert budget["dense_predicted_ms"] == table["dense_predicted_ms"] > 0
    assert budget["compiled_predicted_ms"] == table["compiled_predicted_ms"] > 0
    # the embedded default's trained CNN is the dense reference; recovered with its labels
    assert report["dense"]["accuracy_per_epoch"] and report["recovery"]["mode"] == "loss"
    assert report["evaluation"]["fidelity"]["per_output"]["output"]["top1_agreement"] > 0.3
    assert report["evaluation"]["outputs"][0]["kind"] == "scores"
    assert report["floor"]["met"] and [c["measure"] for c in report["floor"]["checks"]] == ["top1_agreement"]
    for row in report["bench"]["by_batch"]:
        assert row["dense_ms"] > 0 and row["compiled_ms"] > 0
        assert row["compiled_fps"] == pytest.approx(row["batch_size"] * 1e3 / row["compiled_ms"])
    assert {r["batch_size"] for r in report["bench"]["by_batch"]} == {1, 8}
    for name in ("report.md", "widths.png", "accuracy_fps.png", "training.png", "latency_table.png", "model.pt"):
        assert (out / name).stat().st_size > 0, name
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging leftovers
    # every stage before the report timed under its name
    assert set(report["timings"]) == {f"{stage}_s" for stage in ("load", "reference", "capture", "profile",
                                                                  "sparsify", "recover", "export", "build",
                                                                  "evaluate_int8", "bench", "evaluate_lm")}


def test_compiled_onnx_equals_the_compiled_torch_model(compiled):
    out, _ = compiled
    model = torch.load(out / "model.pt", weights_only=False).eval()
    x = torch.randn(8, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(x).numpy()
    (got,) = run_onnx(out / "model.onnx", [x])  # batch 8 through the dynamic batch axis
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_spruce_bench_on_the_compiled_artifact(compiled, capsys):
    out, _ = compiled
    code = main(["bench", str(out / "model.onnx"), "--target", "onnxruntime", "--dense", str(out / "dense.onnx"),
                 "--batch-sizes", "1,4", "--iters", "5", "--warmup", "1", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    rows = {(r["which"], r["batch_size"]) for r in report["rows"]}
    assert rows == {("compiled", 1), ("dense", 1), ("compiled", 4), ("dense", 4)}


def test_bench_refuses_an_artifact_for_another_target(compiled, capsys):
    out, _ = compiled
    assert main(["bench", str(out / "model.onnx"), "--target", "torch", "--iters", "2"]) == 2
    assert "built for target 'onnxruntime'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--target", "nosuch"], "unknown target 'nosuch'"),
    (["--target", "tensorrt"], "tensorrt"),
    (["--budget", "latency=1.5"], "budget latency must be a fraction"),
    (["--budget", "speed=0.5"], "budget kind must be one of"),
    (["--sparsity", "1.0", "--method", "static"], "sparsity must be < 1"),
    (["--method", "nosuch"], "unknown method 'nosuch'"),
    (["--data", "nosuch"], "unknown data 'nosuch'"),
    (["--epochs", "0"], "epochs must be >= 1"),
    (["--method", "iee", "--method-option", "h=0"], "iee: h must be >= 1"),
    (["--method", "rigl"], "method 'rigl' does not support structure='channel'"),
])
def test_bad_options_exit_2_and_write_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert main(["compile", "--out", str(out), *SHORT, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spruce: error:") and message in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_unwritable_out_exits_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["compile", "--out", str(blocker / "out"), *SHORT]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_recipe_file_stands_for_the_options(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    # one epoch trains too weak a dense model for its default floor: the recipe sets none
    recipe.write_text("method: halp\nbudget: {flops: 0.5}\nepochs: 1\nbench_iters: 3\nbench_batch_sizes: [2]\n"
                      "floor: none\n")
    out = tmp_path / "out"
    assert main(["compile", "--recipe", str(recipe), "--out", str(out), "--quiet", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["recipe"]["method"] == {"name": "halp"} and report["recipe"]["budget"] == {"flops": 0.5}
    assert report["compiled"]["macs"] <= 0.5 * report["dense"]["macs"]
    assert [r["batch_size"] for r in report["bench"]["by_batch"]] == [2]
    assert report["recipe"]["floor"] == [] and report["floor"]["checks"] == []
