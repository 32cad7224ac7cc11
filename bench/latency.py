"""Latency tables on ONNX Runtime CPU under load: profiling cost and prediction accuracy.

The machine is kept busy on purpose: ``--busy`` extra processes (default 1) run a
pure-Python busy loop from before profiling until after the last check, and whatever else
runs on the machine (other users' jobs) is recorded, not stopped. For each torchvision model
(random weights, input 1x3x224x224, batch 1):

1. ``spruce.runtime.profile.profile`` on ONNX Runtime CPU with ``--threads`` intra-op
   threads, step ``--step``, into a fresh cache folder (cold: everything timed), then
   again on the same cache (warm: nothing should be timed). Both wall times are reported.
   The timed sessions' threads are pinned one per CPU (``OnnxRuntimeCPU(pin_threads=True)``,
   the default; ``--no-pin`` for the unpinned figures), and every chunk of points is scaled
   to the profile's reference layer (``spruce.runtime.measure.Reference``).
2. ``--configs`` random channel configurations (seed ``--seed``; disjoint from the
   profile's own calibration draws): each prunable channel group keeps a random width,
   a multiple of ``--step`` (one base fraction in [0.2, 1] per configuration, each group
   jittered by +-30 %; see ``random_group_widths``). The compact models are built by
   physical channel removal and timed on the same target with ``Target.measure_models``,
   ``--batch`` configurations and the dense model interleaved at a time, ``--rounds``
   rounds (default 100): a model's figure is the mean of its inlier calls with the run-queue waiting of
   the threads that ran excluded (``spruce.targets.timing``), the same statistic the profile
   uses.
3. Error of the latency *relative to dense*: (predicted / predicted dense) / (measured /
   measured dense) - 1, the dense model timed in the same interleaved rounds. This is what a
   budget (a fraction of dense) depends on, and it is what can be compared across a change of
   load: the other processes on a shared machine slow the dense and the compact model alike,
   but they move every absolute figure between the profile and the check (the dense model's
   load-robust time drifted by 5-8 % within half an hour here). Also reported per
   configuration: the absolute error (predicted ms / measured ms - 1, which contains that
   drift), the plain wall-clock median (what a naive timing sees under this load) and the
   share of wall time the threads that ran waited for a CPU (their mean).
4. The check's own noise: every interleaved check times a second session of the dense model
   (its *twin*) next to the first; |twin / dense - 1| bounds how accurate a prediction can be
   shown to be at ``--rounds`` rounds under this load.

Goal: median |relative error| <= 5 %, max <= 20 % per model, with the busy loop running.

Writes ``bench/results/latency.md`` and ``bench/results/latency.json`` atomically.
Run: ``python bench/latency.py`` (about 35-60 min on 2 loaded cores for the three models);
``--models resnet18 --configs 5`` for a quick check.
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
    parser.add_argument("--rounds", type=int, default=100, help="interleaved rounds per checked model")
    parser.add_argument("--batch", type=int, default=5, help="configurations timed interleaved with dense at once")
    parser.add_argument("--spinning", action="store_true",
                        help="ONNX Runtime sessions spin (its own default; the target's default is off)")
    parser.add_argument("--no-pin", action="store_true",
                        help="do not pin the timed sessions' threads (OnnxRuntimeCPU(pin_threads=False))")
    parser.add_argument("--busy", type=int, default=1, help="extra busy-loop processes during the whole run")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "int8"),
                        help="ONNX Runtime target precision: int8 profiles and checks INT8 layers and models "
                        "(each quantized by onnxruntime.quantization before it is timed)")
    parser.add_argument("--cuda", action="store_true",
                        help="profile the torch target on CUDA (fp16) instead of ONNX Runtime CPU")
    parser.add_argument("--save-tables", type=Path, default=None,
                        help="also write each model's table and checked widths as JSON into this folder")
    parser.add_argument("--out", type=Path, default=benchlib.RESULTS_DIR / "latency.md")
    return parser.parse_args(argv)


def bench_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torchvision
    from spruce.api.verbs import analyze_model, profile
    from spruce.runtime.calibration import compact_at_widths, random_group_widths
    from spruce.targets.onnxruntime import OnnxRuntimeCPU

    started = time.perf_counter()
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    inputs = (torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)),)
    target = OnnxRuntimeCPU(threads=args.threads, spinning=args.spinning, pin_threads=not args.no_pin,
                            precision=args.precision)
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
    print(f"{name}: profiled in {cold_s:.0f} s (cached {warm_s:.1f} s)", flush=True)

    analysis = analyze_model(model, inputs)
    rng = np.random.default_rng(args.seed)
    compacts = [compact_at_widths(analysis, model, random_group_widths(analysis.groups, rng, args.step))
                for _ in range(args.configs)]
    dense_predicted = table.dense_ms()
    rows, noise = [], []
    for start in range(0, len(compacts), args.batch):
        batch = compacts[start:start + args.batch]
        # the dense model twice: its second session's disagreement with the first is the check's own noise
        timings = target.measure_models([(model, inputs), (model, inputs)] + [(m, inputs) for m in batch],
                                        warmup=2, rounds=args.rounds)
        dense, twin = timings[0], timings[1]
        noise.append(twin.robust_ms() / dense.robust_ms() - 1)
        print(f"{name} configs {start}-{start + len(batch) - 1}: dense {dense.robust_ms():.2f} ms, its twin "
              f"{100 * noise[-1]:+.1f} %", flush=True)
        for offset, (compact, timing) in enumerate(zip(batch, timings[2:])):
            widths = table.widths_of(compact)
            measured, predicted = timing.robust_ms(), table.predict(widths)
            kept = sum(w[1] for w in widths.values()) / sum(e.out_channels for e in table.layers.values())
            relative = (predicted / dense_predicted) / (measured / dense.robust_ms())
            rows.append({"config": start + offset, "kept_out_channels": kept, "measured_ms": measured,
                         "predicted_ms": predicted, "error": predicted / measured - 1,
                         "relative_error": relative - 1, "wall_median_ms": timing.wall_median_ms(),
                         "wall_error": predicted / timing.wall_median_ms() - 1,
                         "waiting_share": timing.waiting_share(), "dense_measured_ms": dense.robust_ms()})
            print(f"{name} config {start + offset}: measured {measured:.2f} ms predicted {predicted:.2f} ms "
                  f"({100 * rows[-1]['error']:+.1f} %, relative to dense {100 * rows[-1]['relative_error']:+.1f} %); "
                  f"wall median {timing.wall_median_ms():.1f} ms, "
                  f"waiting {100 * timing.waiting_share():.0f} %", flush=True)
    if args.save_tables is not None:
        args.save_tables.mkdir(parents=True, exist_ok=True)
        checked = [{"widths": {n: list(w) for n, w in table.widths_of(c).items()}, **row}
                   for c, row in zip(compacts, rows)]
        benchlib.write_atomic(args.save_tables / f"{name}.json",
                              json.dumps({"table": table.to_dict(), "checked": checked}))
    errors = np.abs([r["error"] for r in rows])
    relative_errors = np.abs([r["relative_error"] for r in rows])
    wall_errors = np.abs([r["wall_error"] for r in rows])
    cal = table.calibration
    return {
        "model": name, "layers": len(table.layers), "signatures": len(table.points),
        "points": sum(map(len, table.points.values())), "profile_cold_s": cold_s, "profile_warm_s": warm_s,
        "dense_measured_ms": cal.samples[0]["ms"] if cal.samples else None, "dense_predicted_ms": dense_predicted,
        "calibration": {"scale": cal.scale, "family_scale": dict(cal.family_scale),
                        "ms_per_melement": cal.ms_per_melement, "overhead_ms": cal.overhead_ms,
                        "ms_per_mweight": cal.ms_per_mweight, "fixed_ms_sum": sum(
                            e.calls * cal.fixed_ms.get(e.signature, 0.0) for e in table.layers.values()),
                        "samples": len(cal.samples),
                        "fit": [{"ms": s["ms"], "predicted_ms": table.predict({n: tuple(w) for n, w in
                                                                              s["widths"].items()})}
                                for s in cal.samples]},
        "median_abs_error": float(np.median(errors)), "max_abs_error": float(errors.max()),
        "relative_median_abs_error": float(np.median(relative_errors)),
        "relative_max_abs_error": float(relative_errors.max()),
        "wall_median_abs_error": float(np.median(wall_errors)), "wall_max_abs_error": float(wall_errors.max()),
        "median_waiting_share": float(np.median([r["waiting_share"] for r in rows])),
        "twin_errors": noise, "twin_median_abs_error": float(np.median(np.abs(noise))),
        "twin_max_abs_error": float(np.max(np.abs(noise))),
        "wall_s": time.perf_counter() - started,
        "configs": rows,
    }


def _pct(value: float) -> str:
    return f"{100 * value:.1f} %"


def _family_text(family_scale: dict[str, float]) -> str:
    """The per-family scales of an INT8 table's calibration, as a parenthesis ('' for a one-scale fit)."""
    if not family_scale:
        return ""
    return (" (of the one-scale fit; the table's, per layer family: "
            + ", ".join(f"{family} {scale:.3f}" for family, scale in family_scale.items()) + ")")


def report(results: list[dict[str, Any]], info: dict[str, str], args: argparse.Namespace) -> str:
    where = "torch CUDA (fp16)" if args.cuda else f"ONNX Runtime CPU ({args.precision.upper()})"
    lines = [f"# Latency tables on {where}, under load", "", "Produced by `bench/latency.py` (see its docstring "
             "for the method).", "", *benchlib.header_lines(info), ""]
    lines += ["## Summary", ""]
    lines += benchlib.markdown_table(
        ["model", "layers", "signatures", "points timed", "profile cold (s)", "profile cached (s)",
         "dense measured (ms)", "dense predicted (ms)", "median abs relative error", "max abs relative error",
         "absolute error median / max", "wall-median median / max", "waiting share",
         "dense twin median / max", "model wall (s)"],
        [[r["model"], r["layers"], r["signatures"], r["points"], benchlib.fmt(r["profile_cold_s"], 0),
          benchlib.fmt(r["profile_warm_s"], 1), benchlib.fmt(r["dense_measured_ms"]),
          benchlib.fmt(r["dense_predicted_ms"]), _pct(r["relative_median_abs_error"]),
          _pct(r["relative_max_abs_error"]),
          f"{_pct(r['median_abs_error'])} / {_pct(r['max_abs_error'])}",
          f"{_pct(r['wall_median_abs_error'])} / {_pct(r['wall_max_abs_error'])}",
          _pct(r["median_waiting_share"]),
          f"{_pct(r['twin_median_abs_error'])} / {_pct(r['twin_max_abs_error'])}",
          benchlib.fmt(r["wall_s"], 0)]
         for r in results])
    lines += ["", f"Goals: median abs relative error <= 5 %, max <= 20 % ({args.configs} random configurations per "
              f"model, {args.busy} busy-loop process(es) running throughout). *relative error*: of the latency as a "
              "fraction of dense, the dense model timed interleaved with the configurations; *absolute error*: "
              "predicted ms against measured ms, which also holds the drift of the machine's load between "
              "profile and check. *measured* is the load-robust figure (inlier mean of the calls, run-queue "
              "waiting excluded); *wall-median* compares the prediction with the plain median wall time instead, "
              "which under this load mostly measures the other processes; *waiting share* is the median share "
              "of a call's wall time the threads that ran waited for a CPU (their mean); *dense twin*: a second "
              "session of the dense "
              "model timed in each interleaved check against the first (|twin / dense - 1|), the check's own "
              "noise: a prediction cannot be shown more accurate than this.", ""]
    for r in results:
        cal = r["calibration"]
        lines += [f"## {r['model']}", "",
                  f"Calibration ({cal['samples']} whole-model timings, interleaved): scale {cal['scale']:.3f}"
                  f"{_family_text(cal.get('family_scale') or {})}, "
                  f"{cal['ms_per_melement']:.4f} ms per million activation elements, "
                  f"{cal['ms_per_mweight']:.4f} ms per million weights, overhead {cal['overhead_ms']:.3f} ms; "
                  f"fixed costs of the isolated timings, summed over the layers: {cal['fixed_ms_sum']:.3f} ms; "
                  "its own samples (measured -> predicted): "
                  + ", ".join(f"{s['ms']:.2f} -> {s['predicted_ms']:.2f}" for s in cal["fit"]) + " ms.", ""]
        lines += benchlib.markdown_table(
            ["config", "kept out-channels", "measured (ms)", "predicted (ms)", "relative error", "absolute error",
             "dense measured (ms)", "wall median (ms)", "waiting share"],
            [[c["config"], f"{c['kept_out_channels']:.2f}", benchlib.fmt(c["measured_ms"]),
              benchlib.fmt(c["predicted_ms"]), f"{100 * c['relative_error']:+.1f} %",
              f"{100 * c['error']:+.1f} %", benchlib.fmt(c["dense_measured_ms"]), benchlib.fmt(c["wall_median_ms"], 1),
              _pct(c["waiting_share"])] for c in r["configs"]])
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
        from spruce.targets.onnxruntime import timing_cpus

        pinned = None if args.no_pin else timing_cpus(args.threads)
        from spruce.targets.quantize import cpu_isa_flags

        info["precision"] = args.precision + (" (static QDQ U8S8, per-channel weights, each layer and model "
                                              "calibrated on its example input)" if args.precision == "int8" else "")
        info["cpu ISA flags"] = ", ".join(cpu_isa_flags())
        info["ONNX Runtime threads"] = (f"intra-op {args.threads}, inter-op 1 (torch threads {args.threads}), "
                                        f"spinning {'on' if args.spinning else 'off'}, timed threads "
                                        + (f"pinned to CPUs {pinned} (the timing thread on the first)" if pinned
                                           else "not pinned"))
    info["command"] = "python bench/latency.py " + " ".join(sys.argv[1:] if argv is None else argv)
    results = []
    started = time.perf_counter()
    with benchlib.BusyLoad(args.busy) as load:
        for name in [m for m in args.models.split(",") if m]:
            results.append(bench_model(name, args))
    info["extra load"] = load.summary()
    info["load average (1/5/15 min) at end"] = benchlib.load_average()
    info["wall time"] = f"{time.perf_counter() - started:.0f} s"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    benchlib.write_atomic(args.out.with_suffix(".json"), json.dumps({"info": info, "results": results}, indent=1))
    benchlib.write_atomic(args.out, report(results, info, args))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
