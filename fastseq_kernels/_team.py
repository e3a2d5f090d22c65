"""Two threads on one time loop: the caller and one helper thread.

:func:`run_pair` calls a compiled worker ``fn(w, hand, *args)`` as worker 0 in the calling
thread and as worker 1 in a persistent helper thread, and returns when both are done.
The workers release the GIL (``nogil``) and share the work through atomic counters
(:mod:`._atomic`): every task is claimed by compare-and-swap and a task only waits for
tasks that some running worker has already claimed, so worker 0 alone finishes the whole
loop when the helper is late, busy with another caller, or missing. That makes the
result independent of how the two threads are scheduled, and no schedule can deadlock.

The helper is one thread per process, used by one caller at a time (others run their
worker 0 alone: the caller's share of the cores, :mod:`fastseq.threads`, is what grants
the second thread in the first place). It is started on first use and again after
``fork``.

Hand-off. Waking a thread blocked on a lock or event takes ~50 us on the 2-vCPU VMs
measured (a bare Python ``threading.Event`` ping-pong: 52 us per round trip), as long as
a small layer's whole time loop, and the GIL is such a lock too: a thread that finds it
held sleeps until it is released. So the two sides meet in compiled code, through the
``hand`` array every worker takes after ``w`` (:func:`._atomic.team_begin`,
:func:`._atomic.team_end`): worker 0 posts the job number once it runs (the GIL is then
free for the helper to take); at the end it closes the job if the helper has not joined
it by then (worker 0 has done all the work: a helper kept off its CPU, e.g. by an
OpenBLAS thread spinning there, must not hold the caller up), else spins until the
helper has finished. The helper, after its part, marks the job finished and spins for
:data:`HELPER_SPIN_US` until the next one is posted, so a layer's next call finds it
awake. Only when a spin runs out does a side block on its event (the fallback, and the
helper's state between bursts of calls); a late helper costs time, never correctness.
"""

import os
import threading

import numpy as np

from ._atomic import HAND_CALLER_SPINS, HAND_FINISHED, HAND_HELPER_SPINS, HAND_JOB, HAND_READY, HAND_SIZE, \
    HAND_TAKEN, \
    spin_until

__all__ = ["run_pair", "PROJ_CHUNKS", "MAX_CHUNKS"]

#: Row chunks of the input projection in the two-thread loops (``lstm_forward_split``,
#: ``gru_forward_split``): each on one BLAS thread, claimed by whichever worker is free.
PROJ_CHUNKS = 4
#: Most chunks of columns per product and step (each a whole number of packed panels).
MAX_CHUNKS = 8


#: How long the helper spins after a job for the next one before it blocks, and the most
#: the caller spins while the helper finishes its last piece, in microseconds; turned into
#: spin rounds by :func:`_rounds_per_us` (~30 ns a round on the Zen 4 VM).
HELPER_SPIN_US = 300
CALLER_SPIN_US = 2000

#: The hand-off array of a caller that runs worker 0 alone (job 0: no posting, no waits).
_SOLO = np.zeros(HAND_SIZE, np.int64)


def _rounds_per_us():
    """Rounds of :func:`._atomic.spin_until` per microsecond on this CPU, timed once over
    ~0.5 ms of rounds (its ``pause`` rounds and the later ones that also yield, as the
    long spins run them)."""
    import time

    probe = np.zeros(1, np.int64)
    spin_until(probe, 0, 1, 10)  # compiled or loaded from the cache before the clock starts
    n = 20000
    t = time.perf_counter()
    spin_until(probe, 0, 1, n)
    dt = time.perf_counter() - t
    return max(1.0, n / max(dt * 1e6, 1e-3))


class _Helper:
    def __init__(self):
        self._reset()

    def _reset(self):
        self.busy = threading.Lock()  # held by the caller that owns the helper
        self.go = threading.Event()
        self.done = threading.Event()
        self.job = None
        self.error = None
        self.thread = None
        self.hand = np.zeros(HAND_SIZE, np.int64)

    def _loop(self):
        hand = self.hand
        seen = int(hand[HAND_READY])
        posted = False
        while True:
            if not posted:
                while hand[HAND_READY] <= seen:
                    self.go.wait()
                    self.go.clear()
            # the latest job; the caller sets HAND_JOB before the job, so a job read after
            # it is that one or a newer one (whose worker joins by the newer number), and
            # clears the job once it is over (a job it closed without the helper: none)
            seen = int(hand[HAND_JOB])
            job = self.job
            if job is None:
                posted = False
                continue
            num, fn, args = job
            job = None
            # the job these arguments belong to: the worker joins that one or none (the
            # caller may have closed it and posted a newer one since it was read)
            hand[HAND_TAKEN] = num
            try:
                posted = bool(fn(1, hand, *args))
            except BaseException as exc:  # pragma: no cover - compiled workers do not raise
                self.error = exc
                posted = False
                hand[HAND_FINISHED] = seen
            fn = args = None  # hold no buffers of a finished job
            self.done.set()

    def run_pair(self, fn, args):
        if not self.busy.acquire(blocking=False):
            fn(0, _SOLO, *args)  # the helper serves another caller: worker 0 does every task
            return 1
        try:
            hand = self.hand
            if self.thread is None or not self.thread.is_alive():
                if not hand[HAND_CALLER_SPINS]:
                    r = _rounds_per_us()
                    hand[HAND_HELPER_SPINS] = int(HELPER_SPIN_US * r)
                    hand[HAND_CALLER_SPINS] = int(CALLER_SPIN_US * r)
                self.thread = threading.Thread(target=self._loop, name="fastseq-kernels-helper", daemon=True)
                self.thread.start()
            job = int(hand[HAND_JOB]) + 1
            self.error = None
            hand[HAND_JOB] = job
            self.job = (job, fn, args)
            hand[HAND_READY] = job  # for a helper blocked on ``go``; a spinning one waits for the post
            self.go.set()
            if not fn(0, hand, *args):
                while hand[HAND_FINISHED] < job:
                    self.done.wait()
                    self.done.clear()
            self.job = None  # over: the helper skips it if it comes now, and holds no buffers
            if self.error is not None:  # pragma: no cover
                raise self.error
            return 2
        finally:
            self.busy.release()


_HELPER = _Helper()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_HELPER._reset)


def run_pair(fn, args):
    """Run ``fn(0, hand, *args)`` here and ``fn(1, hand, *args)`` on the helper thread
    (``fn`` a worker that starts with ``jb = team_begin(w, hand)``, returns
    ``team_end(w, hand, jb)`` at once when ``jb < 0`` and after its work otherwise, see
    :mod:`._atomic`); returns the number of threads offered (2, or 1 when the helper was
    busy). The helper may skip a job that worker 0 finished alone."""
    return _HELPER.run_pair(fn, tuple(args))
