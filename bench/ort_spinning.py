"""Does ONNX Runtime's thread spinning distort interleaved timing? (issues 14 and 15)

``Target.measure_models`` builds one session per model and times them interleaved. With
ONNX Runtime's default ``session.intra_op.allow_spinning = 1``, a session's worker threads
keep spinning after each run, so in a check of several sessions the idle ones contend for
the cores with the one being timed. This bench times copies of one model, which must give
the same figure:

- interleaved ``--copies`` sessions, spinning on (ONNX Runtime's default) and off (the
  target's default since this bench: ``OnnxRuntimeCPU(spinning=False)``);
- one session alone, spinning on and off, as the reference.

Per case it reports the load-robust figure (``Timings.robust_ms``), the wall-clock median,
the waiting share, and the spread between copies (max/min - 1). The model is
``bench/structured.py``'s MNIST CNN at batch 32, ONNX Runtime CPU, 2 intra-op threads.
Writes ``bench/results/ort_spinning.md`` atomically.

Usage: ``python bench/ort_spinning.py [--copies 4] [--rounds 30] [--repeats 2] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import benchlib
import torch
from spruce.targets.onnxruntime import OnnxRuntimeCPU
from structured import LATENCY_BATCH, small_cnn

DEFAULT_OUT = benchlib.RESULTS_DIR / "ort_spinning.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2, help="times the whole comparison runs")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    info = benchlib.machine_info(["onnxruntime"])
    torch.manual_seed(0)
    model = small_cnn().eval()
    copies = [model] * args.copies
    example = (torch.randn(LATENCY_BATCH, 1, 28, 28),)
    targets = {"spinning on (ORT's default)": OnnxRuntimeCPU(threads=2, spinning=True),
               "spinning off (spruce's default)": OnnxRuntimeCPU(threads=2)}
    rows = []
    for repeat in range(args.repeats):
        for name, target in targets.items():
            for label, models in ((f"{args.copies} copies interleaved", copies), ("alone", [model])):
                timings = target.measure_models([(m, example) for m in models], rounds=args.rounds)
                robust = [t.robust_ms() for t in timings]
                rows.append([repeat, name, label, " / ".join(f"{r:.2f}" for r in robust),
                             f"{max(robust) / min(robust) - 1:.1%}",
                             " / ".join(f"{t.wall_median_ms():.2f}" for t in timings),
                             " / ".join(f"{t.waiting_share():.0%}" for t in timings)])
                print(rows[-1], flush=True)
    lines = ["# ONNX Runtime thread spinning and interleaved timing", "",
             "Produced by `bench/ort_spinning.py` (see its docstring).", "", *benchlib.header_lines(info),
             f"- load average (1/5/15 min) at the end: {benchlib.load_average()}",
             f"- command: python bench/ort_spinning.py {' '.join(sys.argv[1:] if argv is None else argv)}", "",
             "Copies of one model (the MNIST CNN of `structured.py`, batch 32, 2 intra-op threads) must time "
             "the same.", ""]
    lines += benchlib.markdown_table(["repeat", "sessions", "case", "robust ms per copy", "spread",
                                      "wall median ms", "waiting share"], rows)
    benchlib.write_atomic(args.out, "\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
