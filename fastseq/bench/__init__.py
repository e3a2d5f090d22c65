"""Benchmark library behind ``fastseq bench`` and the scripts in ``benchmarks/``.

- :mod:`fastseq.bench.configs`  the configurations P1-P4 (defined once) and custom shapes
- :mod:`fastseq.bench.timing`   warm-up, repetitions, medians and spread
- :mod:`fastseq.bench.machine`  CPU, threads, BLAS, versions, git revision, GEMM rate
- :mod:`fastseq.bench.impls`    runners: fastseq on each backend, PyTorch, Keras
- :mod:`fastseq.bench.runner`   runs configurations x implementations, ratios, table, JSON
- :mod:`fastseq.bench.targets`  the numba issue's targets, evaluated on a run
- :mod:`fastseq.bench.plot`     bar chart of speed-ups (matplotlib imported lazily)
- :mod:`fastseq.bench.results_md` benchmarks/RESULTS.md from a JSON run

Nothing here imports torch, tensorflow, keras or matplotlib at import time.
"""
