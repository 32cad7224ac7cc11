"""A trained model's outputs, whatever their structure: named tensors, what kind each is,
and how each is distilled.

``compile`` takes models of any task, so their outputs may be a tensor, a tuple or list,
a dict, a dataclass or a named tuple, nested. :func:`flatten_outputs` names every tensor
inside by its path (``output``, ``output[0]``, ``output.logits``, ``output['boxes']``).

Each tensor has a kind (:mod:`spruce.compiler.kinds`: ``scores``, ``pixel_scores``, ``ctc``,
``map``, ``regression``), declared (the recipe's ``outputs``, by exact path or glob) or
guessed from its layout at the example: its shape and its batch dim, which is measured
(:func:`batch_dims`: the model run at the capture's second batch size, the dim that follows
the batch), never guessed from sizes. The kind gives the distillation loss, the fidelity
measures (:mod:`spruce.compiler.fidelity`) and the default floor.

Distillation losses (:data:`DISTILL_LOSSES`): ``kl``, the KL divergence of the softened class
distributions over the output's class dim at every position (temperature T, multiplied by
T squared; summed over classes, averaged over every other position, so (N, C) scores give
the batch mean), for every class-score kind (``scores``, ``pixel_scores``, ``ctc``); ``mse``
for maps and regressions, divided by the teacher's mean square so heads of different scales
weigh alike. For sparse score maps (a detector's heat maps, mostly background)
``weighted_mse`` weighs each element's squared error by ``1 + WEIGHTED_MSE_ALPHA *
max(teacher, 0)`` (10: an element where the teacher says 1 counts 11 times a background one),
so the loss is not dominated by the background the pruned model reproduces easily; it is
divided by the teacher's weighted mean square. ``hard_weighted_mse`` weighs by ``1 +
WEIGHTED_MSE_ALPHA * max(teacher, student, 0)`` (the student's value without its gradient):
where the student lights up background the teacher leaves dark (a link between two words, a
false detection: the hard negatives a detector's own training mines) the error weighs as much
as a miss on text, not 11 times less; same divisor as ``weighted_mse``. Each divisor is measured once on the recovery
data before recovery (:func:`calibrate_scales`), so every batch weighs by its error, not by
how much text it holds (:class:`DistillLoss`). Every output's loss can be overridden by its
exact path or a glob (``{"output[0]": "l1"}``, ``{"*feature*": "l1"}``); the plan records
which kind and loss each output has, and why, and the report shows it.
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

from .kinds import KINDS, Layout, OutputDeclaration, infer_kind
from .lm import lm_kl

__all__ = ["DISTILL_LOSSES", "DistillLoss", "OutputError", "OutputPlan", "OutputSpec", "batch_dims",
           "calibrate_scales", "distill_loss", "flatten_outputs", "plan_outputs"]


class OutputError(ValueError):
    """A model's outputs cannot be compiled (no tensor in them, a bad loss override or declaration)."""


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


def _kl(student: torch.Tensor, teacher: torch.Tensor, class_dim: int = 1, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) of the class distributions over ``class_dim`` at every position,
    at ``temperature`` (times its square), summed over classes and averaged over positions."""
    log_student = F.log_softmax(student / temperature, dim=class_dim)
    log_teacher = F.log_softmax(teacher / temperature, dim=class_dim)
    per_position = (log_teacher.exp() * (log_teacher - log_student)).sum(class_dim)
    return per_position.mean() * temperature ** 2


WEIGHTED_MSE_ALPHA = 10.0  # weight of the teacher's value in ``weighted_mse``


def _score_weight(teacher: torch.Tensor) -> torch.Tensor:
    return 1.0 + WEIGHTED_MSE_ALPHA * teacher.clamp_min(0.0)


def _weighted_scale(teacher: torch.Tensor) -> torch.Tensor:
    """The divisor of both weighted losses: the teacher's weighted mean square."""
    return (_score_weight(teacher) * teacher.pow(2)).mean()


def _hard_weighted_error(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean of ``(1 + alpha * max(teacher, student, 0)) * (student - teacher)^2``, the weight
    taken without gradient."""
    weight = _score_weight(torch.maximum(teacher, student.detach()))
    return (weight * (student - teacher).pow(2)).mean()


@dataclass(frozen=True)
class DistillLoss:
    """One distillation loss: ``error(student, teacher)``, a mean over elements, divided by
    the teacher's own ``scale`` (the same mean with the student at zero) so that outputs of
    different magnitudes weigh alike; ``scale`` None: the error is used as it is (``kl``).
    ``per_class``: the error is taken over the output's class dim, at its temperature
    (``error(student, teacher, class_dim, temperature)``). ``per_token``: the error is taken
    over next tokens of the input ids, pads skipped (``error(student, teacher, tokens, pad,
    temperature)``; the ``lm`` kind's ``lm_kl``).

    The divisor is the data set's scale when one was measured before recovery
    (:func:`calibrate_scales`, ``OutputSpec.scale``); otherwise the batch's own. A batch's own
    scale makes a batch whose teacher output is near zero (a photograph without text for a
    text detector's heat maps: 1e-3 of a text batch's) weigh that much more; a scale fixed
    per data set gives every batch the weight of its error."""

    error: Callable[..., torch.Tensor]
    scale: Callable[[torch.Tensor], torch.Tensor] | None = None
    per_class: bool = False
    per_token: bool = False

    def __call__(self, student: torch.Tensor, teacher: torch.Tensor, scale: float | None = None,
                 class_dim: int = 1, temperature: float = 1.0, tokens: torch.Tensor | None = None,
                 pad: int | None = None) -> torch.Tensor:
        """The loss of ``student`` against ``teacher`` (same shape), a scalar tensor; ``scale``:
        the data set's teacher scale (None: the batch's own); ``class_dim``, ``temperature``:
        for a ``per_class`` loss; ``tokens`` (the input ids) and ``pad`` for a ``per_token`` one."""
        if self.per_token:
            if tokens is None:
                raise OutputError("a per-token distillation loss (lm_kl) needs the input token ids")
            return self.error(student, teacher, tokens, pad, temperature)
        student, teacher = student.float(), teacher.float()
        error = self.error(student, teacher, class_dim, temperature) if self.per_class else self.error(student, teacher)
        if self.scale is None:
            return error
        divisor = self.scale(teacher) if scale is None else torch.tensor(scale)
        return error / divisor.clamp_min(1e-8)


# name -> loss; one entry per loss. kl: per-position KL over the class dim; mse: mean (s - t)^2 / mean t^2;
# l1: mean |s - t| / mean |t|; weighted_mse: mean w (s - t)^2 / mean w t^2 with w = 1 + alpha * max(t, 0);
# hard_weighted_mse: the same with w = 1 + alpha * max(t, s, 0) in the numerator (false positives weigh as misses);
# lm_kl: next-token KL at every non-pad position, in chunks (spruce.compiler.lm.lm_kl).
DISTILL_LOSSES: dict[str, DistillLoss] = {
    "kl": DistillLoss(_kl, per_class=True),
    "lm_kl": DistillLoss(lm_kl, per_class=True, per_token=True),
    "mse": DistillLoss(lambda s, t: (s - t).pow(2).mean(), lambda t: t.pow(2).mean()),
    "l1": DistillLoss(lambda s, t: (s - t).abs().mean(), lambda t: t.abs().mean()),
    "weighted_mse": DistillLoss(lambda s, t: (_score_weight(t) * (s - t).pow(2)).mean(), _weighted_scale),
    "hard_weighted_mse": DistillLoss(_hard_weighted_error, _weighted_scale),
}
SCALE_BATCHES = 16  # recovery batches the data set's teacher scales are measured on (at most)


@dataclass(frozen=True)
class OutputSpec:
    """One output tensor: its path, shape at the example, kind, batch and class dims
    (non-negative, None where it has none), blank index (CTC), distillation loss and
    temperature; whether the kind was declared and why it was chosen; whether the loss was
    overridden; the data set's teacher scale for the loss (None: per batch); the pad token
    id (``lm``); whether the kind was recognised from the model (a causal LM), not guessed."""

    name: str
    shape: tuple[int, ...]
    kind: str
    loss: str
    overridden: bool = False
    scale: float | None = None
    batch_dim: int | None = None
    class_dim: int | None = None
    blank: int | None = None
    temperature: float = 1.0
    declared: bool = False
    reason: str = ""
    pad: int | None = None
    recognised: bool = False

    @property
    def measures(self) -> tuple[str, ...]:
        """The fidelity measures of this output's kind."""
        return KINDS[self.kind].measures

    @property
    def classifies(self) -> bool:
        """(N, C) class scores: what labels and the built-in cross-entropy apply to."""
        return self.kind == "scores" and len(self.shape) == 2 and self.batch_dim == 0 and self.class_dim == 1

    def warning(self) -> str | None:
        """The report's warning for a guessed kind (None when declared or recognised from the model)."""
        if self.declared or self.recognised:
            return None
        return (f"output {self.name} {list(self.shape)}: kind {self.kind} guessed ({self.reason}); declare it "
                f"(outputs: {{{self.name!r}: {{kind: ...}}}}) if it is something else")


@dataclass(frozen=True)
class OutputPlan:
    """The model's output tensors, in :func:`flatten_outputs` order."""

    outputs: tuple[OutputSpec, ...]

    @property
    def all_scores(self) -> bool:
        """Every output is (N, C) class scores."""
        return all(spec.classifies for spec in self.outputs)

    def warnings(self) -> list[str]:
        """One line per output whose kind was guessed."""
        return [w for w in (spec.warning() for spec in self.outputs) if w is not None]

    def record(self) -> list[dict[str, Any]]:
        """JSON-ready: the kind and loss of each output, and why."""
        rows = []
        for s in self.outputs:
            row = {"output": s.name, "shape": list(s.shape), "kind": s.kind,
                   "kind_from": "declared" if s.declared else
                   f"recognised: {s.reason}" if s.recognised else f"guessed: {s.reason}",
                   "batch_dim": s.batch_dim, "class_dim": s.class_dim, "distill_loss": s.loss,
                   "loss_from": "override" if s.overridden else f"default for {s.kind}", "teacher_scale": s.scale}
            if s.blank is not None:
                row["blank"] = s.blank
            if s.pad is not None:
                row["pad"] = s.pad
            if s.temperature != 1.0:
                row["temperature"] = s.temperature
            rows.append(row)
        return rows


def _matches(name: str, pattern: str) -> bool:
    """An exact path (brackets are literal), else a glob (``output[[]1]*`` style)."""
    return name == pattern or fnmatch.fnmatchcase(name, pattern)


@torch.no_grad()
def batch_dims(model: nn.Module, example: torch.Tensor, outputs: Any) -> dict[str, int | None]:
    """Per output path of ``outputs`` (``model``'s outputs at ``example``), the dim that
    follows the batch: ``model`` is run at the capture's second batch size (the example
    resized as capture resizes it to mark the batch dynamic) and the one dim whose size
    changed is the batch dim (None: no dim or several changed, or the example has no batch)."""
    from ..capture.capture import second_batch

    second = second_batch(model, (example,), {})
    if second is None:
        return {name: None for name, _ in flatten_outputs(outputs)}
    args, kwargs = second
    was_training = model.training
    try:
        resized = flatten_outputs(model.eval()(*args, **kwargs))
    finally:
        model.train(was_training)
    found: dict[str, int | None] = {}
    at_second = dict(resized)
    for name, tensor in flatten_outputs(outputs):
        other = at_second.get(name)
        changed = [] if other is None or other.ndim != tensor.ndim else [
            dim for dim, (a, b) in enumerate(zip(tensor.shape, other.shape)) if a != b]
        found[name] = changed[0] if len(changed) == 1 else None
    return found


def _dim(dim: int, ndim: int, name: str, what: str) -> int:
    if not -ndim <= dim < ndim:
        raise OutputError(f"{what} for {name}: dim {dim} is out of range for its {ndim} dims")
    return dim % ndim


def _declared_spec(name: str, tensor: torch.Tensor, batch_dim: int | None, declaration: OutputDeclaration,
                   pattern: str) -> OutputSpec:
    kind = KINDS[declaration.kind]
    what = f"outputs[{pattern!r}] (kind {kind.name})"
    if tensor.ndim < kind.min_rank or (kind.max_rank is not None and tensor.ndim > kind.max_rank):
        raise OutputError(f"{what}: {name} has shape {tuple(tensor.shape)}; kind {kind.name} needs "
                          + (f"{kind.min_rank} dims" if kind.min_rank == kind.max_rank else
                             f"at least {kind.min_rank} dims"))
    class_dim = None
    if kind.class_dim is not None:
        class_dim = _dim(declaration.class_dim if declaration.class_dim is not None else kind.class_dim,
                         tensor.ndim, name, what)
        if kind.min_rank > 1 and batch_dim is None:
            raise OutputError(f"{what}: {name} does not follow the batch (its batch dim could not be measured), "
                              f"which kind {kind.name} needs")
        if class_dim == batch_dim:
            raise OutputError(f"{what}: the class dim of {name} is its batch dim {batch_dim}")
    blank = None
    if kind.blank:
        blank = declaration.blank if declaration.blank is not None else 0
        if blank >= tensor.shape[class_dim]:
            raise OutputError(f"{what}: blank {blank} is not a class of {name} ({tensor.shape[class_dim]} classes)")
    pad = declaration.pad if kind.pad else None
    return OutputSpec(name, tuple(tensor.shape), kind.name, kind.loss, batch_dim=batch_dim, class_dim=class_dim,
                      blank=blank, temperature=declaration.temperature, declared=True, reason="declared", pad=pad)


def plan_outputs(outputs: Any, overrides: Mapping[str, str] | None = None, model_name: str = "model",
                 declarations: Mapping[str, OutputDeclaration | Mapping[str, Any]] | None = None,
                 batch: Mapping[str, int | None] | None = None,
                 recognised: Mapping[str, tuple[OutputDeclaration, str]] | None = None) -> OutputPlan:
    """The plan for a model whose output at the example is ``outputs``. ``declarations``
    maps an output path or glob to its declared kind (:class:`~spruce.compiler.kinds.OutputDeclaration`);
    the others are guessed from their layout. ``batch`` maps a path to its measured batch dim
    (:func:`batch_dims`; a path not in it has none, and is a map unless declared).
    ``recognised`` maps an output path to the kind the *model* says it has and why (a causal
    LM's ``logits``: :func:`spruce.compiler.lm.causal_lm_reason`); a declaration overrides it.
    ``overrides`` maps an output path or glob to a loss name. Raises :class:`OutputError`
    when the outputs hold no tensor, an override or declaration names no output or an
    unknown loss, or a declaration does not fit its output (rank, class dim, blank)."""
    named = flatten_outputs(outputs)
    if not named:
        raise OutputError(f"{model_name}'s outputs hold no tensor (it returned {type(outputs).__name__}); "
                          "compile needs at least one output tensor to distil and compare")
    overrides = dict(overrides or {})
    declared = {pattern: d if isinstance(d, OutputDeclaration) else OutputDeclaration(**d)
                for pattern, d in (declarations or {}).items()}
    batch = dict(batch or {})
    for pattern, loss in overrides.items():
        if loss not in DISTILL_LOSSES:
            raise OutputError(f"distill loss for {pattern!r}: unknown loss {loss!r}; valid: "
                              f"{', '.join(DISTILL_LOSSES)}")
    for what, patterns in (("distill loss override", overrides), ("output declaration", declared)):
        for pattern in patterns:
            if not any(_matches(name, pattern) for name, _ in named):
                raise OutputError(f"{what} {pattern!r} names no output; outputs are "
                                  f"{', '.join(name for name, _ in named)}")
    specs = []
    for name, tensor in named:
        pattern = next((p for p in declared if _matches(name, p)), None)
        if pattern is not None:
            spec = _declared_spec(name, tensor, batch.get(name), declared[pattern], pattern)
        elif recognised and name in recognised:
            declaration, reason = recognised[name]
            spec = dataclasses.replace(_declared_spec(name, tensor, batch.get(name), declaration, name),
                                       declared=False, recognised=True, reason=reason)
        else:
            kind, found = infer_kind(Layout(tuple(tensor.shape), batch.get(name), tensor.is_floating_point()))
            spec = OutputSpec(name, tuple(tensor.shape), kind, KINDS[kind].loss, batch_dim=batch.get(name),
                              class_dim=found.class_dim, reason=found.reason)
        chosen = next((loss for p, loss in overrides.items() if _matches(name, p)), None)
        if chosen is not None:
            if DISTILL_LOSSES[chosen].per_class and spec.class_dim is None:
                if tensor.ndim < 2:
                    raise OutputError(f"distill loss {chosen!r} for {name}: needs a class dim, the output has "
                                      f"shape {tuple(tensor.shape)}")
                spec = dataclasses.replace(spec, class_dim=1)  # a map distilled as scores over dim 1
            spec = dataclasses.replace(spec, loss=chosen, overridden=True)
        specs.append(spec)
    return OutputPlan(tuple(specs))


BLANK_SHARE = 0.5
"""A guessed per-position class-score output (3-D) whose dense argmax is one class at this share
of its positions or more is guessed a CTC head with that class as its blank (:func:`guess_ctc_blanks`)."""


@torch.no_grad()
def guess_ctc_blanks(plan: OutputPlan, model: nn.Module, batches: Iterable[torch.Tensor], max_batches: int = 4,
                     share: float = BLANK_SHARE) -> OutputPlan:
    """``plan`` with each *guessed* 3-D ``scores`` output ((N, T, C) or time-major (T, N, C))
    whose argmax over its class dim, from ``model`` (the dense model, in eval mode) on the first
    ``max_batches`` input tensors of ``batches``, is one class at >= ``share`` of the positions
    guessed as ``ctc`` instead, that class its blank. A CTC head emits its blank at most frames
    and a label in short spikes (Graves et al. 2006, Fig. 1), so a per-position argmax agreement
    is dominated by blanks and cannot see a changed reading; ``ctc``'s measure (greedy decodes,
    collapsed, agreeing per sequence) can. The guess stays a guess (the report warns; a
    declaration overrides it). Declared and recognised outputs, and plans without a 3-D guessed
    ``scores`` output, are returned unchanged without running ``model``."""
    candidates = [i for i, spec in enumerate(plan.outputs)
                  if spec.kind == "scores" and not spec.declared and not spec.recognised and len(spec.shape) == 3
                  and spec.class_dim is not None]
    if not candidates:
        return plan
    counts: dict[int, torch.Tensor] = {}
    for n, inputs in enumerate(batches):
        if n >= max_batches:
            break
        named = flatten_outputs(model(inputs))
        for i in candidates:
            scores = named[i][1]
            class_dim = plan.outputs[i].class_dim
            top = scores.argmax(dim=class_dim).flatten()
            found = torch.bincount(top, minlength=scores.shape[class_dim])
            counts[i] = counts[i] + found if i in counts else found
    specs = list(plan.outputs)
    for i, found in counts.items():
        blank = int(found.argmax())
        fraction = float(found[blank]) / max(float(found.sum()), 1.0)
        if fraction >= share:
            spec = specs[i]
            specs[i] = dataclasses.replace(
                spec, kind="ctc", loss=spec.loss if spec.overridden else KINDS["ctc"].loss, blank=blank,
                reason=f"per-position class scores whose dense argmax is class {blank} at {fraction:.0%} of the "
                       f"positions, as a CTC head's blank is")
    return OutputPlan(tuple(specs))


def distill_loss(student_outputs: Any, teacher_outputs: Any, plan: OutputPlan,
                 inputs: torch.Tensor | None = None) -> torch.Tensor:
    """The sum over output tensors of each one's distillation loss (student vs teacher);
    ``inputs``: the batch's input (token ids for a per-token loss)."""
    student = flatten_outputs(student_outputs)
    teacher = flatten_outputs(teacher_outputs)
    total = student[0][1].new_zeros((), dtype=torch.float32)
    for spec, (_, s), (_, t) in zip(plan.outputs, student, teacher, strict=True):
        total = total + DISTILL_LOSSES[spec.loss](s, t.detach(), spec.scale,
                                                  spec.class_dim if spec.class_dim is not None else 1,
                                                  spec.temperature, inputs, spec.pad)
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
