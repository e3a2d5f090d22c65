"""Backend registry: plugins found through the ``fastseq.backends`` entry-point group.

Discovery is lazy (nothing is imported until a backend is listed or used), cached, and
forgiving: a plugin that fails to load is reported as unavailable with the reason, and
an unknown name lists what is installed. The ``numpy`` reference backend is always
present, even when the package metadata is missing (a source checkout on ``sys.path``).

Selection order: :func:`use_backend` (innermost ``with``) > :func:`set_backend` >
``FASTSEQ_BACKEND`` > the default (``numba`` when available, else ``numpy``).
"""

from __future__ import annotations

import contextlib
import os
import threading
from importlib import metadata
from typing import Dict, Optional

from .contract import Backend

__all__ = ["get_backend", "set_backend", "use_backend", "list_backends", "current", "load", "DEFAULT_ORDER"]

ENTRY_POINT_GROUP = "fastseq.backends"
#: Preferred default backends, first available wins.
DEFAULT_ORDER = ("numba", "numpy")

_lock = threading.RLock()
_entry_points: Optional[Dict[str, object]] = None  # name -> EntryPoint (or loader)
_instances: Dict[str, Backend] = {}
_load_errors: Dict[str, str] = {}
_initialized: set = set()
_selected: Optional[str] = None
_local = threading.local()


def _discover() -> Dict[str, object]:
    global _entry_points
    with _lock:
        if _entry_points is None:
            found: Dict[str, object] = {}
            try:
                eps = metadata.entry_points(group=ENTRY_POINT_GROUP)
            except Exception:  # pragma: no cover - broken metadata
                eps = []
            for ep in eps:
                found.setdefault(ep.name, ep)
            if "numpy" not in found:  # always available, installed or not
                found["numpy"] = _BuiltinNumpy()
            _entry_points = found
        return _entry_points


class _BuiltinNumpy:
    name = "numpy"

    def load(self):
        from .reference import NumpyBackend

        return NumpyBackend


def _instantiate(name: str) -> Optional[Backend]:
    """The backend object for ``name`` (not yet initialised), or None with a reason."""
    with _lock:
        if name in _instances:
            return _instances[name]
        if name in _load_errors:
            return None
        ep = _discover().get(name)
        if ep is None:
            return None
        try:
            obj = ep.load()
            backend = obj() if isinstance(obj, type) else obj
            if not isinstance(backend, Backend):
                raise TypeError(f"entry point {name!r} gave {type(backend).__name__}, not a fastseq.contract.Backend")
        except Exception as exc:  # a broken plugin must not break fastseq
            _load_errors[name] = f"plugin failed to load: {type(exc).__name__}: {exc}"
            return None
        _instances[name] = backend
        return backend


def _reason_unavailable(name: str) -> Optional[str]:
    backend = _instantiate(name)
    if backend is None:
        return _load_errors.get(name, "not installed")
    try:
        return backend.availability()
    except Exception as exc:
        return f"availability check failed: {type(exc).__name__}: {exc}"


def list_backends() -> Dict[str, Optional[str]]:
    """``{name: None}`` for each usable backend, ``{name: reason}`` for each installed one
    that cannot be used here (e.g. tensorflow not installed)."""
    return {name: _reason_unavailable(name) for name in sorted(_discover())}


def _describe_installed() -> str:
    parts = []
    for name, reason in list_backends().items():
        parts.append(f"{name} (available)" if reason is None else f"{name} (unavailable: {reason})")
    return "; ".join(parts)


def load(name: str) -> Backend:
    """The initialised backend object called ``name``; ValueError naming what is installed."""
    if not isinstance(name, str):
        raise TypeError(f"backend name must be a str, got {type(name).__name__}")
    key = name.strip().lower()
    if key in _initialized:  # fast path: every driver call comes here
        return _instances[key]
    if key not in _discover():
        raise ValueError(f"unknown fastseq backend {name!r}; installed backends: {_describe_installed()}")
    reason = _reason_unavailable(key)
    if reason is not None:
        raise ValueError(f"fastseq backend {key!r} is unavailable: {reason}. Installed backends: {_describe_installed()}")
    backend = _instances[key]
    with _lock:
        if key not in _initialized:
            backend.initialize()
            _initialized.add(key)
    return backend


_default_cache: Dict[str, str] = {}


def _default_name() -> str:
    env = os.environ.get("FASTSEQ_BACKEND", "").strip()
    if env:
        return env.lower()
    if "" not in _default_cache:
        _default_cache[""] = next(
            (n for n in DEFAULT_ORDER if n in _discover() and _reason_unavailable(n) is None), "numpy"
        )
    return _default_cache[""]


def get_backend() -> str:
    """Name of the active backend."""
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    if _selected is not None:
        return _selected
    return _default_name()


def current() -> Backend:
    """The active backend object (initialised)."""
    return load(get_backend())


def set_backend(name: str) -> None:
    """Select the backend for this process (validated at once)."""
    global _selected
    load(name)
    _selected = name.strip().lower()


@contextlib.contextmanager
def use_backend(name: str):
    """``with fastseq.use_backend("numpy"): ...`` selects a backend in this thread."""
    load(name)
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(name.strip().lower())
    try:
        yield load(name)
    finally:
        stack.pop()


def _reset_for_tests() -> None:
    """Forget discovered plugins (tests that register entry points at run time)."""
    global _entry_points, _selected
    with _lock:
        _entry_points = None
        _instances.clear()
        _load_errors.clear()
        _initialized.clear()
        _default_cache.clear()
        _selected = None
