"""``--precision`` and the recipe's ``precision``: the torch-free table of which built-in target
builds which precision is the targets' own, and a recipe refuses what its target cannot build."""

from __future__ import annotations

import pytest
import torch
from spruce.compiler.precision import calibration_inputs
from spruce.compiler.recipes import Recipe, RecipeError
from spruce.compiler.specs import TARGET_PRECISIONS, check_precision_spec
from spruce.targets.base import target_class


def test_the_console_table_is_the_targets_own():
    assert {name: tuple(target_class(name).precisions) for name in TARGET_PRECISIONS} == TARGET_PRECISIONS


@pytest.mark.parametrize("target, precision, message", [
    ("torch", "int8", "target torch does not build int8 artifacts"),
    ("onnxruntime", "int4", "--precision must be one of fp32, int8, got 'int4'"),
])
def test_check_precision_spec(target, precision, message):
    with pytest.raises(RecipeError, match=message):
        check_precision_spec(target, precision)


def test_the_recipe_sets_the_precision_on_the_target_that_takes_it():
    recipe = Recipe(precision="int8")
    assert recipe.shipped_precision == "int8" and recipe.target_settings() == {"precision": "int8"}
    assert recipe.target_settings("fp32") == {"precision": "fp32"}  # the dense reference's target
    assert Recipe(target_options={"precision": "int8"}).shipped_precision == "int8"
    assert Recipe(target="torch", precision="fp32").target_settings() == {}  # torch's own option is dtype
    assert Recipe().shipped_precision == "fp32" and Recipe().target_settings() == {}


@pytest.mark.parametrize("fields, message", [
    ({"precision": "int8", "target": "torch"}, "precision: target torch: precision 'int8' is not supported"),
    ({"precision": "int8", "target_options": {"precision": "fp32"}}, "disagree"),
    ({"precision": "fp16"}, "precision"),
])
def test_a_recipe_refuses_a_precision_its_target_cannot_build(fields, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_mapping(fields)


@pytest.mark.parametrize("fields, message", [
    ({"precision": "int8", "selection_precision": "fp32", "budget": {"flops": 0.5}},
     "selection_precision fp32: the precision of the latency table, which only a latency budget profiles"),
    ({"precision": "int8", "selection_precision": "fp32", "selection_cost": "flops"},
     "but selection_cost flops steers the knapsack"),
    ({"target": "torch", "selection_precision": "int8", "budget": {"latency": 0.5}},
     "selection_precision: target torch: precision 'int8' is not supported"),
])
def test_a_recipe_refuses_a_selection_precision_that_cannot_apply(fields, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_mapping(fields)


def test_int8_calibration_samples_take_the_examples_size_where_recovery_windows_are_smaller():
    """Recovery windows smaller than the example (augment's ``size``) are resized to the example's
    size, which the INT8 artifact takes; other inputs are taken as they are, 128 rows in all."""
    example = torch.zeros(1, 3, 16, 24)
    windows = [torch.rand(4, 3, 8, 12) for _ in range(40)]
    samples = calibration_inputs(windows, example=example)
    assert [tuple(s[0].shape[1:]) for s in samples] == [(3, 16, 24)] * 32 and sum(len(s[0]) for s in samples) == 128
    flat = torch.full((4, 3, 8, 12), 0.25)
    assert torch.allclose(calibration_inputs([flat] * 32, example=example)[0][0], torch.full((4, 3, 16, 24), 0.25))
    tokens = [torch.randint(0, 9, (4, 7)) for _ in range(32)]  # not an image: as it is
    assert tuple(calibration_inputs(tokens, example=torch.zeros(1, 5, dtype=torch.long))[0][0].shape) == (4, 7)
