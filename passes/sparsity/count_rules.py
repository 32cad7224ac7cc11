"""Count rules: a constraint a deployment puts on one channel group's kept count, given the
counts of the others, and how a selection is moved to meet it.

The knapsack (:func:`~spruce.passes.sparsity.knapsack.select_channels`) chooses each group's
count on its own. Some deployments accept only certain combinations: a stock transformers
``LlamaConfig`` takes a residual width only as a multiple of its attention-head count, so a
hidden width of 23 beside 2 kept heads cannot be written back. A :class:`CountRule` names the
group to move and a predicate over all the counts; :func:`fit_counts` moves that group to the
nearest count the predicate accepts (fewer channels first, never below the fewest allowed,
then more), and :func:`fit_selection` / :func:`fit_kept` do the same to a selection's kept
channels (the least important go first; added ones are the most important left).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from .knapsack import CostModel, Selection, as_scores

__all__ = ["CountRule", "fit_counts", "fit_kept", "fit_selection"]


@dataclass(frozen=True)
class CountRule:
    """Group ``group``'s kept count must be one that ``holds(counts)`` accepts, where ``counts``
    maps every group id of the selection to its kept count (groups left whole at their size).
    ``reason`` says who asks, for messages (e.g. ``LlamaConfig: hidden_size % num_attention_heads``)."""

    group: int
    holds: Callable[[Mapping[int, int]], bool]
    reason: str

    def least(self, required: Mapping[int, np.ndarray] | None) -> int:
        """The fewest channels the rule's group may keep: the count ``required`` of it (a bool
        mask per group), 1 when nothing is required of it."""
        if not required or self.group not in required:
            return 1
        return int(np.asarray(required[self.group], bool).sum())


def fit_counts(counts: Mapping[int, int], rule: CountRule, size: int, least: int = 1,
               round_to: int = 1) -> dict[int, int]:
    """``counts`` with ``rule.group``'s count moved to the nearest one ``rule.holds`` accepts
    among the multiples of ``round_to`` (and ``size``, the group's channel count): the count
    itself if accepted, else fewer channels down to ``least``, else more up to ``size``.
    Unchanged when none is accepted (the deployment then refuses for a reason this group
    cannot fix) or the group is not in ``counts``."""
    if rule.group not in counts:
        return dict(counts)
    count = int(counts[rule.group])
    trial = dict(counts)
    for candidate in (*range(count, max(least, 1) - 1, -1), *range(count + 1, size + 1)):
        if candidate != count and candidate % round_to and candidate != size:
            continue
        trial[rule.group] = candidate
        if rule.holds(trial):
            return trial
    return dict(counts)


def _resized(kept: np.ndarray, count: int, scores: np.ndarray) -> np.ndarray:
    """``kept`` (channel indices) cut to its ``count`` most important, or grown by the most
    important channels it lacks; sorted."""
    kept = np.asarray(kept, dtype=np.int64)
    if count <= kept.size:
        return np.sort(kept[np.argsort(-scores[kept], kind="stable")[:count]])
    rest = np.setdiff1d(np.arange(scores.size), kept)
    extra = rest[np.argsort(-scores[rest], kind="stable")[:count - kept.size]]
    return np.sort(np.concatenate([kept, extra]))


def fit_kept(kept: Mapping[int, np.ndarray], sizes: Mapping[int, int], rule: CountRule,
             importance: Mapping[int, np.ndarray | torch.Tensor], least: int = 1,
             round_to: int = 1) -> dict[int, np.ndarray]:
    """Kept channel indices per group (groups absent keep all ``sizes[g]`` channels) with
    ``rule.group`` resized as :func:`fit_counts` says, by ``importance`` (one score per channel)."""
    counts = {g: (len(kept[g]) if g in kept else size) for g, size in sizes.items()}
    fitted = fit_counts(counts, rule, sizes.get(rule.group, 0), least, round_to)
    out = dict(kept)
    gid = rule.group
    if gid in sizes and fitted[gid] != counts[gid]:
        current = kept[gid] if gid in kept else np.arange(sizes[gid])
        resized = _resized(current, fitted[gid], as_scores(importance[gid]))
        if resized.size == sizes[gid]:
            out.pop(gid, None)
        else:
            out[gid] = resized
    return out


def fit_selection(selection: Selection, rule: CountRule, importance: Mapping[int, np.ndarray | torch.Tensor],
                  cost: CostModel, least: int = 1, round_to: int = 1) -> Selection:
    """``selection`` (every variable group of ``cost`` in its counts) with ``rule.group`` resized
    as :func:`fit_counts` says, by ``importance``; its cost recomputed by ``cost`` (value: the
    kept importance, unchanged groups as chosen)."""
    gid = rule.group
    fitted = fit_counts(selection.counts, rule, cost.sizes.get(gid, 0), least, round_to)
    if fitted == selection.counts:
        return selection
    scores = as_scores(importance[gid])
    kept = dict(selection.kept)
    kept[gid] = _resized(selection.kept[gid], fitted[gid], scores)
    value = selection.value - float(scores[selection.kept[gid]].sum()) + float(scores[kept[gid]].sum())
    return Selection(kept, fitted, cost.cost(fitted), value, selection.rounds)
