"""``spruce bench ARTIFACT --target T [--dense DENSE]``: latency and images/s of a built artifact."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..compiler.specs import check_readable_file
from ..passes.config import short_repr
from .common import EXIT_OK, CliError, Subcommand, given, parse_target_option, show_library_default, usable_target


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """``1,8`` -> (1, 8); positive integers only."""
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or any(size < 1 for size in sizes):
        raise argparse.ArgumentTypeError(f"bad batch sizes {short_repr(text)}: expected positive integers like 1,8")
    return sizes


def _bench_default(name: str) -> object:
    from ..runtime.options import BenchConfig

    value = getattr(BenchConfig(), name)
    return ",".join(map(str, value)) if isinstance(value, tuple) else value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", type=Path, help="artifact file built by spruce (with its .spruce.json manifest)")
    parser.add_argument("--target", required=True, help="target that built it, e.g. onnxruntime, torch, tensorrt")
    parser.add_argument("--option", type=parse_target_option, action="append", default=[], metavar="KEY=VALUE",
                        dest="target_options", help="target option, e.g. threads=2 (repeatable)")
    parser.add_argument("--dense", type=Path, default=None, help="dense artifact to compare with in the same run")
    for flag, kind, text in (("--batch-sizes", parse_batch_sizes, "comma-separated batch sizes"),
                             ("--warmup", int, "untimed runs per batch size"),
                             ("--iters", int, "timed runs per batch size")):
        name = flag.removeprefix("--").replace("-", "_")
        show_library_default(parser.add_argument(flag, type=kind, default=None,
                                                 help=f"{text} (default: %(library_default)s)"),
                             lambda name=name: _bench_default(name))
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")


def check(args: argparse.Namespace) -> None:
    """The artifact (and --dense) readable files (before torch is imported)."""
    check_readable_file(args.artifact, "artifact", CliError)
    if args.dense is not None:
        check_readable_file(args.dense, "--dense artifact", CliError)


def run(args: argparse.Namespace) -> int:
    """Bench the artifact (and the dense one), print a table or JSON."""
    from ..runtime.bench import BenchConfig, bench
    from ..targets.base import TargetUnavailable

    options = BenchConfig(**given(args, "batch_sizes", "warmup", "iters"))  # checked before any loading
    target = usable_target(args.target, args.target_options)
    try:
        report = bench(args.artifact, target, options.batch_sizes, options.warmup, options.iters, dense=args.dense)
    except TargetUnavailable as exc:
        raise CliError(str(exc)) from exc
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.format_table())
    return EXIT_OK


SUBCOMMAND = Subcommand(help="time a built artifact (median/p90/p99 latency, images/s), optionally vs dense",
                        add_arguments=add_arguments, check=check, run=run)
