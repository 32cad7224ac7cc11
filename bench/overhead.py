"""Overhead of ``spruce.sparsify``: training-step time and memory.

(a) Step time: torchvision resnet18, batch 32 (input side ``--size``, 112 by default),
CPU, SGD (lr 0.01, momentum 0.9), train mode, cross-entropy on a fixed random batch.
The dense model and ``sparsify(..., method="static", sparsity=0.9)`` on a twin of it
are stepped alternately (dense, sparse, dense, ...) so that both see the same
machine load; after ``--warmup`` steps each, ``--steps`` steps each are timed. A
sparse step is ``forward + backward + opt.step() + sm.step()``. Reported: medians,
their ratio (goal <= 1.15x) and the median of the per-pair ratios.

(b) Memory: torchvision resnet50 in a fresh subprocess per method; what
``sparsify(model, x, method, sparsity=0.9, total_steps=1000, **METHOD_OPTIONS[method])`` adds:

- tensor storage: bytes of every live tensor storage (found through ``gc``, deduplicated
  by storage) after ``sparsify`` that did not exist before it: masks and any method state;
- Python heap: bytes ``tracemalloc`` still holds after ``sparsify`` (fx graph, generated
  code, layer records), measured on a second twin model;
- RSS delta: resident-set growth across ``sparsify`` (includes allocator slack);

each against the model's parameter bytes. Goal: (parameter bytes + added) / parameter
bytes <= 1.2 for the static method (the other methods are listed for information).

Writes ``bench/results/overhead.md`` atomically.

Usage: ``python bench/overhead.py [--size 112] [--steps 20] [--methods static,rigl] [--skip-time]``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import benchlib

DEFAULT_OUT = benchlib.RESULTS_DIR / "overhead.md"
TIME_GOAL = 1.15
MEMORY_GOAL = 1.2
SPARSITY = 0.9
MEMORY_MODEL = "resnet50"
TIME_MODEL = "resnet18"
METHOD_OPTIONS: dict[str, dict[str, Any]] = {"optg": {"steps_per_epoch": 100}}  # options a method requires


# ----------------------------------------------------------------------------- (a) step time


@dataclass(frozen=True)
class StepTiming:
    """Per-step wall seconds of the dense and sparse model, paired in run order."""

    dense_s: list[float]
    sparse_s: list[float]
    sm_step_s: list[float]  # the ``sm.step()`` part of each sparse step

    @property
    def ratio(self) -> float:
        """Median sparse step / median dense step."""
        return statistics.median(self.sparse_s) / statistics.median(self.dense_s)

    @property
    def paired_ratio(self) -> float:
        """Median over pairs of sparse step / dense step."""
        return statistics.median(s / d for s, d in zip(self.sparse_s, self.dense_s))


def build_resnet(name: str, seed: int) -> Any:
    """torchvision model ``name`` (random init from ``seed``, 1000 classes), train mode."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    return torchvision.models.get_model(name, weights=None).train()


class Stepper:
    """One model, its SGD optimizer and (for a SparseModel) its ``step`` after each update."""

    def __init__(self, model: Any, sparse: bool):
        import torch

        self.model = model
        self.sparse = sparse
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        if sparse:
            model.attach(self.optimizer)

    def step(self, batch: Any, labels: Any) -> tuple[float, float]:
        """One training step; returns (its wall seconds, seconds spent in ``sm.step()``)."""
        from torch.nn import functional

        start = time.perf_counter()
        loss = functional.cross_entropy(self.model(batch), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        sm_start = time.perf_counter()
        if self.sparse:
            self.model.step()
        end = time.perf_counter()
        return end - start, end - sm_start if self.sparse else 0.0


def time_steps(size: int, batch_size: int, warmup: int, steps: int) -> StepTiming:
    """Alternate dense and sparse resnet18 steps; time the last ``steps`` of each."""
    import spruce
    import torch

    generator = torch.Generator().manual_seed(0)
    batch = torch.randn(batch_size, 3, size, size, generator=generator)
    labels = torch.randint(0, 1000, (batch_size,), generator=generator)
    dense = Stepper(build_resnet(TIME_MODEL, seed=0), sparse=False)
    sm = spruce.sparsify(build_resnet(TIME_MODEL, seed=0), (batch[:2],), method="static", sparsity=SPARSITY)
    sparse = Stepper(sm.train(), sparse=True)
    dense_s, sparse_s, sm_step_s = [], [], []
    for index in range(warmup + steps):
        dense_time, _ = dense.step(batch, labels)
        sparse_time, sm_time = sparse.step(batch, labels)
        if index >= warmup:
            dense_s.append(dense_time)
            sparse_s.append(sparse_time)
            sm_step_s.append(sm_time)
    return StepTiming(dense_s, sparse_s, sm_step_s)


# ----------------------------------------------------------------------------- (b) memory (child)


def live_storages() -> dict[int, int]:
    """Every live tensor storage reachable by ``gc``: {data pointer: bytes}."""
    import torch

    gc.collect()
    found: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and obj.layout == torch.strided:
                storage = obj.untyped_storage()
                if storage.data_ptr():
                    found[storage.data_ptr()] = storage.nbytes()
        except Exception:  # noqa: BLE001,S112 - a tensor whose storage cannot be read is skipped
            continue
    return found


def parameter_bytes(model: Any) -> int:
    """Bytes of the model's parameters."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def sparsify_memory(method: str) -> dict[str, Any]:
    """What ``sparsify`` adds to a resnet50 with ``method``: a result dict for :func:`benchlib.emit`."""
    import spruce
    import torch

    example = (torch.randn(1, 3, 224, 224),)
    model = build_resnet(MEMORY_MODEL, seed=0)
    before = live_storages()
    rss_before = benchlib.current_rss_bytes()
    start = time.perf_counter()
    sm = spruce.sparsify(model, example, method=method, sparsity=SPARSITY, total_steps=1000,
                         **METHOD_OPTIONS.get(method, {}))
    sparsify_s = time.perf_counter() - start
    after = live_storages()
    rss_after = benchlib.current_rss_bytes()
    new_storage = sum(nbytes for ptr, nbytes in after.items() if ptr not in before)
    masks = sum(layer.masked.packed_mask.nbytes for layer in sm.layers)
    return {"method": method, "param_bytes": parameter_bytes(model), "new_storage_bytes": new_storage,
            "mask_bytes": masks, "rss_delta_bytes": rss_after - rss_before, "sparsify_s": sparsify_s,
            "sparse_layers": len(sm.layers), "python_heap_bytes": python_heap_of_sparsify(method, example)}


def python_heap_of_sparsify(method: str, example: tuple) -> int:
    """Bytes of Python objects ``sparsify`` leaves alive (on a fresh twin model), by tracemalloc."""
    model = build_resnet(MEMORY_MODEL, seed=0)
    gc.collect()
    tracemalloc.start()
    import spruce

    sm = spruce.sparsify(model, example, method=method, sparsity=SPARSITY, total_steps=1000,
                         **METHOD_OPTIONS.get(method, {}))
    gc.collect()
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del sm
    return current


def child_main(method: str, threads: int) -> int:
    """Child entry point: measure one method and emit its result."""
    benchlib.set_threads(threads)
    try:
        benchlib.emit(sparsify_memory(method))
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        benchlib.emit({"method": method, "error": benchlib.short_error(exc)})
        raise
    return 0


def measure_memory(methods: list[str], threads: int, timeout_s: float) -> list[dict[str, Any]]:
    """Run one child per method; their result dicts (``error`` set when a child failed)."""
    records = []
    for method in methods:
        argv = [str(Path(__file__).resolve()), "--child", method, "--threads", str(threads)]
        outcome = benchlib.run_child(argv, timeout_s)
        record = dict(outcome.result) or {"method": method}
        error = benchlib.outcome_error(outcome, timeout_s, None)
        if error and "error" not in record:
            record["error"] = error
        records.append(record)
        print(f"memory {method}: {record}", flush=True)
    return records


# ----------------------------------------------------------------------------- report


def _mb(value: int | None) -> str:
    """Bytes as MB (10^6) with one decimal, or ``-``."""
    return "-" if value is None else f"{value / 1e6:.1f}"


def memory_ratio(record: dict[str, Any], key: str) -> float | None:
    """(parameter bytes + ``record[key]``) / parameter bytes."""
    if record.get(key) is None or not record.get("param_bytes"):
        return None
    return (record["param_bytes"] + record[key]) / record["param_bytes"]


def memory_lines(records: list[dict[str, Any]]) -> list[str]:
    """The memory table and the verdict for the static method."""
    rows = []
    for r in records:
        added = (r["new_storage_bytes"] + r["python_heap_bytes"]) if "new_storage_bytes" in r else None
        rows.append([r["method"], r.get("sparse_layers", "-"), _mb(r.get("param_bytes")), _mb(r.get("mask_bytes")),
                     _mb(r.get("new_storage_bytes")), _mb(r.get("python_heap_bytes")), _mb(added),
                     benchlib.fmt(memory_ratio({**r, "added": added}, "added"), 3), _mb(r.get("rss_delta_bytes")),
                     benchlib.fmt(memory_ratio(r, "rss_delta_bytes"), 3), benchlib.fmt(r.get("sparsify_s"), 1),
                     r.get("error", "")])
    headers = ["method", "sparse layers", "param MB", "mask MB", "new tensor storage MB", "python heap MB",
               "added MB (storage + heap)", "(params + added) / params", "RSS delta MB",
               "(params + RSS delta) / params", "sparsify s", "error"]
    lines = benchlib.markdown_table(headers, rows)
    static = next((r for r in records if r["method"] == "static" and "new_storage_bytes" in r), None)
    if static is not None:
        ratio = memory_ratio({**static, "added": static["new_storage_bytes"] + static["python_heap_bytes"]}, "added")
        verdict = "meets" if ratio <= MEMORY_GOAL else "MISSES"
        lines += ["", f"**static: (params + added) / params = {ratio:.3f} — {verdict} the goal <= {MEMORY_GOAL}x.** "
                  f"Masks are stored bit-packed (1 bit per 4-byte fp32 weight), so masks alone add "
                  f"{static['mask_bytes'] / static['param_bytes']:.3f} of the parameter bytes."]
    return lines


def time_lines(timing: StepTiming | None, args: argparse.Namespace) -> list[str]:
    """The step-time table and its verdict."""
    if timing is None:
        return ["(skipped)"]
    dense, sparse = statistics.median(timing.dense_s), statistics.median(timing.sparse_s)
    rows = [["dense", f"{1000 * dense:.0f}", f"{1000 * min(timing.dense_s):.0f}", f"{1000 * max(timing.dense_s):.0f}",
             "-"],
            ["static 90%", f"{1000 * sparse:.0f}", f"{1000 * min(timing.sparse_s):.0f}",
             f"{1000 * max(timing.sparse_s):.0f}", f"{1000 * statistics.median(timing.sm_step_s):.1f}"]]
    verdict = "meets" if timing.ratio <= TIME_GOAL else "MISSES"
    return [f"{TIME_MODEL}, batch {args.batch}, input {args.size}x{args.size}, {args.threads} torch thread(s), "
            f"SGD lr 0.01 momentum 0.9, {args.warmup} warm-up + {args.steps} timed steps each, alternating", "",
            *benchlib.markdown_table(["model", "median step ms", "min ms", "max ms", "of which sm.step() ms (median)"],
                                     rows),
            "", f"**ratio of medians sparse / dense = {timing.ratio:.3f} — {verdict} the goal <= {TIME_GOAL}x** "
            f"(median of per-pair ratios {timing.paired_ratio:.3f})."]


def render(info: dict[str, str], timing: StepTiming | None, memory: list[dict[str, Any]],
           args: argparse.Namespace) -> str:
    """The whole Markdown report."""
    lines = ["# spruce sparsify overhead", "", *benchlib.header_lines(info),
             f"- load average (1/5/15 min) at writing: {benchlib.load_average()}", "",
             "## (a) Training-step time: dense vs sparsify(method=\"static\", sparsity=0.9)", "",
             *time_lines(timing, args), "",
             f"## (b) Memory added by sparsify on {MEMORY_MODEL} (sparsity {SPARSITY}, one subprocess per method)", "",
             "new tensor storage = live tensor storages after sparsify that did not exist before (masks, method "
             "state); python heap = what tracemalloc still holds after sparsify on a twin model (fx graph, code, "
             "records); RSS delta includes allocator slack and freed-but-kept pages. MB = 10^6 bytes.", "",
             *memory_lines(memory), ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=112, help="input side for the step timing (224 is ~4x slower)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: two OpenMP threads on a shared 2-core machine time badly)")
    parser.add_argument("--methods", default=None, help="memory methods (default: every method in the registry)")
    parser.add_argument("--skip-time", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per memory child")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def memory_methods(option: str | None) -> list[str]:
    """The methods to measure: ``option`` split, or static first then the rest of the registry."""
    if option:
        return [m.strip() for m in option.split(",") if m.strip()]
    from spruce.passes.sparsity.methods import METHODS

    return ["static"] + sorted(m for m in METHODS if m != "static")


def main(argv: list[str] | None = None) -> int:
    """Measure, write the report; 0 when both goals are met and nothing failed."""
    args = parse_args(argv)
    if args.child:
        return child_main(args.child, args.threads)
    benchlib.set_threads(args.threads)
    info = benchlib.machine_info(["spruce"])
    memory = [] if args.skip_memory else measure_memory(memory_methods(args.methods), args.threads, args.timeout)
    timing = None if args.skip_time else time_steps(args.size, args.batch, args.warmup, args.steps)
    if timing is not None:
        print(f"step time: dense {statistics.median(timing.dense_s):.3f} s, sparse "
              f"{statistics.median(timing.sparse_s):.3f} s, ratio {timing.ratio:.3f}", flush=True)
    benchlib.write_atomic(args.out, render(info, timing, memory, args))
    print(f"wrote {args.out}")
    failed = any("error" in r for r in memory)
    static = next((r for r in memory if r.get("method") == "static" and "new_storage_bytes" in r), None)
    memory_ok = static is None or (static["param_bytes"] + static["new_storage_bytes"] + static["python_heap_bytes"]
                                   ) / static["param_bytes"] <= MEMORY_GOAL
    time_ok = timing is None or timing.ratio <= TIME_GOAL
    return 0 if time_ok and memory_ok and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
