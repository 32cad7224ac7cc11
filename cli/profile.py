"""``spruce profile MODEL --target T --out FILE``: build a model's latency table on a target."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .common import (
    EXIT_OK,
    CliError,
    Subcommand,
    add_model_arguments,
    check_model_arguments,
    given,
    load_model,
    parse_target_option,
    show_library_default,
    usable_target,
)


def _profile_default(name: str) -> object:
    from ..runtime.options import ProfileConfig

    return getattr(ProfileConfig(), name)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--target", default="onnxruntime", help="target name (default: onnxruntime)")
    parser.add_argument("--option", type=parse_target_option, action="append", default=[], metavar="KEY=VALUE",
                        dest="target_options", help="target option, e.g. threads=2 (repeatable)")
    parser.add_argument("--out", type=Path, required=True, help="latency table file to write (JSON)")
    for flag, text in (("--step", "channel granularity of the grid"),
                       ("--coarse", "points per axis of the coarse grid"), ("--warmup", "untimed runs per point"),
                       ("--repeats", "timed rounds per point (interleaved; load-robust mean)")):
        name = flag.removeprefix("--")
        show_library_default(parser.add_argument(flag, type=int, default=None, help=f"{text} (default: "
                                                 "%(library_default)s)"),
                             lambda name=name: _profile_default(name))
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="measurement cache (default: $SPRUCE_CACHE or ~/.cache/spruce/latency)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def check(args: argparse.Namespace) -> None:
    """The model spec and its file, and --out (before torch is imported)."""
    check_model_arguments(args)
    out = args.out.absolute()
    if out.is_dir():
        raise CliError(f"--out {out} is a directory; give a file name")
    if not out.parent.is_dir():
        raise CliError(f"--out {out}: folder {out.parent} does not exist")


def run(args: argparse.Namespace) -> int:
    """Profile the model, write the table to ``--out`` atomically, print a summary."""
    from ..runtime.profile import ProfileConfig, profile

    out = args.out.absolute()
    options = ProfileConfig(**given(args, "step", "coarse", "warmup", "repeats"))  # early check, defaults filled
    target = usable_target(args.target, args.target_options)
    model, example_inputs = load_model(args.model, args.input_shape)
    start = time.perf_counter()
    table = profile(model, example_inputs, target, options.step, cache_dir=args.cache_dir, use_cache=not args.no_cache,
                    progress=not args.no_progress, warmup=options.warmup, repeats=options.repeats,
                    coarse=options.coarse)
    seconds = time.perf_counter() - start
    table.save(out)
    dense = table.calibration.samples[0]["ms"] if table.calibration.samples else float("nan")
    print(f"layers {len(table.layers)}  signatures {len(table.points)}  "
          f"points {sum(map(len, table.points.values()))}  in {seconds:.1f} s")
    print(f"dense latency: predicted {table.dense_ms():.3f} ms, measured {dense:.3f} ms")
    print(f"wrote {out}")
    return EXIT_OK


SUBCOMMAND = Subcommand(
    help="profile per-layer latency on a target and write a latency table",
    add_arguments=add_arguments,
    check=check,
    run=run,
)
