"""`fastseq bench` on tiny custom shapes in a subprocess; the JSON, the chart and
RESULTS.md generated from it; the configurations' arithmetic."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fastseq_cli_helpers import REPO, run_cli

TINY = ["--cell", "lstm", "--batch", "3", "--steps", "5", "--input", "4", "--units", "6",
        "--repeat", "2", "--no-gemm"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    path = str(out / "run.json")
    plot = str(out / "run.png")
    proc = run_cli(["bench", *TINY, "--bidirectional", "--lengths", "uniform:1:5", "--train",
                    "--backends", "numpy", "--peers", "none", "--json", path, "--plot", plot])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(path) as fh:
        return json.load(fh), proc, plot, path


def test_bench_json_content(tiny_run):
    run, proc, _, _ = tiny_run
    for key in ("schema", "created", "machine", "versions", "git", "configs", "settings", "results"):
        assert key in run
    assert run["machine"]["cpu"]["usable_cpus"] >= 1
    assert run["versions"]["numpy"] == np.__version__
    assert run["configs"]["custom"]["bidirectional"] is True
    impls = {(r["mode"], r["impl"]) for r in run["results"]}
    assert impls == {(m, i) for m in ("forward", "train") for i in ("fastseq-numpy", "fastseq-numpy padded")}
    for r in run["results"]:
        assert r["error"] is None
        assert r["n"] == len(r["times_s"]) >= 1
        assert all(t > 0 for t in r["times_s"])
        assert r["min_s"] <= r["median_s"] <= r["max_s"]
        assert r["gflops"] > 0
    for mode in ("forward", "train"):
        rows = [r for r in run["results"] if r["mode"] == mode]
        fastest = min(r["median_s"] for r in rows)
        for r in rows:
            assert r["ratio_to_fastest"] == pytest.approx(r["median_s"] / fastest)
    # progress went to stderr, the table to stdout
    assert "[1/4]" in proc.stderr
    assert "fastseq-numpy padded" in proc.stdout


def test_bench_plot_written(tiny_run):
    pytest.importorskip("matplotlib")
    _, _, plot, _ = tiny_run
    with open(plot, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_make_results_from_json(tiny_run, tmp_path):
    run, _, _, path = tiny_run
    notes = tmp_path / "NOTES.md"
    notes.write_text("# What limits each gap\n\nhand-written marker 7f3a\n")
    out = tmp_path / "RESULTS.md"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "make_results.py"), path,
                           "--notes", str(notes), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert run["machine"]["cpu"]["model"] in text
    assert "hand-written marker 7f3a" in text
    assert "fastseq-numpy padded" in text
    assert "not measured in this run" in text  # the P1-P4 targets are absent from a custom run


def test_bench_with_peer_and_two_backends(tmp_path):
    import fastseq

    backends = [b for b, why in fastseq.list_backends().items() if why is None and b in ("numpy", "numba")]
    path = str(tmp_path / "r.json")
    args = ["bench", *TINY, "--cell", "gru", "--layers", "2", "--backends", ",".join(backends),
            "--json", path]
    peers = []
    import importlib.util

    if importlib.util.find_spec("torch") is not None:
        peers.append("torch")
    args += ["--peers", ",".join(peers) or "none"]
    proc = run_cli(args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = json.load(open(path))
    got = {r["impl"] for r in run["results"]}
    assert got == {f"fastseq-{b}" for b in backends} | set(peers)
    assert all(r["mode"] == "forward" for r in run["results"])  # no --train
    if "numba" in backends:
        for r in run["results"]:
            assert r["numba_speedup"] == pytest.approx(
                r["median_s"] / next(x["median_s"] for x in run["results"] if x["impl"] == "fastseq-numba"))


@pytest.mark.parametrize("bad", [["--lengths", "uniform:3:99"], ["--configs", "P9"],
                                 ["--peers", "jax"], ["--repeat", "0"]])
def test_bench_bad_arguments(bad):
    proc = run_cli(["bench", *TINY, "--backends", "numpy", "--peers", "none", *bad])
    assert proc.returncode == 2
    assert "error" in proc.stderr


def test_config_flops_and_lengths():
    from fastseq.bench.configs import CONFIGS, get_configs

    p3 = CONFIGS["P3"]
    # LSTM: [x, h] @ W with W [I+H, 4H]: 2 (I+H) 4H FLOPs per row and step
    assert p3.flops("forward") == 2 * (512 + 512) * 4 * 512 * 64 * 50
    assert p3.flops("train") == 3 * p3.flops("forward")
    p2 = CONFIGS["P2"]
    per_step = 2 * (28 + 200) * 3 * 200 + 2 * 2 * (200 + 200) * 3 * 200
    assert p2.flops("forward") == per_step * 32 * 28
    p4 = CONFIGS["P4"]
    lens = p4.sequence_lengths()
    assert lens.shape == (64,) and lens.min() >= 10 and lens.max() <= 400
    assert p4.flops("forward") == 2 * 2 * (64 + 256) * 4 * 256 * lens.sum()
    x = p4.inputs()
    assert x.shape == (64, 400, 64)
    assert np.all(x[np.arange(400)[None, :] >= lens[:, None]] == 0)
    q4 = get_configs(["p4"], quick=True)[0]
    assert q4.steps == 100 and q4.sequence_lengths().max() <= 100
    assert get_configs(["P1"], quick=True)[0] == CONFIGS["P1"]


def test_measure_excludes_warmup_and_respects_budget():
    import time

    from fastseq.bench.timing import measure

    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.03 if len(calls) == 1 else 0.005)  # a slow first (compiling) call

    r = measure(fn, repeat=5, warmup=1)
    assert len(calls) == 6 and r["n"] == 5
    assert r["warmup_s"] >= 0.03 and r["max_s"] < 0.03
    calls.clear()
    r = measure(lambda: time.sleep(0.02), repeat=50, warmup=0, budget_s=0.05, min_repeat=1)
    assert 1 <= r["n"] <= 4  # stopped by the budget, not by repeat


def test_measure_interleaved_rounds_rotation_budget_and_errors():
    import time

    from fastseq.bench.timing import measure_interleaved

    log = []

    def make(label, sleep):
        def fn():
            log.append(label)
            time.sleep(sleep)
        return fn

    def broken():
        log.append("bad")
        if log.count("bad") > 2:  # fails on its second timed call
            raise RuntimeError("boom")

    fns = {"a": make("a", 0.001), "b": make("b", 0.004), "slow": make("slow", 0.03), "bad": broken}
    out = measure_interleaved(fns, repeat=6, warmup=1, budget_s=0.07, min_repeat=2, settle_s=0)
    assert out["a"]["n"] == 6 and out["b"]["n"] == 6
    assert 2 <= out["slow"]["n"] <= 3  # left the rounds once over its budget
    assert isinstance(out["bad"], RuntimeError)
    assert out["a"]["median_s"] < out["b"]["median_s"] < out["slow"]["median_s"]
    assert out["a"]["rounds"] == list(range(6))
    # warm-up calls first, one per implementation, then rounds with a rotated order
    assert log[:4] == ["a", "b", "slow", "bad"]
    rounds = log[4:]
    assert rounds[:4] == ["a", "b", "slow", "bad"]
    assert rounds[4:8] == ["b", "slow", "bad", "a"]  # round 1 starts one further on; "bad" fails here
    assert rounds[8:11] == ["slow", "a", "b"]  # round 2 without it, rotated by two
    with pytest.raises(ValueError, match="repeat"):
        measure_interleaved(fns, repeat=0)


def test_measure_interleaved_settles_before_each_timed_call():
    import time

    from fastseq.bench.timing import measure_interleaved

    calls = {"fast": 0, "slow": 0}

    def fast():
        calls["fast"] += 1
        time.sleep(0.002)

    def slow():
        calls["slow"] += 1
        time.sleep(0.02)

    out = measure_interleaved({"fast": fast, "slow": slow}, repeat=3, warmup=1, settle_s=0.01,
                              settle_max_call_s=0.015)
    assert out["fast"]["n"] == 3 and out["slow"]["n"] == 3
    # fast: 1 warm-up + per round >= 0.01 s of untimed calls (>= 2 of 2 ms, sleep may overshoot) + 1 timed
    assert calls["fast"] >= 1 + 3 * (2 + 1)
    # slow: its calls take longer than settle_max_call_s, so no untimed calls between rounds
    assert calls["slow"] == 1 + 3


def test_paired_ratio_matches_rounds():
    from fastseq.bench.runner import paired_ratio

    ref = {"times_s": [1.0, 2.0, 4.0, 1.0], "rounds": [0, 1, 2, 3]}
    # rounds 0-2 only; per-round ratios 3, 2, 2.5 -> median 2.5 (the ratio of medians would be 3.0 / 1.5 = 2)
    rec = {"times_s": [3.0, 4.0, 10.0], "rounds": [0, 1, 2]}
    assert paired_ratio(rec, ref) == pytest.approx(2.5)
    assert paired_ratio({"times_s": [1.0], "rounds": []}, ref) is None
    assert paired_ratio({"times_s": [2.0, 6.0], "rounds": [1, 3]}, ref) == pytest.approx(3.5)


def _fake_run(times, gemm=100.0, gflops=None):
    results = []
    for (cfg, mode, impl), t in times.items():
        r = {"config": cfg, "mode": mode, "impl": impl, "median_s": t, "error": None,
             "gflops": (gflops or {}).get((cfg, mode, impl))}
        results.append(r)
    return {"machine": {"gemm_float32": {"gflops": gemm}}, "results": results, "settings": {}}


def test_targets_are_ratios_of_the_same_run():
    from fastseq.bench.runner import add_ratios
    from fastseq.bench.targets import evaluate

    run = _fake_run({
        ("P1", "forward", "fastseq-numba"): 1.0, ("P1", "forward", "torch"): 2.5,
        ("P1", "forward", "keras"): 9.0,
        ("P3", "forward", "fastseq-numba"): 1.0, ("P3", "train", "fastseq-numba"): 3.0,
        ("P3", "train", "torch"): 3.0,
    }, gemm=100.0, gflops={("P3", "forward", "fastseq-numba"): 75.0})
    add_ratios(run["results"])
    by = {t["target"]: t for t in evaluate(run)}
    assert by["P1 forward >= 2x faster than PyTorch"]["measured"] == pytest.approx(2.5)
    assert by["P1 forward >= 2x faster than PyTorch"]["met"] is True
    assert by["P1 forward >= 10x faster than Keras"]["met"] is False
    assert by["P3 training faster than PyTorch"]["met"] is False  # equal is not faster
    assert by["P3 forward at >= 70% of the float32 GEMM rate"]["measured"] == pytest.approx(0.75)
    assert by["P3 forward no slower than PyTorch"]["met"] is None  # torch forward missing
    rows = {r["impl"]: r for r in run["results"] if r["config"] == "P1"}
    assert rows["keras"]["ratio_to_fastest"] == pytest.approx(9.0)
    assert rows["torch"]["numba_speedup"] == pytest.approx(2.5)


def test_tensorflow_targets_compare_with_keras():
    from fastseq.bench.targets import TF_TARGETS, evaluate

    run = _fake_run({
        ("P1", "forward", "fastseq-tensorflow"): 1.0, ("P1", "forward", "keras"): 1.5,
        ("P2", "train", "fastseq-tensorflow"): 2.0, ("P2", "train", "keras"): 1.9,
        ("P4", "forward", "fastseq-tensorflow"): 3.0, ("P4", "forward", "keras mask"): 3.0,
        ("P4", "forward", "keras"): 1.0,  # not the peer for P4: Keras gets the mask there
    })
    by = {(t["config"], t["mode"]): t for t in evaluate(run, TF_TARGETS)}
    assert len(by) == 7  # P1 forward, P2-P4 forward and training
    assert by[("P1", "forward")]["measured"] == pytest.approx(1.5) and by[("P1", "forward")]["met"] is True
    assert by[("P2", "train")]["met"] is False
    assert by[("P4", "forward")]["measured"] == pytest.approx(1.0) and by[("P4", "forward")]["met"] is True
    assert by[("P3", "train")]["met"] is None


def test_speedup_table_uses_torch_as_baseline():
    from fastseq.bench.plot import speedup_table

    run = _fake_run({("P2", "train", "fastseq-numba"): 0.5, ("P2", "train", "torch"): 2.0,
                     ("P2", "train", "keras"): 4.0})
    [(label, base, sp)] = speedup_table(run)
    assert label == "P2 train" and base == "torch"
    assert sp == {"fastseq-numba": 4.0, "torch": 1.0, "keras": 0.5}
