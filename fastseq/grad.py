"""Backend-neutral gradients: ``(result, pullback) = fastseq.vjp(fn, *args, **kwargs)``.

For the drivers, ``pullback(d_outputs, d_state)`` takes cotangents in the structure of the
result (None means zeros) and returns an object with ``inputs``, ``initial_state`` and
``weights`` (a dict keyed like ``cell.get_weights()``; a pair of dicts for the
bidirectional drivers). Dropout masks drawn in the forward pass are reused backwards.
Other modules register rules for their functions with :func:`defvjp`.
"""

from __future__ import annotations

from types import SimpleNamespace

__all__ = ["vjp", "defvjp", "Grads"]

Grads = SimpleNamespace
_RULES = {}


def defvjp(fn, rule):
    """Register ``rule(*args, **kwargs) -> (result, pullback)`` as the vjp of ``fn``."""
    if not callable(fn) or not callable(rule):
        raise TypeError("defvjp(fn, rule) takes two callables")
    _RULES[fn] = rule
    return fn


def vjp(fn, *args, **kwargs):
    """Run ``fn(*args, **kwargs)`` and return ``(result, pullback)``."""
    rule = _RULES.get(fn)
    if rule is None:
        known = ", ".join(sorted(getattr(f, "__qualname__", repr(f)) for f in _RULES))
        raise TypeError(f"fastseq.vjp: no gradient rule for {getattr(fn, '__qualname__', fn)!r}; supported: {known}")
    return rule(*args, **kwargs)


def _register_drivers():
    from .nn import rnn

    defvjp(rnn.dynamic_rnn, rnn._dynamic_rnn_vjp)
    defvjp(rnn.bidirectional_dynamic_rnn, rnn._bidirectional_vjp)
    defvjp(rnn.static_rnn, rnn._static_rnn_vjp)
    defvjp(rnn.static_bidirectional_rnn, rnn._static_bidirectional_vjp)


_register_drivers()
