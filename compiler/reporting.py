"""The report of ``spruce compile``, its last stage :func:`write_report`: the document
assembled from the stage results (:func:`report_document`) and the files it is written to
(``report.json``, ``report.md`` and the plots of :mod:`spruce.compiler.plots`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..api.stats import count_macs, count_params
from ..targets.files import atomic_write_text
from .bench_rows import latency_ms, speedup
from .channel_methods import FinalCheck, method_activity
from .floors import check_floors, floor_line, mark_manifest, report_lines
from .lm_report import lm_lines
from .plots import write_plots
from .precision import precision_lines, precision_record
from .results import (
    Benched,
    Built,
    Exported,
    LMEvaluated,
    Profiled,
    Quantized,
    Recovered,
    Reference,
    Setup,
    Sparsified,
    Timings,
    Workspace,
)

NOT_QUANTIZED = Quantized()  # fp32 ships: no INT8 artifacts to report

__all__ = ["CompileReport", "report_document", "write_report"]

REPORT_FORMAT = "spruce-compile-report"
REPORT_VERSION = 2  # 2: by_batch's speedup is the load-robust one (median_speedup the wall-clock median's)


@dataclass
class CompileReport:
    """What ``compile`` produced: the document written to ``report.json``, and the folder."""

    document: dict[str, Any]
    out_dir: Path

    def format_table(self, warn_guessed: bool = True) -> str:
        """Accuracy, latency and FPS of dense vs compiled, one row per batch size (one
        speed-up each, the load-robust one; the wall-clock medians' in a footnote), then the
        summary; ``warn_guessed=False`` leaves out the guessed-kind warnings (for a console
        that printed them when the model loaded)."""
        doc = self.document
        lines = [f"{'':10s} {'accuracy':>9s} {'params':>10s} {'MACs':>12s}",
                 f"{'dense':10s} {_number(doc['dense']['accuracy']):>9s} {doc['dense']['params']:10d} "
                 f"{doc['dense']['macs']:12d}",
                 f"{'compiled':10s} {_number(doc['compiled']['accuracy']):>9s} {doc['compiled']['params']:10d} "
                 f"{doc['compiled']['macs']:12d}", "",
                 f"{'batch':>5s} {'dense ms':>9s} {'compiled ms':>12s} {'dense FPS':>10s} {'compiled FPS':>13s} "
                 f"{'speed-up':>9s}"]
        for row in doc["bench"]["by_batch"]:
            dense_ms, compiled_ms = latency_ms(row, "dense"), latency_ms(row, "compiled")
            lines.append(f"{row['batch_size']:5d} {dense_ms:9.3f} {compiled_ms:12.3f} "
                         f"{row['batch_size'] * 1e3 / dense_ms:10.1f} {row['batch_size'] * 1e3 / compiled_ms:13.1f} "
                         f"{speedup(row):8.2f}x")
        lines += _bench_footnote(doc["bench"]["by_batch"])
        lines += _summary_lines(doc, warn_guessed)
        return "\n".join(lines)


def write_report(setup: Setup, reference: Reference, profiled: Profiled, sparsified: Sparsified,
                 recovered: Recovered, exported: Exported, built: Built, benched: Benched, evaluated: LMEvaluated,
                 timings: Timings, workspace: Workspace, quantized: Quantized = NOT_QUANTIZED) -> CompileReport:
    """The last stage: the report document assembled from the stage results
    (:func:`report_document`), written as report.json, report.md and its plots into the
    workspace's folder (each file atomically)."""
    document = report_document(setup, reference, profiled, sparsified, recovered, exported, built, benched, evaluated,
                               timings, quantized)
    if "floor" in document:
        mark_manifest(built.compiled.manifest_path, document["floor"])
    document["plots"] = write_plots(document, profiled.table, workspace.out_dir)
    atomic_write_text(workspace.out_dir / "report.json", json.dumps(document, indent=2) + "\n")
    atomic_write_text(workspace.out_dir / "report.md", _markdown(document))
    return CompileReport(document, workspace.out_dir)


def report_document(setup: Setup, reference: Reference, profiled: Profiled, sparsified: Sparsified,
                    recovered: Recovered, exported: Exported, built: Built, benched: Benched, evaluated: LMEvaluated,
                    timings: Timings, quantized: Quantized = NOT_QUANTIZED) -> dict[str, Any]:
    """The report document (what ``report.json`` holds, JSON-ready) from the stage results:
    recipe and data, dense and compiled models (accuracy, per-epoch curves, params, MACs,
    artifacts), per-layer widths and sparsities, the latency table's predictions, the bench
    per batch size (ms, FPS), the stage timings (seconds), and the evaluation, budget and
    recovery records; with INT8 shipping (``quantized``), the ``precision`` record
    (:func:`~spruce.compiler.precision.precision_record`) and the floor judged on the INT8 artifact."""
    recipe, example, bench, table = setup.recipe, setup.example, benched.report, profiled.table
    dense, compiled, sparse = reference.model, exported.model, sparsified.sparse
    dense_accuracy = reference.accuracy  # without held-out labels: the last epoch of spruce's own training, if any
    if dense_accuracy is None and reference.log.accuracy:
        dense_accuracy = reference.log.accuracy[-1]
    by_batch = []
    for batch_size in recipe.bench_batch_sizes:
        d, c = bench.row("dense", batch_size), bench.row("compiled", batch_size)
        by_batch.append({"batch_size": batch_size, "dense_ms": d.median_ms, "compiled_ms": c.median_ms,
                         "dense_p90_ms": d.p90_ms, "compiled_p90_ms": c.p90_ms, "dense_p99_ms": d.p99_ms,
                         "compiled_p99_ms": c.p99_ms, "dense_fps": d.images_per_s, "compiled_fps": c.images_per_s,
                         "dense_robust_ms": d.robust_ms, "compiled_robust_ms": c.robust_ms,
                         "speedup": d.robust_ms / c.robust_ms, "median_speedup": d.median_ms / c.median_ms})
    return {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "recipe": recipe.to_dict(),
        "model": _model_text(setup),
        "data": setup.data.name,
        "dense": {"accuracy": dense_accuracy, "accuracy_per_epoch": reference.log.accuracy,
                  "loss_per_epoch": reference.log.loss, "params": int(count_params(dense)),
                  "macs": int(count_macs(dense, (example,))), "artifact": built.dense.path.name},
        "compiled": {"accuracy": exported.accuracy, "accuracy_per_epoch": recovered.log.accuracy,
                     "loss_per_epoch": recovered.log.loss, "params": int(count_params(compiled)),
                     "macs": int(count_macs(compiled, (example,))), "artifact": built.compiled.path.name,
                     "max_abs_diff_vs_sparse_model": exported.agreement, "module_file": exported.module_file},
        "layers": _layer_widths(dense, compiled),
        "sparsity": dict(sparse.sparsities()) if sparse is not None else {},
        "metrics": _jsonable(list(sparse.metrics)) if sparse is not None else [],
        "latency_table": None if table is None else {
            "file": "latency_table.json", "dense_predicted_ms": table.dense_ms(),
            "compiled_predicted_ms": table.predict_model(compiled),
            "precision": table.fingerprint.get("precision", "fp32")},
        "bench": {"fingerprint": bench.fingerprint, "warmup": recipe.bench_warmup, "iters": recipe.bench_iters,
                  "by_batch": by_batch},
        "timings": dict(timings.seconds),
        "wall_s": time.perf_counter() - timings.started,
        "evaluation": _jsonable(_evaluation_record(setup, reference, exported)),
        **({"budget": _jsonable(budget)} if (budget := _budget_record(setup, reference, sparsified, profiled,
                                                                     exported, benched, recovered.final,
                                                                     evaluated)) else {}),
        "recovery": _jsonable(_recovery_record(setup, sparsified, recovered)),
        **({"precision": _jsonable(record)} if (record := precision_record(setup, reference, exported, built,
                                                                            benched, quantized)) else {}),
        **({"floor": _jsonable(floor)} if (floor := _floor_record(setup, exported, quantized)) is not None else {}),
        **({"language_model": _jsonable(_lm_record(setup, built))} if setup.is_lm else {}),
        **({"lm_evaluation": _jsonable(evaluated.record)} if evaluated.record is not None else {}),
    }


def _lm_record(setup: Setup, built: Built) -> dict[str, Any]:
    """A causal LM's extra artifacts, its uniform counts and its recovery token budget."""
    return {**(built.language_model or {}), "uniform": setup.uniform, "recover_tokens": setup.recover_tokens,
            "recover_tokens_from": setup.recover_tokens_from}


def _floor_record(setup: Setup, exported: Exported, quantized: Quantized = NOT_QUANTIZED) -> dict[str, Any] | None:
    """The fidelity floor judged on the compiled model (:mod:`spruce.compiler.floors`), on the
    INT8 artifact as ONNX Runtime runs it when INT8 ships; None without an output plan.
    :func:`write_report` records it in the compiled artifact's manifest."""
    if setup.plan is None:
        return None
    judged = quantized.compiled_int8 if quantized.compiled_int8 is not None else exported
    per_output = judged.fidelity.per_output if judged.fidelity else {}
    return check_floors(setup.recipe.floor, setup.plan, per_output, judged.metrics).record()


def _median_speedup(row: Mapping[str, Any]) -> float | None:
    if "median_speedup" in row:
        return row["median_speedup"]
    return row["speedup"] if "robust_speedup" in row else None


def _bench_footnote(rows: list[Mapping[str, Any]]) -> list[str]:
    """The footnote under a bench table: what the speed-up is, and the wall-clock medians'."""
    if not rows or "dense_robust_ms" not in rows[0]:
        return ["", "speed-up: wall-clock medians (this report predates the load-robust figure)"]
    medians = ", ".join(f"{_median_speedup(r):.2f}x at batch {r['batch_size']}" for r in rows
                        if _median_speedup(r) is not None)
    return ["", "ms, FPS and speed-up: load-robust latency (run-queue waiting excluded, outliers rejected); "
            f"p99 on wall-clock time; the wall-clock medians' speed-up: {medians}"]


def method_ran(doc: Mapping[str, Any]) -> bool:
    """Did the recipe's method run (update masks or channels during recovery)? A report
    without a recovery record (older ones) is taken to say it did."""
    recovery = doc.get("recovery")
    return recovery is None or recovery.get("mask_updates", 0) > 0


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _summary_lines(doc: dict[str, Any], warn_guessed: bool = True) -> list[str]:
    """Budget hit, fidelity and recovery, for the console table and report.md."""
    lines: list[str] = []
    budget = doc.get("budget")
    if budget:
        text = f"budget {budget['kind']} {budget['fraction']:g} of dense"
        if "batch_size" in budget:
            text += f" at batch {budget['batch_size']}"
        if "ratio" in budget:
            text += f": {budget['ratio']:.3f} of dense"
        if "measured_ratio" in budget:
            low, high = budget["band"]
            text += (f": measured {budget['measured_ratio']:.3f} (band {low:.3f}-{high:.3f}, "
                     f"{'met' if budget['in_band'] else 'NOT met'}); bench {budget['bench_ratio']:.3f}")
            if "bench_wall_ratio" in budget:  # reports written before the bench interleaved have none
                text += f" (wall {budget['bench_wall_ratio']:.3f})"
        if budget.get("dense_predicted_ms") is not None:
            text += (f"; predicted {budget['compiled_predicted_ms']:.3f} / {budget['dense_predicted_ms']:.3f} ms, "
                     f"measured {budget.get('compiled_measured_ms', float('nan')):.3f} / "
                     f"{budget.get('dense_measured_ms', float('nan')):.3f} ms (compiled / dense)")
        lines += ["", text]
    lines += precision_lines(doc.get("precision"))
    lines += report_lines(doc.get("evaluation"), doc.get("floor"),
                          distilled=(doc.get("recovery") or {}).get("mode", "distill") == "distill",
                          warn_guessed=warn_guessed)
    recovery = doc.get("recovery")
    if recovery:
        lines += ["", f"recovery: {recovery['mode']} ({recovery['loss']}), {recovery.get('steps', 0)} steps, "
                  f"{recovery.get('mask_updates', 0)} mask updates"]
        if isinstance(recovery.get("method"), Mapping):  # a method re-selected channels during recovery
            method, final = recovery["method"], recovery.get("final_check") or {}
            text = (f"channels re-selected by method {method['method']} ({method['criterion']}; "
                    f"{recovery.get('selections', 0)} knapsack selections, "
                    f"{recovery.get('importance_fallbacks', 0)} scored by the zero-gradient fallback "
                    f"{method['zero_gradient_fallback']})")
            if final.get("method_ratio") is not None:
                text += (f"; its final channels {final['kind']} {final['method_ratio']:.3f} of dense"
                         + (f", re-aimed to {final['ratio']:.3f}" if final.get("re_aimed") else ""))
            lines.append(text)
    return lines


def _layer_widths(dense: nn.Module, compiled: nn.Module) -> list[dict[str, Any]]:
    kinds = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    compiled_modules = dict(compiled.named_modules())
    rows = []
    for name, module in dense.named_modules():
        if isinstance(module, kinds) and name in compiled_modules:
            small = compiled_modules[name]
            rows.append({"layer": name, "dense_out": int(module.weight.shape[0]),
                         "compiled_out": int(small.weight.shape[0]), "dense_in": int(module.weight.shape[1]),
                         "compiled_in": int(small.weight.shape[1]),
                         "zeros": float((small.weight == 0).float().mean())})
    return rows


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


def _method_text(method: Mapping[str, Any]) -> str:
    options = ", ".join(f"{k}={v}" for k, v in method.items() if k != "name")
    return f"{method['name']}({options})" if options else method["name"]


def _recovery_length(doc: Mapping[str, Any]) -> str:
    """What bounded recovery, for the header: none ran, a causal LM's token budget (and the
    steps it made), or the recipe's epochs."""
    recovery, lm = doc.get("recovery") or {}, doc.get("language_model") or {}
    if recovery.get("mode") == "none":
        return "no recovery training (one-shot)"
    if lm.get("recover_tokens") is not None:
        return (f"recovery bounded by {lm['recover_tokens']:,} tokens ({lm.get('recover_tokens_from')}): "
                f"{recovery.get('steps', 0)} steps")
    return f"{doc['recipe']['epochs']} epochs"


def _model_text(setup: Any) -> str:
    """What the report calls the compiled model: the recipe's model spec, the embedded default,
    or a live model's class."""
    if setup.recipe.model is not None:
        return setup.recipe.model
    return "embedded digits CNN" if setup.default_model else f"live {setup.model_name}"


def _markdown(doc: dict[str, Any]) -> str:
    recipe = doc["recipe"]
    missed = floor_line(doc.get("floor"))
    lines = [*([f"**FAILED: {missed}** (the artifacts are kept for inspection)", ""] if missed else []),
             "# spruce compile report", "",
             f"Model: {doc.get('model') or recipe['model'] or 'embedded digits CNN'} on {doc['data']}; "
             f"target `{recipe['target']}`; "
             + (f"method `{_method_text(recipe['method'])}`" if method_ran(doc)
                else f"selection one-shot by {(doc.get('recovery') or {}).get('criterion', 'weight magnitude')} "
                     "(no method ran)")
             + f", structure `{recipe['structure']}`, "
             + (f"budget {recipe['budget']}" if recipe["budget"] else f"sparsity {recipe['sparsity']}")
             + f"; {_recovery_length(doc)}.", "",
             "| | accuracy | params | MACs | artifact |", "|---|---|---|---|---|"]
    for which in ("dense", "compiled"):
        part = doc[which]
        lines.append(f"| {which} | {_number(part['accuracy'])} | {part['params']:,} | {part['macs']:,} | "
                     f"`{part['artifact']}` |")
    lines += ["", f"Latency on `{recipe['target']}` ({doc['bench']['iters']} runs after {doc['bench']['warmup']} "
              "warm-ups, dense and compiled calls interleaved):", "",
              "| batch | dense ms | compiled ms | speed-up | dense FPS | compiled FPS | dense p99 ms "
              "| compiled p99 ms |",
              "|---|---|---|---|---|---|---|---|"]
    for r in doc["bench"]["by_batch"]:
        dense_ms, compiled_ms = latency_ms(r, "dense"), latency_ms(r, "compiled")
        lines.append(f"| {r['batch_size']} | {dense_ms:.3f} | {compiled_ms:.3f} | {speedup(r):.2f}x | "
                     f"{r['batch_size'] * 1e3 / dense_ms:.1f} | {r['batch_size'] * 1e3 / compiled_ms:.1f} | "
                     f"{r['dense_p99_ms']:.3f} | {r['compiled_p99_ms']:.3f} |")
    lines += _bench_footnote(doc["bench"]["by_batch"])
    if doc.get("latency_table"):
        lt = doc["latency_table"]
        at = f" at {lt['precision']}" if lt.get("precision", "fp32") != "fp32" or doc.get("precision") else ""
        lines += ["", f"Latency table (`{lt['file']}`{at}): dense predicted {lt['dense_predicted_ms']:.3f} ms, "
                  f"compiled predicted {lt['compiled_predicted_ms']:.3f} ms."]
    lines += _summary_lines(doc)
    lines += lm_lines(doc.get("lm_evaluation"))
    lines += ["", "| layer | in (dense → compiled) | out (dense → compiled) |", "|---|---|---|"]
    lines += [f"| {r['layer']} | {r['dense_in']} → {r['compiled_in']} | {r['dense_out']} → {r['compiled_out']} |"
              for r in doc["layers"]]
    lines += ["", *[f"![{name}]({name})" for name in doc.get("plots", [])], "",
              "Machine: " + ", ".join(f"{k} {v}" for k, v in doc["bench"]["fingerprint"].items()), ""]
    return "\n".join(lines)


def _evaluation_record(setup: Setup, reference: Reference, exported: Exported) -> dict[str, Any]:
    return {"held_out_inputs": exported.held_out, "held_out_disjoint_from_recovery": True,
            "outputs": setup.plan.record() if setup.plan else [],
            "fidelity": exported.fidelity.record() if exported.fidelity else None,
            "dense_metrics": reference.metrics, "compiled_metrics": exported.metrics,
            "evaluate": setup.evaluate.where if setup.evaluate else None}


def _budget_record(setup: Setup, reference: Reference, sparsified: Sparsified, profiled: Profiled,
                   exported: Exported, benched: Benched, final: FinalCheck | None = None,
                   evaluated: LMEvaluated | None = None) -> dict[str, Any] | None:
    recipe = setup.recipe
    if not recipe.budget:
        return None
    ((kind, fraction),) = recipe.budget.items()
    record: dict[str, Any] = {"kind": kind, "fraction": fraction}
    if kind == "decode":  # per-token decode latency at batch 1, key/value cache (not the target's bench)
        return _decode_budget_record(record, sparsified, evaluated)
    if kind != "latency":
        from ..api.stats import count_macs, count_params

        count = count_params if kind == "params" else lambda m: count_macs(m, (setup.example,))
        record["ratio"] = count(exported.model) / max(count(reference.model), 1)
        return record
    record["batch_size"] = recipe.budget_batch_size
    dense_row = benched.report.row("dense", recipe.budget_batch_size)
    compiled_row = benched.report.row("compiled", recipe.budget_batch_size)
    # the built artifacts timed again, interleaved: on the budget's statistic (run-queue waiting
    # excluded, as every latency measurement of compile) and on plain wall-clock medians
    record["bench_ratio"] = compiled_row.robust_ms / dense_row.robust_ms
    record["bench_wall_ratio"] = compiled_row.median_ms / dense_row.median_ms
    if profiled.table is not None:
        record["dense_predicted_ms"] = profiled.table.dense_ms()
        record["compiled_predicted_ms"] = profiled.table.predict_model(exported.model)
        record["table_precision"] = profiled.table.fingerprint.get("precision", "fp32")  # the costs selection saw
    if sparsified.selection is not None:
        selection = sparsified.selection.summary()
        record.update(measured_ratio=selection["ratio"], in_band=selection["in_band"],
                      dense_measured_ms=selection["measured_dense_ms"],
                      compiled_measured_ms=selection["measured_ms"], attempts=selection["attempts"],
                      band=[0.9 * fraction, 1.05 * fraction], timed_precision=selection["precision"],
                      dense_precision=selection["dense_precision"])
    if final is not None:  # a method re-selected during recovery: what ships is its final selection, measured
        record.update(measured_ratio=final.ratio, in_band=final.in_band, dense_measured_ms=final.measured_dense_ms,
                      compiled_measured_ms=final.measured_ms, final_check=final.record(),
                      selection_before_recovery_ratio=record.get("measured_ratio"))
    return record


def _decode_budget_record(record: dict[str, Any], sparsified: Sparsified,
                          evaluated: LMEvaluated | None) -> dict[str, Any]:
    """A decode budget: the selection's measured per-token decode ratio and band, and the LM
    evaluation's decode ratio at batch 1 of what ships (``bench_ratio``), dense and compiled
    interleaved in both."""
    fraction = record["fraction"]
    record["batch_size"] = 1
    if sparsified.selection is not None:
        selection = sparsified.selection.summary()
        record.update(measured_ratio=selection["ratio"], in_band=selection["in_band"],
                      dense_measured_ms=selection["measured_dense_ms"], compiled_measured_ms=selection["measured_ms"],
                      attempts=selection["attempts"], band=[0.9 * fraction, 1.05 * fraction], unit="ms per token")
    decode_ratio = (((evaluated.record if evaluated else None) or {}).get("decode_ratio") or {}).get("1")
    if decode_ratio is not None:
        record["bench_ratio"] = decode_ratio
    elif "measured_ratio" in record:
        record["bench_ratio"] = record["measured_ratio"]
    return record


def _recovery_record(setup: Setup, sparsified: Sparsified, recovered: Recovered) -> dict[str, Any]:
    log = recovered.recovery
    record = {"mode": setup.mode, "loss": setup.loss_text, **(log.record() if log else {})}
    if sparsified.drive is not None:
        drive = sparsified.drive
        record["selection"] = (
            f"channels re-selected during recovery by method {drive.method} under the budget (its knapsack given "
            f"{drive.aim:.4g} of the predicted dense cost), importance {drive.criterion} from the trained weights"
            + (f"; where every gradient is exactly zero (the student still equals its teacher) the channels are "
               f"scored by {drive.fallback} instead" if drive.fallback else "")
            + "; the final selection checked against the budget as measured")
        record.update(method=drive.record(), **method_activity(sparsified.sparse),
                      final_check=recovered.final.record() if recovered.final is not None else None)
        record["fidelity_before_recovery"] = recovered.before.record() if recovered.before is not None else None
        return record
    record["criterion"] = sparsified.criterion
    record["selection"] = (f"channels chosen once from the trained weights by {sparsified.importance}; gradient "
                           f"importance is exactly zero when the student equals its teacher, so {sparsified.criterion} "
                           "is the criterion; the method does not re-select channels during recovery"
                           if sparsified.sparse is None else
                           f"masks initialised by weight magnitude, then method {sparsified.method.name}'s "
                           "updates during recovery")
    if sparsified.sparse is None:
        record["mask_updates"] = 0
    # what recovery bought: the selected model against dense on the same held-out inputs, before it
    record["fidelity_before_recovery"] = recovered.before.record() if recovered.before is not None else None
    return record

