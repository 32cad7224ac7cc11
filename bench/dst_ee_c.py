"""DST-EE's exploration coefficient: exploration degree R and accuracy over a sweep of c.

Issue 15: at spruce's former default (the paper's absolute c = 1e-3) the exploration term
of Eq. 1 did nothing (R equal to RigL's). The default is now ``c_relative`` (c in units of
the layer's RMS gradient at the update); this sweep reports, side by side, R (the fraction
of weights ever active, mean over layers) and test accuracy for RigL, the paper's absolute
c and several ``c_relative``, on the data, model and recipe of ``bench/methods.py``, with
its update protocol (at least 50 mask updates ending at 3/4 of training), ERK layer budgets.

Usage: ``python bench/dst_ee_c.py [--dataset digits] [--sparsity 0.95] [--seeds 2] [--out PATH]``;
writes ``bench/results/dst_ee_c.md`` atomically after every run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import benchlib
import methods

DEFAULT_OUT = benchlib.RESULTS_DIR / "dst_ee_c.md"
# (label, method, options): RigL, the paper's absolute c (Eq. 1 verbatim), then c_relative
VARIANTS: list[tuple[str, str, dict[str, Any]]] = [
    ("rigl", "rigl", {}),
    ("dst_ee c=1e-3 (absolute, Eq. 1)", "dst_ee", {"c": 1e-3}),
    ("dst_ee c=1e-1 (absolute, Eq. 1)", "dst_ee", {"c": 1e-1}),
    *[(f"dst_ee c_relative={c:g}" + (" (default)" if c == 1.0 else ""), "dst_ee", {"c_relative": c})
      for c in (0.25, 1.0, 4.0, 16.0)],
]


def run(data: methods.Dataset, settings: methods.TrainSettings, method: str, extra: dict[str, Any],
        sparsity: float, seed: int) -> dict[str, Any]:
    """One sparse run: accuracy of the folded model, R, mask updates, wall time."""
    import spruce
    import torch

    torch.manual_seed(seed)
    model = methods.build_cnn(data.side)
    steps_per_epoch = settings.steps_per_epoch(len(data.y_train))
    total_steps = settings.epochs * steps_per_epoch
    options = {**methods.method_options(methods.available_methods()[method], steps_per_epoch, total_steps, seed),
               **extra}
    start = time.perf_counter()
    sm = spruce.sparsify(model, (data.x_train[:2],), method=method, structure="unstructured", sparsity=sparsity,
                         distribution="erk", total_steps=total_steps, **options)
    methods.train_loop(sm, data, settings, seed, after_step=sm.step, attach=sm.attach)
    train_s = time.perf_counter() - start
    accuracy, _ = methods.evaluate(sm.fold(), data)
    return {"accuracy": accuracy, "exploration": methods.final_exploration(sm), "updates": len(sm.metrics),
            "train_s": train_s, "sparsity": methods.mask_sparsity(sm)}


def render(rows: list[dict[str, Any]], args: argparse.Namespace, info: dict[str, str], planned: int,
           settings: methods.TrainSettings) -> str:
    lines = ["# DST-EE: exploration degree R and accuracy over the exploration coefficient c", "",
             "Produced by `bench/dst_ee_c.py` (see its docstring)." +
             ("" if len(rows) == planned else f" **Partial: {len(rows)}/{planned} runs.**"), "",
             *benchlib.header_lines(info),
             f"- command: python bench/dst_ee_c.py {' '.join(sys.argv[1:])}",
             f"- load average (1/5/15 min) at writing: {benchlib.load_average()}",
             f"- {args.dataset}, target sparsity {args.sparsity:.0%} (ERK), seeds 0..{args.seeds - 1}; "
             f"{settings.describe()}; update protocol of bench/methods.py (delta_t = 3/4 of the run // "
             f"{methods.MIN_UPDATES})",
             "- R: fraction of weights ever active at the last update, mean over layers; accuracy of "
             "`sm.fold()`; figures are medians over seeds (accuracy also mean ± std)", ""]
    table = []
    for label, _, _ in VARIANTS:
        mine = [r for r in rows if r["label"] == label]
        if not mine:
            continue
        accuracy = [r["accuracy"] for r in mine]
        mean, std = benchlib.mean_std(accuracy)
        table.append([label, len(mine), benchlib.fmt(statistics.median(r["exploration"] for r in mine), 3),
                      benchlib.fmt(statistics.median(accuracy), 2), f"{mean:.2f} ± {std:.2f}",
                      benchlib.fmt(statistics.median(r["updates"] for r in mine), 0),
                      benchlib.fmt(100 * min(r["sparsity"] for r in mine), 3),
                      benchlib.fmt(statistics.median(r["train_s"] for r in mine), 1)])
    lines += benchlib.markdown_table(["variant", "seeds", "R (median)", "test acc % (median)",
                                      "test acc % (mean ± std)", "mask updates", "mask sparsity % (min)",
                                      "train s (median)"], table)
    lines += ["", "## Runs", ""]
    lines += benchlib.markdown_table(["variant", "seed", "R", "test acc %", "train s"],
                                     [[r["label"], r["seed"], benchlib.fmt(r["exploration"], 3),
                                       benchlib.fmt(r["accuracy"], 2), benchlib.fmt(r["train_s"], 1)]
                                      for r in rows])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--sparsity", type=float, default=0.95)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    benchlib.set_threads(1)
    info = benchlib.machine_info(["spruce", "mlxtend", "scikit-learn"])
    data = methods.load_dataset(args.dataset)
    settings = methods.TrainSettings(epochs=args.epochs)
    methods.warm_up(data)
    rows: list[dict[str, Any]] = []
    planned = len(VARIANTS) * args.seeds
    for seed in range(args.seeds):
        for label, method, extra in VARIANTS:
            rows.append({"label": label, "seed": seed, **run(data, settings, method, extra, args.sparsity, seed)})
            print(f"[{len(rows)}/{planned}] {label} seed {seed}: R {rows[-1]['exploration']:.3f} "
                  f"acc {rows[-1]['accuracy']:.2f}", flush=True)
            benchlib.write_atomic(args.out, render(rows, args, info, planned, settings))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
