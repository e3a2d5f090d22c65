"""The TF1 oracle as a session fixture: all parity cases run in ONE TensorFlow subprocess.

TensorFlow is never imported in the pytest process: the oracle script runs under
``sys.executable`` with ``TF_USE_LEGACY_KERAS=1`` (the TF1 cells live in tf_keras), reads the
case specs as JSON and writes its results as one ``.npz`` (no pickle).
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no lock (xdist workers may each run the oracle)
    fcntl = None

import numpy as np
import pytest

from ._cases import CASES
from ._helpers import tf1_missing_reason

ORACLE = Path(__file__).with_name("tf1_oracle.py")


def run_oracle(cases, workdir, timeout=900):
    """Run tf1_oracle.py once on ``cases``; return {case id: {quantity: array}}."""
    workdir = Path(workdir)
    spec_path, out_path = workdir / "cases.json", workdir / "results.npz"
    spec_path.write_text(json.dumps(cases))
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    env.pop("FASTSEQ_BACKEND", None)
    proc = subprocess.run(
        [sys.executable, str(ORACLE), str(spec_path), str(out_path)],
        env=env, capture_output=True, text=True, timeout=timeout,
    )
    if proc.returncode != 0 or not out_path.exists():
        raise RuntimeError(
            f"TF1 oracle failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return _read_results(out_path)


def _read_results(out_path):
    results = {}
    with np.load(out_path, allow_pickle=False) as z:
        for key in z.files:
            cid, _, rest = key.partition("/")
            results.setdefault(cid, {})[rest] = z[key]
    return results


def _load_or_run(cases, workdir):
    """Run the oracle in ``workdir`` unless a finished result for exactly these cases is there.

    Under pytest-xdist every worker has its own session; they share one directory and a lock,
    so TF runs once per test run rather than once per worker."""
    workdir.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(json.dumps(cases, sort_keys=True).encode() + ORACLE.read_bytes()).hexdigest()[:16]
    done = workdir / f"done-{key}"
    lock_path = workdir / "lock"
    with open(lock_path, "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if done.exists():
                return _read_results(workdir / "results.npz")
            results = run_oracle(cases, workdir)
            done.write_text("ok")
            return results
        finally:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def tf1_results(tmp_path_factory):
    """Results of every case in _cases.CASES, computed by TF1 once per test run."""
    reason = tf1_missing_reason()
    if reason:
        pytest.skip(reason)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        workdir = tmp_path_factory.getbasetemp().parent / "fastseq_tf1_oracle"
    else:
        workdir = tmp_path_factory.mktemp("tf1_oracle")
    return _load_or_run(CASES, workdir)


@pytest.fixture
def tf1_case(tf1_results):
    """Look up one case's results; a case that failed inside TF fails its test with TF's traceback."""

    def get(cid):
        res = tf1_results.get(cid)
        if res is None:
            pytest.fail(f"TF1 oracle returned nothing for case {cid!r}")
        if "error" in res:
            pytest.fail(f"TF1 oracle failed on case {cid!r}:\n{res['error']}")
        return res

    return get
