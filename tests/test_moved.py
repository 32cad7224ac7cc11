"""Old module paths and names raise an ImportError naming their new place (one table,
``spruce.moved.MOVED``), and nothing else changes: ``import spruce`` stays light, the new
paths import, an unknown module is still a plain ModuleNotFoundError."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import spruce
from spruce.moved import MOVED, ModuleMovedError, MovedFinder, NameMovedError, markdown_table

# every module the layout commit moved out of spruce.compiler, and the names that went away
MOVED_MODULES = {
    "spruce.compiler.capture": "spruce.capture.capture", "spruce.compiler.trace": "spruce.capture.trace",
    "spruce.compiler.hf": "spruce.capture.transformers", "spruce.compiler.api": "spruce.api.verbs",
    "spruce.compiler.prune": "spruce.api.prune", "spruce.compiler.checkpoint": "spruce.api.checkpoint",
    "spruce.compiler.deploy": "spruce.api.deploy", "spruce.compiler.checks": "spruce.api.checks",
    "spruce.compiler.stats": "spruce.api.stats", "spruce.compiler.examples": "spruce.zoo.architectures",
    "spruce.compiler.hf_examples": "spruce.zoo.transformers", "spruce.compiler.cli": "spruce.cli.main",
    "spruce.compiler.cli_common": "spruce.cli.common", "spruce.compiler.cli_pipeline": "spruce.cli.compile",
    "spruce.compiler.cli_profile": "spruce.cli.profile", "spruce.compiler.cli_bench": "spruce.cli.bench",
    "spruce.passes.oprules": "spruce.passes.rules", "spruce.passes.atenrules": "spruce.passes.rules",
    "spruce.passes.metarun": "spruce.passes.rules.meta",
}
GONE_NAMES = [("spruce.compiler.pipeline", "STAGES", "spruce.compile"),
              ("spruce.compiler.pipeline", "run_stages", "spruce.compile"),
              ("spruce.compiler.pipeline", "compile_model", "spruce.compile"),
              ("spruce.capture.transformers", "to_transformers", "spruce.to_transformers")]


@pytest.mark.parametrize("old, new", sorted(MOVED_MODULES.items()))
def test_an_old_module_path_raises_an_import_error_naming_the_new_one(old, new):
    with pytest.raises(ImportError, match=rf"^{old} moved to {new} \(") as caught:
        importlib.import_module(old)
    # by name: under pytest the repository root may also be imported as a package of its folder's name
    assert isinstance(caught.value, ModuleNotFoundError) and type(caught.value).__name__ == ModuleMovedError.__name__
    assert caught.value.name == old
    importlib.import_module(new)  # the new place is there


def test_a_name_from_an_old_module_names_its_own_new_place():
    with pytest.raises(ImportError, match="spruce.compiler.deploy moved to spruce.api.deploy.*save_onnx: use "
                                          "spruce.build"):
        exec("from spruce.compiler.deploy import save_onnx", {})
    with pytest.raises(ImportError, match="to_transformers: use spruce.to_transformers"):
        exec("from spruce.compiler.hf import to_transformers", {})


@pytest.mark.parametrize("module, name, new", GONE_NAMES)
def test_a_name_gone_from_a_module_raises_an_import_error_naming_its_new_place(module, name, new):
    with pytest.raises(ImportError, match=rf"^{module}\.{name} is gone: use {new} \(") as caught:
        exec(f"from {module} import {name}", {})
    assert type(caught.value).__name__ == NameMovedError.__name__
    with pytest.raises(ImportError, match=rf"use {new}"):
        getattr(importlib.import_module(module), name)


def test_the_table_holds_exactly_the_moved_paths_and_renders_one_row_each():
    modules = {entry.old: entry.new for entry in MOVED if entry.is_module}
    assert modules == MOVED_MODULES
    names = {(*entry.old.split(":"), entry.new) for entry in MOVED if not entry.is_module}
    assert names == set(GONE_NAMES)
    assert all(entry.reason for entry in MOVED)
    table = markdown_table().splitlines()
    assert len(table) == 2 + len(MOVED)
    for entry, row in zip(MOVED, table[2:]):
        assert row.startswith(f"| `{entry.old.replace(':', '.')}` | `{entry.new}`"), row


def test_nothing_else_is_affected():
    with pytest.raises(ModuleNotFoundError) as caught:
        importlib.import_module("spruce.compiler.nosuch")
    assert type(caught.value) is ModuleNotFoundError
    from spruce.compiler import pipeline

    assert not hasattr(pipeline, "nosuch")  # an ordinary AttributeError
    assert spruce.compile is pipeline.compile
    assert [type(finder).__name__ for finder in sys.meta_path].count(MovedFinder.__name__) == 1


def test_import_spruce_stays_light_and_raises_for_an_old_path_without_torch():
    code = ("import sys, spruce\n"
            "assert 'torch' not in sys.modules, 'import spruce imported torch'\n"
            "try:\n    import spruce.compiler.examples\nexcept ImportError as exc:\n    print(exc)\n"
            "assert 'torch' not in sys.modules, 'the hook imported torch'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("spruce.compiler.examples moved to spruce.zoo.architectures")


@pytest.mark.parametrize("name", ["bench", "build", "compile", "profile", "tests", "examples", "docs"])
def test_a_public_name_or_a_repository_folder_is_never_imported_as_a_module(name):
    """With the repository root as the package, ``import spruce.bench`` found the folder bench/ as
    a namespace package and put it over the function ``spruce.bench`` (a later ``spruce.bench(...)``
    raised "'module' object is not callable")."""
    with pytest.raises(ModuleNotFoundError, match=rf"^spruce\.{name} is not a module"):
        importlib.import_module(f"spruce.{name}")
    assert callable(getattr(spruce, name)) if name in ("bench", "build", "compile", "profile") else True
    assert spruce.bench.__module__ == "spruce.runtime.bench"
