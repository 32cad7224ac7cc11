"""DST-EE (Eq. 1, Algorithm 1): drop by magnitude, grow by |grad| + c·ln t/(N + ε), counters N."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import digits_tensors as digits
from helpers import small_digits_cnn as make_model
from spruce import sparsify

STEPS, DELTA = 60, 5



def test_scores_counters_sparsity_and_growth_follow_the_paper():
    x, y = digits()
    sm = sparsify(make_model(), x[:1], method="dst_ee", sparsity=0.9, total_steps=STEPS, delta_t=DELTA, c=5e-3)
    method = sm.method
    opt = torch.optim.SGD(sm.parameters(), lr=0.05, momentum=0.9)
    sm.attach(opt)
    for layer in sm.layers:  # N ← M at the start
        assert torch.equal(method.counters[layer.name], layer.masked.mask.to(torch.int32))
    ever = {layer.name: layer.masked.mask.clone() for layer in sm.layers}
    targets = {layer.name: int(layer.masked.mask.sum()) for layer in sm.layers}
    gen = torch.Generator().manual_seed(1)
    updates = 0
    for step in range(1, STEPS + 1):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = F.cross_entropy(sm(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if method.is_update(step):
            updates += 1
            before = {layer.name: layer.masked.mask.clone() for layer in sm.layers}
            counts = {name: c.clone() for name, c in method.counters.items()}
            grads = {layer.name: layer.masked.dense_grad.clone() for layer in sm.layers}
            weights = {layer.name: layer.module.weight.detach().clone() for layer in sm.layers}
            fraction = method.drop_fraction(step)
        sm.step()
        if not method.is_update(step):
            continue
        for layer in sm.layers:
            name, mask = layer.name, layer.masked.mask
            assert int(mask.sum()) == targets[name]  # sparsity on target after every update
            # the exact drop and grow of Algorithm 1, recomputed from Eq. 1
            k = int(fraction * targets[name])
            magnitude = torch.where(before[name], weights[name].abs(), torch.full_like(weights[name], math.inf))
            dropped = torch.zeros_like(mask).reshape(-1)
            dropped[torch.topk(-magnitude.reshape(-1), k).indices] = True
            after_drop = before[name] & ~dropped.reshape(mask.shape)
            score = grads[name].abs() + 5e-3 * math.log(step) / (counts[name].float() + 1.0)
            candidates = torch.where(after_drop, torch.full_like(score, -math.inf), score).reshape(-1)
            expected_grown = torch.zeros_like(mask).reshape(-1)
            expected_grown[torch.topk(candidates, k).indices] = True
            assert torch.equal(mask, after_drop | expected_grown.reshape(mask.shape)), name
            newly = mask & ~before[name]
            assert bool((layer.module.weight.detach()[newly] == 0).all())  # grown weights start at zero
            assert torch.equal(method.counters[name], counts[name] + mask.to(torch.int32))  # N ← N + M
            ever[name] |= mask
    assert updates == len([s for s in range(1, STEPS + 1) if s % DELTA == 0 and s < 0.75 * STEPS])
    last = sm.metrics[-1]["exploration"]
    for layer in sm.layers:  # exploration degree R = fraction of weights ever active
        assert last[layer.name] == pytest.approx(float(ever[layer.name].float().mean()))


def test_exploration_coefficient_raises_coverage():
    x, y = digits()
    coverage = {}
    for c in (0.0, 1.0):
        sm = sparsify(make_model(), x[:1], method="dst_ee", sparsity=0.95, total_steps=STEPS, delta_t=DELTA, c=c)
        opt = torch.optim.SGD(sm.parameters(), lr=0.05)
        sm.attach(opt)
        gen = torch.Generator().manual_seed(2)
        for _ in range(STEPS):
            idx = torch.randint(0, len(x), (64,), generator=gen)
            loss = F.cross_entropy(sm(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sm.step()
        coverage[c] = sum(sm.metrics[-1]["exploration"].values())
    assert coverage[1.0] > coverage[0.0]  # the paper's Fig. 3: larger c, higher exploration degree


@pytest.mark.parametrize("options, message", [
    ({"c": -1.0}, "dst_ee: c must be >= 0"),
    ({"eps": 0.0}, "dst_ee: eps must be > 0"),
    ({"c": float("nan")}, "dst_ee: c must be a finite number"),
    ({"delta_t": 0}, "dst_ee: delta_t must be >= 1"),
])
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        sparsify(make_model(), torch.randn(1, 1, 8, 8), method="dst_ee", sparsity=0.9, total_steps=10, **options)


def test_unsupported_structure_and_missing_total_steps():
    with pytest.raises(ValueError, match="dst_ee"):
        sparsify(make_model(), torch.randn(1, 1, 8, 8), method="dst_ee", structure="2:4", total_steps=10)
    with pytest.raises(ValueError, match="total_steps"):
        sparsify(make_model(), torch.randn(1, 1, 8, 8), method="dst_ee", sparsity=0.9)
