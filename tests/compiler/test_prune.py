"""The one-shot prune API: options, importance registry, bad input."""

import math

import numpy as np
import pytest
import spruce
import torch
import torch.nn as nn
import torchvision
from helpers import randomize, relative_error
from spruce.passes.importance import IMPORTANCE


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10),
    )


X = torch.randn(2, 3, 8, 8)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan"), "0.5", True])
def test_bad_ratio_is_a_value_error(ratio):
    with pytest.raises(ValueError, match=r"prune: ratio must be"):
        spruce.prune(small_cnn(), X, ratio=ratio)


def test_unknown_importance_lists_valid_values():
    with pytest.raises(ValueError) as info:
        spruce.prune(small_cnn(), X, importance="magic")
    for name in ("l1", "l2", "random", "bn_scale"):
        assert name in str(info.value)


def test_registry_has_the_criteria():
    assert {"l1", "l2", "random", "bn_scale"} <= set(IMPORTANCE)


@pytest.mark.parametrize("importance", ["l1", "l2", "random", "bn_scale"])
def test_every_criterion_gives_an_equivalent_model(importance):
    model = randomize(small_cnn()).eval()
    result = spruce.prune(model, X, ratio=0.5, importance=importance)
    assert relative_error(result.masked(X), result.model(X)) <= 1e-5
    sizes = sorted(len(k) for k in result.kept.values())
    assert sizes == [8, 12]


def test_l1_keeps_the_largest_channels():
    model = randomize(small_cnn()).eval()
    with torch.no_grad():
        model[0].weight[[1, 5, 9]] *= 100  # make three channels clearly dominant
    result = spruce.prune(model, X, ratio=0.75, importance="l1")
    group = next(g for g in result.groups if any(m.name == "0.weight" and m.dim == 0 for m in g.members))
    assert set(result.kept[group.id]) >= {1, 5, 9}


def test_bn_scale_follows_gamma():
    model = randomize(small_cnn()).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.arange(16, dtype=torch.float32))
    result = spruce.prune(model, X, ratio=0.5, importance="bn_scale")
    group = next(g for g in result.groups if any(m.name == "1.weight" for m in g.members))
    np.testing.assert_array_equal(result.kept[group.id], np.arange(8, 16))


def test_round_to_rounds_kept_widths_up():
    model = randomize(small_cnn()).eval()
    result = spruce.prune(model, X, ratio=0.7, round_to=8)
    for gid, kept in result.kept.items():
        size = result.groups[gid].size
        assert len(kept) % 8 == 0 or len(kept) == size
        assert len(kept) >= math.ceil(0.3 * size)
    with pytest.raises(ValueError, match="round_to"):
        spruce.prune(model, X, round_to=0)


def test_ignore_keeps_named_layers_whole():
    model = randomize(small_cnn()).eval()
    result = spruce.prune(model, X, ratio=0.5, ignore=["3"])
    assert result.model.get_submodule("3").out_channels == 24
    assert result.model.get_submodule("0").out_channels == 8
    result = spruce.prune(model, X, ratio=0.5, ignore=[nn.BatchNorm2d])
    assert result.kept == {}


def test_nan_weights_give_a_clear_error():
    model = randomize(small_cnn()).eval()
    with torch.no_grad():
        model[3].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN") as info:
        spruce.prune(model, X, ratio=0.5)
    assert "3.weight" in str(info.value) or "4." in str(info.value)


def test_original_model_is_not_modified():
    model = randomize(torchvision.models.resnet18()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spruce.prune(model, torch.randn(1, 3, 64, 64), ratio=0.5)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_compact_model_survives_save_and_load(tmp_path):
    model = randomize(small_cnn()).eval()
    result = spruce.prune(model, X, ratio=0.5)
    torch.save(result.model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert torch.equal(loaded(X), result.model(X))
