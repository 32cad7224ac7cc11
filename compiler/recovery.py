"""Recovering a compressed trained model: BatchNorm re-estimation, distillation from the
dense model, or the user's loss.

- ``none`` (one-shot): only :func:`reestimate_batchnorm`: running statistics of every
  BatchNorm layer recomputed from calibration batches (a cumulative average, the model in
  training mode under ``no_grad``), so they describe the activations of the pruned network.
- ``distill``: the student learns the dense model's outputs on the user's (unlabeled)
  inputs, one loss per output tensor by its kind (:mod:`spruce.compiler.outputs`: per-position
  KL over the class dim for class scores and CTC heads, MSE for maps), each divided by the
  teacher's scale measured once on the first recovery batches
  (:func:`~spruce.compiler.outputs.calibrate_scales`), not per batch.
- ``loss``: the user's ``loss_fn(outputs, batch) -> scalar tensor`` (``batch`` as the loader
  gives it); with labels and one (N, C) class-score output, the built-in cross-entropy; for a
  causal LM (``lm`` output), the model's own LM loss (:func:`spruce.compiler.lm.lm_loss`).

A causal LM's distillation is the next-token KL at every non-pad position
(:func:`spruce.compiler.lm.lm_kl`, fed the batch's token ids). ``max_steps`` bounds recovery
(a causal LM's token budget, ``recover_tokens``, in steps): the cosine decay then spans
``max_steps`` and recovery stops there, mid-epoch if need be.

The loop is the one a user would write: forward, loss, backward, ``optimizer.step()``, then
``SparseModel.step()`` when the student is a SparseModel (its method's mask updates run
there and are counted). AdamW (no weight decay) with a cosine learning-rate decay over all
steps: a trained model is fine-tuned, not trained from scratch.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..api.budget import reestimate_batchnorm as reestimate_running_stats
from .datasets import inputs_of
from .outputs import OutputPlan, calibrate_scales, distill_loss, flatten_outputs
from .training import cosine_schedule, train_step

__all__ = ["RECOVER_MODES", "RecoveryLog", "cross_entropy_loss", "recover", "reestimate_batchnorm"]

RECOVER_MODES = ("none", "distill", "loss")
BN_BATCHES = 32  # calibration batches for BatchNorm re-estimation (at most)


@dataclass
class RecoveryLog:
    """What recovery did: mode, loss per epoch, steps, mask updates, BatchNorm layers
    re-estimated, seconds."""

    mode: str
    loss: list[float] = field(default_factory=list)
    steps: int = 0
    mask_updates: int = 0
    batchnorm_reestimated: int = 0
    seconds: float = 0.0
    teacher_scales: dict[str, float] = field(default_factory=dict)  # per output, distill only

    def record(self) -> dict[str, Any]:
        return {"mode": self.mode, "loss_per_epoch": self.loss, "steps": self.steps,
                "mask_updates": self.mask_updates, "batchnorm_reestimated": self.batchnorm_reestimated,
                "seconds": self.seconds, "teacher_scales": self.teacher_scales}


def reestimate_batchnorm(model: nn.Module, batches: Iterable, max_batches: int = BN_BATCHES) -> int:
    """Recompute every BatchNorm's running mean/var of ``model`` from ``batches`` (inputs or
    (inputs, targets)); returns how many BatchNorm layers were re-estimated. The model's
    mode and each layer's momentum are restored (:func:`spruce.api.budget.reestimate_batchnorm`)."""
    return reestimate_running_stats(model, batches, max_batches, inputs_of)


def cross_entropy_loss(outputs: Any, batch: Any) -> torch.Tensor:
    """The built-in loss with labels: cross-entropy of the (one) class-score output."""
    scores = flatten_outputs(outputs)[0][1]
    return F.cross_entropy(scores, batch[1])


def recover(student: nn.Module, teacher: nn.Module, loader: Iterable, mode: str, plan: OutputPlan, *,
            epochs: int, lr: float, loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
            sparse: Any = None, quiet: bool = False,
            after_step: Callable[[int], None] | None = None, max_steps: int | None = None) -> RecoveryLog:
    """Recover ``student`` (a compact model, or the module a SparseModel ``sparse`` wraps) in
    ``mode``; returns the log. ``teacher`` is the dense model (never changed). ``after_step``
    is called after every optimizer step (and the SparseModel's step) with the number of
    steps done; the model is back in training mode after it."""
    if mode not in RECOVER_MODES:
        raise ValueError(f"recover must be one of {', '.join(RECOVER_MODES)}, got {mode!r}")
    runner = sparse if sparse is not None else student
    log = RecoveryLog(mode)
    start = time.perf_counter()
    if mode == "none":
        if sparse is not None:
            sparse.apply_masks()
        log.batchnorm_reestimated = reestimate_batchnorm(runner, loader)
        log.seconds = time.perf_counter() - start
        return log
    teacher.eval()
    if mode == "distill":
        plan = calibrate_scales(plan, teacher, (inputs_of(batch) for batch in loader))
        log.teacher_scales = {spec.name: spec.scale for spec in plan.outputs if spec.scale is not None}
    optimizer = torch.optim.AdamW([p for p in runner.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    if sparse is not None:
        sparse.attach(optimizer)
    steps = epochs * len(loader)  # type: ignore[arg-type]
    if max_steps is not None:
        epochs = -(-max_steps // len(loader))  # type: ignore[arg-type]
        steps = max_steps
    schedule = cosine_schedule(optimizer, steps)
    updates_before = len(getattr(sparse, "metrics", ())) if sparse is not None else 0
    disable = quiet or not sys.stderr.isatty()
    for epoch in range(epochs):
        runner.train()
        total = count = 0.0
        for batch in tqdm(loader, desc=f"recover ({mode}) {epoch + 1}/{epochs}", leave=False, disable=disable):
            if log.steps >= steps:
                break
            inputs = inputs_of(batch)
            outputs = runner(inputs)
            if mode == "distill":
                with torch.no_grad():
                    target = teacher(inputs)
                loss = distill_loss(outputs, target, plan, inputs)
            else:
                loss = loss_fn(outputs, batch)  # type: ignore[misc]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"recover ({mode}): the loss became {loss.item()} at epoch {epoch + 1}; "
                                         "lower the recovery learning rate")
            train_step(loss, optimizer, schedule, sparse)
            log.steps += 1
            if after_step is not None:
                after_step(log.steps)
                runner.train()
            total += loss.item() * len(inputs)
            count += len(inputs)
        log.loss.append(total / max(count, 1))
        if not quiet:
            print(f"  recover ({mode}) epoch {epoch + 1}/{epochs}: loss {log.loss[-1]:.5f}", file=sys.stderr,
                  flush=True)
    if sparse is not None:
        log.mask_updates = len(sparse.metrics) - updates_before
    runner.eval()
    log.seconds = time.perf_counter() - start
    return log
