"""Benchmarks of fastseq's data routines beside their peers, in one run.

    python benchmarks/data_bench.py             # full sizes (a few minutes)
    python benchmarks/data_bench.py --quick     # small sizes, a smoke test

1. pad_sequences: 100,000 float32 sequences, lengths uniform in [1, 200], 16 features;
   peers keras.utils.pad_sequences and torch.nn.utils.rnn.pad_sequence(batch_first=True)
   (torch tensors are made from the arrays before timing).
2. sequence_loss + gradient on [32, 200, 5000] float32 logits, weights from a length mask;
   peer: the same computation in TensorFlow under tf.GradientTape (eager and tf.function).
3. Reading and parsing 100,000 SequenceExamples (context length, int64 tokens and labels per
   step, lengths uniform in [1, 100]) from one TFRecord file; peer:
   tf.data.TFRecordDataset + tf.io.parse_single_sequence_example (serial map and
   num_parallel_calls=AUTOTUNE), iterated to the end.

Every measurement is repeated and the median kept (the machine is shared). Results go to
benchmarks/DATA_RESULTS.md and benchmarks/data_results.json. Missing peers are skipped with
a note.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def timeit(fn, repeat, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def machine():
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
            "platform": platform.platform()}
    try:
        info["loadavg_at_start"] = open("/proc/loadavg").read().split()[:3]
    except OSError:
        pass
    try:
        from fastseq_kernels import _tfrecord, _xent

        info["crc32c_sse42"] = _tfrecord.hardware_crc()
        info["xent_avx2"] = _xent.uses_avx2()
    except ImportError:
        pass
    return info


def _load():
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


def _import_tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        import tensorflow as tf
    except ImportError as exc:
        return None, f"tensorflow not installed ({exc})"
    return tf, None


# ---------------------------------------------------------------- 1. padding

def bench_pad(n, max_len, feat, repeat, results, notes):
    import fastseq

    rng = np.random.default_rng(0)
    lens = rng.integers(1, max_len + 1, n)
    seqs = [rng.standard_normal((int(L), feat), dtype=np.float32) for L in lens]
    ours = lambda: fastseq.pad_sequences(seqs)
    rows = {"fastseq.pad_sequences": timeit(ours, repeat)}
    ref, _ = ours()
    try:
        from keras.utils import pad_sequences as keras_pad

        out = keras_pad(seqs, dtype="float32", padding="post", truncating="post")
        assert np.array_equal(out, ref)
        del out
        rows["keras.utils.pad_sequences"] = timeit(
            lambda: keras_pad(seqs, dtype="float32", padding="post", truncating="post"), repeat, warmup=0)
    except ImportError as exc:
        notes.append(f"pad: keras skipped ({exc})")
    try:
        import torch
        from torch.nn.utils.rnn import pad_sequence

        tseqs = [torch.from_numpy(s) for s in seqs]
        out = pad_sequence(tseqs, batch_first=True).numpy()
        assert np.array_equal(out, ref)
        del out
        rows["torch pad_sequence"] = timeit(lambda: pad_sequence(tseqs, batch_first=True), repeat)
        rows["torch threads"] = (torch.get_num_threads(), [])
    except ImportError as exc:
        notes.append(f"pad: torch skipped ({exc})")
    results["pad_sequences"] = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                "loadavg": _load(), "config": f"{n} seqs, len U[1,{max_len}], {feat} float32 features", "rows": rows}


# ---------------------------------------------------------------- 2. sequence loss + grad

def bench_loss(B, T, C, repeat, results, notes):
    import fastseq

    rng = np.random.default_rng(1)
    logits = rng.standard_normal((B, T, C), dtype=np.float32)
    targets = rng.integers(0, C, (B, T))
    lens = rng.integers(1, T + 1, B)
    weights = fastseq.sequence_mask(lens, T, dtype=np.float32)

    def ours():
        loss, pullback = fastseq.vjp(fastseq.sequence_loss, logits, targets, weights)
        return loss, pullback(None).logits

    rows = {"fastseq sequence_loss+vjp": timeit(ours, repeat)}
    ours_loss, ours_grad = ours()
    tf, why = _import_tf()
    if tf is None:
        notes.append(f"loss: {why}")
    else:
        lg = tf.constant(logits)
        tg = tf.constant(targets)
        w = tf.constant(weights)

        def tf_loss_grad(lg, tg, w):
            with tf.GradientTape() as tape:
                tape.watch(lg)
                ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.reshape(tg, [-1]),
                                                                    logits=tf.reshape(lg, [-1, C]))
                ce *= tf.reshape(w, [-1])
                loss = tf.math.divide_no_nan(tf.reduce_sum(ce), tf.reduce_sum(w))
            return loss, tape.gradient(loss, lg)

        compiled = tf.function(tf_loss_grad)
        eager = lambda: [t.numpy() for t in tf_loss_grad(lg, tg, w)]
        graph = lambda: [t.numpy() for t in compiled(lg, tg, w)]
        l_tf, g_tf = graph()
        err = float(np.max(np.abs(g_tf - ours_grad)))
        notes.append(f"loss: |loss diff| = {abs(float(l_tf) - float(ours_loss)):.2e}, max |grad diff| = {err:.2e}")
        rows["TF GradientTape (eager)"] = timeit(eager, repeat)
        rows["TF GradientTape (tf.function)"] = timeit(graph, repeat)
        rows["TF intra-op threads"] = (tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count(), [])
    results["sequence_loss_grad"] = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                     "loadavg": _load(), "config": f"logits [{B}, {T}, {C}] float32, mask weights", "rows": rows}


# ---------------------------------------------------------------- 3. TFRecord + SequenceExample

def bench_read(n, max_len, repeat, results, notes, workdir):
    from fastseq import io

    rng = np.random.default_rng(2)
    path = os.path.join(workdir, "bench.tfrecord")
    t0 = time.perf_counter()
    lens = rng.integers(1, max_len + 1, n)
    io.write_sequence_examples(path, (({"length": int(L)}, {"tokens": rng.integers(0, 50000, L),
                                                            "labels": rng.integers(0, 20, L)}) for L in lens))
    write_s = time.perf_counter() - t0
    notes.append(f"read: wrote {n} examples ({os.path.getsize(path) / 1e6:.1f} MB) with fastseq in {write_s:.2f} s")
    ctx = {"length": io.FixedLenFeature([], "int64")}
    seq = {"tokens": io.FixedLenSequenceFeature([], "int64"), "labels": io.FixedLenSequenceFeature([], "int64")}

    def ours():
        k = 0
        for c, s in io.read_sequence_examples(path, ctx, seq):
            k += 1
        assert k == n

    rows = {"fastseq read_sequence_examples": timeit(ours, repeat)}
    tf, why = _import_tf()
    if tf is None:
        notes.append(f"read: {why}")
    else:
        tctx = {"length": tf.io.FixedLenFeature([], tf.int64)}
        tseq = {"tokens": tf.io.FixedLenSequenceFeature([], tf.int64),
                "labels": tf.io.FixedLenSequenceFeature([], tf.int64)}
        parse = lambda r: tf.io.parse_single_sequence_example(r, tctx, tseq)

        def tf_run(parallel):
            ds = tf.data.TFRecordDataset(path).map(parse, num_parallel_calls=tf.data.AUTOTUNE if parallel else None)
            k = 0
            for _ in ds:
                k += 1
            assert k == n

        # same values both ways on a few records
        first = next(iter(tf.data.TFRecordDataset(path).map(parse)))
        c0, s0 = next(iter(io.read_sequence_examples(path, ctx, seq)))
        assert np.array_equal(first[1]["tokens"].numpy(), s0["tokens"]) and int(first[0]["length"]) == int(c0["length"])
        rows["tf.data + parse_single_sequence_example"] = timeit(lambda: tf_run(False), repeat, warmup=0)
        rows["tf.data + parse (AUTOTUNE map)"] = timeit(lambda: tf_run(True), repeat, warmup=0)
    results["read_sequence_examples"] = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                         "loadavg": _load(), "config": f"{n} SequenceExamples, len U[1,{max_len}], 2 int64 lists",
                                         "rows": rows}


# ---------------------------------------------------------------- report

def report(results, notes, info, args):
    lines = ["## Data routines (fastseq.data, fastseq.io)", "",
             f"Machine: {info['cpu']}, {info['cores']} cores, Python {info['python']}, NumPy {info['numpy']}; "
             f"load average at start {' '.join(info.get('loadavg_at_start', ['?']))} (shared machine: medians of "
             f"{args.repeat} runs). CRC32C via SSE4.2: {info.get('crc32c_sse42')}, float32 xent via AVX2: "
             f"{info.get('xent_avx2')}. Command: `python benchmarks/data_bench.py{' --quick' if args.quick else ''}`.",
             ""]
    table = []
    for name, res in results.items():
        rows = res["rows"]
        ours_key = next(k for k in rows if k.startswith("fastseq"))
        ours = rows[ours_key][0]
        lines += [f"### {name}: {res['config']}", "",
                  f"Measured {res.get('when', '?')}, load average {res.get('loadavg', '?')}.", "", "| implementation | median s | runs (s) | peer / fastseq |",
                  "|---|---|---|---|"]
        for k, (med, runs) in rows.items():
            if not runs:  # informational row
                lines.append(f"| {k} | {med} | | |")
                continue
            ratio = med / ours
            lines.append(f"| {k} | {med:.4f} | {', '.join(f'{t:.3f}' for t in runs)} | "
                         f"{'1.00 (this)' if k == ours_key else f'{ratio:.2f}x'} |")
            table.append((name, k, med, ratio))
        lines.append("")
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["How to read these:", "", *[f"- {t}" for t in READING], ""]
    return "\n".join(lines), table


READING = [
    "pad_sequences writes a [100000, 200, 16] float32 array (1.28 GB): every implementation pays for the "
    "OS faulting in and zeroing that memory, so the ratios are bounded by memory traffic. fastseq validates "
    "through NumPy's C API, copies each sequence once without the GIL, and takes zero padding from np.zeros "
    "(padding-only pages are never touched); Keras fills the whole output then copies per sequence in Python; "
    "torch fills then copies per sequence in C++.",
    "sequence_loss: fastseq keeps each 5000-wide row in cache (max, exp-sum, then the scaled softmax), so the "
    "forward pass reads the logits once and the backward pass reads them once and writes the gradient once; "
    "rows are split over threads. TF materialises the softmax and the gradient in separate ops.",
    "read_sequence_examples: fastseq memory-maps the file, checks CRC32C with the SSE4.2 instruction and parses "
    "records in place (Cython), returning NumPy arrays; the peer iterates a tf.data pipeline in eager mode, "
    "whose per-element overhead dominates. A batched tf.io.parse_sequence_example pipeline would be faster "
    "than the per-example peer measured here (not measured).",
    "The machine is shared with other jobs (see the load averages): absolute times are inflated and noisy, "
    "ratios taken in the same run are the meaningful figures.",
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--only", choices=["pad", "loss", "read"], action="append")
    ap.add_argument("--out", default=HERE, help="folder for DATA_RESULTS.md and data_results.json")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other benchmarks' results from an earlier data_results.json in --out")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing; rewrite DATA_RESULTS.md from data_results.json in --out")
    args = ap.parse_args(argv)
    only = set(args.only or ["pad", "loss", "read"])
    if args.report_only:
        only, args.merge = set(), True
    info = machine()
    results, notes = {}, []
    with tempfile.TemporaryDirectory() as workdir:
        if "pad" in only:
            bench_pad(*((2000, 200, 16) if args.quick else (100_000, 200, 16)), args.repeat, results, notes)
        if "loss" in only:
            bench_loss(*((4, 20, 500) if args.quick else (32, 200, 5000)), args.repeat, results, notes)
        if "read" in only:
            bench_read(*((2000, 100) if args.quick else (100_000, 100)), args.repeat, results, notes, workdir)
    json_path = os.path.join(args.out, "data_results.json")
    if args.merge and os.path.exists(json_path):
        with open(json_path) as f:
            old = json.load(f)
        for k, v in old.get("results", {}).items():
            if k not in results:
                results[k] = dict(v, rows={r: (d["median_s"], d["runs_s"]) for r, d in v["rows"].items()})
                prefix = {"pad_sequences": "pad:", "sequence_loss_grad": "loss:", "read_sequence_examples": "read:"}[k]
                notes.extend(n for n in old.get("notes", []) if n.startswith(prefix))
    order = ["pad_sequences", "sequence_loss_grad", "read_sequence_examples"]
    results = {k: results[k] for k in order if k in results}
    text, table = report(results, notes, info, args)
    print(f"{'benchmark':<24} {'implementation':<44} {'median s':>10} {'vs fastseq':>10}")
    for name, k, med, ratio in table:
        print(f"{name:<24} {k:<44} {med:>10.4f} {ratio:>9.2f}x")
    for n in notes:
        print("note:", n)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "DATA_RESULTS.md"), "w") as f:
        f.write(text)
    with open(json_path, "w") as f:
        json.dump({"machine": info, "quick": args.quick, "repeat": args.repeat, "notes": notes,
                   "results": {k: {"config": v["config"], "when": v.get("when"), "loadavg": v.get("loadavg"),
                                   "rows": {r: {"median_s": m, "runs_s": t} for r, (m, t) in v["rows"].items()}}
                               for k, v in results.items()}}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
