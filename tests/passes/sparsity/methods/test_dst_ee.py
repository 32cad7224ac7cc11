"""DST-EE (Eq. 1, Algorithm 1): drop by magnitude, grow by |grad| + c·ln t/(N + ε), counters N."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import digits_tensors as digits
from helpers import small_digits_cnn as make_model
from helpers import sparsify

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


def _rigl_grow_set(sm, fraction: float) -> dict[str, torch.Tensor]:
    """What RigL would grow from this state: drop the k smallest active magnitudes, grow the
    k inactive weights with the largest |dense gradient|."""
    grown = {}
    for layer in sm.layers:
        mask = layer.masked.mask
        k = int(fraction * int(mask.sum()))
        weight = layer.module.weight.detach().abs()
        drop = torch.where(mask, -weight, torch.full_like(weight, -math.inf)).reshape(-1)
        dropped = torch.zeros(mask.numel(), dtype=torch.bool)
        dropped[torch.topk(drop, k).indices] = True
        after_drop = mask & ~dropped.reshape(mask.shape)
        grad = layer.masked.dense_grad.abs()
        candidates = torch.where(after_drop, torch.full_like(grad, -math.inf), grad).reshape(-1)
        chosen = torch.zeros(mask.numel(), dtype=torch.bool)
        chosen[torch.topk(candidates, k).indices] = True
        grown[layer.name] = chosen.reshape(mask.shape) & ~mask
    return grown


def _explore(method: str, loss_scale: float, lr: float, steps: int = 100, **options) -> tuple[float, float]:
    """Train the digits CNN at 90 % sparsity; return (R, the fraction of RigL's grow set, from
    the same state at every update, that ``method`` grew too)."""
    x, y = digits()
    # the distribution the 70 % bound was measured with (at the default 'erk_floor' this CNN's
    # middle conv keeps more weights and DST-EE grew 81 % of RigL's grow set)
    sm = sparsify(make_model(), x[:1], method=method, sparsity=0.9, distribution="erk", total_steps=steps,
                  delta_t=DELTA, **options)
    opt = torch.optim.SGD(sm.parameters(), lr=lr, momentum=0.9)
    sm.attach(opt)
    gen = torch.Generator().manual_seed(1)
    shared = rigl_total = 0
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = F.cross_entropy(sm(x[idx]), y[idx]) * loss_scale
        opt.zero_grad()
        loss.backward()
        opt.step()
        update = sm.method.is_update(step)
        if update:
            rigl = _rigl_grow_set(sm, sm.method.drop_fraction(step))
        sm.step()
        if update:
            shared += sum(int((rigl[layer.name] & layer.grown).sum()) for layer in sm.layers)
            rigl_total += sum(int(rigl[layer.name].sum()) for layer in sm.layers)
    ever = [layer.ever_active for layer in sm.layers]
    return sum(int(e.sum()) for e in ever) / sum(e.numel() for e in ever), shared / rigl_total


@pytest.mark.parametrize("loss_scale, lr", [(1.0, 0.05), (100.0, 0.05 / 100)])
def test_exploration_term_changes_the_grow_set_at_the_defaults_whatever_the_loss_scale(loss_scale, lr):
    """Issue 15: with the absolute c = 1e-3 the bonus vanished next to the gradients (the grow
    set was RigL's). c relative to the layer's gradients matters at its default, and scaling
    the loss (with the lr scaled back) changes nothing."""
    rigl_r, rigl_overlap = _explore("rigl", loss_scale, lr)
    assert rigl_overlap == 1.0  # the oracle is RigL's rule
    dst_r, overlap = _explore("dst_ee", loss_scale, lr)
    assert overlap <= 0.70, f"DST-EE grew {overlap:.0%} of RigL's grow set"
    assert dst_r >= rigl_r + 0.05, f"exploration degree R: DST-EE {dst_r:.3f}, RigL {rigl_r:.3f}"


def test_the_absolute_c_keeps_eq_1_verbatim_and_excludes_c_relative():
    from spruce.passes.sparsity.methods.dst_ee import DSTEE, DSTEEConfig

    config = DSTEEConfig(c=1e-3)
    assert config.absolute and DSTEE(config).coefficient(torch.full((3,), 100.0)) == 1e-3
    relative = DSTEE(DSTEEConfig(c_relative=2.0))
    assert not relative.config.absolute
    assert relative.coefficient(torch.tensor([3.0, -4.0])) == pytest.approx(2.0 * math.sqrt(12.5))  # 2 x RMS
    assert relative.coefficient(torch.zeros(4)) == 2.0  # no gradient: the bonus alone orders the candidates
    with pytest.raises(ValueError, match="not both"):
        DSTEEConfig(c=1e-3, c_relative=1.0)


@pytest.mark.parametrize("options, message", [
    ({"c": -1.0}, "dst_ee: c must be >= 0"),
    ({"eps": 0.0}, "dst_ee: eps must be > 0"),
    ({"c": float("nan")}, "dst_ee: c must be a finite number"),
    ({"c_relative": -1.0}, "dst_ee: c_relative must be >= 0"),
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
