"""halp: iterative knapsack pruning to a cost budget with Taylor-BN importance, on a real training loop."""

from __future__ import annotations

import pytest
import torch
from helpers import profile, sparsify
from spruce.passes.sparsity.knapsack import InfeasibleBudget
from torch import nn


def cnn(width=1):
    torch.manual_seed(0)
    a, b = 24 * width, 32 * width
    return nn.Sequential(
        nn.Conv2d(3, a, 3, padding=1), nn.BatchNorm2d(a), nn.ReLU(),
        nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU(),
        nn.Conv2d(b, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(b, 10),
    )


X = torch.randn(2, 3, 12, 12)


def train(sm, steps, check=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(sm.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    sm.attach(opt)
    sm.train()
    for _ in range(steps):
        x = torch.randn(8, 3, 12, 12, generator=gen)
        y = torch.randint(0, 10, (8,), generator=gen)
        loss = nn.functional.cross_entropy(sm(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sm.step()
        if check is not None:
            check(sm)


@pytest.mark.parametrize("kind", ["flops", "params"])
def test_halp_prunes_along_the_budget_schedule_and_never_regrows(kind):
    sm = sparsify(cnn(), X, method="halp", structure="channel", budget={kind: 0.4}, total_steps=40,
                  interval=5, end_fraction=0.75)
    halp = sm.method
    assert halp.n_prunes == 6
    budgets = [halp.budget_after(s) for s in range(halp.n_prunes + 1)]
    assert budgets[0] == pytest.approx(halp.costs.dense) and budgets[-1] == pytest.approx(0.4 * halp.costs.dense)
    assert all(a > b for a, b in zip(budgets, budgets[1:]))
    previous = {u.group.id: u.mask.clone() for u in sm.units}

    def check(sm):
        cost = halp.costs.current(sm.context)
        assert cost <= halp.budget_after(halp.prunes_done) * (1 + 1e-9)
        for unit in sm.units:  # pruned channels never come back
            assert not bool((unit.mask & ~previous[unit.group.id]).any())
            previous[unit.group.id] = unit.mask.clone()
        for layer in sm.layers:  # masked channels really are zero
            assert torch.all(layer.module.weight[~layer.masked.mask] == 0)

    train(sm, 40, check)
    assert halp.prunes_done == 6 and len(halp.history) == 6
    assert halp.costs.current(sm.context) <= 0.4 * halp.costs.dense
    assert halp.costs.current(sm.context) >= 0.3 * halp.costs.dense  # the budget is used
    sm.eval()
    compact = sm.compact().eval()
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        assert torch.allclose(compact(x), sm(x), atol=1e-5, rtol=1e-5)


def test_every_group_keeps_min_keep_of_its_channels():
    """The floor compile puts under its selections (a quarter of every group by default): without
    it the knapsack empties the group whose channels it finds cheapest (4 or 7 of 32 here)."""
    counts = {}
    for min_keep in (0.0, 0.25):
        sm = sparsify(cnn(), X, method="halp", structure="channel", budget={"flops": 0.25}, total_steps=20,
                      interval=5, end_fraction=0.75, min_keep=min_keep)
        train(sm, 20)
        counts[min_keep] = [(int(u.mask.sum()), u.group.size) for u in sm.units]
    assert all(4 * kept >= size for kept, size in counts[0.25])
    assert any(4 * kept < size for kept, size in counts[0.0])
    with pytest.raises(InfeasibleBudget, match="min_keep=0.25"):
        sparsify(cnn(), X, method="halp", structure="channel", budget={"params": 0.03}, total_steps=20, interval=5)


def test_halp_meets_a_latency_budget_on_a_real_onnxruntime_table(tmp_path):
    model = cnn(width=2).eval()  # wide enough at 32x32 that convolutions, not session overhead, dominate
    x = torch.randn(1, 3, 32, 32)
    table = profile(model, (x,), "onnxruntime", step=8, cache_dir=tmp_path, warmup=1, repeats=3, coarse=3,
                    calibration_random=1, retries=0, progress=False)
    sm = sparsify(model, x, method="halp", structure="channel", budget={"latency": 0.5}, latency_table=table,
                  total_steps=12, interval=4, end_fraction=1.0, round_to=8)

    def check(sm):  # the exported model's predicted latency follows the schedule after every step
        assert table.predict_model(sm.compact()) <= sm.method.budget_after(sm.method.prunes_done) * (1 + 1e-9)

    train(sm, 12, check)
    assert sm.method.prunes_done == 3
    sm.eval()
    compact = sm.compact()
    assert table.predict_model(compact) <= 0.5 * table.dense_ms() * (1 + 1e-9)
    for unit in sm.units:
        kept = int(unit.mask.sum())
        assert kept % 8 == 0 or kept == unit.group.size


def test_halp_importance_is_taylor_on_batchnorm():
    sm = sparsify(cnn(), X, method="halp", structure="channel", budget={"flops": 0.5}, total_steps=20,
                  interval=10)
    train(sm, 1)
    model = sm.context.source
    bn = model[1]
    unit = next(u for u in sm.units if any(m.name == "1.weight" for m in u.group.members))
    expected = (bn.weight.grad * bn.weight + bn.bias.grad * bn.bias).abs()
    assert torch.allclose(torch.as_tensor(sm.method.meter.total[unit.group.id]).float(), expected.detach(),
                          rtol=1e-5, atol=1e-8)


def test_bad_budgets_get_clear_errors():
    base = dict(method="halp", structure="channel", total_steps=20, interval=5)
    with pytest.raises(ValueError, match="needs a budget"):
        sparsify(cnn(), X, **base)
    with pytest.raises(ValueError, match="unknown budget kind 'speed'"):
        sparsify(cnn(), X, budget={"speed": 0.5}, **base)
    with pytest.raises(ValueError, match=r"fraction of dense in \(0, 1\]"):
        sparsify(cnn(), X, budget={"flops": 1.5}, **base)
    with pytest.raises(ValueError, match="latency_table"):
        sparsify(cnn(), X, budget={"latency": 0.5}, **base)
    with pytest.raises(InfeasibleBudget, match=r"smallest reachable flops is .* of dense") as info:
        sparsify(cnn(), X, budget={"flops": 1e-4}, **base)
    assert info.value.minimum > 0
    with pytest.raises(ValueError, match="use structure='channel'"):
        sparsify(cnn(), X, method="halp", budget={"flops": 0.5}, total_steps=20, interval=5)
    with pytest.raises(ValueError, match="no pruning step fits"):
        sparsify(cnn(), X, budget={"flops": 0.5}, **{**base, "interval": 50})
    with pytest.raises(ValueError, match="takes no budget"):
        sparsify(cnn(), X, method="gmp", structure="channel", distribution="uniform", total_steps=20,
                 budget={"flops": 0.5})
    with pytest.raises(ValueError, match="schedule"):
        sparsify(cnn(), X, budget={"flops": 0.5}, schedule="cubic", **base)


def test_round_to_not_below_a_group_size_is_named_in_a_warning():
    """#13 kind 5: kept counts are multiples of round_to or the whole group, so round_to=24
    keeps the 24-channel group whole; say so rather than prune less than asked silently."""
    with pytest.warns(UserWarning, match=r"halp: round_to=24 is not below the size of 1 channel group\(s\), which "
                                         r"therefore keep all their channels: group\d+ \(24 channels\)"):
        sm = sparsify(cnn(), X, method="halp", structure="channel", budget={"flops": 0.9}, total_steps=10,
                      interval=5, round_to=24)
    small = next(u for u in sm.units if u.group.size == 24)
    train(sm, 10)
    assert bool(small.mask.all())
