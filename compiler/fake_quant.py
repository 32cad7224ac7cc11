"""Fake quantization in the student during recovery, matching what ONNX Runtime's static U8S8
quantizer (:mod:`spruce.targets.quantize`) will do to the artifact, with torch's core
fake-quantize operators (``torch.fake_quantize_per_channel_affine`` /
``torch.fake_quantize_per_tensor_affine``; not the ``torch.ao.quantization`` QAT flow).

- **weights** of every Conv / Linear: per output channel, symmetric int8 (zero point 0), the
  scale ONNX Runtime computes from the weight itself: ``max|w_c| / 127`` (symmetric int8 is
  [-127, 127] there), recomputed every
  forward from the current weights (so it follows training). ONNX Runtime quantizes the
  weights after folding BatchNorm into them; folding multiplies each output channel by one
  factor, which scales that channel's grid with it, so quantizing the unfolded weight per
  channel puts it on the same grid;
- **activations** entering every Conv / Linear, and the output of a Conv / Linear that the
  model returns: per tensor, asymmetric uint8, the MinMax range (widened to include 0)
  observed on the calibration samples before recovery, as ONNX Runtime's MinMax calibration
  does, fixed during recovery. (ONNX Runtime quantizes every layer's output; where another
  layer consumes it, after a ReLU that ONNX Runtime folds into the quantization, the
  consumer's input quantization stands for it.) Measured on a small CNN against ONNX
  Runtime's INT8 artifact: the fake-quantized student's outputs 16x closer to it than the
  fp32 model's (the test).

Both operators pass gradients straight through inside the range (zero outside), so the student
learns weights that survive the rounding. :func:`fake_quantized` adds the quantization for the
duration of a ``with`` block and takes it out again, leaving plain fp32 modules to export.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .outputs import flatten_outputs

__all__ = ["Ranges", "WeightFakeQuant", "activation_ranges", "fake_quantized"]

QUANTIZED_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class WeightFakeQuant(nn.Module):
    """The parametrization ``weight -> fake_quantize_per_channel(weight)`` (int8 in [-127, 127], axis 0)."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        absmax = weight.detach().abs().reshape(weight.shape[0], -1).amax(dim=1)
        scale = (absmax / 127).clamp_min(1e-12).float()
        zero = torch.zeros(weight.shape[0], dtype=torch.int32, device=weight.device)
        return torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, -127, 127)


@dataclass
class Ranges:
    """What :func:`activation_ranges` observed: per Conv / Linear (by module name) the range of
    its input, and of its output where that output is one of the model's outputs."""

    inputs: dict[str, tuple[float, float]] = field(default_factory=dict)
    outputs: dict[str, tuple[float, float]] = field(default_factory=dict)


def _widen(seen: dict[str, tuple[float, float]], name: str, value: torch.Tensor) -> None:
    low, high = seen.get(name, (0.0, 0.0))
    seen[name] = (min(low, float(value.min())), max(high, float(value.max())))


@torch.no_grad()
def activation_ranges(model: nn.Module, batches: Iterable[torch.Tensor]) -> Ranges:
    """Per Conv / Linear of ``model`` (by module name): the smallest and largest value of its
    input over ``batches``, and of its output when the model returns that output itself (ONNX
    Runtime quantizes a layer's output too; inside the model the next layer's input
    quantization stands for it), each widened to include 0 (ONNX Runtime's MinMax rule)."""
    ranges = Ranges()
    names = {module: name for name, module in model.named_modules() if isinstance(module, QUANTIZED_LAYERS)}
    produced: dict[int, str] = {}

    def observe_input(module: nn.Module, args: tuple) -> None:
        _widen(ranges.inputs, names[module], args[0])

    def observe_output(module: nn.Module, args: tuple, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            produced[id(output)] = names[module]

    hooks = [module.register_forward_pre_hook(observe_input) for module in names]
    hooks += [module.register_forward_hook(observe_output) for module in names]
    was_training = model.training
    model.eval()
    try:
        for inputs in batches:
            produced.clear()
            for _, value in flatten_outputs(model(inputs)):
                if id(value) in produced:
                    _widen(ranges.outputs, produced[id(value)], value)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return ranges


def _uint8(low: float, high: float) -> tuple[float, int]:
    scale = max((high - low) / 255, 1e-12)
    return scale, int(round(-low / scale))


def _input_hook(low: float, high: float):
    scale, zero = _uint8(low, high)

    def hook(module: nn.Module, args: tuple) -> tuple:
        return (torch.fake_quantize_per_tensor_affine(args[0], scale, zero, 0, 255), *args[1:])

    return hook


def _output_hook(low: float, high: float):
    scale, zero = _uint8(low, high)

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return torch.fake_quantize_per_tensor_affine(output, scale, zero, 0, 255)

    return hook


@contextlib.contextmanager
def fake_quantized(model: nn.Module, calibration: Iterable[torch.Tensor]) -> Iterator[int]:
    """Within the block, every Conv / Linear of ``model`` sees its input and weight fake-quantized
    as ONNX Runtime's U8S8 static quantization will (see the module doc; input ranges from
    ``calibration`` batches, observed on entry). Yields how many layers were quantized; on exit
    the model holds its plain (trained) fp32 weights again."""
    ranges = activation_ranges(model, calibration)
    layers = [(name, module) for name, module in model.named_modules()
              if isinstance(module, QUANTIZED_LAYERS) and name in ranges.inputs]
    hooks = []
    try:
        for name, module in layers:
            parametrize.register_parametrization(module, "weight", WeightFakeQuant())
            hooks.append(module.register_forward_pre_hook(_input_hook(*ranges.inputs[name])))
            if name in ranges.outputs:
                hooks.append(module.register_forward_hook(_output_hook(*ranges.outputs[name])))
        yield len(layers)
    finally:
        for hook in hooks:
            hook.remove()
        for _, module in layers:
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
