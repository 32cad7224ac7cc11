"""The plots of the ``spruce compile`` report (matplotlib, Agg backend, PNG): per-layer
width (dense vs compiled) and sparsity, accuracy and FPS vs dense, the recovery curves with
IoU and survival of grown units, and the latency-table heat map when a latency table was
used. Each plot reads the report document only (the table for the heat map)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..targets.files import atomic_path

__all__ = ["write_plots"]


def write_plots(document: dict[str, Any], table: Any, out_dir: Path) -> list[str]:
    """Write the report's PNG plots into ``out_dir`` (each file atomically); returns the
    names written (a plot with nothing to show is not written)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

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
        plt.close(figure)
    return written


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
