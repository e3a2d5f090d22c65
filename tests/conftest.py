"""Shared fixtures: every test that takes ``backend_name`` runs once per installed,
available backend, with that backend active."""

import os

import numpy as np
import pytest

import fastseq

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def available_backends():
    return [name for name, reason in fastseq.list_backends().items() if reason is None]


def unavailable_backends():
    return {name: reason for name, reason in fastseq.list_backends().items() if reason is not None}


def pytest_report_header(config):
    lines = [f"fastseq backends available: {available_backends()}"]
    for name, reason in unavailable_backends().items():
        lines.append(f"fastseq backend {name} skipped: {reason}")
    return lines


@pytest.fixture(params=available_backends())
def backend_name(request):
    """Each available backend in turn, active for the test."""
    with fastseq.use_backend(request.param):
        yield request.param


@pytest.fixture(params=[b for b in available_backends() if b != "numpy"] or ["numpy"])
def fast_backend_name(request):
    """Each available non-reference backend (numpy itself when it is the only one)."""
    with fastseq.use_backend(request.param):
        yield request.param


@pytest.fixture(params=[np.float32, np.float64], ids=["f32", "f64"])
def dtype(request):
    return np.dtype(request.param)
