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
- ``on_step_end`` (once per optimizer step): ``SparseModel.step()``, unless the AMP grad
  scaler skipped the optimizer's step.
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
from typing import Any

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
        return (self.model if self.sparse is None else self.sparse)(*args, **kwargs)


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
        self.run.after_batch()

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        if state.is_world_process_zero and self.run.sparse is not None:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            save(self.run.sparse, os.path.join(folder, STATE_FILE))

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self.run.finish()
