"""Output kinds: what a model's output tensor *is*, which decides how it is distilled, how
its fidelity to the dense model is measured, and the floor that fidelity must reach.

One registry, :data:`KINDS`; a kind is one :class:`OutputKind` entry (add one with
:func:`register_kind`): its name, how it is recognised from an output's layout (or None:
only by declaration), its default class dim, whether it has a blank index, its default
distillation loss (a name in :data:`spruce.compiler.outputs.DISTILL_LOSSES`), its fidelity
measures (names in :data:`MEASURES`, computed in :mod:`spruce.compiler.fidelity`) and its
default floor. The kinds registered here:

==================  ==========================================  =========  ============================
kind                what it is (recognised from the layout)     loss       default floor
==================  ==========================================  =========  ============================
``scores``          class scores over a class dim at every      ``kl``     ``top1_agreement >= 0.9``
                    position: (N, C); (N, T, C) or time-major
                    (T, N, C), the class dim last
``pixel_scores``    per-pixel class scores (N, C, H, W)         ``kl``     ``miou >= 0.8``
                    (declared only: 4-D outputs are maps
                    unless declared)
``ctc``             per-position scores of a CTC head with a    ``kl``     ``sequence_agreement >= 0.9``
                    blank index (declared only), 3-D
``map``             anything else: dense maps, features         ``mse``    ``cosine >= 0.7``
``regression``      regressed values (declared only; a (N, K)   ``mse``    ``cosine >= 0.7``
                    regression is shaped like class scores)
``lm``              a causal language model's next-token        ``lm_kl``  ``perplexity_ratio <= 1.25``
                    logits (N, L, V) (recognised from the
                    model: a transformers ``*ForCausalLM``;
                    or declared), never generic class scores
==================  ==========================================  =========  ============================

The ``lm`` kind's logits at position t predict the token at t + 1 of the input ids; positions
whose next token is the pad id (``pad``, the model config's ``pad_token_id``) count nowhere.
Its measures are the perplexity ratio compiled / dense on the held-out tokens and the
next-token top-1 agreement; its loss ``lm_kl`` is the KL divergence of the dense model's
next-token distribution to the compiled one's at every non-pad position, computed in chunks
of positions (:mod:`spruce.compiler.lm`).

The map floor (cosine >= 0.7) is deliberately loose: a cosine cannot tell whether a map still
does its task (the CRAFT text detector's heat maps kept box F1 0.93 at cosine 0.82 after
distillation, and F1 0.0 at 0.76 one-shot, whose feature output fell to cosine 0.53); give a
task metric floor (``floor: ["box_f1>=0.9"]`` with ``evaluate``) where one exists.

The batch dim of an output is measured, never guessed from sizes: the model runs at the
capture's second batch size (the batch capture marks dynamic) and the dim that follows the
batch is the batch (:func:`spruce.compiler.outputs.batch_dims`). An output of unknown batch
dim is a ``map``. A guessed kind is reported with a warning; a declared kind
(:class:`OutputDeclaration`, the recipe's ``outputs``) is used as declared.

Floors (:class:`Floor`, parsed by :func:`parse_floor`) are ``MEASURE>=VALUE`` or
``MEASURE<=VALUE``, optionally for one output (``output[0]:cosine>=0.8``); a measure that is
no fidelity measure is one of the user's ``evaluate`` metrics (``word_acc>=0.95``), judged on
the compiled model's value. This module imports no torch: recipes validate against it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import Field, field_validator, model_validator

from ..passes.config import Config, ConfigError, check_choice

__all__ = ["KINDS", "MEASURES", "Floor", "Layout", "Measure", "OutputDeclaration", "OutputKind", "Recognised",
           "infer_kind", "parse_floor", "register_kind"]


@dataclass(frozen=True)
class Measure:
    """A fidelity measure: its range (``low``, ``high``; ``math.inf`` for unbounded) and
    whether higher is closer to dense."""

    name: str
    low: float
    high: float
    higher_is_better: bool
    description: str


# name -> measure; the computations are spruce.compiler.fidelity.MEASURE_FUNCTIONS (same keys)
MEASURES: dict[str, Measure] = {m.name: m for m in (
    Measure("relative_l2", 0.0, math.inf, False, "||compiled - dense|| / ||dense|| over all held-out outputs"),
    Measure("cosine", -1.0, 1.0, True, "mean cosine similarity of compiled and dense, per sample (batch dim)"),
    Measure("top1_agreement", 0.0, 1.0, True, "fraction of positions whose argmax class equals dense's"),
    Measure("miou", 0.0, 1.0, True, "mean over classes of the IoU of the compiled and dense argmax maps"),
    Measure("sequence_agreement", 0.0, 1.0, True,
            "fraction of sequences whose greedy CTC decode (repeats collapsed, blanks dropped) equals dense's"),
    Measure("cer", 0.0, math.inf, False,
            "edit distance of the compiled greedy decodes to dense's, divided by the dense decodes' length"),
    Measure("perplexity_ratio", 0.0, math.inf, False,
            "held-out perplexity of the compiled LM over the dense LM's (next tokens of the inputs, pads skipped)"),
    Measure("next_token_agreement", 0.0, 1.0, True,
            "fraction of non-pad positions whose argmax next token equals dense's"),
)}


@dataclass(frozen=True)
class Layout:
    """An output tensor as the kind rules see it: its shape at the example, its batch dim
    (None: unknown, or the output does not follow the batch) and whether it is floating."""

    shape: tuple[int, ...]
    batch_dim: int | None
    floating: bool = True


@dataclass(frozen=True)
class Recognised:
    """A kind rule's answer: the class dim (non-negative; None for kinds without one) and why."""

    class_dim: int | None
    reason: str


@dataclass(frozen=True)
class Floor:
    """One fidelity check: ``measure`` (a :data:`MEASURES` name, or a user metric) ``op``
    (``>=`` or ``<=``) ``value``; for one output path, or every output with the measure (None)."""

    measure: str
    op: str
    value: float
    output: str | None = None

    def met(self, actual: float) -> bool:
        """Whether ``actual`` passes (a NaN never does)."""
        return actual >= self.value if self.op == ">=" else actual <= self.value

    def text(self) -> str:
        return f"{self.output + ':' if self.output else ''}{self.measure}{self.op}{self.value:g}"

    @property
    def is_fidelity(self) -> bool:
        return self.measure in MEASURES


_FLOOR = re.compile(r"^\s*(?:(?P<output>.+?)\s*:\s*)?(?P<measure>[A-Za-z_][\w.\-]*)\s*(?P<op>>=|<=)\s*"
                    r"(?P<value>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


def parse_floor(text: str) -> Floor:
    """``"top1_agreement>=0.9"``, ``"output[0]:cosine>=0.8"``, ``"word_acc>=0.95"`` -> a
    :class:`Floor`. Raises ``ValueError`` naming the text when it has another form, or a
    fidelity measure's bound lies outside the measure's range."""
    match = _FLOOR.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"a floor must look like MEASURE>=VALUE, MEASURE<=VALUE or OUTPUT:MEASURE>=VALUE "
                         f"(measures: {', '.join(MEASURES)}, or an evaluate metric), got {text!r}")
    floor = Floor(match["measure"], match["op"], float(match["value"]), match["output"])
    measure = MEASURES.get(floor.measure)
    if measure is not None and not measure.low <= floor.value <= measure.high:
        raise ValueError(f"floor {text!r}: {floor.measure} lies in [{measure.low:g}, {measure.high:g}]")
    return floor


@dataclass(frozen=True)
class OutputKind:
    """One kind of output (see the module docstring). ``recognise(layout)`` returns a
    :class:`Recognised` when an undeclared output of that layout is of this kind (None: not
    this kind; a kind without a rule is only ever declared). ``class_dim``: the class dim a
    declaration without one takes (None: the kind has no class dim). ``blank``: the kind
    takes a blank index (default 0). ``pad``: the kind takes a pad token id (positions whose
    next token is the pad are skipped)."""

    name: str
    description: str
    loss: str
    measures: tuple[str, ...]
    floor: Floor | None
    class_dim: int | None = None
    blank: bool = False
    pad: bool = False
    recognise: Callable[[Layout], Recognised | None] | None = None
    min_rank: int = 0
    max_rank: int | None = None


KINDS: dict[str, OutputKind] = {}  # name -> kind, in recognition order ("map" last: the fallback)
FALLBACK_KIND = "map"


def register_kind(kind: OutputKind) -> OutputKind:
    """Add ``kind`` to :data:`KINDS` (recognised before the fallback ``map``); returns it.
    Raises ``ValueError`` for a name taken, or a measure or floor naming no measure."""
    if kind.name in KINDS:
        raise ValueError(f"output kind {kind.name!r} is already registered")
    unknown = [m for m in kind.measures if m not in MEASURES]
    if unknown:
        raise ValueError(f"output kind {kind.name!r}: unknown measures {unknown}; valid: {', '.join(MEASURES)}")
    if kind.floor is not None and kind.floor.measure not in kind.measures:
        raise ValueError(f"output kind {kind.name!r}: its floor's measure {kind.floor.measure!r} is not one of its "
                         "measures")
    fallback = KINDS.pop(FALLBACK_KIND, None)
    KINDS[kind.name] = kind
    if fallback is not None and kind.name != FALLBACK_KIND:
        KINDS[FALLBACK_KIND] = fallback
    return kind


def _class_scores(layout: Layout) -> Recognised | None:
    shape, batch = layout.shape, layout.batch_dim
    if not layout.floating or batch is None:
        return None
    if len(shape) == 2 and batch == 0 and shape[1] >= 2:
        return Recognised(1, "(N, C) with C >= 2: class scores")
    if len(shape) == 3 and batch in (0, 1) and shape[2] >= 2:
        order = "(N, T, C)" if batch == 0 else "time-major (T, N, C)"
        return Recognised(2, f"{order}: class scores at every position, the class dim last")
    return None


def _map(layout: Layout) -> Recognised:
    if layout.batch_dim is None:
        return Recognised(None, "its batch dim is unknown (the output does not follow the batch)")
    if len(layout.shape) == 4:
        return Recognised(None, "4-D outputs are maps unless declared")
    return Recognised(None, "not shaped like class scores")


_FIDELITY = ("relative_l2", "cosine")
register_kind(OutputKind("scores", "class scores over a class dim at every position", "kl",
                         ("top1_agreement", *_FIDELITY), Floor("top1_agreement", ">=", 0.9), class_dim=-1,
                         recognise=_class_scores, min_rank=1))
register_kind(OutputKind("pixel_scores", "per-pixel class scores (N, C, H, W)", "kl",
                         ("miou", "top1_agreement", *_FIDELITY), Floor("miou", ">=", 0.8), class_dim=1, min_rank=3))
register_kind(OutputKind("ctc", "per-position scores of a CTC head, with a blank index", "kl",
                         ("sequence_agreement", "cer", "top1_agreement", *_FIDELITY),
                         Floor("sequence_agreement", ">=", 0.9), class_dim=-1, blank=True, min_rank=3, max_rank=3))
register_kind(OutputKind("lm", "a causal language model's next-token logits (N, L, V)", "lm_kl",
                         ("perplexity_ratio", "next_token_agreement"), Floor("perplexity_ratio", "<=", 1.25),
                         class_dim=-1, pad=True, min_rank=3, max_rank=3))
register_kind(OutputKind("regression", "regressed values", "mse", _FIDELITY, Floor("cosine", ">=", 0.7)))
register_kind(OutputKind(FALLBACK_KIND, "dense maps, features and anything else", "mse", _FIDELITY,
                         Floor("cosine", ">=", 0.7), recognise=_map))


def infer_kind(layout: Layout) -> tuple[str, Recognised]:
    """The first kind of :data:`KINDS` whose rule recognises ``layout`` (``map`` at last)."""
    for kind in KINDS.values():
        if kind.recognise is not None:
            found = kind.recognise(layout)
            if found is not None:
                return kind.name, found
    return FALLBACK_KIND, _map(layout)


class OutputDeclarationError(ConfigError):
    """An output declaration (the recipe's ``outputs``) is malformed."""


class OutputDeclaration(Config):
    """The recipe's declaration of one output (``outputs: {"output": {kind: ctc, class_dim: -1,
    blank: 0}}``): its kind, class dim (default: the kind's), blank index (CTC), pad token id
    (``lm``; default the model config's ``pad_token_id``) and the
    softmax temperature of its ``kl`` distillation (the loss is multiplied by its square)."""

    owner: ClassVar[str] = "outputs"
    error_type: ClassVar[type[ConfigError]] = OutputDeclarationError

    kind: str
    class_dim: int | None = None
    blank: int | None = Field(None, ge=0)
    pad: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, gt=0)

    @field_validator("kind", mode="after")
    @classmethod
    def _known(cls, kind: str) -> str:
        return check_choice("output kind", kind, KINDS)

    @model_validator(mode="after")
    def _consistent(self) -> OutputDeclaration:
        kind = KINDS[self.kind]
        if self.blank is not None and not kind.blank:
            raise ValueError(f"blank: kind {self.kind} has no blank index (only "
                             f"{', '.join(k.name for k in KINDS.values() if k.blank)})")
        if self.pad is not None and not kind.pad:
            raise ValueError(f"pad: kind {self.kind} has no pad token (only "
                             f"{', '.join(k.name for k in KINDS.values() if k.pad)})")
        if self.class_dim is not None and kind.class_dim is None:
            raise ValueError(f"class_dim: kind {self.kind} has no class dim")
        return self

    def record(self) -> dict[str, Any]:
        return self.model_dump(exclude_unset=True)
