"""The ``spruce`` command line (the console entry; no other module imports it).

Each subcommand is one entry in ``SUBCOMMANDS`` (or a module in
``SUBCOMMAND_MODULES``): a function that adds its arguments and a function that
runs it; what they share is in :mod:`spruce.cli.common`. ``main``
returns the exit status:

- 0: success;
- 1: spruce failed to build or verify an artifact (e.g. ONNX Runtime's
  output differs from torch's);
- 2: a user error (bad model spec, bad option, model that cannot be traced,
  unwritable output, training that diverges). User errors print ``spruce: error: <message>`` and no
  traceback, and leave no files behind;
- 1 also for an internal error (a bug in spruce): one line saying so, with the traceback saved
  to a file the line names (see :func:`spruce.cli.common.is_user_error` for where the
  line between user errors and bugs runs);
- 130: interrupted (Ctrl-C): one line, outputs left as they were.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from .. import __version__
from ..api import deploy
from ..api.prune import PruneConfig, PruneResult, prune
from ..api.stats import count_macs, count_params
from ..api.verbs import channel_groups
from ..passes.analysis import ChannelGroup, Member
from ..passes.importance import IMPORTANCE
from ..targets.files import atomic_path, atomic_write_text, checked_out_dir, staged_dir
from ..targets.onnxruntime import OnnxExportError, check_onnx, export_onnx
from .common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    ArtifactCheckError,
    Subcommand,
    add_model_arguments,
    is_user_error,
    load_model,
    report_bug,
)

ONNX_TOLERANCE = 1e-3
_PRUNE_DEFAULTS = PruneConfig()


# --- entry point -------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``spruce`` command with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exit_request:  # argparse exits on --help and on usage errors
            return _exit_code(exit_request.code)
        return args.run(args)
    except KeyboardInterrupt:
        print("spruce: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of stdout went away (e.g. `spruce analyze ... | head`): not an error to
        # report, but stdout must not be flushed again at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except (ArtifactCheckError, OnnxExportError) as exc:
        return _report_error(exc, EXIT_FAILED)
    except Exception as exc:  # noqa: BLE001 - every error ends in one line: a user error, or a bug
        if is_user_error(exc):
            return _report_error(exc, EXIT_USAGE)
        print(report_bug(exc), file=sys.stderr)
        return EXIT_FAILED


def _report_error(exc: BaseException, code: int) -> int:
    print(f"spruce: error: {exc}", file=sys.stderr)
    return code


def _exit_code(code: object) -> int:
    if code is None:
        return EXIT_OK
    return code if isinstance(code, int) else EXIT_USAGE


# --- parser ------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors read ``spruce: error: ...`` in subcommands too."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"spruce: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``spruce`` parser with one sub-parser per subcommand."""
    parser = _Parser(prog="spruce", description="A model-compression compiler for PyTorch.")
    parser.add_argument("--version", action="version", version=f"spruce {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, subcommand in all_subcommands().items():
        subparser = subparsers.add_parser(name, help=subcommand.help, description=subcommand.help)
        subcommand.add_arguments(subparser)
        subparser.set_defaults(run=subcommand.run)
    return parser


# --- analyze -----------------------------------------------------------------------


def _add_analyze_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON document")


def run_analyze(args: argparse.Namespace) -> int:
    """Print the model's channel groups and a summary of what can be pruned."""
    model, example_inputs = load_model(args.model, args.input_shape)
    groups = channel_groups(model, example_inputs)
    if args.json:
        document = {
            "model": args.model,
            "input_shapes": [list(t.shape) for t in example_inputs],
            "groups": [_group_record(group) for group in groups],
            "summary": summarize_groups(groups),
        }
        print(json.dumps(document, indent=2))
    else:
        print(format_groups_table(groups))
        print()
        print(format_summary(summarize_groups(groups)))
    return EXIT_OK


def summarize_groups(groups: Sequence[ChannelGroup]) -> dict[str, Any]:
    """Counts of groups, prunable groups and channels, and why the rest are not prunable."""
    prunable = [group for group in groups if group.prunable]
    reasons = Counter(group.reason or "unspecified" for group in groups if not group.prunable)
    return {
        "groups": len(groups),
        "prunable_groups": len(prunable),
        "prunable_channels": sum(group.size for group in prunable),
        "unprunable_reasons": dict(reasons.most_common()),
    }


def format_groups_table(groups: Sequence[ChannelGroup]) -> str:
    """A fixed-width table: one row per group."""
    header = ("id", "size", "prunable", "members", "first member", "reason")
    rows = [
        (
            str(group.id),
            str(group.size),
            "yes" if group.prunable else "no",
            str(len(group.members)),
            _member_label(group.members[0]) if group.members else "-",
            group.reason or "",
        )
        for group in groups
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
             for row in (header, *rows)]
    return "\n".join(lines)


def format_summary(summary: dict[str, Any]) -> str:
    """The summary of :func:`summarize_groups` as text lines."""
    lines = [
        f"groups:            {summary['groups']}",
        f"prunable groups:   {summary['prunable_groups']}",
        f"prunable channels: {summary['prunable_channels']}",
    ]
    if summary["unprunable_reasons"]:
        lines.append("unprunable groups by reason:")
        lines += [f"  {count:5d}  {reason}" for reason, count in summary["unprunable_reasons"].items()]
    return "\n".join(lines)


def _group_record(group: ChannelGroup) -> dict[str, Any]:
    return {
        "id": group.id,
        "size": group.size,
        "prunable": group.prunable,
        "reason": group.reason,
        "members": [
            {"name": member.name, "dim": member.dim, "per_channel": int(member.index.shape[1])}
            for member in group.members
        ],
    }


def _member_label(member: Member) -> str:
    return f"{member.name}:{member.dim}"


# --- prune -------------------------------------------------------------------------


def _add_prune_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--ratio", type=float, required=True,
                        help="fraction of each prunable group's channels to remove")
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder for model.pt, model.onnx and report.json")
    parser.add_argument("--importance", default=_PRUNE_DEFAULTS.importance, choices=sorted(IMPORTANCE),
                        help=f"channel importance criterion (default: {_PRUNE_DEFAULTS.importance})")
    parser.add_argument("--round-to", type=int, default=None, metavar="N",
                        help="keep a multiple of N channels in every group")
    parser.add_argument("--ignore", action="append", default=[], metavar="NAME",
                        help="passed to spruce.prune(ignore=...); repeatable")
    parser.add_argument("--normalised-widths", action="store_true",
                        help="prune the widths LayerNorm/RMSNorm normalise over (masked norm; changes the "
                             "function: report.json's errors.dense says by how much)")
    parser.add_argument("--force", action="store_true",
                        help="replace --out if it exists and is not empty")


def _write_onnx(result: PruneResult, example_inputs: Sequence[torch.Tensor], path: Path) -> float:
    """Write the compact model to ``path`` as ONNX with a dynamic batch (and the dims a capture
    declared dynamic); return ONNX Runtime's largest relative difference from torch. A model
    captured whole goes through :func:`spruce.api.deploy.save_onnx` (its graph rewritten so
    TorchScript tracing keeps the batch symbolic); any other through ``export_onnx``."""
    captured = result.analysis.captured
    if captured is not None and captured.whole:
        (part,) = deploy.parts(result.model, captured)
        return deploy.save_onnx(part, path)[1]
    export_onnx(result.model, example_inputs, path, dynamic_batch=True)
    return check_onnx(path, result.model, example_inputs)


def run_prune(args: argparse.Namespace) -> int:
    """Prune the model, write model.pt, model.onnx (dynamic batch) and report.json to ``--out``.

    The folder appears only when every file is written and ONNX Runtime
    reproduces the compact model within ``ONNX_TOLERANCE``.
    """
    PruneConfig(ratio=args.ratio, importance=args.importance, round_to=args.round_to,
                normalised_widths=args.normalised_widths)  # before any work
    out_dir = checked_out_dir(args.out, args.force, name="--out", force_hint="--force")
    model, example_inputs = load_model(args.model, args.input_shape)
    params_before = count_params(model)
    macs_before = count_macs(model, example_inputs)
    result = prune(
        model, example_inputs,
        ratio=args.ratio, importance=args.importance,
        round_to=args.round_to, ignore=tuple(args.ignore), normalised_widths=args.normalised_widths,
    )
    compact = result.model
    params_after = count_params(compact)
    macs_after = count_macs(compact, example_inputs)
    with staged_dir(out_dir) as stage:
        with atomic_path(stage / "model.pt") as temp, open(temp, "wb") as stream:
            torch.save(compact, stream)  # to a stream: a full disk is an OSError, not torch's RuntimeError
        onnx_diff = _write_onnx(result, example_inputs, stage / "model.onnx")
        if not onnx_diff <= ONNX_TOLERANCE:
            raise ArtifactCheckError(
                f"ONNX Runtime output differs from torch by {onnx_diff:.3g} "
                f"(relative; tolerance {ONNX_TOLERANCE:g})"
            )
        report = {
            "spruce_version": __version__,
            "torch_version": torch.__version__,
            "model": args.model,
            "input_shapes": [list(t.shape) for t in example_inputs],
            "ratio": args.ratio,
            "importance": args.importance,
            "round_to": args.round_to,
            "ignore": list(args.ignore),
            "normalised_widths": args.normalised_widths,
            "errors": result.errors(),
            "params": _before_after(params_before, params_after),
            "macs": _before_after(macs_before, macs_after),
            "groups": _kept_records(result),
            "onnx": {"file": "model.onnx", "max_rel_diff": onnx_diff,
                     "tolerance": ONNX_TOLERANCE},
            "files": ["model.pt", "model.onnx", "report.json"],
        }
        atomic_write_text(stage / "report.json", json.dumps(report, indent=2) + "\n")
    print(f"params  {params_before:>15,} -> {params_after:>15,}  "
          f"({report['params']['ratio']:.3f}x)")
    print(f"MACs    {macs_before:>15,} -> {macs_after:>15,}  ({report['macs']['ratio']:.3f}x)")
    print(f"ONNX Runtime max relative diff {onnx_diff:.2e} (tolerance {ONNX_TOLERANCE:g})")
    print(f"compact vs masked model {report['errors']['masked']:.2e}, vs unpruned model "
          f"{report['errors']['dense']:.2e} (relative)")
    print(f"wrote {out_dir}")
    return EXIT_OK


def _before_after(before: int, after: int) -> dict[str, float]:
    return {"before": before, "after": after, "ratio": after / before if before else 1.0}


def _kept_records(result: PruneResult) -> list[dict[str, Any]]:
    """For each group: its size and how many channels survived."""
    return [
        {
            "id": group.id,
            "size": group.size,
            "prunable": group.prunable,
            "kept": len(result.kept[group.id]) if group.id in result.kept else group.size,
        }
        for group in result.groups
    ]


SUBCOMMANDS: dict[str, Subcommand] = {
    "analyze": Subcommand(
        help="show the model's coupled channel groups and what can be pruned",
        add_arguments=_add_analyze_arguments,
        run=run_analyze,
    ),
    "prune": Subcommand(
        help="prune channels one-shot and write model.pt, model.onnx and report.json",
        add_arguments=_add_prune_arguments,
        run=run_prune,
    ),
}

# Subcommands that live in their own modules (relative to this package), as (name, module);
# each exposes SUBCOMMAND; they are imported when the parser is built.
SUBCOMMAND_MODULES: tuple[tuple[str, str], ...] = (
    ("compile", ".compile"),
    ("profile", ".profile"),
    ("bench", ".bench"),
)


def all_subcommands() -> dict[str, Subcommand]:
    """Every subcommand, in the order ``spruce --help`` lists them."""
    found = {name: importlib.import_module(module, __package__).SUBCOMMAND for name, module in SUBCOMMAND_MODULES}
    return {"compile": found.pop("compile"), **SUBCOMMANDS, **found}


if __name__ == "__main__":
    raise SystemExit(main())
