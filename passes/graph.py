"""The graph contract every pass takes: a model captured at its example input.

Only ``spruce.compiler`` captures models (``spruce.compiler.trace.capture``); passes
(analysis, masking, channel removal, latency profiling) receive a
:class:`CapturedGraph` and never trace anything themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

__all__ = ["CapturedGraph", "as_input_tuple", "require_data"]


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


def require_data(model: nn.Module, example_inputs: object, what: str) -> None:
    """Raise ``ValueError`` when ``model``'s parameters or buffers, or the example inputs, are on
    the ``meta`` device: they have shapes but no values, so ``what`` (an operation that reads
    weights or runs the model) cannot work on them. The message names the first such tensors and
    how to materialise them. Tracing and channel analysis work on meta models and need no check."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    empty = [name for name, tensor in named if tensor.is_meta]
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    empty += [f"example input {i}" for i, x in enumerate(inputs) if isinstance(x, torch.Tensor) and x.is_meta]
    if empty:
        shown = ", ".join(empty[:3]) + (f" and {len(empty) - 3} more" if len(empty) > 3 else "")
        raise ValueError(f"{what}: {shown} {'is' if len(empty) == 1 else 'are'} on the meta device (shapes "
                         "without values): materialise the model first, e.g. model.to_empty(device='cpu') then "
                         "model.load_state_dict(weights), and give example inputs with values")


def as_input_tuple(example_inputs: object) -> tuple:
    """Normalise example inputs to a tuple of positional arguments."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(
        f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}"
    )
