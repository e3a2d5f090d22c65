"""``fastseq check``: every installed backend against the numpy reference, quickly.

Cases: cells ``rnn`` (BasicRNNCell), ``gru``, ``lstm_full`` (LSTMCell with peepholes,
cell_clip, num_proj, proj_clip, forget_bias) and ``multi`` (MultiRNNCell of a GRUCell and
a peephole LSTMCell); drivers ``dynamic`` and ``bidirectional``; float32 and float64;
sequence lengths ``none`` and ``mixed`` (includes 0 and T). Each case compares the outputs
and final states, and through :func:`fastseq.vjp` with random cotangents the gradients of
the inputs, the initial state and every weight. The error measure and tolerances are
:mod:`fastseq.testing`'s: ``max|a - b| / max(1, max|b|)`` against 1e-10 (float64) and
1e-5 (float32).
"""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

__all__ = ["CHECK_CELLS", "CHECK_DRIVERS", "CHECK_DTYPES", "CHECK_LENGTHS", "run_check",
           "format_check"]

CHECK_CELLS = ("rnn", "gru", "lstm_full", "multi")
CHECK_DRIVERS = ("dynamic", "bidirectional")
CHECK_DTYPES = ("float64", "float32")
CHECK_LENGTHS = ("none", "mixed")


def _errors(got, ref, got_g, ref_g):
    from fastseq.testing import flatten, rel_error

    def worst(a, b):
        la, lb = flatten(a), flatten(b)
        if len(la) != len(lb):
            return float("inf")
        return max((rel_error(x, y) for x, y in zip(la, lb)), default=0.0)

    fwd = worst(got, ref)
    gw, rw = got_g.weights, ref_g.weights
    names_ok = True
    for g, r in (zip(gw, rw) if isinstance(gw, tuple) else [(gw, rw)]):
        names_ok &= list(g) == list(r)
    grad = max(worst(got_g.inputs, ref_g.inputs), worst(got_g.initial_state, ref_g.initial_state),
               worst(gw, rw) if names_ok else float("inf"))
    return fwd, grad


def run_check(
    backends: Sequence[str],
    cells: Sequence[str] = CHECK_CELLS,
    drivers: Sequence[str] = CHECK_DRIVERS,
    dtypes: Sequence[str] = CHECK_DTYPES,
    lengths: Sequence[str] = CHECK_LENGTHS,
    progress: Optional[Callable[[str], None]] = None,
) -> List[Dict[str, object]]:
    """One row per (backend, driver, cell, dtype, lengths) with the worst forward and
    gradient errors, the tolerance and ``ok``. Exceptions are failures with a message."""
    import fastseq
    from fastseq.testing import RTOL, problem, run_driver

    rows = []
    refs = {}
    for backend in backends:
        t0 = time.perf_counter()
        for driver in drivers:
            for cell in cells:
                for dt in dtypes:
                    for ln in lengths:
                        row = {"backend": backend, "driver": driver, "cell": cell, "dtype": dt,
                               "lengths": ln, "rtol": RTOL[np.dtype(dt)]}
                        try:
                            key = (driver, cell, dt, ln)
                            if key not in refs:
                                weights, x, seq = problem(cell, dt, lengths=ln, seed=7)
                                with fastseq.use_backend("numpy"):
                                    ref, ref_g = run_driver(driver, cell, weights, x, seq, dt, seed=7)
                                refs[key] = (weights, x, seq, ref, ref_g)
                            weights, x, seq, ref, ref_g = refs[key]
                            with fastseq.use_backend(backend):
                                got, got_g = run_driver(driver, cell, weights, x, seq, dt, seed=7)
                            fwd, grd = _errors(got, ref, got_g, ref_g)
                            row.update(forward_error=fwd, grad_error=grd,
                                       ok=bool(fwd <= row["rtol"] and grd <= row["rtol"]), message=None)
                        except Exception as exc:
                            row.update(forward_error=None, grad_error=None, ok=False,
                                       message=f"{type(exc).__name__}: {exc}")
                        rows.append(row)
        if progress:
            bad = sum(1 for r in rows if r["backend"] == backend and not r["ok"])
            n = sum(1 for r in rows if r["backend"] == backend)
            progress(f"checked {backend}: {n - bad}/{n} cases pass ({time.perf_counter() - t0:.1f} s)")
    return rows


def _e(v):
    return "-" if v is None else ("inf" if v == float("inf") else f"{v:.1e}")


def format_check(rows: List[Dict[str, object]], verbose: bool = False) -> str:
    """Pass/fail table. One line per (backend, driver, cell, dtype), worst over the length
    patterns (every case with ``verbose``); failures always get their own line."""
    lines = [f"{'backend':<12}{'driver':<15}{'cell':<11}{'dtype':<9}{'lengths':<9}"
             f"{'fwd err':>9}{'grad err':>10}{'tol':>8}  result"]
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        key = (r["backend"], r["driver"], r["cell"], r["dtype"]) + ((r["lengths"],) if verbose else ())
        groups.setdefault(key, []).append(r)
    for key, rs in groups.items():
        fwd = [r["forward_error"] for r in rs if r["forward_error"] is not None]
        grd = [r["grad_error"] for r in rs if r["grad_error"] is not None]
        ok = all(r["ok"] for r in rs)
        ln = rs[0]["lengths"] if verbose else "+".join(r["lengths"] for r in rs)
        lines.append(f"{key[0]:<12}{key[1]:<15}{key[2]:<11}{key[3]:<9}{ln:<9}"
                     f"{_e(max(fwd) if fwd else None):>9}{_e(max(grd) if grd else None):>10}"
                     f"{rs[0]['rtol']:>8.0e}  {'pass' if ok else 'FAIL'}")
        for r in rs:
            if not r["ok"] and r["message"]:
                lines.append(f"    {r['lengths']}: {r['message']}")
    by_backend: Dict[str, List[dict]] = {}
    for r in rows:
        by_backend.setdefault(r["backend"], []).append(r)
    lines.append("")
    for b, rs in by_backend.items():
        bad = [r for r in rs if not r["ok"]]
        errs = [max(r["forward_error"], r["grad_error"]) for r in rs if r["forward_error"] is not None]
        worst = max(errs) if errs else None
        lines.append(f"{b}: {'PASS' if not bad else 'FAIL'} ({len(rs) - len(bad)}/{len(rs)} cases, "
                     f"worst relative error {_e(worst)})")
    return "\n".join(lines)
