"""``spruce.build``: a model built into a deployable artifact for a target, with the manifest
that pins its bytes, from the user's own code (``spruce.bench`` times what it returns)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..targets.base import Artifact, Target, get_target

__all__ = ["build"]


def build(model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor], target: str | Target = "onnxruntime",
          *, out: str | os.PathLike, **options: Any) -> Artifact:
    """Build ``model`` (in eval mode: a compact or folded model, or any torch module the target
    can export) for ``target`` at ``out``; returns the :class:`~spruce.targets.base.Artifact`,
    whose manifest (``<file>.spruce.json``, next to it) pins the file's size and sha256, the
    target and the input shapes, so :func:`spruce.bench` can time it and refuses it once edited.

    ``example_inputs``: one tensor or a sequence of tensors, batch first (the batch dim stays
    dynamic where the target allows it). ``target``: a registered target name (``onnxruntime``,
    ``torch``, ``tensorrt``, ...) with its ``options`` (e.g. ``threads=4``, ``tolerance=1e-3``),
    or a :class:`~spruce.targets.base.Target`. ``out``: the artifact's file, or an existing
    folder (then ``model`` plus the target's suffix inside it). The target checks what it
    builds (ONNX Runtime: outputs equal torch's within its tolerance) and writes atomically:
    nothing is left at ``out`` when it fails.

    Raises ``ValueError`` for example inputs that are not tensors, an unknown target or bad
    options (:class:`~spruce.passes.config.ConfigError` names the option), options given with
    a Target object, and :class:`~spruce.targets.base.TargetUnavailable` when the target cannot
    run here. Each target's own build errors (``OnnxMismatchError``, ...) pass through."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"build: model must be a torch.nn.Module, got {type(model).__name__}")
    inputs = _example_tensors(example_inputs)
    if isinstance(target, Target):
        if options:
            raise ValueError(f"build: options {sorted(options)} are for a target given by name, not a Target object")
        chosen = target
    elif isinstance(target, str):
        chosen = get_target(target, **options)
    else:
        raise ValueError(f"build: target must be a target name or a Target, got {type(target).__name__}")
    chosen.require()
    path = Path(out)
    if path.is_dir():
        path = path / f"model{chosen.suffix}"
    was_training = model.training
    try:
        return chosen.build(model.eval(), inputs, path)
    finally:
        model.train(was_training)


def _example_tensors(example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs and all(
            isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(example_inputs)
    kinds = [type(t).__name__ for t in example_inputs] if isinstance(example_inputs, (tuple, list)) else None
    raise ValueError("build: example_inputs must be a tensor or a non-empty tuple/list of tensors (the model's "
                     f"positional inputs), got {type(example_inputs).__name__}"
                     + (f" of {kinds}" if kinds is not None else ""))
