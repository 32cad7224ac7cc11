"""``spruce.compile``: the stages of :mod:`spruce.compiler.stages`, run in order.

The dense baseline is the same model from the same initialisation trained for the
same epochs with the same optimizer and schedule, so accuracy and speed are
compared like for like. Both are built for the target and timed in the same run.
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

from ..targets.files import checked_out_dir, staged_dir
from . import stages
from .recipes import Recipe, load_recipe
from .reporting import CompileReport

__all__ = ["CompileReport", "STAGES", "compile", "compile_model", "run_stages", "stage_inputs"]

# compile, stage by stage: each takes the results its parameters' annotations name
STAGES: tuple[Callable[..., Any], ...] = (
    stages.load, stages.reference, stages.capture, stages.profile, stages.sparsify, stages.recover,
    stages.export, stages.build, stages.bench, stages.report,
)


def compile(model: str | None = None, *, out: str | Path, recipe: Recipe | str | Path | None = None,
            force: bool = False, quiet: bool = False, **options: Any) -> CompileReport:
    """Compile ``model`` (a spec like ``torchvision:resnet18``; None: the embedded digits CNN)
    into ``out``: the recipe (a :class:`Recipe`, a recipe file, or the defaults) with
    ``options`` (Recipe fields; ``method`` a name, a ``{name: ...}`` mapping or a method
    config such as ``IEEConfig(h=20)``) on top. ``out`` appears complete or not at all; a
    non-empty ``out`` is replaced only with ``force=True``. Options are validated before
    any work (``RecipeError``, ``OutputError``: both ``ValueError``)."""
    base = recipe if isinstance(recipe, Recipe) else load_recipe(recipe) if recipe is not None else Recipe()
    resolved = base.with_overrides(model=model, **options)
    out_dir = checked_out_dir(out, force, name="out", force_hint="force=True")
    with staged_dir(out_dir) as stage:
        report = compile_model(resolved, stage, quiet=quiet)
    report.out_dir = out_dir
    return report


def compile_model(recipe: Recipe, out_dir: Path, quiet: bool = False, progress: bool = True) -> CompileReport:
    """Run every stage of :data:`STAGES` for ``recipe`` into ``out_dir`` (a staged, empty folder)."""
    report = run_stages(STAGES, recipe, stages.Workspace(Path(out_dir), quiet, progress))
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


def run_stages(chain: Sequence[Callable[..., Any]], recipe: Recipe, workspace: stages.Workspace) -> Any:
    """Call each stage of ``chain`` in order with the results its parameters ask for (by
    type: the recipe, the workspace, the timings, or an earlier stage's result); returns the
    last stage's result. Each stage's wall time lands in ``Timings`` as ``<stage>_s``."""
    timings = stages.Timings()
    results: dict[type, Any] = {Recipe: recipe, stages.Workspace: workspace, stages.Timings: timings}
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
