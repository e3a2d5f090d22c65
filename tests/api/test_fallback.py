"""A backend may refuse a layer with NotImplementedError: the driver then runs that layer on
the reference and the results (and gradients) are the reference's."""

import numpy as np

import fastseq
from fastseq import backend as registry
from fastseq.reference import NumpyBackend
from fastseq.testing import assert_close, clone_cell, problem, run_driver


class RefusingBackend(NumpyBackend):
    name = "refusing"

    def layer_forward(self, spec, *args, **kwargs):
        if spec.kind == "gru":
            raise NotImplementedError("this backend has no GRU kernel")
        return super().layer_forward(spec, *args, **kwargs)


def test_driver_falls_back_to_reference_when_backend_refuses(monkeypatch):
    registry._discover()
    monkeypatch.setitem(registry._entry_points, "refusing", type("EP", (), {"load": staticmethod(lambda: RefusingBackend)})())
    try:
        weights, x, seq = problem("multi", np.float64, seed=2)  # GRU layer + LSTM layer
        with fastseq.use_backend("numpy"):
            ref, ref_g = run_driver("bidirectional", "multi", weights, x, seq, np.float64)
        with fastseq.use_backend("refusing"):
            got, got_g = run_driver("bidirectional", "multi", weights, x, seq, np.float64)
        assert_close(got, ref, np.float64, "forward")
        assert_close((got_g.inputs, got_g.weights), (ref_g.inputs, ref_g.weights), np.float64, "gradients")
    finally:
        registry._instances.pop("refusing", None)
        registry._initialized.discard("refusing")
