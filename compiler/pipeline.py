"""``spruce.compile``: trace -> (profile) -> sparsify -> train -> fold/compact -> build -> bench -> report.

The dense baseline is the same model from the same initialisation trained for the
same epochs with the same optimizer and schedule, so accuracy and speed are
compared like for like. Both are built for the target and timed in the same run.
Everything is written into a staged folder that replaces ``out_dir`` only when the
whole pipeline succeeded.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from spruce.compiler.datasets import Loaders, default_model, load_data
from spruce.compiler.recipes import Recipe
from spruce.compiler.stats import count_macs, count_params
from spruce.compiler.training import TrainLog, evaluate, train
from torch import nn

__all__ = ["CompileReport", "compile", "compile_model"]

IEE_PHASES_PER_RUN = 12  # IEE's H = J = Q default under `compile`: total steps / this (see _method_options)


@dataclass
class CompileReport:
    """What ``compile`` produced: the document written to ``report.json``, and the folder."""

    document: dict[str, Any]
    out_dir: Path

    def format_table(self) -> str:
        """Accuracy, latency and FPS of dense vs compiled, one row per batch size."""
        doc = self.document
        lines = [f"{'':10s} {'accuracy':>9s} {'params':>10s} {'MACs':>12s}",
                 f"{'dense':10s} {doc['dense']['accuracy']:9.4f} {doc['dense']['params']:10d} "
                 f"{doc['dense']['macs']:12d}",
                 f"{'compiled':10s} {doc['compiled']['accuracy']:9.4f} {doc['compiled']['params']:10d} "
                 f"{doc['compiled']['macs']:12d}", "",
                 f"{'batch':>5s} {'dense ms':>9s} {'compiled ms':>12s} {'dense FPS':>10s} {'compiled FPS':>13s} "
                 f"{'speed-up':>9s}"]
        for row in doc["bench"]["by_batch"]:
            lines.append(f"{row['batch_size']:5d} {row['dense_ms']:9.3f} {row['compiled_ms']:12.3f} "
                         f"{row['dense_fps']:10.1f} {row['compiled_fps']:13.1f} {row['speedup']:8.2f}x")
        return "\n".join(lines)


def compile(model: str | None = None, *, out: str | Path, recipe: Recipe | str | Path | None = None,
            force: bool = False, quiet: bool = False, **options: Any) -> CompileReport:
    """Compile ``model`` (a spec like ``torchvision:resnet18``; None: the embedded digits CNN)
    into ``out``: the recipe (a :class:`Recipe`, a recipe file, or the defaults) with
    ``options`` (Recipe fields) on top. ``out`` appears complete or not at all."""
    from spruce.compiler.cli import _checked_out_dir, _staged_dir
    from spruce.compiler.recipes import load_recipe

    base = recipe if isinstance(recipe, Recipe) else load_recipe(recipe) if recipe is not None else Recipe()
    resolved = base.with_overrides(model=model, **options)
    out_dir = _checked_out_dir(Path(out), force)
    with _staged_dir(out_dir) as stage:
        report = compile_model(resolved, stage, quiet=quiet)
    report.out_dir = out_dir
    return report


def compile_model(recipe: Recipe, out_dir: Path, quiet: bool = False, progress: bool = True) -> CompileReport:
    """Run the whole pipeline for ``recipe`` into ``out_dir`` (which must be a staged, empty folder)."""
    import spruce
    from spruce.runtime.bench import bench
    from spruce.targets.base import get_target

    started = time.perf_counter()
    timings: dict[str, float] = {}
    target = get_target(recipe.target, **recipe.target_options)
    target.require()  # before any training: a target that cannot run here is a user error now, not in 2 minutes

    def say(message: str) -> None:
        if not quiet:
            print(message, file=sys.stderr, flush=True)

    data = load_data(recipe.data, recipe.seed, recipe.batch_size)
    model, example = _model_and_example(recipe, data)
    initial = copy.deepcopy(model.state_dict())

    say(f"spruce compile: {type(model).__name__} on {data.name}, target {recipe.target}, method {recipe.method}, "
        f"structure {recipe.structure}, " + (f"budget {recipe.budget}" if recipe.budget else
                                              f"sparsity {recipe.sparsity}"))
    clock = time.perf_counter()
    dense_log = train(model, data.train, data.test, recipe.epochs, recipe.lr, recipe.optimizer, desc="dense",
                      quiet=quiet)
    timings["train_dense_s"] = time.perf_counter() - clock

    student = copy.deepcopy(model)
    student.load_state_dict(initial)
    table = None
    if recipe.budget and "latency" in recipe.budget:
        say("profiling per-layer latency on the target ...")
        clock = time.perf_counter()
        table = spruce.profile(student.eval(), (example,), target, recipe.profile_step,
                               progress=progress and not quiet and sys.stderr.isatty())
        timings["profile_s"] = time.perf_counter() - clock
    total_steps = recipe.epochs * len(data.train)
    options = _method_options(recipe, total_steps)
    budget_args: dict[str, Any] = {"budget": recipe.budget, "latency_table": table} if recipe.budget else {}
    sm = spruce.sparsify(student, (example,), method=recipe.method, structure=recipe.structure,
                         sparsity=recipe.sparsity if recipe.sparsity is not None else 0.0,
                         distribution=recipe.distribution, total_steps=total_steps, **budget_args, **options)
    clock = time.perf_counter()
    sparse_log = train(student, data.train, data.test, recipe.epochs, recipe.lr, recipe.optimizer, sparse=sm,
                       desc=recipe.method, quiet=quiet)
    timings["train_sparse_s"] = time.perf_counter() - clock

    compiled = (sm.compact() if recipe.structure == "channel" else sm.fold()).eval()
    model.eval()
    compiled_accuracy = evaluate(compiled, data.test)
    with torch.no_grad():
        check = next(iter(data.test))[0][:16]
        agreement = float((compiled(check) - sm.eval()(check)).abs().max())

    say("building artifacts ...")
    clock = time.perf_counter()
    dense_artifact = target.build(model, (example,), out_dir / f"dense{target.suffix}")
    compiled_artifact = target.build(compiled, (example,), out_dir / f"model{target.suffix}")
    timings["build_s"] = time.perf_counter() - clock
    say("timing dense vs compiled ...")
    clock = time.perf_counter()
    report = bench(compiled_artifact, target, recipe.bench_batch_sizes, recipe.bench_warmup, recipe.bench_iters,
                   dense=dense_artifact)
    timings["bench_s"] = time.perf_counter() - clock

    saved_module = _save_module(compiled, out_dir / "model.pt")
    if table is not None:
        table.save(out_dir / "latency_table.json")
    document = _document(recipe, data, model, compiled, example, dense_log, sparse_log, compiled_accuracy, agreement,
                         sm, table, report, dense_artifact, compiled_artifact, timings)
    document["compiled"]["module_file"] = saved_module
    document["wall_s"] = time.perf_counter() - started
    from spruce.compiler.reporting import write_reports

    write_reports(document, sm, table, model, compiled, out_dir)
    return CompileReport(document, out_dir)


def _save_module(module: nn.Module, path: Path) -> str | None:
    """``torch.save`` the compiled module (a convenience next to the artifact); some torch
    versions cannot pickle every fx GraphModule, which must not fail the compile."""
    try:
        torch.save(module, path)
    except Exception as exc:  # pickling limits of the installed torch, reported in report.json
        path.unlink(missing_ok=True)
        return f"not saved: {type(exc).__name__}: {exc}"
    return path.name


def _model_and_example(recipe: Recipe, data: Loaders) -> tuple[nn.Module, torch.Tensor]:
    if recipe.model is None:
        model = default_model(data, recipe.seed)
    else:
        from spruce.compiler.models import resolve_model

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


def _method_options(recipe: Recipe, total_steps: int) -> dict[str, Any]:
    """The recipe's method options; IEE's H, J, Q default to a twelfth of training under
    ``compile`` (the paper's 150 assume far longer runs than a compile recipe's), and channel
    counts of the budgeted methods to multiples of 8."""
    options = dict(recipe.method_options)
    if recipe.method == "iee":
        cycle = max(1, total_steps // IEE_PHASES_PER_RUN)
        for name in ("h", "j", "q"):
            options.setdefault(name, cycle)
    if recipe.method in ("halp",):
        options.setdefault("interval", max(1, total_steps // 20))
    if recipe.structure == "channel" and recipe.method in ("iee", "halp"):
        options.setdefault("round_to", 8)  # widths the kernels like (vector width, tensor-core tiles)
    if recipe.method in ("rigl", "set", "dst_ee"):
        options.setdefault("delta_t", max(1, total_steps // 20))
    return options


def _macs(model: nn.Module, example: torch.Tensor) -> int:
    return int(count_macs(model, (example,)))


def _document(recipe, data, dense, compiled, example, dense_log: TrainLog, sparse_log: TrainLog,
              compiled_accuracy: float, agreement: float, sm, table, report, dense_artifact, compiled_artifact,
              timings) -> dict[str, Any]:
    by_batch = []
    for batch_size in recipe.bench_batch_sizes:
        d, c = report.row("dense", batch_size), report.row("compiled", batch_size)
        by_batch.append({"batch_size": batch_size, "dense_ms": d.median_ms, "compiled_ms": c.median_ms,
                         "dense_p90_ms": d.p90_ms, "compiled_p90_ms": c.p90_ms, "dense_p99_ms": d.p99_ms,
                         "compiled_p99_ms": c.p99_ms, "dense_fps": d.images_per_s, "compiled_fps": c.images_per_s,
                         "speedup": d.median_ms / c.median_ms})
    widths = _layer_widths(dense, compiled)
    return {
        "format": "spruce-compile-report",
        "version": 1,
        "recipe": recipe.to_dict(),
        "data": data.name,
        "dense": {"accuracy": dense_log.accuracy[-1], "accuracy_per_epoch": dense_log.accuracy,
                  "loss_per_epoch": dense_log.loss, "params": int(count_params(dense)), "macs": _macs(dense, example),
                  "artifact": dense_artifact.path.name},
        "compiled": {"accuracy": compiled_accuracy, "accuracy_per_epoch": sparse_log.accuracy,
                     "loss_per_epoch": sparse_log.loss, "params": int(count_params(compiled)),
                     "macs": _macs(compiled, example), "artifact": compiled_artifact.path.name,
                     "max_abs_diff_vs_sparse_model": agreement},
        "layers": widths,
        "sparsity": sm.sparsities(),
        "metrics": _jsonable(sm.metrics),
        "latency_table": None if table is None else {
            "file": "latency_table.json", "dense_predicted_ms": table.dense_ms(),
            "compiled_predicted_ms": table.predict_model(compiled)},
        "bench": {"fingerprint": report.fingerprint, "warmup": recipe.bench_warmup, "iters": recipe.bench_iters,
                  "by_batch": by_batch},
        "timings": timings,
    }


def _layer_widths(dense: nn.Module, compiled: nn.Module) -> list[dict[str, Any]]:
    kinds = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    compiled_modules = dict(compiled.named_modules())
    rows = []
    for name, module in dense.named_modules():
        if isinstance(module, kinds) and name in compiled_modules:
            small = compiled_modules[name]
            rows.append({"layer": name, "dense_out": int(module.weight.shape[0]),
                         "compiled_out": int(small.weight.shape[0]), "dense_in": int(module.weight.shape[1]),
                         "compiled_in": int(small.weight.shape[1]),
                         "zeros": float((small.weight == 0).float().mean())})
    return rows


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))
