"""The package's shape, read from its source: import direction, the CLI's place, no import
cycle in ``passes/sparsity``, no reads of another module's private names.

The import graph is built from the AST of every module of the package: imports at module
level, inside functions and under ``TYPE_CHECKING``, relative imports, and module names
given to ``importlib.import_module`` / ``__import__`` as string constants (in a module that
calls ``import_module``, every string constant naming one of the package's modules, such
as the lazy top level's table of names, counts as an import).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import cache
from pathlib import Path

import networkx as nx
import tomllib

ROOT = Path(__file__).resolve().parents[1]
CODE_FOLDERS = ("passes", "targets", "capture", "runtime", "api", "compiler", "cli", "zoo")


def module_name(path: Path) -> str:
    parts = ["spruce", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    """Every module of the package (the repository root is the package ``spruce``)."""
    found = {"spruce": ROOT / "__init__.py"}
    for folder in CODE_FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            found[module_name(path)] = path
    return found


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _resolve(base: str, level: int, target: str | None) -> str:
    parts = base.split(".")
    if level > 1:
        parts = parts[: len(parts) - (level - 1)]
    return ".".join([*parts, target] if target else parts)


def _string(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _module_string(text: str, package: str) -> str | None:
    """``text`` as a module name (absolute ``spruce.x``, or relative to ``package``), or None."""
    if text.startswith("."):
        level = len(text) - len(text.lstrip("."))
        text = _resolve(package, level, text.lstrip(".") or None)
    return text if text in modules() else None


def imports_of(name: str) -> set[str]:
    """Modules (and names below them) that module ``name`` imports, anywhere in its body."""
    path = modules()[name]
    package = _package_of(name, path)
    found: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    if any(isinstance(n, ast.Attribute) and n.attr == "import_module" for n in ast.walk(tree)):
        strings = (_string(n) for n in ast.walk(tree))
        found.update(m for m in (_module_string(s, package) for s in strings if s) if m)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(package, node.level, node.module) if node.level else node.module
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called in ("import_module", "__import__") and node.args and _string(node.args[0]):
                target = _string(node.args[0])
                if target.startswith("."):
                    level = len(target) - len(target.lstrip("."))
                    target = _resolve(package, level, target.lstrip(".") or None)
                found.add(target)
    return found


@cache
def import_graph() -> nx.DiGraph:
    """Edges module -> module between the package's own modules."""
    graph = nx.DiGraph()
    own = modules()
    graph.add_nodes_from(own)
    for name in own:
        for target in imports_of(name):
            while target and target not in own:  # `from pkg.module import name` -> pkg.module
                target = target.rpartition(".")[0]
            if target and target != name and not (name.startswith(target + ".") and target in own and
                                                    own[target].name == "__init__.py"):
                graph.add_edge(name, target)
    return graph


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_graph_sees_function_level_relative_and_importlib_imports():
    graph = import_graph()
    assert graph.has_edge("spruce.cli.registry", "spruce.cli.compile")  # importlib string, relative
    assert graph.has_edge("spruce.cli.compile", "spruce.compiler.pipeline")  # inside a function
    assert graph.has_edge("spruce.passes.sparsity.model", "spruce.passes.sparsity.registry")
    assert graph.has_edge("spruce", "spruce.compiler.pipeline")  # the lazy top level's table of names
    assert len(graph) > 40


def test_passes_runtime_and_targets_never_import_the_compiler():
    offenders = sorted((a, b) for a, b in import_graph().edges
                       if any(_under(a, f"spruce.{low}") for low in ("passes", "runtime", "targets"))
                       and _under(b, "spruce.compiler"))
    assert offenders == []


def test_only_the_console_entry_is_the_cli_and_nothing_imports_it():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"spruce": "spruce.cli.main:main"}
    graph = import_graph()
    assert sorted(graph.predecessors("spruce.cli.main")) == []
    # the subcommand modules and their shared helpers serve the CLI only: the library
    # (spruce.compile, the API, checkpoints) never imports them
    cli_modules = {name for name in graph if _under(name, "spruce.cli")}
    users = sorted(a for a, b in graph.edges if b in cli_modules and a not in cli_modules)
    assert users == []


def test_passes_sparsity_has_no_import_cycle():
    graph = import_graph()
    sparsity = graph.subgraph([n for n in graph if _under(n, "spruce.passes.sparsity")])
    assert list(nx.simple_cycles(sparsity)) == []


def _private_definitions() -> dict[str, set[str]]:
    """Underscore names each module defines: module-level names, class members, self._x."""
    defined: dict[str, set[str]] = {}
    for name, path in modules().items():
        names = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
        defined[name] = {n for n in names if n.startswith("_") and not n.startswith("__")}
    return defined


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_module_reads_another_modules_private_names():
    defined = _private_definitions()
    own = modules()
    problems = []
    for name, path in own.items():
        package = _package_of(name, path)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                source = _resolve(package, node.level, node.module) if node.level else node.module
                if source in own and source != name:
                    problems += [f"{name}: from {source} import {a.name}" for a in node.names if _private(a.name)]
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr"):
                attr = _string(node.args[1]) if len(node.args) > 1 else None
                if attr is not None and _private(attr):
                    problems.append(f"{name}: {node.func.id}(..., {attr!r})")
            elif isinstance(node, ast.Attribute) and _private(node.attr):
                owner = node.value
                if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                    continue
                if isinstance(owner, ast.Call) and getattr(owner.func, "id", None) == "super":
                    continue
                others = [m for m, names in defined.items() if node.attr in names and m != name]
                if others and node.attr not in defined[name]:
                    problems.append(f"{name}: .{node.attr} (defined in {', '.join(others)})")
    assert problems == []


def test_importing_passes_runtime_and_targets_loads_nothing_of_the_compiler():
    code = """
import importlib, pkgutil, sys
import spruce
assert not [m for m in sys.modules if m.startswith("spruce.compiler")], "import spruce"
for package in ("spruce.passes", "spruce.runtime", "spruce.targets"):
    root = importlib.import_module(package)
    for info in pkgutil.walk_packages(root.__path__, package + "."):
        importlib.import_module(info.name)
from spruce.targets.base import get_target
get_target("onnxruntime")  # imports every target module
from spruce.passes.sparsity.registry import method_names
method_names()  # imports every method module
print(sorted(m for m in sys.modules if m.startswith("spruce.compiler")))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and _string(first.value) is not None:
                found.add(id(first.value))
    return found


def test_the_compiler_holds_no_method_knowledge():
    from spruce.passes.sparsity.registry import method_names

    names = set(method_names())
    graph = import_graph()
    problems = []
    for name, path in modules().items():
        if not _under(name, "spruce.compiler"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            text = _string(node)
            if text in names and id(node) not in docs:
                problems.append(f"{name}:{node.lineno} method name {text!r}")
            if isinstance(node, ast.ClassDef) and any("Config" in ast.unparse(base) and "Method" in ast.unparse(base)
                                                      for base in node.bases):
                problems.append(f"{name}:{node.lineno} method config class {node.name}")
        problems += [f"{name} imports {target}" for target in graph.successors(name)
                     if _under(target, "spruce.passes.sparsity.methods")]
    assert problems == []
