"""Capture coverage: the public acceptance set of architectures users bring.

For each model of ``spruce.zoo.architectures`` (ultralytics YOLOv8n from yolov8n.yaml,
torchvision fasterrcnn_mobilenet_v3_large_fpn, retinanet_resnet50_fpn,
ssdlite320_mobilenet_v3_large and raft_small, a timm-style block branching on x.shape,
a module calling F.conv2d(..., groups=self.channels)), with random non-degenerate
weights (``spruce.api.checks.make_nondegenerate``) and no download, one fresh
subprocess records:

- how it was captured (fx, export, or pieces) and in how long, and the prune time;
- the share of the parameters spruce reaches that ``prune(ratio=0.5)`` keeps;
- compact vs masked on the raw outputs at the example batch and a second batch
  (``head_error``: for detectors the head outputs before post-processing);
- a training step: train-mode forward (detectors: with targets, the loss dict) and
  backward, with gradients on every kept parameter;
- every deployable graph exported to ONNX (dynamic batch) and checked against ONNX Runtime
  at two batch sizes, and saved as ``.pt2`` and reloaded in a fresh process that cannot
  import the model's packages.

The transformers set of ``spruce.zoo.transformers`` (BERT, DistilBERT, GPT-2, ViT, T5,
Llama and Qwen2 with grouped-query attention; tiny configs) is measured the same way, with
the sequence length declared dynamic and the equivalence checked at batch 1 and 3 and at two
sequence lengths (5 and 11 tokens); the kept-share bound of the capture set does not apply
to it (by default the residual width stays: LayerNorm/RMSNorm normalise over it); each is
pruned a second time with ``normalised_widths=True`` (residual and embedding widths too),
recording its kept share and compact-vs-masked error.

Writes ``bench/results/coverage.md`` (and ``.json``); a run over some ``--models`` replaces
their rows and keeps the others.
Usage: ``python bench/coverage.py [--models a,b] [--timeout 1800]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import benchlib

DEFAULT_OUT = benchlib.RESULTS_DIR / "coverage.md"
TOLERANCE = 1e-4
MAX_SHARE = 0.6
HEADERS = ["model", "status", "captured as", "capture s", "prune s", "params reached", "kept share",
           "err @ batch 1", "err @ batch 3", "train", "graphs", "ONNX vs ORT", "ONNX s", ".pt2 reload", ".pt2 s",
           "kept share, normalised widths", "err, normalised widths", "notes"]


def child_main(name: str, threads: int) -> None:
    """Measure one model in this process and emit its record."""
    record: dict[str, Any] = {"model": name}
    stage = "import"
    try:
        benchlib.set_threads(threads)
        import spruce
        import torch
        from spruce.api import checks, deploy
        from spruce.capture.capture import capture
        from spruce.zoo import architectures as examples
        from spruce.zoo import transformers as hf_examples
        from torch.utils import _pytree as pytree

        stage = "build"
        transformer = name in hf_examples.HF_EXAMPLES
        example = hf_examples.build(name) if transformer else examples.build(name)
        dynamic = example.dynamic_shapes if transformer else None
        if transformer:  # checked at two sequence lengths; no kept-share bound
            record["max_share"] = None
            example.notes = []
            example.targets = None
            hf_inputs = example.inputs
            example.inputs = lambda n, hf_inputs=hf_inputs: [hf_inputs(n, 5), hf_inputs(n, 11)]
        stage = "capture"
        captured, record["capture_s"] = benchlib.timed(lambda: capture(example.model, example.example,
                                                                       dynamic_shapes=dynamic))
        record["captured_as"] = captured.method + ("" if captured.whole else
                                                   " (" + ", ".join(p.path for p in captured.pieces) + ")")
        record["notes"] = "; ".join(captured.notes + example.notes)
        del captured
        stage = "prune"
        result, record["prune_s"] = benchlib.timed(lambda: spruce.prune(example.model, example.example, ratio=0.5,
                                                                        dynamic_shapes=dynamic))
        captured = result.analysis.captured
        reach, kept = checks.parameter_share(result.analysis, result.kept)
        record["params_reached"], record["params_kept"] = reach, kept
        record["kept_share"] = kept / reach
        stage = "equivalence"
        for batch in (1, 3):
            cases = example.inputs(batch) if transformer else [example.inputs(batch)]
            record[f"err_batch{batch}"] = max(checks.head_error(result.masked, result.model, captured, inputs)
                                              for inputs in cases)
        benchlib.emit(record)
        stage = "train"
        compact = result.model.train()
        inputs = example.inputs(2)[0] if transformer else example.inputs(2)
        args, kwargs = ((), inputs) if isinstance(inputs, dict) else (inputs, {}) if isinstance(inputs, tuple) \
            else ((inputs,), {})
        if example.targets is not None:
            loss = sum(compact(*args, example.targets(2), **kwargs).values())
        else:
            out = compact(*args, **kwargs)
            loss = sum(t.float().mean() for t in pytree.tree_leaves(out)
                       if isinstance(t, torch.Tensor) and t.is_floating_point())
        loss.backward()
        missing = checks.missing_gradients(compact, captured)
        record["train"] = "ok" if torch.isfinite(loss) and not missing else f"no gradient: {missing[:3]}"
        compact.eval()
        stage = "onnx"
        parts = deploy.parts(result.model, captured)
        record["graphs"] = len(parts)
        with tempfile.TemporaryDirectory() as folder:
            onnx_errors, programs = [], []
            for part in parts:
                (_, error), seconds = benchlib.timed(lambda part=part: deploy.save_onnx(
                    part, Path(folder) / f"{part.name}.onnx"))
                onnx_errors.append(error)
                record["onnx_s"] = record.get("onnx_s", 0.0) + seconds
            record["onnx_err"] = max(onnx_errors)
            benchlib.emit(record)
            stage = "pt2"
            for part in parts:
                path, seconds = benchlib.timed(
                    lambda part=part: deploy.save_pt2(part, Path(folder) / f"{part.name}.pt2"))
                programs.append((path, part))
                record["pt2_s"] = record.get("pt2_s", 0.0) + seconds
            errors, seconds = benchlib.timed(lambda: deploy.check_pt2_in_fresh_process(programs))
            record["pt2_s"] += seconds
            record["pt2_err"] = max(errors)
        if transformer:  # the residual and embedding widths too (issue 12's normalised-widths option)
            stage = "normalised widths"
            del result, compact, captured
            wide = spruce.prune(example.model, example.example, ratio=0.5, dynamic_shapes=dynamic,
                                normalised_widths=True)
            reach, kept = checks.parameter_share(wide.analysis, wide.kept)
            record["nw_kept_share"] = kept / reach
            record["nw_err"] = max(checks.head_error(wide.masked, wide.model, wide.analysis.captured, inputs)
                                   for batch in (1, 3) for inputs in example.inputs(batch))
        stage = "done"
    except Exception as exc:  # noqa: BLE001 - every failure is a result here
        record["error"] = f"{stage}: {benchlib.short_error(exc)}"
    benchlib.emit(record)


def passes(record: dict[str, Any]) -> bool:
    """Every acceptance criterion met."""
    max_share = record.get("max_share", MAX_SHARE)
    return ("error" not in record and (max_share is None or record.get("kept_share", 1.0) <= max_share)
            and record.get("err_batch1", 1.0) <= TOLERANCE and record.get("err_batch3", 1.0) <= TOLERANCE
            and record.get("train") == "ok" and record.get("onnx_err", 1.0) <= TOLERANCE
            and record.get("pt2_err", 1.0) <= TOLERANCE
            and (record.get("nw_kept_share") is None or record.get("nw_err", 1.0) <= TOLERANCE))


def _e(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


def table_row(record: dict[str, Any]) -> list[str]:
    share = record.get("kept_share")
    reached = record.get("params_reached")
    return [
        record["model"], "ok" if passes(record) else "FAIL", record.get("captured_as", "-"),
        benchlib.fmt(record.get("capture_s"), 1), benchlib.fmt(record.get("prune_s"), 1),
        "-" if reached is None else f"{reached / 1e6:.2f} M", "-" if share is None else f"{share:.2f}",
        _e(record.get("err_batch1")), _e(record.get("err_batch3")), record.get("train", "-"),
        str(record.get("graphs", "-")), _e(record.get("onnx_err")), benchlib.fmt(record.get("onnx_s"), 1),
        _e(record.get("pt2_err")), benchlib.fmt(record.get("pt2_s"), 1),
        "-" if record.get("nw_kept_share") is None else f"{record['nw_kept_share']:.2f}", _e(record.get("nw_err")),
        "; ".join(x for x in (record.get("error", ""), record.get("notes", "")) if x),
    ]


def render(records: list[dict[str, Any]], planned: list[str], info: dict[str, str], timeout_s: float) -> str:
    order = {name: i for i, name in enumerate(planned)}
    records = sorted(records, key=lambda r: order.get(r["model"], len(order)))
    passed = sum(passes(r) for r in records)
    lines = ["# spruce capture coverage: the public acceptance set", ""]
    lines += benchlib.header_lines(info)
    lines.append(f"- load average (1/5/15 min) at writing: {benchlib.load_average()}")
    lines += [
        "- weights: random init, then spruce.api.checks.make_nondegenerate (all-zero weights drawn, tiny "
        "layer scales raised, BatchNorm statistics re-estimated at the example input); nothing downloaded",
        f"- settings: prune(ratio=0.5, importance l1), one subprocess per model, timeout {timeout_s:.0f} s",
        f"- pass = kept share of reached parameters <= {MAX_SHARE} (not for the transformers set), compact vs "
        f"masked <= {TOLERANCE:g} relative to the output scale at batch 1 and 3 (transformers: at 5 and 11 "
        "tokens each, the sequence length dynamic; raw head outputs for detectors, eager inputs replayed), train-mode "
        "forward+backward with a gradient on every kept parameter (detectors: with targets, the loss dict), every "
        f"deployable graph exported to ONNX and within {TOLERANCE:g} of ONNX Runtime at two batch sizes, and "
        "reloaded from .pt2 in a fresh process (model packages blocked) within the same tolerance",
        "- params reached: parameters the captured graphs read; detectors captured in pieces leave their "
        "post-processing eager",
        "- normalised widths (transformers only): prune(ratio=0.5, normalised_widths=True), which also removes "
        "LayerNorm/RMSNorm-normalised residual and embedding widths (masked norms), its kept share of reached "
        "parameters and compact vs masked at batch 1 and 3 and both sequence lengths (within the tolerance to pass)",
        "", "## Summary", "", f"- passed: **{passed}/{len(planned)}**",
    ]
    lines += ["", "## Models", ""]
    lines += benchlib.markdown_table(HEADERS, (table_row(r) for r in records))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated names (default: the whole set)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per model")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--child", metavar="MODEL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import os

    threads = args.threads or (os.cpu_count() or 1)
    if args.child:
        child_main(args.child, threads)
        return 0
    from spruce.zoo.architectures import EXAMPLES
    from spruce.zoo.transformers import HF_EXAMPLES

    names = args.models.split(",") if args.models else list(EXAMPLES) + list(HF_EXAMPLES)
    info = benchlib.machine_info(["spruce", "ultralytics", "onnxruntime", "transformers"])
    kept_records: list[dict[str, Any]] = []
    previous = args.out.with_suffix(".json")
    if args.models and previous.exists():  # rows of the models not run now stay
        kept_records = [r for r in json.loads(previous.read_text())["records"] if r["model"] not in names]
    planned = [r["model"] for r in kept_records] + names
    records: list[dict[str, Any]] = list(kept_records)
    for name in names:
        argv_child = [str(Path(__file__).resolve()), "--child", name, "--threads", str(threads)]
        outcome = benchlib.run_child(argv_child, args.timeout)
        record = {"model": name, **outcome.result}
        crash = benchlib.outcome_error(outcome, args.timeout, None)
        if crash and "error" not in record:
            record["error"] = crash
        records.append(record)
        print(f"[{len(records) - len(kept_records)}/{len(names)}] {name}: {'ok' if passes(record) else 'FAIL'} "
              f"{record.get('error', '')}", flush=True)
        benchlib.write_atomic(args.out, render(records, planned, info, args.timeout))
        benchlib.write_atomic(args.out.with_suffix(".json"), json.dumps(
            {"machine": info, "records": records}, indent=1, default=str))
    print(f"wrote {args.out}")
    return 0 if all(passes(r) for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
