"""Importance criteria for sparse training, one registry.

A criterion maps a sparse layer to one score per weight (higher = more important).
Gradient-based criteria read the dense gradient captured at update steps when the
method asked for one, else the weight's own gradient."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..config import check_choice
from .layers import SparseLayer
from .masking import output_channel_index

__all__ = ["CRITERIA", "register_criterion", "importance"]

Criterion = Callable[[SparseLayer], torch.Tensor]
CRITERIA: dict[str, Criterion] = {}


def register_criterion(name: str):
    def register(fn: Criterion) -> Criterion:
        CRITERIA[name] = fn
        return fn

    return register


def _gradient(layer: SparseLayer) -> torch.Tensor:
    grad = layer.masked.dense_grad if layer.masked.dense_grad is not None else layer.module.weight.grad
    if grad is None:
        raise ValueError(f"importance needs a gradient for layer {layer.name}: call backward() before step()")
    return grad.detach().float()


@register_criterion("magnitude")
def magnitude(layer: SparseLayer) -> torch.Tensor:
    """|w|."""
    return layer.module.weight.detach().abs().float()


@register_criterion("gradient")
def gradient(layer: SparseLayer) -> torch.Tensor:
    """|dL/dw| (dense where the method captured it)."""
    return _gradient(layer).abs()


@register_criterion("taylor")
def taylor(layer: SparseLayer) -> torch.Tensor:
    """|w * dL/dw|: first-order Taylor estimate of the loss change when w is removed."""
    return (layer.module.weight.detach().float() * _gradient(layer)).abs()


@register_criterion("taylor_bn")
def taylor_bn(layer: SparseLayer) -> torch.Tensor:
    """|g_gamma * gamma + g_beta * beta| of the BatchNorm after a layer, per output channel,
    broadcast over the channel's weights (the structured criterion of IEE/HALP)."""
    bn = getattr(layer, "batchnorm", None)
    if bn is None or bn.weight is None or bn.weight.grad is None:
        raise ValueError(f"taylor_bn needs a BatchNorm with gradients after layer {layer.name}")
    score = (bn.weight.grad * bn.weight + bn.bias.grad * bn.bias).detach().abs().float()
    return score[output_channel_index(layer.module)].expand_as(layer.module.weight).clone()


def importance(criterion: str, layer: SparseLayer) -> torch.Tensor:
    """Scores of ``layer``'s weights; NaN/inf is an error naming the layer."""
    check_choice("importance", criterion, CRITERIA)
    scores = CRITERIA[criterion](layer)
    if not torch.isfinite(scores).all():
        raise ValueError(f"importance {criterion!r} is NaN/inf in layer {layer.name}: check its weights and gradients")
    return scores
