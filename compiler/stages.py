"""The stages of ``spruce compile``, each a function with typed inputs and a typed result.

    load -> reference -> capture -> profile -> sparsify -> recover -> export -> build -> bench -> report

A stage takes the results of earlier stages as parameters annotated with their types and
returns one frozen dataclass; :func:`spruce.compiler.pipeline.run_stages` calls them in
order and hands each the results its annotations ask for. Nothing else passes between
them, so a stage can be replaced, or one inserted, by editing the list in ``pipeline``.

- ``load``: the recipe's target (checked to run here), data, model and example input;
- ``reference``: the dense baseline, trained with the recipe from the model's initial weights;
- ``capture``: the student (the same initial weights) captured as a graph, the only capture;
- ``profile``: the target's latency table when the budget is a latency (else none);
- ``sparsify``: the method's config scaled to the run (``MethodConfig.for_run``) and the
  SparseModel with its masks;
- ``recover``: sparse training of the student;
- ``export``: the compact (channels) or folded model, its accuracy and agreement;
- ``build``: dense and compiled artifacts for the target; ``bench``: both timed;
- ``report``: the report document built from all results, written with its plots.
"""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..passes.analysis import analyze
from ..passes.graph import CapturedGraph
from ..passes.sparsity.method import MethodConfig, RunLength
from ..passes.sparsity.model import SparseModel, sparsify_captured
from ..runtime.bench import BenchReport
from ..runtime.bench import bench as bench_artifacts
from ..runtime.profile import LatencyTable
from ..runtime.profile import profile as profile_layers
from ..targets.base import Artifact, Target, get_target
from ..targets.files import atomic_path
from .datasets import Loaders, default_model, load_data
from .recipes import Recipe
from .reporting import CompileReport, build_document, write_reports
from .trace import capture as capture_model
from .training import TrainLog, evaluate, train

__all__ = [
    "Benched", "Built", "Captured", "Exported", "Profiled", "Recovered", "Reference", "Setup", "Sparsified",
    "Timings", "Workspace", "bench", "build", "capture", "export", "load", "profile", "recover", "reference",
    "report", "sparsify",
]


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
class Setup:
    """The recipe made concrete: target, data, the model at its initial weights, the example."""

    recipe: Recipe
    target: Target
    data: Loaders
    model: nn.Module
    example: torch.Tensor
    initial_state: dict[str, torch.Tensor]

    @property
    def total_steps(self) -> int:
        return self.recipe.epochs * len(self.data.train)


@dataclass(frozen=True)
class Reference:
    """The dense baseline (trained) and its training log."""

    model: nn.Module
    log: TrainLog


@dataclass(frozen=True)
class Captured:
    """The student (a copy of the model at its initial weights) and its captured graph."""

    student: nn.Module
    graph: CapturedGraph


@dataclass(frozen=True)
class Profiled:
    """The target's latency table (None unless the budget is a latency)."""

    table: LatencyTable | None


@dataclass(frozen=True)
class Sparsified:
    """The method's config as trained (scaled to the run) and the SparseModel around the student."""

    method: MethodConfig
    sparse: SparseModel
    total_steps: int


@dataclass(frozen=True)
class Recovered:
    """The sparse training run's log."""

    log: TrainLog


@dataclass(frozen=True)
class Exported:
    """The compiled torch model (compact or folded), its test accuracy, its largest
    difference from the SparseModel, and what happened to ``model.pt``."""

    model: nn.Module
    accuracy: float
    agreement: float
    module_file: str | None


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


def load(recipe: Recipe, workspace: Workspace) -> Setup:
    """Target (checked to run here, before any work), data, model and example input."""
    target = get_target(recipe.target, **recipe.target_options)
    target.require()  # a target that cannot run here is a user error now, not after training
    data = load_data(recipe.data, recipe.seed, recipe.batch_size)
    model, example = _model_and_example(recipe, data)
    workspace.say(f"spruce compile: {type(model).__name__} on {data.name}, target {recipe.target}, method "
                  f"{recipe.method.name}, structure {recipe.structure}, "
                  + (f"budget {recipe.budget}" if recipe.budget else f"sparsity {recipe.sparsity}"))
    return Setup(recipe, target, data, model, example, copy.deepcopy(model.state_dict()))


def reference(setup: Setup, workspace: Workspace) -> Reference:
    """Train the dense baseline: the model from its initial weights, with the recipe."""
    recipe = setup.recipe
    log = train(setup.model, setup.data.train, setup.data.test, recipe.epochs, recipe.lr, recipe.optimizer,
                desc="dense", quiet=workspace.quiet)
    return Reference(setup.model, log)


def capture(setup: Setup) -> Captured:
    """A copy of the model at its initial weights (the student), captured at the example."""
    student = copy.deepcopy(setup.model)
    student.load_state_dict(setup.initial_state)
    return Captured(student, capture_model(student, (setup.example,)))


def profile(setup: Setup, captured: Captured, workspace: Workspace) -> Profiled:
    """The latency table of the student on the target when the budget is a latency."""
    recipe = setup.recipe
    if not (recipe.budget and "latency" in recipe.budget):
        return Profiled(None)
    workspace.say("profiling per-layer latency on the target ...")
    table = profile_layers(captured.student.eval(), (setup.example,), setup.target, recipe.profile_step,
                           progress=workspace.progress and not workspace.quiet and sys.stderr.isatty(),
                           analysis=analyze(captured.graph))
    table.save(workspace.out_dir / "latency_table.json")
    return Profiled(table)


def sparsify(setup: Setup, captured: Captured, profiled: Profiled) -> Sparsified:
    """The recipe's method, its defaults scaled to the run, set up on the captured student."""
    recipe = setup.recipe
    total_steps = setup.total_steps
    method = recipe.method.for_run(RunLength(total_steps, len(setup.data.train), recipe.structure))
    budget: dict[str, Any] = {"budget": recipe.budget, "latency_table": profiled.table} if recipe.budget else {}
    sparse = sparsify_captured(captured.graph, method, structure=recipe.structure,
                               sparsity=recipe.sparsity if recipe.sparsity is not None else 0.0,
                               distribution=recipe.distribution, total_steps=total_steps, **budget)
    return Sparsified(method, sparse, total_steps)


def recover(setup: Setup, captured: Captured, sparsified: Sparsified, workspace: Workspace) -> Recovered:
    """Train the student sparse (the method's updates after every optimizer step)."""
    recipe = setup.recipe
    log = train(captured.student, setup.data.train, setup.data.test, recipe.epochs, recipe.lr, recipe.optimizer,
                sparse=sparsified.sparse, desc=sparsified.method.name, quiet=workspace.quiet)
    return Recovered(log)


def export(setup: Setup, reference: Reference, sparsified: Sparsified, workspace: Workspace) -> Exported:
    """The compiled model: channels physically removed (``channel``) or masks folded in."""
    sparse = sparsified.sparse
    compiled = (sparse.compact() if sparse.structure == "channel" else sparse.fold()).eval()
    reference.model.eval()
    accuracy = evaluate(compiled, setup.data.test)
    with torch.no_grad():
        check = next(iter(setup.data.test))[0][:16]
        agreement = float((compiled(check) - sparse.eval()(check)).abs().max())
    return Exported(compiled, accuracy, agreement, _save_module(compiled, workspace.out_dir / "model.pt"))


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
    return Benched(bench_artifacts(built.compiled, setup.target, recipe.bench_batch_sizes, recipe.bench_warmup,
                                   recipe.bench_iters, dense=built.dense))


def report(setup: Setup, reference: Reference, profiled: Profiled, sparsified: Sparsified, recovered: Recovered,
           exported: Exported, built: Built, benched: Benched, timings: Timings,
           workspace: Workspace) -> CompileReport:
    """The report document built from the stage results; report.json, report.md and plots."""
    document = build_document(
        recipe=setup.recipe, data_name=setup.data.name, example=setup.example, dense=reference.model,
        dense_log=reference.log, compiled=exported.model, compiled_log=recovered.log,
        compiled_accuracy=exported.accuracy, agreement=exported.agreement, module_file=exported.module_file,
        sparsities=sparsified.sparse.sparsities(), metrics=sparsified.sparse.metrics, table=profiled.table,
        bench=benched.report, dense_artifact=built.dense, compiled_artifact=built.compiled,
        timings=dict(timings.seconds), wall_s=time.perf_counter() - timings.started)
    write_reports(document, profiled.table, workspace.out_dir)
    return CompileReport(document, workspace.out_dir)


# --- helpers ----------------------------------------------------------------------------------------


def _save_module(module: nn.Module, path: Path) -> str | None:
    """``torch.save`` the compiled module (a convenience next to the artifact); some torch
    versions cannot pickle every fx GraphModule, which must not fail the compile."""
    try:
        with atomic_path(path) as temp:
            torch.save(module, temp)
    except Exception as exc:  # pickling limits of the installed torch, reported in report.json
        return f"not saved: {type(exc).__name__}: {exc}"
    return path.name


def _model_and_example(recipe: Recipe, data: Loaders) -> tuple[nn.Module, torch.Tensor]:
    if recipe.model is None:
        model = default_model(data, recipe.seed)
    else:
        from .models import resolve_model

        torch.manual_seed(recipe.seed)
        model, _ = resolve_model(recipe.model)
    example = data.example if recipe.input_shape is None else torch.randn(recipe.input_shape)
    with torch.no_grad():
        try:
            output = model.eval()(example)
        except Exception as exc:
            raise ValueError(f"model {recipe.model or 'default'} does not run on the data's inputs of shape "
                             f"{tuple(example.shape)}: {type(exc).__name__}: {exc}") from None
    if not isinstance(output, torch.Tensor) or output.ndim != 2 or output.shape[1] < data.num_classes:
        raise ValueError(f"model {recipe.model or 'default'} must map inputs {tuple(example.shape)} to class scores "
                         f"(batch, >= {data.num_classes}); it gives "
                         f"{tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__}")
    return model, example
