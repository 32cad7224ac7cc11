"""INT8 vs fp32 on the ONNX Runtime CPU target (issue 31, first part).

For each model, the fp32 artifact (``OnnxRuntimeCPU``) and the INT8 one
(``OnnxRuntimeCPU(precision="int8")``: static QDQ U8S8, per-channel symmetric weights, MinMax
calibration on 128 samples, see ``spruce.targets.quantize``) are built, then timed interleaved
at batch 1 and 2 intra-op threads by ``spruce.bench`` (one call of each per round, the order
rotating; load-robust figure = wall time less run-queue waiting, outliers rejected). The
comparison runs ``--repeats`` times; the INT8/fp32 latency ratio is reported per repeat and as the
median. Also reported: the share of conv/matmul MACs ONNX Runtime runs in integer kernels, the
INT8 output's largest error relative to fp32 on held-out inputs and their top-1 agreement, build
times and peak memory.

Models: torchvision resnet18 at 224 (seeded random weights made non-degenerate; calibrated on
128 and checked on 32 other standard-normal inputs), and the embedded digits CNN
(``spruce.compiler.datasets.default_model``, 32x32, trained here for ``--epochs`` epochs on the
bundled sklearn digits; calibrated on 128 training images, checked on the test split).

Writes ``bench/results/int8.md`` atomically. Usage:
``python bench/int8.py [--models resnet18,digits] [--rounds 200] [--repeats 3] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import benchlib
import numpy as np
import torch
from spruce.compiler.datasets import default_model, inputs_of, load_data
from spruce.runtime.bench import bench
from spruce.targets.onnxruntime import OnnxRuntimeCPU
from spruce.targets.quantize import MIN_CALIBRATION_SAMPLES, cpu_isa_flags, integer_mac_share

DEFAULT_OUT = benchlib.RESULTS_DIR / "int8.md"
THREADS = 2


def resnet18_case() -> dict:
    model, shape = benchlib.build_model("resnet18")
    benchlib.make_nondegenerate(model, shape)
    calibration = [(benchlib.random_input(shape, seed=1000 + k),) for k in range(MIN_CALIBRATION_SAMPLES)]
    held_out = torch.cat([benchlib.random_input(shape, seed=5000 + k) for k in range(32)])
    return {"model": model.eval(), "example": (benchlib.random_input(shape, seed=0),), "calibration": calibration,
            "held_out": held_out, "note": "random weights, standard-normal inputs"}


def digits_case(epochs: int) -> dict:
    loaders = load_data("digits", seed=0, batch_size=64)
    model = default_model(loaders)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(epochs):
        for images, labels in loaders.train:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
    model.eval()
    train = torch.cat([inputs_of(batch) for batch in loaders.train])
    test = torch.cat([inputs_of(batch) for batch in loaders.test])
    labels = torch.cat([batch[1] for batch in loaders.test])
    with torch.no_grad():
        accuracy = float((model(test).argmax(1) == labels).float().mean())
    calibration = [(train[k:k + 1],) for k in range(MIN_CALIBRATION_SAMPLES)]
    return {"model": model, "example": (loaders.example,), "calibration": calibration, "held_out": test,
            "note": f"trained {epochs} epochs, fp32 test accuracy {accuracy:.3f}"}


def run_case(name: str, case: dict, folder: Path, rounds: int, repeats: int) -> dict:
    fp32_target = OnnxRuntimeCPU(threads=THREADS)
    int8_target = OnnxRuntimeCPU(threads=THREADS, precision="int8")
    start = time.perf_counter()
    fp32 = fp32_target.build(case["model"], case["example"], folder / f"{name}.fp32.onnx")
    fp32_s = time.perf_counter() - start
    start = time.perf_counter()
    int8 = int8_target.build(case["model"], case["example"], folder / f"{name}.int8.onnx",
                             calibration_data=case["calibration"])
    int8_s = time.perf_counter() - start
    x = [case["example"][0].numpy()]
    share = integer_mac_share(int8.path, x).integer_share
    held_out = [case["held_out"].numpy()]
    expected = fp32_target.load(fp32)(held_out)[0]
    actual = fp32_target.load(int8)(held_out)[0]
    error = float(np.abs(actual - expected).max() / np.abs(expected).max())
    agreement = float((actual.argmax(1) == expected.argmax(1)).mean())
    ratios, medians = [], []
    for _ in range(repeats):
        report = bench(int8, fp32_target, batch_sizes=(1,), warmup=20, iters=rounds, dense=fp32)
        ratios.append(1.0 / report.robust_speedup[1])
        medians.append((report.row("dense", 1).median_ms, report.row("compiled", 1).median_ms,
                        report.row("dense", 1).robust_ms, report.row("compiled", 1).robust_ms,
                        1.0 / report.speedup[1]))
        print(name, ratios[-1], medians[-1], flush=True)
    return {"name": name, "note": case["note"], "share": share, "error": error, "agreement": agreement,
            "held_out": len(case["held_out"]), "fp32_s": fp32_s, "int8_s": int8_s, "ratios": ratios,
            "medians": medians, "quantization": int8.info["quantization"], "fingerprint": int8_target.fingerprint()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,digits")
    parser.add_argument("--rounds", type=int, default=200, help="timed calls of each artifact per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15, help="training epochs of the digits CNN")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    info = benchlib.machine_info(["onnxruntime", "onnx"])
    info["cpu ISA flags"] = ", ".join(cpu_isa_flags()) or "unknown"
    results = []
    with tempfile.TemporaryDirectory(prefix="spruce-int8-") as folder:
        for name in args.models.split(","):
            case = resnet18_case() if name == "resnet18" else digits_case(args.epochs)
            results.append(run_case(name, case, Path(folder), args.rounds, args.repeats))
    end_load = benchlib.load_average()
    rows = []
    for r in results:
        dense_ms, int8_ms = (float(np.median([m[k] for m in r["medians"]])) for k in (0, 1))
        rows.append([r["name"], r["note"], f"{float(np.median(r['ratios'])):.2f}",
                     " / ".join(f"{v:.2f}" for v in r["ratios"]),
                     f"{float(np.median([m[4] for m in r['medians']])):.2f}", f"{dense_ms:.2f}", f"{int8_ms:.2f}",
                     f"{r['share']:.3f}", f"{r['error']:.2%}", f"{r['agreement']:.3f} ({r['held_out']})",
                     f"{r['fp32_s']:.0f} / {r['int8_s']:.0f}"])
    command = " ".join(sys.argv[1:] if argv is None else argv)
    quantization = results[0]["quantization"] if results else {}
    lines = ["# INT8 vs fp32 on ONNX Runtime CPU", "", "Produced by `bench/int8.py` (see its docstring).", "",
             *benchlib.header_lines(info), f"- load average (1/5/15 min) at the end: {end_load}",
             f"- peak RSS of the run: {benchlib.peak_rss_mb():.0f} MB",
             f"- command: python bench/int8.py {command}",
             f"- timing: `spruce.bench`, batch 1, {THREADS} intra-op threads (pinned), {args.rounds} interleaved "
             f"rounds per repeat, {args.repeats} repeats",
             f"- quantization: {quantization}", "",
             "Ratio = INT8 / fp32 latency (below 1: INT8 is faster), on the load-robust figure (wall time less "
             "run-queue waiting, outliers rejected); the wall-median ratio beside it. Error = largest |INT8 - fp32| "
             "output over the held-out inputs relative to the largest |fp32| output.", ""]
    lines += benchlib.markdown_table(["model", "weights", "ratio (median)", "ratio per repeat", "wall-median ratio",
                                      "fp32 median ms", "INT8 median ms", "integer MAC share", "error vs fp32",
                                      "top-1 agreement (inputs)", "build s fp32 / INT8"], rows)
    benchlib.write_atomic(args.out, "\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
