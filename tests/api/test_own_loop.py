"""spruce from the user's own training loop gives what ``compile`` gives (issue 30): defaults
scaled to the run, every refusal before the first step, warnings only when they mean something."""

from __future__ import annotations

import warnings

import pytest
import spruce
import torch
import torch.nn as nn
import torch.nn.functional as F
from spruce.passes.sparsity.method import RunLength
from spruce.passes.sparsity.model import StaleOptimizerWarning
from spruce.passes.sparsity.registry import METHODS, method_names

STEPS = 8  # a short run: every case trains a tiny model this many steps
X = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def structure_options(config_class, structure: str) -> dict:
    """The sparsify options of a short run of ``structure`` (a budget for budgeted channel methods)."""
    if structure == "channel":
        if config_class.budgeted:
            return {"structure": "channel", "budget": {"flops": 0.5}, "sparsity": 0.0, "distribution": "uniform"}
        return {"structure": "channel", "sparsity": 0.5, "distribution": "uniform"}
    if structure == "n:m":
        return {"structure": "2:4"}
    return {"structure": "unstructured", "sparsity": 0.5, "distribution": "erk"}


def train(sm, optimizer, steps: int = STEPS, seed: int = 1) -> None:
    """A real loop: SGD on random batches, ``sm.step()`` after every optimizer step."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        inputs, labels = torch.randn(4, 4, 6, 6, generator=gen), torch.randint(0, 4, (4,), generator=gen)
        loss = F.cross_entropy(sm(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        sm.step()


# ---- 2. refusals before the run: from every registered method's config schema ---------------------

def _bound_values(schema: dict, steps: int) -> list:
    """The values at the bounds a field's JSON schema declares: each enum choice, None where
    allowed, the minimum (just above an exclusive one) and the maximum (just below an exclusive
    one); an integer without a maximum takes 2 x ``steps`` (longer than the run) as its top."""
    values: list = []
    for option in schema.get("anyOf", [schema]):
        kind = option.get("type")
        if kind == "null":
            values.append(None)
        elif "enum" in option:
            values += option["enum"]
        elif kind == "integer":
            low = option.get("minimum", option.get("exclusiveMinimum", -1) + 1)
            values += [low, option.get("maximum", max(low, 2 * steps))]
        elif kind == "number":
            if "minimum" in option or "exclusiveMinimum" in option:
                values.append(option["minimum"] if "minimum" in option else option["exclusiveMinimum"] + 1e-3)
            if "maximum" in option or "exclusiveMaximum" in option:
                values.append(option["maximum"] if "maximum" in option else option["exclusiveMaximum"] - 1e-3)
    return values  # a free string (a registry name: criterion) has no bounds here


def _cases() -> list:
    cases = []
    for name in method_names():
        config_class = METHODS[name].Config
        for index, structure in enumerate(config_class.structures):
            # the defaults on every structure; the fields at their bounds on the method's first
            # structure here, on the others behind the slow marker
            cases.append(pytest.param(name, structure, None, None, id=f"{name}-{structure}-defaults"))
            marks = () if index == 0 else (pytest.mark.slow,)
            for field, schema in config_class.model_json_schema()["properties"].items():
                for value in dict.fromkeys(_bound_values(schema, STEPS)):
                    cases.append(pytest.param(name, structure, field, value, marks=marks,
                                              id=f"{name}-{structure}-{field}={value}"))
    return cases


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("name", "structure", "field", "value"), _cases())
def test_sparsify_refuses_or_the_run_completes(name, structure, field, value):
    """A method's config, at its defaults or with one field at a bound, with ``total_steps``:
    ``sparsify`` or ``attach`` refuses it (``ValueError`` naming the option set), or a short
    run completes and exports. Nothing may be refused from ``step``: any error there fails."""
    config_class = METHODS[name].Config
    options = {} if field is None else {field: value}
    try:
        config = config_class(**options)
        sm = spruce.sparsify(tiny_cnn(), X, config, total_steps=STEPS, **structure_options(config_class, structure))
    except ValueError as refusal:
        if field is not None and field not in ("seed",):
            assert field in str(refusal), f"the refusal names no option: {refusal}"
        return
    optimizer = torch.optim.SGD(sm.parameters(), lr=0.05, momentum=0.9)
    if "steps_per_epoch" in config_class.needs and sm.method.config.steps_per_epoch is None:
        with pytest.raises(ValueError, match="epoch length"):
            sm.attach(optimizer)  # no epoch length: a method that needs one refuses here, not halfway
        sm.attach(optimizer, loader=[None] * (STEPS // 2))  # given: the run must then complete
    else:
        sm.attach(optimizer)
    train(sm, optimizer)  # an exception here fails the test
    exported = sm.compact() if structure == "channel" else sm.fold()
    assert torch.isfinite(exported.eval()(X)).all()


# ---- 1. defaults scaled to the run -------------------------------------------------------------------

def test_default_configs_are_scaled_to_the_run_as_compile_scales_them():
    """Issue 30: HALPConfig() with total_steps=112 raised "interval=100 is longer than end_fraction x
    total_steps = 56"; sparsify now scales every option the user did not set, with compile's rule."""
    sm = spruce.sparsify(tiny_cnn(), X, spruce.HALPConfig(), structure="channel", budget={"flops": 0.5},
                         total_steps=112)
    run = RunLength(112, structure="channel", kernel_widths=False)
    assert sm.method.config == spruce.HALPConfig().for_run(run)
    assert sm.method.config.interval == 112 // 20 and sm.method.config.round_to == 1
    assert sm.spec.method == sm.method.config  # what a checkpoint replays
    # compile's own scaling also rounds channel counts to kernel widths; sparsify leaves round_to alone
    assert spruce.HALPConfig().for_run(RunLength(112, structure="channel")).round_to == 8
    rigl = spruce.sparsify(tiny_cnn(), X, spruce.RigLConfig(), total_steps=112)
    assert rigl.method.config.delta_t == 112 // 20


def test_options_set_explicitly_are_kept_and_refused_when_they_cannot_fit():
    sm = spruce.sparsify(tiny_cnn(), X, spruce.RigLConfig(delta_t=50), total_steps=112)
    assert sm.method.config.delta_t == 50  # set by the user: kept (pydantic's model_fields_set)
    with pytest.raises(ValueError, match=r"rigl: no mask update fits: delta_t=100 .* = 84; lower delta_t"):
        spruce.sparsify(tiny_cnn(), X, spruce.RigLConfig(delta_t=100), total_steps=112)
    kept = spruce.sparsify(tiny_cnn(), X, "halp", structure="channel", budget={"flops": 0.5}, total_steps=112,
                           interval=7)
    assert kept.method.config.interval == 7
    with pytest.raises(ValueError, match=r"halp: no pruning step fits: interval=100 .* = 56; lower interval"):
        spruce.sparsify(tiny_cnn(), X, spruce.HALPConfig(interval=100), structure="channel",
                        budget={"flops": 0.5}, total_steps=112)


# ---- 2. OptG's epoch length: before the run, never halfway -------------------------------------------

def test_optg_takes_the_epoch_length_from_the_loader_or_refuses_at_attach():
    sm = spruce.sparsify(tiny_cnn(), X, "optg", sparsity=0.5, total_steps=STEPS)
    optimizer = torch.optim.SGD(sm.parameters(), lr=0.05)
    with pytest.raises(ValueError, match=r"optg: the epoch length is unknown.*steps_per_epoch=len\(loader\)"):
        sm.attach(optimizer)
    with pytest.raises(ValueError, match="has no len"):
        sm.attach(optimizer, loader=iter([1, 2]))
    with pytest.raises(ValueError, match="disagrees"):
        sm.attach(optimizer, steps_per_epoch=3, loader=[0] * 4)
    sm.attach(optimizer, loader=[0] * 4)  # 4 batches: 2 epochs of 4 steps
    # 2 epochs of 4 steps; a run this short (under MIN_PERIODS epochs) derives its mask every step
    assert sm.method.steps_per_epoch == 4 and sm.method.period() == 1 and sm.method.n_epochs() == 8
    train(sm, optimizer)
    pruned = sum(int((~layer.masked.mask).sum()) for layer in sm.layers)
    total = sum(layer.masked.mask.numel() for layer in sm.layers)
    assert pruned == round(0.5 * total)  # the last epoch is at the target


# ---- 6. StaleOptimizerWarning only when a stale optimizer steps --------------------------------------

@pytest.mark.parametrize("export", ["compact", "fold"])
def test_a_loop_that_exports_at_the_end_hears_no_stale_optimizer_warning(export):
    sm = spruce.sparsify(tiny_cnn(), X, "static", structure="channel", sparsity=0.5, distribution="uniform")
    optimizer = torch.optim.SGD(sm.parameters(), lr=0.05)
    sm.attach(optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaleOptimizerWarning)
        train(sm, optimizer, steps=2)
        small = getattr(sm, export)()
        train(sm, optimizer, steps=2)  # training the SparseModel on after an export is no mistake
        fresh = torch.optim.SGD(small.parameters(), lr=0.05)  # the remedy: a new optimizer on the new model
        F.cross_entropy(small(X), torch.tensor([0, 1])).backward()
        fresh.step()


@pytest.mark.parametrize("export", ["compact", "fold"])
def test_the_warning_fires_once_when_the_stale_optimizer_steps_for_the_exported_model(export):
    sm = spruce.sparsify(tiny_cnn(), X, "static", structure="channel", sparsity=0.5, distribution="uniform")
    optimizer = torch.optim.SGD(sm.parameters(), lr=0.05)
    sm.attach(optimizer)
    small = getattr(sm, export)()
    before = [p.detach().clone() for p in small.parameters()]
    optimizer.zero_grad()
    F.cross_entropy(small(X), torch.tensor([0, 1])).backward()
    with pytest.warns(StaleOptimizerWarning, match=r"compact\(\) / fold\(\) is trained.*new optimizer") as caught:
        optimizer.step()
    assert len(caught) == 1 and len(str(caught[0].message)) < 300  # short
    assert all(torch.equal(a, b) for a, b in zip(before, small.parameters()))  # what it warns about
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaleOptimizerWarning)
        optimizer.step()  # once per optimizer


# ---- 3. GMP in a short run: gradual, not one pruning step after its window -------------------------

def test_gmp_prunes_gradually_in_a_short_run():
    assert spruce.GMPConfig().for_run(RunLength(112, structure="unstructured")).delta_t == 4  # 84 steps / 20
    assert spruce.GMPConfig(delta_t=100).for_run(RunLength(112, structure="unstructured")).delta_t == 100
    sm = spruce.sparsify(tiny_cnn(), X, spruce.GMPConfig(), sparsity=0.9, total_steps=40)
    train(sm, torch.optim.SGD(sm.parameters(), lr=0.05, momentum=0.9), steps=40)
    pruned = [1.0 - sum(r["sparsity"].values()) / len(r["sparsity"]) for r in sm.metrics]
    assert len(sm.metrics) >= 10 and pruned == sorted(pruned, reverse=True)  # many steps, density falling
    assert all(sm.sparsities()[layer.name] == pytest.approx(1 - layer.density, abs=0.02) for layer in sm.layers)
