"""The two-thread hand-off (fastseq_kernels._team, _atomic.team_begin/team_end): both
workers of every job run, in back-to-back calls (the spinning path) and after idle gaps
longer than the spins (the blocking fallback); a caller that finds the helper busy runs
worker 0 alone; several Python threads calling at once each get every job done; and an
idle helper stops spinning (its spin is bounded)."""

import threading
import time

import numpy as np
import pytest
from numba import njit

from fastseq_kernels._atomic import atomic_add, team_begin, team_end


@njit(nogil=True)
def _count(w, hand, seen, tasks, counter):
    """Claims ``tasks`` units one by one (like the kernels' workers) and records which
    worker ran and how many units each took."""
    team_begin(w, hand)
    seen[w] += 1
    while True:
        i = atomic_add(counter, 0, 1)
        if i >= tasks:
            break
        seen[2 + w] += 1
    return team_end(w, hand)


def _job(tasks=64):
    seen = np.zeros(4, np.int64)
    return seen, (seen, tasks, np.zeros(1, np.int64))


@pytest.mark.parametrize("gap_s", [0.0, 0.005])
def test_every_job_runs_both_workers_and_all_tasks(gap_s):
    from fastseq_kernels._team import HELPER_SPIN_US, run_pair

    assert gap_s == 0 or gap_s * 1e6 > 10 * HELPER_SPIN_US  # the second case blocks between calls
    for _ in range(40):
        seen, args = _job()
        assert run_pair(_count, args) == 2
        assert seen[0] == 1 and seen[1] == 1, seen  # worker 1 ran too, and finished before the return
        assert seen[2] + seen[3] == 64
        if gap_s:
            time.sleep(gap_s)


def test_helper_busy_runs_worker_zero_alone():
    from fastseq_kernels import _team

    assert _team._HELPER.busy.acquire(timeout=10)
    try:
        seen, args = _job()
        assert _team.run_pair(_count, args) == 1
    finally:
        _team._HELPER.busy.release()
    assert list(seen) == [1, 0, 64, 0]


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


def test_idle_helper_stops_spinning():
    """After a call, the helper spins HELPER_SPIN_US at most and then blocks: over a
    quarter of a second of idling the process uses little CPU time."""
    from fastseq_kernels._team import run_pair

    run_pair(_count, _job()[1])
    time.sleep(0.05)  # past the spin
    c0 = time.process_time()
    time.sleep(0.25)
    assert time.process_time() - c0 < 0.05
