"""What every ``spruce`` subcommand shares: exit codes, errors, the subcommand record and the
parsers of common arguments (model spec and input shapes, target options).

The console entry :mod:`spruce.compiler.cli` imports the subcommand modules
(``cli_pipeline``, ``cli_profile``, ``cli_bench``); they import this module, never the entry.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..targets.base import Target, TargetUnavailable, get_target
from .models import DEFAULT_INPUT_SHAPE, Shape

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "ArtifactCheckError", "CliError", "Subcommand",
           "add_model_arguments", "parse_input_shapes", "parse_target_option", "usable_target"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class CliError(Exception):
    """A user error found by the command line itself (options that only the CLI has)."""


class ArtifactCheckError(Exception):
    """A built artifact does not reproduce the torch model."""


@dataclass(frozen=True)
class Subcommand:
    """One ``spruce`` subcommand: its help line, its arguments, its handler."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def parse_input_shapes(text: str) -> tuple[Shape, ...]:
    """Parse ``1,3,224,224`` (one input) or ``1,3,64,64;1,10`` (several) into shapes."""
    shapes = []
    for part in text.split(";"):
        try:
            shape = tuple(int(size) for size in part.split(","))
        except ValueError:
            shape = ()
        if not shape or any(size <= 0 for size in shape):
            raise argparse.ArgumentTypeError(
                f"bad input shape {text!r}: expected positive integers like 1,3,224,224 "
                "(separate several inputs with ';')"
            )
        shapes.append(shape)
    return tuple(shapes)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments every model-taking subcommand shares."""
    parser.add_argument(
        "model",
        help="torchvision:NAME, timm:NAME, FILE.py:FACTORY or FILE.pt",
    )
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
        raise argparse.ArgumentTypeError(f"bad target option {text!r}: expected KEY=VALUE, e.g. threads=2")
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
    try:
        target = get_target(name, **dict(options))
        target.require()
    except TypeError as exc:
        raise CliError(f"--option: target {name!r} does not take these options: {exc}") from exc
    except TargetUnavailable as exc:
        raise CliError(str(exc)) from exc
    return target
