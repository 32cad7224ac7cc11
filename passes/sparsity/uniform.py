"""Uniform counts: channel groups of the same role keep the same number of channels in every
layer (the ``uniform`` option of channel selection).

A transformers config holds one ``num_attention_heads`` and one ``intermediate_size`` for
every layer, so a pruned model writes back to its own class only when each layer kept the
same counts. Groups share a *role* (:func:`uniform_classes`) when they have the same size and
their members are the same parameters up to the layer index (``layers.3.mlp.up_proj.weight``
and ``layers.7.mlp.up_proj.weight``, same dim, same entries per channel).

The knapsack (:func:`~spruce.passes.sparsity.knapsack.select_channels`) then chooses one count
per class (:func:`tie_problem`): a class is one item whose width enters every cost term where
any of its groups did, and whose value at count k is the sum over its groups of each group's k
best channels (each group's scores sorted, summed rank by rank: a concave prefix like any
group's). :func:`untie` maps the chosen count back to each group's own most important k
channels. With every class of one group the problem is unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .knapsack import CostModel, Selection, Term, Width, as_scores

__all__ = ["Ties", "role", "tie_problem", "uniform_classes", "untie"]

_LAYER = re.compile(r"\.\d+(?=\.)")


@dataclass(frozen=True)
class Ties:
    """Classes of group ids that keep one count (each class sorted; its first id represents it)."""

    classes: tuple[tuple[int, ...], ...]

    def representative(self) -> dict[int, int]:
        """group id -> the id of its class's first group."""
        return {gid: members[0] for members in self.classes for gid in members}


def role(group) -> tuple:
    """A channel group's role: its size and its members' (name with layer indices as ``#``,
    dim, entries per channel), sorted."""
    return (group.size, tuple(sorted((_LAYER.sub(".#", m.name), m.dim, int(m.index.shape[1]))
                                     for m in group.members)))


def uniform_classes(groups: Sequence) -> Ties:
    """The prunable ``groups`` (ChannelGroups) partitioned by :func:`role`, in group id order."""
    by_role: dict[tuple, list[int]] = {}
    for group in sorted(groups, key=lambda g: g.id):
        if group.prunable:
            by_role.setdefault(role(group), []).append(group.id)
    return Ties(tuple(tuple(ids) for ids in by_role.values()))


def tie_problem(cost: CostModel, importance: Mapping[int, np.ndarray | torch.Tensor], ties: Ties,
                required: Mapping[int, np.ndarray] | None = None
                ) -> tuple[CostModel, dict[int, np.ndarray], dict[int, np.ndarray] | None]:
    """The selection problem over classes: a cost model whose variable groups are the classes'
    representatives, their importance by rank (see the module doc) and the ranks each must keep
    (the most any of its groups requires). Raises ``ValueError`` when a class mixes sizes or
    holds a group the cost model does not vary."""
    rep = ties.representative()
    for gid in cost.sizes:
        rep.setdefault(gid, gid)
    tied_importance: dict[int, np.ndarray] = {}
    tied_required: dict[int, np.ndarray] | None = {} if required is not None else None
    sizes: dict[int, int] = {}
    for gid, size in cost.sizes.items():
        head = rep[gid]
        if sizes.setdefault(head, size) != size:
            raise ValueError(f"uniform counts: channel groups {head} and {gid} share a role but not a size")
        ranked = -np.sort(-as_scores(importance[gid]))
        tied_importance[head] = tied_importance.get(head, 0.0) + ranked
        if tied_required is not None:
            count = int(np.asarray(required.get(gid, np.zeros(size, bool)), bool).sum())
            mask = np.zeros(size, bool)
            mask[:count] = True
            tied_required[head] = tied_required.get(head, np.zeros(size, bool)) | mask
    missing = [gid for gid in rep if gid not in cost.sizes]
    if missing:
        raise ValueError(f"uniform counts: channel groups {missing} are not variable in the cost model")
    terms = []
    for term in cost.terms:
        dims = []
        for dim in term.dims:
            merged: dict[int, int] = {}
            for gid, entries in dim.parts:
                merged[rep[gid]] = merged.get(rep[gid], 0) + entries
            dims.append(Width(dim.full, tuple(merged.items())))
        terms.append(Term(term.name, tuple(dims), term.fn))
    return (CostModel(cost.kind, cost.unit, terms, sizes, cost.constant), tied_importance, tied_required)


def untie(selection: Selection, importance: Mapping[int, np.ndarray | torch.Tensor], ties: Ties,
          groups: Sequence[int]) -> Selection:
    """``selection`` (over the classes of :func:`tie_problem`) for every group of ``groups``:
    each keeps its own class's count of its most important channels (indices sorted)."""
    rep = ties.representative()
    kept, counts = {}, {}
    for gid in groups:
        count = selection.counts[rep.get(gid, gid)]
        order = np.argsort(-as_scores(importance[gid]), kind="stable")
        kept[gid] = np.sort(order[:count])
        counts[gid] = count
    return Selection(kept, counts, selection.cost, selection.value, selection.rounds)
