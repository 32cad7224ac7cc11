"""Keep what a library prints while it works (exporters dump graphs and progress lines, at the
Python level and from C++ straight to the file descriptors) off the console: :func:`captured_output`
holds it so the caller can summarise it in one line, or show it when it explains a failure."""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = ["CapturedOutput", "captured_output"]


@dataclass
class CapturedOutput:
    """What was printed inside :func:`captured_output`: ``text`` (stdout and stderr, Python and
    C level, in the order the descriptors received it, then the Python streams' text) and the
    warnings raised (as ``category: message`` lines)."""

    text: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def lines(self) -> int:
        """Lines printed and warnings raised, together."""
        return len(self.text.splitlines()) + len(self.warnings)


def _flush_c_streams() -> None:
    """Flush the C library's stdio buffers (C++ ``std::cout`` is synced with them)."""
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):  # no C library to ask (not on Linux / macOS)
        pass


@contextlib.contextmanager
def captured_output() -> Iterator[CapturedOutput]:
    """Redirect stdout and stderr (the Python streams and file descriptors 1 and 2) and record
    warnings for the duration of the block; yields the :class:`CapturedOutput` filled in when the
    block ends (normally or by an exception). Descriptors that cannot be duplicated (no console at
    all) are left alone."""
    captured = CapturedOutput()
    python_streams = io.StringIO()
    saved: list[tuple[int, int]] = []
    with tempfile.TemporaryFile(mode="w+b") as sink:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        _flush_c_streams()
        for fd in (1, 2):
            try:
                saved.append((fd, os.dup(fd)))
                os.dup2(sink.fileno(), fd)
            except OSError:
                continue
        try:
            with warnings.catch_warnings(record=True) as raised, contextlib.redirect_stdout(python_streams), \
                    contextlib.redirect_stderr(python_streams):
                warnings.simplefilter("always")
                yield captured
        finally:
            _flush_c_streams()
            for fd, copy in saved:
                os.dup2(copy, fd)
                os.close(copy)
            sink.seek(0)
            captured.text = sink.read().decode("utf-8", "replace") + python_streams.getvalue()
            captured.warnings = [f"{w.category.__name__}: {w.message}" for w in raised]
