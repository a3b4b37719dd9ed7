"""The C kernels called on numpy arrays through DLPack (no torch dispatcher)."""

from __future__ import annotations

import numpy as np
import pytest

import factorch.dlpack as fd


def rnd(rng, *shape, dtype=np.float64):
    v = rng.uniform(0.1, 1.0, shape) * rng.choice([-1.0, 1.0], shape)
    return v.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_forward_and_backward_match_float64(dtype):
    rng = np.random.default_rng(0)
    x, U, V, b = rnd(rng, 3, 5, 12, dtype=dtype), rnd(rng, 7, 4, dtype=dtype), rnd(rng, 4, 12, dtype=dtype), rnd(rng, 7, dtype=dtype)
    y = fd.lowrank_linear(x, U, V, b)
    x64, U64, V64 = x.astype(np.float64), U.astype(np.float64), V.astype(np.float64)
    ref = x64 @ (U64 @ V64).T + b
    tol = 1e-12 if dtype == np.float64 else 1e-5
    assert y.dtype == dtype and y.shape == (3, 5, 7)
    np.testing.assert_allclose(y, ref, rtol=tol, atol=tol)

    g = rnd(rng, 3, 5, 7, dtype=dtype)
    grads = fd.lowrank_linear_backward(g, x, U, V)
    g2, x2 = g.reshape(-1, 7).astype(np.float64), x64.reshape(-1, 12)
    gt = g2 @ U64
    np.testing.assert_allclose(grads["x"].reshape(-1, 12), gt @ V64, rtol=tol * 10, atol=tol * 10)
    np.testing.assert_allclose(grads["U"], g2.T @ (x2 @ V64.T), rtol=tol * 10, atol=tol * 10)
    np.testing.assert_allclose(grads["V"], gt.T @ x2, rtol=tol * 10, atol=tol * 10)
    np.testing.assert_allclose(grads["bias"], g2.sum(0), rtol=tol * 10, atol=tol * 10)


def test_strided_numpy_views_are_read_in_place():
    rng = np.random.default_rng(1)
    x = rnd(rng, 12, 8).T[:, ::2]  # non-contiguous, transposed and sliced
    U, V = rnd(rng, 5, 3), rnd(rng, 3, 6)
    np.testing.assert_allclose(fd.lowrank_linear(x, U, V), x @ (U @ V).T, rtol=1e-12)


def test_errors_name_the_argument():
    rng = np.random.default_rng(2)
    x, U, V = rnd(rng, 4, 6), rnd(rng, 5, 3), rnd(rng, 3, 6)
    with pytest.raises(fd.FactorchError, match=r"U: expected dtype float64 \(the dtype of x\), got float32"):
        fd.lowrank_linear(x, U.astype(np.float32), V)
    with pytest.raises(ValueError, match=r"V: expected \[r, in\] with in = 5"):
        fd.lowrank_linear(x[:, :5], U, V)
    with pytest.raises(ValueError, match=r"x: expected dtype float32, float64.*got int64"):
        fd.lowrank_linear(x.astype(np.int64), U, V)
    with pytest.raises(ValueError, match=r"y: expected an output with unit stride"):
        fd.lowrank_linear(x, U, V, out=np.empty((5, 4)).T)
    with pytest.raises(TypeError, match=r"x: expected an array supporting DLPack"):
        fd.lowrank_linear([[1.0]], U, V)
    x[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"the inputs x hold NaN or Inf"):
        fd.lowrank_linear(x, U, V)
    assert np.isnan(fd.lowrank_linear(x, U, V, check_finite=False)[0]).all()
