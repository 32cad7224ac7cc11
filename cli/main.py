"""The ``spruce`` command line (the console entry; no other module imports it).

It only dispatches: each subcommand is a module registered in :mod:`spruce.cli.registry`; what
they share is in :mod:`spruce.cli.common`. A run parses the arguments, runs the subcommand's
checks (no torch imported yet: ``--help`` and a mistyped path answer at once), then its handler.
``main`` returns the exit status:

- 0: success;
- 1: spruce failed to build or verify an artifact (e.g. ONNX Runtime's
  output differs from torch's);
- 2: a user error (bad model spec, bad option, model that cannot be traced,
  unwritable output, training that diverges). User errors print ``spruce: error: <message>`` and no
  traceback, and leave no files behind;
- 1 also for an internal error (a bug in spruce): one line saying so, with the traceback saved
  to a file the line names (see :func:`spruce.cli.common.is_user_error` for where the
  line between user errors and bugs runs);
- 130: interrupted (Ctrl-C, at any point, the torch import included): one line, outputs left as
  they were.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Collection, Sequence
from typing import NoReturn

from .exits import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE

# Only the standard library and the exit codes above: the console script imports this module
# before ``main`` can catch a Ctrl-C, so everything else is imported inside ``main``.

# --- entry point -------------------------------------------------------------------


class _Interrupts:
    """The SIGINT handler while ``main`` runs: Python's own (raise KeyboardInterrupt), remembering
    that it fired, and held back while torch is imported: a KeyboardInterrupt raised inside its
    C++ initialisation aborted the process (SIGABRT) or surfaced as another error (measured on
    torch 2.14, a Ctrl-C 0.3-0.8 s into the import)."""

    def __init__(self) -> None:
        self.seen = False
        self.holding = False

    def __call__(self, signum: int, frame: object) -> None:
        self.seen = True
        if not self.holding:
            raise KeyboardInterrupt

    def import_torch(self) -> None:
        """Import torch with Ctrl-C held back until the import is done (then it interrupts)."""
        self.holding = True
        try:
            import torch  # noqa: F401
        finally:
            self.holding = False
        if self.seen:
            raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``spruce`` command with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    interrupts = _Interrupts()
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, interrupts) if in_main_thread else None
    try:
        return _main(argv, interrupts)
    except KeyboardInterrupt:  # at any point, imports included
        print("spruce: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous)


def _main(argv: Sequence[str] | None, interrupts: _Interrupts) -> int:
    from .common import is_user_error, report_bug

    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        parser = build_parser(_named_commands(argv))
        try:
            args = parser.parse_args(argv)
        except SystemExit as exit_request:  # argparse exits on --help and on usage errors
            return _exit_code(exit_request.code)
        args.check(args)
        interrupts.import_torch()  # every subcommand's work needs it; the checks above did not
        return args.run(args)
    except BrokenPipeError:
        # The reader of stdout went away (e.g. `spruce analyze ... | head`): not an error to
        # report, but stdout must not be flushed again at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except Exception as exc:  # noqa: BLE001 - every error ends in one line: a user error, or a bug
        if interrupts.seen:  # the Ctrl-C surfaced as another error
            raise KeyboardInterrupt from None
        if _is_artifact_failure(exc):
            return _report_error(exc, EXIT_FAILED)
        if is_user_error(exc):
            return _report_error(exc, EXIT_USAGE)
        print(report_bug(exc), file=sys.stderr)
        return EXIT_FAILED


def _is_artifact_failure(exc: BaseException) -> bool:
    """An artifact spruce built does not reproduce the model, or could not be exported (exit 1).
    The exporter's error type is looked up only if its module was imported (it imports torch)."""
    from .common import ArtifactCheckError

    onnxruntime = sys.modules.get("spruce.targets.onnxruntime")
    failures = (ArtifactCheckError,) + ((onnxruntime.OnnxExportError,) if onnxruntime is not None else ())
    return isinstance(exc, failures)


def _report_error(exc: BaseException, code: int) -> int:
    print(f"spruce: error: {exc}", file=sys.stderr)
    return code


def _exit_code(code: object) -> int:
    if code is None:
        return EXIT_OK
    return code if isinstance(code, int) else EXIT_USAGE


def _named_commands(argv: Sequence[str]) -> tuple[str, ...]:
    """The subcommand ``argv`` names (its first word that is not an option), if registered."""
    from .registry import SUBCOMMANDS

    first = next((word for word in argv if not word.startswith("-")), None)
    return (first,) if first in SUBCOMMANDS else ()


# --- parser ------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors read ``spruce: error: ...`` in subcommands too."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"spruce: error: {message}\n")


def build_parser(commands: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The ``spruce`` parser with one sub-parser per registered subcommand; only the arguments of
    ``commands`` (of every one when None) are added, so a run builds no other subcommand's options."""
    from .. import __version__
    from .registry import SUBCOMMANDS, subcommand

    parser = _Parser(prog="spruce", description="A model-compression compiler for PyTorch.")
    parser.add_argument("--version", action="version", version=f"spruce {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        entry = subcommand(name)
        subparser = subparsers.add_parser(name, help=entry.help, description=entry.help)
        if commands is None or name in commands:
            entry.add_arguments(subparser)
        subparser.set_defaults(run=entry.run, check=entry.check)
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
