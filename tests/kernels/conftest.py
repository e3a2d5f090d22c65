import pytest

from fastseq.reference import NumpyBackend

fastseq_numba = pytest.importorskip("fastseq_numba")


@pytest.fixture(scope="session")
def numba_backend():
    backend = fastseq_numba.NumbaBackend()
    reason = backend.availability()
    if reason is not None:
        pytest.skip(reason)
    backend.initialize()
    return backend


@pytest.fixture(scope="session")
def ref_backend():
    return NumpyBackend()


@pytest.fixture
def rows_everywhere(monkeypatch):
    """Small shapes take the two-thread loops' row split (and so the stacks) as P2's do."""
    from fastseq_kernels import gru, lstm

    for mod in (gru, lstm):
        monkeypatch.setattr(mod, "ROWS_MIN_B", 1)
        monkeypatch.setattr(mod, "ROWS_MAX_WEIGHT_BYTES", 1 << 62)
        monkeypatch.setattr(mod, "SPLIT_MIN_MACS", 0)
