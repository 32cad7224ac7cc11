"""``spruce bench ARTIFACT --target T [--dense DENSE]``: latency and images/s of a built artifact."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..passes.config import short_repr
from ..runtime.bench import BenchConfig, bench
from ..targets.base import TargetUnavailable
from .common import EXIT_OK, CliError, Subcommand, parse_target_option, usable_target


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """``1,8`` -> (1, 8); positive integers only."""
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or any(size < 1 for size in sizes):
        raise argparse.ArgumentTypeError(f"bad batch sizes {short_repr(text)}: expected positive integers like 1,8")
    return sizes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = BenchConfig()
    parser.add_argument("artifact", type=Path, help="artifact file built by spruce (with its .spruce.json manifest)")
    parser.add_argument("--target", required=True, help="target that built it, e.g. onnxruntime, torch, tensorrt")
    parser.add_argument("--option", type=parse_target_option, action="append", default=[], metavar="KEY=VALUE",
                        dest="target_options", help="target option, e.g. threads=2 (repeatable)")
    parser.add_argument("--dense", type=Path, default=None, help="dense artifact to compare with in the same run")
    parser.add_argument("--batch-sizes", type=parse_batch_sizes, default=defaults.batch_sizes,
                        help="comma-separated batch sizes (default: 1,8)")
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="untimed runs per batch size")
    parser.add_argument("--iters", type=int, default=defaults.iters, help="timed runs per batch size")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    """Bench the artifact (and the dense one), print a table or JSON."""
    BenchConfig(batch_sizes=args.batch_sizes, warmup=args.warmup, iters=args.iters)  # checked before any loading
    target = usable_target(args.target, args.target_options)
    try:
        report = bench(args.artifact, target, args.batch_sizes, args.warmup, args.iters, dense=args.dense)
    except TargetUnavailable as exc:
        raise CliError(str(exc)) from exc
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.format_table())
    return EXIT_OK


SUBCOMMAND = Subcommand(help="time a built artifact (median/p90/p99 latency, images/s), optionally vs dense",
                        add_arguments=add_arguments, run=run)
