"""Load-robust timing: outlier rejection, run-queue waiting, interleaved rounds."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from spruce.targets.timing import (
    RunQueueClock,
    ThreadsClock,
    Timings,
    inlier_mask,
    pinned_to,
    robust_center,
    time_interleaved,
)


def test_robust_center_ignores_load_bursts_and_accounting_artifacts():
    """Synthetic timings of a 10 ms model: a fifth of the calls hit by a load burst (2-5x
    slower) and two calls whose waiting was over-booked (near 0): the robust figure stays
    within 1 % of 10 ms, where the mean is off by more than 30 %."""
    rng = np.random.default_rng(0)
    clean = rng.normal(10.0, 0.1, 80)
    bursts = 10.0 * rng.uniform(2, 5, 20)
    samples = np.concatenate([clean, bursts, [0.3, 0.0]])
    rng.shuffle(samples)
    assert robust_center(samples) == pytest.approx(10.0, rel=0.01)
    assert abs(samples.mean() / 10.0 - 1) > 0.3
    mask = inlier_mask(samples)
    assert not mask[samples > 15].any() and not mask[samples < 5].any()
    assert mask[(samples > 9.7) & (samples < 10.3)].all()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.001, 1000.0), min_size=1, max_size=60))
def test_robust_center_lies_within_the_samples_and_keeps_the_median(samples):
    values = np.asarray(samples)
    center = robust_center(values)
    assert values.min() - 1e-9 <= center <= values.max() + 1e-9
    mask = inlier_mask(values)
    assert mask.any()
    # the median itself (or both middle samples) is always an inlier
    median = np.median(values)
    assert mask[np.argmin(np.abs(values - median))]


def test_zero_spread_and_bad_series():
    assert robust_center([2.0, 2.0, 2.0, 9.0]) == 2.0  # MAD 0: only the median value counts
    with pytest.raises(ValueError, match="no timing samples"):
        robust_center([])
    with pytest.raises(ValueError, match="finite"):
        robust_center([1.0, float("nan")])
    with pytest.raises(ValueError, match="mads"):
        inlier_mask([1.0], mads=0)


def test_timings_exclude_waiting_and_never_go_negative():
    timing = Timings(wall_s=np.array([0.010, 0.030, 0.011, 0.012]), waiting_s=np.array([0.0, 0.020, 0.0, 0.5]))
    assert np.allclose(timing.active_s, [0.010, 0.010, 0.011, 0.0])
    assert timing.robust_ms() == pytest.approx(31 / 3, rel=1e-6)  # the 0 (over-booked waiting) is rejected
    assert timing.wall_median_ms() == pytest.approx(11.5)
    assert timing.waiting_share() == pytest.approx(0.52 / 0.063)


def test_run_queue_clock_reads_this_thread():
    with RunQueueClock() as clock:
        if not clock.available:
            pytest.skip("/proc/thread-self/schedstat is not available on this kernel")
        first = clock.waiting_ns()
        sum(range(200_000))
        assert clock.waiting_ns() >= first >= 0
    assert clock.waiting_ns() == 0 and not clock.available  # closed: falls back to 0


def test_threads_clock_averages_the_threads_that_ran():
    """The rule: the mean delay of the threads that ran for a tenth of the span, the creating
    thread always included; a thread that did not run (blocked, idle) or barely ran (finishing
    an earlier job) is left out; delays are clipped to the span, and the result leaves at least
    the longest run time of a counted thread."""
    with ThreadsClock() as clock:
        me = str(threading.get_native_id())
        before = {me: (100, 10), "worker": (500, 40), "idle": (7, 3), "brief": (0, 0), "gone": (1, 1)}
        after = {me: (100, 30), "worker": (900, 100), "idle": (7, 500), "brief": (50, 900), "new": (50, 50)}
        assert clock.waiting_ns(before, after, wall_ns=1000) == pytest.approx((20 + 60) / 2)
        after["worker"] = (600, 5040)  # a delay booked from before the span: clipped to the span
        assert clock.waiting_ns(before, after, wall_ns=1000) == pytest.approx((20 + 1000) / 2)
        after["worker"] = (1400, 5040)  # it ran 900 of the 1000 ns: at most 100 ns were waiting
        assert clock.waiting_ns(before, after, wall_ns=1000) == pytest.approx(100)
        assert clock.waiting_ns({}, {}, wall_ns=1000) == 0.0


def test_a_critical_threads_clock_subtracts_what_delayed_the_calling_thread():
    """Pinned threads (one per CPU): the calling thread's own queueing, plus the part of its
    idle time that the longest queueing of a worker that ran explains. A worker that queued
    while the caller did the work itself delayed nothing; a thread that did not run is left
    out; delays are clipped to the span."""
    with ThreadsClock(critical=True) as clock:
        me = str(threading.get_native_id())
        before = {me: (1000, 10), "worker": (500, 40), "idle": (7, 3)}
        # the caller ran 300 and queued 20 ns, and was blocked 680 ns waiting for the worker,
        # which queued 500 ns before it ran its 400: 20 + 500
        after = {me: (1300, 30), "worker": (900, 540), "idle": (7, 903)}
        assert clock.waiting_ns(before, after, wall_ns=1000) == pytest.approx(520)
        # the worker queued 500 ns and ran briefly; the caller took its work and ran 900 ns, so
        # only its idle 80 ns can have been spent waiting for the worker: 20 + 80
        after = {me: (1900, 30), "worker": (550, 540), "idle": (7, 903)}
        assert clock.waiting_ns(before, after, wall_ns=1000) == pytest.approx(100)
        # a thread that queued but never ran in the span (the idle one) is not what it waited for
        after = {me: (1300, 30), "worker": (500, 40), "idle": (7, 903)}
        assert clock.waiting_ns(before, after, wall_ns=1000) == pytest.approx(20)
        after = {me: (1000, 30), "worker": (600, 5040)}  # booked from before the span: clipped
        assert clock.waiting_ns(before, after, wall_ns=1000) == pytest.approx(1000)
        # under heavy load the counters, read at different instants, can book more run + queueing
        # than the span lasted; the caller ran 600 ns in it, so at most 400 were waiting (a
        # waiting of the whole span made a latency of 0 and a division by zero in spruce bench)
        after = {me: (1600, 710), "worker": (900, 1040)}
        assert clock.waiting_ns(before, after, wall_ns=1000) == pytest.approx(400)
        assert clock.waiting_ns({}, {}, wall_ns=1000) == 0.0


def test_the_calling_threads_run_time_comes_from_its_own_cpu_clock():
    """The kernel books a running thread's run time at scheduler ticks, so the calling thread's
    schedstat lags while it runs; the clock reads its CPU clock instead (within the work done)."""
    with ThreadsClock() as clock:
        if not clock.available:
            pytest.skip("/proc/self/task/*/schedstat is not available on this kernel")
        me = str(threading.get_native_id())
        start = time.thread_time_ns()
        before = clock.snapshot()[me][0]
        sum(range(20_000))  # well under a tick: a lagging counter would mostly read 0 here
        after = clock.snapshot()[me][0]
        spent = time.thread_time_ns() - start
        assert 0 < after - before <= spent


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="the OS cannot set thread affinities")
def test_pinned_to_pins_only_the_calling_thread_only_for_the_block():
    allowed = os.sched_getaffinity(0)
    cpu = max(allowed)
    seen, look, looked = {}, threading.Event(), threading.Event()

    def other():  # a thread that exists before the block (threads started inside inherit the pin)
        look.wait()
        seen["other"] = os.sched_getaffinity(0)
        looked.set()

    thread = threading.Thread(target=other)
    thread.start()
    with pinned_to(cpu) as pinned:
        assert pinned and os.sched_getaffinity(0) == {cpu}
        look.set()
        looked.wait()
    thread.join()
    assert os.sched_getaffinity(0) == allowed and seen["other"] == allowed
    with pytest.raises(RuntimeError), pinned_to(cpu):  # restored on an error too
        raise RuntimeError
    assert os.sched_getaffinity(0) == allowed
    for nothing in (None, max(allowed) + 1):  # no CPU, or one this process may not use: a no-op
        with pinned_to(nothing) as pinned:
            assert not pinned and os.sched_getaffinity(0) == allowed


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="the OS cannot set thread affinities")
def test_time_interleaved_pins_the_timing_thread_while_it_times():
    allowed = os.sched_getaffinity(0)
    cpu = min(allowed)
    during = []
    timings = time_interleaved([lambda: during.append(os.sched_getaffinity(0))], warmup=1, rounds=3,
                               caller_cpu=cpu)
    assert during == [{cpu}] * 4 and os.sched_getaffinity(0) == allowed
    assert timings[0].wall_s.shape == (3,) and (timings[0].active_s >= 0).all()


def test_threads_clock_sees_a_worker_thread():
    """A thread doing the work while the caller waits for it (a runtime's intra-op pool) is
    in the snapshots and counts as having run; before it works, it does not."""
    with ThreadsClock() as clock:
        if not clock.available:
            pytest.skip("/proc/self/task/*/schedstat is not available on this kernel")
        started, release, done, finish = (threading.Event() for _ in range(4))

        def work():
            started.set()
            release.wait()
            sum(range(2_000_000))
            done.set()
            finish.wait()

        worker = threading.Thread(target=work)
        worker.start()
        try:
            started.wait()
            tid = str(worker.native_id)
            time.sleep(0.05)  # let it reach release.wait() (it runs a little after started.set())
            idle_before = clock.snapshot()
            time.sleep(0.05)
            idle_after = clock.snapshot()
            assert idle_after[tid][0] == idle_before[tid][0]  # blocked: it did not run
            release.set()
            done.wait()
            busy_after = clock.snapshot()
            assert busy_after[tid][0] > idle_after[tid][0]  # it ran: its waiting would count
        finally:
            release.set()
            finish.set()
            worker.join()


def test_waiting_is_recorded_when_threads_compete_for_the_cpus():
    """More CPU-bound threads than CPUs: the timed thread must wait, and the clock sees it
    (the wall time then exceeds the active time)."""
    clock = RunQueueClock()
    if not clock.available:
        pytest.skip("/proc/thread-self/schedstat is not available on this kernel")
    clock.close()
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range((os.cpu_count() or 1) + 1)]
    try:
        time.sleep(0.5)  # let them start
        timings = time_interleaved([lambda: sum(range(300_000))], warmup=1, rounds=20)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert timings[0].waiting_s.sum() > 0
    assert (timings[0].active_s <= timings[0].wall_s).all()


def test_interleaving_rotates_and_counts_every_call():
    order: list[int] = []
    calls = [lambda k=k: order.append(k) for k in range(3)]
    synced = []
    timings = time_interleaved(calls, warmup=2, rounds=4, synchronize=lambda: synced.append(1))
    assert order[:6] == [0, 0, 1, 1, 2, 2]  # warm-up, each call in turn
    rounds = [order[6 + 3 * r: 9 + 3 * r] for r in range(4)]
    assert [r[0] for r in rounds] == [0, 1, 2, 0]  # the first call of a round rotates
    assert all(sorted(r) == [0, 1, 2] for r in rounds)
    assert len(synced) == 1 + 12
    assert len(timings) == 3 and all(t.wall_s.shape == (4,) for t in timings)
    assert all((t.waiting_s <= t.wall_s).all() and (t.waiting_s >= 0).all() for t in timings)


@pytest.mark.parametrize(("warmup", "rounds", "message"), [(-1, 3, "warmup"), (0, 0, "rounds"), (True, 2, "warmup")])
def test_bad_options(warmup, rounds, message):
    with pytest.raises(ValueError, match=message):
        time_interleaved([lambda: None], warmup=warmup, rounds=rounds)
    with pytest.raises(ValueError, match="nothing to time"):
        time_interleaved([])


def test_measure_models_times_real_sessions_and_keeps_the_models_mode():
    import torch
    from spruce.targets.onnxruntime import OnnxRuntimeCPU
    from torch import nn

    small = nn.Linear(16, 16).train()
    large = nn.Sequential(nn.Linear(16, 512), nn.ReLU(), nn.Linear(512, 16)).eval()
    x = torch.zeros(4, 16)
    timings = OnnxRuntimeCPU(threads=1).measure_models([(small, (x,)), (large, (x,))], warmup=1, rounds=3)
    assert len(timings) == 2 and all(t.wall_s.shape == (3,) and t.robust_ms() >= 0 for t in timings)
    assert small.training and not large.training  # timed in eval mode, given back in the caller's mode
    with pytest.raises(ValueError, match="no models"):
        OnnxRuntimeCPU(threads=1).measure_models([])
