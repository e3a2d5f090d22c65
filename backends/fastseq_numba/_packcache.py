"""Packed recurrent weights kept across calls while the weights cannot have changed.

The kernels multiply every step by the recurrent rows of a kernel packed into column
panels (``fastseq_kernels/_packed.py``). Packing reads and writes those rows once, about
what one step's product costs, so a model served call after call would repack the same
weights every call. This cache keeps the packed copy next to the weights and hands it to
the kernels instead.

When may a packed copy be reused? NumPy arrays carry no version counter, and checksumming
the weights would cost as much as packing them. The rule here: only **read-only arrays
that own their data** are cached (``not a.flags.writeable and a.flags.owndata``). Nothing
can write into such an array without first turning its ``writeable`` flag back on, which
the cache checks on every lookup. fastseq's cells store their NumPy weights this way
(``fastseq/nn/rnn_cell.py``: ``set_weights`` and the optimizers replace the arrays, they do
not write into them), so served models hit the cache and training steps, which replace
the weights every step, miss it (and pay exactly the per-call packing they paid before).
Writeable arrays (a user's own arrays passed to the backend) are packed per call as before.
A user who re-enables writing on a cell's array, writes into it and turns the flag off
again defeats the rule; that is documented on ``RNNCell.trainable_variables``.

Entries are keyed by ``id(array)`` plus the layout (offset, leading dimension, depth,
width, transposed; or a named layout of a kernel's own with its arguments, ``get_layout``,
e.g. the halves of ``fastseq_kernels.lstm.pack_halves``), hold a weak reference that must
still point at the same array, and go away when the array is garbage collected
(weak-reference callback), so memory follows the live weights; at most ``max_entries``
are kept (least recently used dropped first).
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict

import numpy as np

__all__ = ["PackCache"]


class PackCache:
    def __init__(self, pack, min_steps, max_entries=256):
        """``pack(steps, b, boff, ldb, k, n, transposed)`` packs (``pack_if_worth``);
        ``min_steps``: loops shorter than this are not packed at all (``PACK_MIN_STEPS``)."""
        self._pack = pack
        self._min_steps = int(min_steps)
        self.max_entries = int(max_entries)
        # re-entrant: a weak-reference callback may run (garbage collection) while this
        # thread holds the lock
        self._lock = threading.RLock()
        self._entries: "OrderedDict[tuple, tuple]" = OrderedDict()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def cacheable(a) -> bool:
        return isinstance(a, np.ndarray) and not a.flags.writeable and a.flags.owndata

    def __len__(self):
        return len(self._entries)

    def clear(self):
        with self._lock:
            self._entries.clear()

    def get(self, a, steps, boff, ldb, k, n, transposed):
        """The packed ``op(B)`` of ``a`` for :func:`fastseq_kernels._packed.given_or_pack`, or
        ``None`` when the kernel should pack (``a`` not cacheable, or a loop too short to pack)."""
        if steps < self._min_steps or k <= 0 or n <= 0 or not self.cacheable(a):
            return None
        key = (id(a), a.dtype.char, int(boff), int(ldb), int(k), int(n), bool(transposed))
        return self._lookup(a, key, lambda: self._pack(int(steps), a, int(boff), int(ldb), int(k), int(n),
                                                         bool(transposed)))

    def get_layout(self, a, layout, pack, *args):
        """``pack(a, *args)`` (another packed layout of ``a``, named ``layout``, e.g.
        ``fastseq_kernels.lstm.pack_halves``), kept under the same rule; ``None`` when ``a``
        is not cacheable (the kernel then packs it itself)."""
        if not self.cacheable(a):
            return None
        key = (id(a), a.dtype.char, layout) + tuple(int(v) for v in args)
        return self._lookup(a, key, lambda: pack(a, *args))

    def _lookup(self, a, key, make):
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0]() is a:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry[1]
            self.misses += 1
        packed = make()
        ref = weakref.ref(a, self._forget(key))
        with self._lock:
            self._entries[key] = (ref, packed)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return packed

    def _forget(self, key):
        cache_ref = weakref.ref(self)

        def callback(dead_ref):
            cache = cache_ref()
            if cache is None:
                return
            with cache._lock:
                entry = cache._entries.get(key)
                if entry is not None and entry[0] is dead_ref:
                    del cache._entries[key]

        return callback
