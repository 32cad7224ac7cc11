"""Files that spruce's verbs, `spruce prune` and `spruce compile` leave: each written through
``spruce.targets.files`` (atomic files, staged folders); a full disk is one clear error."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import spruce
import torch
from spruce.cli.main import main
from spruce.targets import files
from spruce.targets.base import get_target
from spruce.targets.files import OutputError, checked_out_dir
from torch import nn

FILES_MODULE = Path(files.__file__).resolve()  # the imported copy (installed, under CI), seen by the spy

PRUNE_FILES = ["model.onnx", "model.onnx.spruce.json", "model.pt", "report.json"]  # what spruce prune writes


def test_output_errors_are_value_errors_that_name_the_option(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("mine")
    with pytest.raises(OutputError, match=r"out .*full exists and is not empty \(use force=True"):
        checked_out_dir(tmp_path / "full", force=False)
    with pytest.raises(ValueError, match="--force"):
        checked_out_dir(tmp_path / "full", force=False, name="--out", force_hint="--force")
    # the library's compile: an OutputError about force=True, never the CLI's error about --force
    with pytest.raises(OutputError) as info:
        spruce.compile(out=tmp_path / "full", epochs=1)
    assert "force=True" in str(info.value) and "--force" not in str(info.value)
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep"]


class _Spy:
    """Records the renames done by the files module (commits) and by anyone else (violations)."""

    def __init__(self):
        self.committed: set[Path] = set()
        self.staged: dict[Path, Path] = {}
        self.elsewhere: list[str] = []

    def wrap(self, real, kind: str):
        def spy(src, dst, *args, **kwargs):
            caller = Path(sys._getframe(1).f_code.co_filename).resolve()
            result = real(src, dst, *args, **kwargs)
            if caller != FILES_MODULE:
                self.elsewhere.append(f"{kind}({src}, {dst}) from {caller}")
            elif Path(dst).is_dir():
                self.staged[Path(src).resolve()] = Path(dst).resolve()
            else:
                self.committed.add(Path(dst).resolve())
            return result
        return spy

    def final_paths(self) -> set[Path]:
        """Committed files at the place they ended up (a staged folder's files under its final name)."""
        found = set()
        for path in self.committed:
            for stage, final in self.staged.items():
                if path.is_relative_to(stage):
                    path = final / path.relative_to(stage)
            found.add(path)
        return found


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 8 * 8, 4))


def test_every_file_a_real_run_leaves_was_written_through_the_files_module(tmp_path, monkeypatch, capsys):
    spy = _Spy()
    monkeypatch.setattr(os, "replace", spy.wrap(os.replace, "os.replace"))
    monkeypatch.setattr(os, "rename", spy.wrap(os.rename, "os.rename"))
    x = torch.randn(1, 1, 8, 8)
    # a checkpoint
    sm = spruce.sparsify(_tiny(), x, "rigl", sparsity=0.5, total_steps=4, delta_t=2)
    spruce.save(sm, tmp_path / "ckpt.pt")
    # a latency table, its disk cache, and artifacts with their manifests from two targets
    table = spruce.profile(_tiny().eval(), x, "onnxruntime", step=4, cache_dir=tmp_path / "cache", progress=False,
                           warmup=0, repeats=1, coarse=2, calibration_random=0)
    table.save(tmp_path / "table.json")
    for name in ("onnxruntime", "torch"):
        target = get_target(name)
        target.build(_tiny().eval(), (x,), tmp_path / f"tiny{target.suffix}")
    # the CLI's prune folder and a whole (shortened) compile folder
    source = tmp_path / "tiny_model.py"
    source.write_text(textwrap.dedent("""
        import torch
        from torch import nn
        def make():
            torch.manual_seed(0)
            return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        """))
    assert main(["prune", f"{source}:make", "--input-shape", "1,3,8,8", "--ratio", "0.5",
                 "--out", str(tmp_path / "pruned")]) == 0
    spruce.compile(out=tmp_path / "compiled", quiet=True, epochs=1, budget={"flops": 0.5}, bench_iters=1,
                   bench_warmup=0, bench_batch_sizes=(1,), floor="none")  # one epoch: below any floor
    capsys.readouterr()

    written = {p.resolve() for p in tmp_path.rglob("*") if p.is_file()} - {source.resolve()}
    assert spy.elsewhere == []
    assert written - spy.final_paths() == set()
    for expected in ("ckpt.pt", "table.json", "tiny.onnx", "tiny.onnx.spruce.json", "tiny.pt2",
                     "pruned/model.pt", "pruned/model.onnx", "pruned/report.json", "compiled/report.json",
                     "compiled/report.md", "compiled/model.onnx", "compiled/dense.onnx.spruce.json",
                     "compiled/model.pt", "compiled/widths.png"):
        assert (tmp_path / expected).resolve() in written, expected
    assert any(p.is_relative_to((tmp_path / "cache").resolve()) for p in written)  # the latency cache


def _tiny_source(folder: Path) -> Path:
    source = folder / "tiny_model.py"
    source.write_text(textwrap.dedent("""
        import torch
        from torch import nn
        def make():
            torch.manual_seed(0)
            return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        """))
    return source


def _limited(limit: int):
    def apply() -> None:  # every write past `limit` bytes fails with EFBIG, as a full disk fails with ENOSPC
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("limit", [0, 3000, 20000])
def test_prune_on_a_disk_that_fills_up_exits_2_with_one_line_and_leaves_nothing(tmp_path, limit):
    source = _tiny_source(tmp_path)
    out = tmp_path / "runs" / "out"
    done = subprocess.run([sys.executable, "-m", "spruce.cli.main", "prune", f"{source}:make", "--input-shape",
                           "1,3,8,8", "--ratio", "0.5", "--out", str(out)], capture_output=True, text=True,
                          timeout=600, preexec_fn=_limited(limit), env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert "Traceback" not in done.stderr, done.stderr
    if done.returncode == 0:
        assert sorted(p.name for p in out.iterdir()) == PRUNE_FILES
        return
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("spruce: error: cannot write ") and "File too large" in line, line
    assert not (tmp_path / "runs").exists()  # the parent made for it is gone too
