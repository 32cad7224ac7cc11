"""Channel selection during recovery: one-shot vs a method re-selecting channels (issue 14).

``spruce compile`` of the embedded default (its small CNN trained on the bundled digits, seed
fixed) under a latency budget on ONNX Runtime CPU at batch 1, four ways, each from the same
trained model: ``--recover none`` (one-shot L1 selection + BatchNorm re-estimation),
``--recover distill`` (the same one-shot selection, then distillation), and ``--recover
distill --method halp`` / ``--method iee`` (the method re-selects channels under the budget
while distillation trains; its final channels are measured and re-aimed when above the band).
Reported per run: held-out accuracy and top-1 agreement with dense, the measured
compiled/dense latency ratio of what ships (interleaved, one run) and whether it is in the
band [0.9, 1.05] x budget, the method's mask updates, knapsack selections, zero-gradient
fallbacks, its own final ratio and whether it was re-aimed, and the compile's wall time.
Writes ``bench/results/recovery_methods.md`` atomically with the machine, versions and the
load average at start and end.

Usage: ``python bench/recovery_methods.py [--seeds 0,1] [--epochs 4] [--budget 0.5] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib
import torch

RUNS = (("none", None), ("distill", None), ("distill", "halp"), ("distill", "iee"))


def one_run(recover: str, method: str | None, seed: int, epochs: int, budget: float) -> dict[str, Any]:
    import spruce

    options: dict[str, Any] = {"method": method} if method else {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        report = spruce.compile(None, out=Path(folder) / "out", recover=recover, seed=seed, epochs=epochs,
                                budget={"latency": budget}, bench_iters=50, bench_batch_sizes=(1,), quiet=True,
                                **options)
    wall = time.perf_counter() - start
    doc = report.document
    recovery, budget_record = doc["recovery"], doc["budget"]
    final = recovery.get("final_check") or {}
    fidelity = doc["evaluation"]["fidelity"]["per_output"]
    agreement = next(iter(fidelity.values())).get("top1_agreement")
    return {"recover": recover, "method": method or "-", "seed": seed, "dense_accuracy": doc["dense"]["accuracy"],
            "accuracy": doc["compiled"]["accuracy"], "agreement": agreement,
            "ratio": budget_record["measured_ratio"], "in_band": budget_record["in_band"],
            "mask_updates": recovery.get("mask_updates", 0), "selections": recovery.get("selections", 0),
            "fallbacks": recovery.get("importance_fallbacks", 0), "method_ratio": final.get("method_ratio"),
            "re_aimed": final.get("re_aimed"), "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=benchlib.RESULTS_DIR / "recovery_methods.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    info = benchlib.machine_info(["onnxruntime"])
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for recover, method in RUNS:
            result = one_run(recover, method, seed, args.epochs, args.budget)
            rows.append(result)
            print(result, flush=True)
    table = benchlib.markdown_table(
        ["recover", "method", "seed", "dense acc", "compiled acc", "top-1 agreement", "measured ratio", "in band",
         "mask updates", "selections", "fallbacks", "method's own ratio", "re-aimed", "wall s"],
        [[r["recover"], r["method"], r["seed"], benchlib.fmt(r["dense_accuracy"], 4), benchlib.fmt(r["accuracy"], 4),
          benchlib.fmt(r["agreement"], 4), benchlib.fmt(r["ratio"], 3), r["in_band"], r["mask_updates"],
          r["selections"], r["fallbacks"], benchlib.fmt(r["method_ratio"], 3),
          "-" if r["re_aimed"] is None else r["re_aimed"], benchlib.fmt(r["wall_s"], 0)] for r in rows])
    lines = ["# Channel selection during recovery: one-shot vs halp / iee (issue 14)", "",
             *benchlib.header_lines(info), f"- load average (1/5/15 min) at end: {benchlib.load_average()}",
             f"- `spruce compile` of the embedded default (digits CNN, trained with each seed), budget latency="
             f"{args.budget} on ONNX Runtime CPU at batch 1, {args.epochs} epochs of training and of recovery; "
             "accuracy and agreement on the held-out digits; the measured ratio is compiled/dense timed "
             "interleaved in one run (of what ships)", "", *table, ""]
    benchlib.write_atomic(args.out, "\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
