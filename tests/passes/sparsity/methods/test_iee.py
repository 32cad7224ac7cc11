"""IEE (Algorithm 1) invariants on a real training loop."""

import pytest
import torch
import torch.nn as nn
from helpers import SGDLoop, resume_run, save_run, sparsify


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(4, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 8),
    )


X = torch.randn(2, 4, 8, 8)
H, J, Q = 3, 2, 2  # period 7


def make(total=70, **kw):
    return sparsify(cnn(), X, method="iee", sparsity=0.9, total_steps=total, h=H, j=J, q=Q, **kw)


def Loop(sm, seed=0):  # noqa: N802 - reads as the class it builds
    """A real SGD loop on random batches of (4, 4, 8, 8) with 8 classes (tests/helpers.py)."""
    return SGDLoop(sm, (4, 4, 8, 8), 8, seed)


def test_stage_boundaries_follow_algorithm_1():
    sm = make(total=70)
    iee = sm.method
    stages = {}
    loop = Loop(sm)
    for _ in range(70):
        stage = iee.stage(sm.step_count + 1)  # what step() is about to do after this batch
        loop.step()
        if stage:
            stages[sm.step_count] = stage
    # Algorithm 1 index i = step + 1: prune when (i+J+Q) % 7 == 0, explore when (i+Q) % 7 == 0, grow when i % 7 == 0
    assert [s for s, v in stages.items() if v == "prune"] == [2, 9, 16, 23, 30, 37, 44]
    assert [s for s, v in stages.items() if v == "explore"][:2] == [4, 11]
    assert [s for s, v in stages.items() if v == "grow"][:2] == [6, 13]
    # cycles only start before 3/4 of training (52.5 steps here); the last one finishes
    assert max(s for s, v in stages.items() if v == "grow") == 48
    assert len(sm.metrics) == 7


def test_omega_starts_at_0_3_and_decays():
    sm = make(total=700)
    iee = sm.method
    assert iee.omega() == pytest.approx(0.3)
    values = []
    for t in range(iee.n_cycles()):
        iee.cycle = t
        values.append(iee.omega())
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert values[-1] < 0.01


def test_reactivate_explore_freezes_k_and_restores_mru_and_grow_takes_topk():
    sm = make(total=70)
    iee = sm.method
    loop = Loop(sm)
    targets = [int(layer.masked.mask.sum()) for layer in sm.layers]
    while sm.step_count < 2:
        loop.step()
    # prune happened after step 2: K shrank by Omega^0 of the active set, dropped values kept as MRU
    for layer, target in zip(sm.layers, targets):
        k = iee.budgets[layer.name]
        assert k == int(0.3 * target)
        assert int(iee.active[layer.name].sum()) == target - k
        assert torch.all(layer.module.weight[~iee.active[layer.name]] == 0)
    mru = {name: t.clone() for name, t in iee.mru.items()}
    while sm.step_count < 4:
        loop.step()
    # explore started after step 4: every pruned weight back with its MRU value, all active in the forward
    snapshot = {}
    for layer in sm.layers:
        active = iee.active[layer.name]
        assert torch.equal(layer.module.weight[~active], mru[layer.name][~active])
        assert bool(layer.masked.mask.all())
        snapshot[layer.name] = layer.module.weight.detach().clone()
    loop.step()  # step 5: inside Reactivate & Explore
    for layer in sm.layers:
        active = iee.active[layer.name]
        assert torch.equal(layer.module.weight[active], snapshot[layer.name][active])  # bitwise frozen
        assert not torch.equal(layer.module.weight[~active], snapshot[layer.name][~active])  # P trains
    # step 6 ends the cycle: grow ArgTopK(|Theta_P|, Omega^t)
    budgets = dict(iee.budgets)
    active_before = {n: t.clone() for n, t in iee.active.items()}
    x = torch.randn(4, 4, 8, 8, generator=loop.gen)
    y = torch.randint(0, 8, (4,), generator=loop.gen)
    nn.functional.cross_entropy(sm(x), y).backward()
    loop.opt.step()
    loop.opt.zero_grad()
    sm.method.on_step(6)  # the weights the grow step will score
    scores = {layer.name: layer.module.weight.detach().abs().clone() for layer in sm.layers}
    sm.step_count = 5
    sm.step()
    for layer, target in zip(sm.layers, targets):
        grown = layer.grown
        candidates = scores[layer.name][~active_before[layer.name]]
        kth = torch.topk(candidates.flatten(), budgets[layer.name]).values.min()
        assert int(grown.sum()) == budgets[layer.name]
        assert scores[layer.name][grown].min() >= kth
        assert int(layer.masked.mask.sum()) == target  # sparsity back on target after the update
        assert torch.all(layer.module.weight[~layer.masked.mask] == 0)


def test_iee_keeps_sparsity_on_target_after_every_update_and_resumes(tmp_path):
    sm = make(total=70)
    targets = [int(layer.masked.mask.sum()) for layer in sm.layers]
    loop = Loop(sm, seed=3)
    for _ in range(70):
        loop.step()
        if sm.metrics and sm.metrics[-1]["step"] == sm.step_count:
            assert [int(layer.masked.mask.sum()) for layer in sm.layers] == targets
    record = sm.metrics[-1]
    assert set(record) >= {"iou_prune", "iou_grow", "survival", "exploration", "sparsity"}
    assert all(0.0 <= v <= 1.0 for v in record["iou_grow"].values())
    for layer in sm.layers:  # exploration degree: ever-active fraction grows beyond the density
        degrees = [r["exploration"][layer.name] for r in sm.metrics]
        assert all(a <= b for a, b in zip(degrees, degrees[1:]))
        assert degrees[-1] > layer.density + 1e-6

    # resume mid-cycle (inside Reactivate & Explore) equals the uninterrupted run
    first = make(total=70)
    loop1 = Loop(first, seed=3)
    for _ in range(33):
        loop1.step()
    save_run(tmp_path / "c.pt", first, loop1)
    second = make(total=70)
    loop2 = resume_run(tmp_path / "c.pt", second, Loop)
    for _ in range(37):
        loop2.step()
    for a, b in zip(sm.layers, second.layers):
        assert torch.equal(a.masked.mask, b.masked.mask)
        assert torch.equal(a.module.weight, b.module.weight)


def test_iee_on_2_4_refills_every_group_to_exactly_two():
    from spruce.passes.sparsity.masking import nm_counts

    sm = sparsify(cnn(), X, method="iee", structure="2:4", total_steps=70, h=H, j=J, q=Q)
    loop = Loop(sm, seed=5)
    grows = 0
    for _ in range(40):
        loop.step()
        if sm.metrics and sm.metrics[-1]["step"] == sm.step_count:
            grows += 1
            for layer in sm.layers:
                assert torch.all(nm_counts(layer.masked.mask, 4) == 2)
                assert torch.all(layer.module.weight[~layer.masked.mask] == 0)
    assert grows >= 4
    changed = [r["iou_grow"] for r in sm.metrics[1:]]
    assert any(v < 1.0 for rec in changed for v in rec.values())  # the 2:4 pattern really moves


def test_iee_never_starts_a_cycle_it_cannot_finish():
    sm = sparsify(cnn(), X, method="iee", sparsity=0.9, total_steps=13, h=6, j=6, q=6)
    targets = [int(layer.masked.mask.sum()) for layer in sm.layers]
    initial = sm.sparsities()
    loop = Loop(sm)
    for _ in range(13):
        loop.step()
    assert [int(layer.masked.mask.sum()) for layer in sm.layers] == targets
    assert sm.sparsities() == initial  # not left dense by a half-finished cycle
    assert not sm.metrics  # no cycle could finish in 13 steps, so none started


def bn_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(4, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 8),
    )


def _state(sm, opt):
    """Every parameter and buffer of the model and the momentum of every parameter, by name."""
    model = sm.method.ctx.source
    values = {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    momentum = {n: opt.state[p]["momentum_buffer"].clone() for n, p in model.named_parameters()
                if "momentum_buffer" in opt.state.get(p, {})}
    return values, momentum


@pytest.mark.parametrize("freeze", ["structure", "weights"])
def test_reactivate_explore_freezes_the_whole_active_structure_and_its_momentum(freeze):
    """Issue 15: Algorithm 1 freezes Theta_K; BN gamma/beta, biases, running statistics and the
    momentum of frozen weights moved with the dense network before (freeze="weights", kept as an
    option: the same checks find them moving)."""
    sm = sparsify(bn_cnn(), X, method="iee", sparsity=0.9, total_steps=70, h=H, j=J, q=Q, freeze=freeze)
    iee = sm.method
    loop = Loop(sm, seed=7)
    sm.train()
    while iee.stage(sm.step_count + 1) != "explore":
        loop.step()
    loop.step()  # explore starts: Theta_P back at its MRU values
    assert iee.exploring
    values, momentum = _state(sm, loop.opt)
    explorable = {f"{layer.name}.weight": ~iee.active[layer.name] for layer in sm.layers}
    moved_outside_p, p_trains = set(), False
    while iee.stage(sm.step_count + 1) != "grow":
        loop.step()
        now, now_momentum = _state(sm, loop.opt)
        for name, value in values.items():
            keep = ~explorable[name] if name in explorable else torch.ones_like(value, dtype=torch.bool)
            if not torch.equal(now[name][keep], value[keep]):
                moved_outside_p.add(name)
            if name in explorable:
                p_trains |= not torch.equal(now[name][~keep], value[~keep])
        for name, value in momentum.items():
            keep = ~explorable[name] if name in explorable else torch.ones_like(value, dtype=torch.bool)
            if not torch.equal(now_momentum[name][keep], value[keep]):
                moved_outside_p.add(f"momentum of {name}")
    assert p_trains  # Theta_P trains on the dense network
    if freeze == "structure":
        assert not moved_outside_p
    else:  # only the sparse weights were held: BN, biases, running stats and momentum moved
        assert {"1.weight", "1.bias", "1.running_mean", "0.bias"} <= moved_outside_p
        assert any(name.startswith("momentum of") for name in moved_outside_p)


def test_a_run_resumed_inside_reactivate_explore_equals_the_uninterrupted_one(tmp_path):
    def run(steps, loop=None, sm=None):
        for _ in range(steps):
            loop.step()
        return sm

    whole = sparsify(bn_cnn(), X, method="iee", sparsity=0.9, total_steps=40, h=H, j=J, q=Q)
    loop = Loop(whole, seed=8)
    run(40, loop, whole)
    first = sparsify(bn_cnn(), X, method="iee", sparsity=0.9, total_steps=40, h=H, j=J, q=Q)
    loop1 = Loop(first, seed=8)
    run(12, loop1, first)
    assert first.method.exploring and first.method.freezer is not None
    save_run(tmp_path / "c.pt", first, loop1)
    second = sparsify(bn_cnn(), X, method="iee", sparsity=0.9, total_steps=40, h=H, j=J, q=Q)
    loop2 = resume_run(tmp_path / "c.pt", second, Loop)
    run(28, loop2, second)
    tensors = [dict([*sm.method.ctx.source.named_parameters(), *sm.method.ctx.source.named_buffers()])
               for sm in (whole, second)]
    assert tensors[0].keys() == tensors[1].keys()
    for name, value in tensors[0].items():
        assert torch.equal(value, tensors[1][name]), name
    for a, b in zip(whole.layers, second.layers):
        assert torch.equal(a.masked.mask, b.masked.mask)


def test_unstructured_cycles_end_at_three_quarters_and_the_first_always_runs():
    sm = make(total=70)
    assert sm.method.horizon() == 0.75 * 70
    short = sparsify(cnn(), X, method="iee", sparsity=0.9, total_steps=20, h=3, j=2, q=2, end_fraction=0.05)
    loop, stages = Loop(short), []
    for _ in range(20):
        stages.append(short.method.stage(short.step_count + 1))
        loop.step()
    assert stages.count("prune") == 1 and stages.count("grow") == 1  # 0.05 x 20 = 1 step < H: one cycle
    assert len(short.metrics) == 1
