"""A transformers ``TrainerCallback`` that trains the Trainer's model sparse.

Imports ``transformers``; ``import spruce`` does not.

Give the Trainer :attr:`SparseTrainerCallback.model` (your model behind a thin module that
runs the SparseModel once training begins) and the callback::

    cb = SparseTrainerCallback(model, example_inputs, spruce.RigLConfig(), sparsity=0.9)
    trainer = Trainer(model=cb.model, args=args, train_dataset=data, callbacks=[cb], ...)
    trainer.train()                       # or trainer.train(resume_from_checkpoint=True)
    small = cb.result                     # folded (or compact, structure="channel")

The lifecycle, in the Trainer's events:

- ``on_train_begin`` (the Trainer has built its optimizer on the model's parameters):
  ``spruce.sparsify`` with ``total_steps`` = the Trainer's ``state.max_steps`` (its optimizer
  steps, after gradient accumulation); the SparseModel shares the model's parameters, so the
  optimizer holds its weights; the optimizer is attached.
- ``on_step_end`` (once per optimizer step): ``SparseModel.step(loss=...)``, unless the AMP grad
  scaler skipped the optimizer's step. ``on_step_end`` is given no loss, so the loss that feeds the
  loss guard (:class:`~spruce.passes.sparsity.loss_guard.LossGuard`) is taken, in this order of
  preference, from: the losses of the step's micro-batches (their mean) as the model returns them
  (a transformers model given ``labels`` returns ``outputs.loss``; a dict or a ``loss``
  attribute), or as a ``compute_loss_func`` wrapped by :meth:`SparseTrainerCallback.loss_func`
  returns them (``Trainer(compute_loss_func=cb.loss_func(fn))``; a ``Trainer`` subclass
  overriding ``compute_loss`` calls :meth:`SparseTrainerCallback.record_loss` instead); else
  the Trainer's logged training loss (``on_log``, every ``logging_steps``: the mean over the
  steps since the last log, given to the guard once for each of those steps).
- ``on_save``: the SparseModel's state is written to ``spruce-sparse.pt`` in the checkpoint's
  folder (``<output_dir>/checkpoint-<global step>``).
- ``on_train_end``: :attr:`SparseTrainerCallback.result` is the folded model (pruned weights
  exact zeros), or the compact one for structure="channel".

Where the masks live: in ``spruce-sparse.pt`` (a ``spruce.save`` checkpoint: weights,
bit-packed masks, method state, step count, metrics) beside the Trainer's own files. The
Trainer's weight file holds the model's plain weights (safetensors: no masks, no method
state). On resume, ``on_train_begin`` finds the file of the checkpoint the Trainer resumed
from (``<output_dir>/checkpoint-<state.global_step>``) and loads it into the fresh
SparseModel; a missing file is a ``FileNotFoundError`` before any step.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..passes.sparsity.method import MethodConfig
from ..passes.sparsity.model import SparseModel
from .callbacks import SparseRun, SparseRunCallback
from .checkpoint import restore, save

__all__ = ["SparseTrainerCallback", "SparseSlot", "STATE_FILE"]

STATE_FILE = "spruce-sparse.pt"


class SparseSlot(nn.Module):
    """The module a Trainer trains: ``model`` (registered, so the Trainer's weight files hold its
    plain ``state_dict`` under ``model.``), run through its SparseModel once :meth:`use` set one.
    The SparseModel shares ``model``'s parameters and is not registered (its masks and method
    state are saved by the callback, not in the weight file)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.__dict__["sparse"] = None
        self.__dict__["losses"] = []  # training losses of the micro-batches since the last optimizer step
        # the Trainer passes loss keywords (num_items_in_batch) to a forward taking **kwargs: as the model would
        self.accepts_loss_kwargs = getattr(model, "accepts_loss_kwargs", any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(model.forward).parameters.values()))

    def use(self, sparse: SparseModel) -> None:
        self.__dict__["sparse"] = sparse
        sparse.train(self.training)

    def train(self, mode: bool = True) -> SparseSlot:
        super().train(mode)
        if self.sparse is not None:
            self.sparse.train(mode)
        return self

    def forward(self, *args, **kwargs):
        outputs = (self.model if self.sparse is None else self.sparse)(*args, **kwargs)
        if self.training:
            self.record(outputs.get("loss") if isinstance(outputs, dict) else getattr(outputs, "loss", None))
        return outputs

    def record(self, loss: Any) -> None:
        """Keep a micro-batch's training ``loss`` (a one-element tensor or a float; anything
        else is ignored) for the loss guard."""
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self.losses.append(loss.detach().float().reshape(()))
        elif isinstance(loss, (int, float)) and not isinstance(loss, bool):
            self.losses.append(torch.tensor(float(loss)))

    def pop_loss(self) -> torch.Tensor | None:
        """The mean of the losses kept since the last call (None when none was)."""
        losses, self.__dict__["losses"] = self.losses, []
        return torch.stack(losses).mean() if losses else None


class SparseTrainerCallback(SparseRunCallback, TrainerCallback):
    """Train ``model`` sparse with ``method`` inside a transformers ``Trainer`` (see the module
    docstring). ``example_inputs``: what ``spruce.sparsify`` traces ``model`` with (the Trainer
    calls the model with the batch's keyword arguments: the traced forward's argument names);
    ``**options``: ``sparsify``'s other keyword arguments (``structure``, ``sparsity``,
    ``budget``, ...). ``model`` (give it to the Trainer), ``sparse`` (the SparseModel from
    ``on_train_begin``) and ``result`` (after training)."""

    def __init__(self, model: nn.Module, example_inputs: object, method: str | MethodConfig = "rigl",
                 **options: Any):
        self.model = SparseSlot(model)
        self.run = SparseRun(method, example_inputs, options)
        self._unfed = 0  # optimizer steps since the loss guard last got a loss

    def record_loss(self, loss: torch.Tensor | float) -> None:
        """Give the loss guard a micro-batch's training loss: call it from a ``Trainer``
        subclass's ``compute_loss`` when the model's outputs carry no ``loss``."""
        self.model.record(loss)

    def loss_func(self, compute_loss_func: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """``compute_loss_func`` (the Trainer's argument: ``(outputs, labels, num_items_in_batch=...)
        -> loss``) that also gives each loss to the loss guard: ``Trainer(...,
        compute_loss_func=cb.loss_func(fn))``."""

        def compute_loss(*args: Any, **kwargs: Any) -> torch.Tensor:
            loss = compute_loss_func(*args, **kwargs)
            self.model.record(loss)
            return loss

        return compute_loss

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       optimizer: Any = None, **kwargs: Any) -> None:
        sparse = self.run.start(self.model.model, state.max_steps)
        if state.global_step > 0:  # resumed: the Trainer restored weights, optimizer and RNG, we restore masks
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"resuming at step {state.global_step}: no {STATE_FILE} at {path} "
                                        f"(written by SparseTrainerCallback.on_save beside the Trainer's checkpoint)")
            restore(path, sparse)
        self.model.use(sparse)
        self.run.attach(optimizer)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        loss = self.model.pop_loss()
        taken = self.run.after_batch(loss)
        self._unfed = 0 if loss is not None else self._unfed + taken

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict | None = None, **kwargs: Any) -> None:
        """The Trainer's logged training loss (the mean over the steps since its last log) feeds the
        loss guard for the steps that had no loss of their own."""
        loss = (logs or {}).get("loss")
        if self.run.sparse is not None and self._unfed and isinstance(loss, (int, float)):
            for _ in range(self._unfed):
                self.run.sparse.loss_guard.observe(loss)
            self._unfed = 0

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        if state.is_world_process_zero and self.run.sparse is not None:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            save(self.run.sparse, os.path.join(folder, STATE_FILE))

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self.run.finish()
