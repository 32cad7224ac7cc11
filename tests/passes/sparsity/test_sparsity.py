"""Sparse-training foundation: mask pass, budgets, static/GMP/SET/RigL invariants."""

import math
import re
import warnings

import pytest
import torch
import torch.nn as nn
from helpers import SGDLoop, sparsify
from hypothesis import given, settings
from hypothesis import strategies as st
from spruce.passes.sparsity.budget import layer_densities
from spruce.passes.sparsity.masking import nm_counts, nm_mask
from spruce.passes.sparsity.methods.baselines import RigLConfig, SETConfig


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(4, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 8),
    )


X = torch.randn(2, 4, 8, 8)


def train(sm, steps, seed=0, check=None):
    loop = SGDLoop(sm, (4, 4, 8, 8), 8, seed, weight_decay=1e-4)
    for _ in range(steps):
        loop.step()
        if check:
            check(sm)
    return loop.opt


def active_counts(sm):
    return [int(layer.masked.mask.sum()) for layer in sm.layers]


def test_erk_densities_match_the_global_budget():
    shapes = [(16, 4, 3, 3), (32, 16, 3, 3), (8, 32)]
    dens = layer_densities(shapes, 0.9, "erk")
    sizes = [math.prod(s) for s in shapes]
    kept = sum(d * n for d, n in zip(dens, sizes))
    assert kept == pytest.approx(0.1 * sum(sizes))
    assert dens[2] > dens[1]  # small layers denser
    raw = [sum(s) / math.prod(s) for s in shapes]
    assert dens[0] / dens[1] == pytest.approx(raw[0] / raw[1]) or dens[0] == 1.0


def test_erk_floor_keeps_a_minimum_per_output_channel_on_the_global_budget():
    """Plain ERK leaves a 24->48 3x3 conv between a 1->24 conv and a 768->10 Linear at 1.55 %
    density (3.3 weights per output channel) at 90 %; 'erk_floor' (the default) keeps
    ERK_FLOOR_PER_CHANNEL per output channel there on the same total, and equals ERK where
    ERK already keeps that many."""
    from spruce.passes.sparsity.budget import DEFAULT_DISTRIBUTION, ERK_FLOOR_PER_CHANNEL

    assert DEFAULT_DISTRIBUTION == "erk_floor"
    shapes = [(24, 1, 3, 3), (48, 24, 3, 3), (10, 768)]
    sizes = [math.prod(s) for s in shapes]
    erk = layer_densities(shapes, 0.9, "erk")
    floored = layer_densities(shapes, 0.9, "erk_floor")
    assert erk[1] * sizes[1] / 48 < 4
    assert floored[1] * sizes[1] / 48 == pytest.approx(ERK_FLOOR_PER_CHANNEL)
    assert all(d * n / s[0] >= ERK_FLOOR_PER_CHANNEL - 1e-9 or d == 1.0 for d, n, s in zip(floored, sizes, shapes))
    assert sum(d * n for d, n in zip(floored, sizes)) == pytest.approx(0.1 * sum(sizes))
    wide = [(32, 1, 3, 3), (64, 32, 3, 3), (128, 64, 3, 3), (10, 128)]  # ERK keeps >= 40 per channel here
    assert layer_densities(wide, 0.9, "erk_floor") == pytest.approx(layer_densities(wide, 0.9, "erk"), rel=1e-9)


def test_mask_pass_puts_a_mask_node_on_every_layer_and_zeroes_pruned_weights():
    model = cnn()
    sm = sparsify(model, X, method="static", sparsity=0.8, distribution="uniform")
    names = [n.target for n in sm.graph.graph.nodes if n.op == "call_module" and n.target.startswith("spruce_masks")]
    assert len(names) == 3
    for layer in sm.layers:
        assert layer.masked.mask.dtype == torch.bool
        assert int(layer.masked.mask.sum()) == round(0.2 * layer.masked.mask.numel())
        assert torch.all(layer.module.weight[~layer.masked.mask] == 0)
    out = sm(X)
    assert out.shape == (2, 8)


def test_static_masks_never_move_and_pruned_weights_stay_zero():
    sm = sparsify(cnn(), X, method="static", sparsity=0.9)
    masks = [layer.masked.mask.clone() for layer in sm.layers]

    def check(s):
        for layer, mask in zip(s.layers, masks):
            assert torch.equal(layer.masked.mask, mask)
            assert torch.all(layer.module.weight[~mask] == 0)  # despite momentum and weight decay

    train(sm, 20, check=check)


@pytest.mark.parametrize("method", ["rigl", "set"])
def test_prune_grow_keeps_sparsity_exactly_and_grown_weights_start_at_zero(method):
    sm = sparsify(cnn(), X, method=method, sparsity=0.9, total_steps=80, delta_t=5)
    targets = active_counts(sm)
    changed_updates = []

    def check(s):
        assert active_counts(s) == targets
        if s.metrics and s.metrics[-1]["step"] == s.step_count:
            changed_updates.append(s.step_count)
            for layer in s.layers:
                grown = layer.grown
                assert torch.all(layer.module.weight[grown] == 0)

    opt = train(sm, 80, check=check)
    assert changed_updates and max(changed_updates) < 60  # updates stop at 3/4 of training
    for layer in sm.layers:  # momentum of regrown weights was reset with them
        buf = opt.state[layer.module.weight]["momentum_buffer"]
        assert buf.shape == layer.masked.mask.shape


def test_rigl_cosine_drop_fraction():
    sm = sparsify(cnn(), X, method="rigl", sparsity=0.9, total_steps=400)
    rigl = sm.method
    assert rigl.drop_fraction(0) == pytest.approx(0.3)
    assert rigl.drop_fraction(150) == pytest.approx(0.15)
    assert rigl.drop_fraction(300) == pytest.approx(0.0, abs=1e-12)
    assert rigl.is_update(100) and not rigl.is_update(300) and not rigl.is_update(150)


def test_rigl_grows_where_the_dense_gradient_is_largest():
    sm = sparsify(cnn(), X, method="rigl", sparsity=0.9, total_steps=100, delta_t=1, alpha=0.3)
    layer = sm.layers[1]
    sm.train()
    loss = sm(X).pow(2).sum()
    loss.backward()
    grad = layer.masked.dense_grad.abs().clone()
    assert grad[~layer.masked.mask].abs().sum() > 0  # dense: pruned weights get gradients too
    before = layer.masked.mask.clone()
    sm.step()
    grown = layer.grown
    k = int(grown.sum())
    assert k > 0
    inactive_scores = grad[~before]
    assert grad[grown].min() >= torch.topk(inactive_scores.flatten(), k).values.min() - 1e-12


def test_gmp_follows_the_cubic_schedule():
    sm = sparsify(cnn(), X, method="gmp", sparsity=0.9, distribution="uniform", total_steps=40, delta_t=10)
    gmp = sm.method
    layer = sm.layers[1]
    assert gmp.target(layer, 0) == pytest.approx(0.0)
    assert gmp.target(layer, 15) == pytest.approx(0.9 * (1 - 0.5**3))
    seen = {}

    def check(s):
        seen[s.step_count] = s.sparsities()[layer.name]

    train(sm, 40, check=check)
    assert seen[10] == pytest.approx(gmp.target(layer, 10), abs=1e-3)
    assert seen[30] == pytest.approx(0.9, abs=1e-3)
    assert seen[40] == pytest.approx(0.9, abs=1e-3)


def test_nm_masks_have_exactly_n_per_group():
    scores = torch.rand(8, 16, 3, 3)
    mask = nm_mask(scores, 2, 4)
    assert torch.all(nm_counts(mask, 4) == 2)
    # groups are 4 consecutive input channels at one output channel and kernel position
    assert int(mask[3, 4:8, 1, 2].sum()) == 2
    sm = sparsify(cnn(), X, method="static", structure="2:4")
    for layer in sm.layers:
        assert torch.all(nm_counts(layer.masked.mask, 4) == 2)


def test_nm_skips_layers_not_divisible_with_a_warning():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4))
    with pytest.warns(UserWarning, match="0 .input channels 3 not divisible by 4"):
        sm = sparsify(model, torch.randn(1, 3, 8, 8), method="static", structure="2:4")
    assert [layer.name for layer in sm.layers] == ["3"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sparsity": 1.0}, "sparsity must be"),
        ({"sparsity": -0.1}, "sparsity must be"),
        ({"structure": "4:4"}, "0 < N < M"),
        ({"structure": "blocks"}, "unknown structure"),
        ({"method": "magic"}, "unknown method"),
        ({"method": "rigl"}, "total_steps"),
        ({"method": "rigl", "total_steps": 10, "delta_t": 0}, "delta_t"),
        ({"method": "rigl", "total_steps": 10, "bogus": 1}, "unknown option"),
        ({"distribution": "normal"}, "unknown distribution"),
    ],
)
def test_bad_options_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sparsify(cnn(), X, **kwargs)


def _sgd(sm):
    return torch.optim.SGD(sm.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)


def _run(sm, opt, steps, gen):
    loop = SGDLoop(sm, (4, 4, 8, 8), 8, opt=opt, gen=gen)
    for _ in range(steps):
        loop.step()


@pytest.mark.parametrize("method", ["rigl", "set", "gmp"])
def test_resume_equals_uninterrupted_training(tmp_path, method):
    def fresh():
        return sparsify(cnn(), X, method=method, sparsity=0.9, total_steps=40, delta_t=5)

    whole = fresh()
    gen = torch.Generator().manual_seed(1)
    _run(whole, _sgd(whole), 40, gen)

    gen = torch.Generator().manual_seed(1)
    first = fresh()
    opt = _sgd(first)
    _run(first, opt, 20, gen)
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    del first, opt
    second = fresh()
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    second.load_state_dict(ckpt["model"])
    opt2 = _sgd(second)
    opt2.load_state_dict(ckpt["opt"])
    assert second.step_count == 20
    _run(second, opt2, 20, gen)
    assert whole.metrics == second.metrics
    for a, b in zip(whole.layers, second.layers):
        assert torch.equal(a.masked.mask, b.masked.mask)
        assert torch.equal(a.module.weight, b.module.weight)


def test_fold_gives_a_plain_model_with_zeros():
    model = cnn()
    sm = sparsify(model, X, method="static", sparsity=0.9)
    folded = sm.fold().eval()
    sm.eval()
    assert not any("spruce" in n for n, _ in folded.named_modules())
    assert torch.allclose(folded(X), sm(X), atol=1e-6)
    assert float((folded[3].weight == 0).float().mean()) > 0.8


@pytest.mark.parametrize("method", ["rigl", "gmp", "iee"])
def test_nan_weights_are_a_clear_error_naming_the_layer(method):
    options = {"h": 1, "j": 1, "q": 1} if method == "iee" else {"delta_t": 1}
    sm = sparsify(cnn(), X, method=method, sparsity=0.9, total_steps=10, **options)
    sm.train()
    sm(X).sum().backward()
    with torch.no_grad():
        sm.layers[1].module.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN/inf in layer 3"):
        for _ in range(3):
            sm(X).sum().backward()
            sm.step()


def test_autocast_training_keeps_masks_exact():
    sm = sparsify(cnn(), X, method="rigl", sparsity=0.9, total_steps=40, delta_t=5)
    targets = active_counts(sm)
    opt = torch.optim.AdamW(sm.parameters(), lr=1e-3)
    sm.attach(opt)
    sm.train()
    for _ in range(12):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = sm(torch.randn(4, 4, 8, 8)).float().square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sm.step()
        assert active_counts(sm) == targets
        for layer in sm.layers:
            assert torch.all(layer.module.weight[~layer.masked.mask] == 0)
            assert layer.module.weight.dtype == torch.float32
    assert len(sm.metrics) == 2


def test_dense_gradients_only_at_update_steps():
    sm = sparsify(cnn(), X, method="rigl", sparsity=0.9, total_steps=40, delta_t=5)
    opt = torch.optim.SGD(sm.parameters(), lr=0.01)
    sm.attach(opt)
    sm.train()
    captured = []
    for _ in range(10):
        sm(X).square().mean().backward()
        captured.append(sm.layers[0].masked.dense_grad is not None)
        opt.step()
        opt.zero_grad()
        sm.step()
    assert captured == [False, False, False, False, True] * 2
    static = sparsify(cnn(), X, method="static", sparsity=0.9)
    static.train()
    static(X).sum().backward()
    assert static.layers[0].masked.dense_grad is None


def test_importance_criteria_registry():
    from spruce.passes.sparsity.criteria import CRITERIA, importance

    assert {"magnitude", "gradient", "taylor", "taylor_bn"} <= set(CRITERIA)
    sm = sparsify(cnn(), X, method="static", sparsity=0.5)
    sm.train()
    sm(X).square().sum().backward()
    layer = sm.layers[0]  # conv followed by BatchNorm
    w, g = layer.module.weight.detach(), layer.module.weight.grad
    assert torch.equal(importance("magnitude", layer), w.abs())
    assert torch.equal(importance("taylor", layer), (w * g).abs())
    bn = sm.graph.get_submodule("1")
    expected = (bn.weight.grad * bn.weight + bn.bias.grad * bn.bias).abs().detach()
    assert torch.allclose(importance("taylor_bn", layer)[:, 0, 0, 0], expected)
    with pytest.raises(ValueError, match="BatchNorm"):
        importance("taylor_bn", sm.layers[1])
    with pytest.raises(ValueError, match="unknown importance"):
        importance("hessian", layer)


@pytest.mark.parametrize(("total", "delta_t"), [(50, 100), (100, 60), (40, 10)])
def test_gmp_reaches_its_target_whatever_delta_t(total, delta_t):
    sm = sparsify(cnn(), X, method="gmp", sparsity=0.9, distribution="uniform", total_steps=total, delta_t=delta_t)
    train(sm, total)
    for value in sm.sparsities().values():
        assert value == pytest.approx(0.9, abs=2e-3)


# ---- #13 kind 2: transposed, 1-D and 3-D layers are sparse-trained; the rest is named ----------

CONVS = {1: (nn.Conv1d, nn.ConvTranspose1d), 2: (nn.Conv2d, nn.ConvTranspose2d), 3: (nn.Conv3d, nn.ConvTranspose3d)}


def decoder(ndim=2):
    conv, transposed = CONVS[ndim]
    torch.manual_seed(0)
    return nn.Sequential(conv(4, 8, 3, padding=1), nn.ReLU(), transposed(8, 8, 3, padding=1), nn.ReLU(),
                         conv(8, 4, 3, padding=1))


def _nm_counts_along(mask, m, dim):
    return mask.movedim(dim, -1).reshape(-1, m).sum(dim=1)


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_transposed_and_nd_convolutions_are_sparse_trained(ndim, structure):
    """unstructured and 2:4 skipped ConvTranspose layers silently, so decoders ended up less
    sparse than asked; for a transposed conv N:M runs along its input channels, weight dim 0."""
    x = torch.randn(2, 4, *([6] * ndim))
    sm = sparsify(decoder(ndim), x, method="iee", structure=structure, sparsity=0.5, distribution="uniform",
                  total_steps=9, h=1, j=1, q=1)
    assert [layer.name for layer in sm.layers] == ["0", "2", "4"]

    def check(s):
        if s.method.exploring or s.method.budgets:  # inside a prune / explore / grow cycle
            return
        for layer in s.layers:
            mask = layer.masked.mask
            if structure == "2:4":
                in_dim = 0 if isinstance(layer.module, nn.modules.conv._ConvTransposeNd) else 1
                assert torch.all(_nm_counts_along(mask, 4, in_dim) == 2), layer.name
            else:
                assert int(mask.sum()) == mask.numel() // 2, layer.name
            assert torch.all(layer.module.weight[~mask] == 0)

    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(sm.parameters(), lr=0.05)
    sm.attach(opt)
    for _ in range(9):
        loss = sm(torch.randn(2, 4, *([6] * ndim), generator=gen)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sm.step()
        check(sm)
    assert sm.method.cycle >= 1  # a prune-grow cycle ran
    assert sm.sparsities()["2"] == pytest.approx(0.5)
    sm.eval()
    with torch.no_grad():
        assert torch.allclose(sm.fold()(x), sm(x), atol=1e-6)


class Mixed(nn.Module):
    """Layers sparsify cannot mask: an Embedding, a parameter the code convolves with directly,
    a transposed conv called with output_size, a Conv2d subclass with its own forward."""

    class Doubled(nn.Conv2d):
        def forward(self, x):
            return 2 * super().forward(x)

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.filt = nn.Parameter(torch.randn(4, 4, 3, 3))
        self.up = nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, ids, x):
        x = x + self.embed(ids)[:, :, None, None]
        x = nn.functional.conv2d(x, self.filt, padding=1)
        x = self.up(x, output_size=[15, 15])
        return self.conv(x)


def test_layers_left_dense_are_named_in_a_warning():
    model = Mixed()
    with pytest.warns(UserWarning, match="layers kept dense") as record:
        sm = sparsify(model, (torch.tensor([1, 2]), torch.randn(2, 4, 8, 8)), method="static", sparsity=0.5)
    message = " ".join(str(w.message) for w in record)
    assert "embed (Embedding layers are not supported)" in message
    assert "filt (read by the model's code at node 'conv2d'" in message
    assert "up (called with arguments besides its input" in message
    assert [layer.name for layer in sm.layers] == ["conv"]


def test_subclass_with_its_own_forward_is_not_rewritten():
    model = nn.Sequential(Mixed.Doubled(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    model[0].__class__.__module__ = "torch.nn.custom"  # fx treats it as a leaf: a call_module node
    x = torch.randn(1, 3, 6, 6)
    with pytest.warns(UserWarning, match=r"0 \(Doubled overrides forward\)"):
        sm = sparsify(model, x, method="static", sparsity=0.5)
    assert [layer.name for layer in sm.layers] == ["2"]
    with torch.no_grad():
        assert torch.allclose(sm(x), model(x))


def test_rigl_and_set_refuse_nm_before_training():
    # a declared capability: refused when the options are checked, before the model is captured
    for config in (RigLConfig, SETConfig):
        assert "n:m" not in config.structures
    for method in ("rigl", "set"):
        with pytest.raises(ValueError, match=f"method '{method}' does not support structure='2:4'"):
            sparsify(cnn(), X, method=method, structure="2:4", total_steps=10)


# ---- #13 kind 5: no layer ends with no weight --------------------------------------------------


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 16, 3))


def test_uniform_sparsity_that_empties_a_layer_is_refused_naming_the_layer():
    """sparsity=0.999 uniform left every layer of a small model without a weight: the model
    then output a constant, silently."""
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"leaves layer 0 \(108 weights\) with no weight.*highest feasible uniform "
                                         r"sparsity is 0\.99074 \(one weight left in layer 0\)"):
        sparsify(tiny(), x, method="static", sparsity=0.999, distribution="uniform")
    sm = sparsify(tiny(), x, method="static", sparsity=0.99074, distribution="uniform")  # the stated maximum works
    assert [int(layer.masked.mask.sum()) for layer in sm.layers] == [1, 1, 2]


def big_and_small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 64, 512), nn.ReLU(),
                         nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 3))


@pytest.mark.parametrize("distribution", ["erk", "erk_floor", "global"])
@pytest.mark.parametrize("method", ["static", "gmp", "feather", "optg"])
def test_erk_and_global_redistribute_so_no_layer_ends_empty(distribution, method):
    """At 0.999 uniform would empty the 6-weight conv; ERK and global give it one weight and
    spread the rest of the budget. The global methods keep each layer's largest weight even
    when one threshold over all layers would prune a whole layer (its weights made tiny here)."""
    model = big_and_small()
    with torch.no_grad():
        model[0].weight.mul_(1e-4)
    x = torch.randn(4, 3, 8, 8)
    options = {"static": {"init": "magnitude"}, "gmp": {"delta_t": 1}, "feather": {},
               "optg": {"steps_per_epoch": 2}}[method]
    sm = sparsify(model, x, method=method, sparsity=0.999, distribution=distribution, total_steps=4, **options)
    sizes = [layer.masked.mask.numel() for layer in sm.layers]
    target = round(0.001 * sum(sizes))
    opt = torch.optim.SGD(sm.parameters(), lr=0.01)
    sm.attach(opt)
    for _ in range(4):
        loss = sm(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sm.step()
        active = [int(layer.masked.mask.sum()) for layer in sm.layers]
        assert min(active) >= 1, f"a layer has no weight: {active}"
    if method in ("static", "gmp"):  # on the budget (GMP's schedule has ended)
        assert abs(sum(active) - target) <= len(sizes), (active, target)
    if method == "feather":  # the surviving weight must pass its layer's threshold, not be zeroed by it
        layer = sm.layers[0]
        effective = layer.masked(layer.module.weight)
        assert int((effective != 0).sum()) >= 1


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=6), sparsity=st.floats(0.0, 0.9999),
       distribution=st.sampled_from(["uniform", "erk", "erk_floor", "global"]))
def test_layer_budgets_keep_a_weight_in_every_layer(sizes, sparsity, distribution):
    shapes = [(n,) if n < 4 else (n // 2, 2) if n % 2 == 0 else (n, 1) for n in sizes]
    numels = [math.prod(s) for s in shapes]
    kept_total = (1.0 - sparsity) * sum(numels)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            densities = layer_densities(shapes, sparsity, distribution, [f"l{i}" for i in range(len(shapes))])
    except ValueError as exc:
        assert distribution == "uniform"
        highest = float(re.search(r"highest feasible uniform sparsity is ([0-9.e-]+)", str(exc)).group(1))
        assert highest < sparsity
        assert all(round((1.0 - highest) * n) >= 1 for n in numels)  # the stated maximum is feasible
        return
    counts = [round(d * n) for d, n in zip(densities, numels)]
    assert all(1 <= c <= n for c, n in zip(counts, numels)), (counts, numels)
    if distribution != "uniform":
        if kept_total >= len(shapes):
            assert not caught
            assert sum(d * n for d, n in zip(densities, numels)) == pytest.approx(kept_total, rel=1e-6, abs=1e-6)
        else:
            assert counts == [1] * len(shapes) and "fewer than one per layer" in str(caught[0].message)


class Dropping(nn.Module):
    """Dropout written as most code writes it: a call whose mode is a Python bool."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.b(nn.functional.dropout(torch.relu(self.a(x)), 0.5, self.training))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_sparse_model_follows_its_mode_where_the_code_does(mode):
    """Traced in training mode, the SparseModel kept dropping units in eval mode (fold()
    differed by 0.4): it runs the graph of its current mode."""
    torch.manual_seed(0)
    model = Dropping().train(mode == "train")
    x = torch.randn(2, 3, 8, 8)
    sm = sparsify(model, x, method="static", sparsity=0.5)
    sm.eval()
    with torch.no_grad():
        assert torch.equal(sm(x), sm.fold().eval()(x))
        assert torch.equal(sm(x), sm(x))
    sm.train()
    with torch.no_grad():
        assert not torch.equal(sm(x), sm(x))  # dropout is on in training mode
    assert {name for name, _ in sm.state_dict().items()} >= {"graph.a.weight", "graph.spruce_masks.a.mask"}
