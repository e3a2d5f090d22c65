"""A dependency-free progress bar for one training epoch, written to stderr."""

from __future__ import annotations

import sys
import time

__all__ = ["ProgressBar"]


class ProgressBar:
    """``Epoch 3/20 [=========>.........] 5/9 - loss 0.4321 - acc 0.8750``.

    On a terminal the line is redrawn in place (``\\r``); elsewhere (logs, CI) only the
    final line of each epoch is written. ``enabled=False`` writes nothing.
    """

    def __init__(self, total, epoch, epochs, width=24, stream=None, enabled=True):
        self.total = max(int(total), 1)
        self.epoch, self.epochs = epoch, epochs
        self.width = width
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.perf_counter()
        self._last_draw = 0.0

    def _line(self, done, metrics):
        filled = int(self.width * done / self.total)
        arrow = ">" if filled < self.width else ""
        bar = "=" * filled + arrow + "." * (self.width - filled - len(arrow))
        parts = [f"Epoch {self.epoch}/{self.epochs} [{bar}] {done}/{self.total}"]
        parts += [f"{k} {v:.4f}" for k, v in metrics.items() if v is not None]
        parts.append(f"{time.perf_counter() - self.start:.1f}s")
        return " - ".join(parts)

    def update(self, done, **metrics):
        if not (self.enabled and self.interactive):
            return
        now = time.perf_counter()
        if now - self._last_draw < 0.1 and done < self.total:
            return
        self._last_draw = now
        self.stream.write("\r" + self._line(done, metrics))
        self.stream.flush()

    def close(self, **metrics):
        if not self.enabled:
            return
        prefix = "\r" if self.interactive else ""
        self.stream.write(prefix + self._line(self.total, metrics) + "\n")
        self.stream.flush()
