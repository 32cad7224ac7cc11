"""Errors users see (#13, kind 6) and the line between user errors and bugs.

Every user error on the command line is one ``spruce: error:`` line, exit 2, and no file
left behind; a bug is one line saying so (exit 1) with the traceback saved to a file; Ctrl-C
is one line, exit 130. Library calls raise an error naming the option, shape or tensor.
"""

from __future__ import annotations

import copy
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import spruce
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from spruce.cli.main import main
from spruce.compiler.recipes import Recipe, RecipeError, load_recipe
from torch import nn

PRUNE_FILES = ["model.onnx", "model.onnx.spruce.json", "model.pt", "report.json"]  # what spruce prune writes


def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

TINY_SOURCE = """
import torch
from torch import nn

def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))

def make_meta():
    with torch.device("meta"):
        return make()
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model file outside every test's output folder: ``make`` takes N,3,H,W inputs."""
    path = tmp_path_factory.mktemp("models") / "tiny_model.py"
    path.write_text(TINY_SOURCE)
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_user_error(code: int, err: str, *expected: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("spruce: error:")]
    assert len(errors) == 1, err
    for text in expected:
        assert text in errors[0], err
    # nothing but argparse's usage lines around the one error line
    assert all(line.startswith(("spruce: error:", "usage:", " ")) for line in lines), err


# --- a wrong or huge --input-shape --------------------------------------------------------------


def test_prune_with_a_wrong_input_shape_is_a_user_error_and_writes_nothing(tmp_path, capsys):
    code, out, err = run(capsys, "prune", "torchvision:resnet18", "--input-shape", "1,1,32,32", "--ratio", "0.5",
                         "--out", str(tmp_path / "out"))
    assert_one_line_user_error(code, err, "1,1,32,32", "--input-shape", "expected input[1, 1, 32, 32] to have 3 "
                                                                         "channels")
    assert list(tmp_path.iterdir()) == []


def test_analyze_with_a_wrong_input_shape_prints_one_line(capsys):
    code, out, err = run(capsys, "analyze", "torchvision:resnet18", "--input-shape", "1,1,32,32")
    assert_one_line_user_error(code, err, "1,1,32,32")
    assert len(err.splitlines()) == 1 and out == ""


def test_a_shape_that_does_not_fit_is_a_trace_error_naming_the_node_without_printing_anything(capfd):
    import torchvision

    model = torchvision.models.resnet18().eval()
    with pytest.raises(spruce.TraceError) as caught:
        spruce.channel_groups(model, torch.randn(1, 1, 32, 32))
    message = str(caught.value)
    assert "at node 'conv1' (module conv1, a Conv2d)" in message and "1,1,32,32" in message
    assert "ShapeProp" not in message and "tlparse" not in message and len(message.splitlines()) == 1
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""  # torch's own traceback print is silenced


@pytest.mark.parametrize("command", ["analyze", "prune", "profile", "compile"])
def test_a_huge_input_shape_is_refused_before_anything_is_allocated(tmp_path, capsys, monkeypatch, tiny, command):
    allocated = []
    real_randn = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, **k: allocated.append(a) or real_randn(*a, **k))
    extra = {"analyze": [], "prune": ["--ratio", "0.5", "--out", str(tmp_path / "o")],
             "profile": ["--out", str(tmp_path / "t.json")], "compile": ["--out", str(tmp_path / "o")]}[command]
    start = time.perf_counter()
    code, _, err = run(capsys, command, f"{tiny}:make", "--input-shape", "1,3,100000,100000", *extra)
    assert_one_line_user_error(code, err, "1,3,100000,100000", "too large")
    assert allocated == [] and time.perf_counter() - start < 60
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    with pytest.raises(RecipeError, match="too large"):
        Recipe(input_shape=(1, 3, 100000, 100000))


@pytest.mark.parametrize("command", ["prune", "profile", "compile"])
def test_an_unbatched_input_shape_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, tiny, command):
    # (C, H, W): torch runs a Conv2d model on it, but dim 0 is no batch, so the model cannot run at
    # another batch size (prune's check, the ONNX export) and its layers cannot be timed at one (profile)
    extra = {"prune": ["--ratio", "0.5", "--out", str(tmp_path / "o")],
             "profile": ["--out", str(tmp_path / "t.json")], "compile": ["--out", str(tmp_path / "o")]}[command]
    code, _, err = run(capsys, command, f"{tiny}:make", "--input-shape", "3,8,5", *extra)
    assert_one_line_user_error(code, err)
    assert any(text in err for text in ("second batch size", "unbatched", "(1, 8, 5)")), err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


shape_lists = st.lists(st.lists(st.one_of(st.integers(-3, 12), st.sampled_from([0, 3, 2**14, 2**31, 10**12])),
                                min_size=0, max_size=6), min_size=1, max_size=3)


@fuzz(80)
@given(shape_lists, st.sampled_from([",", ";", " ,", "x"]))
def test_any_input_shape_either_analyzes_or_is_one_line_exit_2(capsys, tiny, shapes, separator):
    text = ";".join(separator.join(str(size) for size in shape) for shape in shapes) if separator != ";" else \
        ";".join(",".join(str(size) for size in shape) for shape in shapes)
    code, out, err = run(capsys, "analyze", f"{tiny}:make", "--input-shape", text)
    if code == 0:
        assert "prunable groups" in out and "Traceback" not in err
        return
    assert_one_line_user_error(code, err)
    if len(err) > 2000:
        raise AssertionError(f"unbounded message: {len(err)} characters")


@fuzz(8)
@given(st.lists(st.integers(1, 9), min_size=1, max_size=5))
@example([3, 8, 5])  # unbatched (C, H, W): dim 0 is no batch, so no second batch size runs
def test_prune_on_any_small_shape_writes_everything_or_nothing(tmp_path_factory, capsys, tiny, shape):
    folder = tmp_path_factory.mktemp("prune")
    code, _, err = run(capsys, "prune", f"{tiny}:make", "--input-shape", ",".join(map(str, shape)), "--ratio", "0.5",
                       "--out", str(folder / "out"))
    if code == 0:
        assert sorted(p.name for p in (folder / "out").iterdir()) == PRUNE_FILES
    else:
        assert_one_line_user_error(code, err)
        assert list(folder.iterdir()) == []


# --- recipes: alias bombs and unbounded echoes -------------------------------------------------

BOMB = "\n".join(["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
                 + [f"{chr(ord('a') + i)}: &{chr(ord('a') + i)} [" + ", ".join([f"*{chr(ord('a') + i - 1)}"] * 9) + "]"
                    for i in range(1, 9)]) + "\n"


def test_a_yaml_alias_bomb_is_refused_before_it_expands(tmp_path, capsys):
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(BOMB)  # 9**9 (387 million) strings once expanded
    start = time.perf_counter()
    with pytest.raises(RecipeError, match=r"line 1: YAML anchors and aliases .* are not allowed") as caught:
        load_recipe(recipe)
    assert len(str(caught.value)) < 500 and time.perf_counter() - start < 10
    code, _, err = run(capsys, "compile", "--recipe", str(recipe), "--out", str(tmp_path / "out"))
    assert_one_line_user_error(code, err, "bomb.yaml", "aliases")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.yaml"]


@pytest.mark.parametrize("document", ["epochs: &e 3\n", "method: {name: iee}\nseed: *x\n",
                                      "<<: {epochs: 2}\n" + "x: &y 1\n"])
def test_any_anchor_or_alias_in_a_recipe_is_refused(tmp_path, document):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(document)
    with pytest.raises(RecipeError, match="anchors and aliases|r.yaml"):
        load_recipe(recipe)


def test_a_recipe_with_too_many_nodes_is_refused(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("bench_batch_sizes: [" + ", ".join(["1"] * 10_001) + "]\n")
    with pytest.raises(RecipeError, match="more than 10,000 YAML nodes"):
        load_recipe(recipe)


huge_values = st.one_of(
    st.text(min_size=1000, max_size=5000), st.integers(10**50, 10**60),
    st.lists(st.integers(), min_size=200, max_size=2000),
    st.dictionaries(st.text(max_size=300), st.one_of(st.integers(), st.text(max_size=300)), min_size=50, max_size=300),
    st.recursive(st.integers(), lambda inner: st.lists(inner, min_size=3, max_size=6), max_leaves=500),
)
ALL_KEYS = [*Recipe.model_fields, "method_options", "x" * 5000]


@fuzz(120)
@given(st.dictionaries(st.sampled_from(ALL_KEYS), huge_values, min_size=1, max_size=4),
       st.sampled_from([None, "iee", "rigl", {"name": "iee"}, {"name": "x" * 3000}]))
def test_recipe_errors_echo_bounded_values(document, method):
    if method is not None and "method" not in document:
        document = {**document, "method": method}
    try:
        Recipe.from_mapping(document, "fuzz.yaml")
    except RecipeError as exc:
        assert len(str(exc)) < 6000, len(str(exc))
        assert str(exc).startswith("fuzz.yaml:")


# --- every option checked before any work ------------------------------------------------------

# per flag: values a user might type (most valid), then anything
FLAG_VALUES = {
    "--method": ["iee", "halp", "rigl", "static", "gmp", "set", "feather", "optg", "dst_ee", "nosuch"],
    "--structure": ["channel", "unstructured", "2:4", "4:2", "1:1"],
    "--distribution": ["uniform", "erk", "global", "ERK"],
    "--method-option": ["h=2", "h=0", "h=abc", "delta_t=3", "interval=2", "nosuch=1", "seed=-1", "name=iee"],
    "--sparsity": ["0.5", "0.95", "-1", "nan", "1"],
    "--budget": ["latency=0.5", "flops=0.5", "params=0.3", "params=2", "latency", "=0.5"],
    "--epochs": ["1", "0"],
    "--target": ["onnxruntime", "torch", "tensorrt", "nosuch"],
    "--option": ["threads=1", "threads=0", "nosuch=1", "device=cuda"],
    "--data": ["digits", "nosuch.py:f", "x"],
    "--batch-size": ["8", "0"],
    "--lr": ["0.1", "-1", "nan", "inf"],
    "--bench-iters": ["1", "0"],
}
flag_pairs = st.sampled_from(sorted(FLAG_VALUES)).flatmap(
    lambda flag: st.tuples(st.just(flag), st.one_of(st.sampled_from(FLAG_VALUES[flag]), st.text(max_size=6))))


@fuzz(60)
@given(st.lists(flag_pairs, min_size=1, max_size=4))
def test_compile_flags_are_all_checked_before_any_training(tmp_path_factory, capsys, monkeypatch, pairs):
    """The first stage (load_setup: target, data, model) runs for real; a stand-in for the training
    stage then checks that nothing a later stage validates can still fail."""
    from spruce.compiler import pipeline
    from spruce.passes.sparsity.method import RunLength
    from spruce.passes.sparsity.model import check_options

    reached = []

    def training_stand_in(setup, workspace):
        recipe = setup.recipe
        method = recipe.method.for_run(RunLength(setup.total_steps, len(setup.data.train), recipe.structure))
        check_options(method, recipe.structure, recipe.sparsity or 0.0, setup.total_steps, None,
                      recipe.distribution, recipe.budget)
        reached.append(recipe)
        raise KeyboardInterrupt  # stop here: exit 130

    monkeypatch.setattr(pipeline, "dense_reference", training_stand_in)
    folder = tmp_path_factory.mktemp("flags")
    argv = ["compile", "--out", str(folder / "out"), "--quiet", "--epochs", "1"]
    for flag, value in pairs:
        argv += [flag, value]
    code, _, err = run(capsys, *argv)
    assert "Traceback" not in err
    event("reached training" if reached else "refused")
    if reached:
        assert code == 130 and err.strip().splitlines()[-1] == "spruce: interrupted"
    else:
        assert_one_line_user_error(code, err)
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("options, expected", [
    ({"method": "nosuch"}, "unknown method 'nosuch'"),
    ({"structure": "3:2"}, "0 < N < M"),
    ({"distribution": "nosuch"}, "distribution must be one of"),
    ({"method": {"name": "iee", "h": 0}}, "h must be >= 1"),
    ({"method": "rigl", "structure": "2:4", "sparsity": 0.5, "budget": None}, "does not support structure"),
    ({"data": "nosuch"}, "unknown data 'nosuch'"),
    ({"model": "nosuch"}, "cannot resolve model spec 'nosuch'"),
])
def test_the_library_compile_checks_options_before_any_work(tmp_path, monkeypatch, options, expected):
    from spruce.compiler import pipeline

    monkeypatch.setattr(pipeline, "load_setup", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(RecipeError, match=expected):
        spruce.compile(out=tmp_path / "out", **options)
    assert list(tmp_path.iterdir()) == []


def test_sparsify_checks_options_before_capturing(monkeypatch):
    from spruce.api import verbs as api

    monkeypatch.setattr(api, "capture", lambda *a, **k: pytest.fail("captured"))
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    for options, expected in [({"method": "nosuch"}, "unknown method"), ({"structure": "9:3"}, "0 < N < M"),
                              ({"distribution": "x" * 10000}, "unknown distribution"),
                              ({"method": "iee", "h": -1}, "h must be >= 1"),
                              ({"method": "iee", "nosuch": 1}, "unknown option nosuch")]:
        with pytest.raises(ValueError, match=expected) as caught:
            spruce.sparsify(model, torch.randn(1, 3, 8, 8), **{"method": "static", **options})
        assert len(str(caught.value)) < 600


# --- models without data ------------------------------------------------------------------------


def _meta_model() -> nn.Module:
    with torch.device("meta"):
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))


@pytest.mark.parametrize("call", [
    lambda m, x: spruce.prune(m, x, ratio=0.5),
    lambda m, x: spruce.sparsify(m, x, "static", sparsity=0.5),
    lambda m, x: spruce.profile(m, x, progress=False, use_cache=False),
], ids=["prune", "sparsify", "profile"])
def test_a_model_on_the_meta_device_is_a_clear_error(call):
    with pytest.raises(ValueError, match=r"0.weight, 0.bias, 1.weight and \d+ more are on the meta device .* "
                                         r"model.to_empty\(device='cpu'\)"):
        call(_meta_model(), torch.randn(1, 3, 8, 8))


def test_meta_models_still_trace_and_analyze_and_meta_inputs_are_named():
    groups = spruce.channel_groups(_meta_model(), torch.randn(1, 3, 8, 8))
    assert any(group.prunable for group in groups)  # the analysis needs shapes only
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    with pytest.raises(ValueError, match="example input 0 is on the meta device"):
        spruce.prune(model, torch.randn(1, 3, 8, 8, device="meta"), ratio=0.5)


def test_prune_of_a_meta_model_on_the_command_line_is_one_line(tmp_path, capsys, tiny):
    code, _, err = run(capsys, "prune", f"{tiny}:make_meta", "--input-shape", "1,3,8,8", "--ratio", "0.5",
                       "--out", str(tmp_path / "out"))
    assert_one_line_user_error(code, err, "meta device")
    assert list(tmp_path.iterdir()) == []


# --- optimizers that hold the wrong tensors ----------------------------------------------------


def _channel_model() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    return model, torch.randn(2, 3, 8, 8)


def test_an_optimizer_on_other_tensors_is_named_at_attach():
    from spruce.passes.sparsity.model import StaleOptimizerWarning

    model, x = _channel_model()
    stale = torch.optim.SGD(copy.deepcopy(model).parameters(), lr=0.1)  # e.g. built before a deepcopy/reload
    sm = spruce.sparsify(model, x, "static", sparsity=0.5)
    with pytest.warns(StaleOptimizerWarning, match=r"does not hold the weights of 2 of the 2 sparse layers \(0, 3\)"):
        sm.attach(stale)
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaleOptimizerWarning)
        sm.attach(torch.optim.SGD(model.parameters(), lr=0.1))  # the model's own parameters: shared, no warning
        sm.attach(torch.optim.SGD(sm.parameters(), lr=0.1))


@pytest.mark.parametrize("export", ["compact", "fold"])
def test_compact_and_fold_warn_when_the_attached_optimizer_steps_for_their_model(export):
    """Issue 30: the warning waits until the SparseModel's optimizer is used on the new model."""
    from spruce.passes.sparsity.model import StaleOptimizerWarning

    model, x = _channel_model()
    sm = spruce.sparsify(model, x, "static", structure="channel", sparsity=0.5, distribution="uniform")
    sm.attach(torch.optim.SGD(sm.parameters(), lr=0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaleOptimizerWarning)
        small = getattr(sm, export)()  # exporting at the end of a loop is no mistake
    before = [p.detach().clone() for p in small.parameters()]
    sm._optimizer.zero_grad()
    small(x).sum().backward()
    with pytest.warns(StaleOptimizerWarning, match=r"compact\(\) / fold\(\) is trained.*new optimizer"):
        sm._optimizer.step()  # what the warning is about: the old optimizer leaves the new model as it was
    assert all(torch.equal(a, b) for a, b in zip(before, small.parameters()))


# --- user errors and bugs ------------------------------------------------------------------------


def test_a_bug_exits_1_with_one_line_and_its_traceback_in_a_file(tmp_path, capsys, monkeypatch, tiny):
    from spruce.cli import common as cli_common

    monkeypatch.setattr(cli_common.tempfile, "gettempdir", lambda: str(tmp_path))
    from spruce.api import verbs

    def broken(*args, **kwargs):
        return {}["no such key"]  # a KeyError inside spruce

    monkeypatch.setattr(verbs, "channel_groups", broken)
    code, out, err = run(capsys, "analyze", f"{tiny}:make", "--input-shape", "1,3,8,8")
    assert code == 1 and out == ""
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("spruce: internal error (KeyError: 'no such key'); this is a bug, please report it")
    (saved,) = tmp_path.glob("spruce-crash-*.txt")
    assert str(saved) in err
    text = saved.read_text()
    assert "Traceback (most recent call last)" in text and "in broken" in text and "KeyError" in text


@pytest.mark.parametrize("error", [
    TypeError("unsupported operand"), AttributeError("'NoneType' object has no attribute 'shape'"),
    IndexError("list index out of range"), AssertionError("invariant"), ZeroDivisionError("division by zero"),
    RuntimeError("CUDA error: an illegal memory access"),
], ids=lambda e: type(e).__name__)
def test_the_catch_all_never_turns_a_bug_into_a_user_error(tmp_path, capsys, monkeypatch, tiny, error):
    from spruce.cli import common as cli_common

    monkeypatch.setattr(cli_common.tempfile, "gettempdir", lambda: str(tmp_path))
    from spruce.api import verbs

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(verbs, "channel_groups", broken)
    code, _, err = run(capsys, "analyze", f"{tiny}:make", "--input-shape", "1,3,8,8")
    assert code == 1 and "this is a bug" in err and "spruce: error:" not in err


def test_a_value_error_from_a_library_is_a_bug_one_from_spruce_a_user_error(tmp_path, capsys, monkeypatch, tiny):
    from spruce.cli import common as cli_common

    monkeypatch.setattr(cli_common.tempfile, "gettempdir", lambda: str(tmp_path))
    from spruce.api import verbs

    monkeypatch.setattr(verbs, "channel_groups", lambda *a, **k: np.zeros(-1))  # numpy's ValueError: a bug
    code, _, err = run(capsys, "analyze", f"{tiny}:make", "--input-shape", "1,3,8,8")
    assert code == 1 and "internal error (ValueError: negative dimensions" in err
    assert not cli_common.is_user_error(KeyError("x"))
    try:
        spruce.prune(nn.Linear(2, 2), torch.randn(1, 2), ratio=2.0)
    except ValueError as exc:
        assert cli_common.is_user_error(exc)  # spruce's own ValueError: the user's option
    for exc in (OSError(28, "No space left on device"), spruce.TraceError("x"), MemoryError()):
        assert cli_common.is_user_error(exc)


def test_ctrl_c_exits_130_with_one_line(tmp_path, capsys, monkeypatch, tiny):
    from spruce.api import verbs

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(verbs, "channel_groups", interrupted)
    code, _, err = run(capsys, "analyze", f"{tiny}:make", "--input-shape", "1,3,8,8")
    assert code == 130 and err == "spruce: interrupted\n"


def test_no_traceback_for_user_errors_in_a_real_process(tmp_path, tiny):
    """The console script itself: one line on stderr, exit 2, for each kind of mistake above."""
    import subprocess
    import sys

    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(BOMB)
    runs = [["analyze", "torchvision:resnet18", "--input-shape", "1,1,32,32"],
            ["prune", f"{tiny}:make", "--input-shape", "1,3,100000,100000", "--ratio", "0.5", "--out",
             str(tmp_path / "o")],
            ["compile", "--recipe", str(recipe), "--out", str(tmp_path / "o")],
            ["compile", "--method", "iee", "--method-option", "h=abc", "--out", str(tmp_path / "o")]]
    for argv in runs:
        done = subprocess.run([sys.executable, "-m", "spruce.cli.main", *argv], capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 2, (argv, done.stderr)
        assert "Traceback" not in done.stderr and done.stderr.count("spruce: error:") == 1, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.yaml"]


def test_example_inputs_of_a_file_model_that_do_not_fit(tmp_path, capsys):
    source = tmp_path / "m.py"
    source.write_text(textwrap.dedent("""
        import torch
        from torch import nn
        EXAMPLE_INPUTS = (torch.randn(1, 5, 8, 8),)   # does not fit the model below
        def make():
            return nn.Conv2d(3, 4, 3)
        """))
    code, _, err = run(capsys, "prune", f"{source}:make", "--ratio", "0.5", "--out", str(tmp_path / "out"))
    assert_one_line_user_error(code, err, "does not run on example inputs of shape 1,5,8,8")
    assert "(from --input-shape)" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.py"]


def test_the_input_limit_is_named_in_the_error():
    from spruce.compiler.models import MAX_INPUT_ELEMENTS, check_input_sizes

    with pytest.raises(ValueError, match=f"{MAX_INPUT_ELEMENTS:,} elements"):
        check_input_sizes([(MAX_INPUT_ELEMENTS + 1,)])
