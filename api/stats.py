"""Model size and compute counts used in reports (parameters, MACs)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """Number of parameter elements; a parameter shared by two modules counts once."""
    return sum(parameter.numel() for parameter in model.parameters())


def count_macs(model: nn.Module, example_inputs: Sequence[torch.Tensor] | Mapping[str, torch.Tensor]) -> int:
    """Multiply-accumulates of one forward pass on ``example_inputs`` (positional, or keyword
    inputs in a dict).

    Counted by torch's own FLOP counter (which knows matmul, convolution,
    attention, ...) so no per-layer formula is kept here; one MAC is two FLOPs.
    Runs under ``no_grad`` and leaves the model's train/eval mode unchanged.
    """
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        if isinstance(example_inputs, Mapping):
            model(**example_inputs)
        else:
            model(*example_inputs)
    return counter.get_total_flops() // 2
