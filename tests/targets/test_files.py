"""Every file spruce writes goes through ``spruce.targets.files``: atomic files, staged folders."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spruce.targets import files
from spruce.targets.files import OutputError, atomic_path, atomic_write_text, staged_dir

ROOT = Path(__file__).resolve().parents[2]
FILES_SOURCE = ROOT / "targets" / "files.py"  # the checkout's copy, read by the AST check


def test_atomic_path_replaces_only_on_success(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as temp:
        temp.write_text("half")
        raise RuntimeError("writer died")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]
    with atomic_path(target) as temp:
        temp.write_text("new")
        assert target.read_text() == "old"  # nothing visible before the block ends
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_staged_dir_appears_whole_or_not_at_all(tmp_path):
    out = tmp_path / "deep" / "out"
    with pytest.raises(KeyError), staged_dir(out) as stage:
        atomic_write_text(stage / "x", "1")
        raise KeyError("stage failed")
    assert list(tmp_path.iterdir()) == []  # parents made for it are gone too
    with staged_dir(out) as stage:
        atomic_write_text(stage / "x", "1")
    assert [p.name for p in out.iterdir()] == ["x"] and sorted(p.name for p in out.parent.iterdir()) == ["out"]


# --- no file is written any other way ------------------------------------------------------------

# calls that put bytes at a final path (or move them there) without the files module
_FORBIDDEN = {("os", "replace"), ("os", "rename"), ("shutil", "move"), ("tempfile", "mkstemp"),
              ("tempfile", "mkdtemp")}
_WRITING_METHODS = {"write_text", "write_bytes"}


def _package_files() -> list[Path]:
    folders = ("passes", "targets", "capture", "runtime", "api", "compiler", "cli", "zoo")
    return [ROOT / "__init__.py", *(p for d in folders for p in sorted((ROOT / d).rglob("*.py")))]


def _atomic_names(tree: ast.AST) -> set[str]:
    """Names bound by ``with atomic_path(...) as NAME`` / ``scratch_path``: temporary files a
    writer may fill directly."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.With, ast.AsyncWith)):
            for item in node.items:
                call = item.context_expr
                called = getattr(getattr(call, "func", None), "id", None) if isinstance(call, ast.Call) else None
                if called in ("atomic_path", "scratch_path") and isinstance(item.optional_vars, ast.Name):
                    names.add(item.optional_vars.id)
    return names


def test_no_module_but_the_files_module_renames_or_writes_files_directly():
    problems = []
    for path in _package_files():
        if path == FILES_SOURCE:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        temporary = _atomic_names(tree)
        where = f"{path.relative_to(ROOT)}"
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if isinstance(func, ast.Name) and func.id == "open":
                mode = node.args[1] if len(node.args) > 1 else next(
                    (k.value for k in node.keywords if k.arg == "mode"), None)
                target = node.args[0] if node.args else None
                if (isinstance(mode, ast.Constant) and set(str(mode.value)) & set("wax+")
                        and not (isinstance(target, ast.Name) and target.id in temporary)):
                    problems.append(f"{where}:{node.lineno} open(..., {mode.value!r})")
            elif isinstance(func, ast.Attribute):
                owner = func.value
                if isinstance(owner, ast.Name) and (owner.id, func.attr) in _FORBIDDEN:
                    problems.append(f"{where}:{node.lineno} {owner.id}.{func.attr}")
                elif func.attr in _WRITING_METHODS and not (isinstance(owner, ast.Name) and owner.id in temporary):
                    problems.append(f"{where}:{node.lineno} .{func.attr}(...)")
    assert problems == []


# --- modes, crashed writers, full disks (#13 kind 7) ---------------------------------------------

@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from([0o022, 0o002, 0o077, 0o027, 0o000, 0o007]))
def test_files_and_folders_follow_the_umask(tmp_path_factory, umask):
    folder = tmp_path_factory.mktemp("modes")
    previous = os.umask(umask)
    try:
        atomic_write_text(folder / "a.txt", "x")
        with atomic_path(folder / "b.bin") as temp:
            temp.write_bytes(b"y")
        with staged_dir(folder / "new" / "out") as stage:
            atomic_write_text(stage / "c.json", "{}")
    finally:
        os.umask(previous)
    for path in (folder / "a.txt", folder / "b.bin", folder / "new" / "out" / "c.json"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
    for path in (folder / "new", folder / "new" / "out"):
        assert path.stat().st_mode & 0o777 == 0o777 & ~umask, path


def _hold_stage(out: Path, then: str) -> subprocess.Popen:
    """A process that stages ``out``, writes into it, says "staged" and then sleeps (to be killed)."""
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from spruce.targets.files import atomic_write_text, staged_dir
        out = Path({str(out)!r})
        with staged_dir(out) as stage:
            atomic_write_text(stage / "half.txt", "half")
            {then}
            print("staged", flush=True)
            time.sleep(600)
        """)
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "staged"
    return process


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_killed_run_s_staging_folder_is_removed_by_the_next_run_a_live_one_is_not(tmp_path):
    out = tmp_path / "out"
    killed = _hold_stage(out, "pass")
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    (stale,) = _leftovers(tmp_path)  # what a killed run leaves
    assert stale.startswith(".out.tmp-p") and (tmp_path / stale / "half.txt").is_file()
    live = _hold_stage(out, "pass")
    try:
        (mine,) = set(_leftovers(tmp_path)) - {stale} or {None}  # the live run staged too ...
        assert mine is not None
        assert stale not in _leftovers(tmp_path)  # ... and removed the dead run's folder
        with staged_dir(out) as stage:  # a third run leaves the live run's folder alone
            atomic_write_text(stage / "x", "1")
        assert _leftovers(tmp_path) == [mine] and (tmp_path / mine / "half.txt").is_file()
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait()
    assert [p.name for p in out.iterdir()] == ["x"]


def test_a_run_killed_between_its_two_renames_leaves_the_previous_output_which_comes_back(tmp_path):
    out = tmp_path / "out"
    with staged_dir(out) as stage:
        atomic_write_text(stage / "old.txt", "previous run")
    # a run killed after moving the previous output aside, before renaming its stage into place
    code = textwrap.dedent(f"""
        import os, time
        from spruce.targets.files import atomic_write_text, staged_dir
        real_rename = os.rename
        def rename(src, dst):
            if str(dst) == {str(out)!r}:
                print("between", flush=True)
                time.sleep(600)
            real_rename(src, dst)
        os.rename = rename
        with staged_dir({str(out)!r}) as stage:
            atomic_write_text(stage / "new.txt", "new run")
        """)
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "between"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists() and len(_leftovers(tmp_path)) == 2  # the stage and the backup
    with staged_dir(tmp_path / "other") as stage:  # another output in the same folder: not its business
        atomic_write_text(stage / "y", "1")
    assert not out.exists()
    with pytest.raises(RuntimeError), staged_dir(out):  # the next run of this output puts it back first
        assert (out / "old.txt").read_text() == "previous run"
        raise RuntimeError("this run fails too")
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert _leftovers(tmp_path) == []


def test_a_killed_writer_s_temporary_file_is_removed_by_the_next_write_of_that_file(tmp_path):
    code = textwrap.dedent(f"""
        import time
        from spruce.targets.files import atomic_path
        with atomic_path({str(tmp_path / 'table.json')!r}) as temp:
            temp.write_text("half")
            print("writing", flush=True)
            time.sleep(600)
        """)
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "writing"
    (live,) = _leftovers(tmp_path)
    atomic_write_text(tmp_path / "table.json", "1")  # the writer is alive: its file stays
    assert _leftovers(tmp_path) == [live]
    process.send_signal(signal.SIGKILL)
    process.wait()
    atomic_write_text(tmp_path / "other.json", "2")  # another file's writes do not look
    assert _leftovers(tmp_path) == [live]
    atomic_write_text(tmp_path / "table.json", "3")
    assert _leftovers(tmp_path) == []
    assert (tmp_path / "table.json").read_text() == "3"


def test_a_full_disk_is_an_output_error_naming_the_file_and_changes_nothing(tmp_path, monkeypatch):
    atomic_write_text(tmp_path / "a.txt", "old")

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "_fsync", full)
    with pytest.raises(OutputError, match=r"cannot write .*a.txt: No space left on device"):
        atomic_write_text(tmp_path / "a.txt", "new")
    assert (tmp_path / "a.txt").read_text() == "old" and _leftovers(tmp_path) == []
    with pytest.raises(OutputError, match=r"cannot write .*/out/b.txt: No space left on device"), \
            staged_dir(tmp_path / "out") as stage:
        atomic_write_text(stage / "b.txt", "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
