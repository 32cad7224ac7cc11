"""The Torch-Pruning row of ``bench/trained.py``: CRAFT pruned by Torch-Pruning to spruce's
measured latency, then recovered by spruce's own recovery stage.

What runs, in order (the same stages ``spruce compile`` runs, with Torch-Pruning's selection
in place of spruce's):

1. ``compiler.loading.load_setup`` and ``compiler.stages.dense_reference`` on the same recipe as the spruce rows
   (``examples/craft.yaml`` with ``--data images:DIR --target onnxruntime --budget
   latency=B --recover distill``): the same target, loader, augmentation, output plan and
   distillation losses.
2. Torch-Pruning (``torch_pruning.pruner.MetaPruner`` with L1
   ``MagnitudeImportance(p=1)``, one uniform per-layer ratio, ``round_to`` 8 like spruce;
   the layers whose channels are model outputs ignored: CRAFT's ``upconv4`` last conv (the
   ``feature`` output) and ``conv_cls``'s last conv (the maps)) on a copy of the trained
   model at the example input. The ratio is searched so that the *measured* latency of
   the pruned model relative to dense matches ``goal`` (spruce's measured ratio) within
   ``tolerance``: each candidate is timed interleaved with the dense model in one run by the
   target's ``measure_models`` (what spruce's budget loop uses, with its warmup 3 and 15
   rounds); the next ratio is interpolated between the nearest candidates on either side of
   the goal (or extrapolated with latency ~ (1 - ratio)^2 before there are both).
3. ``compiler.stages.recover_student`` on the pruned model (``distill``: the same teacher-scale
   calibration, losses, AdamW, cosine schedule, epochs and learning rate; ``none``: the
   same BatchNorm re-estimation), then ``export`` (fidelity to dense on the held-out
   inputs) and the target's ``build`` of the compiled ONNX artifact.

Each mode writes ``WORK/craft_MODE/report.json`` (the keys ``bench/trained.py`` reads from a
compile's report) and ``WORK/craft_MODE.timing.json``; the selection is cached in
``WORK/tp_selection.pt`` so both modes prune once.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
TIMING = {"warmup": 3, "rounds": 15}  # spruce's meet_latency_budget defaults
ROUND_TO = 8


def tp_prune(model: nn.Module, example: torch.Tensor, ratio: float, ignored: Callable[[nn.Module], list[nn.Module]],
             round_to: int = ROUND_TO) -> nn.Module:
    """A copy of ``model`` with Torch-Pruning's uniform L1-magnitude channel pruning at ``ratio``
    (fraction of each layer's output channels removed), ``ignored(copy)`` naming the layers
    whose output channels stay."""
    import torch_pruning as tp

    pruned = copy.deepcopy(model).eval()
    if ratio <= 0:
        return pruned
    pruner = tp.pruner.MetaPruner(pruned, example, importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=ratio, ignored_layers=ignored(pruned), round_to=round_to)
    pruner.step()
    return pruned


def match_latency(dense: nn.Module, example: torch.Tensor, target: Any, goal: float,
                  prune: Callable[[float], nn.Module], tolerance: float = 0.02, max_tries: int = 6,
                  min_step: float = 0.03, say: Callable[[str], None] = print,
                  ) -> tuple[float, nn.Module, list[dict[str, float]]]:
    """The pruning ratio whose model measures ``goal`` x dense latency on ``target`` (within
    ``tolerance``), the model, and every candidate measured (ratio, measured ms of both, their
    ratio). Stops after ``max_tries`` candidates with the one closest to ``goal``. Before the
    goal is bracketed, a step is at least ``min_step`` (``round_to`` makes the measured ratio
    a step function of the pruning ratio)."""
    tries: list[dict[str, float]] = []
    models: dict[float, nn.Module] = {}
    ratio = 1 - goal ** 0.5
    for _ in range(max_tries):
        ratio = round(min(max(ratio, 0.0), 0.95), 4)
        if ratio not in models:
            candidate = prune(ratio)
            dense_t, pruned_t = target.measure_models([(dense, (example,)), (candidate, (example,))], **TIMING)
            models[ratio] = candidate
            row = {"pruning_ratio": ratio, "measured_ms": pruned_t.robust_ms(),
                   "measured_dense_ms": dense_t.robust_ms()}
            row["ratio"] = row["measured_ms"] / row["measured_dense_ms"]
            tries.append(row)
            say(f"  torch-pruning ratio {ratio:.4f}: measured {row['ratio']:.3f} of dense "
                f"({row['measured_ms']:.1f} / {row['measured_dense_ms']:.1f} ms)")
            if abs(row["ratio"] - goal) <= tolerance:
                break
        above = [t for t in tries if t["ratio"] > goal]  # too slow: prune more
        below = [t for t in tries if t["ratio"] < goal]
        if above and below:
            a = max(above, key=lambda t: t["pruning_ratio"])
            b = min(below, key=lambda t: t["pruning_ratio"])
            ratio = a["pruning_ratio"] + (a["ratio"] - goal) * (b["pruning_ratio"] - a["pruning_ratio"]) / (
                a["ratio"] - b["ratio"])
        else:
            last = tries[-1]
            ratio = 1 - (1 - last["pruning_ratio"]) * (goal / last["ratio"]) ** 0.5
            if abs(ratio - last["pruning_ratio"]) < min_step:  # round_to makes plateaus: step off them
                ratio = last["pruning_ratio"] + (min_step if last["ratio"] > goal else -min_step)
        if ratio in models:
            break
    best = min(tries, key=lambda t: abs(t["ratio"] - goal))
    return best["pruning_ratio"], models[best["pruning_ratio"]], tries


def craft_ignored(model: nn.Module) -> list[nn.Module]:
    """CRAFT's layers whose output channels are model outputs: ``upconv4``'s last conv (the
    ``feature`` output, 32 channels) and ``conv_cls``'s last conv (the 2 score maps)."""
    return [model.upconv4.conv[3], model.conv_cls[-1]]


def _recipe(args: Any, mode: str) -> Any:
    from spruce.compiler.recipes import load_recipe

    return load_recipe(args.recipe).with_overrides(
        model="examples/craft.py:make", data=f"images:{args.data}", target="onnxruntime",
        budget={"latency": args.budget}, recover=mode)


def _selection(args: Any, setup: Any, reference: Any, say: Callable[[str], None]) -> dict[str, Any]:
    """The cached (or new) Torch-Pruning selection matched to spruce's measured ratio."""
    cache = args.work / "tp_selection.pt"
    if cache.is_file():
        return torch.load(cache, weights_only=False)
    goal = args.tp_goal
    if goal is None:
        spruce_report = args.work / "craft_distill" / "report.json"
        goal = json.loads(spruce_report.read_text())["budget"]["measured_ratio"]
    start = time.perf_counter()
    say(f"torch-pruning: matching the measured latency ratio {goal:.3f} of dense ...")
    ratio, model, tries = match_latency(
        reference.model, setup.example, setup.target, goal,
        lambda r: tp_prune(reference.model, setup.example, r, craft_ignored), say=say)
    record = {"goal": goal, "pruning_ratio": ratio, "model": model, "tries": tries,
              "seconds": time.perf_counter() - start}
    args.work.mkdir(parents=True, exist_ok=True)
    torch.save(record, cache)
    return record


def run_tp(args: Any, mode: str, out: Path) -> dict[str, Any]:
    """Prune CRAFT with Torch-Pruning to spruce's measured latency and recover it with spruce's
    recovery in ``mode`` (``distill`` or ``none``) into ``out``; returns the timing record
    (``bench/trained.py``'s ``compile_once`` form)."""
    import benchlib
    from spruce.compiler import stages
    from spruce.compiler.loading import load_setup
    from spruce.compiler.results import Captured, Given, Profiled, Sparsified, Workspace

    os.chdir(ROOT)  # the recipe's FILE.py specs are relative to the repository root
    workspace = Workspace(out, quiet=False, progress=False)
    out.mkdir(parents=True, exist_ok=True)
    load_before = benchlib.load_average()
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    setup = load_setup(_recipe(args, mode), workspace, Given())
    reference = stages.dense_reference(setup, workspace)
    seconds["load_s"] = time.perf_counter() - start
    chosen = _selection(args, setup, reference, workspace.say)
    seconds["select_s"] = chosen["seconds"]  # the search (shared by the modes when cached)
    student = copy.deepcopy(chosen["model"])
    settings = (f"Torch-Pruning {_tp_version()} MetaPruner, MagnitudeImportance(p=1) (L1, group mean, "
                f"mean-normalised), uniform pruning_ratio {chosen['pruning_ratio']:.4f} per layer, round_to "
                f"{ROUND_TO}, ignored layers upconv4.conv[3] (the feature output) and conv_cls[-1] (the maps)")
    sparsified = Sparsified(method=None, sparse=None, total_steps=setup.total_steps, compact=student,
                                   importance=settings)
    captured = Captured(student, None)
    tick = time.perf_counter()
    recovered = stages.recover_student(setup, reference, captured, Profiled(None), sparsified, workspace)
    seconds["recover_s"] = time.perf_counter() - tick
    torch.save(student, out / "recovered.pt")  # before export: a failure after this is resumable by hand
    tick = time.perf_counter()
    exported = stages.export_compiled(setup, reference, sparsified, workspace)
    seconds["export_s"] = time.perf_counter() - tick
    tick = time.perf_counter()
    artifact = setup.target.build(exported.model, (setup.example,), out / f"model{setup.target.suffix}")
    seconds["build_s"] = time.perf_counter() - tick
    best = next(t for t in chosen["tries"] if t["pruning_ratio"] == chosen["pruning_ratio"])
    recovery = {"mode": setup.mode, "loss": setup.loss_text, **recovered.recovery.record(),
                "selection": settings,
                "fidelity_before_recovery": recovered.before.record() if recovered.before else None}
    document = {
        "compiled": {"artifact": Path(artifact.path).name},
        "budget": {"kind": "latency", "fraction": args.budget, "batch_size": 1, "goal": chosen["goal"],
                   "measured_ratio": best["ratio"], "in_band": 0.9 * args.budget <= best["ratio"]
                   <= 1.05 * args.budget, "dense_measured_ms": best["measured_dense_ms"],
                   "compiled_measured_ms": best["measured_ms"], "attempts": chosen["tries"],
                   "band": [0.9 * args.budget, 1.05 * args.budget]},
        "recovery": recovery, "timings": seconds,
        "evaluation": {"fidelity": exported.fidelity.record() if exported.fidelity else None,
                       "held_out_inputs": exported.held_out},
        "torch_pruning": {"version": _tp_version(), "pruning_ratio": chosen["pruning_ratio"],
                          "round_to": ROUND_TO, "params": sum(p.numel() for p in exported.model.parameters()),
                          "dense_params": sum(p.numel() for p in reference.model.parameters())},
    }
    (out / "report.json").write_text(json.dumps(document, indent=1, default=float) + "\n")
    timing = {"command": f"python bench/trained.py --modes tp{'' if mode == 'distill' else '_none'} "
                         f"(Torch-Pruning + spruce recovery {mode}, this process)",
              "wall_s": sum(seconds.values()), "returncode": 0, "load_before": load_before,
              "load_after": benchlib.load_average(), "log": "-"}
    out.parent.joinpath(f"{out.name}.timing.json").write_text(json.dumps(timing, indent=1) + "\n")
    return timing


def _tp_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("torch-pruning")


def tp_modes(modes: Sequence[str]) -> dict[str, str]:
    """``bench/trained.py`` mode -> spruce recovery mode for the Torch-Pruning rows."""
    return {m: {"tp": "distill", "tp_none": "none"}[m] for m in modes if m in ("tp", "tp_none")}


__all__ = ["craft_ignored", "match_latency", "run_tp", "tp_modes", "tp_prune"]
