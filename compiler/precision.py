"""What ``spruce compile --precision int8`` adds to a compile: the calibration samples drawn
from the recovery data, and artifacts evaluated as they run.

- :func:`calibration_inputs`: the first :data:`~spruce.targets.quantize.MIN_CALIBRATION_SAMPLES`
  (128) recovery samples, in loader order, as the INT8 builds' calibration data, at the
  example's size (the artifact's input shape is the example's); a data set with fewer is
  refused by ``load_setup``, before any training;
- :class:`ArtifactModel`: a built artifact behind the ``nn.Module`` call the fidelity
  measures, the held-out accuracy and the user's ``evaluate`` take, so an INT8 artifact is
  judged by what ONNX Runtime computes, not by the fp32 torch model it was made from;
- :func:`precision_record` / :func:`precision_lines`: the report's rows for dense fp32, dense
  INT8 (no pruning) and the compiled INT8 artifact, with fidelity and same-run latency.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..targets.base import Runner
from ..targets.quantize import MIN_CALIBRATION_SAMPLES
from .datasets import DataError, inputs_of
from .results import Benched, Built, Exported, Quantized, Reference, Setup

__all__ = ["ArtifactModel", "calibration_inputs", "precision_lines", "precision_record"]


def calibration_inputs(batches: Iterable[Any], count: int = MIN_CALIBRATION_SAMPLES, name: str = "the recovery data",
                       example: torch.Tensor | None = None) -> list[tuple[torch.Tensor]]:
    """The first ``count`` samples of ``batches`` (inputs or (inputs, targets) batches), as
    1-tuples of input tensors whose rows add up to exactly ``count``. With ``example``, image
    and volume samples (float, 4-D or 5-D, the example's channels) of another spatial size than
    the example's (recovery windows smaller than the example: ``augment``'s ``size``) are
    resized to it, (tri)linearly: the built artifact takes the example's shape, and a resized
    window keeps the activation ranges a fully convolutional model sees. Other inputs are
    taken as they are. Raises :class:`~spruce.compiler.datasets.DataError` naming ``name``
    when there are fewer samples."""
    samples: list[tuple[torch.Tensor]] = []
    rows = 0
    for batch in batches:
        inputs = inputs_of(batch).detach().cpu()
        take = inputs[: count - rows]
        if example is not None and _resizable(take, example):
            mode = "bilinear" if take.dim() == 4 else "trilinear"
            take = torch.nn.functional.interpolate(take, size=tuple(example.shape[2:]), mode=mode, align_corners=False)
        samples.append((take,))
        rows += int(take.shape[0])
        if rows >= count:
            return samples
    raise DataError(f"precision int8: static INT8 calibration takes {count} samples of {name}, it holds {rows}")


def _resizable(samples: torch.Tensor, example: torch.Tensor) -> bool:
    """Whether ``samples`` are images/volumes like ``example`` but of another spatial size."""
    return (samples.dim() == example.dim() in (4, 5) and samples.is_floating_point()
            and samples.shape[1] == example.shape[1] and samples.shape[2:] != example.shape[2:])


class ArtifactModel(nn.Module):
    """``runner`` (a target's runner of a built artifact) called like the torch model it was
    built from: a tensor in, the artifact's outputs as float tensors out (one tensor for a
    single output, else a tuple in the artifact's output order, which is the torch model's
    flattened order). It has no parameters and does not train."""

    def __init__(self, runner: Runner):
        super().__init__()
        self.runner = runner

    def forward(self, inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        outputs: Sequence[Any] = self.runner([inputs.detach().cpu().numpy()])
        tensors = tuple(torch.from_numpy(np.asarray(value)) for value in outputs)
        return tensors[0] if len(tensors) == 1 else tensors


def precision_record(setup: Setup, reference: Reference, exported: Exported, built: Built, benched: Benched,
                     quantized: Quantized) -> dict[str, Any] | None:
    """The report's ``precision`` entry when INT8 ships (None otherwise): one row each for
    the dense fp32 model (the reference: its fidelity is 1 by definition), the dense model at
    INT8 without pruning, and the compiled INT8 artifact, each with its held-out accuracy,
    fidelity to dense per output, the user's metrics and its latency measured in the same
    interleaved bench run (robust and median ms per batch size); the layers kept fp32 by the
    sensitivity rule and whether recovery ran with fake quantization."""
    if quantized.dense_int8 is None or quantized.compiled_int8 is None:
        return None
    report = benched.report

    def latency(which: str) -> dict[str, dict[str, float]]:
        return {str(b): {"robust_ms": report.row(which, b).robust_ms, "median_ms": report.row(which, b).median_ms}
                for b in sorted({row.batch_size for row in report.rows})}

    rows = [{"model": "dense fp32", "artifact": built.dense.path.name, "accuracy": reference.accuracy,
             "metrics": reference.metrics, "fidelity": None, "latency": latency("dense")},
            {"model": "dense int8", **quantized.dense_int8.record(), "latency": latency("dense_int8")},
            {"model": "compiled int8", **quantized.compiled_int8.record(), "latency": latency("compiled"),
             "torch_model_fidelity": exported.fidelity.record() if exported.fidelity else None}]
    quantization = quantized.compiled_int8.info.get("quantization") or {}
    return {"shipped": "int8", "budget_of": "dense fp32 (measured in the same runs)", "rows": rows,
            "kept_fp32": quantization.get("kept_fp32", []), "sensitivity": quantization.get("sensitivity"),
            "fake_quant_recovery": quantized.fake_quant, "calibration_samples": quantization.get("calibration_samples")}


def precision_lines(record: Mapping[str, Any] | None) -> list[str]:
    """Markdown lines of :func:`precision_record` (nothing without one)."""
    if not record:
        return []
    batches = list(record["rows"][0]["latency"])
    lines = ["", f"Precision: {record['shipped']} ships; the budget is a fraction of {record['budget_of']}.", "",
             "| model | accuracy | fidelity (per output) | metrics | " + " | ".join(f"ms @ {b}" for b in batches)
             + " | vs dense fp32 @ " + batches[0] + " |", "|---|---|---|---|" + "---|" * (len(batches) + 1)]
    base = record["rows"][0]["latency"][batches[0]]["robust_ms"]
    for row in record["rows"]:
        fid = row.get("fidelity")
        fid_text = "reference" if fid is None else "; ".join(
            f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in measures.items())
            for name, measures in fid["per_output"].items())
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in (row.get("metrics") or {}).items()) or "-"
        accuracy = "-" if row.get("accuracy") is None else f"{row['accuracy']:.4f}"
        ms = " | ".join(f"{row['latency'][b]['robust_ms']:.3f}" for b in batches)
        lines.append(f"| {row['model']} | {accuracy} | {fid_text} | {metrics} | {ms} | "
                     f"{row['latency'][batches[0]]['robust_ms'] / base:.3f} |")
    kept = record.get("kept_fp32") or []
    rule = record.get("sensitivity") or {}
    lines += ["", "Layers kept fp32 by the sensitivity rule: " + (", ".join(kept) if kept else "none")
              + (f" ({rule.get('rule')})" if rule.get("rule") else ""),
              "Recovery with fake quantization: " + (record.get("fake_quant_recovery") or "not asked (fake_quant off)")]
    return lines
