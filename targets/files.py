"""Every file spruce writes goes through this module: atomic files and staged output folders.

- :func:`atomic_path` yields a temporary path next to the destination; whatever the
  block writes there is fsynced and renamed onto the destination only when the block
  succeeds, so a reader sees the old file or the complete new one, never half of one.
  :func:`atomic_write_text` and :func:`atomic_write_bytes` are the one-call forms.
- :func:`scratch_path` is a temporary file next to a destination that is always removed
  (an intermediate a writer needs, such as the ONNX file a TensorRT engine is built from).
- :func:`checked_out_dir` refuses an output folder that cannot be (re)placed, before any
  work; :func:`staged_dir` builds a folder under a temporary name and renames it into
  place only when everything in it was written.

It lives in ``targets/`` (the lowest layer that writes files) so that targets (artifacts,
manifests), runtime (latency tables and their cache) and the compiler (CLI outputs,
compile folders, reports, checkpoints) all share it. It imports nothing from spruce.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = [
    "OutputError",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "checked_out_dir",
    "scratch_path",
    "staged_dir",
]


class OutputError(ValueError):
    """An output path that cannot be written or replaced (the message names it)."""


def _temp_next_to(path: Path, suffix: str) -> Path:
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(handle)
    return Path(name)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a fresh temporary path in ``path``'s folder; on success it replaces ``path``.

    The block writes the file at the yielded path (any writer: ``torch.save``, an exporter,
    ``savefig``); when the block ends without an exception the file is flushed to disk and
    renamed onto ``path`` (atomic on POSIX within one folder). On an exception the temporary
    file is removed and ``path`` is untouched. ``suffix`` ends the temporary name, for
    writers that pick a format from it."""
    path = Path(path)
    temp = _temp_next_to(path, suffix)
    try:
        yield temp
        _fsync(temp)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


@contextlib.contextmanager
def scratch_path(next_to: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a fresh temporary path in ``next_to``'s folder that is removed afterwards."""
    temp = _temp_next_to(Path(next_to), suffix)
    try:
        yield temp
    finally:
        temp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`); returns the path."""
    with atomic_path(path) as temp:
        temp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_path`); returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _fsync(path: Path) -> None:
    with open(path, "rb") as stream:
        os.fsync(stream.fileno())


# --- output folders: they appear complete or not at all -------------------------------------


def checked_out_dir(out_dir: str | os.PathLike, force: bool, name: str = "out",
                    force_hint: str = "force=True") -> Path:
    """``out_dir`` as an absolute path, after checking it can be (re)placed, before any work.

    Raises :class:`OutputError` when it is a file, when it is a non-empty folder and
    ``force`` is false (the message suggests ``force_hint``), or when one of its parents
    is a file. ``name`` is how the message calls the option (``--out`` on the CLI)."""
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{name} {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise OutputError(f"{name} {out_dir} exists and is not empty (use {force_hint} to replace it)")
    existing = next((p for p in (out_dir.parent, *out_dir.parent.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise OutputError(f"{name} {out_dir}: {existing} is not a directory")
    return out_dir


@contextlib.contextmanager
def staged_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to ``out_dir``; on success it replaces ``out_dir``.

    On any exception the temporary folder, and any parent folders made for it, are
    removed, so nothing half-written is left."""
    out_dir = Path(out_dir)
    made_parents = _make_parents(out_dir.parent)
    try:
        stage = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    except OSError as exc:
        _remove_empty(made_parents)
        raise OutputError(f"cannot write {out_dir}: {exc.strerror or exc}") from exc
    try:
        yield stage
        _replace_dir(stage, out_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        _remove_empty(made_parents)
        raise


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and missing ancestors; return those created, deepest first."""
    missing = []
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    for candidate in reversed(missing):
        try:
            candidate.mkdir()
        except OSError as exc:
            _remove_empty(missing)
            raise OutputError(f"cannot create {candidate}: {exc.strerror or exc}") from exc
    return missing


def _remove_empty(folders: Sequence[Path]) -> None:
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def _replace_dir(stage: Path, out_dir: Path) -> None:
    """Rename ``stage`` to ``out_dir``, moving an existing ``out_dir`` aside first."""
    if not out_dir.exists():
        os.rename(stage, out_dir)
        return
    backup = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
    os.rename(out_dir, backup / "old")
    try:
        os.rename(stage, out_dir)
    except OSError:
        os.rename(backup / "old", out_dir)
        backup.rmdir()
        raise
    shutil.rmtree(backup, ignore_errors=True)
