"""Tests mirror the code: the tests of tests/passes, targets, runtime and capture (with the
conftests and test helpers they import) never import spruce.api, spruce.compiler or spruce.cli,
not by module path, not through a public name of the top level (``spruce.prune``,
``from spruce import sparsify``) and not by ``import_module``. The conftest's session-finish
check (``helpers.high_modules_after``) fails a run of only those folders that loaded one anyway.
"""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import FLOOR_TEST_FOLDERS, high_modules_after, is_high

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
# test helpers run only in a fresh process (whose modules the session never sees), with the reason
FRESH_PROCESS_ONLY = {
    "golden_methods.py": "test_golden runs its cases in a process limited to the record's ISA, through the "
                         "public API by design",
}


def top_level_exports(root: Path = ROOT) -> dict[str, str]:
    """The top level's public names and the module (``spruce.x.y``) each maps to."""
    tree = ast.parse((root / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        targets = [node.target] if isinstance(node, ast.AnnAssign) else getattr(node, "targets", [])
        if any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in targets):
            return {name: "spruce" + module for name, module in ast.literal_eval(node.value).items()}
    raise AssertionError("no _EXPORTS table in the top level")


def _files_of(tests_root: Path) -> dict[Path, set[str] | None]:
    """The test modules of the floor test folders, the conftests above them and the local modules
    (``helpers``, ...) they import, transitively; each with the names the floor tests take from it
    (``from helpers import sparsify``: its module level and ``sparsify`` are read; None: all of it,
    for the tests, the conftests and a local module imported whole)."""
    todo = [p for folder in FLOOR_TEST_FOLDERS for p in sorted((tests_root / folder).rglob("*.py"))]
    todo += [p / "conftest.py" for p in {q.parent for q in todo} | {tests_root} if (p / "conftest.py").is_file()]
    todo += [folder.parent / "conftest.py" for folder in list({q.parent for q in todo})
             if folder != tests_root and (folder.parent / "conftest.py").is_file()]
    found: dict[Path, set[str] | None] = {}
    pending: list[tuple[Path, set[str] | None]] = [(p, None) for p in todo]
    while pending:
        path, names = pending.pop()
        if path.name in FRESH_PROCESS_ONLY:
            continue
        if path in found and (found[path] is None or (names is not None and names <= found[path])):
            continue
        found[path] = None if names is None or found.get(path, set()) is None else {*found.get(path, set()), *names}
        for node in ast.walk(_read(path, found[path])):
            if isinstance(node, ast.Import):
                pending += [(tests_root / f"{a.name}.py", None) for a in node.names
                            if (tests_root / f"{a.name}.py").is_file()]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                if (tests_root / f"{node.module}.py").is_file():
                    pending.append((tests_root / f"{node.module}.py", {a.name for a in node.names}))
    return dict(sorted(found.items()))


def _read(path: Path, names: set[str] | None) -> ast.Module:
    """The source of ``path`` as a module: all of it, or its module level with only the function and
    class definitions named in ``names``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    if names is not None:
        definitions = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
        tree.body = [n for n in tree.body if not isinstance(n, definitions) or n.name in names]
    return tree


def high_imports(tests_root: Path = TESTS, exports: dict[str, str] | None = None) -> list[str]:
    """Every place in the floor tests' source that imports spruce.api, compiler or cli."""
    exports = top_level_exports() if exports is None else exports
    high_names = {name for name, module in exports.items() if is_high(module)}
    problems = []
    for path, names in _files_of(tests_root).items():
        where = path.relative_to(tests_root)
        for node in ast.walk(_read(path, names)):
            line = getattr(node, "lineno", 0)
            if isinstance(node, ast.Import):
                problems += [f"{where}:{line} import {a.name}" for a in node.names if is_high(a.name)]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                if is_high(node.module):
                    problems.append(f"{where}:{line} from {node.module} import ...")
                elif node.module == "spruce":
                    problems += [f"{where}:{line} from spruce import {a.name}" for a in node.names
                                 if a.name in high_names or is_high(f"spruce.{a.name}")]
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "spruce":
                if node.attr in high_names or is_high(f"spruce.{node.attr}"):
                    problems.append(f"{where}:{line} spruce.{node.attr}")
            elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if called in ("import_module", "__import__") and is_high(str(node.args[0].value)):
                    problems.append(f"{where}:{line} {called}({node.args[0].value!r})")
    return problems


def test_the_floor_tests_never_import_api_compiler_or_cli():
    assert high_imports() == []


def test_the_check_reads_the_helpers_and_conftests_the_floor_tests_use():
    files = {p.relative_to(TESTS).as_posix(): names for p, names in _files_of(TESTS).items()}
    assert {"conftest.py", "helpers.py", "passes/conftest.py", "capture/test_trace.py"} <= files.keys()
    assert "api/test_prune.py" not in files and "golden_methods.py" not in files
    assert files["conftest.py"] is None and "sparsify" in files["helpers.py"]
    assert "assert_pt2_reloads_in_a_fresh_process" not in files["helpers.py"]  # only the api tests use it


def test_the_check_fails_on_floor_tests_that_reach_up(tmp_path):
    exports = {"prune": "spruce.api.prune", "trace": "spruce.capture.trace", "compile": "spruce.compiler.pipeline"}
    for folder in ("passes/sparsity", "targets", "runtime", "capture", "api"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "conftest.py").write_text("import sys\n")
    (tmp_path / "shared.py").write_text("def run():\n    import spruce.cli.main\n\n\n"
                                        "def deploy():\n    from spruce.api import deploy\n")
    (tmp_path / "passes" / "sparsity" / "test_a.py").write_text(
        "import spruce\nfrom spruce import trace, prune\n\n\ndef test_a():\n    spruce.compile()\n    spruce.trace()\n")
    (tmp_path / "runtime" / "test_b.py").write_text(
        "import importlib\nfrom shared import run\nfrom spruce.api.verbs import profile\n\n\n"
        "def test_b():\n    importlib.import_module('spruce.compiler.stages')\n")
    (tmp_path / "capture" / "test_c.py").write_text("from spruce.capture.trace import capture\n")
    (tmp_path / "api" / "test_d.py").write_text("import spruce.api.prune\nfrom shared import deploy\n")  # api tests may
    assert high_imports(tmp_path, exports) == [
        "passes/sparsity/test_a.py:2 from spruce import prune",
        "passes/sparsity/test_a.py:6 spruce.compile",
        "runtime/test_b.py:3 from spruce.api.verbs import ...",
        "runtime/test_b.py:7 import_module('spruce.compiler.stages')",
        "shared.py:2 import spruce.cli.main",
    ]


def test_the_session_check_fails_a_floor_run_that_loaded_a_high_module():
    passes, api = TESTS / "passes" / "test_x.py", TESTS / "api" / "test_y.py"
    loaded = ["spruce", "spruce.passes.graph", "spruce.api.verbs", "spruce.apis", "spruce.cli"]
    assert high_modules_after([passes, TESTS / "capture" / "test_z.py"], loaded, TESTS) == ["spruce.api.verbs",
                                                                                           "spruce.cli"]
    assert high_modules_after([passes, api], loaded, TESTS) == []  # a run that includes higher tests
    assert high_modules_after([], loaded, TESTS) == []
    assert high_modules_after([passes], ["spruce", "spruce.passes.graph"], TESTS) == []


def test_every_slow_entry_names_a_test_that_exists():
    from slow import SLOW

    missing = []
    for entry in SLOW:
        file, _, test = entry.partition("::")
        path = TESTS / file
        if not path.is_file():
            missing.append(entry)
            continue
        name = test.partition("[")[0]
        defined = {n.name for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                   if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        if name and name not in defined:
            missing.append(entry)
    assert missing == []
