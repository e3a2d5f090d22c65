"""The two-thread hand-off (fastseq_kernels._team, _atomic.team_begin/team_end): every
job's work is done when the call returns, in back-to-back calls (the spinning path) and
after idle gaps longer than the spins (the blocking fallback); a caller closes a job the
helper never joined, and a helper that joined is waited for; a caller that finds the
helper busy runs worker 0 alone; several Python threads calling at once each get every
job done; and an idle helper stops spinning (its spin is bounded)."""

import threading
import time

import numpy as np
import pytest
from numba import njit

from fastseq_kernels._atomic import atomic_add, team_begin, team_end


@njit(nogil=True)
def _count(w, hand, seen, tasks, counter):
    """Claims ``tasks`` units one by one (like the kernels' workers), each taking a moment,
    and records which worker ran and how many units each finished."""
    jb = team_begin(w, hand)
    if jb < 0:
        return team_end(w, hand, jb)
    seen[w] += 1
    while True:
        i = atomic_add(counter, 0, 1)
        if i >= tasks:
            break
        x = 0.0
        for j in range(300):  # about a microsecond of work per unit
            x += np.sqrt(j + i)
        seen[4 + w] += x > 0  # the work's result used, per worker (no shared writes)
        seen[2 + w] += 1
    return team_end(w, hand, jb)


def _job(tasks=64):
    seen = np.zeros(6, np.int64)
    return seen, (seen, tasks, np.zeros(1, np.int64))


@pytest.mark.parametrize("gap_s", [0.0, 0.005])
def test_every_job_done_when_the_call_returns(gap_s):
    """Every unit finished by the return, by whichever workers ran; back to back, the
    spinning helper takes part (in some of the calls at least: the test machine may be
    busy)."""
    from fastseq_kernels._team import HELPER_SPIN_US, run_pair

    assert gap_s == 0 or gap_s * 1e6 > 10 * HELPER_SPIN_US  # the second case blocks between calls
    joined = 0
    for _ in range(100 if gap_s else 300):
        seen, args = _job()
        assert run_pair(_count, args) == 2
        assert seen[0] == 1 and seen[1] in (0, 1), seen
        assert seen[2] + seen[3] == 64 and seen[4] + seen[5] == 64, seen  # nothing still running
        joined += seen[1]
        if gap_s:
            time.sleep(gap_s)
    if not gap_s:
        assert joined > 0


def test_caller_closes_a_job_the_helper_never_joined():
    """team_begin/team_end by hand, no helper thread: worker 0 does every unit and closes
    the job instead of waiting; a helper that comes later skips it and then waits (its
    budget) for a newer job; a helper that joined first is waited for."""
    from fastseq_kernels._atomic import HAND_FINISHED, HAND_HELPER_SPINS, HAND_JOB, HAND_JOINED, HAND_SIZE, \
        HAND_TAKEN

    hand = np.zeros(HAND_SIZE, np.int64)
    hand[HAND_HELPER_SPINS] = 100
    hand[HAND_JOB] = hand[HAND_TAKEN] = 1
    seen, args = _job()
    assert _count(0, hand, *args)  # over for the caller at once
    assert hand[HAND_JOINED] == -1 and list(seen[:4]) == [1, 0, 64, 0]
    assert not _count(1, hand, *args)  # the late helper: skips, no newer job within its spins
    assert seen[1] == 0 and hand[HAND_FINISHED] == 0
    hand[HAND_JOB] = hand[HAND_TAKEN] = 2
    seen, args = _job()
    assert not _count(1, hand, *args)  # the helper first: joins, does every unit, finishes job 2
    assert hand[HAND_JOINED] == 2 and hand[HAND_FINISHED] == 2 and list(seen[:4]) == [0, 1, 0, 64]
    assert _count(0, hand, *args)  # the caller sees job 2 finished
    assert list(seen[:4]) == [1, 1, 0, 64]


def test_helper_busy_runs_worker_zero_alone():
    from fastseq_kernels import _team

    assert _team._HELPER.busy.acquire(timeout=10)
    try:
        seen, args = _job()
        assert _team.run_pair(_count, args) == 1
    finally:
        _team._HELPER.busy.release()
    assert list(seen[:4]) == [1, 0, 64, 0]


def test_several_threads_at_once():
    from fastseq_kernels._team import run_pair

    results, errors = [], []

    def caller():
        try:
            for _ in range(200):
                seen, args = _job(16)
                run_pair(_count, args)
                results.append(seen.copy())
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=caller) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)
    assert len(results) == 600
    for seen in results:
        assert seen[0] == 1 and seen[1] in (0, 1) and seen[2] + seen[3] == 16


def _thread_cpu_seconds(native_id):
    """CPU time of one thread of this process (Linux: /proc), or None elsewhere."""
    import os

    try:
        with open(f"/proc/self/task/{native_id}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_idle_helper_stops_spinning():
    """After a call, the helper spins HELPER_SPIN_US at most and then blocks: over a
    quarter of a second of idling it uses little CPU time (the helper thread's own where
    the OS reports it, so that other threads of a busy test process do not count)."""
    from fastseq_kernels import _team

    _team.run_pair(_count, _job()[1])
    time.sleep(0.05)  # past the spin
    helper = _team._HELPER.thread
    t0 = _thread_cpu_seconds(helper.native_id)
    c0 = time.process_time()
    time.sleep(0.25)
    if t0 is not None:
        assert _thread_cpu_seconds(helper.native_id) - t0 < 0.05
    else:
        assert time.process_time() - c0 < 0.05


def test_no_buffers_held_after_the_call():
    """Once run_pair returns, neither the helper nor the hand-off keeps the job's arrays
    (a two-thread layer's buffers are tens of MB)."""
    import gc
    import weakref

    from fastseq_kernels._team import run_pair

    seen, args = _job()
    ref = weakref.ref(args[0])
    run_pair(_count, args)
    del seen, args
    time.sleep(0.01)  # the helper past its call
    gc.collect()
    assert ref() is None


def test_late_helper_never_joins_a_newer_job():
    """A helper that took job 1's arguments but reaches compiled code only after the caller
    closed job 1 and posted job 2 (or closed job 2 as well) skips: joining job 2 with job
    1's buffers would write into arrays the caller has already returned."""
    from fastseq_kernels._atomic import HAND_HELPER_SPINS, HAND_JOB, HAND_JOINED, HAND_SIZE, HAND_TAKEN

    for joined in (-1, -2, 2):
        hand = np.zeros(HAND_SIZE, np.int64)
        hand[HAND_HELPER_SPINS] = 100
        hand[HAND_JOB], hand[HAND_JOINED], hand[HAND_TAKEN] = 2, joined, 1
        seen, args = _job()
        assert not _count(1, hand, *args)  # skips job 1, no newer post within its spins
        assert hand[HAND_JOINED] == joined and list(seen[:4]) == [0, 0, 0, 0], (joined, seen)
    # the number it took is the one it joins, whatever HAND_JOB says by then
    hand = np.zeros(HAND_SIZE, np.int64)
    hand[HAND_HELPER_SPINS] = 100
    hand[HAND_JOB], hand[HAND_JOINED], hand[HAND_TAKEN] = 3, -2, 3
    seen, args = _job()
    assert not _count(1, hand, *args)
    assert hand[HAND_JOINED] == 3 and list(seen[:4]) == [0, 1, 0, 64]
