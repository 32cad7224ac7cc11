"""The middle stages of ``spruce compile``, each a function with typed inputs and a typed
result (:mod:`spruce.compiler.results`), called by name, in order, by
:func:`spruce.compiler.pipeline.compile`:

    load_setup -> dense_reference -> capture_student -> profile_student -> sparsify_student
    -> recover_student -> export_compiled -> build_artifacts -> evaluate_quantized -> bench_artifacts
    -> write_report

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
- ``build_artifacts``: dense and compiled artifacts for the target (with ``precision: int8``:
  dense fp32, compiled INT8 and dense INT8); ``evaluate_quantized``: the INT8 artifacts judged as
  ONNX Runtime runs them; ``bench_artifacts``: all timed, interleaved;
- ``write_report``: the report document assembled from all results, written with its plots.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from ..capture.trace import capture
from ..passes.sparsity.model import StaleOptimizerWarning
from ..runtime.bench import bench
from ..runtime.profile import profile
from ..targets.base import Artifact
from ..targets.files import OutputError, atomic_path
from .channel_methods import FinalCheck, check_final, drives_channels, updates_left
from .datasets import inputs_of
from .default_cache import trained_default
from .fake_quant import fake_quantized
from .fidelity import fidelity
from .lm import lm_loss
from .lm_artifacts import lm_artifacts, sequence_dims
from .loaders import restart_stream
from .loading import held_out_accuracy, user_metrics
from .outputs import flatten_outputs
from .precision import ArtifactModel
from .recovery import cross_entropy_loss, recover
from .results import (
    ArtifactEvaluation,
    Benched,
    Built,
    Captured,
    Exported,
    Profiled,
    Quantized,
    Recovered,
    Reference,
    Setup,
    Sparsified,
    Workspace,
)
from .selection import channel_analysis, check_budget_reachable
from .training import TrainLog

__all__ = ["bench_artifacts", "build_artifacts", "capture_student", "dense_reference", "evaluate_quantized",
           "export_compiled", "profile_student", "recover_student"]


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
    dynamic = sequence_dims(student, setup.example) if setup.is_lm else None  # a causal LM: any length
    return Captured(student, capture(student, (setup.example,), dynamic_shapes=dynamic))


def profile_student(setup: Setup, captured: Captured, workspace: Workspace) -> Profiled:
    """The latency table of the student on the target when the budget is a latency (steering
    the selection, or a method re-selecting channels during recovery, which needs it even when
    ``selection_cost`` is ``flops``), profiled at the recipe's ``selection_precision`` (default:
    the shipped precision; :attr:`Setup.table_target`)."""
    recipe = setup.recipe
    method_needs = drives_channels(recipe.structure, setup.mode, recipe.method, recipe.method_named, recipe.budget)
    latency_budget = bool(recipe.budget and "latency" in recipe.budget)
    profiles = latency_budget and (recipe.selection_cost == "latency" or method_needs)
    blocks = None
    if latency_budget and recipe.structure == "channel" and (profiles or setup.is_lm):
        # a budget no selection reaches is refused before the table's cost (a causal LM's measured
        # loop, steered by parameters, would otherwise find out after its rounds)
        blocks = check_budget_reachable(setup, captured, workspace)
    if not profiles:
        return Profiled(None, blocks)
    fp32_costs = setup.table_target is not setup.target
    workspace.say("profiling per-layer latency on the target" + (
        f" at {recipe.table_precision} (channels chosen on {recipe.table_precision} costs, the budget met as "
        f"{recipe.shipped_precision} measures)" if fp32_costs else "") + " ...")
    table = profile(captured.student.eval(), (setup.example,), setup.table_target, recipe.profile_step,
                    coarse=recipe.profile_coarse, edges=recipe.profile_edges,
                    progress=workspace.progress and not workspace.quiet and sys.stderr.isatty(),
                    analysis=channel_analysis(setup, captured))
    table.save(workspace.out_dir / "latency_table.json")
    return Profiled(table, blocks)


def recover_student(setup: Setup, reference: Reference, captured: Captured, profiled: Profiled, sparsified: Sparsified,
                    workspace: Workspace) -> Recovered:
    """Recover the student: BatchNorm re-estimation (``none``), distillation or the loss; a
    method re-selecting channels meanwhile has its final selection checked against the budget."""
    recipe = setup.recipe
    student = sparsified.compact if sparsified.compact is not None else captured.student
    loss_fn = None
    if setup.mode == "loss":
        lm = next((spec for spec in setup.plan.outputs if spec.kind == "lm"), None) if setup.plan else None
        builtin = functools.partial(lm_loss, pad=lm.pad) if lm is not None else cross_entropy_loss
        loss_fn = setup.loss.function if setup.loss is not None else builtin
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
                                      latency_table=profiled.table, calibration=setup.data.train, step=step,
                                      dense_target=setup.dense_target, min_keep=recipe.min_keep))

    quantizing, fake_quant = _fake_quant(setup, student, sparsified)
    # recovery's batches (order and augmentation) start from the compile seed, whatever stage
    # read the recovery data before (the output plan's guesses, the budget loop's calibration)
    restart_stream(setup.data.train, recipe.seed)
    with quantizing as layers:
        if layers:
            fake_quant = f"ran on {layers} layers (weights per channel int8, inputs per tensor uint8)"
            workspace.say(f"recovery with fake quantization: {fake_quant}")
        log = recover(student, reference.model, setup.data.train, setup.mode, setup.plan, epochs=recipe.epochs,
                      lr=recipe.recover_lr, loss_fn=loss_fn, sparse=sparsified.sparse, quiet=workspace.quiet,
                      after_step=check if sparsified.drive is not None else None,
                      max_steps=setup.total_steps if setup.recover_tokens is not None else None)
    if sparsified.drive is not None and not checks:  # updates still due when recovery stopped
        check(sparsified.total_steps)
    final = checks[0] if checks else None
    accuracy = held_out_accuracy(setup, sparsified.sparse if sparsified.sparse is not None else student)
    return Recovered(TrainLog(list(log.loss), [accuracy] * len(log.loss) if accuracy is not None else [],
                              log.seconds), log, before, final, fake_quant)


def _fake_quant(setup: Setup, student: nn.Module,
                sparsified: Sparsified) -> tuple[contextlib.AbstractContextManager[int], str | None]:
    """The context fake-quantizing the student during recovery (yielding its layer count, 0
    when it does not run) and, when it was asked for but cannot run, why."""
    if not setup.recipe.fake_quant:
        return contextlib.nullcontext(0), None
    if not setup.int8:
        return contextlib.nullcontext(0), "not run: the artifact is not INT8"
    if setup.mode == "none":
        return contextlib.nullcontext(0), "not run: recovery none does not train"
    if sparsified.sparse is not None:
        return contextlib.nullcontext(0), "not run: a method re-selects channels during recovery"
    return fake_quantized(student, [sample[0] for sample in setup.calibration]), None


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


def build_artifacts(setup: Setup, reference: Reference, captured: Captured, exported: Exported,
                    workspace: Workspace) -> Built:
    """Dense and compiled artifacts for the target (each checked by the target as it builds).
    A causal LM's keep their sequence length dynamic (ONNX Runtime), and it gets its ``.pt2``
    and transformers folder besides (:mod:`spruce.compiler.lm_artifacts`). With INT8 shipping:
    the dense artifact at fp32 (the reference the budget is a fraction of), the compiled one
    INT8 (quantized after channel removal), and the dense model INT8 too (``dense.int8``: what
    quantization alone gives), both calibrated on the same recovery samples."""
    workspace.say("building artifacts ...")
    target, example = setup.target, (setup.example,)
    options = {}
    if setup.is_lm and target.name == "onnxruntime":
        options["dynamic_dims"] = sequence_dims(reference.model, setup.example)
    dense = setup.dense_target.build(reference.model, example, workspace.out_dir / f"dense{target.suffix}", **options)
    extras = None
    if setup.is_lm:
        workspace.say("writing the .pt2 and the transformers folder ...")
        extras = lm_artifacts(exported.model, reference.model, captured.graph, workspace.out_dir, setup.model_folder)
    if not setup.int8:
        compiled = target.build(exported.model, example, workspace.out_dir / f"model{target.suffix}", **options)
        return Built(dense, compiled, extras)
    workspace.say(f"quantizing to INT8 (calibrated on {len(setup.calibration)} batches of recovery samples) ...")
    calibration = list(setup.calibration)
    compiled = target.build(exported.model, example, workspace.out_dir / f"model{target.suffix}",
                            calibration_data=calibration, **options)
    dense_int8 = target.build(reference.model, example, workspace.out_dir / f"dense.int8{target.suffix}",
                              calibration_data=calibration, **options)
    return Built(dense, compiled, extras, dense_int8)

def evaluate_quantized(setup: Setup, reference: Reference, built: Built, recovered: Recovered,
                       workspace: Workspace) -> Quantized:
    """With INT8 shipping, the dense INT8 and the compiled INT8 artifacts evaluated as ONNX
    Runtime runs them (fidelity to the dense torch model per output, accuracy, the user's
    metrics) on the held-out inputs; an empty :class:`Quantized` when fp32 ships."""
    if built.dense_int8 is None:
        return Quantized()
    workspace.say("evaluating the INT8 artifacts on the held-out data ...")
    held_out = [inputs_of(batch) for batch in setup.data.test]
    reference.model.eval()

    def judged(artifact: Artifact) -> ArtifactEvaluation:
        model = ArtifactModel(setup.target.load(artifact))
        score = fidelity(model, reference.model, held_out, setup.plan) if setup.plan is not None else None
        return ArtifactEvaluation(artifact.path.name, score, held_out_accuracy(setup, model),
                                  user_metrics(setup, model), dict(artifact.info))

    return Quantized(judged(built.dense_int8), judged(built.compiled), recovered.fake_quant)


def bench_artifacts(setup: Setup, built: Built, workspace: Workspace) -> Benched:
    """Both artifacts timed on the target, interleaved per batch size."""
    workspace.say("timing dense vs compiled ...")
    recipe = setup.recipe
    latency_budget = bool(recipe.budget and "latency" in recipe.budget)
    sizes = tuple(dict.fromkeys((*recipe.bench_batch_sizes, *((recipe.budget_batch_size,) if latency_budget else ()))))
    others = {"dense_int8": built.dense_int8} if built.dense_int8 is not None else None
    return Benched(bench(built.compiled, setup.target, sizes, recipe.bench_warmup, recipe.bench_iters,
                         dense=built.dense, others=others))



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

