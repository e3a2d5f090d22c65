"""fastseq's global random state: weight initialisers and dropout masks draw from it.

``fastseq.set_seed(s)`` makes a run reproducible (what ``tf.set_random_seed`` did). Masks
and initial weights are drawn on the host with NumPy, so every backend sees the same ones.
"""

from __future__ import annotations

import numpy as np

__all__ = ["set_seed", "generator", "new_generator"]

_rng = np.random.default_rng()


def set_seed(seed) -> None:
    """Reseed the global generator (an int, or None for fresh entropy)."""
    global _rng
    if seed is not None and not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    _rng = np.random.default_rng(seed)


def generator() -> np.random.Generator:
    """The global generator."""
    return _rng


def new_generator(seed=None) -> np.random.Generator:
    """A generator of its own for ``seed``, or one drawn from the global generator."""
    if seed is None:
        return np.random.default_rng(_rng.integers(0, 2**63 - 1))
    return np.random.default_rng(seed)
