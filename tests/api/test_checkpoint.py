"""spruce checkpoints: round trips, kill-and-resume, and every bad file refused untouched."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import spruce
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.datasets import load_digits
from spruce.api.checkpoint import FORMAT_VERSION, CheckpointError, load, read, save

_DIGITS = load_digits()
X = torch.tensor(_DIGITS.images, dtype=torch.float32).unsqueeze(1) / 16.0
Y = torch.tensor(_DIGITS.target, dtype=torch.long)
OPTIONS = {"iee": {"h": 3, "j": 2, "q": 2}, "rigl": {"delta_t": 3}, "set": {"delta_t": 3}, "static": {},
           "gmp": {"delta_t": 3}, "optg": {"steps_per_epoch": 4, "alpha": 3.0}}


def cnn(width: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(256, 10))


def build(method: str, model: nn.Module | None = None):
    sm = spruce.sparsify(model or cnn(), (X[:2],), method=method, sparsity=0.8, total_steps=24, **OPTIONS[method])
    opt = torch.optim.Adam(sm.parameters(), lr=0.01)
    sm.attach(opt)
    return sm.train(), opt


def train(sm, opt, first: int, last: int) -> None:
    for step in range(first, last):
        batch = torch.randperm(len(X), generator=torch.Generator().manual_seed(step))[:32]
        loss = nn.functional.cross_entropy(sm(X[batch]), Y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sm.step()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), f"{name} was modified by a failed load"


def assert_same_training_state(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key, value in sa.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, sb[key]), key
    assert sa["_extra_state"]["metrics"] == sb["_extra_state"]["metrics"]
    for la, lb in zip(a.layers, b.layers):
        assert torch.equal(la.masked.mask, lb.masked.mask), la.name


@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_save_load_resume_equals_uninterrupted(tmp_path, method):
    whole, whole_opt = build(method)
    train(whole, whole_opt, 0, 24)
    first, first_opt = build(method)
    train(first, first_opt, 0, 10)  # mid-cycle for iee, between updates for rigl
    path = save(first, tmp_path / "ckpt.pt", first_opt, extra={"next_step": 10})
    model = cnn()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    resumed = load(path, model, optimizer=opt)  # example inputs from the recorded shapes
    assert resumed.checkpoint_extra == {"next_step": 10}
    assert resumed.step_count == 10 and resumed.method.name == method
    assert_same_training_state(first, resumed)
    train(resumed.train(), opt, 10, 24)
    assert_same_training_state(whole, resumed)
    if method != "static":
        assert whole.metrics  # masks really changed during the run


def test_checkpoint_records_the_recipe(tmp_path):
    sm = spruce.sparsify(cnn(), (X[:2],), method="gmp", structure="2:4", sparsity=0.5, distribution="uniform",
                         total_steps=50, exclude=["0"], delta_t=7, end_fraction=0.2)
    checkpoint = read(save(sm, tmp_path / "c.pt"))
    assert checkpoint["version"] == FORMAT_VERSION == 2
    recipe = checkpoint["recipe"]
    assert (recipe["structure"], recipe["sparsity"], recipe["distribution"], recipe["total_steps"],
            recipe["exclude"], recipe["budget"]) == ("2:4", 0.5, "uniform", 50, ["0"], None)
    # the method's config, every option recorded
    assert recipe["method"] == {"name": "gmp", "seed": 0, "delta_t": 7, "start_fraction": 0.0,
                                "end_fraction": 0.2, "initial_sparsity": 0.0}
    assert [name for name, _ in checkpoint["layers"]] == [layer.name for layer in sm.layers]
    masks = {k: v for k, v in checkpoint["model"].items() if k.endswith(".mask")}
    assert masks and all(v.dtype == torch.uint8 for v in masks.values())  # bit-packed
    rebuilt = load(tmp_path / "c.pt", cnn())
    assert (rebuilt.structure, rebuilt.n, rebuilt.m, rebuilt.exclude) == ("n:m", 2, 4, ("0",))
    assert [layer.name for layer in rebuilt.layers] == [layer.name for layer in sm.layers]


@pytest.fixture
def saved(tmp_path):
    sm, opt = build("iee")
    train(sm, opt, 0, 5)
    return save(sm, tmp_path / "good.pt", opt)


def refused(path, model: nn.Module, match: str, optimizer: torch.optim.Optimizer | None = None) -> None:
    before = snapshot(model)
    opt_before = copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None
    with pytest.raises(CheckpointError, match=match):
        load(path, model, optimizer=optimizer)
    assert_unchanged(model, before)
    if optimizer is not None:
        after = optimizer.state_dict()
        assert after["param_groups"] == opt_before["param_groups"]
        assert after["state"].keys() == opt_before["state"].keys()


def test_truncated_checkpoint_is_refused(saved, tmp_path):
    data = saved.read_bytes()
    for cut in (len(data) // 2, 100, 0):
        broken = tmp_path / f"cut{cut}.pt"
        broken.write_bytes(data[:cut])
        refused(broken, cnn(), "cannot be read|is corrupt")


@pytest.fixture(scope="module")
def saved_bytes(tmp_path_factory) -> bytes:
    sm, opt = build("rigl")
    train(sm, opt, 0, 2)
    return save(sm, tmp_path_factory.mktemp("ckpt") / "good.pt", opt).read_bytes()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.floats(0.0, 1.0, exclude_max=True), bit=st.integers(0, 7))
def test_a_single_flipped_bit_at_any_offset_is_refused(saved_bytes, tmp_path_factory, position, bit):
    data = bytearray(saved_bytes)
    data[int(position * len(data))] ^= 1 << bit
    flipped = tmp_path_factory.mktemp("flip") / "flipped.pt"
    flipped.write_bytes(bytes(data))
    refused(flipped, cnn(), "is corrupt|cannot be read|not a spruce checkpoint")


def test_a_flipped_bit_in_the_weights_is_refused(saved, tmp_path):  # the example: the payload's last bytes
    data = bytearray(saved.read_bytes())
    data[-2000] ^= 0x10
    flipped = tmp_path / "flipped.pt"
    flipped.write_bytes(bytes(data))
    refused(flipped, cnn(), "content does not match its sha256")


def test_foreign_files_are_refused(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save(cnn().state_dict(), plain)
    refused(plain, cnn(), "not a spruce checkpoint")
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    refused(text, cnn(), "cannot be read")
    refused(tmp_path / "missing.pt", cnn(), "no such file")


def test_newer_format_version_is_refused(saved, tmp_path):
    checkpoint = read(saved)
    checkpoint["version"] = FORMAT_VERSION + 1
    newer = tmp_path / "newer.pt"
    torch.save(checkpoint, newer)
    refused(newer, cnn(), "newer than this spruce reads")
    del checkpoint["recipe"]["method"]
    checkpoint["version"] = FORMAT_VERSION
    torch.save(checkpoint, newer)
    refused(newer, cnn(), "recipe.method")


V1 = Path(__file__).resolve().parents[1] / "data" / "checkpoint_v1_rigl.pt"  # written by spruce at a5751ab


def test_a_format_1_checkpoint_is_migrated_when_read():
    old = torch.load(V1, weights_only=True)
    assert old["version"] == 1 and old["recipe"]["method"] == "rigl" and "options" in old["recipe"]
    checkpoint = read(V1)
    assert checkpoint["version"] == FORMAT_VERSION == 2
    assert checkpoint["recipe"]["method"] == {"name": "rigl", **old["recipe"]["options"]}
    assert checkpoint["recipe"]["budget"] is None
    sm = load(V1, _golden_cnn())  # the resumed run is checked bitwise in test_golden.py
    assert sm.method.config == spruce.RigLConfig(**old["recipe"]["options"]) and sm.step_count == 10


def test_a_bad_format_1_checkpoint_is_refused_clearly(tmp_path):
    old = torch.load(V1, weights_only=True)
    bad = tmp_path / "bad_v1.pt"
    torch.save({**old, "recipe": {**old["recipe"], "options": {**old["recipe"]["options"], "delta_t": 0}}}, bad)
    refused(bad, _golden_cnn(), r"invalid options for method 'rigl'.*delta_t must be >= 1")
    del old["recipe"]["options"]
    torch.save(old, bad)
    refused(bad, _golden_cnn(), "recipe.options is missing")


def _golden_cnn() -> nn.Module:
    import golden_methods

    return golden_methods._cnn()


def test_other_architecture_is_refused_untouched(saved):
    refused(saved, cnn(width=12), "different architecture.*'0'")  # same layer names, other shapes
    renamed = nn.Sequential(nn.Sequential(*cnn()))
    refused(saved, renamed, "different architecture.*layer '0' is a Sequential")
    no_bn = cnn()
    no_bn[1] = nn.Identity()
    refused(saved, no_bn, "different architecture.*missing in the checkpoint|not in the model")


def test_mismatched_optimizer_is_refused_untouched(saved):
    model = cnn()
    wrong = torch.optim.Adam([p for p in model.parameters()][:3], lr=0.01)
    refused(saved, model, "parameter groups", optimizer=wrong)
    model2 = cnn()
    sm, opt = build("iee", model2)
    train(sm, opt, 0, 2)
    without = save(sm, saved.parent / "no_opt.pt")
    refused(without, cnn(), "no optimizer state", optimizer=torch.optim.Adam(cnn().parameters()))


def test_failed_save_leaves_the_previous_checkpoint(saved):
    sm, opt = build("rigl")
    good = saved.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - whatever pickle raises for a lambda
        save(sm, saved, opt, extra={"callback": lambda: None})
    assert saved.read_bytes() == good
    assert sorted(p.name for p in saved.parent.iterdir()) == ["good.pt"]  # no temporary file left


# ---------------------------------------------------------------------------- kill and resume

SCRIPT = textwrap.dedent(
    """
    import sys, time
    import torch, torch.nn as nn
    import spruce
    from sklearn.datasets import load_digits
    from spruce.api.checkpoint import load, save

    torch.set_num_threads(1)
    resume, ckpt, out, delay = sys.argv[1] == "resume", sys.argv[2], sys.argv[3], float(sys.argv[4])
    TOTAL, EVERY = 40, 4
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(256, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if resume:
        sm = load(ckpt, model, optimizer=opt)
    else:
        sm = spruce.sparsify(model, (x[:2],), method="iee", sparsity=0.8, total_steps=TOTAL, h=3, j=3, q=3)
        sm.attach(opt)
    sm.train()
    for step in range(sm.step_count, TOTAL):
        batch = torch.randperm(len(x), generator=torch.Generator().manual_seed(step))[:32]
        loss = nn.functional.cross_entropy(sm(x[batch]), y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sm.step()
        if sm.step_count % EVERY == 0:
            save(sm, ckpt, opt)
        time.sleep(delay)
    save(sm, out, opt)
    """
)


def run_script(tmp_path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(tmp_path / "train.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path):
    (tmp_path / "train.py").write_text(SCRIPT)
    ckpt = tmp_path / "last.pt"
    victim = subprocess.Popen([sys.executable, str(tmp_path / "train.py"), "run", str(ckpt), tmp_path / "never.pt",
                               "0.15"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until it is well into training (past an IEE prune)
        if ckpt.exists() and read(ckpt)["step_count"] >= 16:
            break
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    output, _ = victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL, output[-2000:]
    killed_at = read(ckpt)["step_count"]
    assert 16 <= killed_at < 40 and not (tmp_path / "never.pt").exists()  # really interrupted mid-training
    whole = run_script(tmp_path, "run", tmp_path / "whole-ckpt.pt", tmp_path / "whole.pt", 0)
    assert whole.returncode == 0, whole.stderr[-2000:]
    resumed = run_script(tmp_path, "resume", ckpt, tmp_path / "resumed.pt", 0)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = read(tmp_path / "whole.pt"), read(tmp_path / "resumed.pt")
    assert a["step_count"] == b["step_count"] == 40
    masks = [key for key in a["model"] if key.endswith(".mask")]
    assert len(masks) == 3
    for key, value in a["model"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b["model"][key]), key  # masks and weights alike
    assert a["model"]["_extra_state"]["metrics"] == b["model"]["_extra_state"]["metrics"]
    assert len(a["model"]["_extra_state"]["metrics"]) >= 2
    for key, value in a["optimizer"]["state"].items():
        assert torch.equal(value["momentum_buffer"], b["optimizer"]["state"][key]["momentum_buffer"])
