"""The graph contract every pass takes: a model captured at its example input.

Only ``spruce.compiler`` captures models (``spruce.compiler.trace.capture``); passes
(analysis, masking, channel removal, latency profiling) receive a
:class:`CapturedGraph` and never trace anything themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

__all__ = ["CapturedGraph", "as_input_tuple"]


@dataclass
class CapturedGraph:
    """A model captured at its example input.

    ``eval`` is the eval-mode graph; ``train`` the training-mode graph when the model's
    code differs in training mode (auxiliary heads), else None. Both are GraphModules
    whose every tensor node carries ``meta["tensor_meta"]`` (shape, dtype) at the example
    input, and they read the parameters and buffers of ``root`` (the same tensor objects).
    ``example_inputs`` are the positional inputs the graphs were captured with."""

    eval: fx.GraphModule
    train: fx.GraphModule | None
    root: nn.Module
    example_inputs: tuple

    @property
    def graphs(self) -> list[fx.GraphModule]:
        return [self.eval] if self.train is None else [self.eval, self.train]

    def graph_for(self, training: bool) -> fx.GraphModule:
        """The graph that runs in the given mode."""
        return self.train if training and self.train is not None else self.eval


def as_input_tuple(example_inputs: object) -> tuple:
    """Normalise example inputs to a tuple of positional arguments."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(
        f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}"
    )
