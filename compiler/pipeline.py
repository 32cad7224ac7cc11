"""``spruce.compile``: its stages called by name, in order, in one function.

    load_setup -> dense_reference -> capture_student -> profile_student -> sparsify_student
    -> recover_student -> export_compiled -> build_artifacts -> evaluate_quantized
    -> bench_artifacts -> write_report

Each stage takes the results of earlier ones and returns one typed value
(:mod:`spruce.compiler.results`); :mod:`spruce.compiler.stages` says what each does.
The trained model given is the dense reference: evaluated, built and timed as given,
never re-trained; both models are built for the target and timed in the same run.
Everything is written into a staged folder that replaces ``out`` only when the whole
compile succeeded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from ..capture.transformers import cache_settings_kept
from ..moved import moved_name
from ..targets.files import checked_out_dir, staged_dir
from .floors import FidelityFloorError, raise_if_missed
from .lm_report import evaluate_language_model
from .loading import load_setup
from .recipes import Recipe, load_recipe
from .reporting import CompileReport, write_report
from .results import Given, Timings, Workspace
from .selection import sparsify_student
from .stages import (
    bench_artifacts,
    build_artifacts,
    capture_student,
    dense_reference,
    evaluate_quantized,
    export_compiled,
    profile_student,
    recover_student,
)

__all__ = ["CompileReport", "FidelityFloorError", "compile"]


def compile(model: str | nn.Module | None = None, example_inputs: Any = None, *, out: str | Path,
            recipe: Recipe | str | Path | None = None, data: Any = None,
            loss_fn: Callable[..., Any] | str | None = None, evaluate: Callable[..., Any] | str | None = None,
            prepare: Callable[..., Any] | str | None = None,
            force: bool = False, quiet: bool = False, **options: Any) -> CompileReport:
    """Compile the trained ``model`` into ``out``.

    ``model`` is a live ``nn.Module`` (with ``example_inputs``, one input tensor of batch 1,
    or a 1-tuple), a spec like ``FILE.py:make`` or ``torchvision:resnet18``, or None (the
    embedded digits CNN, trained first). ``data``: a spec (``digits``, ``images:DIR``,
    ``FILE.py:make_loaders``) or a ``(recovery_loader, held_out_loader)`` pair whose batches
    are inputs or (inputs, targets). ``loss_fn(outputs, batch)``, ``evaluate(model, loader)
    -> {name: value}`` and ``prepare(image, (H, W))`` (for ``images:DIR``) are functions or
    ``FILE.py:NAME`` specs. The recipe (a :class:`Recipe`, a recipe file, or the defaults)
    with ``options`` (Recipe fields, e.g. ``recover="none"``, ``budget={"latency": 0.6}``)
    on top. ``out`` appears complete or not at all; a non-empty ``out`` is replaced only with
    ``force=True``. Bad input raises ``ValueError`` before any training or profiling. A
    compiled model that misses its fidelity floor (:mod:`spruce.compiler.floors`) raises
    :class:`FidelityFloorError` once ``out`` is written (its report says so; ``.report``)."""
    resolved, given = _resolve(model, example_inputs, recipe, data, loss_fn, evaluate, prepare, options)
    out_dir = checked_out_dir(out, force, name="out", force_hint="force=True")
    timings = Timings()
    with staged_dir(out_dir) as staged, cache_settings_kept(given.model):
        workspace = Workspace(staged, quiet)
        with timings.stage("load"):
            setup = load_setup(resolved, workspace, given)
        with timings.stage("reference"):
            reference = dense_reference(setup, workspace)
        with timings.stage("capture"):
            captured = capture_student(setup, reference)
        with timings.stage("profile"):
            profiled = profile_student(setup, captured, workspace)
        with timings.stage("sparsify"):
            sparsified = sparsify_student(setup, captured, profiled, workspace)
        with timings.stage("recover"):
            recovered = recover_student(setup, reference, captured, profiled, sparsified, workspace)
        with timings.stage("export"):
            exported = export_compiled(setup, reference, sparsified, workspace)
        with timings.stage("build"):
            built = build_artifacts(setup, reference, captured, exported, workspace)
        with timings.stage("evaluate_int8"):
            quantized = evaluate_quantized(setup, reference, built, recovered, workspace)
        with timings.stage("bench"):
            benched = bench_artifacts(setup, built, workspace)
        with timings.stage("evaluate_lm"):  # a causal LM: perplexity, agreement, prefill and decode speed
            evaluated = evaluate_language_model(setup, reference, exported, built, workspace)
        report = write_report(setup, reference, profiled, sparsified, recovered, exported, built, benched, evaluated,
                              timings, workspace, quantized)
    report.out_dir = out_dir
    raise_if_missed(report)
    return report


def _resolve(model: str | nn.Module | None, example_inputs: Any, recipe: Recipe | str | Path | None, data: Any,
             loss_fn: Any, evaluate: Any, prepare: Any, options: dict[str, Any]) -> tuple[Recipe, Given]:
    """The recipe with the spec strings and ``options`` on top (validated), and the live
    objects given; ``ValueError`` / ``RecipeError`` before any work."""
    base = recipe if isinstance(recipe, Recipe) else load_recipe(recipe) if recipe is not None else Recipe()
    spec = model if isinstance(model, str) else None
    strings = {k: v for k, v in (("data", data), ("loss", loss_fn), ("evaluate", evaluate), ("prepare", prepare))
               if isinstance(v, str)}
    resolved = base.with_overrides(model=spec, **strings, **options)
    given = Given(model if isinstance(model, nn.Module) else None, example_inputs,
                  None if isinstance(data, str) else data,
                  *(None if isinstance(f, str) else f for f in (loss_fn, evaluate, prepare)))
    if model is not None and not isinstance(model, (str, nn.Module)):
        raise ValueError(f"model must be an nn.Module, a spec string or None, got {type(model).__name__}")
    return resolved, given


def __getattr__(name: str) -> Any:
    raise moved_name(__name__, name)  # STAGES, run_stages, compile_model: an ImportError naming spruce.compile
