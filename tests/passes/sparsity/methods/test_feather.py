"""Feather (Eq. 3-4, θ rule): thresholding operator, gradient scaling, global cubic schedule, STE."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import digits_tensors as digits
from helpers import small_digits_cnn as make_model
from helpers import sparsify
from spruce.passes.sparsity.masking import nm_counts
from spruce.passes.sparsity.methods.feather import feather_threshold, theta_for
from torch import nn

STEPS = 40



def train(sm, steps, x, y, seed=1, check=None):
    opt = torch.optim.SGD(sm.parameters(), lr=0.05, momentum=0.9)
    sm.attach(opt)
    gen = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = F.cross_entropy(sm(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sm.step()
        if check is not None:
            check(sm, step)
    return sm


def test_operator_values():
    w = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.3, 0.5, 0.7, 3.0])
    t = torch.tensor(0.5)
    got = feather_threshold(w, t, 3.0)
    expected = torch.tensor([-(8 - 0.125) ** (1 / 3), -(1 - 0.125) ** (1 / 3), 0, 0, 0, 0,
                             (0.343 - 0.125) ** (1 / 3), (27 - 0.125) ** (1 / 3)])
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(feather_threshold(w, t, 1.0), torch.sign(w) * (w.abs() - 0.5).clamp_min(0))  # soft
    hard = torch.where(w.abs() > 0.5, w, torch.zeros_like(w))
    assert (feather_threshold(w, t, 60.0) - hard).abs().max() < 0.02  # p -> inf: hard thresholding


def test_theta_rule():
    assert theta_for(0.9) == 1.0 and theta_for(0.9499) == 1.0
    assert theta_for(0.95) == 0.5 and theta_for(0.99) == 0.5
    x = torch.randn(1, 1, 8, 8)
    for sparsity, theta in ((0.9, 1.0), (0.95, 0.5), (0.98, 0.5)):
        sm = sparsify(make_model(), x, method="feather", sparsity=sparsity, distribution="global", total_steps=10)
        assert all(layer.masked.feather_theta == theta for layer in sm.layers)
    sm = sparsify(make_model(), x, method="feather", sparsity=0.98, total_steps=10, theta=0.25)
    assert all(layer.masked.feather_theta == 0.25 for layer in sm.layers)


def test_gradients_pass_straight_through_scaled_by_theta_on_pruned_weights():
    x, y = digits()
    sm = sparsify(make_model(), x[:1], method="feather", sparsity=0.96, distribution="global", total_steps=STEPS)
    train(sm, STEPS, x, y)  # past end_fraction: at the target
    layer = sm.layers[1]
    weight = layer.module.weight
    upstream = torch.randn(weight.shape)
    weight.grad = None
    (layer.masked(weight) * upstream).sum().backward()
    mask = layer.masked.mask
    torch.testing.assert_close(weight.grad[mask], upstream[mask])  # identity on kept weights
    torch.testing.assert_close(weight.grad[~mask], 0.5 * upstream[~mask])  # θ = 0.5 at >= 95 %


def test_global_cubic_schedule_exact_counts_and_dense_weights_kept():
    x, y = digits()
    sm = sparsify(make_model(), x[:1], method="feather", sparsity=0.9, distribution="global", total_steps=STEPS)
    total = sum(layer.masked.mask.numel() for layer in sm.layers)
    seen_pruned_change = []

    def check(sm, step):
        end = 0.5 * STEPS
        scheduled = 0.9 * (1 - (1 - min(1.0, step / end)) ** 3)
        active = sum(int(layer.masked.mask.sum()) for layer in sm.layers)
        assert active == total - round(scheduled * total), step  # exactly the scheduled global sparsity
        threshold = float(sm.layers[0].masked.threshold)
        for layer in sm.layers:
            assert float(layer.masked.threshold) == threshold  # one global T
            magnitude = layer.module.weight.detach().abs()
            assert bool((magnitude[layer.masked.mask] >= threshold).all())
            assert bool((magnitude[~layer.masked.mask] <= threshold).all())
        pruned = ~sm.layers[2].masked.mask
        seen_pruned_change.append(sm.layers[2].module.weight.detach()[pruned].abs().sum().item())

    train(sm, STEPS, x, y, check=check)
    assert seen_pruned_change[-1] > 0  # pruned weights stay dense (STE), they are not zeroed
    layer = sm.layers[2]
    effective = layer.masked(layer.module.weight)
    assert bool((effective[~layer.masked.mask] == 0).all())
    assert sm.sparsities()[layer.name] > 0  # global: layers end at different sparsities


def test_layerwise_erk_and_fold_equals_the_sparse_model():
    x, y = digits()
    sm = sparsify(make_model(), x[:1], method="feather", sparsity=0.9, distribution="erk", total_steps=STEPS)
    train(sm, STEPS, x, y)
    for layer in sm.layers:
        assert int(layer.masked.mask.sum()) == layer.masked.mask.numel() - round((1 - layer.density)
                                                                                  * layer.masked.mask.numel())
    sm.eval()
    folded = sm.fold().eval()
    with torch.no_grad():
        torch.testing.assert_close(folded(x[:32]), sm(x[:32]), rtol=1e-5, atol=1e-5)
    for layer, module in zip(sm.layers, [folded[0], folded[2], folded[5]]):
        assert int((module.weight != 0).sum()) <= int(layer.masked.mask.sum())


def test_two_four_keeps_exactly_two_per_group_with_group_thresholds():
    x, y = digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16 * 64, 10))
    with pytest.warns(UserWarning, match="kept dense"):
        sm = sparsify(model, x[:1], method="feather", structure="2:4", total_steps=10)
    train(sm, 10, x, y)
    for layer in sm.layers:
        counts = nm_counts(layer.masked.mask, 4)
        assert bool((counts == 2).all()), layer.name
        effective = layer.masked(layer.module.weight)
        assert bool((effective[~layer.masked.mask] == 0).all())


@pytest.mark.parametrize("options, message", [
    ({"p": 0.5}, "feather: p must be >= 1"),
    ({"p": float("inf")}, "feather: p must be a finite number"),
    ({"theta": 1.5}, "feather: theta must be <= 1"),
    ({"end_fraction": 0.0}, "feather: end_fraction must be > 0"),
    ({"delta_t": 0}, "feather: delta_t must be >= 1"),
    ({"delta_t": 1.5}, "feather: delta_t must be an integer"),
])
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        sparsify(make_model(), torch.randn(1, 1, 8, 8), method="feather", sparsity=0.9, total_steps=10, **options)


def test_channel_structure_is_refused():
    with pytest.raises(ValueError, match="feather"):
        sparsify(make_model(), torch.randn(1, 1, 8, 8), method="feather", structure="channel", sparsity=0.5,
                 distribution="uniform", total_steps=10)
