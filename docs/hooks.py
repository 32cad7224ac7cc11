"""MkDocs hooks for spruce's site: the API reference follows the code.

- The API reference pages name no module path by hand: a line ``<!-- api: public -->`` becomes a
  table of the public names of ``spruce`` (the top-level ``_EXPORTS`` map, read without importing
  torch), each linked to its entry on its package's page, and ``<!-- api: PACKAGE -->`` one
  mkdocstrings block per module of that package (its ``.py`` files and those of its sub-packages
  without a marker of their own, private ones left out). A module moved or split needs no edit.
- mkdocstrings finds the package in this checkout (the repository root *is* ``spruce``), not an
  installed copy: a temporary folder holding a ``spruce`` link to the root goes first on its path.
"""

from __future__ import annotations

import ast
import re
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_MARKER = re.compile(r"^<!-- api: ([\w.]+) -->$", re.M)
_LINK_DIR = tempfile.TemporaryDirectory(prefix="spruce-docs-")


def public_exports() -> dict[str, str]:
    """``spruce``'s public names -> their defining module (``spruce.api.prune``), from ``_EXPORTS``."""
    tree = ast.parse((ROOT / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXPORTS" for t in node.targets):
            exports = ast.literal_eval(node.value)
            return {name: "spruce" + module for name, module in exports.items()}
    raise RuntimeError("spruce/__init__.py has no _EXPORTS")


def package_modules(package: str, own_pages: set[str] = frozenset()) -> list[str]:
    """Dotted names of the public modules of ``package`` (``spruce.passes``), sorted, those of its
    sub-packages included unless a sub-package has its own marker (``own_pages``)."""
    folder = ROOT.joinpath(*package.split(".")[1:])
    modules = [f"{package}.{path.stem}" for path in sorted(folder.glob("*.py")) if not path.stem.startswith("_")]
    for sub in sorted(p for p in folder.iterdir() if (p / "__init__.py").exists()) if folder.is_dir() else ():
        name = f"{package}.{sub.name}"
        if name not in own_pages and not sub.name.startswith("_"):
            modules += [name, *package_modules(name, own_pages)]
    return modules


def marked_packages() -> set[str]:
    """Every package some page of docs/ marks with ``<!-- api: PACKAGE -->``."""
    return {m for page in (ROOT / "docs").rglob("*.md") for m in _MARKER.findall(page.read_text(encoding="utf-8"))}


def _blocks(what: str) -> str:
    if what == "public":  # a table linking each name to its entry on its package's page
        rows = [f"| [`spruce.{name}`][{module}.{name}] | `{module}` |"
                for name, module in sorted(public_exports().items())]
        return "\n".join(["| name | defined in |", "|---|---|", *rows])
    return "\n\n".join(f"::: {module}" for module in package_modules(what, marked_packages()))


def on_config(config):
    link = Path(_LINK_DIR.name) / "spruce"
    if not link.exists():
        link.symlink_to(ROOT, target_is_directory=True)
    python = config.plugins["mkdocstrings"].config.handlers.setdefault("python", {})
    python.setdefault("paths", []).insert(0, _LINK_DIR.name)
    return config


def on_page_markdown(markdown, page, config, files):
    return _MARKER.sub(lambda match: _blocks(match.group(1)), markdown)
