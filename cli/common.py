"""What every ``spruce`` subcommand shares: exit codes, errors (which are the user's, which are
bugs), the subcommand record and the parsers of common arguments (model spec and input shapes,
target options).

Nothing here imports torch at module level: the console checks its arguments first
(:mod:`spruce.compiler.specs`), and a subcommand imports what needs torch inside its ``run``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..compiler.specs import (
    DEFAULT_INPUT_SHAPE,
    FACTORY_CONTRACT,
    ModelSpecError,
    Shape,
    check_input_sizes,
    check_model_source,
)
from ..passes.config import short_repr
from ..targets.files import atomic_write_text
from .exits import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE

if TYPE_CHECKING:
    from torch import nn

    from ..compiler.models import ExampleInputs
    from ..targets.base import Target

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "MODEL_HELP", "ArtifactCheckError",
           "CliError", "LibraryDefault", "Subcommand", "add_model_arguments", "check_model_arguments", "given",
           "is_user_error", "load_model", "parse_input_shapes", "parse_target_option", "report_bug",
           "show_library_default", "usable_target"]



class CliError(Exception):
    """A user error found by the command line itself (options that only the CLI has)."""


class ArtifactCheckError(Exception):
    """A built artifact does not reproduce the torch model."""


# The package's own code: a plain ValueError raised here is spruce rejecting an input.
_PACKAGE_ROOT = Path(__file__).resolve().parents[1]
_PACKAGE_DIRS = tuple(_PACKAGE_ROOT / name for name in ("compiler", "passes", "runtime", "targets"))


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` reports a user error (exit 2) rather than a bug in spruce (exit 1).

    User errors are: every exception type spruce defines (``TraceError``, ``RecipeError``,
    ``OutputError``, ...; the artifact checks, which exit 1, are caught before this), a plain
    ``ValueError`` raised by spruce's own code (an argument it rejects), and what the machine
    says about files and memory (``OSError``: unreadable input, unwritable output, a full disk;
    ``MemoryError``; ``FloatingPointError``: training that diverged). Anything else is a bug:
    a ``KeyError``, ``TypeError`` or ``AttributeError`` anywhere, and a ``ValueError`` or
    ``RuntimeError`` that escaped from inside a library spruce calls."""
    if isinstance(exc, (CliError, OSError, MemoryError, FloatingPointError)):
        return True
    if type(exc).__module__.partition(".")[0] == __package__.partition(".")[0]:
        return True
    if type(exc) is ValueError:
        frames = traceback.extract_tb(exc.__traceback__)
        origin = Path(frames[-1].filename).resolve() if frames else None
        return origin is not None and any(origin.is_relative_to(folder) for folder in _PACKAGE_DIRS)
    return False


def report_bug(exc: BaseException) -> str:
    """Save ``exc``'s traceback (with versions and the command line) to a file in the temporary
    folder; return the one line to print: an internal error, a bug, and where its traceback is."""
    details = (f"spruce {__version__}, Python {sys.version.split()[0]}, {sys.platform}\n"
               f"command: {' '.join(sys.argv)}\n\n" + "".join(traceback.format_exception(exc)))
    path = Path(tempfile.gettempdir()) / f"spruce-crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    try:
        atomic_write_text(path, details)
        where = f"the traceback is in {path}"
    except (OSError, ValueError) as error:  # nowhere to save it: the traceback goes to stderr after all
        print(details, file=sys.stderr)
        where = f"the traceback is above (it could not be saved: {error})"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    summary = f"{type(exc).__name__}: {short_repr(first, 200)[1:-1]}" if first else type(exc).__name__
    return f"spruce: internal error ({summary}); this is a bug, please report it: {where}"


def _no_checks(args: argparse.Namespace) -> None:
    """A subcommand whose arguments need no check beyond their parsers."""


@dataclass(frozen=True)
class Subcommand:
    """One ``spruce`` subcommand: its help line, its arguments, the checks of its arguments that
    need no model (paths, spec forms; they run before torch is imported and raise user errors),
    and its handler (which imports what it needs)."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    check: Callable[[argparse.Namespace], None] = _no_checks


class LibraryDefault:
    """A default that ``--help`` shows and the library owns (a config object's field): read only
    when the help is printed, since the config's module imports torch. Give an option
    ``help="... %(library_default)s"`` and set the action's ``library_default`` to one of these
    (:func:`show_library_default`); the option's own default stays None, which the handler
    passes on as "the library's default"."""

    def __init__(self, read: Callable[[], object]) -> None:
        self.read = read

    def __str__(self) -> str:
        return str(self.read())


def show_library_default(action: argparse.Action, read: Callable[[], object]) -> argparse.Action:
    """Let ``action``'s help show the value ``read()`` returns, as ``%(library_default)s``."""
    action.library_default = LibraryDefault(read)  # type: ignore[attr-defined]
    return action


def given(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The options among ``names`` given on the command line (not None), as keyword arguments."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def parse_input_shapes(text: str) -> tuple[Shape, ...]:
    """Parse ``1,3,224,224`` (one input) or ``1,3,64,64;1,10`` (several) into shapes, refusing
    shapes too large to allocate (:func:`~spruce.compiler.specs.check_input_sizes`) up front."""
    shapes = []
    for part in text.split(";"):
        try:
            shape = tuple(int(size) for size in part.split(","))
        except ValueError:
            shape = ()
        if not shape or any(size <= 0 for size in shape):
            raise argparse.ArgumentTypeError(
                f"bad input shape {short_repr(text)}: expected positive integers like 1,3,224,224 "
                "(separate several inputs with ';')"
            )
        shapes.append(shape)
    try:
        check_input_sizes(shapes)
    except ModelSpecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return tuple(shapes)


def load_model(spec: str, input_shapes: Sequence[Shape] | None) -> tuple[nn.Module, ExampleInputs]:
    """The model ``spec`` names with its example inputs (``--input-shape`` when given), checked
    to run on them once before any work: a user error naming the shapes if it does not."""
    from ..compiler.models import check_model_runs, resolve_model

    model, example_inputs = resolve_model(spec, input_shapes)
    check_model_runs(model, example_inputs, spec, "--input-shape" if input_shapes is not None else None)
    return model, example_inputs


MODEL_HELP = f"torchvision:NAME, timm:NAME, FILE.py:FACTORY or FILE.pt; {FACTORY_CONTRACT}"


def check_model_arguments(args: argparse.Namespace) -> None:
    """The model spec's form, and its file readable (before torch is imported; a user error)."""
    check_model_source(args.model)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments every model-taking subcommand shares."""
    parser.add_argument("model", help=MODEL_HELP)
    default_shape = ",".join(map(str, DEFAULT_INPUT_SHAPE))
    parser.add_argument(
        "--input-shape",
        type=parse_input_shapes,
        default=None,
        metavar="SHAPE",
        help="example input shape, e.g. 1,3,224,224; ';' between several inputs "
        f"(default: the model source's own, else {default_shape})",
    )


def parse_target_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as an int, a float, true/false, or else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"bad option {short_repr(text)}: expected KEY=VALUE, e.g. threads=2")
    value: Any = raw
    if raw.lower() in ("true", "false"):
        value = raw.lower() == "true"
    else:
        for kind in (int, float):
            try:
                value = kind(raw)
                break
            except ValueError:
                continue
    return key, value


def usable_target(name: str, options: Mapping[str, Any]) -> Target:
    """The target ``name`` built with ``options``, checked to run here; user errors as :class:`CliError`."""
    from ..targets.base import TargetUnavailable, get_target

    try:
        target = get_target(name, **dict(options))
        target.require()
    except ValueError as exc:  # an unknown target, or options its Options model refuses
        raise CliError(f"--option: {exc}") from exc
    except TargetUnavailable as exc:
        raise CliError(str(exc)) from exc
    return target
