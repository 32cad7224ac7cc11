"""Golden test: every method, and ``spruce compile``, give bitwise the results recorded at a5751ab.

The record (``tests/data/golden_a5751ab.json``) was made before the issue-10 redesign by
``tests/golden_methods.py`` at that commit; the same code runs here through the public
API (a method name and keyword options). Masks after every step, final masks, weights and
``sm.metrics`` must be equal bitwise; compile reports equal apart from timings.
"""

from __future__ import annotations

import json
from pathlib import Path

import golden_methods
import pytest

DATA = Path(__file__).parents[1] / "data"
GOLDEN = json.loads((DATA / "golden_a5751ab.json").read_text())


def test_the_golden_record_covers_every_built_in_method():
    from spruce.passes.sparsity.registry import METHODS, method_names

    package = "spruce.passes.sparsity.methods"
    built_in = {name for name in method_names() if METHODS[name].__module__.startswith(package)}
    recorded = {options["method"] for options in golden_methods.CASES.values()}
    assert recorded == built_in
    assert set(golden_methods.CASES) == set(GOLDEN["cases"])


@pytest.mark.parametrize("case", sorted(golden_methods.CASES))
def test_method_is_bitwise_equal_to_a5751ab(case):
    got = golden_methods.run_case(case)
    expected = GOLDEN["cases"][case]
    assert got["step_masks"] == expected["step_masks"]
    assert got["masks"] == expected["masks"]
    assert got["weights"] == expected["weights"]
    assert got["metrics"] == expected["metrics"]


def _same_recipe(old: dict, new: dict) -> dict:
    """The recorded (format-1) recipe in today's shape: ``method`` + ``method_options`` became
    one mapping ``method: {name: ..., options...}`` holding every option's value."""
    old = dict(old)
    name, options = old.pop("method"), old.pop("method_options")
    method = dict(new["method"])
    assert method.pop("name") == name
    for key, value in options.items():
        assert method[key] == value
    return {**old, "method": new["method"]}


@pytest.mark.parametrize("case", sorted(golden_methods.COMPILES))
def test_compile_report_is_equal_to_a5751ab_apart_from_timings(case):
    got = golden_methods.run_compile(case)
    expected = dict(GOLDEN["compile"][case])
    expected["recipe"] = _same_recipe(expected["recipe"], got["recipe"])
    assert got == expected


def test_compile_scales_method_defaults_as_a5751ab_did():
    from spruce.passes.sparsity.method import RunLength
    from spruce.passes.sparsity.registry import method_config

    for name, structure, steps, old_options in GOLDEN["scaled_defaults"]:
        config = method_config(name).for_run(RunLength(total_steps=steps, steps_per_epoch=steps,
                                                       structure=structure))
        default = method_config(name)
        scaled = {k: v for k, v in config.model_dump().items()
                  if k != "steps_per_epoch" and v != getattr(default, k)}
        assert scaled == old_options, (name, structure, steps)


@pytest.mark.parametrize("name", sorted(golden_methods.CHECKPOINTS))
def test_a_format_1_checkpoint_resumes_as_it_did_at_a5751ab(name):
    resumed = golden_methods.resume_checkpoint(str(DATA / f"checkpoint_v1_{name}.pt"))
    expected = json.loads((DATA / "checkpoint_v1_resumed.json").read_text())[name]
    assert resumed == expected
