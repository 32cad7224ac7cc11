"""The profiled layers of a model: finding them, their signatures, and the grid of channel counts each is timed at.

:func:`find_layers` runs the model once to find every prunable layer with its shapes and call count;
:func:`layer_signature` says what a layer's latency depends on besides its channel counts (layers alike
share measured points); :func:`make_entry` lays out the coarse rectangle and fine edges of channel counts
a layer is timed at, stepping by the channels that :func:`varying_dims` finds pruning can remove.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .table import PROFILED_TYPES, RECURRENT_GATES, LayerEntry, ProfileError

__all__ = ["FoundLayer", "find_layers", "layer_signature", "make_entry", "varying_dims"]


@dataclass
class FoundLayer:
    """A layer a forward calls: the module, its input/output shapes, input dtype and call count."""

    module: nn.Module
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    dtype: torch.dtype
    calls: int = 1


def find_layers(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> dict[str, FoundLayer]:
    """Every Conv1d/2d/3d, ConvTranspose1d/2d/3d, Linear and recurrent (LSTM, GRU, RNN; not one with
    ``proj_size``, nor one given a packed sequence: their time stays in the calibration's overhead)
    module a forward on ``example_inputs`` calls, with its input/output shapes (a recurrent layer's
    output: its output sequence) and call count, in call order. Raises :class:`ProfileError` when a
    shared module is called with different input shapes, or a layer unbatched (a Conv input
    without its batch dimension, a 1-D Linear input)."""
    names = {module: name for name, module in model.named_modules(remove_duplicate=True)}
    found: dict[str, FoundLayer] = {}

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        name = names[module]
        x = args[0]
        if isinstance(module, nn.RNNBase):
            if getattr(module, "proj_size", 0) or not isinstance(output, tuple):
                return
            output = output[0]
        if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor):
            return
        batched_rank = 2 if isinstance(module, nn.Linear) else 3 if isinstance(module, nn.RNNBase) \
            else len(module.kernel_size) + 2
        if x.dim() < batched_rank:
            raise ProfileError(f"layer {name!r} ({type(module).__name__}) is called unbatched, with input shape "
                               f"{tuple(x.shape)}: a profiled layer is timed at a batch size, so give the example "
                               f"input a batch dimension first")
        if name in found:
            if tuple(x.shape) != found[name].input_shape:
                raise ProfileError(f"layer {name!r} is called with input shapes {found[name].input_shape} and "
                                   f"{tuple(x.shape)}: a profiled layer must see one shape")
            found[name].calls += 1
        else:
            found[name] = FoundLayer(module, tuple(x.shape), tuple(output.shape), x.dtype)

    handles = [m.register_forward_hook(hook) for m in names if type(m) in PROFILED_TYPES]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return found


def layer_signature(module: nn.Module, input_shape: Sequence[int], dtype: torch.dtype) -> str:
    """What a layer's latency depends on besides its channel counts."""
    batch = input_shape[0]
    dtype_name = str(dtype).removeprefix("torch.")
    if isinstance(module, nn.Linear):
        return f"Linear(bias={module.bias is not None})|rows={list(input_shape[1:-1])}|batch={batch}|{dtype_name}"
    if isinstance(module, nn.RNNBase):  # the batch dim is among the rows (dim 1 unless batch_first)
        return (f"{module.mode}(layers={module.num_layers},bidirectional={module.bidirectional},bias={module.bias},"
                f"batch_first={module.batch_first})|rows={list(input_shape[:-1])}|{dtype_name}")
    if module.groups > 1 and module.in_channels == module.groups:
        groups = f"depthwise*{module.out_channels // module.groups}"
    else:
        groups = str(module.groups)
    output_padding = f",op={list(module.output_padding)}" if module.transposed else ""
    return (f"{type(module).__name__}(k={list(module.kernel_size)},s={list(module.stride)},p={module.padding},"
            f"d={list(module.dilation)},g={groups},bias={module.bias is not None},pad={module.padding_mode}"
            f"{output_padding})"
            f"|in={list(input_shape[2:])}|batch={batch}|{dtype_name}")


def _fine_axis(full: int, quantum: int) -> tuple[int, ...]:
    """Multiples of ``quantum`` below ``full``, and ``full``."""
    return (*range(quantum, full, quantum), full)


def _coarse_axis(fine: Sequence[int], count: int) -> tuple[int, ...]:
    """About ``count`` points of ``fine``, evenly spread, always its first and last."""
    if len(fine) <= count:
        return tuple(fine)
    picks = np.unique(np.round(np.linspace(0, len(fine) - 1, count)).astype(int))
    return tuple(int(fine[i]) for i in picks)


def make_entry(name: str, found: FoundLayer, step: int, coarse: int, edges: bool,
                in_unit: int, out_unit: int) -> LayerEntry:
    """The layer's :class:`~spruce.runtime.table.LayerEntry`: its signature, widths and the channel counts
    it is timed at (multiples of ``step`` whole channels; about ``coarse`` per axis of the rectangle, and
    both full-width edges when ``edges``); ``in_unit``/``out_unit`` as from :func:`varying_dims` (0: fixed)."""
    in_varies, out_varies = in_unit > 0, out_unit > 0
    module = found.module
    if isinstance(module, nn.RNNBase):
        return _recurrent_entry(name, found, step, coarse, edges, in_unit, out_unit)
    linear = isinstance(module, nn.Linear)
    full_in = module.in_features if linear else module.in_channels
    full_out = module.out_features if linear else module.out_channels
    groups = 1 if linear else module.groups
    depthwise = groups > 1 and full_in == groups
    in_elements = math.prod(found.input_shape) // full_in
    out_elements = math.prod(found.output_shape) // full_out
    common = dict(name=name, signature=layer_signature(module, found.input_shape, found.dtype),
                  in_channels=full_in, out_channels=full_out, in_elements=in_elements, out_elements=out_elements,
                  calls=found.calls, kernel=1 if linear else math.prod(module.kernel_size))
    if depthwise:
        varies = in_varies or out_varies
        fine = _fine_axis(full_in, step * max(in_unit, out_unit)) if varies else (full_in,)
        return LayerEntry(**common, groups=groups, multiplier=full_out // full_in, in_varies=varies,
                          out_varies=varies, in_fine=fine)
    fine_in = _fine_axis(full_in, math.lcm(step * in_unit, groups)) if in_varies else (full_in,)
    fine_out = _fine_axis(full_out, math.lcm(step * out_unit, groups)) if out_varies else (full_out,)
    return LayerEntry(**common, groups=groups, in_varies=in_varies, out_varies=out_varies,
                      in_coarse=_coarse_axis(fine_in, coarse), out_coarse=_coarse_axis(fine_out, coarse),
                      in_fine=fine_in if edges else (), out_fine=fine_out if edges else ())


def _recurrent_entry(name: str, found: FoundLayer, step: int, coarse: int, edges: bool,
                     in_unit: int, out_unit: int) -> LayerEntry:
    """A recurrent layer's entry: timed over (input features, hidden units)."""
    module = found.module
    full_in, full_out = module.input_size, module.hidden_size
    fine_in = _fine_axis(full_in, step * in_unit) if in_unit else (full_in,)
    fine_out = _fine_axis(full_out, step * out_unit) if out_unit else (full_out,)
    return LayerEntry(name=name, signature=layer_signature(module, found.input_shape, found.dtype),
                      in_channels=full_in, out_channels=full_out,
                      in_elements=math.prod(found.input_shape) // full_in,
                      out_elements=math.prod(found.output_shape) // full_out, calls=found.calls,
                      in_varies=in_unit > 0, out_varies=out_unit > 0,
                      in_coarse=_coarse_axis(fine_in, coarse), out_coarse=_coarse_axis(fine_out, coarse),
                      in_fine=fine_in if edges else (), out_fine=fine_out if edges else (),
                      gates=RECURRENT_GATES[module.mode], directions=2 if module.bidirectional else 1,
                      stacked=module.num_layers)


def varying_dims(analysis: Any, layers: Mapping[str, FoundLayer]) -> dict[str, tuple[int, int]]:
    """Per layer and dimension (input, output): 0 when channel pruning cannot change it, else
    how many entries of that dimension one pruned channel removes (e.g. 49 for a Linear
    after flattening a 7x7 feature map), so the grid steps by whole channels."""
    units: dict[tuple[str, int], int] = {}
    for group in analysis.groups:
        if group.prunable:
            for member in group.members:
                key = (member.name, member.dim)
                units[key] = max(units.get(key, 1), int(member.index.shape[1]))
    result = {}
    for name, found in layers.items():
        module = found.module
        if isinstance(module, nn.RNNBase):  # the first layer's input matrix: (gates x hidden, input features)
            weight = f"{name}.weight_ih_l0" if name else "weight_ih_l0"
            gates = RECURRENT_GATES[module.mode]
            result[name] = (units.get((weight, 1), 0), units.get((weight, 0), 0) // gates)
            continue
        weight = f"{name}.weight" if name else "weight"
        out_dim, in_dim = (1, 0) if getattr(module, "transposed", False) else (0, 1)  # (in, out / g, *k)
        out_unit, in_unit = units.get((weight, out_dim), 0), units.get((weight, in_dim), 0)
        if not isinstance(module, nn.Linear) and module.groups > 1 and module.in_channels == module.groups:
            in_unit = out_unit  # depthwise: input and output channels go together
        result[name] = (in_unit, out_unit)
    return result
