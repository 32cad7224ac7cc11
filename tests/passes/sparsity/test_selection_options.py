"""Channel selection on a trained model's magnitudes: importance made comparable across
groups, and a minimum kept fraction per group (#14: a knapsack on raw L1 emptied CRAFT's
full-resolution VGG layers to 8 channels, and its boxes to none)."""

from __future__ import annotations

import numpy as np
import pytest
from spruce.passes.export import remove_channels
from spruce.passes.sparsity.knapsack import (
    build_cost_model,
    minimum_cost,
    minimum_kept,
    normalise_importance,
    select_channels,
)


def test_group_mean_normalisation_makes_every_group_average_one():
    importance = {0: np.array([1.0, 3.0]), 1: np.array([100.0, 300.0, 200.0]), 2: np.zeros(4)}
    normalised = normalise_importance(importance, "group_mean")
    assert normalised[0].tolist() == [0.5, 1.5]
    assert normalised[1].tolist() == [0.5, 1.5, 1.0]
    assert normalised[2].tolist() == [0.0] * 4  # all-zero scores stay zero (no division by zero)
    assert normalise_importance(importance, "none")[1].tolist() == [100.0, 300.0, 200.0]
    with pytest.raises(ValueError, match="unknown importance normalisation 'max'"):
        normalise_importance(importance, "max")


def test_minimum_kept_requires_the_most_important_fraction_rounded_up():
    scores = np.arange(64, dtype=float)[::-1]  # channel 0 most important
    required = minimum_kept({0: scores, 1: np.ones(5)}, 0.3, round_to=8)
    assert required[0].sum() == 24 and required[0][:24].all()  # ceil(0.3 * 64 / 8) * 8
    assert required[1].sum() == 5  # a group smaller than round_to is kept whole
    assert minimum_kept({0: scores}, 0.0)[0].sum() == 0
    for bad in (-0.1, 1.5, True):
        with pytest.raises(ValueError, match="minimum kept fraction"):
            minimum_kept({0: scores}, bad)


def test_minimum_kept_among_candidates_requires_only_candidates():
    """A re-aim over a method's kept channels (``meet_budget``, HALP's pruning steps): the floor is
    the most important *kept* channels, all of them when fewer than the fraction are kept."""
    scores = np.arange(16, dtype=float)[::-1]  # channel 0 most important
    kept = np.zeros(16, bool)
    kept[[1, 3, 5, 7, 9, 11]] = True
    required = minimum_kept({0: scores, 1: scores}, 0.25, candidates={0: kept, 1: kept[:16] & (np.arange(16) < 4)})
    assert np.flatnonzero(required[0]).tolist() == [1, 3, 5, 7]  # 4 of 16, the most important kept
    assert np.flatnonzero(required[1]).tolist() == [1, 3]  # only two kept: both


def test_the_floor_keeps_every_group_and_the_budget_is_still_met(resnet18):
    model, x, analysis, importance = resnet18
    cost = build_cost_model("flops", model, analysis)
    budget = 0.3 * cost.dense()
    raw = select_channels(cost, importance, budget, round_to=8)
    assert min(count / cost.sizes[g] for g, count in raw.counts.items()) < 0.25  # raw L1 empties some group

    normalised = normalise_importance(importance)
    required = minimum_kept(normalised, 0.25, round_to=8)
    floored = select_channels(cost, normalised, budget, round_to=8, required=required)
    for gid, count in floored.counts.items():
        assert count >= 0.25 * cost.sizes[gid]
        assert set(np.flatnonzero(required[gid])) <= set(floored.kept[gid].tolist())
    compact = remove_channels(analysis, model, floored.kept)
    assert compact(x).shape == (1, 10)
    assert floored.cost <= budget
    assert minimum_cost(cost, 8, required=required) > minimum_cost(cost, 8)
