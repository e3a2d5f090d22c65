"""Where the training layer draws its random numbers: fastseq's global RNG, so that
``fastseq.set_seed(n)`` makes weight init and batch order deterministic."""

from __future__ import annotations


def generator():
    """The global ``numpy.random.Generator`` that :func:`fastseq.set_seed` seeds."""
    from fastseq.random import generator as _g

    return _g()
