"""Depth pruning: score the residual blocks of a model (its decoder / encoder layers, the
identity-shortcut blocks of a ResNet), choose the least important ones by a ratio or inside a
budget, and remove them from a compact model, exactly (see :mod:`spruce.passes.depth`).

The compact model with blocks removed equals the source model (or a width-pruned model's
masked twin) with each removed block's residual branches zeroed (:attr:`DepthResult.masked`).
A transformers model written back with :func:`spruce.to_transformers` has its
``num_hidden_layers``, per-layer attributes (``layer_types``) and ``layer_idx`` renumbered.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from ..capture.capture import capture
from ..passes.depth import Block, bypass_blocks, residual_blocks, zero_blocks
from ..passes.export import ModeSwitch
from ..passes.graph import split_inputs
from .prune import PruneResult

__all__ = ["DEPTH_CRITERIA", "DepthResult", "block_importance", "choose_blocks", "prune_depth", "remove_blocks"]

# block importance criteria: higher is more important
DEPTH_CRITERIA = ("cosine", "skip")


def _graphs(compact: nn.Module) -> list[fx.GraphModule]:
    if isinstance(compact, ModeSwitch):
        return [compact.eval_graph, compact.train_graph]
    if isinstance(compact, fx.GraphModule):
        return [compact]
    raise ValueError(f"depth: {type(compact).__name__} is no graph: blocks are removed from a model captured whole "
                     "(a GraphModule: prune(...).model, or a ModeSwitch of two)")


def blocks_of(compact: nn.Module) -> list[Block]:
    """The residual blocks of a compact model (its eval graph), in graph order."""
    return residual_blocks(_graphs(compact)[0])


def remove_blocks(compact: nn.Module, blocks: Iterable[str]) -> nn.Module:
    """A copy of ``compact`` (a GraphModule such as ``prune(...).model``, or a
    :class:`~spruce.passes.export.ModeSwitch`) without the residual blocks named in ``blocks``
    (module paths of the source model, e.g. ``"model.layers.3"``): their outputs are replaced
    by their inputs, their parameters are gone. ``compact`` is not modified. Raises
    ``ValueError`` naming a path that is no residual block (and listing those that are)."""
    blocks = list(blocks)
    graphs = [bypass_blocks(gm, blocks) for gm in _graphs(compact)]
    result = graphs[0] if len(graphs) == 1 else ModeSwitch(graphs[0], graphs[1])
    return copy.deepcopy(result).train(compact.training)


class _Tap(nn.Module):
    """Records the value passing through it under ``key``."""

    def __init__(self, store: dict, key: tuple[str, str]):
        super().__init__()
        self.store, self.key = store, key

    def forward(self, value):
        self.store.setdefault(self.key, []).append(value.detach())
        return value


def _tapped(gm: fx.GraphModule, blocks: list[Block], store: dict) -> fx.GraphModule:
    """A copy of ``gm`` (sharing its tensors) that records every block's input and output."""
    tapped = fx.GraphModule(gm, copy.deepcopy(gm.graph), gm.__class__.__name__)
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(gm, attr):
            setattr(tapped, attr, getattr(gm, attr))
    nodes = {n.name: n for n in tapped.graph.nodes}
    for i, block in enumerate(blocks):
        for role, name in (("input", block.input), ("output", block.output)):
            node = nodes[name]
            tap = f"_spruce_tap_{i}_{role}"
            tapped.add_submodule(tap, _Tap(store, (block.path, role)))
            with tapped.graph.inserting_after(node):
                tapped.graph.call_module(tap, (node,))
    tapped.recompile()
    return tapped


def _cosine_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1 - cos(x, y) per token (over the last dim of a (batch, tokens, width) tensor) or per
    sample (over all dims after the first), as a flat tensor."""
    x, y = x.float(), y.float()
    if x.dim() != 3:
        x, y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
    return (1 - nn.functional.cosine_similarity(x, y, dim=-1, eps=1e-12)).reshape(-1)


def _call(gm: nn.Module, batch: object) -> object:
    args, kwargs = split_inputs(batch)
    return gm(*args, **kwargs)


def _loss(output: object, reference: object | None) -> float:
    """The model's own ``loss`` output, else the squared change of its floating outputs
    relative to ``reference``'s (0 for the reference itself)."""
    loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor):
        return float(loss)
    if reference is None:
        return 0.0
    pairs = [(a, b) for a, b in zip(pytree.tree_leaves(output), pytree.tree_leaves(reference))
             if isinstance(a, torch.Tensor) and a.is_floating_point()]
    return float(sum(((a - b).float().pow(2).mean() / b.float().pow(2).mean().clamp_min(1e-12)) for a, b in pairs))


def block_importance(model: nn.Module, calibration: Iterable[object], criterion: str = "cosine",
                     dynamic_shapes: object = None, graph: nn.Module | None = None) -> dict[str, float]:
    """The importance of every residual block of ``model`` (module path -> score, higher is
    more important, in graph order) over ``calibration`` (a list of inputs in ``prune``'s
    formats; for a transformers model, dicts of ``input_ids`` ...).

    ``criterion="cosine"``: the mean over tokens (samples, for non-sequence tensors) of
    ``1 - cos(block input, block output)`` (ShortGPT's block influence; one run per batch).
    ``criterion="skip"``: the increase of the loss when the block alone is bypassed: the
    model's own ``loss`` output where the inputs carry labels, else the squared change of its
    outputs relative to their mean square (one run per block and batch).

    ``graph``: the compact model to score (``prune(...).model``); default: ``model`` captured
    at the first batch (``dynamic_shapes`` as in :func:`spruce.prune`). Runs in eval mode
    without gradients. Raises ``ValueError`` for an unknown criterion, no calibration, or a
    model without residual blocks."""
    if criterion not in DEPTH_CRITERIA:
        raise ValueError(f"block importance {criterion!r}: choose one of {', '.join(DEPTH_CRITERIA)}")
    batches = list(calibration)
    if not batches:
        raise ValueError("block_importance needs calibration inputs (at least one batch)")
    if graph is None:
        graph = capture(model, batches[0], dynamic_shapes=dynamic_shapes).eval
    gm = _graphs(graph)[0]
    blocks = residual_blocks(gm)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no residual block (a module whose output is its input plus "
                         "branches) that can be removed")
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            if criterion == "cosine":
                store: dict = {}
                tapped = _tapped(gm, blocks, store)
                for batch in batches:
                    _call(tapped, batch)
                return {b.path: float(torch.cat([_cosine_distance(x, y) for x, y in zip(
                    store[(b.path, "input")], store[(b.path, "output")])]).mean()) for b in blocks}
            references = [_call(gm, batch) for batch in batches]
            base = sum(_loss(out, None) for out in references)
            scores = {}
            for block in blocks:
                skipped = bypass_blocks(gm, [block.path]).eval()
                scores[block.path] = sum(_loss(_call(skipped, b), ref) for b, ref in zip(batches, references)) - base
            return scores
    finally:
        gm.train(was_training)


def choose_blocks(scores: dict[str, float], ratio: float | None = None, budget: float | None = None,
                  costs: dict[str, float] | None = None) -> list[str]:
    """The blocks to remove, least important first: ``round(ratio * len(scores))`` of them, or
    (``budget``) the fewest that bring the summed ``costs`` of the kept blocks to at most
    ``budget`` (costs: e.g. parameter counts or measured milliseconds, one per block of
    ``scores``). At least one block is kept. Ties keep the earlier block. Raises
    ``ValueError`` unless exactly one of ``ratio`` (in [0, 1)) and ``budget`` (>= 0, with
    ``costs``) is given, or when no choice keeping a block meets the budget."""
    if (ratio is None) == (budget is None):
        raise ValueError("choose_blocks: give either ratio or budget")
    order = sorted(scores, key=lambda p: (scores[p], list(scores).index(p)))
    if ratio is not None:
        if not 0 <= ratio < 1:
            raise ValueError(f"choose_blocks: ratio must be in [0, 1), got {ratio}")
        return order[:min(len(order) - 1, math.floor(ratio * len(order) + 0.5))]
    if costs is None or set(costs) < set(scores):
        raise ValueError("choose_blocks: a budget needs a cost for every block")
    kept = sum(costs[p] for p in order)
    chosen: list[str] = []
    for path in order[:-1]:
        if kept <= budget:
            break
        chosen.append(path)
        kept -= costs[path]
    if kept > budget:
        raise ValueError(f"choose_blocks: budget {budget:g} not reachable: the most important block alone costs "
                         f"{kept:g}")
    return chosen


@dataclass
class DepthResult:
    """``model``: the compact model without the ``removed`` blocks (module paths);
    ``scores``: every block's importance; ``masked``: the source model (or the width-pruned
    result's masked twin) with the removed blocks' residual branches zeroed, built on first
    access: it computes what ``model`` computes."""

    model: nn.Module
    removed: list[str]
    scores: dict[str, float]
    blocks: list[Block] = field(repr=False)
    source: nn.Module = field(repr=False)
    base: PruneResult | None = field(default=None, repr=False)
    _masked: nn.Module | None = field(default=None, repr=False)

    @property
    def masked(self) -> nn.Module:
        if self._masked is None:
            reference = self.base.masked if self.base is not None else self.source
            chosen = [b for b in self.blocks if b.path in self.removed]
            self._masked = zero_blocks(reference, chosen)
        return self._masked


def prune_depth(model: nn.Module, example_inputs: object, ratio: float | None = None, budget: float | None = None,
                criterion: str = "cosine", calibration: Iterable[object] | None = None,
                dynamic_shapes: object = None, base: PruneResult | None = None,
                costs: dict[str, float] | None = None) -> DepthResult:
    """Remove the least important residual blocks of ``model``: ``ratio`` of them, or as
    many as bring the kept blocks' summed ``costs`` (default: their parameter counts) to at
    most ``budget`` (see :func:`choose_blocks`), scored by :func:`block_importance` with
    ``criterion`` over ``calibration`` (default: the example).

    ``base``: a :func:`spruce.prune` result of ``model`` to remove the blocks from (width and
    depth together; its masked twin then zeroes the branches too); else ``model`` is captured
    at ``example_inputs`` (``dynamic_shapes`` as in :func:`spruce.prune`) and the blocks are
    removed from its graph. ``model`` is not modified. Raises ``ValueError`` as
    :func:`choose_blocks` and :func:`block_importance` do."""
    calibration = [example_inputs] if calibration is None else list(calibration)
    if base is not None:
        compact = base.model
    else:
        captured = capture(model, example_inputs, dynamic_shapes=dynamic_shapes)
        compact = captured.eval if captured.train is None else ModeSwitch(captured.eval, captured.train)
    blocks = blocks_of(compact)
    scores = block_importance(model, calibration, criterion, graph=compact)
    removed = choose_blocks(scores, ratio, budget, costs or {b.path: b.cost for b in blocks})
    result = remove_blocks(compact, removed)
    return DepthResult(result.train(model.training), removed, scores, blocks, model, base)
