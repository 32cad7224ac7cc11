"""``spruce.compile``: the stages of :mod:`spruce.compiler.stages`, run in order.

The trained model given is the dense reference: evaluated, built and timed as given,
never re-trained; both models are built for the target and timed in the same run.
Everything is written into a staged folder that replaces ``out`` only when the
whole pipeline succeeded.
"""

from __future__ import annotations

import inspect
import time
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..targets.files import checked_out_dir, staged_dir
from . import stages
from .floors import FidelityFloorError, raise_if_missed
from .recipes import Recipe, load_recipe
from .reporting import CompileReport

__all__ = ["CompileReport", "FidelityFloorError", "STAGES", "compile", "compile_model", "run_stages", "stage_inputs"]

# compile, stage by stage: each takes the results its parameters' annotations name
STAGES: tuple[Callable[..., Any], ...] = (
    stages.load, stages.reference, stages.capture, stages.profile, stages.sparsify, stages.recover,
    stages.export, stages.build, stages.bench, stages.report,
)


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
    base = recipe if isinstance(recipe, Recipe) else load_recipe(recipe) if recipe is not None else Recipe()
    spec = model if isinstance(model, str) else None
    strings = {k: v for k, v in (("data", data), ("loss", loss_fn), ("evaluate", evaluate), ("prepare", prepare))
               if isinstance(v, str)}
    resolved = base.with_overrides(model=spec, **strings, **options)
    given = stages.Given(model if isinstance(model, nn.Module) else None, example_inputs,
                         None if isinstance(data, str) else data,
                         *(None if isinstance(f, str) else f for f in (loss_fn, evaluate, prepare)))
    if model is not None and not isinstance(model, (str, nn.Module)):
        raise ValueError(f"model must be an nn.Module, a spec string or None, got {type(model).__name__}")
    out_dir = checked_out_dir(out, force, name="out", force_hint="force=True")
    with staged_dir(out_dir) as stage:
        report = compile_model(resolved, stage, quiet=quiet, given=given)
    report.out_dir = out_dir
    raise_if_missed(report)
    return report


def compile_model(recipe: Recipe, out_dir: Path, quiet: bool = False, progress: bool = True,
                  given: stages.Given | None = None) -> CompileReport:
    """Run every stage of :data:`STAGES` for ``recipe`` into ``out_dir`` (a staged, empty folder)."""
    report = run_stages(STAGES, recipe, stages.Workspace(Path(out_dir), quiet, progress), given)
    if not isinstance(report, CompileReport):
        raise TypeError(f"the last stage returned {type(report).__name__}, not a CompileReport")
    return report


def stage_inputs(stage: Callable[..., Any]) -> dict[str, type]:
    """A stage's parameters and the result types they take, from its annotations."""
    hints = typing.get_type_hints(stage)
    return {name: hints[name] for name in inspect.signature(stage).parameters}


def stage_output(stage: Callable[..., Any]) -> type:
    """The result type a stage returns, from its annotation."""
    return typing.get_type_hints(stage)["return"]


def run_stages(chain: Sequence[Callable[..., Any]], recipe: Recipe, workspace: stages.Workspace,
               given: stages.Given | None = None) -> Any:
    """Call each stage of ``chain`` in order with the results its parameters ask for (by
    type: the recipe, the workspace, the timings, the live objects given, or an earlier
    stage's result); returns the last stage's result. Each stage's wall time lands in
    ``Timings`` as ``<stage>_s``."""
    timings = stages.Timings()
    results: dict[type, Any] = {Recipe: recipe, stages.Workspace: workspace, stages.Timings: timings,
                                stages.Given: given if given is not None else stages.Given()}
    last: Any = None
    for stage in chain:
        wanted = stage_inputs(stage)
        missing = [f"{name}: {kind.__name__}" for name, kind in wanted.items() if kind not in results]
        if missing:
            raise TypeError(f"stage {stage.__name__} needs {', '.join(missing)}, which no earlier stage produced")
        clock = time.perf_counter()
        last = stage(**{name: results[kind] for name, kind in wanted.items()})
        timings.seconds[f"{stage.__name__}_s"] = time.perf_counter() - clock
        results[stage_output(stage)] = last
    return last
