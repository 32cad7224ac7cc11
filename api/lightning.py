"""A Lightning callback that trains a submodule of a ``LightningModule`` sparse.

Imports ``lightning`` (``pip install lightning``); ``import spruce`` does not.

The lifecycle, in Lightning's hooks:

- ``setup`` (stage "fit"): the submodule named ``attribute`` is replaced by its
  :class:`~spruce.SparseModel` (``spruce.sparsify`` with ``total_steps`` = the trainer's
  ``estimated_stepping_batches``: its optimizer steps, after gradient accumulation, from
  ``max_steps`` or ``max_epochs``). ``configure_optimizers`` runs after it, so an optimizer
  built on ``self.parameters()`` holds the sparse weights.
- ``on_train_start``: the trainer's optimizer is attached (``SparseModel.attach``).
- ``on_train_batch_end``: ``SparseModel.step(loss=...)`` (the training step's loss, for the
  loss guard) for each optimizer step really taken (none on an accumulation micro-batch, none
  on a step the AMP grad scaler skipped).
- ``on_train_end``: :attr:`SparseLightningCallback.result` is the compact model
  (structure="channel") or the folded one (pruned weights exact zeros); the ``LightningModule``
  keeps the SparseModel.

Where the masks live: in the ``LightningModule``'s ``state_dict``, so in every Lightning
checkpoint's ``"state_dict"``: the SparseModel's bit-packed mask buffers beside the weights,
and its method state, step count and metrics as its ``_extra_state``. ``trainer.fit(...,
ckpt_path=...)`` runs ``setup`` (a fresh SparseModel) and then loads the checkpoint into it,
so a resumed run continues with the saved masks.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn

from ..passes.sparsity.method import MethodConfig
from ..passes.sparsity.model import SparseModel
from .callbacks import SparseRun, SparseRunCallback

__all__ = ["SparseLightningCallback"]


class SparseLightningCallback(SparseRunCallback, pl.Callback):
    """Train ``pl_module.<attribute>`` sparse with ``method`` (see the module docstring).

    ``example_inputs``: what the submodule is traced with (``spruce.sparsify``'s);
    ``method``: a method config or name; ``**options``: ``sparsify``'s other keyword arguments
    (``structure``, ``sparsity``, ``distribution``, ``budget``, ``latency_table``, ...).
    ``sparse`` is the SparseModel once set up, ``result`` the compact / folded model after
    training. Raises ``ValueError`` at ``setup`` (before the first step) for a trainer whose
    number of steps is unknown or a config that cannot fit it, and ``AttributeError`` for a
    missing attribute."""

    def __init__(self, example_inputs: object, method: str | MethodConfig = "rigl", attribute: str = "model",
                 **options: Any):
        super().__init__()
        self.attribute = attribute
        self.run = SparseRun(method, example_inputs, options)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        module = getattr(pl_module, self.attribute)
        if isinstance(module, SparseModel):  # a second fit of the same module
            self.run.sparse = module
            return
        if not isinstance(module, nn.Module):
            raise TypeError(f"{type(pl_module).__name__}.{self.attribute} is a {type(module).__name__}, "
                            "not a torch module")
        setattr(pl_module, self.attribute, self.run.start(module, trainer.estimated_stepping_batches))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise ValueError(f"SparseLightningCallback drives one optimizer; configure_optimizers gave "
                             f"{len(optimizers)}")
        self.run.attach(optimizers[0])

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        self.run.after_batch(loss if isinstance(loss, torch.Tensor) and loss.numel() == 1 else None)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.run.finish()
