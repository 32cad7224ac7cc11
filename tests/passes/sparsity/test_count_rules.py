"""Count rules (spruce.passes.sparsity.count_rules): a group's kept count moved to the nearest
one a deployment accepts given the other counts (fewer channels first, never below the fewest
allowed, then more), and the kept channels cut or grown by importance."""

from __future__ import annotations

import numpy as np
from spruce.passes.sparsity.count_rules import CountRule, fit_counts, fit_kept

# group 0 (10 channels) must be a multiple of group 1's count (as a LlamaConfig's hidden size
# must be of its head count)
MULTIPLE = CountRule(0, lambda counts: counts[0] % counts[1] == 0, "test: a multiple of group 1")


def test_an_accepted_count_stays():
    assert fit_counts({0: 6, 1: 3}, MULTIPLE, size=10) == {0: 6, 1: 3}


def test_the_nearest_accepted_count_below_comes_first():
    assert fit_counts({0: 7, 1: 3}, MULTIPLE, size=10) == {0: 6, 1: 3}


def test_never_below_the_fewest_allowed_then_more():
    assert fit_counts({0: 5, 1: 3}, MULTIPLE, size=10, least=4) == {0: 6, 1: 3}


def test_counts_stay_multiples_of_round_to_or_the_whole_group():
    assert fit_counts({0: 8, 1: 3}, MULTIPLE, size=12, least=1, round_to=4) == {0: 12, 1: 3}
    assert fit_counts({0: 8, 1: 5}, MULTIPLE, size=10, least=1, round_to=4) == {0: 10, 1: 5}


def test_unchanged_when_no_count_is_accepted():
    never = CountRule(0, lambda counts: False, "test: never")
    assert fit_counts({0: 7, 1: 3}, never, size=10) == {0: 7, 1: 3}


def test_kept_channels_are_cut_to_the_most_important_and_grown_by_the_most_important_left():
    importance = {0: np.array([9.0, 1, 8, 2, 7, 3, 6, 4, 5, 0.5]), 1: np.ones(4)}
    kept = {0: np.array([0, 1, 2, 3, 4, 5, 6]), 1: np.arange(3)}  # 7 of 10 beside 3: 6 stay
    fitted = fit_kept(kept, {0: 10, 1: 4}, MULTIPLE, importance)
    assert fitted[0].tolist() == [0, 2, 3, 4, 5, 6]  # channel 1 (importance 1) went
    grown = fit_kept({0: np.array([0, 2, 4, 6, 8]), 1: np.arange(3)}, {0: 10, 1: 4}, MULTIPLE, importance, least=5)
    assert grown[0].tolist() == [0, 2, 4, 6, 7, 8]  # 5 -> 6: channel 7 (importance 4), the best left
