"""``spruce.bench``: latency and throughput of a built artifact, optionally against its dense twin.

Every batch size is timed through the target's own runner (CUDA-synchronised on GPU
targets), so the wall-clock figures are what a deployment would see. When a dense
artifact is given, compiled and dense calls are interleaved one by one at each batch
size (:func:`spruce.targets.timing.time_interleaved`: round-robin, the order rotating
every round), so a change of load or clock between calls slows both alike; timing one
artifact's calls and then the other's let a load change between the two blocks decide
the speed-up. Each row also carries the load-robust latency (run-queue waiting of the
threads that ran excluded, outliers rejected: the statistic compile's latency budget is
measured with), and the report a speed-up on it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ..targets.base import Artifact, Target, get_target, read_artifact
from ..targets.timing import Timings, time_interleaved
from .options import BenchConfig

__all__ = ["BenchConfig", "BenchReport", "BenchRow", "bench"]


_DEFAULTS = BenchConfig()


@dataclass(frozen=True)
class BenchRow:
    """Latency statistics of one artifact (``which``: 'compiled' or 'dense') at one batch size:
    wall-clock median, 90th and 99th percentile (ms) and throughput (images/s at the median),
    and ``robust_ms``, the load-robust latency (ms; wall time minus the mean
    run-queue waiting of the threads that ran, outliers beyond 3 scaled MADs rejected, :meth:`Timings.robust_ms`)."""

    which: str
    batch_size: int
    median_ms: float
    p90_ms: float
    p99_ms: float
    images_per_s: float
    robust_ms: float


@dataclass(frozen=True)
class BenchReport:
    """All rows of one bench run, the target's fingerprint and, with a dense artifact, speed-ups."""

    fingerprint: dict[str, str]
    rows: tuple[BenchRow, ...]
    speedup: dict[int, float] = field(default_factory=dict)  # batch size -> dense median / compiled median
    robust_speedup: dict[int, float] = field(default_factory=dict)  # batch size -> the same on robust_ms

    def row(self, which: str, batch_size: int) -> BenchRow:
        """The row for ``which`` at ``batch_size`` (KeyError when it was not measured)."""
        for row in self.rows:
            if row.which == which and row.batch_size == batch_size:
                return row
        raise KeyError(f"no {which} row at batch size {batch_size}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (speed-up keys as strings)."""
        return {"fingerprint": dict(self.fingerprint), "rows": [asdict(r) for r in self.rows],
                "speedup": {str(b): s for b, s in self.speedup.items()},
                "robust_speedup": {str(b): s for b, s in self.robust_speedup.items()}}

    def format_table(self) -> str:
        """A fixed-width table: one line per artifact and batch size, speed-up on compiled lines."""
        header = (f"{'artifact':<9} {'batch':>5} {'median ms':>10} {'p90 ms':>9} {'p99 ms':>9} {'robust ms':>10} "
                  f"{'images/s':>10}")
        lines = [header + ("  speedup" if self.speedup else ""), "-" * (len(header) + (9 if self.speedup else 0))]
        for row in self.rows:
            line = (f"{row.which:<9} {row.batch_size:>5} {row.median_ms:>10.3f} {row.p90_ms:>9.3f} "
                    f"{row.p99_ms:>9.3f} {row.robust_ms:>10.3f} {row.images_per_s:>10.1f}")
            if row.which == "compiled" and row.batch_size in self.speedup:
                line += f"  {self.speedup[row.batch_size]:>6.2f}x"
            lines.append(line)
        return "\n".join(lines)


def bench(artifact: Artifact | str | os.PathLike, target: str | Target,
          batch_sizes: Sequence[int] = _DEFAULTS.batch_sizes, warmup: int = _DEFAULTS.warmup,
          iters: int = _DEFAULTS.iters, dense: Artifact | str | os.PathLike | None = None,
          others: Mapping[str, Artifact | str | os.PathLike] | None = None) -> BenchReport:
    """Time ``artifact`` (and ``dense`` when given) on ``target`` at each batch size:
    ``warmup`` untimed calls each, then ``iters`` rounds of one call each, compiled and dense
    interleaved (see the module doc). ``others`` (name -> artifact, e.g. ``{"dense_int8": ...}``)
    are timed in the same rounds, their rows named by their keys. Returns a
    :class:`BenchReport` (latencies in ms).

    Raises ``ArtifactError`` when a file is missing, has no valid manifest or was built for
    another target, ``TargetUnavailable`` when the target cannot run here, ``ValueError`` for
    an unknown target or bad options. Inputs are random normal tensors of the artifact's input
    shapes with the batch axis set to each batch size (the artifact must accept it).
    """
    config = BenchConfig(batch_sizes=batch_sizes, warmup=warmup, iters=iters)
    target = get_target(target) if isinstance(target, str) else target
    artifacts = {"compiled": _artifact(artifact, target)}
    if dense is not None:
        artifacts["dense"] = _artifact(dense, target)
    for which, other in (others or {}).items():
        if which in ("compiled", "dense"):
            raise ValueError(f"bench: others may not be named {which!r}")
        artifacts[which] = _artifact(other, target)
    target.require()
    runners = {which: target.timing_runner(a) for which, a in artifacts.items()}
    rows: list[BenchRow] = []
    for batch_size in config.batch_sizes:
        calls = [functools.partial(runners[which], target.prepare_inputs(art, _random_inputs(art, batch_size)))
                 for which, art in artifacts.items()]
        timings = time_interleaved(calls, config.warmup, config.iters, target.synchronize, target.caller_cpu())
        rows.extend(_row(which, batch_size, timing) for which, timing in zip(artifacts, timings))
    figures = {(row.which, row.batch_size): row for row in rows}

    def speedups(statistic: str) -> dict[int, float]:  # dense / compiled, per batch size
        if dense is None:
            return {}
        return {b: getattr(figures["dense", b], statistic) / getattr(figures["compiled", b], statistic)
                for b in config.batch_sizes}

    return BenchReport(fingerprint=target.fingerprint(), rows=tuple(rows), speedup=speedups("median_ms"),
                       robust_speedup=speedups("robust_ms"))


def _artifact(value: Artifact | str | os.PathLike, target: Target) -> Artifact:
    if isinstance(value, Artifact):
        return read_artifact(value.path, expected_target=target.name)
    return read_artifact(value, expected_target=target.name)


def _random_inputs(artifact: Artifact, batch_size: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    dtype = getattr(torch, artifact.input_dtype, torch.float32)
    inputs = []
    for shape in artifact.input_shapes:
        sized = (batch_size, *shape[1:]) if shape else ()
        inputs.append(torch.randn(sized, generator=generator).to(dtype))
    return inputs


def _row(which: str, batch_size: int, timing: Timings) -> BenchRow:
    ms = np.asarray(timing.wall_s, dtype=np.float64) * 1e3
    median = float(np.median(ms))
    return BenchRow(which=which, batch_size=batch_size, median_ms=median, p90_ms=float(np.percentile(ms, 90)),
                    p99_ms=float(np.percentile(ms, 99)), images_per_s=batch_size * 1e3 / median,
                    robust_ms=timing.robust_ms())
