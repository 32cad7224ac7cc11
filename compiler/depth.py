"""Whole residual blocks (a causal language model's decoder layers) in compile's channel
selection: which blocks to remove besides channels, so that a latency budget below what
channels alone reach can still be met.

Blocks are scored by ShortGPT's block influence (Men et al., "ShortGPT: Layers in Large
Language Models are More Redundant Than You Expect", 2024): the mean over calibration tokens
of ``1 - cos(block input, block output)``, on the recovery data's first batches
(:func:`spruce.api.depth.block_importance`, ``cosine``); the least influential go first.
The recipe's ``depth`` fixes how many; left unset, a latency budget removes none unless the
smallest channel selection misses it, and then the fewest whose removal lets it reach
(Minitron's finding: width pruning keeps more than depth pruning at the same size, so depth is
the second resort). Removed blocks are bypassed exactly (:func:`spruce.api.depth.remove_blocks`),
and the write-back renumbers the layers.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence

from torch import nn

from ..api.depth import block_importance, choose_blocks, remove_blocks
from ..passes.sparsity.knapsack import InfeasibleBudget
from .datasets import inputs_of
from .results import Captured, Setup

__all__ = ["BLOCK_BATCHES", "block_remover", "blocks_for_budget", "blocks_to_remove"]

BLOCK_BATCHES = 4  # calibration batches scoring the blocks (at most)


def _scores(setup: Setup, captured: Captured) -> dict[str, float]:
    """Every residual block's influence (module path -> score, higher keeps), in graph order."""
    batches = [inputs_of(batch) for batch in itertools.islice(setup.data.train, BLOCK_BATCHES)]
    return block_importance(captured.student, batches, "cosine", graph=captured.graph.eval)


def _least_influential(scores: dict[str, float]) -> list[str]:
    """All blocks but the most influential, least influential first (ties keep the earlier)."""
    return choose_blocks(scores, ratio=(len(scores) - 1) / len(scores))


def block_remover(blocks: Sequence[str]) -> Callable[[nn.Module], nn.Module] | None:
    """A compact model -> the same without ``blocks`` (None when there are none)."""
    return functools.partial(remove_blocks, blocks=list(blocks)) if blocks else None


def blocks_to_remove(setup: Setup, captured: Captured) -> tuple[str, ...]:
    """The recipe's ``depth`` least influential blocks (``()`` for no depth or 0). Raises
    ``ValueError`` naming ``depth`` for a model that is no causal language model, or for a
    depth that would leave no block."""
    depth = setup.recipe.depth or 0
    if not depth:
        return ()
    if not setup.is_lm:
        raise ValueError(f"depth {depth}: compile removes whole blocks of causal language models only; "
                         f"{setup.model_name} is not one (spruce.prune_depth removes blocks of other models)")
    scores = _scores(setup, captured)
    if depth >= len(scores):
        raise ValueError(f"depth {depth}: {setup.model_name} has {len(scores)} residual blocks and keeps at least one")
    return tuple(_least_influential(scores)[:depth])


def blocks_for_budget(setup: Setup, captured: Captured,
                      reach: Callable[[Callable[[nn.Module], nn.Module] | None], object]) -> tuple[str, ...]:
    """The blocks a latency budget removes: the recipe's ``depth`` when it is set (or the
    model is no causal LM: none), else the fewest least-influential blocks with which ``reach``
    (timing the smallest selection with the blocks removed by its argument, raising
    :class:`InfeasibleBudget` when that misses the budget) passes. Raises the last
    ``InfeasibleBudget`` when even one block left does not reach."""
    if setup.recipe.depth is not None or not setup.is_lm:
        blocks = blocks_to_remove(setup, captured)
        reach(block_remover(blocks))
        return blocks
    try:
        reach(None)
        return ()
    except InfeasibleBudget as missed:
        error = missed
    order = _least_influential(_scores(setup, captured))
    for count in range(1, len(order) + 1):
        try:
            reach(block_remover(order[:count]))
            return tuple(order[:count])
        except InfeasibleBudget as missed:
            error = missed
    raise error
