"""IEE with structure="channel" under a cost budget (appendix §4 of the IEE paper): Algorithm 1's
stages, knapsack prune over Theta_K and grow over Theta_P, frozen Theta_K, MRU reactivation."""

from __future__ import annotations

import pytest
import torch
from helpers import SGDLoop, resume_run, save_run, sparsify
from torch import nn


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
        nn.Conv2d(24, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


X = torch.randn(2, 3, 12, 12)
H, J, Q = 3, 2, 2  # period 7


def make(kind="flops", fraction=0.5, total=70, **kw):
    phases = {"h": H, "j": J, "q": Q, **kw}
    return sparsify(cnn(), X, method="iee", structure="channel", budget={kind: fraction}, total_steps=total,
                    **phases)


def Loop(sm, seed=0):  # noqa: N802 - reads as the class it builds
    """A real SGD loop on random batches of (8, 3, 12, 12) with 10 classes (tests/helpers.py)."""
    return SGDLoop(sm, (8, 3, 12, 12), 10, seed, train=True)


def masks(sm):
    return {u.group.id: u.mask.clone() for u in sm.units}


@pytest.mark.parametrize("kind", ["flops", "params"])
def test_channel_stages_follow_algorithm_1_within_the_budget(kind):
    sm = make(kind, end_fraction=0.75)  # the unstructured horizon, for many cycles
    iee, engine = sm.method, sm.method.channels
    psi = engine.costs.target
    assert engine.active_cost() <= psi and engine.history[0]["stage"] == "init"
    loop = Loop(sm)
    stages = {}
    for _ in range(70):
        stage = iee.stage(sm.step_count + 1)
        before = masks(sm)
        active_before = {g: m.clone() for g, m in engine.active.items()}
        loop.step()
        if stage is None:
            assert all(torch.equal(before[g], m) for g, m in masks(sm).items())  # masks only change at stages
            continue
        stages[sm.step_count] = stage
        record = engine.history[-1]
        assert record["stage"] == stage and record["cost"] <= record["budget"] * (1 + 1e-9)
        if stage == "prune":  # Knapsack(I(K), R, Psi - Omega^t) over Theta_K
            assert record["budget"] == pytest.approx(psi - iee.omega_cost)
            for g, m in engine.active.items():
                assert not bool((m & ~active_before[g]).any())
        elif stage == "explore":  # every pruned channel reactivated
            assert all(bool(u.mask.all()) for u in sm.units)
        else:  # Knapsack over Theta_P: K kept, grown back up to Psi (R(Theta_K) = Psi after every step)
            assert record["budget"] == pytest.approx(psi) and record["cost"] <= psi * (1 + 1e-9)
            assert record["cost"] >= engine.history[-3]["cost"]  # at least what the prune kept
            for g, m in engine.active.items():
                assert not bool((active_before[g] & ~m).any())
                assert torch.equal(m, sm.units[[u.group.id for u in sm.units].index(g)].mask)
    assert [s for s, v in stages.items() if v == "prune"] == [2, 9, 16, 23, 30, 37, 44]
    assert [s for s, v in stages.items() if v == "explore"][:2] == [4, 11]
    assert [s for s, v in stages.items() if v == "grow"][:2] == [6, 13]
    assert max(s for s, v in stages.items() if v == "grow") == 48
    assert len(sm.metrics) == 7
    assert engine.active_cost() <= psi


def test_theta_k_is_frozen_bitwise_and_theta_p_restarts_from_its_mru_values():
    sm = make(freeze="weights", end_fraction=0.75)  # the rule before issue 15: the active entries of Theta_K
    iee, engine = sm.method, sm.method.channels
    loop = Loop(sm)
    model = sm.context.source
    conv = model[3]  # consumes group of layer 0, produces the next group
    while iee.stage(sm.step_count + 1) != "prune":
        loop.step()
    before_prune = conv.weight.detach().clone()
    loop.step()  # prune
    pruned_entries = ~sm.layers[1].masked.mask & (before_prune != 0)
    assert pruned_entries.any()
    while iee.stage(sm.step_count + 1) != "explore":
        loop.step()
    mru = {name: value.clone() for name, value in engine.mru.items()}
    loop.step()  # explore: Theta_P back with its most recently used values
    assert torch.equal(conv.weight[pruned_entries], mru["3"][pruned_entries])
    frozen = {name: p.detach().clone() for name, p in model.named_parameters()}
    entries = engine.frozen_entries
    assert any(name.endswith("bias") for name in entries)  # BatchNorm beta of Theta_K too
    changed_p = False
    while iee.stage(sm.step_count + 1) != "grow":
        loop.step()
        params = dict(model.named_parameters())
        for name, alive in entries.items():
            assert torch.equal(params[name][alive], frozen[name][alive]), name
            changed_p |= not torch.equal(params[name][~alive], frozen[name][~alive])
    assert changed_p  # Theta_P trains while Theta_K is frozen


def test_compact_model_equals_the_masked_model_after_training():
    sm = make(fraction=0.4, total=40)
    loop = Loop(sm)
    for _ in range(40):
        loop.step()
    sm.eval()
    compact = sm.compact().eval()
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        assert torch.allclose(compact(x), sm(x), atol=1e-5, rtol=1e-5)
    assert sm.method.channels.costs.current(sm.context) <= 0.4 * sm.method.channels.costs.dense


def test_round_to_and_bad_options():
    sm = make(round_to=8)
    assert all(int(u.mask.sum()) % 8 == 0 or bool(u.mask.all()) for u in sm.units)
    with pytest.raises(ValueError, match="needs a budget"):
        sparsify(cnn(), X, method="iee", structure="channel", total_steps=70, h=H, j=J, q=Q)
    with pytest.raises(ValueError, match="use structure='channel'"):
        sparsify(cnn(), X, method="iee", budget={"flops": 0.5}, total_steps=70, h=H, j=J, q=Q)
    with pytest.raises(ValueError, match="channel_criterion"):
        make(channel_criterion="psychic")
    with pytest.raises(ValueError, match="smallest reachable params"):
        make("params", 1e-5)


def test_theta_k_is_frozen_whole_with_running_stats_and_momentum():
    """freeze="structure" (the default): during Reactivate & Explore every parameter, buffer and
    momentum entry outside the reactivated channels stays bitwise; the pruned channels train."""
    sm = make()
    iee, engine = sm.method, sm.method.channels
    loop = Loop(sm)
    model = sm.context.source
    while iee.stage(sm.step_count + 1) != "explore":
        loop.step()
    loop.step()
    explorable = engine.explorable()
    assert {"1.running_mean", "1.weight", "1.bias"} <= set(explorable)  # pruned BN channels reactivated

    def state():
        values = {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}
        values.update({f"momentum {n}": loop.opt.state[p]["momentum_buffer"].clone()
                       for n, p in model.named_parameters()})
        return values

    frozen = state()
    p_trains = set()
    while iee.stage(sm.step_count + 1) != "grow":
        loop.step()
        now = state()
        for name, value in frozen.items():
            p = explorable.get(name.removeprefix("momentum "))
            keep = torch.ones_like(value, dtype=torch.bool) if p is None else ~p
            assert torch.equal(now[name][keep], value[keep]), name
            if p is not None and not torch.equal(now[name][p], value[p]):
                p_trains.add(name)
    assert {"1.weight", "1.running_mean", "3.weight"} <= p_trains


def test_channel_updates_end_early_as_halp_by_default():
    """The paper ends structured updates at epoch 5 of 130 (HALP's scheduler), not at 3/4."""
    total = 700
    sm = make(total=total, j=3, q=3)  # H = J = Q = 3 (period 9), horizon 700 * 5 / 130 = 26.9 steps: 2 cycles
    iee = sm.method
    assert iee.horizon() == pytest.approx(total * 5 / 130)
    loop = Loop(sm)
    changes = []
    for _ in range(60):
        before = masks(sm)
        loop.step()
        if any(not torch.equal(before[g], m) for g, m in masks(sm).items()):
            changes.append(sm.step_count)
    assert len(sm.metrics) == 2 and max(changes) <= total * 5 / 130
    assert [r["stage"] for r in iee.channels.history].count("grow") == 2
    # configurable; unstructured IEE keeps 3/4
    assert make(total=total, end_fraction=0.5).method.horizon() == 350
    from spruce.passes.sparsity.method import RunLength
    from spruce.passes.sparsity.methods.iee import IEEConfig

    channel = IEEConfig().for_run(RunLength(total_steps=13000, steps_per_epoch=100, structure="channel"))
    unstructured = IEEConfig().for_run(RunLength(total_steps=13000, steps_per_epoch=100, structure="unstructured"))
    assert (channel.h, channel.j, channel.q) == (55, 55, 55)  # 3 cycles in 500 steps (5 of 130 epochs)
    assert unstructured.h == 13000 // 12


def test_a_run_resumed_inside_reactivate_explore_equals_the_uninterrupted_one(tmp_path):
    def tensors(sm):
        model = sm.context.source
        return dict([*model.named_parameters(), *model.named_buffers()])

    whole = make(total=30, end_fraction=0.75)
    loop = Loop(whole, seed=9)
    for _ in range(30):
        loop.step()
    first = make(total=30, end_fraction=0.75)
    loop1 = Loop(first, seed=9)
    for _ in range(5):  # explore starts after step 4: step 5 is inside Reactivate & Explore
        loop1.step()
    assert first.method.exploring and first.method.freezer is not None
    save_run(tmp_path / "c.pt", first, loop1)
    second = make(total=30, end_fraction=0.75)
    loop2 = resume_run(tmp_path / "c.pt", second, Loop)
    for _ in range(25):
        loop2.step()
    expected, got = tensors(whole), tensors(second)
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        assert torch.equal(value, got[name]), name


def test_the_prune_stops_at_the_smallest_reachable_cost():
    # omega0=1: Psi - Omega^t is 0, below every channel configuration; the prune used to raise
    # InfeasibleBudget at its first step, mid-training (issue 30's latency 0.5 on an 8x8 CNN, where
    # the smallest configuration costs 0.37 of dense, reached it with the default omega0=0.3)
    sm = make(omega0=1.0, decay="constant", total=14, end_fraction=1.0)
    engine = sm.method.channels
    loop = Loop(sm)
    for _ in range(14):
        loop.step()
    prunes = [r for r in engine.history if r["stage"] == "prune"]
    assert prunes and all(r["budget"] >= engine.costs.floor() > 0 for r in prunes)
    assert all(r["cost"] <= r["budget"] * (1 + 1e-9) for r in prunes)
    assert engine.active_cost() <= engine.costs.target * (1 + 1e-9)
