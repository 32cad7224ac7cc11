"""Module paths and names that moved or went away, with their new place and the reason.

:data:`MOVED` is the one table of them; the package installs :class:`MovedFinder` on import
(``spruce/__init__.py``), so that importing an old module path raises
:class:`ModuleMovedError` (a ``ModuleNotFoundError``, so an ``ImportError``) whose message
names the new place, and a module that lost a public name raises :class:`NameMovedError`
(an ``ImportError``) for it through :func:`moved_name`. The documentation's page of moved
paths is generated from this table (:func:`markdown_table`).

This module imports nothing but the standard library (``import spruce`` stays light).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from importlib.abc import MetaPathFinder

__all__ = ["MOVED", "NOT_MODULES", "ModuleMovedError", "Moved", "MovedFinder", "NameMovedError", "install",
           "markdown_table", "moved_name"]

_LAYOUT = "the layout by role: one role per folder (capture/, api/, cli/, zoo/ split out of compiler/)"


@dataclass(frozen=True)
class Moved:
    """``old`` (a module path, or ``module:name`` for a name a module no longer has) now lives
    at ``new`` (a module path, or a public name such as ``spruce.build``), for ``reason``.
    ``names``: public names of an old module whose new place is not ``new``'s same name."""

    old: str
    new: str
    reason: str
    names: dict[str, str] = field(default_factory=dict)

    @property
    def is_module(self) -> bool:
        return ":" not in self.old

    def message(self) -> str:
        """The error message: the old path, the new place and why."""
        if self.is_module:
            text = f"{self.old} moved to {self.new} ({self.reason})"
            if self.names:
                text += "; " + "; ".join(f"{name}: use {where}" for name, where in self.names.items())
            return text
        module, name = self.old.split(":")
        return f"{module}.{name} is gone: use {self.new} ({self.reason})"


MOVED: tuple[Moved, ...] = (
    Moved("spruce.compiler.capture", "spruce.capture.capture", f"{_LAYOUT}; capture is model -> CapturedGraph"),
    Moved("spruce.compiler.trace", "spruce.capture.trace", f"{_LAYOUT}; capture is model -> CapturedGraph"),
    Moved("spruce.compiler.hf", "spruce.capture.transformers",
          f"{_LAYOUT}; the transformers capture support is capture's",
          {"to_transformers": "spruce.to_transformers (spruce.api.transformers)"}),
    Moved("spruce.compiler.api", "spruce.api.verbs", f"{_LAYOUT}; the library verbs are api/'s"),
    Moved("spruce.compiler.prune", "spruce.api.prune", f"{_LAYOUT}; the library verbs are api/'s",
          {"select_channels": "spruce.api.prune.keep_top_channels"}),
    Moved("spruce.compiler.checkpoint", "spruce.api.checkpoint", f"{_LAYOUT}; the library verbs are api/'s"),
    Moved("spruce.compiler.deploy", "spruce.api.deploy", f"{_LAYOUT}; the library verbs are api/'s",
          {"save_onnx": "spruce.build (an artifact with its manifest, timed by spruce.bench)"}),
    Moved("spruce.compiler.checks", "spruce.api.checks", f"{_LAYOUT}; the library verbs are api/'s"),
    Moved("spruce.compiler.stats", "spruce.api.stats", f"{_LAYOUT}; the library verbs are api/'s"),
    Moved("spruce.compiler.examples", "spruce.zoo.architectures",
          f"{_LAYOUT}; acceptance models for tests and bench, not public API"),
    Moved("spruce.compiler.hf_examples", "spruce.zoo.transformers",
          f"{_LAYOUT}; acceptance models for tests and bench, not public API"),
    Moved("spruce.compiler.cli", "spruce.cli.main", f"{_LAYOUT}; the console is cli/'s"),
    Moved("spruce.compiler.cli_common", "spruce.cli.common", f"{_LAYOUT}; the console is cli/'s"),
    Moved("spruce.compiler.cli_pipeline", "spruce.cli.compile", f"{_LAYOUT}; one subcommand per file"),
    Moved("spruce.compiler.cli_profile", "spruce.cli.profile", f"{_LAYOUT}; one subcommand per file"),
    Moved("spruce.compiler.cli_bench", "spruce.cli.bench", f"{_LAYOUT}; one subcommand per file"),
    Moved("spruce.passes.oprules", "spruce.passes.rules",
          "per-operator knowledge: one module per op family in passes/rules/ (fx rule, ATen rule, rewrite and "
          "meta shape together); the tables are in spruce.passes.rules.registry"),
    Moved("spruce.passes.atenrules", "spruce.passes.rules",
          "the ATen rules live beside their fx rules, one module per op family in passes/rules/"),
    Moved("spruce.passes.metarun", "spruce.passes.rules.meta",
          "running a graph on meta tensors is part of passes/rules/ (spruce.passes.rules.meta)"),
    Moved("spruce.compiler.pipeline:STAGES", "spruce.compile",
          "compile calls its stages by name, in order, in one function (its source is the list)"),
    Moved("spruce.compiler.pipeline:run_stages", "spruce.compile",
          "compile calls its stages by name, in order, in one function"),
    Moved("spruce.compiler.pipeline:compile_model", "spruce.compile",
          "one entry: spruce.compile takes a Recipe (recipe=) and the output folder (out=)"),
    Moved("spruce.capture.transformers:to_transformers", "spruce.to_transformers",
          "the write-back to a transformers model is a library verb (spruce.api.transformers)"),
)

# folders of the repository that are not part of the package: with the repository root as the
# package (an editable install), ``import spruce.bench`` would otherwise find the folder bench/ as
# a namespace package and put it over the function spruce.bench
NOT_MODULES = ("bench", "build", "dist", "docs", "examples", "site", "tests")

_MODULES = {entry.old: entry for entry in MOVED if entry.is_module}
_NAMES = {tuple(entry.old.split(":")): entry for entry in MOVED if not entry.is_module}


class ModuleMovedError(ModuleNotFoundError):
    """An old module path was imported; the message names its new place."""


class NameMovedError(ImportError):
    """A name a module no longer has was imported; the message names its new place."""


class MovedFinder(MetaPathFinder):
    """Answers the import of an old module path of :data:`MOVED` with :class:`ModuleMovedError`;
    every other import is left to the finders after it."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> None:
        entry = _MODULES.get(fullname)
        if entry is not None:
            raise ModuleMovedError(entry.message(), name=fullname)
        package, _, name = fullname.partition(".")
        if package == "spruce" and name and "." not in name:
            public = getattr(sys.modules.get("spruce"), "_EXPORTS", {})
            if name in public:  # spruce.bench, spruce.build, ...: a public name, never a module
                raise ModuleNotFoundError(f"{fullname} is not a module: spruce.{name} is a public name of the "
                                          f"package (defined in spruce{public[name]})", name=fullname)
            if name in NOT_MODULES:
                raise ModuleNotFoundError(f"{fullname} is not a module of the package: {name}/ is a folder of "
                                          "the repository beside it", name=fullname)
        return None


def install() -> None:
    """Put one :class:`MovedFinder` first on ``sys.meta_path``, replacing any installed before
    (by a reload, or by a second copy of the package imported under another name)."""
    sys.meta_path[:] = [finder for finder in sys.meta_path if type(finder).__name__ != MovedFinder.__name__]
    sys.meta_path.insert(0, MovedFinder())


def moved_name(module: str, name: str) -> NameMovedError | AttributeError:
    """The error for ``module.name`` where ``module`` has no attribute ``name``: a
    :class:`NameMovedError` naming the new place when the name is in :data:`MOVED`, else the
    ordinary ``AttributeError``. A module's ``__getattr__`` raises it."""
    entry = _NAMES.get((module, name))
    if entry is None:
        return AttributeError(f"module {module!r} has no attribute {name!r}")
    return NameMovedError(entry.message(), name=module)


def markdown_table() -> str:
    """:data:`MOVED` as a Markdown table (old path | new place | why), for the documentation."""
    rows = ["| old path | new place | why |", "|---|---|---|"]
    for entry in MOVED:
        old = entry.old.replace(":", ".")
        new = entry.new + "".join(f"; `{name}`: {where}" for name, where in entry.names.items())
        rows.append(f"| `{old}` | `{entry.new}`{new[len(entry.new):]} | {entry.reason} |")
    return "\n".join(rows) + "\n"
