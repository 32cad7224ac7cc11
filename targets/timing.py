"""Load-robust timing: interleaved rounds, scheduler waiting excluded, outliers rejected.

A latency measured on a shared machine mixes two things: the time the model needs and the
time the calling thread spent *runnable but waiting for a CPU* because other processes held
the cores. On a loaded 2-core machine the second part is most of the wall time (ORT's
threads were queued for ~75 % of a resnet18 run next to a busy loop and other jobs), and it
changes by 2x within a minute, so wall-clock medians taken a minute apart disagree by that
much. Three measures make a timing stable:

- **waiting excluded**: on Linux ``/proc/<pid>/task/<tid>/schedstat`` reports, per thread,
  the nanoseconds it ran and the nanoseconds it spent waiting on a run queue. Each call's
  *active* time is its wall time minus the mean run-queue delay, during the call, of the
  threads of this process that ran during it (the calling thread always counts; where the
  kernel does not report it, the delay is taken as 0 and the wall time is used as it is).
  The workers of a parallel runtime (ONNX Runtime's intra-op pool, torch's) wait on the run
  queue as the caller does, and the caller waits for them at every parallel section, so the
  caller's own delay alone left most of the load in the figure. The mean over the threads
  that ran is an empirical choice: next to a busy loop on 2 cores, four identical resnet18
  ONNX Runtime sessions (2 threads, spinning off) timed interleaved for 20 rounds disagreed
  by 0.7-5.9 % with it, 11-19 % with the caller's delay alone, and it gave 29-33 ms against
  27-28 ms measured on the quiet machine (the maximum over threads gave 24-28 ms: it removes
  delays the caller spent working). Time a thread spends blocked or spinning still counts,
  so runtimes whose idle threads spin between calls (ONNX Runtime's default) should not
  spin while timed (``OnnxRuntimeCPU(spinning=False)``, its default).
- **interleaving**: things compared (the points of a latency grid, the models a calibration
  fits, a compiled model and its dense twin) are timed round-robin, one call each per round,
  the order rotating every round, so a change of load affects them all alike.
- **outlier rejection**: a series' value is the mean of the samples within
  ``OUTLIER_MADS`` scaled median absolute deviations of its median (:func:`robust_center`).

All functions return seconds.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "OUTLIER_MADS",
    "RunQueueClock",
    "ThreadsClock",
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


class ThreadsClock:
    """Run-queue waiting of the threads of this process that run during a span.

    :meth:`snapshot` reads ``/proc/self/task/<tid>/schedstat`` (ran ns, waited ns) of every
    thread; :meth:`waiting_ns` of two snapshots is the mean waiting, between them, of the
    threads that ran between them, the thread that created the clock always included.
    ``available`` is False where the files do not exist (not Linux, no ``CONFIG_SCHED_INFO``);
    snapshots are then empty and the waiting 0, so timings fall back to wall time."""

    ROOT = "/proc/self/task"

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._me = str(threading.get_native_id())
        self.available = self._me in self.snapshot()

    def snapshot(self) -> dict[str, tuple[int, int]]:
        """(ran ns, waited ns) per thread id; empty when unavailable (or closed)."""
        try:
            tids = os.listdir(self.ROOT)
        except OSError:
            return {}
        for gone in set(self._fds) - set(tids):  # threads that exited: their files are stale
            os.close(self._fds.pop(gone))
        counters = {}
        for tid in tids:
            try:
                fd = self._fds.get(tid)
                if fd is None:
                    fd = self._fds[tid] = os.open(f"{self.ROOT}/{tid}/schedstat", os.O_RDONLY)
                ran, waited = os.pread(fd, 128, 0).split()[:2]
                counters[tid] = (int(ran), int(waited))
            except (OSError, ValueError):  # exited meanwhile, or no schedstat here
                fd = self._fds.pop(tid, None)
                if fd is not None:
                    os.close(fd)
        return counters

    def waiting_ns(self, before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]],
                   wall_ns: float) -> float:
        """Run-queue delay (ns) of a span of ``wall_ns`` between snapshots ``before`` and
        ``after``: the mean delay of the threads that ran for at least a tenth of the span
        (the creating thread always counts; a thread that only finished an earlier job is
        left out), each clipped to the span (a delay is booked when the thread gets a CPU
        back, so it can reach back before the span). At most ``wall_ns`` minus the longest
        run time of those threads: the span lasted at least as long as any of them ran in
        it. 0 without counters."""
        counted = [tid for tid in after if tid in before
                   and (tid == self._me or after[tid][0] - before[tid][0] >= 0.1 * wall_ns)]
        if not counted:
            return 0.0
        delay = float(np.mean([min(after[t][1] - before[t][1], wall_ns) for t in counted]))
        longest_run = max(after[t][0] - before[t][0] for t in counted)
        return max(min(delay, wall_ns - longest_run), 0.0)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> ThreadsClock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Timings:
    """Per-call timings of one series: ``wall_s`` and ``waiting_s`` (the mean run-queue delay
    of the threads that ran during the call, :class:`ThreadsClock`; zeros where the kernel does
    not report it), seconds."""

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
    with ThreadsClock() as clock:
        for r in range(rounds):
            for offset in range(count):
                k = (r + offset) % count
                before = clock.snapshot()
                start = time.perf_counter()
                calls[k]()
                sync()
                wall[k, r] = time.perf_counter() - start
                waiting[k, r] = clock.waiting_ns(before, clock.snapshot(), wall[k, r] * 1e9) * 1e-9
    # the delay is booked when the thread gets the CPU back, which can straddle the timed span
    waiting = np.minimum(waiting, wall)
    return [Timings(wall[k], waiting[k]) for k in range(count)]
