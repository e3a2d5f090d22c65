"""Timing: warm-up calls excluded, then repetitions; median and spread."""

from __future__ import annotations

import gc
import time
from typing import Callable, Dict, List, Optional

import numpy as np

__all__ = ["measure", "measure_interleaved", "summarize"]


def summarize(times: List[float]) -> Dict[str, object]:
    """Median, min, max and spread of a list of durations in seconds.

    ``spread`` is the interquartile range divided by the median (0.05 = +-2.5 %); with
    2 or 3 samples it is (max - min) / median; with one sample it is None.
    """
    t = np.asarray(times, dtype=np.float64)
    if t.size == 0:
        raise ValueError("summarize needs at least one time")
    med = float(np.median(t))
    if t.size >= 4:
        q1, q3 = np.percentile(t, [25, 75])
        width = q3 - q1
    else:
        width = t.max() - t.min()
    return {
        "times_s": [float(x) for x in t],
        "n": int(t.size),
        "median_s": med,
        "min_s": float(t.min()),
        "max_s": float(t.max()),
        "spread": (float(width / med) if med > 0 else 0.0) if t.size > 1 else None,
    }


def measure(
    fn: Callable[[], object],
    repeat: int = 10,
    warmup: int = 1,
    budget_s: Optional[float] = None,
    min_repeat: int = 3,
) -> Dict[str, object]:
    """Call ``fn`` ``warmup`` times untimed, then up to ``repeat`` timed times in a row.

    With ``budget_s``, timed repetitions stop early once their total exceeds the budget,
    but never before ``min(min_repeat, repeat)`` of them. The garbage collector runs once
    before the timed calls and is off during them. Returns :func:`summarize`'s dict plus
    ``warmup_s`` (the duration of the first warm-up call, which includes
    compilation/tracing). One implementation's case of :func:`measure_interleaved`.
    """
    out = measure_interleaved({"fn": fn}, repeat=repeat, warmup=warmup, budget_s=budget_s,
                              min_repeat=min_repeat, settle_s=0.0)["fn"]
    if isinstance(out, BaseException):
        raise out
    out.pop("rounds", None)
    return out


def measure_interleaved(
    fns: Dict[str, Callable[[], object]],
    repeat: int = 10,
    warmup: int = 1,
    budget_s: Optional[float] = None,
    min_repeat: int = 3,
    settle_s: float = 0.1,
    settle_max_call_s: float = 1.0,
) -> Dict[str, object]:
    """Time several implementations of the same work in rounds: each round times every
    implementation once, in an order rotated from round to round.

    On a machine whose speed drifts (a shared VM, frequency changes, a neighbour's load)
    timing one implementation's series after another's lets the drift land on one side
    of a ratio; in rounds, every implementation sees the same conditions, so the ratio of
    medians compares like with like. ``warmup`` untimed calls of each come first.

    Before its timed call in a round, an implementation runs untimed for at least
    ``settle_s`` seconds (one call or more; none when its calls take longer than
    ``settle_max_call_s``, where a switch costs little in proportion): right after
    another implementation, a call pays for that one's leftovers, such as its worker
    threads still spin-waiting on the other core and its data in the caches (on the
    2-core reference machine a 0.7 ms fastseq call took 3.9 ms right after a PyTorch
    call). The timed call then measures the steady state, as a series would. An
    implementation leaves the rounds once it has ``repeat`` timed calls, or once its
    timed calls exceed ``budget_s`` (never before ``min(min_repeat, repeat)``). An
    implementation that raises is dropped; its entry is the exception.

    Returns ``{label: summarize(...) dict plus warmup_s}`` or ``{label: exception}``; the
    dicts also carry ``"rounds"``: the round index of each timed call (for paired ratios).
    """
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    out: Dict[str, object] = {}
    warm: Dict[str, Optional[float]] = {}
    live: List[str] = []
    for label, fn in fns.items():
        try:
            t_first = None
            for i in range(warmup):
                t0 = time.perf_counter()
                fn()
                if i == 0:
                    t_first = time.perf_counter() - t0
            warm[label] = t_first
            live.append(label)
        except Exception as exc:  # recorded; the other implementations go on
            out[label] = exc
    times: Dict[str, List[float]] = {label: [] for label in live}
    rounds: Dict[str, List[int]] = {label: [] for label in live}
    floor = min(min_repeat, repeat)
    # As timeit does: collect once, then keep the collector off for the whole series
    # (collecting before every call costs ~150 ms once TensorFlow and PyTorch are imported,
    # far more than many of the calls, and leaves the core cold).
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        k = 0
        while live:
            shift = k % len(live)
            for label in live[shift:] + live[:shift]:
                fn = fns[label]
                try:
                    last = times[label][-1] if times[label] else warm[label]
                    if settle_s > 0 and (last is None or last <= settle_max_call_s):
                        t_settle = time.perf_counter()
                        fn()
                        while time.perf_counter() - t_settle < settle_s:
                            fn()
                    t0 = time.perf_counter()
                    fn()
                    dt = time.perf_counter() - t0
                except Exception as exc:
                    out[label] = exc
                    continue
                times[label].append(dt)
                rounds[label].append(k)
            live = [
                label for label in live
                if label not in out
                and len(times[label]) < repeat
                and not (budget_s is not None and len(times[label]) >= floor and sum(times[label]) > budget_s)
            ]
            k += 1
    finally:
        if gc_was_enabled:
            gc.enable()
    for label in times:
        if label in out:
            continue
        stats = summarize(times[label])
        stats["warmup_s"] = float(warm[label]) if warm[label] is not None else None
        stats["rounds"] = rounds[label]
        out[label] = stats
    return out
