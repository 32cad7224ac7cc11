"""How close a compiled model stays to the dense one, per output, by the output's kind.

Each output's kind (:mod:`spruce.compiler.kinds`) names its measures; each measure is an
accumulator here (:data:`MEASURE_FUNCTIONS`, keyed like :data:`~spruce.compiler.kinds.MEASURES`)
fed every held-out batch, dense and compiled outputs side by side:

- ``relative_l2``: ||compiled - dense|| / ||dense|| over every element of every batch;
- ``cosine``: cosine similarity of compiled and dense per sample (the output's batch dim
  moved first, the rest flattened), averaged over that output's samples (an output without
  a batch dim counts one sample per batch), so it always lies in [-1, 1];
- ``top1_agreement``: the argmax over the class dim at every position, the fraction of
  positions where compiled and dense agree (for (N, C) scores: per sample);
- ``miou``: the IoU of the compiled and dense argmax maps per class (pooled over all
  pixels), averaged over the classes either predicts anywhere;
- ``sequence_agreement``, ``cer`` (CTC): each sequence greedily decoded (argmax per
  position, repeats collapsed, the blank dropped); the fraction of sequences decoded as
  dense decodes them, and the summed edit distance to dense's decodes divided by their
  summed length (at least 1);
- ``perplexity_ratio``, ``next_token_agreement`` (causal LM logits, :mod:`spruce.compiler.lm`):
  over every position whose next input token is not the pad, exp of (the compiled model's
  summed next-token negative log-likelihood minus dense's) over the count, i.e. compiled
  perplexity / dense perplexity; and the fraction of those positions whose argmax agrees.
  Both need the input token ids: the measures are fed them with each batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .lm import next_token_mask, next_token_nll
from .outputs import OutputPlan, OutputSpec, flatten_outputs

__all__ = ["MEASURE_FUNCTIONS", "Fidelity", "edit_distance", "fidelity", "greedy_decode", "measure_outputs"]


def _per_sample(value: torch.Tensor, spec: OutputSpec) -> torch.Tensor:
    if spec.batch_dim is None or value.ndim == 0:
        return value.reshape(1, -1)
    return value.movedim(spec.batch_dim, 0).reshape(value.shape[spec.batch_dim], -1)


def _sequences(scores: torch.Tensor, spec: OutputSpec) -> torch.Tensor:
    """CTC scores as (N, T) argmax labels: batch dim first, time second."""
    labels = scores.argmax(spec.class_dim)  # the class dim gone: the batch and time dims remain
    batch = spec.batch_dim - (spec.batch_dim > spec.class_dim)
    return labels.movedim(batch, 0).reshape(labels.shape[batch], -1)


def greedy_decode(labels: Iterable[int], blank: int) -> list[int]:
    """The greedy CTC decode of per-position argmax ``labels``: repeats collapsed, then blanks dropped."""
    decoded, previous = [], None
    for label in labels:
        if label != previous and label != blank:
            decoded.append(int(label))
        previous = label
    return decoded


def edit_distance(a: list[int], b: list[int]) -> int:
    """Levenshtein distance (insertions, deletions, substitutions each cost 1)."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        diagonal, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (x != y))
    return row[-1]


@dataclass
class _Sums:
    """One measure's running sums: ``value()`` is ``numerator / max(denominator, floor)``,
    or for ``miou`` the mean of per-class ratios."""

    numerator: float = 0.0
    denominator: float = 0.0
    per_class: dict[int, list[float]] = field(default_factory=dict)


def _relative_l2(sums: _Sums, compiled: torch.Tensor, dense: torch.Tensor, spec: OutputSpec) -> None:
    sums.numerator += float((compiled - dense).pow(2).sum())
    sums.denominator += float(dense.pow(2).sum())


def _cosine(sums: _Sums, compiled: torch.Tensor, dense: torch.Tensor, spec: OutputSpec) -> None:
    flat_c, flat_d = _per_sample(compiled, spec), _per_sample(dense, spec)
    sums.numerator += float(F.cosine_similarity(flat_c, flat_d, dim=1, eps=1e-12).clamp(-1.0, 1.0).sum())
    sums.denominator += flat_c.shape[0]


def _top1(sums: _Sums, compiled: torch.Tensor, dense: torch.Tensor, spec: OutputSpec) -> None:
    same = compiled.argmax(spec.class_dim) == dense.argmax(spec.class_dim)
    sums.numerator += float(same.sum())
    sums.denominator += same.numel()


def _miou(sums: _Sums, compiled: torch.Tensor, dense: torch.Tensor, spec: OutputSpec) -> None:
    classes = compiled.shape[spec.class_dim]
    got, want = compiled.argmax(spec.class_dim).flatten(), dense.argmax(spec.class_dim).flatten()
    both = torch.bincount(got[got == want], minlength=classes)
    union = torch.bincount(got, minlength=classes) + torch.bincount(want, minlength=classes) - both
    for label in range(classes):
        inter_union = sums.per_class.setdefault(label, [0.0, 0.0])
        inter_union[0] += float(both[label])
        inter_union[1] += float(union[label])


def _decodes(compiled: torch.Tensor, dense: torch.Tensor, spec: OutputSpec) -> list[tuple[list[int], list[int]]]:
    blank = spec.blank if spec.blank is not None else 0
    got, want = _sequences(compiled, spec).tolist(), _sequences(dense, spec).tolist()
    return [(greedy_decode(g, blank), greedy_decode(w, blank)) for g, w in zip(got, want)]


def _sequence_agreement(sums: _Sums, compiled: torch.Tensor, dense: torch.Tensor, spec: OutputSpec) -> None:
    pairs = _decodes(compiled, dense, spec)
    sums.numerator += sum(g == w for g, w in pairs)
    sums.denominator += len(pairs)


def _cer(sums: _Sums, compiled: torch.Tensor, dense: torch.Tensor, spec: OutputSpec) -> None:
    for got, want in _decodes(compiled, dense, spec):
        sums.numerator += edit_distance(got, want)
        sums.denominator += len(want)


def _perplexity(sums: _Sums, compiled: torch.Tensor, dense: torch.Tensor, spec: OutputSpec,
                tokens: torch.Tensor) -> None:
    got, count = next_token_nll(compiled, tokens, spec.pad)
    want, _ = next_token_nll(dense, tokens, spec.pad)
    sums.numerator += float(got) - float(want)
    sums.denominator += count


def _perplexity_ratio(sums: _Sums) -> float:
    return math.exp(sums.numerator / max(sums.denominator, 1.0))


def _next_token(sums: _Sums, compiled: torch.Tensor, dense: torch.Tensor, spec: OutputSpec,
                tokens: torch.Tensor) -> None:
    keep = next_token_mask(tokens, spec.pad)
    same = (compiled[:, :-1].argmax(-1) == dense[:, :-1].argmax(-1)) & keep
    sums.numerator += float(same.sum())
    sums.denominator += float(keep.sum())


def _ratio(floor: float) -> Callable[[_Sums], float]:
    return lambda sums: sums.numerator / max(sums.denominator, floor)


def _mean_iou(sums: _Sums) -> float:
    ious = [inter / union for inter, union in sums.per_class.values() if union > 0]
    return sum(ious) / len(ious) if ious else 1.0


@dataclass(frozen=True)
class MeasureFunction:
    """A measure's computation: ``update(sums, compiled, dense, spec)`` per batch (float
    tensors of one output; ``per_token``: and the batch's input token ids after them),
    ``value(sums)`` at the end."""

    update: Callable[..., None]
    value: Callable[[_Sums], float]
    per_token: bool = False


def _relative_l2_value(sums: _Sums) -> float:
    return (sums.numerator ** 0.5) / max(sums.denominator ** 0.5, 1e-12)


MEASURE_FUNCTIONS: dict[str, MeasureFunction] = {
    "relative_l2": MeasureFunction(_relative_l2, _relative_l2_value),
    "cosine": MeasureFunction(_cosine, _ratio(1.0)),
    "top1_agreement": MeasureFunction(_top1, _ratio(1.0)),
    "miou": MeasureFunction(_miou, _mean_iou),
    "sequence_agreement": MeasureFunction(_sequence_agreement, _ratio(1.0)),
    "cer": MeasureFunction(_cer, _ratio(1.0)),
    "perplexity_ratio": MeasureFunction(_perplexity, _perplexity_ratio, per_token=True),
    "next_token_agreement": MeasureFunction(_next_token, _ratio(1.0), per_token=True),
}


def measure_outputs(pairs: Iterable[tuple[Any, ...]], plan: OutputPlan) -> dict[str, dict[str, float]]:
    """Per output of ``plan``, its kind's measures over ``pairs`` of (compiled outputs, dense
    outputs), each in the structure the model returns, optionally followed by the batch's
    input (token ids, which per-token measures need: ``ValueError`` when they are missing)."""
    sums = {spec.name: {m: _Sums() for m in spec.measures} for spec in plan.outputs}
    for got, want, *inputs in pairs:
        for spec, (_, c), (_, d) in zip(plan.outputs, flatten_outputs(got), flatten_outputs(want), strict=True):
            c, d = c.detach().float(), d.detach().float()
            for name, running in sums[spec.name].items():
                function = MEASURE_FUNCTIONS[name]
                if function.per_token:
                    if not inputs:
                        raise ValueError(f"measure {name} of output {spec.name} needs the input token ids")
                    function.update(running, c, d, spec, inputs[0])
                else:
                    function.update(running, c, d, spec)
    return {spec.name: {m: MEASURE_FUNCTIONS[m].value(s) for m, s in sums[spec.name].items()}
            for spec in plan.outputs}


@dataclass(frozen=True)
class Fidelity:
    """Per output, its kind's measures (names in :data:`~spruce.compiler.kinds.MEASURES`) of
    the compiled model against dense over ``samples`` held-out inputs."""

    per_output: dict[str, dict[str, float]]
    samples: int

    def record(self) -> dict[str, Any]:
        return {"samples": self.samples, "per_output": self.per_output}


@torch.no_grad()
def fidelity(compiled: nn.Module, dense: nn.Module, batches: Iterable[torch.Tensor], plan: OutputPlan) -> Fidelity:
    """How close ``compiled`` stays to ``dense`` on ``batches`` (input tensors), per output,
    by each output's kind (both models in eval mode meanwhile; their modes are restored)."""
    modes = compiled.training, dense.training
    compiled.eval(), dense.eval()
    seen = [0]

    def pairs() -> Iterable[tuple[Any, Any]]:
        for inputs in batches:
            seen[0] += int(inputs.shape[0])
            yield compiled(inputs), dense(inputs), inputs

    try:
        return Fidelity(measure_outputs(pairs(), plan), seen[0])
    finally:
        compiled.train(modes[0]), dense.train(modes[1])
