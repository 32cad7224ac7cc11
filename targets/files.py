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
- :func:`locked` holds an exclusive lock on the folder of a path (several processes
  updating one file: read, merge, write).

Files and folders are created with the modes the process's umask gives, as every other tool
creates them (``0o666`` and ``0o777`` less the umask). A write that fails for want of space,
quota or permission raises :class:`OutputError` naming the destination, and leaves the
destination as it was.

Temporary files and staging folders carry the id of the process that made them (and a tag of
its host), so a later run can tell a crashed run's leftovers from a live run's: those whose
process is gone are removed the next time the same destination is written; a live run's
never are.

It lives in ``targets/`` (the lowest layer that writes files) so that targets (artifacts,
manifests), runtime (latency tables and their cache) and the compiler (CLI outputs,
compile folders, reports, checkpoints) all share it. It imports nothing from spruce.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = [
    "OutputError",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "checked_out_dir",
    "locked",
    "scratch_path",
    "staged_dir",
]

# errors that say the destination cannot take the bytes: a user error naming the path, not a crash
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
                           errno.EIO, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG})


class OutputError(ValueError):
    """An output path that cannot be written or replaced (the message names it)."""


def _output_error(path: Path, exc: OSError) -> OutputError:
    return OutputError(f"cannot write {path}: {exc.strerror or exc}")


# --- who owns a temporary file or folder ---------------------------------------------------------


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


def _owner_tag() -> str:
    """``p<pid>h<host>-``: ends the fixed part of every temporary name this process makes."""
    return f"p{os.getpid()}h{_host_tag()}-"


def _owner_alive(pid: int, host: str) -> bool:
    """Whether the process that made a temporary name may still be running (another host's
    processes cannot be checked, so they count as running)."""
    if host != _host_tag() or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _remove_stale(folder: Path, prefix: str) -> list[Path]:
    """Remove the entries of ``folder`` named ``<prefix>p<pid>h<host>-...`` whose process is gone;
    return them. Entries of live processes, and any other entry, are left alone."""
    pattern = re.compile(re.escape(prefix) + r"p(\d+)h([0-9a-f]{6})-")
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if match is None or _owner_alive(int(match.group(1)), match.group(2)):
            continue
        path = Path(entry.path)
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    return removed


# --- modes follow the umask -----------------------------------------------------------------------


def _umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temp_next_to(path: Path, suffix: str) -> Path:
    """A new empty file next to ``path``, mode ``0o666`` less the umask (``mkstemp`` makes
    ``0o600``); leftovers of crashed writers of the same ``path`` are removed first."""
    _remove_stale(path.parent, f".{path.name}.")
    try:
        handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_owner_tag()}", suffix=suffix)
    except OSError as exc:
        raise _output_error(path, exc) from exc
    try:
        os.fchmod(handle, 0o666 & ~_umask())
    finally:
        os.close(handle)
    return Path(name)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a fresh temporary path in ``path``'s folder; on success it replaces ``path``.

    The block writes the file at the yielded path (any writer: ``torch.save``, an exporter,
    ``savefig``); when the block ends without an exception the file is flushed to disk and
    renamed onto ``path`` (atomic on POSIX within one folder). On an exception the temporary
    file is removed and ``path`` is untouched; an ``OSError`` that says the disk is full, a
    quota is exceeded or the place is read-only becomes an :class:`OutputError` naming
    ``path``. ``suffix`` ends the temporary name, for writers that pick a format from it.
    Writers that can write to an open file are best given one (``open(temp, "wb")``): their
    write errors then arrive as ``OSError`` rather than as their own exception types."""
    path = Path(path)
    temp = _temp_next_to(path, suffix)
    try:
        yield temp
        _fsync(temp)
        os.replace(temp, path)
    except OSError as exc:
        if exc.errno in _WRITE_ERRNOS:
            raise _output_error(path, exc) from exc
        raise
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


@contextlib.contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on the folder that holds ``path`` (``flock`` on the folder itself:
    no lock file is left behind) for a read-merge-write of ``path`` by several processes.
    Where the folder cannot be opened, the block runs unlocked: it cannot write there either."""
    try:
        handle = os.open(Path(path).parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        yield
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)  # closing releases the lock


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
    _recover_stale(out_dir)
    try:
        stage = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-{_owner_tag()}"))
        os.chmod(stage, 0o777 & ~_umask())
    except OSError as exc:
        _remove_empty(made_parents)
        raise _output_error(out_dir, exc) from exc
    try:
        yield stage
        _replace_dir(stage, out_dir)
    except BaseException as exc:
        shutil.rmtree(stage, ignore_errors=True)
        _remove_empty(made_parents)
        if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:
            raise _output_error(out_dir, exc) from exc
        if isinstance(exc, OutputError) and str(stage) in str(exc):  # name the file's place in out_dir
            raise OutputError(str(exc).replace(str(stage), str(out_dir))) from exc
        raise


def _recover_stale(out_dir: Path) -> None:
    """Clean what a run killed while staging ``out_dir`` left: its staging folder, and the
    previous ``out_dir`` it had moved aside, which goes back in place when the kill came between
    the two renames of :func:`_replace_dir` (so ``out_dir`` is missing); else it is removed."""
    for backup in _remove_stale_backups(out_dir):
        old = backup / "old"
        if old.is_dir() and not out_dir.exists():
            with contextlib.suppress(OSError):
                os.rename(old, out_dir)
        shutil.rmtree(backup, ignore_errors=True)
    _remove_stale(out_dir.parent, f".{out_dir.name}.tmp-")


def _remove_stale_backups(out_dir: Path) -> list[Path]:
    """Backup folders ``.<name>.old-p<pid>h<host>-...`` of ``out_dir`` whose process is gone."""
    pattern = re.compile(re.escape(f".{out_dir.name}.old-") + r"p(\d+)h([0-9a-f]{6})-")
    found = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(out_dir.parent):
            match = pattern.match(entry.name)
            if match and entry.is_dir(follow_symlinks=False) and not _owner_alive(int(match.group(1)), match.group(2)):
                found.append(Path(entry.path))
    return found


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
    backup = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-{_owner_tag()}"))
    os.rename(out_dir, backup / "old")
    try:
        os.rename(stage, out_dir)
    except OSError:
        os.rename(backup / "old", out_dir)
        backup.rmdir()
        raise
    shutil.rmtree(backup, ignore_errors=True)
