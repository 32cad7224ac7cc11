"""OptG (Algorithm 1, Eq. 6, 7, 10, 16, 17 of papers/optg-gradient-driven-sparsity.md) on
real training loops: SGD with momentum and weight decay, invariants checked every step."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from spruce.compiler.api import sparsify

# short schedules in these tests end below P (Eq. 16); the warning has its own test
pytestmark = pytest.mark.filterwarnings("ignore:optg. with alpha")


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(4, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 8),
    )


X = torch.randn(2, 4, 8, 8)


def make(total, per_epoch, sparsity=0.9, **kw):
    return sparsify(cnn(), X, method="optg", sparsity=sparsity, distribution="global", total_steps=total,
                    steps_per_epoch=per_epoch, **kw)


def sgd(params, lr=0.05):
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-3)


class Loop:
    """A real SGD loop; ``step`` returns after backward + optimizer step + ``sm.step()``."""

    def __init__(self, sm, opt=None, seed=0):
        self.sm = sm
        self.gen = torch.Generator().manual_seed(seed)
        self.opt = opt if opt is not None else sgd(sm.parameters())
        sm.attach(self.opt)

    def backward(self):
        x = torch.randn(4, 4, 8, 8, generator=self.gen)
        y = torch.randint(0, 8, (4,), generator=self.gen)
        self.opt.zero_grad()
        F.cross_entropy(self.sm(x), y).backward()

    def step(self):
        self.backward()
        self.opt.step()
        self.sm.step()


def sigmoid_factor(k, tau, alpha=0.5):
    return 1.0 / (1.0 + math.exp(-alpha * (k - 0.5 * tau)))


def n_pruned(sm):
    return sum(int((~layer.masked.mask).sum()) for layer in sm.layers)


def n_weights(sm):
    return sum(layer.masked.mask.numel() for layer in sm.layers)


def test_scores_after_one_step_equal_eq_7_and_10_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    # tau = 10 epochs: P_1 = 0.5 / (1 + e^2) -> round(0.0596 * 45) = 3 weights pruned at epoch 1
    sm = sparsify(model, torch.randn(2, 6), method="optg", sparsity=0.5, distribution="global",
                  total_steps=40, steps_per_epoch=4)
    assert n_pruned(sm) == 3
    assert all(torch.equal(layer.masked.scores, torch.zeros_like(layer.masked.scores)) for layer in sm.layers)
    w0 = [layer.module.weight.detach().clone() for layer in sm.layers]
    m0 = [layer.masked.mask.clone() for layer in sm.layers]
    assert all(bool((w[~m] != 0).all()) for w, m in zip(w0, m0))  # pruned weights keep their values
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))

    # by hand: dL/d(w*m) on the effective weights, then Eq. 7 (times w) and Eq. 10 (SGD step)
    eff = [(w * m).requires_grad_() for w, m in zip(w0, m0)]
    hidden = torch.tanh(F.linear(x, eff[0], model[0].bias))
    F.cross_entropy(F.linear(hidden, eff[1], model[2].bias), y).backward()
    lr = 0.1
    eta_mask = lr / (1 + math.exp(-0.5 * (1 - 0.5 * 10)))  # Eq. 17 at k = 1, tau = 10
    expected = [-eta_mask * e.grad * w for e, w in zip(eff, w0)]

    opt = sgd(sm.parameters(), lr=lr)
    sm.attach(opt)
    opt.zero_grad()
    F.cross_entropy(sm(x), y).backward()
    for layer, e, m in zip(sm.layers, eff, m0):
        assert torch.equal(layer.module.weight.grad, e.grad * m)  # pruned weights get no weight gradient
    opt.step()
    sm.step()
    for layer, want, m in zip(sm.layers, expected, m0):
        torch.testing.assert_close(layer.masked.scores, want, rtol=1e-6, atol=1e-12)
        assert torch.equal(layer.masked.mask, m)  # same epoch: same mask
    # the STE gradient is dense: the pruned weights' scores move too (Eq. 11)
    pruned_scores = torch.cat([layer.masked.scores[~m] for layer, m in zip(sm.layers, m0)])
    assert pruned_scores.numel() == 3 and bool((pruned_scores != 0).all())


def test_mask_changes_only_at_epoch_boundaries_by_a_global_sort_of_the_scores():
    total, per_epoch = 30, 3
    sm = make(total, per_epoch)
    loop = Loop(sm, seed=1)
    revived_values = []
    for step in range(1, total + 1):
        before = [layer.masked.mask.clone() for layer in sm.layers]
        loop.backward()
        for layer in sm.layers:  # w * m in the forward: a pruned weight has no weight gradient
            assert torch.all(layer.module.weight.grad[~layer.masked.mask] == 0)
        loop.opt.step()
        sm.step()
        masks = [layer.masked.mask for layer in sm.layers]
        if step % per_epoch or step == total:
            assert all(torch.equal(a, b) for a, b in zip(before, masks)), f"mask moved inside an epoch at {step}"
            continue
        # the mask of epoch k + 1: the round(P_{k+1} N) smallest scores over all layers are pruned
        k_next = step // per_epoch + 1
        assert sm.method.epoch == k_next
        p_k = 0.9 * sigmoid_factor(k_next, 10)
        assert n_pruned(sm) == round(p_k * n_weights(sm))
        scores = torch.cat([layer.masked.scores.flatten() for layer in sm.layers])
        kept = torch.cat([m.flatten() for m in masks])
        assert scores[kept].min() >= scores[~kept].max()
        for layer, old in zip(sm.layers, before):
            revived = layer.masked.mask & ~old
            revived_values.append(layer.module.weight.detach()[revived])
    revived = torch.cat(revived_values)
    assert revived.numel() > 0  # the accumulated mask gradients really revive pruned weights
    assert bool((revived != 0).all())  # revived with the values they kept, not at zero

    folded = sm.fold().eval()
    sm.eval()
    x = torch.randn(3, 4, 8, 8)
    torch.testing.assert_close(sm(x), folded(x))  # the forward uses w * m
    for layer in sm.layers:
        assert torch.all(dict(folded.named_modules())[layer.name].weight[~layer.masked.mask] == 0)


def test_global_sparsity_follows_the_sigmoid_schedule_and_reaches_p():
    total, per_epoch, tau = 80, 2, 40
    sm = make(total, per_epoch, sparsity=0.8)
    method = sm.method
    assert method.n_epochs() == tau
    assert method.sparsity_at(20) == pytest.approx(0.4)  # Eq. 16 at k = tau / 2
    assert method.sparsity_at(1) == pytest.approx(0.8 / (1 + math.exp(9.5)))
    assert method.sparsity_at(30) == pytest.approx(0.8 / (1 + math.exp(-5)))
    n = n_weights(sm)
    loop = Loop(sm, seed=2)
    per_epoch_sparsity = {1: n_pruned(sm)}
    for step in range(1, total + 1):
        loop.step()
        k = method.epoch_of(step + 1)  # the epoch the mask now in force belongs to
        if step < total:
            per_epoch_sparsity[k] = n_pruned(sm)
    assert len(per_epoch_sparsity) == tau
    for k, pruned in per_epoch_sparsity.items():
        assert pruned == round(0.8 * sigmoid_factor(k, tau) * n), f"epoch {k}"
    assert n_pruned(sm) / n == pytest.approx(0.8, abs=1.0 / n)  # ~P in the last epoch
    # one threshold over all layers decides the layer budgets: they are not uniform
    layer_sparsity = sorted(sm.sparsities().values())
    assert layer_sparsity[-1] - layer_sparsity[0] > 0.05


def test_mask_lr_is_the_weight_lr_of_each_group_times_the_sigmoid():
    total, per_epoch, tau = 20, 2, 10
    sm = make(total, per_epoch)
    first = sm.layers[0].module.weight
    others = [p for p in sm.parameters() if p is not first]
    opt = torch.optim.SGD([{"params": [first], "lr": 0.1}, {"params": others, "lr": 0.02}],
                          momentum=0.9, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))  # changes every step
    loop = Loop(sm, opt=opt, seed=3)
    for step in range(1, total + 1):
        loop.backward()
        opt.step()
        grads = [layer.masked.score_grad.clone() for layer in sm.layers]  # Eq. 7, summed over the batch
        before = [layer.masked.scores.clone() for layer in sm.layers]
        k = (step - 1) // per_epoch + 1
        weight_lr = [opt.param_groups[0]["lr"]] + [opt.param_groups[1]["lr"]] * (len(sm.layers) - 1)
        eta = [lr / (1 + math.exp(-0.5 * (k - 0.5 * tau))) for lr in weight_lr]  # Eq. 17
        assert sm.method.mask_lrs(step) == pytest.approx(eta, rel=1e-12)
        sm.step()
        for layer, b, g, e in zip(sm.layers, before, grads, eta):
            torch.testing.assert_close(layer.masked.scores, b - g * e, rtol=1e-6, atol=1e-12)
        sched.step()
    # at k = tau / 2 the mask lr is half the weight lr; at k = 1 it is e^{-2} / (1 + e^{-2}) of it
    assert sm.method.schedule_factor(5) == pytest.approx(0.5)
    assert sm.method.schedule_factor(1) == pytest.approx(math.exp(-2) / (1 + math.exp(-2)))


def test_resume_equals_uninterrupted_training_bitwise(tmp_path):
    total, per_epoch, k = 24, 4, 10  # the checkpoint falls inside epoch 3

    whole = make(total, per_epoch)
    loop = Loop(whole, seed=4)
    for _ in range(total):
        loop.step()

    first = make(total, per_epoch)
    loop1 = Loop(first, seed=4)
    for _ in range(k):
        loop1.step()
    torch.save({"m": first.state_dict(), "o": loop1.opt.state_dict(), "g": loop1.gen.get_state()}, tmp_path / "c.pt")
    del first, loop1
    second = make(total, per_epoch)
    ckpt = torch.load(tmp_path / "c.pt", weights_only=False)
    second.load_state_dict(ckpt["m"])
    loop2 = Loop(second)
    loop2.opt.load_state_dict(ckpt["o"])
    loop2.gen.set_state(ckpt["g"])
    assert second.step_count == k and second.method.epoch == 3
    for _ in range(total - k):
        loop2.step()
    assert whole.metrics == second.metrics
    for a, b in zip(whole.layers, second.layers):
        assert torch.equal(a.masked.mask, b.masked.mask)
        assert torch.equal(a.masked.scores, b.masked.scores)
        assert torch.equal(a.module.weight, b.module.weight)


@pytest.mark.parametrize("distribution", ["erk", "uniform"])
def test_fixed_layer_budgets_sort_each_layer_on_the_same_schedule(distribution):
    """The budget ablation of §4.4 (Tab. 5): layer sparsities fixed, scores sorted per layer."""
    total, per_epoch, tau = 16, 2, 8
    sm = sparsify(cnn(), X, method="optg", sparsity=0.9, distribution=distribution, total_steps=total,
                  steps_per_epoch=per_epoch)
    loop = Loop(sm, seed=5)
    for step in range(1, total):
        loop.step()
        k = sm.method.epoch_of(step + 1)
        for layer in sm.layers:
            mask, scores = layer.masked.mask, layer.masked.scores
            assert int((~mask).sum()) == round((1 - layer.density) * sigmoid_factor(k, tau) * mask.numel())
            if step % per_epoch == 0 and bool((~mask).any()):
                assert scores[mask].min() >= scores[~mask].max()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "steps_per_epoch is required"),
        ({"steps_per_epoch": 0}, "steps_per_epoch"),
        ({"steps_per_epoch": 2.5}, "steps_per_epoch"),
        ({"steps_per_epoch": True}, "steps_per_epoch"),
        ({"steps_per_epoch": 2, "alpha": 0}, "alpha"),
        ({"steps_per_epoch": 2, "alpha": -0.5}, "alpha"),
        ({"steps_per_epoch": 2, "alpha": float("nan")}, "alpha"),
        ({"steps_per_epoch": 2, "alpha": "0.5"}, "alpha"),
        ({"steps_per_epoch": 11}, "exceeds total_steps"),
        ({"steps_per_epoch": 2, "total_steps": None}, "total_steps"),
        ({"steps_per_epoch": 2, "structure": "2:4"}, "structure"),
        ({"steps_per_epoch": 2, "beta": 1}, "unknown option"),
    ],
)
def test_bad_options_are_value_errors(kwargs, message):
    options = {"sparsity": 0.9, "distribution": "global", "total_steps": 10, **kwargs}
    with pytest.raises(ValueError, match=message):
        sparsify(cnn(), X, method="optg", **options)


def test_training_errors_are_clear(tmp_path):
    sm = make(10, 2)
    opt = sgd(sm.parameters())
    F.cross_entropy(sm(torch.randn(2, 4, 8, 8)), torch.tensor([0, 1])).backward()
    opt.step()
    with pytest.raises(RuntimeError, match="attach the optimizer"):
        sm.step()  # Eq. 17 needs the weights' learning rate

    sm = make(10, 2)
    sm.attach(sgd(sm.parameters()))
    with pytest.raises(RuntimeError, match="backward"):
        sm.step()

    sm = make(10, 2)
    sm.attach(sgd([sm.layers[0].module.weight]))
    F.cross_entropy(sm(torch.randn(2, 4, 8, 8)), torch.tensor([0, 1])).backward()
    with pytest.raises(RuntimeError, match="not in the attached optimizer"):
        sm.step()

    torch.save(make(10, 2).state_dict(), tmp_path / "c.pt")
    with pytest.raises(ValueError, match="steps_per_epoch"):
        make(10, 5).load_state_dict(torch.load(tmp_path / "c.pt", weights_only=False))


def test_short_schedules_warn_that_eq_16_ends_below_p():
    with pytest.warns(UserWarning, match="below the target"):
        make(10, 2)  # tau = 5: P_5 = P / (1 + e^{-1.25}) ~ 0.78 P
