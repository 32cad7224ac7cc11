"""The stages of ``spruce compile``, each a function with typed inputs and a typed result.

    load -> reference -> capture -> profile -> sparsify -> recover -> export -> build -> bench -> report

A stage takes the results of earlier stages as parameters annotated with their types and
returns one frozen dataclass; :func:`spruce.compiler.pipeline.run_stages` calls them in
order and hands each the results its annotations ask for. Nothing else passes between
them, so a stage can be replaced, or one inserted, by editing the list in ``pipeline``.

The model compiled is a *trained* model, the dense reference: evaluated, built and timed as
given, never re-trained (the embedded default is the one exception: its small CNN is first
trained on the bundled digits with a fixed seed, and that trained model is then compiled).

- ``load``: target (checked to run here), model and example input, data, the user's
  ``loss_fn`` / ``evaluate`` / ``prepare``, the output plan; every bad input fails here,
  before any training or profiling (a model whose outputs hold no tensor, a ``loss_fn`` or
  ``evaluate`` that raises, an empty or unreadable image folder, labels with no loss for a
  non-classification output);
- ``reference``: the dense model (the embedded default trained first) and its evaluation;
- ``capture``: the student (a copy of the trained model) captured as a graph, the only capture;
- ``profile``: the target's latency table when the budget is a latency (else none, and none
  when ``selection_cost`` is ``flops``: the measured loop then steers by MACs);
- ``sparsify``: for ``channel``: channels chosen one-shot from the trained weights' magnitude
  (gradient importance is exactly zero when the student equals its teacher), a latency
  budget met as *measured* on the target (:func:`spruce.runtime.budget.meet_latency_budget`,
  :class:`InfeasibleBudget` before any recovery), the compact model; with a budgeted method
  named and recovery ``distill`` / ``loss``, that selection calibrates the budget of the
  method's channel SparseModel instead (:mod:`spruce.compiler.channel_methods`); for
  ``unstructured`` / ``N:M``: the method's SparseModel, its initial masks by magnitude (never random);
- ``recover``: ``none`` (BatchNorm re-estimation), ``distill`` or ``loss``; a method
  re-selecting channels has its final channels measured against the budget (re-aimed if
  above it) once it has no update left;
- ``export``: the compiled model; its fidelity to the dense one on held-out inputs, accuracy
  where labels exist, the user's metrics;
- ``build``: dense and compiled artifacts for the target; ``bench``: both timed;
- ``report``: the report document built from all results, written with its plots.
"""

from __future__ import annotations

import copy
import inspect
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..capture.trace import capture as capture_model
from ..passes.analysis import analyze
from ..passes.export import check_runs, remove_channels
from ..passes.graph import CapturedGraph, require_data
from ..passes.importance import importance_scores, param_table
from ..passes.sparsity.knapsack import build_cost_model, minimum_kept, normalise_importance, select_channels
from ..passes.sparsity.method import MethodConfig, RunLength
from ..passes.sparsity.model import SparseModel, StaleOptimizerWarning, sparsify_captured
from ..runtime.bench import BenchReport
from ..runtime.bench import bench as bench_artifacts
from ..runtime.budget import MeasuredSelection, meet_latency_budget
from ..runtime.profile import LatencyTable
from ..runtime.profile import profile as profile_layers
from ..targets.base import Artifact, Target, get_target
from ..targets.files import OutputError, atomic_path
from .channel_methods import (
    FinalCheck,
    MethodDrive,
    check_final,
    drives_channels,
    method_activity,
    sparsify_with_method,
    updates_left,
)
from .datasets import DataError, Loaders, check_disjoint, default_model, inputs_of, load_data, loaders_from
from .default_cache import trained_default
from .outputs import Fidelity, OutputPlan, fidelity, flatten_outputs, plan_outputs
from .recipes import Recipe
from .recovery import RecoveryLog, cross_entropy_loss
from .recovery import recover as recover_model
from .reporting import CompileReport, build_document, write_reports
from .training import TrainLog

__all__ = [
    "Benched", "Built", "Captured", "Exported", "Given", "Profiled", "Recovered", "Reference", "Setup", "Sparsified",
    "Timings", "UserFunction", "Workspace", "bench", "build", "capture", "export", "load", "profile", "recover",
    "reference", "report", "sparsify",
]

CHANNEL_IMPORTANCE = "l1"  # one-shot channel choice on a trained model: the weights' magnitude


# --- what the stages exchange ----------------------------------------------------------------


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
    """Seconds per stage (filled by the stage runner) and since the start."""

    started: float = field(default_factory=time.perf_counter)
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class UserFunction:
    """A function of the user's (``loss_fn``, ``evaluate``, ``prepare``) and where it is from."""

    function: Callable[..., Any]
    where: str

    @classmethod
    def of(cls, value: Callable[..., Any] | str | None, role: str) -> UserFunction | None:
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
    its initial weights until ``reference`` trains it), the example, and what ``load`` settled:
    the output plan, the recovery mode and loss, the user's functions."""

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

    @property
    def total_steps(self) -> int:
        return self.recipe.epochs * len(self.data.train)

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
    """The target's latency table (None unless the budget is a latency)."""

    table: LatencyTable | None


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
    importance: str = "magnitude"
    drive: MethodDrive | None = None  # channel: the method re-selecting channels during recovery (sparse set)


@dataclass(frozen=True)
class Recovered:
    """The recovery run's log (``log`` kept as a TrainLog for the report's curves)."""

    log: TrainLog
    recovery: RecoveryLog | None = None
    before: Fidelity | None = None  # the selected model's fidelity to dense before recovery (same held-out inputs)
    final: FinalCheck | None = None  # a method-driven channel selection judged against the budget after recovery


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
    """The dense and compiled artifacts."""

    dense: Artifact
    compiled: Artifact


@dataclass(frozen=True)
class Benched:
    """Both artifacts timed on the target."""

    report: BenchReport


# --- the stages ----------------------------------------------------------------------------------


def load(recipe: Recipe, workspace: Workspace, given: Given) -> Setup:
    """Target, model and example, data, the user's functions and the output plan; every
    check that can fail on the user's input runs here, before any training or profiling."""
    target = get_target(recipe.target, **recipe.target_options)
    target.require()  # a target that cannot run here is a user error now, not after training
    prepare = UserFunction.of(given.prepare if given.prepare is not None else recipe.prepare, "prepare")
    model, example, data, name, is_default = _model_example_data(recipe, given, prepare)
    loss = UserFunction.of(given.loss_fn if given.loss_fn is not None else recipe.loss, "loss_fn")
    evaluate_fn = UserFunction.of(given.evaluate if given.evaluate is not None else recipe.evaluate, "evaluate")
    with torch.no_grad():
        try:
            outputs = model.eval()(example)
        except Exception as exc:
            raise ValueError(f"{name} does not run on the example input of shape {tuple(example.shape)}: "
                             f"{type(exc).__name__}: {exc}") from None
    plan = plan_outputs(outputs, recipe.distill_losses, name)
    check_disjoint(data, recipe.data)
    mode = _recovery_mode(recipe, data, plan, loss, name)
    if loss is not None and mode == "loss":
        _check_loss(loss, model, data)
    if evaluate_fn is not None:
        _check_evaluate(evaluate_fn, model, data)
    workspace.say(f"spruce compile: {name} on {data.name}, target {recipe.target}, structure {recipe.structure}, "
                  + (f"budget {recipe.budget}" if recipe.budget else f"sparsity {recipe.sparsity}")
                  + f", recover {mode}")
    return Setup(recipe, target, data, model, example, copy.deepcopy(model.state_dict()), plan, mode, loss,
                 evaluate_fn, name, is_default)


def reference(setup: Setup, workspace: Workspace) -> Reference:
    """The dense reference as given (the embedded default is trained first, seeded), evaluated
    on the held-out data."""
    recipe = setup.recipe
    log = TrainLog()
    if setup.default_model:  # trained once per machine: the weights are cached (default_cache)
        log, _ = trained_default(setup.model, setup.data, recipe.seed, recipe.epochs, recipe.lr, recipe.optimizer,
                                 quiet=workspace.quiet)
    setup.model.eval()
    return Reference(setup.model, log, _accuracy(setup, setup.model), _user_metrics(setup, setup.model))


def capture(setup: Setup, reference: Reference) -> Captured:
    """A copy of the trained model (the student), captured at the example."""
    student = copy.deepcopy(reference.model).eval()
    return Captured(student, capture_model(student, (setup.example,)))


def profile(setup: Setup, captured: Captured, workspace: Workspace) -> Profiled:
    """The latency table of the student on the target when the budget is a latency (steering
    the selection, or a method re-selecting channels during recovery, which needs it even when
    ``selection_cost`` is ``flops``)."""
    recipe = setup.recipe
    method_needs = drives_channels(recipe.structure, setup.mode, recipe.method, recipe.method_named, recipe.budget)
    if not (recipe.budget and "latency" in recipe.budget) or (recipe.selection_cost != "latency"
                                                               and not method_needs):
        return Profiled(None)
    workspace.say("profiling per-layer latency on the target ...")
    table = profile_layers(captured.student.eval(), (setup.example,), setup.target, recipe.profile_step,
                           progress=workspace.progress and not workspace.quiet and sys.stderr.isatty(),
                           analysis=analyze(captured.graph))
    table.save(workspace.out_dir / "latency_table.json")
    return Profiled(table)


def sparsify(setup: Setup, captured: Captured, profiled: Profiled, workspace: Workspace) -> Sparsified:
    """Choose what to remove from the trained weights: channels by magnitude under the budget
    (a latency budget met as measured), or the method's masks initialised by magnitude."""
    recipe = setup.recipe
    total_steps = setup.total_steps
    method = recipe.method.for_run(RunLength(total_steps, len(setup.data.train), recipe.structure))
    if recipe.structure == "channel":
        chosen = _select_channels(setup, captured, profiled, method, total_steps, workspace)
        if drives_channels(recipe.structure, setup.mode, recipe.method, recipe.method_named, recipe.budget):
            return _method_channels(setup, captured, profiled, chosen, workspace)
        return chosen
    trained = {id(p): p.detach().clone() for p in captured.graph.eval.parameters()}  # before any mask zeroes them
    sparse = sparsify_captured(captured.graph, method, structure=recipe.structure,
                               sparsity=recipe.sparsity if recipe.sparsity is not None else 0.0,
                               distribution=recipe.distribution, total_steps=total_steps)
    _magnitude_masks(sparse, trained, recipe.distribution)
    return Sparsified(method, sparse, total_steps)


def recover(setup: Setup, reference: Reference, captured: Captured, profiled: Profiled, sparsified: Sparsified,
            workspace: Workspace) -> Recovered:
    """Recover the student: BatchNorm re-estimation (``none``), distillation or the loss; a
    method re-selecting channels meanwhile has its final selection checked against the budget."""
    recipe = setup.recipe
    student = sparsified.compact if sparsified.compact is not None else captured.student
    loss_fn = None
    if setup.mode == "loss":
        loss_fn = setup.loss.function if setup.loss is not None else cross_entropy_loss
    held_out = [inputs_of(batch) for batch in setup.data.test]
    selected = sparsified.sparse if sparsified.sparse is not None else student
    before = fidelity(selected, reference.model, held_out, setup.plan) if setup.plan is not None else None
    if setup.mode != "none":
        workspace.say(f"recovering ({setup.loss_text}) ...")
    checks: list[FinalCheck] = []

    def check(step: int) -> None:  # the method's last selection judged as measured, once no update is left
        if not checks and not updates_left(sparsified.sparse, step, sparsified.total_steps):
            workspace.say(f"checking the method's final channels against the budget on the target (step {step}) ...")
            checks.append(check_final(sparsified.sparse, sparsified.drive, reference.model, setup.target,
                                      setup.example, batch_size=recipe.budget_batch_size, round_to=recipe.round_to,
                                      latency_table=profiled.table, calibration=setup.data.train, step=step))

    log = recover_model(student, reference.model, setup.data.train, setup.mode, setup.plan, epochs=recipe.epochs,
                        lr=recipe.recover_lr, loss_fn=loss_fn, sparse=sparsified.sparse, quiet=workspace.quiet,
                        after_step=check if sparsified.drive is not None else None)
    if sparsified.drive is not None and not checks:  # updates still due when recovery stopped
        check(sparsified.total_steps)
    final = checks[0] if checks else None
    accuracy = _accuracy(setup, sparsified.sparse if sparsified.sparse is not None else student)
    return Recovered(TrainLog(list(log.loss), [accuracy] * len(log.loss) if accuracy is not None else [],
                              log.seconds), log, before, final)


def export(setup: Setup, reference: Reference, sparsified: Sparsified, workspace: Workspace) -> Exported:
    """The compiled model (channels removed, or masks folded in), evaluated side by side with
    the dense one on the held-out inputs."""
    sparse = sparsified.sparse
    agreement = None
    if sparse is None:
        compiled = sparsified.compact.eval()
    else:
        with warnings.catch_warnings():  # compile trains the SparseModel only, never the compiled model
            warnings.simplefilter("ignore", StaleOptimizerWarning)
            compiled = (sparse.compact() if sparse.structure == "channel" else sparse.fold()).eval()
        with torch.no_grad():
            check = inputs_of(next(iter(setup.data.test)))[:16]
            pairs = zip(flatten_outputs(compiled(check)), flatten_outputs(sparse.eval()(check)))
            agreement = max(float((a - b).abs().max()) for (_, a), (_, b) in pairs)
    reference.model.eval()
    held_out = [inputs_of(batch) for batch in setup.data.test]
    module_file = _save_module(compiled, workspace.out_dir / "model.pt")
    return Exported(compiled, _accuracy(setup, compiled), agreement, module_file,
                    fidelity(compiled, reference.model, held_out, setup.plan), _user_metrics(setup, compiled),
                    sum(int(x.shape[0]) for x in held_out))


def build(setup: Setup, reference: Reference, exported: Exported, workspace: Workspace) -> Built:
    """Dense and compiled artifacts for the target (each checked by the target as it builds)."""
    workspace.say("building artifacts ...")
    target, example = setup.target, (setup.example,)
    dense = target.build(reference.model, example, workspace.out_dir / f"dense{target.suffix}")
    compiled = target.build(exported.model, example, workspace.out_dir / f"model{target.suffix}")
    return Built(dense, compiled)


def bench(setup: Setup, built: Built, workspace: Workspace) -> Benched:
    """Both artifacts timed on the target, interleaved per batch size."""
    workspace.say("timing dense vs compiled ...")
    recipe = setup.recipe
    latency_budget = bool(recipe.budget and "latency" in recipe.budget)
    sizes = tuple(dict.fromkeys((*recipe.bench_batch_sizes, *((recipe.budget_batch_size,) if latency_budget else ()))))
    return Benched(bench_artifacts(built.compiled, setup.target, sizes, recipe.bench_warmup,
                                   recipe.bench_iters, dense=built.dense))


def report(setup: Setup, reference: Reference, profiled: Profiled, sparsified: Sparsified, recovered: Recovered,
           exported: Exported, built: Built, benched: Benched, timings: Timings,
           workspace: Workspace) -> CompileReport:
    """The report document built from the stage results; report.json, report.md and plots."""
    sparse = sparsified.sparse
    document = build_document(
        recipe=setup.recipe, data_name=setup.data.name, example=setup.example, dense=reference.model,
        dense_log=reference.log, compiled=exported.model, compiled_log=recovered.log,
        compiled_accuracy=exported.accuracy, agreement=exported.agreement, module_file=exported.module_file,
        sparsities=sparse.sparsities() if sparse is not None else {},
        metrics=sparse.metrics if sparse is not None else [], table=profiled.table,
        bench=benched.report, dense_artifact=built.dense, compiled_artifact=built.compiled,
        timings=dict(timings.seconds), wall_s=time.perf_counter() - timings.started,
        dense_accuracy=reference.accuracy if reference.accuracy is not None else "log",
        evaluation=_evaluation_record(setup, reference, exported),
        budget=_budget_record(setup, reference, sparsified, profiled, exported, benched, recovered.final),
        recovery=_recovery_record(setup, sparsified, recovered))
    write_reports(document, profiled.table, workspace.out_dir)
    return CompileReport(document, workspace.out_dir)


# --- helpers ----------------------------------------------------------------------------------------


def _save_module(module: nn.Module, path: Path) -> str | None:
    """``torch.save`` the compiled module (a convenience next to the artifact); some torch
    versions cannot pickle every fx GraphModule, which must not fail the compile."""
    try:
        with atomic_path(path) as temp, open(temp, "wb") as stream:
            torch.save(module, stream)
    except (OSError, OutputError):  # a full disk is the output's problem, not a pickling limit
        raise
    except Exception as exc:  # pickling limits of the installed torch, reported in report.json
        return f"not saved: {type(exc).__name__}: {exc}"
    return path.name


def _single_input(inputs: Any, where: str) -> torch.Tensor:
    if isinstance(inputs, torch.Tensor):
        return inputs
    if isinstance(inputs, (tuple, list)) and len(inputs) == 1 and isinstance(inputs[0], torch.Tensor):
        return inputs[0]
    raise ValueError(f"{where}: compile takes models with one input tensor; the example inputs are "
                     f"{type(inputs).__name__} of {len(inputs) if isinstance(inputs, (tuple, list)) else 1}")


def _model_example_data(recipe: Recipe, given: Given, prepare: UserFunction | None
                        ) -> tuple[nn.Module, torch.Tensor, Loaders, str, bool]:
    """The model, its example input (batch 1), the data, a name for messages, and whether it
    is the embedded default (trained by ``reference``)."""
    if given.model is None and recipe.model is None:
        data = _data(recipe, given, None, prepare)
        if recipe.input_shape is not None:
            raise ValueError("input_shape: the embedded default takes the data's input shape")
        return default_model(data, recipe.seed), data.example, data, "the embedded digits CNN", True
    if given.model is not None:
        if given.example is None:
            raise ValueError("compile(model, example_inputs): a live model needs its example inputs")
        model, example, name = given.model, _single_input(given.example, "example_inputs"), type(given.model).__name__
    else:
        from .models import resolve_model

        torch.manual_seed(recipe.seed)
        model, inputs = resolve_model(recipe.model, [tuple(recipe.input_shape)] if recipe.input_shape else None)
        example, name = _single_input(inputs, f"model {recipe.model}"), f"model {recipe.model}"
    if not isinstance(model, nn.Module):
        raise ValueError(f"{name} is a {type(model).__name__}, not a torch.nn.Module")
    require_data(model, (example,), f"compile {name}")  # a meta-device model is refused by name
    example = example[:1]
    data = _data(recipe, given, example, prepare)
    return model, example, data, name, False


def _data(recipe: Recipe, given: Given, example: torch.Tensor | None, prepare: UserFunction | None) -> Loaders:
    if isinstance(given.data, Loaders):
        return given.data
    if given.data is not None:
        if isinstance(given.data, str):
            return load_data(given.data, recipe.seed, min(recipe.batch_size, 8) if given.data.startswith("images:")
                             else recipe.batch_size, example, prepare.function if prepare is not None else None,
                             recipe.augment)
        if not (isinstance(given.data, tuple) and len(given.data) == 2):
            raise DataError("data must be a spec string, Loaders, or a (recovery_loader, held_out_loader) tuple")
        return loaders_from(given.data[0], given.data[1], "data", "the given loaders")
    return load_data(recipe.data, recipe.seed, recipe.batch_size if example is None else min(recipe.batch_size, 8)
                     if recipe.data.startswith("images:") else recipe.batch_size, example,
                     prepare.function if prepare is not None else None, recipe.augment)


def _recovery_mode(recipe: Recipe, data: Loaders, plan: OutputPlan, loss: UserFunction | None, name: str) -> str:
    labels_usable = data.labeled and plan.all_scores and len(plan.outputs) == 1 and data.num_classes > 0
    if recipe.recover == "loss" or (recipe.recover is None and data.labeled and loss is None):
        if loss is None and not labels_usable:
            non_scores = [s.name for s in plan.outputs if s.kind != "scores"] or [s.name for s in plan.outputs]
            raise ValueError(
                f"{name}: the data carries labels but no loss_fn was given, and output(s) "
                f"{', '.join(non_scores)} are not class scores, so the built-in cross-entropy does not apply; "
                "give loss=FILE.py:loss_fn (loss_fn(outputs, batch)), or recover=distill to ignore the labels")
        return "loss"
    if recipe.recover is None:
        return "loss" if loss is not None else "distill"
    return recipe.recover


def _check_loss(loss: UserFunction, model: nn.Module, data: Loaders) -> None:
    """Call the loss once on the dense model's outputs for the first recovery batch."""
    batch = next(iter(data.train))
    try:
        value = loss.function(model.eval()(inputs_of(batch)), batch)
    except Exception as exc:
        raise ValueError(f"loss_fn {loss.where} raised {type(exc).__name__}: {exc} (called as "
                         "loss_fn(outputs, batch) on the first recovery batch)") from None
    if not (isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point()):
        raise ValueError(f"loss_fn {loss.where} must return a scalar float tensor, got "
                         f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")
    if not value.requires_grad:
        raise ValueError(f"loss_fn {loss.where} returned a tensor that does not depend on the outputs "
                         "(no gradient would reach the model)")


def _check_evaluate(evaluate_fn: UserFunction, model: nn.Module, data: Loaders) -> None:
    """Call ``evaluate`` once on the dense model with the first held-out batch."""
    try:
        with torch.no_grad():
            value = evaluate_fn.function(model.eval(), [next(iter(data.test))])
    except Exception as exc:
        raise ValueError(f"evaluate {evaluate_fn.where} raised {type(exc).__name__}: {exc} (called as "
                         "evaluate(model, loader) on the first held-out batch)") from None
    _metrics(value, evaluate_fn)


def _metrics(value: Any, evaluate_fn: UserFunction) -> dict[str, float]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"evaluate {evaluate_fn.where} must return {{name: number}}, got {type(value).__name__}")
    try:
        return {k: float(v) for k, v in value.items()}
    except (TypeError, ValueError):
        raise ValueError(f"evaluate {evaluate_fn.where} must return {{name: number}}, got {value!r}") from None


def _user_metrics(setup: Setup, model: nn.Module) -> dict[str, float]:
    if setup.evaluate is None:
        return {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return _metrics(setup.evaluate.function(model, setup.data.test), setup.evaluate)
    finally:
        model.train(was_training)


@torch.no_grad()
def _accuracy(setup: Setup, model: nn.Module) -> float | None:
    """Top-1 accuracy on the held-out data where labels exist and the output is class scores."""
    data = setup.data
    if not (data.labeled and setup.plan is not None and setup.plan.all_scores and len(setup.plan.outputs) == 1):
        return None
    was_training = model.training
    model.eval()
    correct = total = 0
    for batch in data.test:
        inputs, labels = batch
        predicted = flatten_outputs(model(inputs))[0][1].argmax(dim=1)
        correct += int((predicted == labels).sum())
        total += int(labels.numel())
    model.train(was_training)
    return correct / max(total, 1)


def _select_channels(setup: Setup, captured: Captured, profiled: Profiled, method: MethodConfig, total_steps: int,
                     workspace: Workspace) -> Sparsified:
    """Channels kept by magnitude: under a latency budget, the measured closed loop; under a
    FLOPs/params budget, the knapsack; under a sparsity, the top fraction of each group."""
    recipe = setup.recipe
    student, example = captured.student.eval(), setup.example
    analysis = analyze(captured.graph)
    params = param_table(student)
    rng = np.random.default_rng(recipe.seed)
    importance = {g.id: importance_scores(CHANNEL_IMPORTANCE, g, params, rng) for g in analysis.groups if g.prunable}
    if not importance:
        raise ValueError(f"{setup.model_name} has no prunable channel group; try structure unstructured or 2:4")
    importance = normalise_importance(importance, recipe.importance_norm)
    required = minimum_kept(importance, recipe.min_keep, recipe.round_to) if recipe.min_keep > 0 else None
    selection = None
    if recipe.budget and "latency" in recipe.budget:
        workspace.say("choosing channels to meet the latency budget as measured on the target ...")
        steer = None if recipe.selection_cost == "latency" else build_cost_model(recipe.selection_cost, student,
                                                                                 analysis)
        selection = meet_latency_budget(analysis, student, profiled.table, setup.target, recipe.budget["latency"],
                                        importance, (example,), batch_size=recipe.budget_batch_size,
                                        round_to=recipe.round_to, required=required, cost_model=steer)
        kept, compact = selection.kept, selection.compact
    elif recipe.budget:
        ((kind, fraction),) = recipe.budget.items()
        cost = build_cost_model(kind, student, analysis)
        kept = dict(select_channels(cost, importance, fraction * cost.dense(), round_to=recipe.round_to,
                                    required=required).kept)
        compact = remove_channels(analysis, student, kept)
    else:
        from ..api.prune import select_channels as top_fraction

        kept = top_fraction(student, analysis.groups, recipe.sparsity or 0.0, CHANNEL_IMPORTANCE,
                            round_to=recipe.round_to, seed=recipe.seed)
        compact = remove_channels(analysis, student, kept)
    check_runs(compact, (example,), student, "compact model")
    norm = "" if recipe.importance_norm == "none" else f", divided by its group's mean ({recipe.importance_norm})"
    floor = f"; every group keeps at least {recipe.min_keep:g} of its channels" if required is not None else ""
    return Sparsified(method, None, total_steps, compact, kept, selection,
                      f"{CHANNEL_IMPORTANCE} (weight magnitude{norm}){floor}")


@torch.no_grad()
def _magnitude_masks(sparse: SparseModel, trained: dict[int, torch.Tensor], distribution: str) -> None:
    """The initial masks of a trained model's SparseModel: the largest trained weights (per
    layer at its density, one global threshold for ``global``, N of each M for N:M), never
    random. The method's own initial masks already zeroed weights, so the trained weights
    are put back first."""
    ctx = sparse.context
    for layer in ctx.layers:
        layer.module.weight.copy_(trained[id(layer.module.weight)])
    if distribution == "global" and sparse.structure == "unstructured":
        for layer, mask in zip(ctx.layers, ctx.global_magnitude_masks(ctx.mean_density())):
            ctx.set_mask(layer, mask)
    else:
        for layer in ctx.layers:
            ctx.set_mask(layer, ctx.magnitude_mask(layer, layer.density))
    sparse.apply_masks()


def _method_channels(setup: Setup, captured: Captured, profiled: Profiled, chosen: Sparsified,
                     workspace: Workspace) -> Sparsified:
    """The one-shot selection ``chosen`` (its measured calibration, InfeasibleBudget already
    raised where due) handed over to the named method: the student becomes the method's
    channel SparseModel, which re-selects channels during recovery
    (:mod:`spruce.compiler.channel_methods`)."""
    recipe = setup.recipe
    workspace.say(f"method {recipe.method.name} re-selects channels under the budget during recovery ...")
    run = RunLength(chosen.total_steps, len(setup.data.train), recipe.structure)
    sparse, drive = sparsify_with_method(captured.graph, recipe.method, run, dict(recipe.budget), chosen.selection,
                                         profiled.table)
    return Sparsified(sparse.method.config, sparse, chosen.total_steps, selection=chosen.selection,
                      importance=f"{drive.criterion} (method {drive.method})", drive=drive)


def _evaluation_record(setup: Setup, reference: Reference, exported: Exported) -> dict[str, Any]:
    return {"held_out_inputs": exported.held_out, "held_out_disjoint_from_recovery": True,
            "outputs": setup.plan.record() if setup.plan else [],
            "fidelity": exported.fidelity.record() if exported.fidelity else None,
            "dense_metrics": reference.metrics, "compiled_metrics": exported.metrics,
            "evaluate": setup.evaluate.where if setup.evaluate else None}


def _budget_record(setup: Setup, reference: Reference, sparsified: Sparsified, profiled: Profiled,
                   exported: Exported, benched: Benched, final: FinalCheck | None = None) -> dict[str, Any] | None:
    recipe = setup.recipe
    if not recipe.budget:
        return None
    ((kind, fraction),) = recipe.budget.items()
    record: dict[str, Any] = {"kind": kind, "fraction": fraction}
    if kind != "latency":
        from ..api.stats import count_macs, count_params

        count = count_params if kind == "params" else lambda m: count_macs(m, (setup.example,))
        record["ratio"] = count(exported.model) / max(count(reference.model), 1)
        return record
    record["batch_size"] = recipe.budget_batch_size
    dense_row = benched.report.row("dense", recipe.budget_batch_size)
    compiled_row = benched.report.row("compiled", recipe.budget_batch_size)
    # the built artifacts timed again, interleaved: on the budget's statistic (run-queue waiting
    # excluded, as every latency measurement of compile) and on plain wall-clock medians
    record["bench_ratio"] = compiled_row.robust_ms / dense_row.robust_ms
    record["bench_wall_ratio"] = compiled_row.median_ms / dense_row.median_ms
    if profiled.table is not None:
        record["dense_predicted_ms"] = profiled.table.dense_ms()
        record["compiled_predicted_ms"] = profiled.table.predict_model(exported.model)
    if sparsified.selection is not None:
        selection = sparsified.selection.summary()
        record.update(measured_ratio=selection["ratio"], in_band=selection["in_band"],
                      dense_measured_ms=selection["measured_dense_ms"],
                      compiled_measured_ms=selection["measured_ms"], attempts=selection["attempts"],
                      band=[0.9 * fraction, 1.05 * fraction])
    if final is not None:  # a method re-selected during recovery: what ships is its final selection, measured
        record.update(measured_ratio=final.ratio, in_band=final.in_band, dense_measured_ms=final.measured_dense_ms,
                      compiled_measured_ms=final.measured_ms, final_check=final.record(),
                      selection_before_recovery_ratio=record.get("measured_ratio"))
    return record


def _recovery_record(setup: Setup, sparsified: Sparsified, recovered: Recovered) -> dict[str, Any]:
    log = recovered.recovery
    record = {"mode": setup.mode, "loss": setup.loss_text, **(log.record() if log else {})}
    if sparsified.drive is not None:
        drive = sparsified.drive
        record["selection"] = (
            f"channels re-selected during recovery by method {drive.method} under the budget (its knapsack given "
            f"{drive.aim:.4g} of the predicted dense cost), importance {drive.criterion} from the trained weights"
            + (f"; where every gradient is exactly zero (the student still equals its teacher) the channels are "
               f"scored by {drive.fallback} instead" if drive.fallback else "")
            + "; the final selection checked against the budget as measured")
        record.update(method=drive.record(), **method_activity(sparsified.sparse),
                      final_check=recovered.final.record() if recovered.final is not None else None)
        record["fidelity_before_recovery"] = recovered.before.record() if recovered.before is not None else None
        return record
    record["selection"] = (f"channels chosen once from the trained weights by {sparsified.importance}; gradient "
                           "importance is exactly zero when the student equals its teacher, so magnitude is the "
                           "criterion; the method does not re-select channels during recovery"
                           if sparsified.sparse is None else
                           f"masks initialised by weight magnitude, then method {sparsified.method.name}'s "
                           "updates during recovery")
    if sparsified.sparse is None:
        record["mask_updates"] = 0
    # what recovery bought: the selected model against dense on the same held-out inputs, before it
    record["fidelity_before_recovery"] = recovered.before.record() if recovered.before is not None else None
    return record

