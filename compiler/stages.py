"""The middle stages of ``spruce compile``, each a function with typed inputs and a typed
result (:mod:`spruce.compiler.results`), called by name, in order, by
:func:`spruce.compiler.pipeline.compile`:

    load_setup -> dense_reference -> capture_student -> profile_student -> sparsify_student
    -> recover_student -> export_compiled -> build_artifacts -> bench_artifacts -> write_report

``load_setup`` is in :mod:`~spruce.compiler.loading`, ``sparsify_student`` in
:mod:`~spruce.compiler.selection`, ``write_report`` in :mod:`~spruce.compiler.reporting`;
the others are here.

The model compiled is a *trained* model, the dense reference: evaluated, built and timed as
given, never re-trained (the embedded default is the one exception: its small CNN is first
trained on the bundled digits with a fixed seed, and that trained model is then compiled).

- ``load_setup``: target (checked to run here), model and example input, data, the user's
  ``loss_fn`` / ``evaluate`` / ``prepare``, the output plan; every bad input fails here,
  before any training or profiling (a model whose outputs hold no tensor, a ``loss_fn`` or
  ``evaluate`` that raises, an empty or unreadable image folder, labels with no loss for a
  non-classification output);
- ``dense_reference``: the dense model (the embedded default trained first) and its evaluation;
- ``capture_student``: the student (a copy of the trained model) captured as a graph, the only capture;
- ``profile_student``: the target's latency table when the budget is a latency (else none, and
  none when ``selection_cost`` is ``flops``: the measured loop then steers by MACs); before the
  table is profiled, a budget that even the smallest selectable model misses (timed against
  dense) is refused (:class:`InfeasibleBudget`);
- ``sparsify_student``: for ``channel``: channels chosen one-shot from the trained weights'
  magnitude (gradient importance is exactly zero when the student equals its teacher), a latency
  budget met as *measured* on the target (:func:`spruce.runtime.budget.meet_latency_budget`,
  :class:`InfeasibleBudget` before any recovery), the compact model; with a budgeted method
  named and recovery ``distill`` / ``loss``, that selection calibrates the budget of the
  method's channel SparseModel instead (:mod:`spruce.compiler.channel_methods`); for
  ``unstructured`` / ``N:M``: the method's SparseModel, its initial masks by magnitude (never random);
- ``recover_student``: ``none`` (BatchNorm re-estimation), ``distill`` or ``loss``; a method
  re-selecting channels has its final channels measured against the budget (re-aimed if
  above it) once it has no update left;
- ``export_compiled``: the compiled model; its fidelity to the dense one on held-out inputs,
  accuracy where labels exist, the user's metrics;
- ``build_artifacts``: dense and compiled artifacts for the target; ``bench_artifacts``: both timed;
- ``write_report``: the report document assembled from all results, written with its plots.
"""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from ..capture.trace import capture
from ..passes.analysis import analyze
from ..passes.sparsity.model import StaleOptimizerWarning
from ..runtime.bench import bench
from ..runtime.profile import profile
from ..targets.files import OutputError, atomic_path
from .channel_methods import FinalCheck, check_final, drives_channels, updates_left
from .datasets import inputs_of
from .default_cache import trained_default
from .fidelity import fidelity
from .loading import held_out_accuracy, user_metrics
from .outputs import flatten_outputs
from .recovery import cross_entropy_loss, recover
from .results import (
    Benched,
    Built,
    Captured,
    Exported,
    Profiled,
    Recovered,
    Reference,
    Setup,
    Sparsified,
    Workspace,
)
from .selection import check_budget_reachable
from .training import TrainLog

__all__ = ["bench_artifacts", "build_artifacts", "capture_student", "dense_reference", "export_compiled",
           "profile_student", "recover_student"]


def dense_reference(setup: Setup, workspace: Workspace) -> Reference:
    """The dense reference as given (the embedded default is trained first, seeded), evaluated
    on the held-out data."""
    recipe = setup.recipe
    log = TrainLog()
    if setup.default_model:  # trained once per machine: the weights are cached (default_cache)
        log, _ = trained_default(setup.model, setup.data, recipe.seed, recipe.epochs, recipe.lr, recipe.optimizer,
                                 quiet=workspace.quiet)
    setup.model.eval()
    return Reference(setup.model, log, held_out_accuracy(setup, setup.model), user_metrics(setup, setup.model))


def capture_student(setup: Setup, reference: Reference) -> Captured:
    """A copy of the trained model (the student), captured at the example."""
    student = copy.deepcopy(reference.model).eval()
    return Captured(student, capture(student, (setup.example,)))


def profile_student(setup: Setup, captured: Captured, workspace: Workspace) -> Profiled:
    """The latency table of the student on the target when the budget is a latency (steering
    the selection, or a method re-selecting channels during recovery, which needs it even when
    ``selection_cost`` is ``flops``)."""
    recipe = setup.recipe
    method_needs = drives_channels(recipe.structure, setup.mode, recipe.method, recipe.method_named, recipe.budget)
    if not (recipe.budget and "latency" in recipe.budget) or (recipe.selection_cost != "latency"
                                                               and not method_needs):
        return Profiled(None)
    if recipe.structure == "channel":  # a budget no selection reaches is refused before the table's cost
        check_budget_reachable(setup, captured, workspace)
    workspace.say("profiling per-layer latency on the target ...")
    table = profile(captured.student.eval(), (setup.example,), setup.target, recipe.profile_step,
                           progress=workspace.progress and not workspace.quiet and sys.stderr.isatty(),
                           analysis=analyze(captured.graph))
    table.save(workspace.out_dir / "latency_table.json")
    return Profiled(table)


def recover_student(setup: Setup, reference: Reference, captured: Captured, profiled: Profiled, sparsified: Sparsified,
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

    log = recover(student, reference.model, setup.data.train, setup.mode, setup.plan, epochs=recipe.epochs,
                        lr=recipe.recover_lr, loss_fn=loss_fn, sparse=sparsified.sparse, quiet=workspace.quiet,
                        after_step=check if sparsified.drive is not None else None)
    if sparsified.drive is not None and not checks:  # updates still due when recovery stopped
        check(sparsified.total_steps)
    final = checks[0] if checks else None
    accuracy = held_out_accuracy(setup, sparsified.sparse if sparsified.sparse is not None else student)
    return Recovered(TrainLog(list(log.loss), [accuracy] * len(log.loss) if accuracy is not None else [],
                              log.seconds), log, before, final)


def export_compiled(setup: Setup, reference: Reference, sparsified: Sparsified, workspace: Workspace) -> Exported:
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
    return Exported(compiled, held_out_accuracy(setup, compiled), agreement, module_file,
                    fidelity(compiled, reference.model, held_out, setup.plan), user_metrics(setup, compiled),
                    sum(int(x.shape[0]) for x in held_out))


def build_artifacts(setup: Setup, reference: Reference, exported: Exported, workspace: Workspace) -> Built:
    """Dense and compiled artifacts for the target (each checked by the target as it builds)."""
    workspace.say("building artifacts ...")
    target, example = setup.target, (setup.example,)
    dense = target.build(reference.model, example, workspace.out_dir / f"dense{target.suffix}")
    compiled = target.build(exported.model, example, workspace.out_dir / f"model{target.suffix}")
    return Built(dense, compiled)


def bench_artifacts(setup: Setup, built: Built, workspace: Workspace) -> Benched:
    """Both artifacts timed on the target, interleaved per batch size."""
    workspace.say("timing dense vs compiled ...")
    recipe = setup.recipe
    latency_budget = bool(recipe.budget and "latency" in recipe.budget)
    sizes = tuple(dict.fromkeys((*recipe.bench_batch_sizes, *((recipe.budget_batch_size,) if latency_budget else ()))))
    return Benched(bench(built.compiled, setup.target, sizes, recipe.bench_warmup,
                                   recipe.bench_iters, dense=built.dense))



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

