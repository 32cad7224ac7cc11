"""Speed of spruce against Torch-Pruning 1.6.1 (the anchor), measured in the same run.

Two parts:

- repeated (default): for resnet50, mobilenet_v2, efficientnet_b0, vit_b_16,
  densenet121, convnext_tiny and regnet_y_1_6gf, ``--rounds`` rounds interleave the
  tools: each round runs spruce then Torch-Pruning, each in a fresh subprocess doing one
  warm-up analysis+prune then ``--repeats`` timed analyses and prunes (each on a fresh copy
  of the model); medians over every timed run, peak memory the largest of the rounds.
  Verdict per model: spruce's prune (analysis included) within ``--max-ratio`` of
  Torch-Pruning's median and its peak memory above the child's base no more than
  Torch-Pruning's; a model whose Torch-Pruning result does not run is a spruce win.
- ``--zoo``: every torchvision classifier, one cold analysis+prune per tool, each in
  its own subprocess with ``--zoo-timeout`` and an address-space cap (Torch-Pruning's
  swin/maxvit builds run past 120 s and use 14-20 GB).

"analysis" is ``spruce.channel_groups`` vs ``tp.DependencyGraph().build_dependency``;
"prune" is ``spruce.prune(ratio)`` vs ``tp.pruner.BasePruner(...)`` + ``step()``
(both include their own analysis). Both use L1 magnitude importance, a uniform
ratio, and keep the final classifier. Ratios are spruce / Torch-Pruning (< 1: spruce
faster). Writes ``bench/results/speed.md`` (and ``.json``).

Usage: ``python bench/speed.py [--models resnet50,...] [--zoo] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import benchlib

DEFAULT_MODELS = "resnet50,mobilenet_v2,efficientnet_b0,vit_b_16,densenet121,convnext_tiny,regnet_y_1_6gf"
MAX_RATIO = 1.1
DEFAULT_OUT = benchlib.RESULTS_DIR / "speed.md"
RATIO = 0.5


# ----------------------------------------------------------------------------- tools


@dataclass(frozen=True)
class Tool:
    """One pruning library as the bench drives it.

    ``analyse(model, x)`` runs the channel analysis; ``prune(model, x)`` returns the
    pruned model (it may prune ``model`` in place).
    """

    name: str
    analyse: Callable[[Any, Any], Any]
    prune: Callable[[Any, Any], Any]


def _spruce_tool() -> Tool:
    """spruce: ``channel_groups`` and ``prune(...).model``."""
    import spruce

    return Tool(
        "spruce",
        analyse=lambda model, x: spruce.channel_groups(model, (x,)),
        prune=lambda model, x: spruce.prune(model, (x,), ratio=RATIO).model,
    )


def _tp_tool() -> Tool:
    """Torch-Pruning: dependency-graph build and BasePruner + step (in place)."""
    import anchor_tp

    def prune(model: Any, x: Any) -> Any:
        anchor_tp.prune_in_place(model, x, RATIO)
        return model

    return Tool("tp", analyse=anchor_tp.build_graph, prune=prune)


TOOLS: dict[str, Callable[[], Tool]] = {"spruce": _spruce_tool, "tp": _tp_tool}


# ----------------------------------------------------------------------------- child


def measure(tool: Tool, model: Any, x: Any, repeats: int, warmup: bool,
            record: dict[str, Any]) -> None:
    """Fill ``record`` with timings of ``tool`` on ``model`` (which stays unpruned).

    Every analysis and prune gets a fresh deep copy, made outside the timed region.
    """
    expected_shape = tuple(benchlib.output_tensors(_eval_forward(model, x))[0].shape)
    record["params_before"] = benchlib.count_params(model)
    if warmup:
        tool.prune(copy.deepcopy(model), x)
    record["analysis_s"], record["prune_s"] = [], []
    pruned = None
    for _ in range(repeats):
        analysis = partial(tool.analyse, copy.deepcopy(model), x)
        record["analysis_s"].append(benchlib.timed(analysis)[1])
        benchlib.emit(record)  # a child timed out while pruning still reports its analysis
        pruned, seconds = benchlib.timed(partial(tool.prune, copy.deepcopy(model), x))
        record["prune_s"].append(seconds)
        benchlib.emit(record)
    record["peak_rss_mb"] = round(benchlib.peak_rss_mb(), 1)
    record["params_after"] = benchlib.count_params(pruned)
    error = benchlib.model_run_error(pruned, (x,), expected_shape)
    if error:
        record["error"] = f"pruned model: {error}"


def _eval_forward(model: Any, x: Any) -> Any:
    """``model(x)`` without gradients."""
    import torch

    with torch.no_grad():
        return model(x)


def child_main(args: argparse.Namespace) -> None:
    """Measure one tool on one model in this fresh process and emit the record."""
    benchlib.cap_address_space(args.mem_gb)
    record: dict[str, Any] = {"model": args.child, "tool": args.tool}
    try:
        benchlib.set_threads(args.threads)
        tool = TOOLS[args.tool]()
        model, shape = benchlib.build_model(args.child)
        x = benchlib.random_input(shape, seed=0)
        benchlib.reset_peak_rss()
        record["rss_base_mb"] = round(benchlib.peak_rss_mb(), 1)
        measure(tool, model, x, args.repeats, args.warmup, record)
    except Exception as exc:  # noqa: BLE001 - every failure is a result here
        record["error"] = benchlib.short_error(exc)
    record["peak_rss_mb"] = round(benchlib.peak_rss_mb(), 1)
    benchlib.emit(record)


# ----------------------------------------------------------------------------- parent


@dataclass(frozen=True)
class RunPlan:
    """How the children of one part run."""

    repeats: int
    warmup: bool
    timeout_s: float
    mem_gb: float
    threads: int


def run_tool(model: str, tool: str, plan: RunPlan) -> dict[str, Any]:
    """Run ``tool`` on ``model`` in a fresh child; returns its record with medians."""
    argv = [str(Path(__file__).resolve()), "--child", model, "--tool", tool,
            "--repeats", str(plan.repeats), "--threads", str(plan.threads),
            "--mem-gb", str(plan.mem_gb)] + (["--warmup"] if plan.warmup else [])
    outcome = benchlib.run_child(argv, plan.timeout_s)
    record = {"model": model, "tool": tool, **outcome.result}
    crash = benchlib.outcome_error(outcome, plan.timeout_s, plan.mem_gb)
    if crash:
        record["error"] = f"{record['error']}; then {crash}" if "error" in record else crash
    complete = len(record.get("prune_s", [])) == plan.repeats
    record["analysis_med_s"] = _median(record.get("analysis_s", []))
    record["prune_med_s"] = _median(record.get("prune_s", [])) if complete else None
    record["ok"] = "error" not in record and complete
    return record


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def run_part(models: list[str], plan: RunPlan, label: str, rounds: int = 1,
             progress: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
    """Both tools on every model, interleaved: ``rounds`` times spruce then Torch-Pruning,
    one child each; the timings of all rounds pooled. ``progress`` gets the rows so far
    after each model (the report is rewritten, so an interrupted run keeps its figures)."""
    rows = []
    for index, model in enumerate(models, 1):
        runs: dict[str, list[dict[str, Any]]] = {tool: [] for tool in TOOLS}
        for _ in range(rounds):
            for tool in TOOLS:
                runs[tool].append(run_tool(model, tool, plan))
        pair = {tool: _pooled(records) for tool, records in runs.items()}
        rows.append({"model": model, **pair})
        print(f"[{label} {index}/{len(models)}] {model}: "
              + ", ".join(f"{t} {_status(pair[t])}" for t in TOOLS), flush=True)
        if progress is not None:
            progress(rows)
    return rows


def _pooled(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One record from the rounds of a tool: timings pooled, the worst peak memory."""
    if len(records) == 1:
        return records[0]
    pooled = dict(records[-1])
    for key in ("analysis_s", "prune_s"):
        pooled[key] = [v for r in records for v in r.get(key, [])]
    pooled["analysis_med_s"] = _median(pooled["analysis_s"])
    pooled["prune_med_s"] = _median(pooled["prune_s"]) if all(r["ok"] for r in records) else None
    for key in ("peak_rss_mb", "rss_base_mb"):
        values = [r[key] for r in records if key in r]
        if values:
            pooled[key] = max(values) if key == "peak_rss_mb" else min(values)
    deltas = [r["peak_rss_mb"] - r["rss_base_mb"] for r in records if "peak_rss_mb" in r and "rss_base_mb" in r]
    pooled["peak_over_base_mb"] = max(deltas) if deltas else None
    errors = [r["error"] for r in records if "error" in r]
    if errors:
        pooled["error"] = errors[0]
    pooled["ok"] = all(r["ok"] for r in records)
    pooled["rounds"] = len(records)
    return pooled


def _status(record: dict[str, Any]) -> str:
    """``ok`` or the error of a tool record."""
    return "ok" if record["ok"] else f"fail ({record.get('error', 'incomplete')})"


# ----------------------------------------------------------------------------- report


def _ratio(row: dict[str, Any], key: str) -> float | None:
    """spruce / TP for ``key``, when both have it."""
    ours, theirs = row["spruce"].get(key), row["tp"].get(key)
    if ours is None or not theirs:
        return None
    return ours / theirs


def _kept(record: dict[str, Any]) -> str:
    before, after = record.get("params_before"), record.get("params_after")
    return "-" if not before or after is None else f"{100.0 * after / before:.0f} %"


def _delta_mb(record: dict[str, Any]) -> float | None:
    if record.get("peak_over_base_mb") is not None:
        return record["peak_over_base_mb"]
    if "peak_rss_mb" in record and "rss_base_mb" in record:
        return record["peak_rss_mb"] - record["rss_base_mb"]
    return None


HEADERS = [
    "model", "spruce analysis s", "TP analysis s", "ratio", "spruce prune s", "TP prune s",
    "ratio", "spruce peak MB (+over base)", "TP peak MB (+over base)", "params kept spruce",
    "params kept TP", "spruce", "TP", "verdict",
]


def verdict(row: dict[str, Any]) -> str:
    """Does spruce meet the bar on this model: prune time within MAX_RATIO of TP's and peak
    memory above base no more than TP's (a model TP's result does not run is a spruce win)."""
    ours, theirs = row["spruce"], row["tp"]
    if not ours["ok"]:
        return "spruce fails"
    if not theirs["ok"]:
        return "spruce wins: Torch-Pruning's result does not run" if "pruned model" in str(
            theirs.get("error", "")) else "spruce wins: Torch-Pruning fails"
    ratio = _ratio(row, "prune_med_s")
    mine, their = _delta_mb(ours), _delta_mb(theirs)
    slow = ratio is not None and ratio > MAX_RATIO
    heavy = mine is not None and their is not None and mine > their
    if not slow and not heavy:
        return "ok"
    return ", ".join(x for x in (f"time {ratio:.2f}x" if slow else "", f"memory {mine / their:.2f}x"
                                 if heavy else "") if x)


def table_row(row: dict[str, Any]) -> list[str]:
    """One Markdown row comparing the two tools on a model."""
    ours, theirs = row["spruce"], row["tp"]

    def peak(record: dict[str, Any]) -> str:
        total, delta = record.get("peak_rss_mb"), _delta_mb(record)
        return "-" if total is None else f"{total:.0f} (+{benchlib.fmt(delta, 0)})"

    return [
        row["model"],
        benchlib.fmt(ours.get("analysis_med_s"), 3), benchlib.fmt(theirs.get("analysis_med_s"), 3),
        benchlib.fmt(_ratio(row, "analysis_med_s"), 2),
        benchlib.fmt(ours.get("prune_med_s"), 3), benchlib.fmt(theirs.get("prune_med_s"), 3),
        benchlib.fmt(_ratio(row, "prune_med_s"), 2),
        peak(ours), peak(theirs), _kept(ours), _kept(theirs),
        "ok" if ours["ok"] else ours.get("error", "incomplete"),
        "ok" if theirs["ok"] else theirs.get("error", "incomplete"),
        verdict(row),
    ]


def summary_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Success counts and median ratios over models where both tools succeeded."""
    both = [row for row in rows if row["spruce"]["ok"] and row["tp"]["ok"]]
    lines = [
        (f"- models: {len(rows)}; spruce ok {sum(r['spruce']['ok'] for r in rows)}, "
         f"Torch-Pruning ok {sum(r['tp']['ok'] for r in rows)}, both ok {len(both)}"),
        (f"- verdict (prune <= {MAX_RATIO}x Torch-Pruning's median and peak memory over base <= "
         f"Torch-Pruning's, or Torch-Pruning's result does not run): "
         f"{sum(verdict(r) == 'ok' or verdict(r).startswith('spruce wins') for r in rows)}/{len(rows)}"),
    ]
    for key, label in (("analysis_med_s", "analysis"), ("prune_med_s", "prune")):
        ratio = benchlib.median_or_none(_ratio(row, key) for row in both)
        ours = benchlib.median_or_none(row["spruce"].get(key) for row in rows)
        theirs = benchlib.median_or_none(row["tp"].get(key) for row in rows)
        lines.append(f"- {label}: median spruce/TP ratio {benchlib.fmt(ratio, 2)} (over both-ok "
                     f"models); median time spruce {benchlib.fmt(ours, 3)} s, "
                     f"TP {benchlib.fmt(theirs, 3)} s (over each tool's own successes)")
    return lines


def render_part(title: str, note: str, rows: list[dict[str, Any]]) -> list[str]:
    """Markdown section for one part."""
    lines = [f"## {title}", "", note, ""]
    lines += summary_lines(rows)
    lines += [""] + benchlib.markdown_table(HEADERS, (table_row(row) for row in rows)) + [""]
    return lines


def render(info: dict[str, str], parts: list[tuple[str, str, list[dict[str, Any]]]]) -> str:
    """The whole Markdown report."""
    lines = ["# spruce vs Torch-Pruning: analysis and pruning speed", ""]
    lines += benchlib.header_lines(info)
    lines.append(f"- load average (1/5/15 min) at writing: {benchlib.load_average()}")
    lines += [
        (f"- settings: channel ratio {RATIO}, L1 magnitude importance, uniform per group/layer, "
         "final classifier kept, random weights (seed 0), eval mode, one subprocess per "
         "model per tool"),
        "- ratio = spruce / Torch-Pruning (below 1: spruce is faster)",
        ("- peak MB = ru_maxrss of the child over the warm-up and timed runs (its mark reset "
         "after imports and model build); +over base = above the resident size then"),
        ("- a transformers model (a 2-layer Llama, hidden size 256): analysis time against "
         "Torch-Pruning's graph build in [speed_llama.md](speed_llama.md) (`bench/speed_llama.py`)"),
        "",
    ]
    for title, note, rows in parts:
        lines += render_part(title, note, rows)
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options (``--child``/``--tool`` are the internal per-run mode)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS, help="models for the repeated part")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per child")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved spruce/TP children per model")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds per child in the repeated part")
    parser.add_argument("--zoo", action="store_true", help="also sweep every torchvision model")
    parser.add_argument("--zoo-models", help="comma-separated subset for --zoo")
    parser.add_argument("--zoo-timeout", type=float, default=120.0,
                        help="seconds per child in the zoo part (both tools)")
    parser.add_argument("--mem-gb", type=float, default=None,
                        help="address-space cap per child (default: 80%% of RAM, at most 16)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--tool", choices=sorted(TOOLS), help=argparse.SUPPRESS)
    parser.add_argument("--warmup", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the requested parts and write the report."""
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return 0
    mem_gb = args.mem_gb or benchlib.default_memory_cap_gb(1)
    info = benchlib.machine_info(["spruce", "torch-pruning"])
    info["run"] = f"{args.threads} torch threads per child, address-space cap {mem_gb} GiB"
    parts = []
    repeated = RunPlan(args.repeats, True, args.timeout, mem_gb, args.threads)
    note = (f"{args.rounds} interleaved rounds per model (spruce child, then Torch-Pruning child), each child "
            f"one warm-up analysis+prune then {args.repeats} timed runs of each: medians over the "
            f"{args.rounds * args.repeats} timed runs, peak memory the largest of the rounds.")
    rows = run_part(args.models.split(","), repeated, "repeated", args.rounds,
                    lambda done: benchlib.write_atomic(args.out, render(info, [("Repeated runs", note, done)])))
    parts.append(("Repeated runs", note, rows))
    benchlib.write_atomic(args.out, render(info, parts))
    if args.zoo:
        names = args.zoo_models.split(",") if args.zoo_models else benchlib.zoo_model_names()
        cold = RunPlan(1, False, args.zoo_timeout, mem_gb, args.threads)
        rows = run_part(names, cold, "zoo")
        note = (f"One analysis and one prune per tool in a fresh child, no warm-up, timeout "
                f"{args.zoo_timeout:.0f} s per child.")
        parts.append(("Zoo (cold, single run)", note, rows))
    benchlib.write_atomic(args.out, render(info, parts))
    benchlib.write_atomic(args.out.with_suffix(".json"), json.dumps(
        {"machine": info, "parts": [{"title": t, "rows": r} for t, _, r in parts]},
        indent=1, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
