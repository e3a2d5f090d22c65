"""Two threads on one time loop: the caller and one helper thread.

:func:`run_pair` calls a compiled worker ``fn(w, *args)`` as worker 0 in the calling
thread and as worker 1 in a persistent helper thread, and returns when both are done.
The workers release the GIL (``nogil``) and share the work through atomic counters
(:mod:`._atomic`): every task is claimed by compare-and-swap and a task only waits for
tasks that some running worker has already claimed, so worker 0 alone finishes the whole
loop when the helper is late, busy with another caller, or missing. That makes the
result independent of how the two threads are scheduled, and no schedule can deadlock.

The helper is one thread per process, used by one caller at a time (others run their
worker 0 alone: the caller's share of the cores, :mod:`fastseq.threads`, is what grants
the second thread in the first place). It is started on first use and again after
``fork``; it blocks on an event between jobs (no spinning between calls).
"""

import os
import threading

__all__ = ["run_pair", "PROJ_CHUNKS", "MAX_CHUNKS"]

#: Row chunks of the input projection in the two-thread loops (``lstm_forward_split``,
#: ``gru_forward_split``): each on one BLAS thread, claimed by whichever worker is free.
PROJ_CHUNKS = 4
#: Most chunks of columns per product and step (each a whole number of packed panels).
MAX_CHUNKS = 8


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

    def _loop(self):
        while True:
            self.go.wait()
            self.go.clear()
            fn, args = self.job
            try:
                fn(1, *args)
            except BaseException as exc:  # pragma: no cover - compiled workers do not raise
                self.error = exc
            finally:
                self.job = None
                self.done.set()

    def run_pair(self, fn, args):
        if not self.busy.acquire(blocking=False):
            fn(0, *args)  # the helper serves another caller: worker 0 does every task
            return 1
        try:
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._loop, name="fastseq-kernels-helper", daemon=True)
                self.thread.start()
            self.error = None
            self.job = (fn, args)
            self.done.clear()
            self.go.set()
            fn(0, *args)
            self.done.wait()
            if self.error is not None:  # pragma: no cover
                raise self.error
            return 2
        finally:
            self.busy.release()


_HELPER = _Helper()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_HELPER._reset)


def run_pair(fn, args):
    """Run ``fn(0, *args)`` here and ``fn(1, *args)`` on the helper thread; returns the
    number of threads offered (2, or 1 when the helper was busy)."""
    return _HELPER.run_pair(fn, tuple(args))
