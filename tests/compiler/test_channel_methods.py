"""``spruce compile --structure channel --recover distill --method halp|iee`` (#14): the named
method re-selects channels during recovery under the budget, its final selection is checked
against the budget as measured on real ONNX Runtime sessions, and the artifact is the
SparseModel's compact model. The trained model and image folder are test_trained's."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from spruce.api.verbs import sparsify
from spruce.compiler import channel_methods, stages
from spruce.compiler.recipes import Recipe
from spruce.passes.importance import importance_scores, param_table
from spruce.passes.sparsity.knapsack import InfeasibleBudget
from spruce.passes.sparsity.methods.halp import HALP
from torch import nn


def _sibling(name: str):
    """A test module next to this one (tests run with --import-mode=importlib: no package)."""
    spec = importlib.util.spec_from_file_location(f"_sibling_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_trained = _sibling("test_trained")  # its trained EdgeNet, photo folder, compile call and budget check
trained, image_dir = _trained.trained, _trained.image_dir  # fixtures
BUDGET, HW, _compile, budget_hit = _trained.BUDGET, _trained.HW, _trained._compile, _trained.budget_hit

METHODS = ("halp", "iee")


def _kept(sparse) -> dict[int, list[int]]:
    return {u.group.id: u.mask.nonzero().flatten().tolist() for u in sparse.context.units}


def _spy_on_final_check(seen: list):
    real = channel_methods.check_final

    def spy(sparse, *args, **kwargs):
        result = real(sparse, *args, **kwargs)
        seen.append((sparse, _kept(sparse)))  # the SparseModel whose compact() export ships, and what was measured
        return result

    return spy


@pytest.fixture(scope="module")
def driven(trained, image_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    results = {}
    with pytest.MonkeyPatch.context() as patch:
        for name in METHODS:
            seen: list = []
            patch.setattr(stages, "check_final", _spy_on_final_check(seen))
            report = _compile(trained, image_dir, root / name, recover="distill", method=name)
            assert len(seen) == 1, f"{name}: the final check ran {len(seen)} times"
            results[name] = (report, *seen[0])
    return results


@pytest.mark.parametrize("name", METHODS)
def test_the_named_method_runs_mask_updates_during_recovery(driven, name):
    recovery = driven[name][0].document["recovery"]
    assert recovery["mode"] == "distill" and recovery["steps"] > 0
    assert recovery["method"]["method"] == name and recovery["method"]["budget"] == {"latency": BUDGET}
    assert recovery["mask_updates"] >= 1 and recovery["selections"] >= 1, recovery
    assert recovery["method"]["criterion"] == "taylor_bn" and recovery["method"]["zero_gradient_fallback"] == "bn_scale"
    assert f"re-selected during recovery by method {name}" in recovery["selection"]
    report_md = (driven[name][0].out_dir / "report.md").read_text()
    assert f"channels re-selected by method {name} (taylor_bn; {recovery['selections']} knapsack" in report_md


@pytest.mark.parametrize("name", METHODS)
def test_the_measured_budget_holds_after_the_methods_last_selection(driven, name):
    budget = driven[name][0].document["budget"]
    assert budget_hit(driven[name][0].document), budget
    final = budget["final_check"]
    assert final["ratio"] == budget["measured_ratio"] <= 1.05 * BUDGET
    assert final["method_ratio"] is not None and (final["re_aimed"] or final["method_ratio"] == final["ratio"])
    assert 1 <= final["after_step"] <= driven[name][0].document["recovery"]["steps"]
    assert budget["in_band"] == (0.9 * BUDGET <= final["ratio"] <= 1.05 * BUDGET)
    assert budget["compiled_measured_ms"] < budget["dense_measured_ms"]


@pytest.mark.filterwarnings("ignore::spruce.passes.sparsity.model.StaleOptimizerWarning")  # recovery's optimizer
@pytest.mark.parametrize("name", METHODS)
def test_the_artifact_is_the_sparse_models_compact_model(driven, name):
    report, sparse, measured = driven[name]
    assert _kept(sparse) == measured  # no update after the final check: what was measured ships
    compact = sparse.compact().eval()
    shipped = torch.load(report.out_dir / "model.pt", weights_only=False).eval()
    x = torch.rand(2, 3, *HW, generator=torch.Generator().manual_seed(1))
    session = ort.InferenceSession(str(report.out_dir / report.document["compiled"]["artifact"]),
                                   providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        edge, (colour, brightness) = compact(x)
        shipped_edge = shipped(x)[0]
    assert [p.shape for p in shipped.parameters()] == [p.shape for p in compact.parameters()]
    torch.testing.assert_close(shipped_edge, edge)
    for ort_out, torch_out in zip(got, (edge, colour, brightness)):
        np.testing.assert_allclose(ort_out, torch_out.numpy(), rtol=1e-3, atol=1e-4)
    assert report.document["compiled"]["params"] < report.document["dense"]["params"]


def test_without_updates_the_count_is_zero_and_the_final_check_re_aims(trained, image_dir, tmp_path,
                                                                       monkeypatch):
    """Mutation: HALP never updates, so the model stays dense through recovery. The report
    counts 0 updates, and the measured check after recovery must re-aim to the budget."""
    monkeypatch.setattr(HALP, "is_update", lambda self, step: False)
    report = _compile(trained, image_dir, tmp_path / "out", recover="distill", method="halp")
    document = report.document
    assert document["recovery"]["mask_updates"] == 0 and document["recovery"]["selections"] == 0
    final = document["budget"]["final_check"]
    assert final["re_aimed"] and final["attempts"] >= 2
    assert budget_hit(document), document["budget"]


def test_a_final_check_that_ignores_the_budget_is_caught(trained, image_dir, tmp_path, monkeypatch):
    """Mutation: the final selection is judged against a budget of 1.0 (anything passes) while
    HALP never prunes: the dense model ships and the budget check must reject it."""
    monkeypatch.setattr(HALP, "is_update", lambda self, step: False)
    real = channel_methods.check_final

    def ignoring_budget(sparse, drive, *args, **kwargs):
        return real(sparse, channel_methods.MethodDrive(drive.method, drive.criterion, drive.fallback, drive.kind,
                                                        1.0, drive.aim), *args, **kwargs)

    monkeypatch.setattr(stages, "check_final", ignoring_budget)
    report = _compile(trained, image_dir, tmp_path / "out", recover="distill", method="halp")
    assert not budget_hit(report.document)


def test_only_a_named_method_drives_channels():
    """The default recipe's method is not a request: channels are then chosen once, as before."""
    assert not Recipe().method_named and Recipe(method="halp").method_named
    assert Recipe.from_mapping({"method": "iee"}).method_named
    assert Recipe().with_overrides(epochs=2).method_named is False
    budget = {"latency": 0.5}
    halp = Recipe(method="halp").method
    assert channel_methods.drives_channels("channel", "distill", halp, True, budget)
    assert channel_methods.drives_channels("channel", "loss", halp, True, budget)
    assert not channel_methods.drives_channels("channel", "none", halp, True, budget)
    assert not channel_methods.drives_channels("channel", "distill", halp, False, budget)
    assert not channel_methods.drives_channels("2:4", "distill", halp, True, budget)


# --- zero gradients at the start of distillation: the documented fallback -----------------------


def _bn_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 5))
    with torch.no_grad():  # a trained model's gammas: spread out, the largest nowhere near a prefix
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(torch.rand(module.num_features) * 2 - 1)
    return model


def _zero_gradient_steps(sm, steps: int) -> None:
    """Training steps whose loss is identically zero (a student equal to its teacher)."""
    optimizer = torch.optim.SGD(sm.parameters(), lr=0.1)
    sm.attach(optimizer)
    sm.train()
    for _ in range(steps):
        out = sm(torch.randn(4, 3, 8, 8))
        loss = (out - out.detach()).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        sm.step()


@pytest.mark.parametrize("fallback", [True, False])
def test_the_first_selection_without_gradients_keeps_the_largest_gammas(fallback):
    """HALP's first prune with all gradients exactly zero: with the fallback, every group
    keeps the channels of largest |gamma| (bn_scale); without it (the mutation) the knapsack
    chooses among ties and this check fails."""
    sm = sparsify(_bn_cnn(), torch.randn(1, 3, 8, 8), method="halp", structure="channel", budget={"flops": 0.5},
                  total_steps=8, interval=2, end_fraction=0.5)
    if not fallback:
        sm.method.meter.fallback = None
    gammas = {u.group.id: importance_scores("bn_scale", u.group, param_table(sm.context.source),
                                            np.random.default_rng(0)) for u in sm.units}
    _zero_gradient_steps(sm, 2)
    assert sm.method.prunes_done == 1
    largest = []
    for unit in sm.units:
        kept = np.flatnonzero(unit.mask.numpy())
        assert 0 < len(kept) < unit.group.size
        largest.append(set(kept) == set(np.argsort(-gammas[unit.group.id], kind="stable")[:len(kept)]))
    assert all(largest) == fallback
    assert sm.method.activity() == {"selections": 1, "importance_fallbacks": 1 if fallback else 0}


def test_a_gradient_signal_is_used_as_is():
    sm = sparsify(_bn_cnn(), torch.randn(1, 3, 8, 8), method="iee", structure="channel", budget={"flops": 0.5},
                  total_steps=12, h=2, j=2, q=2)
    optimizer = torch.optim.SGD(sm.parameters(), lr=0.01)
    sm.attach(optimizer)
    sm.train()
    for _ in range(6):
        loss = sm(torch.randn(4, 3, 8, 8)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        sm.step()
    activity = sm.method.activity()
    assert activity["selections"] == 2 and activity["importance_fallbacks"] == 0 and activity["cycles"] == 1


def test_a_final_selection_that_cannot_reach_the_budget_fails_clearly(trained, image_dir, tmp_path, monkeypatch):
    """HALP never prunes (the dense model reaches the check) and the re-aim is asked for 2 % of
    dense, which no subset of the channels measures: InfeasibleBudget names the method and the
    smallest reachable latency, and no output is left."""
    monkeypatch.setattr(HALP, "is_update", lambda self, step: False)
    from spruce.api import budget as measured_budget  # check_final's re-aim is spruce.meet_budget's

    real = measured_budget.meet_latency_budget

    def unreachable(analysis, model, table, target, budget, *args, **kwargs):
        return real(analysis, model, table, target, 0.02, *args, **kwargs)

    monkeypatch.setattr(measured_budget, "meet_latency_budget", unreachable)
    out = tmp_path / "out"
    with pytest.raises(InfeasibleBudget, match=r"method halp's final channels measure .* smallest reachable latency"):
        _compile(trained, image_dir, out, recover="distill", method="halp")
    assert not out.exists()
