"""Bar chart of a benchmark run's speed-ups (matplotlib imported only when called)."""

from __future__ import annotations

from typing import Dict, List, Tuple

__all__ = ["speedup_table", "plot_speedups"]


def _baseline(rows: List[dict]) -> dict:
    """Which implementation the chart divides by: PyTorch (padded) when present, else the
    slowest one."""
    by_impl = {r["impl"]: r for r in rows}
    for name in ("torch", "torch padded"):
        if name in by_impl:
            return by_impl[name]
    return max(rows, key=lambda r: r["median_s"])


def speedup_table(run: dict) -> List[Tuple[str, str, Dict[str, float]]]:
    """``[(group label, baseline impl, {impl: t_baseline / t_impl})]`` per (config, mode)."""
    groups: Dict[tuple, List[dict]] = {}
    for r in run["results"]:
        if r.get("median_s") and not r.get("error") and not r.get("skipped"):
            groups.setdefault((r["config"], r["mode"]), []).append(r)
    out = []
    for (cname, mode), rows in groups.items():
        base = _baseline(rows)
        out.append((f"{cname} {mode}", base["impl"],
                    {r["impl"]: base["median_s"] / r["median_s"] for r in rows}))
    return out


def plot_speedups(run: dict, path: str, title: str = None) -> str:
    """Grouped horizontal bars, log scale: speed relative to PyTorch (or the slowest
    implementation where PyTorch did not run), one group per (config, mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = speedup_table(run)
    if not table:
        raise ValueError("the run has no successful measurements to plot")
    impls: List[str] = []
    for _, _, sp in table:
        for name in sp:
            if name not in impls:
                impls.append(name)
    colors = plt.get_cmap("tab10")
    n_bars = sum(len(sp) for _, _, sp in table)
    fig_h = max(3.0, 0.28 * n_bars + 0.5 * len(table) + 1.2)
    fig, ax = plt.subplots(figsize=(9, fig_h))
    yticks, ylabels, seen = [], [], set()
    y = 0.0
    for label, base, sp in table:
        first = y
        for k, name in enumerate(impls):
            if name not in sp:
                continue
            ax.barh(y, sp[name], height=0.85, color=colors(k % 10),
                    label=None if name in seen else name)
            seen.add(name)
            ax.text(sp[name], y, f" {sp[name]:.2f}x", va="center", fontsize=7)
            y += 1.0
        yticks.append((first + y - 1.0) / 2)
        ylabels.append(f"{label}\n(vs {base})")
        y += 0.8  # gap between groups
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yticks(yticks)
    ax.set_yticklabels(ylabels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("speed relative to the baseline (higher is faster)")
    cpu = run.get("machine", {}).get("cpu", {})
    ax.set_title(title or f"fastseq bench: {cpu.get('model', '?')}, {cpu.get('usable_cpus', '?')} cores",
                 fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.legend(uniq.values(), uniq.keys(), fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
