"""The one-shot prune API: options, importance registry, bad input."""

import math
import warnings

import numpy as np
import pytest
import spruce
import torch
import torch.nn as nn
import torchvision
from helpers import randomize, relative_error
from spruce.passes.export import ModeSwitch
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


# ---- #13 kind 4: a compact model that cannot run is never returned ------------------------


class Blur(nn.Module):
    """A depthwise filter whose group count is a literal in the call (issue #11: rewritten)."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.filt = nn.Parameter(torch.rand(channels, 1, 3, 3))

    def forward(self, x):
        return nn.functional.conv2d(x, self.filt, padding=1, groups=self.channels)


def blur_net(width: int = 8):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), Blur(8), nn.ReLU(),
                         nn.Conv2d(8, 4, 3, padding=1))


def narrowed_blur_net() -> nn.Module:
    """What a compact blur_net would be had its literal group count not been rewritten."""
    model = blur_net(width=4)
    model[2].filt = nn.Parameter(torch.rand(4, 1, 3, 3))
    model[4] = nn.Conv2d(4, 4, 3, padding=1)
    return model


def test_a_literal_group_count_is_rewritten():
    """prune() returned a compact model that crashed on its first call (groups=8, 4 channels
    left, #13 kind 4); the literal is now rewritten to the kept count (#11)."""
    result = spruce.prune(blur_net(), X, ratio=0.5)
    assert result.kept
    conv = next(n for n in result.model.graph.nodes if n.target is nn.functional.conv2d)
    assert conv.kwargs["groups"] == 4
    with torch.no_grad():
        assert relative_error(result.masked(X), result.model(X)) < 1e-5


def test_a_compact_model_that_cannot_run_is_an_error_naming_the_node():
    from spruce.passes.export import check_runs
    from torch import fx

    with pytest.raises(spruce.CompactModelError) as info:
        check_runs(fx.symbolic_trace(narrowed_blur_net()), (X,), blur_net(), "pruned model")
    message = str(info.value)
    assert "node 'conv2d' (function conv2d(padding=1, groups=8))" in message
    assert "Given groups=8" in message and "ignore=[...]" in message
    assert info.value.node == "conv2d" and info.value.mode == "eval"
    check_runs(fx.symbolic_trace(blur_net()), (X,), blur_net())  # one that runs passes


def test_the_run_check_changes_nothing():
    """The compact model is run once: no BatchNorm statistic, module mode or RNG state moves,
    in either model (a SparseModel's layers are shared with its source, in their own modes)."""
    from spruce.passes.export import check_runs

    class Branching(nn.Module):  # code that differs in training mode: the compact model is a ModeSwitch
        def __init__(self):
            super().__init__()
            self.net = small_cnn()
            self.drop = nn.Dropout(0.5)  # draws random numbers in training mode

        def forward(self, x):
            y = self.net(x)
            return self.drop(y) if self.training else y

    model = Branching().train()
    result = spruce.prune(model, X, ratio=0.5)
    assert isinstance(result.model, ModeSwitch)  # run in train mode too: BatchNorm statistics would move
    for m in (model, result.model):
        m.train()
        m.get_submodule("net.1" if m is model else "eval_graph.net.1").eval()  # mixed modes must survive
    modes = [[m.training for m in net.modules()] for net in (model, result.model)]
    states = [{k: v.clone() for k, v in net.state_dict().items()} for net in (model, result.model)]
    rng = torch.get_rng_state()
    check_runs(result.model, (X,), model)
    assert torch.equal(torch.get_rng_state(), rng)
    for net, mode, state in zip((model, result.model), modes, states):
        assert [m.training for m in net.modules()] == mode
        for key, value in net.state_dict().items():
            assert torch.equal(value, state[key]), key


def test_a_training_mode_only_failure_is_caught():
    """A ModeSwitch (code that branches on self.training) is run in both modes."""
    from spruce.passes.export import check_runs
    from torch import fx

    class Aux(nn.Module):
        def __init__(self, width: int = 8):
            super().__init__()
            self.a = nn.Conv2d(3, width, 3, padding=1)
            self.blur = Blur(8)
            self.b = nn.Conv2d(width, 4, 1)

        def forward(self, x):
            y = torch.relu(self.a(x))
            if self.training:
                y = self.blur(y)
            return self.b(y)

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    result = spruce.prune(Aux().eval(), x, ratio=0.5)  # the literal is rewritten in the training graph
    assert isinstance(result.model, ModeSwitch)
    for mode in (False, True):
        with torch.no_grad():
            assert relative_error(result.masked.train(mode)(x), result.model.train(mode)(x)) < 1e-5
    narrow = Aux(width=4)
    narrow.blur.filt = nn.Parameter(torch.rand(4, 1, 3, 3))
    switch = ModeSwitch(fx.symbolic_trace(narrow.eval()), fx.symbolic_trace(narrow.train()))
    with pytest.raises(spruce.CompactModelError, match="in train mode") as info:
        check_runs(switch, (x,), Aux().eval())
    assert info.value.mode == "train"


# ---- #13 kind 5: round_to larger than a group -------------------------------------------------


def test_round_to_that_leaves_groups_whole_is_named_in_a_warning():
    """round_to=32 on 16- and 24-channel groups silently pruned nothing."""
    with pytest.warns(UserWarning, match=r"round_to=32 leaves 2 group\(s\) unpruned.*0.weight dim 0, 16 channels"
                                         r".*3.weight dim 0, 24 channels"):
        result = spruce.prune(small_cnn(), X, ratio=0.5, round_to=32)
    assert result.kept == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert spruce.prune(small_cnn(), X, ratio=0.5, round_to=8).kept  # 8 fits both: no warning


def test_prune_pauses_the_garbage_collector_and_restores_it():
    """The collector is off while the graphs are built and checked (the compact model's check
    runs this module's forward), and as it was afterwards, whichever way it was."""
    import gc

    seen = []

    class Spy(nn.Module):
        def forward(self, x):
            seen.append(gc.isenabled())
            return x

    model = nn.Sequential(nn.Conv2d(3, 8, 3), Spy(), nn.Conv2d(8, 4, 3)).eval()
    x = torch.randn(1, 3, 8, 8)
    assert gc.isenabled()
    spruce.prune(model, x, ratio=0.5)
    assert gc.isenabled() and seen and not any(seen)
    gc.disable()
    try:
        spruce.prune(model, x, ratio=0.5)
        assert not gc.isenabled()
    finally:
        gc.enable()
