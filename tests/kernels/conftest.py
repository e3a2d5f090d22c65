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
