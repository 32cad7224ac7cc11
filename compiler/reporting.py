"""The report of ``spruce compile``: the document built from the stage results, and the
files it is written to (``report.json``, ``report.md`` and its plots, PNG).

:func:`build_document` is a pure function of the stages' results (see
:mod:`spruce.compiler.stages`); :func:`write_reports` writes it. Plots (matplotlib, Agg
backend): per-layer width (dense vs compiled) and sparsity, accuracy and FPS vs dense, IoU
and survival of grown units over training, and the latency-table heatmap of the most
expensive layer when a latency table was used.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..api.stats import count_macs, count_params
from ..runtime.bench import BenchReport
from ..targets.base import Artifact
from ..targets.files import atomic_path, atomic_write_text
from .floors import floor_line, report_lines
from .recipes import Recipe
from .training import TrainLog

__all__ = ["CompileReport", "build_document", "write_reports"]

REPORT_FORMAT = "spruce-compile-report"
REPORT_VERSION = 1


@dataclass
class CompileReport:
    """What ``compile`` produced: the document written to ``report.json``, and the folder."""

    document: dict[str, Any]
    out_dir: Path

    def format_table(self) -> str:
        """Accuracy, latency and FPS of dense vs compiled, one row per batch size."""
        doc = self.document
        lines = [f"{'':10s} {'accuracy':>9s} {'params':>10s} {'MACs':>12s}",
                 f"{'dense':10s} {_number(doc['dense']['accuracy']):>9s} {doc['dense']['params']:10d} "
                 f"{doc['dense']['macs']:12d}",
                 f"{'compiled':10s} {_number(doc['compiled']['accuracy']):>9s} {doc['compiled']['params']:10d} "
                 f"{doc['compiled']['macs']:12d}", "",
                 f"{'batch':>5s} {'dense ms':>9s} {'compiled ms':>12s} {'dense FPS':>10s} {'compiled FPS':>13s} "
                 f"{'speed-up':>9s}"]
        for row in doc["bench"]["by_batch"]:
            lines.append(f"{row['batch_size']:5d} {row['dense_ms']:9.3f} {row['compiled_ms']:12.3f} "
                         f"{row['dense_fps']:10.1f} {row['compiled_fps']:13.1f} {row['speedup']:8.2f}x")
        lines += _summary_lines(doc)
        return "\n".join(lines)


def build_document(*, recipe: Recipe, data_name: str, example: torch.Tensor, dense: nn.Module, dense_log: TrainLog,
                   compiled: nn.Module, compiled_log: TrainLog, compiled_accuracy: float, agreement: float,
                   module_file: str | None, sparsities: Mapping[str, float], metrics: Sequence[dict],
                   table: Any, bench: BenchReport, dense_artifact: Artifact, compiled_artifact: Artifact,
                   timings: Mapping[str, float], wall_s: float, dense_accuracy: float | None | str = "log",
                   evaluation: Mapping[str, Any] | None = None, budget: Mapping[str, Any] | None = None,
                   recovery: Mapping[str, Any] | None = None, floor: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The report document (what ``report.json`` holds) from the stages' results.

    ``dense_accuracy`` (None without labels; by default the last of ``dense_log``),
    ``evaluation`` (outputs and their losses, fidelity on held-out inputs, user metrics),
    ``budget`` (predicted and measured latency of both models, the measured ratio) and
    ``recovery`` (mode, loss, steps, mask updates) and ``floor`` (the fidelity floor's checks,
    :mod:`spruce.compiler.floors`) come from compile's stages."""
    if dense_accuracy == "log":
        dense_accuracy = dense_log.accuracy[-1] if dense_log.accuracy else None
    by_batch = []
    for batch_size in recipe.bench_batch_sizes:
        d, c = bench.row("dense", batch_size), bench.row("compiled", batch_size)
        by_batch.append({"batch_size": batch_size, "dense_ms": d.median_ms, "compiled_ms": c.median_ms,
                         "dense_p90_ms": d.p90_ms, "compiled_p90_ms": c.p90_ms, "dense_p99_ms": d.p99_ms,
                         "compiled_p99_ms": c.p99_ms, "dense_fps": d.images_per_s, "compiled_fps": c.images_per_s,
                         "speedup": d.median_ms / c.median_ms, "dense_robust_ms": d.robust_ms,
                         "compiled_robust_ms": c.robust_ms, "robust_speedup": d.robust_ms / c.robust_ms})
    return {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "recipe": recipe.to_dict(),
        "data": data_name,
        "dense": {"accuracy": dense_accuracy, "accuracy_per_epoch": dense_log.accuracy,
                  "loss_per_epoch": dense_log.loss, "params": int(count_params(dense)),
                  "macs": int(count_macs(dense, (example,))), "artifact": dense_artifact.path.name},
        "compiled": {"accuracy": compiled_accuracy, "accuracy_per_epoch": compiled_log.accuracy,
                     "loss_per_epoch": compiled_log.loss, "params": int(count_params(compiled)),
                     "macs": int(count_macs(compiled, (example,))), "artifact": compiled_artifact.path.name,
                     "max_abs_diff_vs_sparse_model": agreement, "module_file": module_file},
        "layers": _layer_widths(dense, compiled),
        "sparsity": dict(sparsities),
        "metrics": _jsonable(list(metrics)),
        "latency_table": None if table is None else {
            "file": "latency_table.json", "dense_predicted_ms": table.dense_ms(),
            "compiled_predicted_ms": table.predict_model(compiled)},
        "bench": {"fingerprint": bench.fingerprint, "warmup": recipe.bench_warmup, "iters": recipe.bench_iters,
                  "by_batch": by_batch},
        "timings": dict(timings),
        "wall_s": wall_s,
        **({"evaluation": _jsonable(dict(evaluation))} if evaluation is not None else {}),
        **({"budget": _jsonable(dict(budget))} if budget is not None else {}),
        **({"recovery": _jsonable(dict(recovery))} if recovery is not None else {}),
        **({"floor": _jsonable(dict(floor))} if floor is not None else {}),
    }


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _summary_lines(doc: dict[str, Any]) -> list[str]:
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
    lines += report_lines(doc.get("evaluation"), doc.get("floor"),
                          distilled=(doc.get("recovery") or {}).get("mode", "distill") == "distill")
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


def write_reports(document: dict[str, Any], table: Any, out_dir: Path) -> None:
    """Write report.json, the PNG plots and report.md into ``out_dir`` (each file atomically)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    plots = {
        "widths.png": _plot_widths(document),
        "accuracy_fps.png": _plot_accuracy_fps(document),
        "training.png": _plot_training(document),
    }
    if table is not None:
        plots["latency_table.png"] = _plot_table(table)
    written = []
    for name, figure in plots.items():
        if figure is None:
            continue
        with atomic_path(out_dir / name, suffix=".png") as temp:
            figure.savefig(temp, dpi=110, bbox_inches="tight")
        written.append(name)
        import matplotlib.pyplot as plt

        plt.close(figure)
    document["plots"] = written
    atomic_write_text(out_dir / "report.json", json.dumps(document, indent=2) + "\n")
    atomic_write_text(out_dir / "report.md", _markdown(document))


def _plot_widths(doc: dict[str, Any]):
    import matplotlib.pyplot as plt

    layers = doc["layers"]
    if not layers:
        return None
    names = [row["layer"] for row in layers]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 0.35 * len(names) + 2))
    y = np.arange(len(names))
    left.barh(y, [row["dense_out"] for row in layers], color="#c8c8c8", label="dense")
    left.barh(y, [row["compiled_out"] for row in layers], color="#2a7ab9", label="compiled")
    left.set_yticks(y, names)
    left.invert_yaxis()
    left.set_xlabel("output channels")
    left.legend()
    sparsity = doc["sparsity"]
    right.barh(np.arange(len(sparsity)), list(sparsity.values()), color="#d9822b")
    right.set_yticks(np.arange(len(sparsity)), list(sparsity.keys()))
    right.invert_yaxis()
    right.set_xlim(0, 1)
    right.set_xlabel("fraction of weights pruned (masked model)")
    figure.suptitle("Per-layer width and sparsity")
    return figure


def _plot_accuracy_fps(doc: dict[str, Any]):
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    left.bar(["dense", "compiled"], [doc["dense"]["accuracy"] or 0.0, doc["compiled"]["accuracy"] or 0.0],
             color=["#c8c8c8", "#2a7ab9"])
    left.set_ylim(0, 1)
    left.set_ylabel("test accuracy")
    rows = doc["bench"]["by_batch"]
    x = np.arange(len(rows))
    right.bar(x - 0.2, [r["dense_fps"] for r in rows], 0.4, color="#c8c8c8", label="dense")
    right.bar(x + 0.2, [r["compiled_fps"] for r in rows], 0.4, color="#2a7ab9", label="compiled")
    right.set_xticks(x, [f"batch {r['batch_size']}\n{r['speedup']:.2f}x" for r in rows])
    right.set_ylabel("images / s (median)")
    right.legend()
    figure.suptitle(f"Accuracy and FPS on {doc['recipe']['target']}")
    return figure


def _plot_training(doc: dict[str, Any]):
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    with_accuracy = bool(doc["compiled"]["accuracy_per_epoch"])
    key, ylabel = ("accuracy_per_epoch", "test accuracy") if with_accuracy else ("loss_per_epoch", "recovery loss")
    for which, color, label in (("dense", "#888888", "dense (spruce-trained default)"),
                                ("compiled", "#2a7ab9", "compiled (recovery)")):
        values = doc[which][key]
        if values:
            left.plot(np.arange(1, len(values) + 1), values, "o-", color=color, label=label)
    left.set_xlabel("epoch")
    left.set_ylabel(ylabel)
    if left.lines:
        left.legend()
    metrics = doc["metrics"]
    steps = [m["step"] for m in metrics]
    for key, label in (("iou_prune", "IoU after prune"), ("iou_grow", "IoU after grow"),
                       ("survival", "survival of grown")):
        values = [float(np.mean(list(m[key].values()))) if m.get(key) else np.nan for m in metrics]
        if steps and not all(np.isnan(values)):
            right.plot(steps, values, ".-", label=label)
    right.set_xlabel("step")
    right.set_ylim(0, 1.05)
    right.set_title("active-set IoU and survival (mean over layers)")
    if right.lines:
        right.legend()
    else:
        right.text(0.5, 0.5, "no prune-grow updates recorded", ha="center", va="center")
    return figure


def _plot_table(table):
    import matplotlib.pyplot as plt

    name = max(table.layers, key=lambda n: table.isolated_ms(n, table.layers[n].in_channels,
                                                             table.layers[n].out_channels))
    entry = table.layers[name]
    ins = np.unique(np.linspace(1, entry.in_channels, min(entry.in_channels, 24)).round().astype(int))
    outs = np.unique(np.linspace(1, entry.out_channels, min(entry.out_channels, 24)).round().astype(int))
    if entry.depthwise:
        outs = ins
    grid = np.array([[table.isolated_ms(name, i, i * getattr(entry, "multiplier", 1) if entry.depthwise else o)
                      for i in ins] for o in outs])
    figure, axis = plt.subplots(figsize=(6, 4.5))
    image = axis.imshow(grid, origin="lower", aspect="auto", cmap="viridis",
                        extent=(ins[0], ins[-1], outs[0], outs[-1]))
    figure.colorbar(image, label="ms (isolated layer)")
    axis.set_xlabel("active input channels")
    axis.set_ylabel("active output channels")
    axis.set_title(f"latency table: {name}")
    return figure


def _method_text(method: Mapping[str, Any]) -> str:
    options = ", ".join(f"{k}={v}" for k, v in method.items() if k != "name")
    return f"{method['name']}({options})" if options else method["name"]


def _markdown(doc: dict[str, Any]) -> str:
    recipe = doc["recipe"]
    missed = floor_line(doc.get("floor"))
    lines = [*([f"**FAILED: {missed}** (the artifacts are kept for inspection)", ""] if missed else []),
             "# spruce compile report", "",
             f"Model: {recipe['model'] or 'embedded digits CNN'} on {doc['data']}; target `{recipe['target']}`; "
             f"method `{_method_text(recipe['method'])}`, structure `{recipe['structure']}`, "
             + (f"budget {recipe['budget']}" if recipe["budget"] else f"sparsity {recipe['sparsity']}")
             + f"; {recipe['epochs']} epochs.", "",
             "| | accuracy | params | MACs | artifact |", "|---|---|---|---|---|"]
    for which in ("dense", "compiled"):
        part = doc[which]
        lines.append(f"| {which} | {_number(part['accuracy'])} | {part['params']:,} | {part['macs']:,} | "
                     f"`{part['artifact']}` |")
    lines += ["", f"Latency on `{recipe['target']}` (median of {doc['bench']['iters']} runs after "
              f"{doc['bench']['warmup']} warm-ups, dense and compiled calls interleaved; robust: run-queue waiting "
              "excluded, outliers rejected):", "",
              "| batch | dense ms | compiled ms | dense p99 ms | compiled p99 ms | dense FPS | compiled FPS "
              "| speed-up | robust speed-up |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["bench"]["by_batch"]:
        lines.append(f"| {r['batch_size']} | {r['dense_ms']:.3f} | {r['compiled_ms']:.3f} | {r['dense_p99_ms']:.3f} | "
                     f"{r['compiled_p99_ms']:.3f} | {r['dense_fps']:.1f} | {r['compiled_fps']:.1f} | "
                     f"{r['speedup']:.2f}x | "
                     + (f"{r['robust_speedup']:.2f}x |" if "robust_speedup" in r else "- |"))
    if doc.get("latency_table"):
        lt = doc["latency_table"]
        lines += ["", f"Latency table (`{lt['file']}`): dense predicted {lt['dense_predicted_ms']:.3f} ms, compiled "
                  f"predicted {lt['compiled_predicted_ms']:.3f} ms."]
    lines += _summary_lines(doc)
    lines += ["", "| layer | in (dense → compiled) | out (dense → compiled) |", "|---|---|---|"]
    lines += [f"| {r['layer']} | {r['dense_in']} → {r['compiled_in']} | {r['dense_out']} → {r['compiled_out']} |"
              for r in doc["layers"]]
    lines += ["", *[f"![{name}]({name})" for name in doc.get("plots", [])], "",
              "Machine: " + ", ".join(f"{k} {v}" for k, v in doc["bench"]["fingerprint"].items()), ""]
    return "\n".join(lines)
