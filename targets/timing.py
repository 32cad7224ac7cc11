"""Load-robust timing: interleaved rounds, scheduler waiting excluded, outliers rejected.

A latency measured on a shared machine mixes two things: the time the model needs and the
time the calling thread spent *runnable but waiting for a CPU* because other processes held
the cores. On a loaded 2-core machine the second part is most of the wall time (ORT's
threads were queued for ~75 % of a resnet18 run next to a busy loop and other jobs), and it
changes by 2x within a minute, so wall-clock medians taken a minute apart disagree by that
much. Three measures make a timing stable:

- **waiting excluded**: on Linux ``/proc/thread-self/schedstat`` reports, per thread, the
  nanoseconds it spent waiting on a run queue. Each call's *active* time is its wall time
  minus that delay of the calling thread (where the kernel does not report it, the delay is
  taken as 0 and the wall time is used as it is). Time the thread spends blocked or spinning
  on other threads still counts: only time the scheduler withheld the CPU is removed.
- **interleaving**: things compared (the points of a latency grid, the models a calibration
  fits, a compiled model and its dense twin) are timed round-robin, one call each per round,
  the order rotating every round, so a change of load affects them all alike.
- **outlier rejection**: a series' value is the mean of the samples within
  ``OUTLIER_MADS`` scaled median absolute deviations of its median (:func:`robust_center`).

All functions return seconds.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "OUTLIER_MADS",
    "RunQueueClock",
    "Timings",
    "inlier_mask",
    "robust_center",
    "time_interleaved",
]

# A sample further than this many scaled MADs (1.4826 x MAD, the standard deviation of a
# normal sample) from the median is an outlier.
OUTLIER_MADS = 3.0
_MAD_TO_SIGMA = 1.4826


def inlier_mask(samples: Sequence[float] | np.ndarray, mads: float = OUTLIER_MADS) -> np.ndarray:
    """True for the samples within ``mads`` scaled median absolute deviations of the median.

    With a zero MAD (at least half the samples equal) only samples equal to the median are
    inliers. Raises ``ValueError`` for an empty series, non-finite samples or ``mads`` <= 0."""
    values = np.asarray(samples, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("no timing samples")
    if not np.isfinite(values).all():
        raise ValueError("timing samples must be finite numbers")
    if not mads > 0:
        raise ValueError(f"mads must be positive, got {mads!r}")
    median = np.median(values)
    spread = _MAD_TO_SIGMA * np.median(np.abs(values - median))
    return np.abs(values - median) <= mads * spread


def robust_center(samples: Sequence[float] | np.ndarray, mads: float = OUTLIER_MADS) -> float:
    """The mean of the inliers of ``samples`` (see :func:`inlier_mask`): as stable as a median
    against load bursts, less noisy than a median for the well-behaved rest."""
    values = np.asarray(samples, dtype=np.float64).ravel()
    return float(values[inlier_mask(values, mads)].mean())


class RunQueueClock:
    """Nanoseconds the *calling* thread has spent runnable but waiting for a CPU.

    Reads the second field of ``/proc/thread-self/schedstat`` (Linux, ``CONFIG_SCHED_INFO``),
    opened once by the thread that creates the clock: read it from that thread only.
    ``available`` is False where the file does not exist; :meth:`waiting_ns` then returns 0,
    so timings fall back to wall time."""

    PATH = "/proc/thread-self/schedstat"

    def __init__(self) -> None:
        self._fd: int | None = None
        try:
            self._fd = os.open(self.PATH, os.O_RDONLY)
            self._read()
        except (OSError, ValueError, IndexError):
            self.close()

    @property
    def available(self) -> bool:
        return self._fd is not None

    def _read(self) -> int:
        assert self._fd is not None
        return int(os.pread(self._fd, 128, 0).split()[1])

    def waiting_ns(self) -> int:
        """Cumulative run-queue delay of the thread (ns); 0 when unavailable."""
        return self._read() if self._fd is not None else 0

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunQueueClock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Timings:
    """Per-call timings of one series: ``wall_s`` and ``waiting_s`` (the calling thread's
    run-queue delay during the call; zeros where the kernel does not report it), seconds."""

    wall_s: np.ndarray
    waiting_s: np.ndarray

    @property
    def active_s(self) -> np.ndarray:
        """Wall time minus run-queue waiting, per call (seconds, >= 0)."""
        return np.maximum(self.wall_s - self.waiting_s, 0.0)

    def robust_s(self) -> float:
        """The series' latency: :func:`robust_center` of the active times (seconds)."""
        return robust_center(self.active_s)

    def robust_ms(self) -> float:
        """:meth:`robust_s` in milliseconds."""
        return 1e3 * self.robust_s()

    def wall_median_ms(self) -> float:
        """The plain median wall time (ms): what a naive timing would report."""
        return 1e3 * float(np.median(self.wall_s))

    def waiting_share(self) -> float:
        """The fraction of the wall time spent waiting for a CPU."""
        total = float(self.wall_s.sum())
        return float(self.waiting_s.sum()) / total if total > 0 else 0.0


def time_interleaved(calls: Sequence[Callable[[], Any]], warmup: int = 3, rounds: int = 20,
                     synchronize: Callable[[], None] | None = None) -> list[Timings]:
    """Time each of ``calls`` ``rounds`` times, round-robin (one call each per round, the
    starting call rotating every round), after ``warmup`` untimed calls each.

    ``synchronize`` (e.g. a CUDA synchronise) runs after every call, inside the timed span.
    Returns one :class:`Timings` per call, in the order given. Raises ``ValueError`` for no
    calls, ``warmup`` < 0 or ``rounds`` < 1."""
    if not calls:
        raise ValueError("time_interleaved: nothing to time")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"time_interleaved: warmup must be a non-negative integer, got {warmup!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"time_interleaved: rounds must be a positive integer, got {rounds!r}")
    sync = synchronize or (lambda: None)
    for call in calls:
        for _ in range(warmup):
            call()
    sync()
    count = len(calls)
    wall = np.empty((count, rounds))
    waiting = np.empty((count, rounds))
    with RunQueueClock() as clock:
        for r in range(rounds):
            for offset in range(count):
                k = (r + offset) % count
                waited = clock.waiting_ns()
                start = time.perf_counter()
                calls[k]()
                sync()
                wall[k, r] = time.perf_counter() - start
                waiting[k, r] = (clock.waiting_ns() - waited) * 1e-9
    # the delay is booked when the thread gets the CPU back, which can straddle the timed span
    waiting = np.minimum(waiting, wall)
    return [Timings(wall[k], waiting[k]) for k in range(count)]
