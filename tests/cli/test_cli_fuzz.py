"""Hostile input: fuzzed recipe documents and CLI arguments give a clear error (exit 2) or
succeed; never a traceback, never a partial output file."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from spruce.cli.main import main
from spruce.compiler.recipes import Recipe, RecipeError, load_recipe

KEYS = list(Recipe.model_fields) + ["nonsense", "Epochs", ""]

hostile_values = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-10**12, max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.lists(st.integers(min_value=-5, max_value=40), max_size=5),
    st.dictionaries(st.text(max_size=8), st.floats(allow_nan=True), max_size=3),
)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(st.dictionaries(st.sampled_from(KEYS), hostile_values, max_size=6))
@example(document={"target_options": {"": 0.0}})  # found by CI: the message named neither key
def test_recipe_documents_either_validate_or_name_the_key(document):
    try:
        recipe = Recipe.from_mapping(document, "fuzz.yaml")
    except RecipeError as exc:
        message = str(exc)
        assert message.startswith("fuzz.yaml:")
        assert any(str(key) in message for key in document) or "sparsity or a budget" in message
        return
    # a recipe that validates holds only sane values
    assert recipe.epochs >= 1 and recipe.batch_size >= 1 and recipe.lr > 0 and math.isfinite(recipe.lr)
    assert recipe.sparsity is None or 0 <= recipe.sparsity < 1
    assert (recipe.sparsity is None) != (recipe.budget is None)


@FAST
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1"))))
def test_recipe_files_with_garbage_are_recipe_errors(tmp_path_factory, text):
    folder = tmp_path_factory.mktemp("recipes")
    for suffix in (".yaml", ".json"):
        path = folder / f"recipe{suffix}"
        path.write_text(text, encoding="utf-8", errors="surrogateescape")
        try:
            load_recipe(path)
        except RecipeError as exc:
            assert str(path) in str(exc)


arg_values = st.one_of(
    st.sampled_from(["-1", "0", "nan", "inf", "1e9", "0.5", "abc", "", "1,3,,4", "-1,3", "🙂", "latency=2",
                     "flops=-0.1", "params=abc", "latency", "2:4", "4:2", "channel", "x" * 300]),
    st.text(max_size=10),
)
COMPILE_OPTIONS = ["--epochs", "--batch-size", "--lr", "--sparsity", "--budget", "--structure", "--method",
                   "--distribution", "--target", "--data", "--input-shape", "--seed", "--bench-iters", "--option"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(COMPILE_OPTIONS), arg_values), min_size=1, max_size=3))
def test_compile_with_hostile_options_fails_cleanly(tmp_path_factory, capsys, pairs):
    folder = tmp_path_factory.mktemp("fuzz")
    out = folder / "out"
    argv = ["compile", "--out", str(out), "--quiet", "--epochs", "1", "--floor", "none"]  # 1 epoch: below any floor
    for option, value in pairs:
        argv += [option, value]
    # keep a run that happens to be valid short: the last --epochs wins, so the hostile one is checked
    code = main(argv + ["--bench-iters", "1"] if "--bench-iters" not in argv else argv)
    err = capsys.readouterr().err
    assert code in (0, 2), (argv, err)
    assert "Traceback" not in err
    if code == 2:
        assert "spruce: error:" in err
        assert list(folder.iterdir()) == []  # nothing half-written, no staging folder left
    else:
        assert json.loads((out / "report.json").read_text())["format"] == "spruce-compile-report"


@pytest.mark.parametrize("document", [
    "epochs: [1, 2]", "budget: {latency: .nan}", "model: 3", "{{{", "- a\n- b", "bench_batch_sizes: []",
    "sparsity: 0.5\nbudget: {flops: 0.5}", "target_options: [1]", "input_shape: [1, 0, 8, 8]",
])
def test_bad_recipe_files_exit_2_through_the_cli(tmp_path, capsys, document):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(document)
    out = tmp_path / "out"
    assert main(["compile", "--recipe", str(recipe), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spruce: error:") and "bad.yaml" in err and "Traceback" not in err
    assert not out.exists()


def test_no_traceback_reaches_a_real_terminal(tmp_path):
    """A real subprocess: hostile values end with one error line and exit 2."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"epochs": -3}))
    for argv in (["compile", "--recipe", str(recipe), "--out", str(tmp_path / "o")],
                 ["prune", "torchvision:resnet18", "--ratio", "nan", "--out", str(tmp_path / "p")],
                 ["bench", str(tmp_path / "missing.onnx"), "--target", "onnxruntime"],
                 ["profile", "torchvision:nosuch", "--out", str(tmp_path / "t.json")]):
        done = subprocess.run([sys.executable, "-m", "spruce.cli.main", *argv], capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 2, (argv, done.stderr)
        assert "Traceback" not in done.stderr and done.stderr.startswith("spruce: error:"), done.stderr
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["r.yaml"]
