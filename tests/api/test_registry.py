"""Backend registry: selection, errors, laziness."""

import json
import os
import subprocess
import sys

import pytest

import fastseq


def _run(code, **env):
    full = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=120)


def test_import_is_light():
    code = "import time, sys; t = time.perf_counter(); import fastseq; dt = time.perf_counter() - t; import json; print(json.dumps({'numba': 'numba' in sys.modules, 'tf': 'tensorflow' in sys.modules, 'torch': 'torch' in sys.modules, 'mpl': 'matplotlib' in sys.modules}))"
    r = _run(code)
    assert r.returncode == 0, r.stderr
    mods = json.loads(r.stdout.strip().splitlines()[-1])
    assert mods == {"numba": False, "tf": False, "torch": False, "mpl": False}


def test_unknown_backend_lists_installed():
    with pytest.raises(ValueError, match=r"unknown fastseq backend 'nope'; installed backends: .*numpy \(available\)"):
        fastseq.set_backend("nope")
    with pytest.raises(TypeError):
        fastseq.set_backend(3)


def test_use_backend_context_and_get_backend():
    before = fastseq.get_backend()
    with fastseq.use_backend("numpy") as b:
        assert fastseq.get_backend() == "numpy" and b.name == "numpy"
    assert fastseq.get_backend() == before


def test_env_variable_selects_backend():
    r = _run("import fastseq; print(fastseq.get_backend())", FASTSEQ_BACKEND="numpy")
    assert r.stdout.strip() == "numpy"


def test_env_variable_unknown_backend_errors_clearly():
    r = _run("import fastseq, numpy as np; fastseq.nn.dynamic_rnn(fastseq.nn.rnn_cell.GRUCell(2), np.zeros((1,2,3)))", FASTSEQ_BACKEND="bogus")
    assert r.returncode != 0 and "unknown fastseq backend 'bogus'" in r.stderr


def test_list_backends_reports_reasons():
    listed = fastseq.list_backends()
    assert listed["numpy"] is None
    for name, reason in listed.items():
        assert reason is None or isinstance(reason, str) and reason


def test_default_backend_is_numba_when_available():
    listed = fastseq.list_backends()
    r = _run("import fastseq; print(fastseq.get_backend())", FASTSEQ_BACKEND="")
    expected = "numba" if listed.get("numba") is None else "numpy"
    assert r.stdout.strip() == expected
