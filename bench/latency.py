"""Latency tables on ONNX Runtime CPU: profiling cost and prediction accuracy.

For each torchvision model (random weights, input 1x3x224x224, batch 1):

1. ``spruce.runtime.profile.profile`` on ONNX Runtime CPU with ``--threads`` intra-op
   threads, step ``--step``, into a fresh cache folder (cold: everything timed), then
   again on the same cache (warm: nothing should be timed). Both wall times are
   reported (goal for resnet50: cold < 5 min on 2 cores, warm a few seconds).
2. ``--configs`` random channel configurations (seed ``--seed``; disjoint from the
   profile's own calibration draws): each prunable channel group keeps a random width,
   a multiple of ``--step`` (one base fraction in [0.2, 1] per configuration, each group
   jittered by +-30 %; see ``random_group_widths``). The compact model is built by
   physical channel removal and timed on the same target: two rounds of 3 warm-ups +
   ``--repeats`` runs, the lower of the two medians kept (a load burst rarely hits both).
3. Error = predicted / measured - 1. Also reported: the plain sum of isolated layer
   times (what a table without the whole-model correction would predict).

Goal: median |error| <= 5 %, max <= 15 % per model.

Writes ``bench/results/latency.md`` and ``bench/results/latency.json`` atomically.
Run on a quiet machine, e.g. ``nice -n 5 python bench/latency.py`` (~4 min on 2 cores for the three
models); ``--models resnet18 --configs 5`` for a quick check.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402

DEFAULT_MODELS = "resnet18,resnet50,mobilenet_v2"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated (default {DEFAULT_MODELS})")
    parser.add_argument("--configs", type=int, default=20, help="random configurations per model")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--step", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per whole-model measurement")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cuda", action="store_true",
                        help="profile the torch target on CUDA (fp16) instead of ONNX Runtime CPU")
    parser.add_argument("--out", type=Path, default=benchlib.RESULTS_DIR / "latency.md")
    return parser.parse_args(argv)


def bench_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torchvision
    from spruce.compiler.api import analyze_model, profile
    from spruce.runtime.profile import compact_at_widths, random_group_widths
    from spruce.targets.onnxruntime import OnnxRuntimeCPU

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    inputs = (torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)),)
    target = OnnxRuntimeCPU(threads=args.threads)
    if args.cuda:
        from spruce.targets.pytorch import TorchTarget

        target = TorchTarget(device="cuda", dtype="float16")
    with tempfile.TemporaryDirectory(prefix="spruce-latency-cache-") as cache:
        start = time.perf_counter()
        table = profile(model, inputs, target, args.step, cache_dir=cache, progress=False)
        cold_s = time.perf_counter() - start
        start = time.perf_counter()
        again = profile(model, inputs, target, args.step, cache_dir=cache, progress=False)
        warm_s = time.perf_counter() - start
    assert again.points == table.points, "a cached profile differs from the profile it was cached from"

    analysis = analyze_model(model, inputs)
    rng = np.random.default_rng(args.seed)
    rows = []
    for index in range(args.configs):
        compact = compact_at_widths(analysis, model, random_group_widths(analysis.groups, rng, args.step))
        widths = table.widths_of(compact)
        measured = min(float(np.median(target.time_model(compact, inputs, 3, args.repeats))) for _ in range(2)) * 1e3
        predicted = table.predict(widths)
        isolated = sum(e.calls * table.isolated_ms(n, *widths[n]) for n, e in table.layers.items())
        kept = sum(w[1] for w in widths.values()) / sum(e.out_channels for e in table.layers.values())
        rows.append({"config": index, "kept_out_channels": kept, "measured_ms": measured, "predicted_ms": predicted,
                     "error": predicted / measured - 1, "isolated_sum_ms": isolated,
                     "isolated_error": isolated / measured - 1})
        print(f"{name} config {index}: measured {measured:.2f} ms predicted {predicted:.2f} ms "
              f"({100 * rows[-1]['error']:+.1f} %)", flush=True)
    errors = np.abs([r["error"] for r in rows])
    isolated_errors = np.abs([r["isolated_error"] for r in rows])
    cal = table.calibration
    return {
        "model": name, "layers": len(table.layers), "signatures": len(table.points),
        "points": sum(map(len, table.points.values())), "profile_cold_s": cold_s, "profile_warm_s": warm_s,
        "dense_measured_ms": cal.samples[0]["ms"] if cal.samples else None, "dense_predicted_ms": table.dense_ms(),
        "calibration": {"scale": cal.scale, "ms_per_melement": cal.ms_per_melement, "overhead_ms": cal.overhead_ms,
                        "samples": len(cal.samples)},
        "median_abs_error": float(np.median(errors)), "max_abs_error": float(errors.max()),
        "isolated_median_abs_error": float(np.median(isolated_errors)),
        "isolated_max_abs_error": float(isolated_errors.max()),
        "configs": rows,
    }


def report(results: list[dict[str, Any]], info: dict[str, str], args: argparse.Namespace) -> str:
    where = "torch CUDA (fp16)" if args.cuda else "ONNX Runtime CPU"
    lines = [f"# Latency tables on {where}", "", "Produced by `bench/latency.py` (see its docstring for the "
             "method).", "", *benchlib.header_lines(info), ""]
    lines += ["## Summary", ""]
    lines += benchlib.markdown_table(
        ["model", "layers", "signatures", "points timed", "profile cold (s)", "profile cached (s)",
         "dense measured (ms)", "dense predicted (ms)", "median abs error", "max abs error",
         "isolated-sum median / max error"],
        [[r["model"], r["layers"], r["signatures"], r["points"], benchlib.fmt(r["profile_cold_s"], 1),
          benchlib.fmt(r["profile_warm_s"], 1), benchlib.fmt(r["dense_measured_ms"]),
          benchlib.fmt(r["dense_predicted_ms"]), f"{100 * r['median_abs_error']:.1f} %",
          f"{100 * r['max_abs_error']:.1f} %",
          f"{100 * r['isolated_median_abs_error']:.1f} % / {100 * r['isolated_max_abs_error']:.1f} %"]
         for r in results])
    lines += ["", f"Goals: median abs error <= 5 %, max <= 15 % ({args.configs} random configurations per model); "
              "resnet50 cold profile < 300 s on 2 cores; cached profile a few seconds.", ""]
    for r in results:
        cal = r["calibration"]
        lines += [f"## {r['model']}", "",
                  f"Calibration ({cal['samples']} whole-model timings): scale {cal['scale']:.3f}, "
                  f"{cal['ms_per_melement']:.4f} ms per million activation elements, "
                  f"overhead {cal['overhead_ms']:+.3f} ms.", ""]
        lines += benchlib.markdown_table(
            ["config", "kept out-channels", "measured (ms)", "predicted (ms)", "error", "isolated sum (ms)",
             "isolated error"],
            [[c["config"], f"{c['kept_out_channels']:.2f}", benchlib.fmt(c["measured_ms"]),
              benchlib.fmt(c["predicted_ms"]), f"{100 * c['error']:+.1f} %", benchlib.fmt(c["isolated_sum_ms"]),
              f"{100 * c['isolated_error']:+.1f} %"] for c in r["configs"]])
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    info = benchlib.machine_info(["onnxruntime", "onnx"])
    if args.cuda:
        info["gpu"] = torch.cuda.get_device_name()
        info["target"] = "torch, device cuda, float16, eager; CUDA-synchronised timing"
    else:
        info["ONNX Runtime threads"] = f"intra-op {args.threads}, inter-op 1 (torch threads {args.threads})"
    info["command"] = "python bench/latency.py " + " ".join(sys.argv[1:] if argv is None else argv)
    results = []
    for name in [m for m in args.models.split(",") if m]:
        results.append(bench_model(name, args))
    info["load average (1/5/15 min) at end"] = benchlib.load_average()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    benchlib.write_atomic(args.out.with_suffix(".json"), json.dumps({"info": info, "results": results}, indent=1))
    benchlib.write_atomic(args.out, report(results, info, args))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
