"""IEE with structure="channel" under a cost budget (appendix §4 of the IEE paper): Algorithm 1's
stages, knapsack prune over Theta_K and grow over Theta_P, frozen Theta_K, MRU reactivation."""

from __future__ import annotations

import pytest
import torch
from spruce.compiler.api import sparsify
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
    return sparsify(cnn(), X, method="iee", structure="channel", budget={kind: fraction}, total_steps=total,
                    h=H, j=J, q=Q, **kw)


class Loop:
    def __init__(self, sm, seed=0):
        self.sm = sm
        self.gen = torch.Generator().manual_seed(seed)
        self.opt = torch.optim.SGD(sm.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        sm.attach(self.opt)
        sm.train()

    def step(self):
        x = torch.randn(8, 3, 12, 12, generator=self.gen)
        y = torch.randint(0, 10, (8,), generator=self.gen)
        loss = nn.functional.cross_entropy(self.sm(x), y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.sm.step()


def masks(sm):
    return {u.group.id: u.mask.clone() for u in sm.units}


@pytest.mark.parametrize("kind", ["flops", "params"])
def test_channel_stages_follow_algorithm_1_within_the_budget(kind):
    sm = make(kind)
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
        else:  # Knapsack(I(P), R, Omega^t) over Theta_P: K kept, cost back within Psi
            assert record["cost"] <= psi * (1 + 1e-9)
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
    sm = make()
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
