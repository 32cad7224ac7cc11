"""The plots of the ``spruce compile`` report (matplotlib, Agg backend, PNG): per-layer
width (dense vs compiled) and sparsity, accuracy and FPS vs dense, the recovery curves with
IoU and survival of grown units, and the latency-table heat map of the most expensive
pruned layer when a latency table was used. Each plot reads the report document (and the
table for the heat map); a panel with nothing to show is left out, and a plot with no
panel is not written."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..targets.files import atomic_path
from .bench_rows import latency_ms, speedup

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
        plots["latency_table.png"] = _plot_table(table, document)
    written = []
    for name, figure in plots.items():
        if figure is None:
            continue
        with atomic_path(out_dir / name, suffix=".png") as temp:
            figure.savefig(temp, dpi=110, bbox_inches="tight")
        written.append(name)
        plt.close(figure)
    return written


Panel = Callable[[Any], None]  # draws one panel on the matplotlib Axes it is given


def _figure(panels: list[Panel], title: str, width: float = 5.0, height: float = 3.5):
    """A figure of the panels that have something to show, side by side; None without any."""
    if not panels:
        return None
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), height), squeeze=False)
    for draw, axis in zip(panels, axes[0]):
        draw(axis)
    figure.suptitle(title)
    return figure


def _plot_widths(doc: dict[str, Any]):
    layers, sparsity = doc["layers"], doc["sparsity"]
    names = [row["layer"] for row in layers]

    def widths(axis) -> None:
        y = np.arange(len(names))
        axis.barh(y, [row["dense_out"] for row in layers], color="#c8c8c8", label="dense")
        axis.barh(y, [row["compiled_out"] for row in layers], color="#2a7ab9", label="compiled")
        axis.set_yticks(y, names)
        axis.invert_yaxis()
        axis.set_xlabel("output channels")
        axis.legend()

    def sparsities(axis) -> None:
        axis.barh(np.arange(len(sparsity)), list(sparsity.values()), color="#d9822b")
        axis.set_yticks(np.arange(len(sparsity)), list(sparsity.keys()))
        axis.invert_yaxis()
        axis.set_xlim(0, 1)
        axis.set_xlabel("fraction of weights pruned (masked model)")

    panels = [panel for panel, shown in ((widths, layers), (sparsities, sparsity)) if shown]
    title = " and ".join(t for t, shown in (("Per-layer width", layers), ("sparsity", sparsity)) if shown)
    return _figure(panels, title, 5.5, 0.35 * max(len(names), len(sparsity)) + 2)


def _plot_accuracy_fps(doc: dict[str, Any]):
    accuracies = [doc["dense"]["accuracy"], doc["compiled"]["accuracy"]]
    rows = doc["bench"]["by_batch"]

    def accuracy(axis) -> None:
        axis.bar(["dense", "compiled"], [a or 0.0 for a in accuracies], color=["#c8c8c8", "#2a7ab9"])
        axis.set_ylim(0, 1)
        axis.set_ylabel("test accuracy")

    def fps(axis) -> None:  # from the load-robust latency, as the report's tables
        x = np.arange(len(rows))
        for offset, which, color in ((-0.2, "dense", "#c8c8c8"), (0.2, "compiled", "#2a7ab9")):
            axis.bar(x + offset, [r["batch_size"] * 1e3 / latency_ms(r, which) for r in rows], 0.4, color=color,
                     label=which)
        axis.set_xticks(x, [f"batch {r['batch_size']}\n{speedup(r):.2f}x" for r in rows])
        axis.set_ylabel("images / s (load-robust)")
        axis.legend()

    panels = [panel for panel, shown in ((accuracy, any(a is not None for a in accuracies)), (fps, rows)) if shown]
    return _figure(panels, f"Accuracy and FPS on {doc['recipe']['target']}")


def _plot_training(doc: dict[str, Any]):
    with_accuracy = bool(doc["compiled"]["accuracy_per_epoch"])
    key, ylabel = ("accuracy_per_epoch", "test accuracy") if with_accuracy else ("loss_per_epoch", "recovery loss")
    curves = [(which, color, label, doc[which][key]) for which, color, label in (
        ("dense", "#888888", "dense (spruce-trained default)"), ("compiled", "#2a7ab9", "compiled (recovery)"))
        if doc[which][key]]
    metrics = doc["metrics"]
    steps = [m["step"] for m in metrics]
    series = []
    for name, label in (("iou_prune", "IoU after prune"), ("iou_grow", "IoU after grow"),
                        ("survival", "survival of grown")):
        values = [float(np.mean(list(m[name].values()))) if m.get(name) else np.nan for m in metrics]
        if steps and not all(np.isnan(values)):
            series.append((label, values))

    def epochs(axis) -> None:
        for _, color, label, values in curves:
            axis.plot(np.arange(1, len(values) + 1), values, "o-", color=color, label=label)
        axis.set_xlabel("epoch")
        axis.set_ylabel(ylabel)
        axis.legend()

    def updates(axis) -> None:
        for label, values in series:
            axis.plot(steps, values, ".-", label=label)
        axis.set_xlabel("step")
        axis.set_ylim(0, 1.05)
        axis.set_title("active-set IoU and survival (mean over layers)")
        axis.legend()

    panels = [panel for panel, shown in ((epochs, curves), (updates, series)) if shown]
    return _figure(panels, "Training and recovery")


def pruned_layer(table: Any, doc: dict[str, Any]) -> str | None:
    """The profiled layer the heat map shows: the most expensive (isolated, at full width) of
    the layers the compile pruned (fewer input or output channels than dense); None when no
    profiled layer was pruned."""
    pruned = {row["layer"] for row in doc["layers"]
              if row["compiled_out"] < row["dense_out"] or row["compiled_in"] < row["dense_in"]}
    candidates = [name for name in table.layers if name in pruned]
    if not candidates:
        return None
    return max(candidates, key=lambda n: table.isolated_ms(n, table.layers[n].in_channels,
                                                           table.layers[n].out_channels))


def _plot_table(table: Any, doc: dict[str, Any]):
    import matplotlib.pyplot as plt

    name = pruned_layer(table, doc)
    if name is None:
        return None
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
    row = next(r for r in doc["layers"] if r["layer"] == name)
    axis.plot([row["dense_in"], row["compiled_in"]], [row["dense_out"], row["compiled_out"]], "w--")
    axis.plot([row["compiled_in"]], [row["compiled_out"]], "wo", label="compiled")
    axis.legend(loc="upper left")
    axis.set_xlabel("active input channels")
    axis.set_ylabel("active output channels")
    axis.set_title(f"latency table: {name} ({row['dense_in']}x{row['dense_out']} -> "
                   f"{row['compiled_in']}x{row['compiled_out']} channels)")
    return figure
