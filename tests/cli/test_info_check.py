"""`fastseq info` and `fastseq check` in subprocesses, including a deliberately broken
backend registered through the ``fastseq.backends`` entry-point group."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from fastseq_cli_helpers import REPO, run_cli

BROKEN_PLUGIN = '''
"""A test backend that returns wrong numbers: the reference plus 1e-3 on every output."""
from fastseq.reference import NumpyBackend


class BrokenBackend(NumpyBackend):
    name = "broken"

    def layer_forward(self, spec, params, inputs, initial_state, sequence_length=None,
                      reverse=False, state_mask=None, need_grad=False):
        outputs, state, workspace = super().layer_forward(
            spec, params, inputs, initial_state, sequence_length=sequence_length,
            reverse=reverse, state_mask=state_mask, need_grad=need_grad)
        return outputs + 1e-3, state, workspace
'''


@pytest.fixture(scope="module")
def broken_plugin(tmp_path_factory):
    """A directory holding an installed-looking distribution: the package plus its
    ``*.dist-info`` with ``entry_points.txt`` (group fastseq.backends)."""
    root = tmp_path_factory.mktemp("plugin")
    pkg = root / "fastseq_broken_plugin"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(BROKEN_PLUGIN)
    dist = root / "fastseq_broken_plugin-0.0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fastseq-broken-plugin\nVersion: 0.0.1\n")
    (dist / "entry_points.txt").write_text(
        "[fastseq.backends]\nbroken = fastseq_broken_plugin:BrokenBackend\n")
    return str(root)


def test_info_reports_backends_versions_cpu_and_cache():
    proc = run_cli(["info"])
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    import fastseq

    assert f"fastseq {fastseq.__version__}" in out
    for name, why in fastseq.list_backends().items():
        line = next(l for l in out.splitlines() if l.strip().startswith(name + " "))
        assert ("available" if why is None else "unavailable") in line
    import numpy

    assert numpy.__version__ in out
    assert "CPU:" in out and "vector extensions" in out and "kernel cache:" in out


def test_info_json_matches_registry_and_environment():
    proc = run_cli(["info", "--json"], env={"FASTSEQ_BACKEND": "numpy"})
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    import fastseq

    assert info["backends"] == fastseq.list_backends()
    assert info["FASTSEQ_BACKEND"] == "numpy" and info["selected_backend"] == "numpy"
    assert info["cpu"]["usable_cpus"] >= 1
    assert info["versions"]["numpy"] == __import__("numpy").__version__
    assert "location" in info["kernel_cache"] and "state" in info["kernel_cache"]


def test_info_does_not_import_heavy_modules():
    code = ("import sys; from fastseq.cli import _info_dict; _info_dict(); "
            "print(sorted(m for m in ('numba', 'tensorflow', 'torch', 'keras', 'matplotlib') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_check_reference_passes():
    proc = run_cli(["check", "--backends", "numpy", "--cells", "rnn,lstm_full"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "numpy: PASS" in proc.stdout
    body = [l for l in proc.stdout.splitlines() if l.startswith("numpy ")]
    # 2 drivers x 2 cells x 2 dtypes, lengths none+mixed folded into each line
    assert len(body) == 8 and all(l.rstrip().endswith("pass") for l in body)


def test_check_fails_on_a_broken_plugin_backend(broken_plugin):
    listed = run_cli(["info", "--json"], extra_pythonpath=broken_plugin)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["backends"].get("broken", "missing") is None

    proc = run_cli(["check", "--backends", "broken", "--cells", "gru", "--dtypes", "float64"],
                   extra_pythonpath=broken_plugin)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "broken: FAIL" in proc.stdout
    assert "FAILED for backend(s): broken" in proc.stderr
    fails = [l for l in proc.stdout.splitlines() if l.startswith("broken ") and l.rstrip().endswith("FAIL")]
    assert len(fails) == 2  # dynamic and bidirectional
    # the reported error is the injected offset (1e-3 relative to max(1, |ref|) <= 1e-3)
    errs = [float(l.split()[5]) for l in fails]
    assert all(1e-4 < e <= 1e-3 for e in errs)


def test_check_passes_reference_with_plugin_present(broken_plugin):
    # a broken plugin must not affect the other backends' verdicts
    proc = run_cli(["check", "--backends", "numpy,broken", "--cells", "rnn", "--dtypes", "float32"],
                   extra_pythonpath=broken_plugin)
    assert proc.returncode == 1
    assert "numpy: PASS" in proc.stdout and "broken: FAIL" in proc.stdout


def test_check_unknown_backend_is_a_usage_error():
    proc = run_cli(["check", "--backends", "no_such_backend"])
    assert proc.returncode == 2
    assert "no_such_backend" in proc.stderr and "numpy" in proc.stderr


def test_train_runs_a_tiny_recipe(tmp_path):
    out = tmp_path / "echo.json"
    proc = run_cli(["train", "echo", "--backend", "numpy", "--epochs", "1",
                    "--set", "total_series_length=750", "--json", str(out)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["recipe"] == "echo" and summary["backend"] == "numpy"
    # 750 values in 5 rows = 150 per row, windows of 15 steps -> 10 training steps
    assert summary["steps"] == 10
    assert json.loads(out.read_text())["steps"] == 10


def test_train_unknown_recipe_and_missing_module():
    proc = run_cli(["train", "no_such_recipe"])
    assert proc.returncode == 2 and "no_such_recipe" in proc.stderr
    code = ("import sys; sys.modules['fastseq.train.recipes'] = None; "
            "from fastseq.cli import main; sys.exit(main(['train', 'echo']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    assert out.returncode == 2
    assert "fastseq.train.recipes" in out.stderr
