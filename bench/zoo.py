"""Model-zoo sweep: spruce's analysis and one-shot pruning on every torchvision classifier.

Each model runs in a fresh subprocess (so peak memory is per model) with a timeout
and an address-space cap. Per model: time of ``spruce.channel_groups`` and of
``spruce.prune(ratio=0.5)``, group counts, params and MACs before/after, the
relative error between the compact and the masked model in eval mode, and whether
the compact model trains (forward + backward on a batch of 2 in train mode).

A model passes when the compact model runs, has fewer parameters, matches the
masked model to ``--tolerance`` (relative), and runs in train mode.

Usage: ``python bench/zoo.py [--models a,b] [--jobs N] [--out bench/results/zoo.md]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import benchlib

DEFAULT_OUT = benchlib.RESULTS_DIR / "zoo.md"
RATIO = 0.5
TOLERANCE = 1e-4


# ----------------------------------------------------------------------------- child


def relative_error(compact_out: Any, masked_out: Any) -> float:
    """max|compact - masked| / max(1, max|masked|) over every output tensor."""
    compact_tensors = benchlib.output_tensors(compact_out)
    masked_tensors = benchlib.output_tensors(masked_out)
    if len(compact_tensors) != len(masked_tensors):
        raise ValueError(f"{len(compact_tensors)} outputs vs {len(masked_tensors)} masked")
    worst = 0.0
    for compact, masked in zip(compact_tensors, masked_tensors):
        if compact.shape != masked.shape:
            raise ValueError(f"output shape {tuple(compact.shape)} != {tuple(masked.shape)}")
        scale = max(1.0, masked.abs().max().item())
        worst = max(worst, (compact - masked).abs().max().item() / scale)
    return worst


def train_step(model: Any, shape: tuple[int, ...]) -> None:
    """Forward + backward of ``model`` in train mode on a random batch of 2.

    The sum over all outputs (GoogLeNet/Inception add auxiliary logits in train
    mode) is the loss; raises if anything in the step fails.
    """
    model.train()
    batch = benchlib.random_input((2, *shape[1:]), seed=2)
    outputs = benchlib.output_tensors(model(batch))
    if not outputs:
        raise ValueError("train-mode forward returned no tensor")
    sum(out.float().sum() for out in outputs).backward()


class Stages:
    """Runs named stages in a child, recording results and the first failure.

    After every stage the record is re-emitted, so a child killed later still
    reports how far it got.
    """

    def __init__(self, record: dict[str, Any]):
        self.record = record

    def run(self, stage: str, fn: Callable[[], Any]) -> tuple[bool, Any]:
        """Run ``fn``; on failure note ``stage: error`` (first failure wins).

        Returns ``(ok, value)``.
        """
        try:
            value = fn()
        except Exception as exc:  # noqa: BLE001 - every failure is a result here
            self.record.setdefault("error", f"{stage}: {benchlib.short_error(exc)}")
            self.record.setdefault("failed_stage", stage)
            benchlib.emit(self.record)
            return False, None
        benchlib.emit(self.record)
        return True, value


def child_main(name: str, threads: int, mem_gb: float | None, raw_init: bool) -> None:
    """Measure spruce on model ``name`` in this (fresh) process and emit the record."""
    benchlib.cap_address_space(mem_gb)
    record: dict[str, Any] = {"model": name}
    stages = Stages(record)
    ok, built = stages.run("import", lambda: _import_and_build(name, threads, raw_init))
    if not ok:
        return
    model, shape = built
    example = (benchlib.random_input(shape, seed=0),)
    record["input"] = "x".join(str(s) for s in shape[2:])
    record["rss_build_mb"] = round(benchlib.peak_rss_mb(), 1)
    record["peak_reset"] = benchlib.reset_peak_rss()
    record["rss_base_mb"] = round(benchlib.peak_rss_mb(), 1)
    record["params_before"] = benchlib.count_params(model)
    if not stages.run("channel_groups", partial(_analyse, model, example, record))[0]:
        return
    record["rss_analysis_mb"] = round(benchlib.peak_rss_mb(), 1)
    ok, result = stages.run("prune", partial(_prune, model, example, record))
    record["rss_peak_mb"] = round(benchlib.peak_rss_mb(), 1)
    if not ok:
        return
    del model  # only the compact and the masked model are needed from here
    stages.run("count", lambda: _count(result, example, record))
    stages.run("equivalence", lambda: _equivalence(result, shape, record))
    ok, _ = stages.run("train", lambda: train_step(result.model, shape))
    record["train_ok"] = ok
    record["rss_final_mb"] = round(benchlib.peak_rss_mb(), 1)
    benchlib.emit(record)


def _import_and_build(name: str, threads: int, raw_init: bool) -> tuple[Any, tuple[int, ...]]:
    """Import torch and spruce, then build the model (both kept out of the figures).

    Unless ``raw_init``, the random weights are made non-degenerate so that the
    equivalence check compares outputs of order one (see ``make_nondegenerate``).
    """
    benchlib.set_threads(threads)
    import spruce  # noqa: F401 - fail this stage, not a later one, if spruce is broken

    model, shape = benchlib.build_model(name)
    if not raw_init:
        benchlib.make_nondegenerate(model, shape)
    return model, shape


def _analyse(model: Any, example: tuple, record: dict[str, Any]) -> None:
    """Time ``spruce.channel_groups`` and count groups and prunable channels."""
    import spruce

    groups, seconds = benchlib.timed(lambda: spruce.channel_groups(model, example))
    prunable = [group for group in groups if group.prunable]
    record["analysis_s"] = round(seconds, 4)
    record["groups"] = len(groups)
    record["prunable_groups"] = len(prunable)
    record["prunable_channels"] = int(sum(group.size for group in prunable))


def _prune(model: Any, example: tuple, record: dict[str, Any]) -> Any:
    """Time ``spruce.prune`` at the bench ratio; returns its PruneResult."""
    import spruce

    result, seconds = benchlib.timed(lambda: spruce.prune(model, example, ratio=RATIO))
    record["prune_s"] = round(seconds, 4)
    return result


def _count(result: Any, example: tuple, record: dict[str, Any]) -> None:
    """Params and MACs of the masked (= original architecture) and compact models."""
    record["params_after"] = benchlib.count_params(result.model)
    record["macs_before"] = benchlib.count_macs(result.masked, example)
    record["macs_after"] = benchlib.count_macs(result.model, example)


def _equivalence(result: Any, shape: tuple[int, ...], record: dict[str, Any]) -> None:
    """Relative error of compact vs masked on a fresh random input, eval mode."""
    import torch

    probe = benchlib.random_input(shape, seed=1)
    result.model.eval()
    result.masked.eval()
    with torch.no_grad():
        masked_out = result.masked(probe)
        record["rel_err"] = relative_error(result.model(probe), masked_out)
    record["out_scale"] = max(t.abs().max().item() for t in benchlib.output_tensors(masked_out))


# ----------------------------------------------------------------------------- parent


@dataclass(frozen=True)
class SweepOptions:
    """How the sweep runs: per-child timeout, memory cap, torch threads per child."""

    timeout_s: float
    mem_gb: float
    threads: int
    tolerance: float
    raw_init: bool = False


def run_one(name: str, options: SweepOptions) -> dict[str, Any]:
    """Run model ``name`` in a fresh child and return its record with a pass/fail status."""
    argv = [str(Path(__file__).resolve()), "--child", name,
            "--threads", str(options.threads), "--mem-gb", str(options.mem_gb)]
    argv += ["--raw-init"] if options.raw_init else []
    outcome = benchlib.run_child(argv, options.timeout_s)
    record = {"model": name, **outcome.result, "wall_s": round(outcome.wall_s, 1)}
    crash = benchlib.outcome_error(outcome, options.timeout_s, options.mem_gb)
    if crash and "error" not in record:
        record["error"] = crash
    elif crash:
        record["error"] = f"{record['error']}; then {crash}"
    record["status"] = "ok" if passes(record, options.tolerance) else "fail"
    if record["status"] == "fail" and "error" not in record:
        record["error"] = failure_reason(record, options.tolerance)
    return record


def passes(record: dict[str, Any], tolerance: float) -> bool:
    """The pass criterion: compact runs, fewer params, error within tolerance, trains."""
    return (
        "error" not in record
        and record.get("params_after", float("inf")) < record.get("params_before", 0)
        and record.get("rel_err", float("inf")) <= tolerance
        and record.get("train_ok", False)
    )


def failure_reason(record: dict[str, Any], tolerance: float) -> str:
    """Why a record without an exception fails the criterion."""
    if record.get("params_after", 0) >= record.get("params_before", 0):
        return "nothing pruned (params not reduced)"
    if record.get("rel_err", float("inf")) > tolerance:
        return f"compact != masked: rel err {record.get('rel_err')}"
    return "train-mode run not ok"


def sweep(names: list[str], options: SweepOptions, jobs: int,
          on_done: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
    """Run every model (``jobs`` children at a time); ``on_done`` sees each record."""
    lock = threading.Lock()

    def task(name: str) -> dict[str, Any]:
        record = run_one(name, options)
        with lock:
            on_done(record)
        return record

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(task, names))


# ----------------------------------------------------------------------------- report


def _millions(value: int | None) -> str:
    return "-" if value is None else f"{value / 1e6:.2f}"


def _before_after(record: dict[str, Any], key: str, scale: float, digits: int) -> str:
    """``before → after (kept %)`` for params or MACs."""
    before, after = record.get(f"{key}_before"), record.get(f"{key}_after")
    if before is None:
        return "-"
    if after is None:
        return f"{before / scale:.{digits}f} → -"
    kept = 100.0 * after / before if before else 0.0
    return f"{before / scale:.{digits}f} → {after / scale:.{digits}f} ({kept:.0f} %)"


def _scale(value: float | None) -> str:
    return "-" if value is None else f"{value:.2g}"


def scale_free_error(record: dict[str, Any]) -> float | None:
    """max|compact - masked| / max|masked| (the pass criterion floors the scale at 1)."""
    err, scale = record.get("rel_err"), record.get("out_scale")
    if err is None or not scale:
        return None
    return err * max(1.0, scale) / scale


def table_row(record: dict[str, Any]) -> list[str]:
    """One Markdown table row for a model record."""
    err = record.get("rel_err")
    train = {True: "ok", False: "fail"}.get(record.get("train_ok"), "-")
    return [
        record["model"], record.get("status", "-"), record.get("input", "-"),
        str(record.get("groups", "-")), str(record.get("prunable_groups", "-")),
        str(record.get("prunable_channels", "-")),
        benchlib.fmt(record.get("analysis_s"), 2), benchlib.fmt(record.get("prune_s"), 2),
        _before_after(record, "params", 1e6, 2), _before_after(record, "macs", 1e9, 2),
        _exp(err), _scale(record.get("out_scale")),
        _exp(scale_free_error(record)), train,
        benchlib.fmt(record.get("rss_base_mb"), 0), benchlib.fmt(record.get("rss_analysis_mb"), 0),
        benchlib.fmt(record.get("rss_peak_mb"), 0), record.get("error", ""),
    ]


HEADERS = [
    "model", "status", "input", "groups", "prunable groups", "prunable ch",
    "analysis s", "prune s", "params M before → after (kept)", "GMACs before → after (kept)",
    "rel err", "max abs masked out", "err / max abs masked", "train", "RSS base MB", "RSS analysis MB", "RSS peak MB",
    "error",
]


def summary_lines(records: list[dict[str, Any]], planned: int) -> list[str]:
    """Pass count and the headline timing/memory figures."""
    passed = sum(record.get("status") == "ok" for record in records)
    so_far = f" ({len(records)} run so far)" if len(records) < planned else ""
    failed = [record["model"] for record in records if record.get("status") != "ok"]
    deltas = [record["rss_peak_mb"] - record["rss_base_mb"] for record in records
              if "rss_peak_mb" in record and "rss_base_mb" in record]
    max_peak = benchlib.max_or_none(record.get("rss_peak_mb") for record in records)
    analysis_deltas = [record["rss_analysis_mb"] - record["rss_base_mb"] for record in records
                       if "rss_analysis_mb" in record and "rss_base_mb" in record]
    max_analysis = benchlib.max_or_none(record.get("rss_analysis_mb") for record in records)
    return [
        f"- passed: **{passed}/{planned}**{so_far}",
        _time_summary("analysis time (channel_groups)", records, "analysis_s"),
        _time_summary("prune time", records, "prune_s"),
        (f"- peak RSS through analysis (channel_groups): max {benchlib.fmt(max_analysis, 0)} MB (max above "
         f"the post-build baseline: {benchlib.fmt(benchlib.max_or_none(analysis_deltas), 0)} MB)"),
        (f"- peak RSS through prune: max {benchlib.fmt(max_peak, 0)} MB (max above the "
         f"post-build baseline: {benchlib.fmt(benchlib.max_or_none(deltas), 0)} MB)"),
        (f"- equivalence: max rel err {_exp(benchlib.max_or_none(r.get('rel_err') for r in records))}"
         f", max err / max|masked| {_exp(benchlib.max_or_none(map(scale_free_error, records)))}"),
        f"- failed: {', '.join(failed) if failed else 'none'}",
    ]


def _exp(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


def _time_summary(label: str, records: list[dict[str, Any]], key: str) -> str:
    """``- label: median X s, max Y s`` over the records that have ``key``."""
    values = [record.get(key) for record in records]
    median, largest = benchlib.median_or_none(values), benchlib.max_or_none(values)
    return f"- {label}: median {benchlib.fmt(median)} s, max {benchlib.fmt(largest)} s"


def render(records: list[dict[str, Any]], planned: list[str], info: dict[str, str],
           options: SweepOptions, jobs: int) -> str:
    """The whole Markdown report (records in the planned model order)."""
    order = {name: index for index, name in enumerate(planned)}
    records = sorted(records, key=lambda record: order.get(record["model"], len(order)))
    lines = ["# spruce model-zoo sweep", ""]
    lines += benchlib.header_lines(info)
    lines.append(f"- load average (1/5/15 min) at writing: {benchlib.load_average()}")
    lines += [
        _init_note(options.raw_init),
        (f"- settings: ratio {RATIO}, importance l1, random weights (seed 0), eval mode, "
         f"one subprocess per model, timeout {options.timeout_s:.0f} s, address-space cap "
         f"{options.mem_gb} GiB, {jobs} job(s) x {options.threads} torch thread(s)"),
        (f"- pass = compact runs, fewer params, rel err <= {options.tolerance:g} "
         "(max|compact - masked| / max(1, max|masked|), eval, fresh random input), "
         "train-mode forward+backward on a batch of 2 ok; where max|masked| < 1 the "
         "error is absolute, see the max abs masked out column"),
        ("- RSS base = resident after imports, model build and BatchNorm calibration (the "
         "peak mark is then reset through /proc/self/clear_refs); RSS analysis = peak RSS "
         "during channel_groups (the model's own weights included); RSS peak = peak RSS during "
         "channel_groups + prune (before the checks; prune copies the weights); ru_maxrss of the child"),
        "", "## Summary", "",
    ]
    lines += summary_lines(records, len(planned))
    lines += ["", "## Models", ""]
    lines += benchlib.markdown_table(HEADERS, (table_row(record) for record in records))
    return "\n".join(lines) + "\n"


def _init_note(raw_init: bool) -> str:
    """How the random weights were prepared."""
    if raw_init:
        return "- weights: torchvision's random init as built (outputs may be ~0)"
    return ("- weights: torchvision's random init, then spruce.api.checks.make_nondegenerate (the helper the "
            "tests and the coverage bench use): all-zero weights drawn N(0, 1/fan_in), tiny layer scales raised, "
            "BatchNorm running stats re-estimated on a random batch of 4, so outputs are of order one and the "
            "equivalence check is not vacuous")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options (``--child`` is the internal per-model mode)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated names (default: all 80)")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per model")
    parser.add_argument("--mem-gb", type=float, default=None,
                        help="address-space cap per child (default: fits --jobs in RAM)")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE)
    parser.add_argument("--raw-init", action="store_true",
                        help="keep torchvision's init (ViT heads are zero: outputs are 0)")
    parser.add_argument("--child", metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the sweep and write the report; returns 0 if every model passed."""
    import os

    args = parse_args(argv)
    cpus = os.cpu_count() or 1
    threads = args.threads or max(1, cpus // max(1, args.jobs))
    if args.child:
        child_main(args.child, threads, args.mem_gb, args.raw_init)
        return 0
    names = args.models.split(",") if args.models else benchlib.zoo_model_names()
    mem_gb = args.mem_gb or benchlib.default_memory_cap_gb(args.jobs)
    options = SweepOptions(args.timeout, mem_gb, threads, args.tolerance, args.raw_init)
    info = benchlib.machine_info(["spruce"])
    done: list[dict[str, Any]] = []
    json_path = args.out.with_suffix(".json")

    def on_done(record: dict[str, Any]) -> None:
        done.append(record)
        print(f"[{len(done)}/{len(names)}] {record['model']}: {record['status']}"
              f" {record.get('error', '')}", flush=True)
        benchlib.write_atomic(args.out, render(done, names, info, options, args.jobs))
        benchlib.write_atomic(json_path, json.dumps(
            {"machine": info, "records": done}, indent=1, default=str))

    records = sweep(names, options, args.jobs, on_done)
    print(f"wrote {args.out}")
    return 0 if all(record["status"] == "ok" for record in records) else 1


if __name__ == "__main__":
    sys.exit(main())
