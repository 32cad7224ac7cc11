"""The documentation as a user meets it: README.md, CONTRIBUTING.md and the site in docs/.

- Every ```python block runs, page by page (the blocks of one page share a namespace, in
  order, in a scratch folder), unless the line before its fence is ``<!-- skip: REASON -->``
  with a reason.
- Every dotted ``spruce.…`` path named in the docs, the README, CONTRIBUTING and the library's
  docstrings imports (a module, or an attribute of one).
- The docs name only what any user can run: no tool of the machines spruce was built on.
- The README is a landing page (at most 150 lines); its results table cites, for every figure,
  the bench results file that holds it, with the command that produced it.
- The moved-module table: every new path imports and no old path does.
"""

from __future__ import annotations

import ast
import importlib
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").rglob("*.md"))
DOCS = [README, ROOT / "CONTRIBUTING.md", *PAGES]
LIBRARY = ("__init__.py", "api", "capture", "cli", "compiler", "passes", "runtime", "targets", "zoo")

_FENCE = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)
_SKIP = re.compile(r"<!-- skip: (.*?) -->\s*\Z")
_PATH = re.compile(r"(?<![\w./:-])spruce(?:\.[A-Za-z_]\w*)+")
# dotted names the docs use that are not import paths, and why
NOT_IMPORT_PATHS = {
    "spruce.methods": "the entry-point group a package declares its methods in",
}


def python_blocks(path: Path) -> list[tuple[str, str | None]]:
    """``(code, skip reason or None)`` for each top-level ```python block of ``path``, in order."""
    text = path.read_text(encoding="utf-8")
    blocks = []
    for match in _FENCE.finditer(text):
        skip = _SKIP.search(text[:match.start()].rstrip() + " ")
        blocks.append((match.group(1), skip.group(1).strip() if skip else None))
    return blocks


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


RUNNABLE = [p for p in DOCS if p.exists() and any(reason is None for _, reason in python_blocks(p))]


@pytest.mark.parametrize("page", RUNNABLE, ids=_rel)
def test_every_python_block_of_a_page_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # files a block writes land in a scratch folder
    namespace: dict = {"__name__": "__docs__"}
    for number, (code, reason) in enumerate(python_blocks(page), 1):
        if reason is None:
            exec(compile(code, f"{_rel(page)} block {number}", "exec"), namespace)  # noqa: S102


@pytest.mark.parametrize("page", [p for p in DOCS if p.exists()], ids=_rel)
def test_a_skipped_block_says_why(page):
    text = page.read_text(encoding="utf-8")
    for tag in re.findall(r"<!-- skip:(.*?)-->", text):
        assert len(tag.strip()) >= 10, f"{_rel(page)}: a skip tag needs a reason: {tag!r}"


def docstrings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                  ast.ClassDef)))]
    return [doc for doc in map(ast.get_docstring, nodes) if doc]


def library_files() -> list[Path]:
    files = []
    for entry in LIBRARY:
        path = ROOT / entry
        files.extend([path] if path.is_file() else sorted(path.rglob("*.py")))
    return files


def named_paths() -> dict[str, set[str]]:
    """Every dotted ``spruce.…`` path -> where it is named (doc pages, library files)."""
    where: dict[str, set[str]] = {}
    sources = [(p, p.read_text(encoding="utf-8")) for p in DOCS if p.exists()]
    sources += [(p, "\n".join(docstrings(p))) for p in library_files()]
    for path, text in sources:
        for name in _PATH.findall(text):
            where.setdefault(name, set()).add(_rel(path))
    return where


def resolve(dotted: str) -> object:
    """Import the longest importable module prefix of ``dotted`` and read the rest as attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            value = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError as exc:
            if exc.name is None or not ".".join(parts[:cut]).startswith(exc.name):
                raise  # the module exists but imports something missing
            continue
        for attribute in parts[cut:]:
            value = getattr(value, attribute)
        return value
    raise ModuleNotFoundError(dotted)


def test_the_docs_name_dotted_paths():
    assert len(named_paths()) > 50  # the scan finds what it is meant to check


def moved_modules() -> list[tuple[str, str]]:
    """``(old, new)`` dotted paths from the table of docs/moved-modules.md."""
    text = (ROOT / "docs" / "moved-modules.md").read_text(encoding="utf-8")
    return re.findall(r"^\| `(spruce[\w.]*)` \| `(spruce[\w.]*)` \|", text, re.M)


OLD_PATHS = {old for old, _ in moved_modules()}  # named so that they do not import: tested below


@pytest.mark.parametrize("dotted", sorted(set(named_paths()) - set(NOT_IMPORT_PATHS) - OLD_PATHS))
def test_every_named_spruce_path_imports(dotted):
    try:
        resolve(dotted)
    except (ImportError, AttributeError) as exc:
        pytest.fail(f"{dotted} (named in {', '.join(sorted(named_paths()[dotted]))}) does not import: {exc}")


# what only the machines spruce was built on have: their tools and commands
_INTERNAL = re.compile(r"farm-\w|\bissues (?:show|list|new|close)\b|`issues`|\bduplicates --|`duplicates`"
                       r"|\bdevice tool\b|\blending tool\b|\bgive_back\b|/work/(?:wt|main|shared)\b", re.I)


@pytest.mark.parametrize("page", [p for p in [*DOCS, ROOT / "mkdocs.yml"] if p.exists()], ids=_rel)
def test_the_docs_name_only_what_any_user_can_run(page):
    found = [m.group(0) for m in _INTERNAL.finditer(page.read_text(encoding="utf-8"))]
    assert not found, f"{_rel(page)} names internal tools: {found}"


def test_the_readme_is_a_landing_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines (at most 150)"


def test_every_readme_result_is_in_the_results_file_it_cites():
    """Each row of the README's results table links a bench/results file and names a command;
    every number of the row's figures appears in that file (no figure typed by hand)."""
    section = README.read_text(encoding="utf-8").split("## Results", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|") and "bench/results/" in line]
    assert len(rows) >= 3
    for row in rows:
        cited = ROOT / re.search(r"\((bench/results/[\w.]+\.md)\)", row).group(1)
        assert "`" in row, f"no command in {row}"
        figures_cells = [cell for cell in row.split("|") if "`" not in cell and "](" not in cell]
        text = cited.read_text(encoding="utf-8")
        for number in re.findall(r"\d+\.\d+", " ".join(figures_cells)):
            assert number in text, f"{number} is not in {_rel(cited)} (README row: {row})"


def test_the_moved_module_table_lists_the_layout_move():
    assert len(moved_modules()) >= 15


def test_the_moved_module_table_agrees_with_the_code_table():
    """Where the package keeps its own table of moved paths (``spruce.moved.MOVED``, whose old
    paths raise an ImportError naming the new place), every moved module in it is on the page,
    with the same new path."""
    from spruce.moved import MOVED

    assert dict(moved_modules()) == {entry.old: entry.new for entry in MOVED if entry.is_module}
    page = (ROOT / "docs" / "moved-modules.md").read_text(encoding="utf-8")
    for entry in MOVED:
        if not entry.is_module:
            module, name = entry.old.split(":")
            assert f"| `{name}` of `{module}` | `{entry.new}` |" in page, f"docs/moved-modules.md: {entry.old}"


@pytest.mark.parametrize(("old", "new"), moved_modules())
def test_a_moved_module_imports_from_its_new_path_only(old, new):
    importlib.import_module(new)
    with pytest.raises(ImportError):  # ModuleNotFoundError, or an ImportError naming the new place
        importlib.import_module(old)


def test_the_site_configuration_lists_every_page():
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for page in PAGES:
        assert os.path.relpath(page, ROOT / "docs") in config, f"{_rel(page)} is not in mkdocs.yml's nav"
