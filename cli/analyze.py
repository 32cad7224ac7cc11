"""``spruce analyze MODEL [--json]``: the model's coupled channel groups and what can be pruned."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .common import EXIT_OK, Subcommand, add_model_arguments, check_model_arguments, load_model

if TYPE_CHECKING:
    from ..passes.analysis import ChannelGroup, Member


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON document")


def run(args: argparse.Namespace) -> int:
    """Print the model's channel groups and a summary of what can be pruned."""
    from ..api.verbs import channel_groups
    from ..compiler.models import input_shapes

    model, example_inputs = load_model(args.model, args.input_shape)
    groups = channel_groups(model, example_inputs)
    if args.json:
        document = {
            "model": args.model,
            "input_shapes": input_shapes(example_inputs),
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


SUBCOMMAND = Subcommand(
    help="show the model's coupled channel groups and what can be pruned",
    add_arguments=add_arguments,
    check=check_model_arguments,
    run=run,
)
