"""``spruce compile`` calls its stages by name, in order, in one function; each stage has typed
inputs and a typed result; the report is assembled from their results."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import textwrap
import time
import typing
from pathlib import Path

import numpy as np
import pytest
import spruce
import torch
from spruce.compiler import pipeline
from spruce.compiler.recipes import Recipe
from spruce.compiler.recovery import RecoveryLog
from spruce.compiler.reporting import CompileReport, report_document, write_report
from spruce.compiler.results import (
    Benched,
    Built,
    Exported,
    Given,
    LMEvaluated,
    Profiled,
    Recovered,
    Reference,
    Setup,
    Sparsified,
    Timings,
    Workspace,
)
from spruce.compiler.training import TrainLog
from spruce.runtime.bench import BenchReport, BenchRow
from spruce.targets.base import Artifact
from torch import nn

# the stages of DESIGN.md's data flow, in its order (load and the dense reference first)
DOCUMENTED_ORDER = ["load_setup", "dense_reference", "capture_student", "profile_student", "sparsify_student",
                    "recover_student", "export_compiled", "build_artifacts", "evaluate_quantized", "bench_artifacts",
                    "evaluate_language_model", "write_report"]
CONTEXT = {"resolved": Recipe, "workspace": Workspace, "given": Given,
           "timings": Timings}  # what compile itself makes before the first stage


@functools.cache
def _compile_body() -> ast.FunctionDef:
    (function,) = ast.parse(textwrap.dedent(inspect.getsource(spruce.compile))).body
    assert isinstance(function, ast.FunctionDef) and function.name == "compile"
    return function


def _stage_calls() -> list[ast.Call]:
    """The calls in ``spruce.compile``'s body of spruce.compiler functions (not classes), in source order."""
    calls = [node for node in ast.walk(_compile_body()) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Name) and node.func.id in vars(pipeline)
             and inspect.isfunction(vars(pipeline)[node.func.id])
             and vars(pipeline)[node.func.id].__module__.startswith("spruce.compiler.")
             and node.func.id not in ("_resolve", "raise_if_missed")]  # before the first / after the last stage
    return sorted(calls, key=lambda node: (node.lineno, node.col_offset))


def test_compile_calls_the_stages_of_the_design_by_name_in_order():
    assert spruce.compile is pipeline.compile
    assert [call.func.id for call in _stage_calls()] == DOCUMENTED_ORDER


def test_the_order_test_sees_a_swapped_stage():
    """The check above reads the source: two stages swapped in the body are found."""
    source = inspect.getsource(pipeline.compile)
    swapped = source.replace("build_artifacts(", "TMP(").replace("bench_artifacts(", "build_artifacts(") \
        .replace("TMP(", "bench_artifacts(")
    names = [n.func.id for n in ast.walk(ast.parse(textwrap.dedent(swapped)))
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in DOCUMENTED_ORDER]
    assert names != DOCUMENTED_ORDER


@pytest.mark.parametrize("name", DOCUMENTED_ORDER)
def test_every_stage_has_typed_inputs_and_a_typed_result(name):
    stage = vars(pipeline)[name]
    hints = typing.get_type_hints(stage)
    parameters = inspect.signature(stage).parameters
    assert set(hints) == {*parameters, "return"}, "every parameter and the result are annotated"
    result = hints["return"]
    assert dataclasses.is_dataclass(result)
    if result is not CompileReport:
        assert result.__dataclass_params__.frozen, f"{result.__name__} is a frozen value"
    for parameter in parameters:
        kind = hints[parameter]
        assert isinstance(kind, type) and (kind in CONTEXT.values() or dataclasses.is_dataclass(kind)), (name, kind)


def test_each_stage_takes_only_what_earlier_stages_produced():
    """In compile's body every stage is called with the run's context or the results of
    earlier stages, each bound to a name of its type; no stage result shadows another."""
    available = dict(CONTEXT)
    for call in _stage_calls():
        stage = vars(pipeline)[call.func.id]
        hints = typing.get_type_hints(stage)
        parameters = list(inspect.signature(stage).parameters)
        assert not call.keywords and len(call.args) == len(parameters), call.func.id
        for parameter, argument in zip(parameters, call.args):
            assert isinstance(argument, ast.Name) and argument.id in available, (call.func.id, parameter)
            assert available[argument.id] is hints[parameter], (call.func.id, parameter, argument.id)
        result = hints["return"]
        assert result not in available.values(), f"{call.func.id} would shadow an earlier {result.__name__}"
        available[_bound_name(call)] = result
    assert typing.get_type_hints(vars(pipeline)[DOCUMENTED_ORDER[-1]])["return"] is CompileReport


def _bound_name(call: ast.Call) -> str:
    for node in ast.walk(_compile_body()):
        if isinstance(node, ast.Assign) and node.value is call:
            (target,) = node.targets
            return target.id
    raise AssertionError(f"the result of {call.func.id} is not bound to a name")


def test_each_stage_is_timed_under_its_name():
    timings = Timings()
    with timings.stage("capture"):
        time.sleep(0.01)
    assert set(timings.seconds) == {"capture_s"} and timings.seconds["capture_s"] >= 0.01
    timed = [node.items[0].context_expr.args[0].value for node in ast.walk(_compile_body())
             if isinstance(node, ast.With) and isinstance(node.items[0].context_expr, ast.Call)
             and getattr(node.items[0].context_expr.func, "attr", None) == "stage"]
    assert timed == ["load", "reference", "capture", "profile", "sparsify", "recover", "export", "build",
                     "evaluate_int8", "bench", "evaluate_lm"]


def _results(tmp_path: Path) -> dict:
    """Stage results made by hand (no pipeline ran): a dense and a compact model, logs, bench rows."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    compiled = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    rows = tuple(BenchRow(which, b, ms, ms * 1.1, ms * 1.2, b * 1e3 / ms, ms * 0.9)
                 for b in (1, 8) for which, ms in (("compiled", 0.5 * b), ("dense", 1.0 * b)))
    bench = BenchReport({"target": "onnxruntime"}, rows, {1: 2.0, 8: 2.0}, {1: 2.0, 8: 2.0})
    recipe = Recipe(method={"name": "halp", "interval": 3}, budget={"flops": 0.5}, epochs=2)
    sparsities, metrics = {"0": 0.5, "3": 0.5}, [{"step": 3, "iou": np.float64(0.5)}]
    sparse_like = type("Sparse", (), {"sparsities": lambda self: sparsities, "metrics": metrics})()
    return dict(
        setup=Setup(recipe, None, type("Data", (), {"name": "digits"})(), dense, torch.randn(1, 1, 8, 8), {}),
        reference=Reference(dense, TrainLog([1.0, 0.5], [0.5, 0.9])),
        profiled=Profiled(None),
        sparsified=Sparsified(recipe.method, sparse_like, 10),
        recovered=Recovered(TrainLog([1.2, 0.6], [0.4, 0.85]), RecoveryLog("distill", [1.2, 0.6], 20, 3)),
        exported=Exported(compiled, 0.85, 1e-6, "model.pt"),
        built=Built(Artifact(tmp_path / "dense.onnx", "onnxruntime", ((1, 1, 8, 8),)),
                    Artifact(tmp_path / "model.onnx", "onnxruntime", ((1, 1, 8, 8),))),
        benched=Benched(bench),
        evaluated=LMEvaluated(),
        timings=Timings(seconds={"recover_s": 1.5}))


def test_the_report_document_is_assembled_from_stage_results(tmp_path):
    results = _results(tmp_path)
    document = report_document(**results)
    assert document["format"] == "spruce-compile-report"
    assert document["recipe"]["method"] == {"name": "halp", "interval": 3}  # options as given
    assert document["data"] == "digits"
    # no held-out accuracy for the dense model: the last epoch of spruce's own training stands in
    assert document["dense"]["accuracy"] == 0.9 and document["compiled"]["accuracy"] == 0.85
    assert document["dense"]["params"] == sum(p.numel() for p in results["reference"].model.parameters())
    assert document["compiled"]["macs"] < document["dense"]["macs"]
    assert document["dense"]["artifact"] == "dense.onnx" and document["compiled"]["artifact"] == "model.onnx"
    assert document["layers"][0] == {"layer": "0", "dense_out": 8, "compiled_out": 4, "dense_in": 1,
                                     "compiled_in": 1, "zeros": 0.0}
    assert [row["speedup"] for row in document["bench"]["by_batch"]] == [2.0, 2.0]
    assert document["sparsity"] == {"0": 0.5, "3": 0.5}
    assert document["metrics"] == [{"step": 3, "iou": 0.5}]  # JSON-ready
    assert document["timings"] == {"recover_s": 1.5} and document["latency_table"] is None
    assert document["budget"] == {"kind": "flops", "fraction": 0.5,
                                  "ratio": document["compiled"]["macs"] / document["dense"]["macs"]}
    assert document["recovery"]["mode"] == "distill" and document["evaluation"]["fidelity"] is None
    json.dumps(document)


def test_a_report_from_before_the_interleaved_bench_still_renders():
    """report.json files written before the bench carried robust figures (version 1: speedup
    the medians', no robust figures, no bench_wall_ratio) render to markdown and the console
    summary, with their one figure said to be the medians'."""
    from spruce.compiler import reporting

    document = report_document(**_results(Path("/nonexistent")))
    document["version"] = 1
    for row in document["bench"]["by_batch"]:
        row["speedup"] = row.pop("median_speedup")
        for key in ("dense_robust_ms", "compiled_robust_ms"):
            del row[key]
    document["budget"] = {"kind": "latency", "fraction": 0.5, "batch_size": 1, "bench_ratio": 0.52,
                          "measured_ratio": 0.5, "in_band": True, "band": [0.45, 0.525]}
    markdown = reporting._markdown(document)
    assert "| 1 | 1.000 | 0.500 | 2.00x |" in markdown and "bench 0.520" in markdown and "(wall" not in markdown
    assert "wall-clock medians (this report predates the load-robust figure)" in markdown
    assert "2.00x" in CompileReport(document, Path("/nonexistent")).format_table()


def test_the_report_stage_writes_what_it_built(tmp_path):
    results = _results(tmp_path)
    report = write_report(**results, workspace=Workspace(tmp_path, quiet=True))
    written = json.loads((tmp_path / "report.json").read_text())
    assert written == report.document
    expected = report_document(**results)
    assert {k: v for k, v in written.items() if k not in ("plots", "wall_s")} == \
        {k: v for k, v in expected.items() if k != "wall_s"}
    assert {"report.md", "widths.png", "accuracy_fps.png", "training.png"} <= {p.name for p in tmp_path.iterdir()}
    assert set(written["plots"]) <= {p.name for p in tmp_path.iterdir()}
    assert "halp(interval=3)" in (tmp_path / "report.md").read_text()


# --- the report does not contradict itself (one speed-up, the method and loss as run, no empty panel) ---


def _loaded_bench() -> BenchReport:
    """Batch 8 on a loaded machine: the wall-clock medians say 5.17x, the load-robust latency 2.23x."""
    rows = (BenchRow("compiled", 1, 1.0, 1.1, 1.2, 1e3, 1.0), BenchRow("dense", 1, 1.5, 1.6, 1.7, 667.0, 1.5),
            BenchRow("compiled", 8, 1.0, 1.1, 1.2, 8e3, 1.0), BenchRow("dense", 8, 5.17, 5.5, 6.0, 1547.0, 2.23))
    return BenchReport({"target": "onnxruntime"}, rows, {1: 1.5, 8: 5.17}, {1: 1.5, 8: 2.23})


def test_the_report_gives_one_speedup_per_batch_size_the_load_robust_one(tmp_path):
    results = {**_results(tmp_path), "benched": Benched(_loaded_bench())}
    document = report_document(**results)
    (_, at_8) = document["bench"]["by_batch"]
    assert at_8["speedup"] == pytest.approx(2.23) and at_8["median_speedup"] == pytest.approx(5.17)
    from spruce.compiler import reporting

    for text in (reporting._markdown(document), CompileReport(document, tmp_path).format_table()):
        lines = text.splitlines()
        (row_8,) = [line for line in lines if line.lstrip("| ").startswith("8 ")]
        assert "2.23x" in row_8 and "5.17" not in row_8 and row_8.count("x") == 1, row_8
        (footnote,) = [line for line in lines if "5.17" in line]  # the median: once, in the footnote
        assert footnote.startswith("ms, FPS and speed-up: load-robust") and "5.17x at batch 8" in footnote
        assert text.count("2.23x") == 1


def test_the_header_names_the_method_only_when_it_ran(tmp_path):
    from spruce.compiler import reporting

    results = _results(tmp_path)
    ran = reporting._markdown(report_document(**results))
    assert "method `halp(interval=3)`" in ran.splitlines()[2]
    idle = {**results, "recovered": Recovered(results["recovered"].log, RecoveryLog("loss", [1.0], 20, 0))}
    header = reporting._markdown(report_document(**idle)).splitlines()[2]
    assert "halp" not in header and "no method ran" in header


def test_an_lm_header_names_activation_importance_and_the_token_bound(tmp_path):
    """A causal LM's channels are scored from calibration activations and its recovery is bounded
    by tokens, not epochs: the header says so (and says when no recovery ran)."""
    from spruce.compiler import reporting
    from spruce.compiler.activation_importance import ACTIVATION_CRITERION

    results = _results(tmp_path)
    lm = {"recover_tokens": 30_162, "recover_tokens_from": "10% of 301628 training tokens"}
    for mode, steps, says in (("distill", 30, "recovery bounded by 30,162 tokens (10% of 301628 training tokens): "
                                              "30 steps."),
                              ("none", 0, "no recovery training (one-shot).")):
        chosen = {**results, "sparsified": Sparsified(results["sparsified"].method, None, 10,
                                                      criterion=ACTIVATION_CRITERION),
                  "recovered": Recovered(results["recovered"].log, RecoveryLog(mode, [], steps, 0))}
        document = {**report_document(**chosen), "language_model": lm}
        header = reporting._markdown(document).splitlines()[2]
        assert f"selection one-shot by {ACTIVATION_CRITERION} (no method ran)" in header, header
        assert header.endswith(says) and "magnitude" not in header and "epochs" not in header, header
        assert document["recovery"]["criterion"] == ACTIVATION_CRITERION
    header = reporting._markdown(report_document(**results)).splitlines()[2]
    assert header.endswith("; 2 epochs."), header  # not an LM: the recipe's epochs, as before


def test_the_recovery_loss_is_named_as_used(tmp_path):
    """A cross-entropy recovery is not reported as distilled with KL; a distillation is."""
    from spruce.compiler import reporting
    from spruce.compiler.outputs import plan_outputs

    results = _results(tmp_path)
    dense, example = results["reference"].model, results["setup"].example
    plan = plan_outputs(dense(example), None, "model")
    document = report_document(**results)
    document["evaluation"]["outputs"] = plan.record()
    document["evaluation"]["fidelity"] = {"samples": 4, "per_output": {
        o["output"]: {"relative_l2": 0.1, "cosine": 0.99, "top1_agreement": 0.95} for o in plan.record()}}
    loss_used = {"mode": "loss", "loss": "cross-entropy on the labels (built in)", "steps": 20, "mask_updates": 3}
    for mode, recovery in (("loss", loss_used), ("distill", {**loss_used, "mode": "distill"})):
        document["recovery"] = recovery
        summary = "\n".join(reporting._summary_lines(document))
        assert ("distill loss" in summary) == (mode == "distill"), summary
        assert f"recovery: {mode} (" in summary


def test_no_plot_has_an_empty_panel(tmp_path):
    """One-shot channels (no sparsity, no prune-grow metrics) and no labels: the panels that
    would be empty are left out; every panel drawn has data."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from spruce.compiler import plots

    results = _results(tmp_path)
    empty = {**results, "sparsified": Sparsified(results["setup"].recipe.method, None, 10),
             "reference": Reference(results["reference"].model, TrainLog()),
             "recovered": Recovered(TrainLog([1.2, 0.6], []), RecoveryLog("loss", [1.2, 0.6], 20, 0)),
             "exported": Exported(results["exported"].model, None, None, "model.pt")}
    document = report_document(**empty)
    assert document["sparsity"] == {} and document["metrics"] == []
    panels = {}
    for name, plot in (("widths", plots._plot_widths), ("accuracy_fps", plots._plot_accuracy_fps),
                       ("training", plots._plot_training)):
        figure = plot(document)
        if figure is not None:
            axes = [axis for axis in figure.axes if axis.get_label() != "<colorbar>"]
            assert all(axis.has_data() for axis in axes), name
            panels[name] = len(axes)
    assert panels == {"widths": 1, "accuracy_fps": 1, "training": 1}  # widths, FPS, recovery loss
    full = report_document(**results)  # with sparsities, accuracies and curves: both panels each
    assert [len(plot(full).axes) for plot in (plots._plot_widths, plots._plot_accuracy_fps)] == [2, 2]
    written = write_report(**empty, workspace=Workspace(tmp_path, quiet=True)).document["plots"]
    assert set(written) == {"widths.png", "accuracy_fps.png", "training.png"}


def test_the_latency_heat_map_shows_a_pruned_layer(tmp_path):
    """The heat map shows the most expensive *pruned* profiled layer, not the most expensive
    layer; with no pruned layer it is left out."""
    from spruce.compiler import plots

    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 16, 1), nn.ReLU(),
                          nn.Conv2d(16, 8, 1)).eval()
    table = spruce.profile(dense, torch.randn(1, 3, 32, 32), "onnxruntime", step=8)
    assert {"0", "2", "4"} <= set(table.layers)
    most = max(table.layers, key=lambda n: table.isolated_ms(n, table.layers[n].in_channels,
                                                             table.layers[n].out_channels))
    pruned = next(name for name in ("2", "4") if name != most)
    document = {"layers": [
        {"layer": name, "dense_in": table.layers[name].in_channels, "dense_out": table.layers[name].out_channels,
         "compiled_in": table.layers[name].in_channels,
         "compiled_out": table.layers[name].out_channels // (2 if name == pruned else 1)} for name in table.layers]}
    assert plots.pruned_layer(table, document) == pruned
    figure = plots._plot_table(table, document)
    assert figure.axes[0].get_title().startswith(f"latency table: {pruned} (")
    for row in document["layers"]:
        row["compiled_out"] = row["dense_out"]
    assert plots.pruned_layer(table, document) is None and plots._plot_table(table, document) is None


def test_a_guessed_kind_is_warned_once_on_the_console(tmp_path):
    """The console says a guessed kind when the model loads; its table then leaves the warning
    out (report.md and a quiet console's table keep it)."""
    from spruce.compiler import reporting
    from spruce.compiler.outputs import plan_outputs

    results = _results(tmp_path)
    plan = plan_outputs(results["reference"].model(results["setup"].example), None, "model")
    assert plan.warnings()  # the (N, C) scores' kind is guessed
    document = report_document(**results)
    document["evaluation"]["outputs"] = plan.record()
    report = CompileReport(document, tmp_path)
    warning = f"warning: output {plan.record()[0]['output']}"
    assert report.format_table().count(warning) == 1 and reporting._markdown(document).count(warning) == 1
    assert warning not in report.format_table(warn_guessed=False)
