"""The package's shape, read from its source: the floor order on every import edge, no import
circle, no module over 800 lines, no reads of another module's private names, the CLI's place.

The import graph is built from the AST of every module of the package: imports at module
level, inside functions and under ``TYPE_CHECKING``, relative imports, and module names
given to ``importlib.import_module`` / ``__import__`` as string constants (in a module that
calls ``import_module``, every string constant naming one of the package's modules, such
as the lazy top level's table of names, counts as an import).

Every check is a function of a source root, so each is also run on a small deliberately bad
package built in ``tmp_path`` (an upward import, a circle, a private import, a 900-line
module) to show that it fails.
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
# A module imports only from its own folder or from a lower floor; two folders on one floor
# never import each other.
FLOORS = {"passes": 1, "targets": 2, "capture": 2, "runtime": 3, "api": 4, "compiler": 5, "zoo": 5, "cli": 6}
NEVER_IMPORTED = ("zoo", "cli")  # by any other folder of the library
MAX_LINES = 800


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = ["spruce", *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package under ``root`` (the repository root is the package ``spruce``)."""
    found = {"spruce": root / "__init__.py"}
    for folder in CODE_FOLDERS:
        if (root / folder).is_dir():
            for path in sorted((root / folder).rglob("*.py")):
                found[module_name(path, root)] = path
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


def _module_string(text: str, package: str, root: Path) -> str | None:
    """``text`` as a module name (absolute ``spruce.x``, or relative to ``package``), or None."""
    if text.startswith("."):
        level = len(text) - len(text.lstrip("."))
        text = _resolve(package, level, text.lstrip(".") or None)
    return text if text in modules(root) else None


def imports_of(name: str, root: Path = ROOT) -> set[str]:
    """Modules (and names below them) that module ``name`` imports, anywhere in its body."""
    path = modules(root)[name]
    package = _package_of(name, path)
    found: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    if any(isinstance(n, ast.Attribute) and n.attr == "import_module" for n in ast.walk(tree)):
        strings = (_string(n) for n in ast.walk(tree))
        found.update(m for m in (_module_string(s, package, root) for s in strings if s) if m)
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
def import_graph(root: Path = ROOT) -> nx.DiGraph:
    """Edges module -> module between the package's own modules."""
    graph = nx.DiGraph()
    own = modules(root)
    graph.add_nodes_from(own)
    for name in own:
        for target in imports_of(name, root):
            while target and target not in own:  # `from pkg.module import name` -> pkg.module
                target = target.rpartition(".")[0]
            if target and target != name and not (name.startswith(target + ".") and target in own and
                                                    own[target].name == "__init__.py"):
                graph.add_edge(name, target)
    return graph


def _folder(name: str) -> str | None:
    """The top folder of module ``name`` (``spruce.passes.sparsity.model`` -> ``passes``), None
    for the top level."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else None


def floor_violations(root: Path = ROOT) -> list[str]:
    """Every import edge that breaks the floor order: an import from a higher floor, between two
    folders of one floor, or of zoo/ or cli/ from another folder. The top level's lazy table of
    public names is exempt (it imports nothing until a name is used)."""
    problems = []
    for source, target in sorted(import_graph(root).edges):
        low, high = _folder(target), _folder(source)
        if high is None or low is None or low == high:
            continue
        if low in NEVER_IMPORTED:
            problems.append(f"{source} imports {target}: nothing in the library imports {low}/")
        elif FLOORS[low] >= FLOORS[high]:
            problems.append(f"{source} (floor {FLOORS[high]}) imports {target} (floor {FLOORS[low]})")
    return problems


def import_cycles(root: Path = ROOT) -> list[list[str]]:
    """Every import circle among the package's modules (function-level imports included)."""
    return sorted(sorted(cycle) for cycle in nx.simple_cycles(import_graph(root)))


def long_modules(root: Path = ROOT, limit: int = MAX_LINES) -> list[str]:
    """Modules of more than ``limit`` lines, with their length."""
    lengths = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in modules(root).items()}
    return [f"{name}: {n} lines" for name, n in sorted(lengths.items()) if n > limit]


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


def _private_definitions(root: Path) -> dict[str, set[str]]:
    """Underscore names each module defines: module-level names, class members, self._x."""
    defined: dict[str, set[str]] = {}
    for name, path in modules(root).items():
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


def private_reads(root: Path = ROOT) -> list[str]:
    """Every read of another module's private name: ``from m import _x``, ``getattr(obj, "_x")``
    and ``obj._x`` where ``_x`` is defined by another module only."""
    defined = _private_definitions(root)
    own = modules(root)
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
    return sorted(problems)


def test_every_import_edge_follows_the_floor_order():
    assert floor_violations() == []


def test_the_library_has_no_import_circle():
    assert import_cycles() == []


def test_no_module_is_over_800_lines():
    assert long_modules() == []


def test_no_module_reads_another_modules_private_names():
    assert private_reads() == []


# --- each check on a deliberately bad package -------------------------------------------------

def _package(root: Path, files: dict[str, str]) -> Path:
    """A fake package at ``root``: a lazy top level, one clean module on every floor, then ``files``
    (path relative to the package -> source) on top."""
    sources = {"__init__.py": '_EXPORTS = {"run": ".cli.main", "model": ".zoo.models"}\n',
               "passes/__init__.py": "", "passes/graph.py": "def lint():\n    return 1\n",
               "targets/__init__.py": "", "targets/base.py": "from ..passes.graph import lint\n",
               "capture/__init__.py": "", "capture/trace.py": "from ..passes import graph\n",
               "runtime/__init__.py": "", "runtime/bench.py": "from ..targets.base import lint\n",
               "api/__init__.py": "",
               "api/verbs.py": "from ..capture.trace import graph\nfrom ..runtime import bench\n",
               "compiler/__init__.py": "", "compiler/pipeline.py": "from ..api.verbs import graph\n",
               "zoo/__init__.py": "", "zoo/models.py": "from ..api import verbs\n",
               "cli/__init__.py": "",
               "cli/main.py": "import importlib\n\n\ndef main():\n"
                              "    return importlib.import_module('spruce.compiler.pipeline')\n",
               **files}
    for relative, text in sources.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
    return root


def test_the_checks_pass_on_a_clean_fake_package(tmp_path):
    root = _package(tmp_path, {})
    assert import_graph(root).has_edge("spruce.cli.main", "spruce.compiler.pipeline")
    assert floor_violations(root) == []
    assert import_cycles(root) == []
    assert long_modules(root) == []
    assert private_reads(root) == []


def test_an_upward_import_fails_the_floor_check(tmp_path):
    root = _package(tmp_path, {"passes/graph.py": "def lint():\n    from ..runtime.bench import lint\n"})
    assert floor_violations(root) == ["spruce.passes.graph (floor 1) imports spruce.runtime.bench (floor 3)"]


def test_an_import_between_folders_of_one_floor_fails_the_floor_check(tmp_path):
    root = _package(tmp_path, {"capture/trace.py": "from ..targets.base import lint\n",
                               "compiler/pipeline.py": "import spruce.zoo.models\n"})
    assert floor_violations(root) == [
        "spruce.capture.trace (floor 2) imports spruce.targets.base (floor 2)",
        "spruce.compiler.pipeline imports spruce.zoo.models: nothing in the library imports zoo/"]


def test_importing_the_console_fails_the_floor_check(tmp_path):
    root = _package(tmp_path, {"zoo/models.py": "from ..cli.main import main\n"})
    assert floor_violations(root) == ["spruce.zoo.models imports spruce.cli.main: nothing in the library imports cli/"]


def test_an_import_circle_fails_the_circle_check(tmp_path):
    root = _package(tmp_path, {"passes/rules.py": "from .meta import shape\n",
                               "passes/meta.py": "def shape():\n    from .rules import rule\n"})
    assert import_cycles(root) == [["spruce.passes.meta", "spruce.passes.rules"]]
    assert floor_violations(root) == []


def test_a_900_line_module_fails_the_length_check(tmp_path):
    root = _package(tmp_path, {"runtime/profile.py": "x = 1\n" * 900, "runtime/table.py": "x = 1\n" * 800})
    assert long_modules(root) == ["spruce.runtime.profile: 900 lines"]


def test_a_private_import_fails_the_private_check(tmp_path):
    root = _package(tmp_path, {"passes/graph.py": "def _lint():\n    return 1\n\n\nclass G:\n    _cache = None\n",
                               "targets/base.py": "from ..passes.graph import _lint\n",
                               "api/verbs.py": "from ..passes import graph\n\nx = graph.G._cache\n"})
    assert private_reads(root) == ["spruce.api.verbs: ._cache (defined in spruce.passes.graph)",
                                   "spruce.targets.base: from spruce.passes.graph import _lint"]


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
