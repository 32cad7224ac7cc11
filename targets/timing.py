"""Load-robust timing: interleaved rounds, scheduler waiting excluded, outliers rejected.

A latency measured on a shared machine mixes two things: the time the model needs and the
time the calling thread spent *runnable but waiting for a CPU* because other processes held
the cores. On a loaded 2-core machine the second part is most of the wall time (ORT's
threads were queued for ~75 % of a resnet18 run next to a busy loop and other jobs), and it
changes by 2x within a minute, so wall-clock medians taken a minute apart disagree by that
much. Three measures make a timing stable:

- **waiting excluded**: on Linux ``/proc/<pid>/task/<tid>/schedstat`` reports, per thread,
  the nanoseconds it ran and the nanoseconds it spent waiting on a run queue. Each call's
  *active* time is its wall time minus the run-queue delay, during the call, of the threads
  of this process that ran during it (the calling thread always counts; where the kernel
  does not report it, the delay is taken as 0 and the wall time is used as it is). Which
  delay depends on where the threads may run:

  - **pinned** (``caller_cpu``; ONNX Runtime's default, ``OnnxRuntimeCPU(pin_threads=True)``):
    the calling thread and each worker of the runtime's intra-op pool sit on CPUs of their
    own, so a busy process always shares a core with the same thread. Subtracted: the calling
    thread's own delay, plus the part of its idle time (blocked, waiting for the workers at a
    parallel section) that the longest delay of a worker that ran explains
    (:meth:`ThreadsClock.waiting_ns`). A worker that queued while the calling thread did the
    work itself (ONNX Runtime takes back work a worker has not started) delayed nothing.
    The calling thread's run time is read from its own CPU clock: the kernel books a running
    thread's run time at scheduler ticks, and read from ``schedstat`` it snapped the figures
    to multiples of the 4 ms tick. Next to a pure-Python busy loop on 2 cores, 2 threads,
    100 interleaved rounds (``bench/results/latency.md``): a dense model and a second session
    of it (its twin) agreed within 1.8 % (resnet18, resnet50, mobilenet_v2), and mobilenet_v2
    compact models' fractions of dense matched a table profiled minutes earlier within 11 %
    whether the dense model measured 8.2 ms or, in another state of the machine, 6.0 ms.
  - **unpinned**: the **mean** delay of the threads that ran. Unpinned, the scheduler moves
    the threads and the busy process between the cores, and a session's threads can keep a
    placement that shares a core with the busy process for as long as it lives: under the
    same load the twins disagreed by 2.4 % (resnet18) and 27.5 % (mobilenet_v2), and
    mobilenet_v2 compact models measured 0.79-1.16 of dense where 0.90 was measured without
    the load. The mean gave the closest figures of the rules tried there (the maximum removes
    delays the caller spent working).

  Time a thread spends blocked or spinning still counts, so runtimes whose idle threads spin
  between calls (ONNX Runtime's default) should not spin while timed
  (``OnnxRuntimeCPU(spinning=False)``, its default).
- **interleaving**: things compared (the points of a latency grid, the models a calibration
  fits, a compiled model and its dense twin) are timed round-robin, one call each per round,
  the order rotating every round, so a change of load affects them all alike.
- **outlier rejection**: a series' value is the mean of the samples within
  ``OUTLIER_MADS`` scaled median absolute deviations of its median (:func:`robust_center`).

All functions return seconds.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "OUTLIER_MADS",
    "RunQueueClock",
    "ThreadsClock",
    "Timings",
    "inlier_mask",
    "pinned_to",
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
    threads that ran between them, the thread that created the clock always included, or with
    ``critical=True`` (threads pinned to CPUs of their own) the delay the creating thread
    waited for (:meth:`waiting_ns`; see the module docstring).
    ``available`` is False where the files do not exist (not Linux, no ``CONFIG_SCHED_INFO``);
    snapshots are then empty and the waiting 0, so timings fall back to wall time."""

    ROOT = "/proc/self/task"

    def __init__(self, critical: bool = False) -> None:
        self.critical = bool(critical)
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
        own_clock = str(threading.get_native_id()) == self._me  # read by the thread that created the clock
        for tid in tids:
            try:
                fd = self._fds.get(tid)
                if fd is None:
                    fd = self._fds[tid] = os.open(f"{self.ROOT}/{tid}/schedstat", os.O_RDONLY)
                ran, waited = os.pread(fd, 128, 0).split()[:2]
                counters[tid] = (int(ran), int(waited))
                if own_clock and tid == self._me:
                    # the kernel books a running thread's run time at scheduler ticks (4 ms apart
                    # here), so read by the thread itself it lags; its CPU clock does not
                    counters[tid] = (time.thread_time_ns(), int(waited))
            except (OSError, ValueError):  # exited meanwhile, or no schedstat here
                fd = self._fds.pop(tid, None)
                if fd is not None:
                    os.close(fd)
        return counters

    def waiting_ns(self, before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]],
                   wall_ns: float) -> float:
        """Run-queue delay (ns) of a span of ``wall_ns`` between snapshots ``before`` and
        ``after``, each thread's delay clipped to the span (a delay is booked when the thread
        gets a CPU back, so it can reach back before the span). 0 without counters.

        - default: the mean delay of the threads that ran for at least a tenth of the span
          (the creating thread always counts; a thread that only finished an earlier job is
          left out), at most ``wall_ns`` minus the longest run time of those threads (the span
          lasted at least as long as any of them ran in it);
        - ``critical`` (threads pinned one per CPU): the creating thread's own delay, plus the
          part of its idle time (the span less its run time and delay: blocked, waiting for the
          workers) that the longest delay of the other threads that ran at all explains. A
          worker that queued while the creating thread did the work itself (runtimes take back
          work a worker has not started) delayed nothing; one that queued while the creating
          thread waited for it delayed the span by that much."""
        me = self._me
        if me not in before or me not in after:
            return 0.0
        threshold = 1 if self.critical else 0.1 * wall_ns  # ns a thread must have run in the span
        counted = [tid for tid in after if tid in before
                   and (tid == me or after[tid][0] - before[tid][0] >= threshold)]
        delays = {t: min(after[t][1] - before[t][1], wall_ns) for t in counted}
        runs = {t: after[t][0] - before[t][0] for t in counted}
        if self.critical:
            idle = max(wall_ns - runs[me] - delays[me], 0.0)
            others = max((delays[t] for t in counted if t != me), default=0.0)
            # the span lasted at least as long as the creating thread ran in it: under heavy load the
            # delay and run counters (read at different instants) can add up to more than the span
            return float(max(min(delays[me] + min(idle, others), wall_ns - runs[me]), 0.0))
        delay = float(np.mean(list(delays.values())))
        return max(min(delay, wall_ns - max(runs.values())), 0.0)

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


@contextlib.contextmanager
def pinned_to(cpu: int | None) -> Iterator[bool]:
    """Pin the calling thread to CPU ``cpu`` (an index of ``os.sched_getaffinity``) for the
    block, restoring its affinity afterwards; yields whether it is pinned. A no-op yielding
    False for ``None``, where the OS cannot set affinities (not Linux) or where the thread
    may not run on ``cpu``."""
    setter = getattr(os, "sched_setaffinity", None)
    if cpu is None or setter is None:
        yield False
        return
    previous = os.sched_getaffinity(0)
    if cpu not in previous:
        yield False
        return
    setter(0, {cpu})
    try:
        yield True
    finally:
        setter(0, previous)


def time_interleaved(calls: Sequence[Callable[[], Any]], warmup: int = 3, rounds: int = 20,
                     synchronize: Callable[[], None] | None = None, caller_cpu: int | None = None) -> list[Timings]:
    """Time each of ``calls`` ``rounds`` times, round-robin (one call each per round, the
    starting call rotating every round), after ``warmup`` untimed calls each.

    ``synchronize`` (e.g. a CUDA synchronise) runs after every call, inside the timed span.
    ``caller_cpu``: the CPU the calling thread is pinned to while it times (:func:`pinned_to`),
    for runtimes whose worker threads are pinned to the other CPUs; a call's waiting is then
    what delayed the calling thread (``ThreadsClock(critical=True)``), else the threads' mean
    delay (see the module docstring). Returns one
    :class:`Timings` per call, in the order given. Raises ``ValueError`` for no calls,
    ``warmup`` < 0 or ``rounds`` < 1."""
    if not calls:
        raise ValueError("time_interleaved: nothing to time")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"time_interleaved: warmup must be a non-negative integer, got {warmup!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"time_interleaved: rounds must be a positive integer, got {rounds!r}")
    sync = synchronize or (lambda: None)
    with pinned_to(caller_cpu) as pinned:
        return _time_rounds(calls, warmup, rounds, sync, critical=pinned)


def _time_rounds(calls: Sequence[Callable[[], Any]], warmup: int, rounds: int, sync: Callable[[], None],
                 critical: bool) -> list[Timings]:
    for call in calls:
        for _ in range(warmup):
            call()
    sync()
    count = len(calls)
    wall = np.empty((count, rounds))
    waiting = np.empty((count, rounds))
    with ThreadsClock(critical) as clock:
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
