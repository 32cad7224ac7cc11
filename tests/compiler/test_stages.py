"""``spruce compile`` is a list of stages with typed inputs and outputs; the report is built
from their results."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from spruce.compiler import stages
from spruce.compiler.pipeline import STAGES, run_stages, stage_inputs, stage_output
from spruce.compiler.recipes import Recipe
from spruce.compiler.reporting import CompileReport, build_document
from spruce.compiler.training import TrainLog
from spruce.runtime.bench import BenchReport, BenchRow
from spruce.targets.base import Artifact
from torch import nn

PROVIDED = {Recipe, stages.Workspace, stages.Timings, stages.Given}  # what the runner hands every stage


def test_compile_is_the_list_of_stages_of_the_design():
    assert [stage.__name__ for stage in STAGES] == ["load", "reference", "capture", "profile", "sparsify",
                                                    "recover", "export", "build", "bench", "report"]


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.__name__)
def test_every_stage_has_typed_inputs_and_a_typed_result(stage):
    hints = typing.get_type_hints(stage)
    assert set(hints) == {*stage_inputs(stage), "return"}, "every parameter and the result are annotated"
    result = stage_output(stage)
    assert dataclasses.is_dataclass(result)
    if result is not CompileReport:
        assert result.__dataclass_params__.frozen, f"{result.__name__} is a frozen value"
    for name, kind in stage_inputs(stage).items():
        assert isinstance(kind, type) and (kind in PROVIDED or dataclasses.is_dataclass(kind)), (name, kind)


def test_each_stage_takes_only_what_earlier_stages_produce():
    available = set(PROVIDED)
    for stage in STAGES:
        missing = set(stage_inputs(stage).values()) - available
        assert not missing, (stage.__name__, missing)
        result = stage_output(stage)
        assert result not in available, f"{stage.__name__} would shadow an earlier {result.__name__}"
        available.add(result)
    assert stage_output(STAGES[-1]) is CompileReport


def test_the_runner_hands_each_stage_the_results_its_annotations_name(tmp_path):
    @dataclasses.dataclass(frozen=True)
    class First:
        value: int

    @dataclasses.dataclass(frozen=True)
    class Second:
        total: int

    def first(recipe: Recipe) -> First:
        return First(recipe.epochs)

    def second(first: First, timings: stages.Timings) -> Second:
        assert "first_s" in timings.seconds  # earlier stages are timed
        return Second(first.value + 1)

    for fn in (first, second):  # annotations resolved in this test's namespace
        fn.__globals__.update(First=First, Second=Second)
    workspace = stages.Workspace(tmp_path, quiet=True)
    assert run_stages([first, second], Recipe(epochs=3), workspace) == Second(4)
    with pytest.raises(TypeError, match="stage second needs first: First"):
        run_stages([second], Recipe(), workspace)


def _results(tmp_path: Path):
    """Stage results made by hand (no pipeline ran): a dense and a compact model, logs, bench rows."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    compiled = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    rows = tuple(BenchRow(which, b, ms, ms * 1.1, ms * 1.2, b * 1e3 / ms, ms * 0.9)
                 for b in (1, 8) for which, ms in (("compiled", 0.5 * b), ("dense", 1.0 * b)))
    bench = BenchReport({"target": "onnxruntime"}, rows, {1: 2.0, 8: 2.0}, {1: 2.0, 8: 2.0})
    recipe = Recipe(method={"name": "halp", "interval": 3}, budget={"flops": 0.5}, epochs=2)
    return dict(recipe=recipe, data_name="digits", example=torch.randn(1, 1, 8, 8), dense=dense,
                dense_log=TrainLog([1.0, 0.5], [0.5, 0.9]), compiled=compiled,
                compiled_log=TrainLog([1.2, 0.6], [0.4, 0.85]), compiled_accuracy=0.85, agreement=1e-6,
                module_file="model.pt", sparsities={"0": 0.5, "3": 0.5},
                metrics=[{"step": 3, "iou": np.float64(0.5)}], table=None, bench=bench,
                dense_artifact=Artifact(tmp_path / "dense.onnx", "onnxruntime", ((1, 1, 8, 8),)),
                compiled_artifact=Artifact(tmp_path / "model.onnx", "onnxruntime", ((1, 1, 8, 8),)),
                timings={"recover_s": 1.5}, wall_s=3.0)


def test_the_report_document_is_built_from_stage_results(tmp_path):
    results = _results(tmp_path)
    document = build_document(**results)
    assert document["format"] == "spruce-compile-report"
    assert document["recipe"]["method"] == {"name": "halp", "interval": 3}  # options as given
    assert document["dense"]["accuracy"] == 0.9 and document["compiled"]["accuracy"] == 0.85
    assert document["dense"]["params"] == sum(p.numel() for p in results["dense"].parameters())
    assert document["compiled"]["macs"] < document["dense"]["macs"]
    assert document["layers"][0] == {"layer": "0", "dense_out": 8, "compiled_out": 4, "dense_in": 1,
                                     "compiled_in": 1, "zeros": 0.0}
    assert [row["speedup"] for row in document["bench"]["by_batch"]] == [2.0, 2.0]
    assert document["metrics"] == [{"step": 3, "iou": 0.5}]  # JSON-ready
    assert document["timings"] == {"recover_s": 1.5} and document["latency_table"] is None
    json.dumps(document)


def test_a_report_from_before_the_interleaved_bench_still_renders():
    """report.json files written before the bench carried robust figures (no robust_speedup,
    no bench_wall_ratio) render to markdown and the console summary."""
    from spruce.compiler import reporting

    document = build_document(**_results(Path("/nonexistent")))
    for row in document["bench"]["by_batch"]:
        for key in ("dense_robust_ms", "compiled_robust_ms", "robust_speedup"):
            del row[key]
    document["budget"] = {"kind": "latency", "fraction": 0.5, "batch_size": 1, "bench_ratio": 0.52,
                          "measured_ratio": 0.5, "in_band": True, "band": [0.45, 0.525]}
    markdown = reporting._markdown(document)
    assert "| 2.00x | - |" in markdown and "bench 0.520" in markdown and "(wall" not in markdown


def test_the_report_stage_writes_what_it_built(tmp_path):
    results = _results(tmp_path)
    sm_like = type("Sparse", (), {"sparsities": lambda self: results["sparsities"], "metrics": results["metrics"]})()
    report = stages.report(
        setup=stages.Setup(results["recipe"], None, type("Data", (), {"name": "digits"})(), results["dense"],
                           results["example"], {}),
        reference=stages.Reference(results["dense"], results["dense_log"]),
        profiled=stages.Profiled(None),
        sparsified=stages.Sparsified(results["recipe"].method, sm_like, 10),
        recovered=stages.Recovered(results["compiled_log"]),
        exported=stages.Exported(results["compiled"], 0.85, 1e-6, "model.pt"),
        built=stages.Built(results["dense_artifact"], results["compiled_artifact"]),
        benched=stages.Benched(results["bench"]), timings=stages.Timings(seconds={"recover_s": 1.5}),
        workspace=stages.Workspace(tmp_path, quiet=True))
    written = json.loads((tmp_path / "report.json").read_text())
    assert written == report.document
    expected = build_document(**{**results, "wall_s": written["wall_s"]})
    assert {k: v for k, v in written.items() if k not in ("plots", "evaluation", "budget", "recovery")} == expected
    assert written["budget"] == {"kind": "flops", "fraction": 0.5,
                                 "ratio": written["compiled"]["macs"] / written["dense"]["macs"]}
    assert written["recovery"]["mode"] == "distill" and written["evaluation"]["fidelity"] is None
    assert {"report.md", "widths.png", "accuracy_fps.png", "training.png"} <= {p.name for p in tmp_path.iterdir()}
    assert "halp(interval=3)" in (tmp_path / "report.md").read_text()
