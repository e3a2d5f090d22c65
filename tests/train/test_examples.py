"""The examples and recipes, run on reduced sizes (full runs are marked slow)."""

import importlib.util
import os
import sys

import numpy as np
import pytest

import fastseq
from fastseq.datasets import load_japanese_vowels, load_ts
from fastseq.train import run_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _example(name):
    path = os.path.join(ROOT, "examples", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"fastseq_example_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def numpy_backend():
    with fastseq.use_backend("numpy"):
        yield


# ---------------------------------------------------------------- dataset
def test_japanese_vowels_loader_matches_the_raw_file():
    x, y = load_japanese_vowels("train")
    assert len(x) == 270 and np.bincount(y).tolist() == [30] * 9
    xt, yt = load_japanese_vowels("test")
    assert len(xt) == 370 and yt.min() == 0 and yt.max() == 8
    assert all(a.shape[1] == 12 and 7 <= a.shape[0] <= 29 for a in x + xt)
    # first utterance, parsed independently: channel c of the first data line is column c
    path = os.path.join(os.path.dirname(fastseq.datasets.__file__), "japanese_vowels", "JapaneseVowels_TRAIN.ts")
    with open(path) as fh:
        line = next(ln for ln in fh if ln[0].isdigit() or ln[0] == "-")
    channels = line.strip().split(":")
    np.testing.assert_allclose(x[0][:, 3], [float(v) for v in channels[3].split(",")], rtol=1e-6)
    assert y[0] == int(channels[-1]) - 1
    readme = os.path.join(os.path.dirname(path), "README.md")
    assert "CC BY 4.0" in open(readme).read()


def test_ts_parser_errors(tmp_path):
    bad = tmp_path / "bad.ts"
    bad.write_text("@dimensions 2\n@data\n1,2:3:a\n")
    with pytest.raises(ValueError, match="different lengths"):
        load_ts(bad)
    bad.write_text("@data\n1,x:3,4:a\n")
    with pytest.raises(ValueError, match="non-numeric"):
        load_ts(bad)
    bad.write_text("1,2:3,4:a\n")
    with pytest.raises(ValueError, match="@data"):
        load_ts(bad)
    with pytest.raises(ValueError, match="split"):
        load_japanese_vowels("valid")


# ---------------------------------------------------------------- examples, reduced
def test_japanese_vowels_example_small():
    res = _example("japanese_vowels").run(epochs=3, num_units=16, train_size=90, verbose=0)
    assert res["backend"] == "numpy"
    assert res["loss_history"][-1] < res["loss_history"][0]
    assert res["test_accuracy"] > 1 / 9 * 2  # well above chance after 3 short epochs


@pytest.mark.slow
def test_japanese_vowels_example_full_accuracy():
    res = _example("japanese_vowels").run(verbose=0)
    assert res["test_accuracy"] >= 0.96


def test_echo_example_learns_and_draws_the_figure(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "echo.png"
    res = _example("echo_rnn").run(epochs=2, plot=str(png), verbose=0, total_series_length=6000)
    assert res["accuracy"] >= 0.99
    assert res["loss_history"][-1] < res["loss_history"][0]
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_echo_state_is_carried_across_windows():
    """Without carrying the state the echo of the first echo_step steps of every window is
    unknowable; carrying it is what lets the recipe pass 99%."""
    res = run_recipe("echo", epochs=2, total_series_length=6000, verbose=0)
    assert res["accuracy"] >= 0.99
    assert res["steps"] == 2 * 6000 // 5 // 15
    cut = run_recipe("echo", epochs=2, total_series_length=6000, verbose=0, carry_state=False)
    # a zero state at every window: the first echo_step=3 of 15 steps are guesses (~50% right)
    assert cut["accuracy"] < 0.95


def test_masked_labelling_example_small():
    res = _example("masked_labelling").run(epochs=6, n_train=500, n_test=200, learning_rate=0.03, verbose=0,
                                           configs=("masked", "unmasked_no_length", "masked_no_length"))
    # the mask alone (no lengths) trains exactly like mask + lengths for a forward RNN
    np.testing.assert_allclose(res["masked_no_length"]["test_loss"], res["masked"]["test_loss"], rtol=1e-4)
    assert res["masked"]["test_accuracy"] > 0.95
    assert res["masked"]["test_accuracy"] > res["unmasked_no_length"]["test_accuracy"] + 0.2
    assert res["padding_fraction"] > 0.5


def test_bidirectional_tagging_example_small():
    res = _example("bidirectional_tagging").run(epochs=4, n_train=400, n_test=100, verbose=0)
    assert res["bidirectional"]["symbol_step_accuracy"] > 0.9
    assert res["unidirectional"]["symbol_step_accuracy"] < 0.4


def test_examples_run_as_scripts(tmp_path):
    import subprocess

    env = dict(os.environ, FASTSEQ_BACKEND="numpy", MPLBACKEND="Agg")
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "echo_rnn.py"), "--epochs", "1", "--plot", str(tmp_path / "e.png")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "backend numpy: accuracy" in out.stdout
    assert (tmp_path / "e.png").exists()


# ---------------------------------------------------------------- recipes
def test_run_recipe_japanese_vowels_small(tmp_path):
    res = run_recipe("japanese_vowels", epochs=2, num_units=8, train_size=60, test_size=50, verbose=0,
                     plot=str(tmp_path / "jv.png"))
    assert res["backend"] == "numpy" and res["test_size"] == 50 and res["train_size"] == 60
    assert 0.0 <= res["test_accuracy"] <= 1.0
    assert (tmp_path / "jv.png").exists()


def test_run_recipe_bad_arguments():
    with pytest.raises(ValueError, match="unknown recipe 'mnist'"):
        run_recipe("mnist")
    with pytest.raises(ValueError, match="epochs"):
        run_recipe("echo", epochs=-1)
    with pytest.raises(ValueError, match="total_series_length"):
        run_recipe("echo", total_series_length=7, epochs=1)
