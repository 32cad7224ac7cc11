"""Recipes: one validator (pydantic) with a JSON schema for files; everything, the method's
options included, is checked when the recipe loads, before any work."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import spruce
import yaml
from spruce import HALPConfig, IEEConfig
from spruce.cli.main import main
from spruce.compiler import loading, stages
from spruce.compiler.recipes import Recipe, RecipeError, load_recipe, recipe_schema

RECIPE_PAGE = Path(__file__).resolve().parents[2] / "docs" / "howto" / "compile.md"


def readme_recipe() -> str:
    """The example recipe of the docs' "Recipe files" section (its first yaml block)."""
    section = RECIPE_PAGE.read_text(encoding="utf-8").split("## Recipe files", 1)[1]
    return re.search(r"```yaml\n(.*?)```", section, re.S).group(1)


def test_the_schema_validates_the_readme_example_recipe(tmp_path):
    document = yaml.safe_load(readme_recipe())
    schema = recipe_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(document, schema)
    path = tmp_path / "recipe.yaml"
    path.write_text(readme_recipe())
    recipe = load_recipe(path)  # the same document passes the recipe's own validation
    assert recipe.method == IEEConfig(h=20, j=20, q=20)
    assert recipe.to_dict()["method"] == document["method"]


@pytest.mark.parametrize("document", [
    {"method": {"name": "iee", "h": 0}},
    {"method": {"name": "iee", "hh": 20}},
    {"method": {"name": "nosuch"}},
    {"epochs": 0},
    {"budget": {"speed": 0.5}},
    {"budget": {"latency": 1.5}},
    {"bench_batch_sizes": []},
    {"zzz": 1},
])
def test_the_schema_and_the_validator_refuse_the_same_bad_documents(document):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(document, recipe_schema())
    with pytest.raises(RecipeError):
        Recipe.from_mapping(document, "doc")


def test_recipes_round_trip_and_keep_which_options_were_given():
    recipe = Recipe(method=HALPConfig(interval=5), budget={"flops": 0.5}, epochs=2)
    again = Recipe.from_mapping(json.loads(json.dumps(recipe.to_dict())))
    assert again == recipe and again.method.model_fields_set == {"interval"}
    assert Recipe(method="rigl", structure="unstructured", sparsity=0.5, budget=None).method.name == "rigl"
    # a format-1 recipe: method name and method_options apart
    old = Recipe.from_mapping({"method": "iee", "method_options": {"h": 20}})
    assert old.method == IEEConfig(h=20)
    # the command line's --method keeps the recipe's options for the same method only
    assert Recipe(method={"name": "iee", "h": 7}).with_overrides(method="iee").method.h == 7
    assert Recipe(method={"name": "iee", "h": 7}).with_overrides(method="halp").method == HALPConfig()


def test_an_nm_structure_alone_takes_its_sparsity_instead_of_the_default_budget():
    for recipe in (Recipe(structure="2:4"), Recipe().with_overrides(structure="2:4"),
                   Recipe.from_mapping({"structure": "2:4"})):
        assert (recipe.sparsity, recipe.budget) == (0.5, None)
    assert Recipe(structure="1:4").sparsity == 0.75
    assert Recipe(structure="channel").budget == {"latency": 0.5}  # channels keep the default budget
    with pytest.raises(RecipeError, match="a cost budget selects channels"):  # a budget asked for stays refused
        Recipe(structure="2:4", budget={"latency": 0.5})


def test_defaults_live_in_the_recipe_only():
    from spruce.cli import compile as cli_pipeline

    parser = __import__("argparse").ArgumentParser()
    cli_pipeline.add_arguments(parser)
    text = " ".join(parser.format_help().split())
    defaults = Recipe()
    assert f"training epochs (default {defaults.epochs})" in text
    assert f"sparse-training method (default {defaults.method.name})" in text


@pytest.fixture
def no_work(monkeypatch):
    """Fail loudly if compile reaches data loading or training."""
    def boom(*args, **kwargs):
        raise AssertionError("compile did work before validating the recipe")

    monkeypatch.setattr(loading, "load_data", boom)
    monkeypatch.setattr(stages, "trained_default", boom)


@pytest.mark.parametrize("method, message", [
    ("{name: iee, h: 0}", "h must be >= 1, got 0"),
    ("{name: iee, hh: 20}", "unknown option hh"),
    ("{name: halp, schedule: cubic}", "schedule must be one of"),
    ("{name: optg, alpha: -1}", "alpha must be > 0"),
    ("rigl", "does not support structure='channel'"),
])
def test_a_bad_method_option_fails_when_the_recipe_loads_before_any_training(tmp_path, capsys, no_work, method,
                                                                             message):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"method: {method}\nepochs: 1\n")
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_recipe(path)
    with pytest.raises(RecipeError, match=re.escape(message)):
        spruce.compile(recipe=path, out=tmp_path / "out")
    assert main(["compile", "--recipe", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spruce: error:") and message in err and str(path) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_method_options_on_the_command_line_are_validated_up_front(tmp_path, capsys, no_work):
    code = main(["compile", "--method", "iee", "--method-option", "q=0", "--out", str(tmp_path / "out")])
    assert code == 2 and "q must be >= 1" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("document, message", [
    ("target_options: {threads: 0}", "target_options: target onnxruntime: threads must be >= 1, got 0"),
    ("target_options: {thread: 2}", "target_options: target onnxruntime: unknown option thread"),
    ("target_options: {'': 2}", "target_options: target onnxruntime: unknown option '', got 2"),
    ("target: torch\ntarget_options: {dtype: float64}", "target torch: dtype must be one of"),
    ("target: nowhere", "unknown target 'nowhere'"),
])
def test_target_options_are_validated_when_the_recipe_loads(tmp_path, capsys, no_work, document, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(document + "\nepochs: 1\n")
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_recipe(path)
    assert main(["compile", "--recipe", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spruce: error:") and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_a_decode_budget_parses_torch_free_and_counts_as_a_latency_for_the_method():
    from spruce.compiler.specs import cost_budget, parse_budget

    assert parse_budget("decode=0.5") == {"decode": 0.5}
    assert cost_budget({"decode": 0.5}) == {"latency": 0.5} and cost_budget({"flops": 0.3}) == {"flops": 0.3}
    recipe = Recipe(budget={"decode": 0.5}, method="halp")  # a budgeted method takes it as a latency
    assert recipe.budget == {"decode": 0.5}
    with pytest.raises(RecipeError, match="fraction of dense"):
        parse_budget("decode=1.5")
