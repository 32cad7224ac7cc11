"""A trained model's outputs, whatever their structure: named tensors, how each is
distilled, and how close a compiled model stays to the dense one.

``compile`` takes models of any task, so their outputs may be a tensor, a tuple or list,
a dict, a dataclass or a named tuple, nested. :func:`flatten_outputs` names every tensor
inside by its path (``output``, ``output[0]``, ``output.logits``, ``output['boxes']``).

Each tensor is one of two kinds, decided from the dense model's output at the example:

- ``scores``: shape (batch, classes >= 2), floating: class scores (logits);
- ``map``: anything else (dense maps, regressions, features).

Its distillation loss (:data:`DISTILL_LOSSES`) defaults by kind: ``kl`` (KL divergence of
the softened class distributions, temperature 1) for scores, ``mse`` for maps, the latter
divided by the teacher's mean square so heads of different scales weigh alike. For sparse
score maps (a detector's heat maps, mostly background) ``weighted_mse`` weighs each element's
squared error by ``1 + WEIGHTED_MSE_ALPHA * max(teacher, 0)`` (10: an element where the
teacher says 1 counts 11 times a background one), so the loss is not dominated by the
background the pruned model reproduces easily; it is divided by the teacher's weighted mean
square. Each divisor is measured once on the recovery data before recovery
(:func:`calibrate_scales`), so every batch weighs by its error, not by how much text it
holds (:class:`DistillLoss`). A shape rule can guess wrong (CRAFT's maps end in a dimension
of 2 and look like per-pixel logits but are heat maps in [0, 1]; they come out as maps here
because they are 4-D), so every output's loss can be overridden by its exact path or a glob
(``{"output[0]": "l1"}``, ``{"*feature*": "l1"}``); the plan records which loss each output
used, and the report shows it.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DISTILL_LOSSES", "DistillLoss", "OutputError", "OutputPlan", "OutputSpec", "Fidelity",
           "calibrate_scales", "distill_loss", "fidelity", "flatten_outputs", "plan_outputs"]


class OutputError(ValueError):
    """A model's outputs cannot be compiled (no tensor in them, a bad loss override)."""


def flatten_outputs(value: Any, path: str = "output") -> list[tuple[str, torch.Tensor]]:
    """Every tensor in ``value`` with its path, in a fixed order (containers depth first,
    dict keys in insertion order); non-tensor leaves (None, numbers, strings) are skipped."""
    if isinstance(value, torch.Tensor):
        return [(path, value)]
    found: list[tuple[str, torch.Tensor]] = []
    if isinstance(value, Mapping):
        for key, item in value.items():
            found += flatten_outputs(item, f"{path}[{key!r}]")
    elif isinstance(value, tuple) and type(value) is not tuple and "_fields" in dir(type(value)):  # a named tuple
        for key in value._fields:
            found += flatten_outputs(getattr(value, key), f"{path}.{key}")
    elif isinstance(value, (tuple, list)):
        for index, item in enumerate(value):
            found += flatten_outputs(item, f"{path}[{index}]")
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for item in dataclasses.fields(value):
            found += flatten_outputs(getattr(value, item.name), f"{path}.{item.name}")
    return found


def _kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return F.kl_div(F.log_softmax(student.float(), dim=1), F.log_softmax(teacher.float(), dim=1),
                    reduction="batchmean", log_target=True)


WEIGHTED_MSE_ALPHA = 10.0  # weight of the teacher's value in ``weighted_mse``


def _score_weight(teacher: torch.Tensor) -> torch.Tensor:
    return 1.0 + WEIGHTED_MSE_ALPHA * teacher.clamp_min(0.0)


@dataclass(frozen=True)
class DistillLoss:
    """One distillation loss: ``error(student, teacher)``, a mean over elements, divided by
    the teacher's own ``scale`` (the same mean with the student at zero) so that outputs of
    different magnitudes weigh alike; ``scale`` None: the error is used as it is (``kl``).

    The divisor is the data set's scale when one was measured before recovery
    (:func:`calibrate_scales`, ``OutputSpec.scale``); otherwise the batch's own. A batch's own
    scale makes a batch whose teacher output is near zero (a photograph without text for a
    text detector's heat maps: 1e-3 of a text batch's) weigh that much more; a scale fixed
    per data set gives every batch the weight of its error."""

    error: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    scale: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __call__(self, student: torch.Tensor, teacher: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        """The loss of ``student`` against ``teacher`` (same shape), a scalar tensor; ``scale``:
        the data set's teacher scale (None: the batch's own)."""
        error = self.error(student.float(), teacher.float())
        if self.scale is None:
            return error
        divisor = self.scale(teacher.float()) if scale is None else torch.tensor(scale)
        return error / divisor.clamp_min(1e-8)


# name -> loss; one entry per loss. mse: mean (s - t)^2 / mean t^2; l1: mean |s - t| / mean |t|;
# weighted_mse: mean w (s - t)^2 / mean w t^2 with w = 1 + alpha * max(t, 0) per element.
DISTILL_LOSSES: dict[str, DistillLoss] = {
    "kl": DistillLoss(_kl),
    "mse": DistillLoss(lambda s, t: (s - t).pow(2).mean(), lambda t: t.pow(2).mean()),
    "l1": DistillLoss(lambda s, t: (s - t).abs().mean(), lambda t: t.abs().mean()),
    "weighted_mse": DistillLoss(lambda s, t: (_score_weight(t) * (s - t).pow(2)).mean(),
                                lambda t: (_score_weight(t) * t.pow(2)).mean()),
}
SCALE_BATCHES = 16  # recovery batches the data set's teacher scales are measured on (at most)
DEFAULT_LOSS = {"scores": "kl", "map": "mse"}


@dataclass(frozen=True)
class OutputSpec:
    """One output tensor: its path, shape at the example, kind, and distillation loss."""

    name: str
    shape: tuple[int, ...]
    kind: str
    loss: str
    overridden: bool = False
    scale: float | None = None  # the data set's teacher scale for the loss (calibrate_scales); None: per batch


@dataclass(frozen=True)
class OutputPlan:
    """The model's output tensors, in :func:`flatten_outputs` order."""

    outputs: tuple[OutputSpec, ...]

    @property
    def all_scores(self) -> bool:
        return all(spec.kind == "scores" for spec in self.outputs)

    def record(self) -> list[dict[str, Any]]:
        """JSON-ready: which loss each output used, and why."""
        return [{"output": s.name, "shape": list(s.shape), "kind": s.kind, "distill_loss": s.loss,
                 "loss_from": "override" if s.overridden else f"default for {s.kind}",
                 "teacher_scale": s.scale} for s in self.outputs]


def _kind(tensor: torch.Tensor) -> str:
    return "scores" if tensor.is_floating_point() and tensor.ndim == 2 and tensor.shape[1] >= 2 else "map"


def _matches(name: str, pattern: str) -> bool:
    """An exact path (brackets are literal), else a glob (``output[[]1]*`` style)."""
    return name == pattern or fnmatch.fnmatchcase(name, pattern)


def plan_outputs(outputs: Any, overrides: Mapping[str, str] | None = None, model_name: str = "model") -> OutputPlan:
    """The plan for a model whose output at the example is ``outputs``. ``overrides`` maps an
    output path or glob to a loss name. Raises :class:`OutputError` when the outputs hold no
    tensor, or an override names no output or an unknown loss."""
    named = flatten_outputs(outputs)
    if not named:
        raise OutputError(f"{model_name}'s outputs hold no tensor (it returned {type(outputs).__name__}); "
                          "compile needs at least one output tensor to distil and compare")
    overrides = dict(overrides or {})
    for pattern, loss in overrides.items():
        if loss not in DISTILL_LOSSES:
            raise OutputError(f"distill loss for {pattern!r}: unknown loss {loss!r}; valid: "
                              f"{', '.join(DISTILL_LOSSES)}")
        if not any(_matches(name, pattern) for name, _ in named):
            raise OutputError(f"distill loss override {pattern!r} names no output; outputs are "
                              f"{', '.join(name for name, _ in named)}")
    specs = []
    for name, tensor in named:
        kind = _kind(tensor)
        chosen = next((loss for pattern, loss in overrides.items() if _matches(name, pattern)), None)
        if chosen == "kl" and tensor.ndim < 2:
            raise OutputError(f"distill loss 'kl' for {name}: needs a class dim 1, the output has shape "
                              f"{tuple(tensor.shape)}")
        specs.append(OutputSpec(name, tuple(tensor.shape), kind, chosen or DEFAULT_LOSS[kind], chosen is not None))
    return OutputPlan(tuple(specs))


def distill_loss(student_outputs: Any, teacher_outputs: Any, plan: OutputPlan) -> torch.Tensor:
    """The sum over output tensors of each one's distillation loss (student vs teacher)."""
    student = flatten_outputs(student_outputs)
    teacher = flatten_outputs(teacher_outputs)
    total = student[0][1].new_zeros((), dtype=torch.float32)
    for spec, (_, s), (_, t) in zip(plan.outputs, student, teacher, strict=True):
        total = total + DISTILL_LOSSES[spec.loss](s, t.detach(), spec.scale)
    return total


@torch.no_grad()
def calibrate_scales(plan: OutputPlan, teacher: nn.Module, batches: Iterable[torch.Tensor],
                     max_batches: int = SCALE_BATCHES) -> OutputPlan:
    """``plan`` with each output's data-set teacher scale (:class:`DistillLoss`): the loss's
    scale pooled over every element of the teacher's outputs on the first ``max_batches`` of
    ``batches`` (input tensors), measured once before recovery. Outputs whose loss needs no
    scale keep None. Raises :class:`OutputError` when ``batches`` is empty."""
    sums = {spec.name: 0.0 for spec in plan.outputs}
    counts = dict.fromkeys(sums, 0)
    was_training = teacher.training
    teacher.eval()
    try:
        for index, inputs in enumerate(batches):
            if index >= max_batches:
                break
            for spec, (_, t) in zip(plan.outputs, flatten_outputs(teacher(inputs)), strict=True):
                scale = DISTILL_LOSSES[spec.loss].scale
                if scale is not None:
                    sums[spec.name] += float(scale(t.float())) * t.numel()
                    counts[spec.name] += t.numel()
    finally:
        teacher.train(was_training)
    if not any(counts.values()) and any(DISTILL_LOSSES[s.loss].scale is not None for s in plan.outputs):
        raise OutputError("calibrate_scales: no batch to measure the teacher's output scales on")
    return OutputPlan(tuple(dataclasses.replace(spec, scale=sums[spec.name] / counts[spec.name])
                            if counts[spec.name] else spec for spec in plan.outputs))


@dataclass(frozen=True)
class Fidelity:
    """Per output: relative L2 error ||compiled - dense|| / ||dense|| over all held-out
    inputs, mean cosine similarity per sample, and top-1 agreement for class scores."""

    per_output: dict[str, dict[str, float]]
    samples: int

    def record(self) -> dict[str, Any]:
        return {"samples": self.samples, "per_output": self.per_output}


@torch.no_grad()
def fidelity(compiled: nn.Module, dense: nn.Module, batches: Iterable[torch.Tensor], plan: OutputPlan) -> Fidelity:
    """How close ``compiled`` stays to ``dense`` on ``batches`` (input tensors), per output."""
    sums: dict[str, dict[str, float]] = {s.name: {"diff2": 0.0, "ref2": 0.0, "cos": 0.0, "agree": 0.0}
                                         for s in plan.outputs}
    samples = 0
    modes = compiled.training, dense.training
    compiled.eval(), dense.eval()
    try:
        for inputs in batches:
            got = flatten_outputs(compiled(inputs))
            want = flatten_outputs(dense(inputs))
            for spec, (_, c), (_, d) in zip(plan.outputs, got, want, strict=True):
                c, d = c.float(), d.float()
                acc = sums[spec.name]
                acc["diff2"] += float((c - d).pow(2).sum())
                acc["ref2"] += float(d.pow(2).sum())
                flat_c, flat_d = c.reshape(c.shape[0], -1), d.reshape(d.shape[0], -1)
                acc["cos"] += float(F.cosine_similarity(flat_c, flat_d, dim=1, eps=1e-12).sum())
                if spec.kind == "scores":
                    acc["agree"] += float((c.argmax(1) == d.argmax(1)).float().sum())
            samples += int(inputs.shape[0])
    finally:
        compiled.train(modes[0]), dense.train(modes[1])
    per_output = {}
    for spec in plan.outputs:
        acc = sums[spec.name]
        row = {"relative_l2": (acc["diff2"] ** 0.5) / max(acc["ref2"] ** 0.5, 1e-12),
               "cosine": acc["cos"] / max(samples, 1)}
        if spec.kind == "scores":
            row["top1_agreement"] = acc["agree"] / max(samples, 1)
        per_output[spec.name] = row
    return Fidelity(per_output, samples)
