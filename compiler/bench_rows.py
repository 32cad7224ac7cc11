"""How the report reads a bench row (``report.json``'s ``bench.by_batch``, format versions 1
and 2): its one speed-up and its latencies, for the tables and the plots alike."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["latency_ms", "speedup"]


def speedup(row: Mapping[str, Any]) -> float:
    """A bench row's one speed-up (dense / compiled): the load-robust latency's (a version 1
    report's ``robust_speedup``, or its median one where it has no robust figure)."""
    return row.get("robust_speedup", row["speedup"])


def latency_ms(row: Mapping[str, Any], which: str) -> float:
    """A bench row's latency (ms) of ``which`` (dense or compiled): the load-robust one where
    the report has it, else the wall-clock median."""
    return row.get(f"{which}_robust_ms", row[f"{which}_ms"])
