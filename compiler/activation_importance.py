"""Channel importance from calibration activations: how much each channel carries into the
layer that reads it, on the user's recovery data.

A channel group whose channels are read as the *input* features of a linear layer (an MLP
channel: column j of ``down_proj``; a query head: its columns of ``o_proj``) is scored by the
root-mean-square over calibration tokens of the channel's input activations, times the norm of
the weight columns that read them:

    score(c) = sqrt(mean over tokens of sum_{e in c} x_e^2) * ||W[:, c]||_F

summed over every linear layer of the group that reads it. This is the activation-based width
importance of Minitron (Muralidharan et al., "Compact Language Models via Pruning and Knowledge
Distillation", 2024: the aggregated magnitude of each neuron's / head's activations on a
calibration set), with each activation weighed by the weights it is multiplied with, as in
Wanda (Sun et al., "A Simple and Effective Pruning Approach for Large Language Models", 2023:
|W| * ||X||). A group no linear layer reads as input keeps its weight-magnitude score (``l1``).
Calibration batches run in eval mode without gradients; the model is unchanged.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import nn

from ..passes.importance import importance_scores, param_table
from .datasets import inputs_of

ACTIVATION_CRITERION = "activation importance (calibration activations x weight norms)"  # a report header's words

__all__ = ["ACTIVATION_BATCHES", "activation_importance"]

ACTIVATION_BATCHES = 8  # calibration batches (at most)


def _readers(model: nn.Module, group) -> list[tuple[nn.Linear, np.ndarray]]:
    """(linear layer, entries per channel (size, k)) for each member of ``group`` that is a
    linear layer's weight along its input dim."""
    found = []
    for member in group.members:
        owner, _, leaf = member.name.rpartition(".")
        if leaf != "weight" or member.dim != 1:
            continue
        try:
            module = model.get_submodule(owner)
        except AttributeError:
            continue
        if isinstance(module, nn.Linear):
            found.append((module, np.asarray(member.index)))
    return found


@torch.no_grad()
def activation_importance(model: nn.Module, groups: Iterable, batches: Iterable,
                          max_batches: int = ACTIVATION_BATCHES, seed: int = 0) -> tuple[dict[int, np.ndarray], str]:
    """Per prunable group of ``groups`` (ChannelGroups of ``model``'s parameters), one score per
    channel (see the module doc), from the first ``max_batches`` of ``batches``; and a line
    saying how many groups were scored from activations and how many by weight magnitude."""
    groups = [g for g in groups if g.prunable]
    readers = {g.id: _readers(model, g) for g in groups}
    layers = {id(linear): linear for found in readers.values() for linear, _ in found}
    sums = {key: torch.zeros(linear.in_features, dtype=torch.float64) for key, linear in layers.items()}
    tokens = dict.fromkeys(layers, 0)

    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0].detach().reshape(-1, module.in_features).double()
        sums[id(module)] += x.pow(2).sum(0)
        tokens[id(module)] += x.shape[0]

    handles = [linear.register_forward_pre_hook(hook) for linear in layers.values()]
    was_training = model.training
    try:
        for batch in itertools.islice(batches, max_batches):  # the calibration batches, in eval mode
            model.eval()(inputs_of(batch))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    params: Mapping[str, torch.Tensor] = param_table(model)
    rng = np.random.default_rng(seed)
    scores: dict[int, np.ndarray] = {}
    by_activation = 0
    for group in groups:
        found = [(linear, index) for linear, index in readers[group.id] if tokens[id(linear)]]
        if not found:
            scores[group.id] = importance_scores("l1", group, params, rng)
            continue
        by_activation += 1
        total = np.zeros(group.size)
        for linear, index in found:
            mean_square = (sums[id(linear)] / tokens[id(linear)]).numpy()
            column_norm = linear.weight.detach().double().pow(2).sum(0).numpy()
            total += np.sqrt(mean_square[index].sum(1)) * np.sqrt(column_norm[index].sum(1))
        scores[group.id] = total
    line = (f"calibration activations x weight norms (Minitron / Wanda) for {by_activation} of {len(groups)} "
            f"groups, weight magnitude (l1) for the rest")
    return scores, line
