"""The wheel: built from the source tree, installed without dependencies into a temporary folder,
it holds every library module, every package of it imports from there, and its metadata names the
console entry ``spruce = spruce.cli.main:main``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
# what the repository root holds besides the library
NOT_PACKAGED = {".git", ".venv", ".ci", ".ruff_cache", "tests", "bench", "examples", "docs", "out", "build", "dist",
                "site"}

_IMPORT_ALL = """
import importlib, json, pkgutil, sys
import spruce
names = ["spruce"] + [info.name for info in pkgutil.walk_packages(spruce.__path__, "spruce.")]
for name in names:
    importlib.import_module(name)
from importlib.metadata import distribution
scripts = {ep.name: ep.value for ep in distribution("spruce").entry_points if ep.group == "console_scripts"}
main = [ep for ep in distribution("spruce").entry_points if ep.name == "spruce"][0].load()
print(json.dumps({"file": spruce.__file__, "modules": names, "scripts": scripts,
                  "main": f"{main.__module__}:{main.__name__}"}))
"""


def _library_modules() -> set[str]:
    """Module names of every library ``.py`` file in the source tree (the root is ``spruce``)."""
    found = {"spruce"}
    for path in ROOT.rglob("*.py"):
        relative = path.relative_to(ROOT)
        if relative.parts[0] in NOT_PACKAGED:
            continue
        if len(relative.parts) == 1:  # a module at the root: the package's own (__init__, moved)
            found.add("spruce" if relative.stem == "__init__" else f"spruce.{relative.stem}")
            continue
        parts = ["spruce", *relative.with_suffix("").parts]
        found.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return found


@pytest.mark.slow
def test_the_wheel_installs_and_every_package_imports_from_it(tmp_path):
    source = tmp_path / "source"  # a copy, so the build leaves nothing in the work tree
    shutil.copytree(ROOT, source, ignore=lambda folder, names: [n for n in names if Path(folder) == ROOT
                                                                  and n in NOT_PACKAGED or n == "__pycache__"])
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("spruce-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        entry_points = next(n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt"))
        assert "spruce = spruce.cli.main:main" in archive.read(entry_points).decode()
    site = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                                str(site), str(wheel)], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-3000:]

    done = subprocess.run([sys.executable, "-c", _IMPORT_ALL], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(found["file"]).is_relative_to(site)  # imported from the wheel, not the work tree
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert set(packages) <= set(found["modules"])
    assert set(found["modules"]) == _library_modules()  # the wheel holds every library module
    assert found["scripts"] == {"spruce": "spruce.cli.main:main"}
    assert found["main"] == "spruce.cli.main:main"
