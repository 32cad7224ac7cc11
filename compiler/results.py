"""What the stages of ``spruce compile`` exchange: one frozen dataclass per stage result,
and the run's context (the workspace, the timings, the live objects the user handed in).

Each stage of :func:`spruce.compiler.pipeline.compile` takes some of these values and
returns one of them; nothing else passes between the stages.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..passes.graph import CapturedGraph
from ..passes.sparsity.method import MethodConfig
from ..passes.sparsity.model import SparseModel
from ..runtime.bench import BenchReport
from ..runtime.budget import MeasuredSelection
from ..runtime.table import LatencyTable
from ..targets.base import Artifact, Target
from .channel_methods import FinalCheck, MethodDrive
from .datasets import Loaders, inputs_of
from .fidelity import Fidelity
from .outputs import OutputPlan
from .recipes import Recipe
from .recovery import RecoveryLog
from .training import TrainLog

__all__ = [
    "ArtifactEvaluation", "Benched", "Built", "Captured", "Exported", "Given", "LMEvaluated", "Profiled", "Quantized",
    "Recovered", "Reference", "Setup", "Sparsified", "Timings", "UserFunction", "Workspace",
]


@dataclass(frozen=True)
class Workspace:
    """Where and how a compile runs: the (staged, empty) output folder and the console."""

    out_dir: Path
    quiet: bool = False
    progress: bool = True

    def say(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)


@dataclass
class Timings:
    """Seconds per stage (``<stage>_s``, filled by :meth:`stage`) and the start of the run
    (``time.perf_counter()``)."""

    started: float = field(default_factory=time.perf_counter)
    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block as stage ``name``: its wall seconds land in ``seconds[f"{name}_s"]``."""
        clock = time.perf_counter()
        yield
        self.seconds[f"{name}_s"] = time.perf_counter() - clock


@dataclass(frozen=True)
class UserFunction:
    """A function of the user's (``loss_fn``, ``evaluate``, ``prepare``) and where it is from."""

    function: Callable[..., Any]
    where: str

    @classmethod
    def of(cls, value: Callable[..., Any] | str | None, role: str) -> UserFunction | None:
        """``value`` (a function or a ``FILE.py:NAME`` spec, loaded here) as a UserFunction,
        None for None; ``ValueError`` naming ``role`` for anything else."""
        if value is None:
            return None
        if isinstance(value, str):
            from .models import load_function

            return cls(load_function(value, role), value)
        if not callable(value):
            raise ValueError(f"{role} must be a function or FILE.py:NAME, got {type(value).__name__}")
        try:
            source = inspect.getsourcefile(value) or "<unknown file>"
        except TypeError:
            source = "<unknown file>"
        return cls(value, f"{source}:{getattr(value, '__qualname__', type(value).__name__)}")


@dataclass(frozen=True)
class Given:
    """Live objects handed to ``spruce.compile`` (each None where the recipe's spec or the
    default stands): the trained model, its example input, the data, the user's functions."""

    model: nn.Module | None = None
    example: torch.Tensor | None = None
    data: Loaders | tuple | None = None
    loss_fn: Callable[..., Any] | None = None
    evaluate: Callable[..., Any] | None = None
    prepare: Callable[..., Any] | None = None


@dataclass(frozen=True)
class Setup:
    """The recipe made concrete: target, data, the trained model (the embedded default's at
    its initial weights until ``dense_reference`` trains it), the example, and what
    ``load_setup`` settled: the output plan, the recovery mode and loss, the user's functions;
    with INT8 shipping, the fp32 target of the dense reference and the calibration samples."""

    recipe: Recipe
    target: Target
    data: Loaders
    model: nn.Module
    example: torch.Tensor
    initial_state: dict[str, torch.Tensor]
    plan: OutputPlan | None = None
    mode: str = "distill"
    loss: UserFunction | None = None
    evaluate: UserFunction | None = None
    model_name: str = "model"
    default_model: bool = False
    model_folder: str | None = None  # a transformers folder the model was loaded from
    uniform: bool = False  # channel groups of one role keep one count in every layer
    recover_tokens: int | None = None  # a causal LM's recovery token budget (None: epochs)
    recover_tokens_from: str = ""
    reference_target: Target | None = None  # the dense fp32 model's target (``target`` itself unless INT8 ships)
    calibration: tuple[tuple[torch.Tensor], ...] = ()  # INT8: the calibration samples of every build
    selection_target: Target | None = None  # the latency table's target (``target`` unless selection_precision differs)

    @property
    def dense_target(self) -> Target:
        """The target the dense reference is built and timed on: fp32 (the budget's denominator)."""
        return self.reference_target if self.reference_target is not None else self.target

    @property
    def table_target(self) -> Target:
        """The target the latency table is profiled on (the recipe's ``selection_precision``); the budget
        loop times the shipped precision on :attr:`target` whatever the table's."""
        return self.selection_target if self.selection_target is not None else self.target

    @property
    def int8(self) -> bool:
        """Whether the compiled artifact ships INT8."""
        return getattr(self.target, "precision", "fp32") == "int8"

    @property
    def total_steps(self) -> int:
        if self.recover_tokens is not None:
            per_batch = max(1, int(inputs_of(next(iter(self.data.train))).numel()))  # tokens of a batch
            return max(1, -(-self.recover_tokens // per_batch))
        return self.recipe.epochs * len(self.data.train)

    @property
    def is_lm(self) -> bool:
        """The model is a causal LM (an output of kind ``lm``)."""
        return self.plan is not None and any(spec.kind == "lm" for spec in self.plan.outputs)

    @property
    def loss_text(self) -> str:
        if self.mode == "none":
            return "none (BatchNorm re-estimation only)"
        if self.mode == "distill":
            return "distillation from the dense model (per output: see outputs)"
        return f"user loss {self.loss.where}" if self.loss else "cross-entropy on the labels (built in)"


@dataclass(frozen=True)
class Reference:
    """The dense reference: the trained model, its training log (empty unless spruce trained
    it: the embedded default), its held-out accuracy (None without labels) and user metrics."""

    model: nn.Module
    log: TrainLog
    accuracy: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Captured:
    """The student (a copy of the trained model) and its captured graph."""

    student: nn.Module
    graph: CapturedGraph


@dataclass(frozen=True)
class Profiled:
    """The target's latency table (None unless the budget is a latency and the selection is
    steered by latency), and the whole blocks the budget's reachability check chose to remove
    (None where no check ran: the selection takes the recipe's ``depth``)."""

    table: LatencyTable | None
    blocks: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Sparsified:
    """What was chosen: for ``unstructured`` / ``N:M`` the method's config (scaled to the run)
    and the SparseModel around the student; for ``channel`` the compact model (channels
    removed), the kept channels and, for a latency budget, the measured selection."""

    method: MethodConfig
    sparse: SparseModel | None
    total_steps: int
    compact: nn.Module | None = None
    kept: dict[int, np.ndarray] | None = None
    selection: MeasuredSelection | None = None
    importance: str = "magnitude"  # what scored the channels, in full (the report's recovery section)
    drive: MethodDrive | None = None  # channel: the method re-selecting channels during recovery (sparse set)
    removed_blocks: tuple[str, ...] = ()  # channel: whole residual blocks removed too (module paths)
    criterion: str = "weight magnitude"  # what scored the channels, in a few words (the report's header)


@dataclass(frozen=True)
class Recovered:
    """The recovery run's log (``log`` kept as a TrainLog for the report's curves)."""

    log: TrainLog
    recovery: RecoveryLog | None = None
    before: Fidelity | None = None  # the selected model's fidelity to dense before recovery (same held-out inputs)
    final: FinalCheck | None = None  # a method-driven channel selection judged against the budget after recovery
    fake_quant: str | None = None  # INT8: "ran on N layers", or why it did not run; None when not asked


@dataclass(frozen=True)
class Exported:
    """The compiled torch model (compact or folded), its held-out accuracy (None without
    labels), its largest difference from the SparseModel (None for a compact model built
    directly), what happened to ``model.pt``, and its fidelity and user metrics."""

    model: nn.Module
    accuracy: float | None
    agreement: float | None
    module_file: str | None
    fidelity: Fidelity | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    held_out: int = 0


@dataclass(frozen=True)
class Built:
    """The dense and compiled artifacts (with INT8 shipping: dense fp32, compiled INT8, and
    the dense model INT8 without pruning)."""

    dense: Artifact
    compiled: Artifact
    language_model: dict[str, Any] | None = None  # a causal LM's extra artifacts (compiler.lm_artifacts)
    dense_int8: Artifact | None = None


@dataclass(frozen=True)
class ArtifactEvaluation:
    """A built artifact judged as it runs on the target (not the torch model it came from):
    its fidelity to the dense torch model on the held-out inputs, held-out accuracy (None
    without labels), the user's metrics, and its manifest's ``info`` (precision, quantization)."""

    artifact: str
    fidelity: Fidelity | None
    accuracy: float | None
    metrics: dict[str, float]
    info: dict[str, Any]

    def record(self) -> dict[str, Any]:
        return {"artifact": self.artifact, "fidelity": self.fidelity.record() if self.fidelity else None,
                "accuracy": self.accuracy, "metrics": self.metrics, "precision": self.info.get("precision"),
                "quantization": self.info.get("quantization"), "integer_mac_share": self.info.get("integer_mac_share"),
                "max_relative_error_vs_torch": self.info.get("max_relative_error")}


@dataclass(frozen=True)
class Quantized:
    """INT8 shipping: the dense model INT8 without pruning and the compiled INT8 artifact, each
    evaluated as it runs (both None when fp32 ships); ``fake_quant``: whether recovery trained
    with fake quantization (Recovered.fake_quant)."""

    dense_int8: ArtifactEvaluation | None = None
    compiled_int8: ArtifactEvaluation | None = None
    fake_quant: str | None = None


@dataclass(frozen=True)
class Benched:
    """Both artifacts timed on the target."""

    report: BenchReport


@dataclass(frozen=True)
class LMEvaluated:
    """A causal LM's evaluation and speed, dense and compiled side by side
    (:func:`spruce.compiler.lm_report.lm_section`); ``record`` None for other models."""

    record: dict[str, Any] | None = None
