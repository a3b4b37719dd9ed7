"""The factorization registry (factorch/factorizations.py): every class
answers the same questions the same way, so layers and compress can treat
them alike."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from factorch import _activation as A
from factorch import factorizations as FZ
from factorch.nn import FactorizedLinear

# (name, in, out, rank, tensorized_shape) per registered factorization.
CASES = {
    "lowrank": (12, 10, 4, None),
    "cp": (12, 10, 5, ((3, 4), (2, 5))),
    "tucker": (12, 10, ((2, 3), (2, 3)), ((3, 4), (2, 5))),
    "tt": (12, 10, (1, 4, 1), ((3, 4), (2, 5))),
}


def test_every_registered_factorization_is_tested():
    assert set(FZ.REGISTRY) == set(CASES)
    with pytest.raises(ValueError, match="factorization: expected one of"):
        FZ.get("svd")


@pytest.mark.parametrize("name", list(CASES))
def test_layout_init_dense_op_and_flops_agree(name):
    n_in, n_out, rank, shape = CASES[name]
    f = FZ.get(name).create(n_in, n_out, rank, shape)
    assert (f.in_features, f.out_features) == (n_in, n_out)
    assert f.num_parameters == sum(math.prod(s) for s in f.shapes())
    g = torch.Generator().manual_seed(1)
    flat = torch.rand(f.num_parameters, generator=g, dtype=torch.float64) - 0.5
    views = f.views(flat)
    assert [tuple(v.shape) for v in views] == [tuple(s) for s in f.shapes()]
    assert all(v.data_ptr() >= flat.data_ptr() for v in views)  # views, no copies
    W = f.to_dense(flat)
    assert W.shape == (n_out, n_in)
    x = torch.rand(7, n_in, generator=g, dtype=torch.float64) - 0.5
    b = torch.rand(n_out, generator=g, dtype=torch.float64)
    torch.testing.assert_close(f.linear(x, flat, b), x @ W.T + b)
    assert 0 < f.flops(1) < f.flops(64)
    # init_: nn.Linear's weight variance 1 / (3·in), averaged over draws
    var = []
    for seed in range(40):
        torch.manual_seed(seed)
        w = torch.empty(f.num_parameters, dtype=torch.float64)
        f.init_(w)
        var.append(f.to_dense(w).var().item())
    assert sum(var) / len(var) == pytest.approx(1 / (3 * n_in), rel=0.35)


@pytest.mark.parametrize("name", list(CASES))
def test_from_dense_recovers_a_weight_of_its_own_form(name):
    n_in, n_out, rank, shape = CASES[name]
    f = FZ.get(name).create(n_in, n_out, rank, shape)
    torch.manual_seed(2)
    flat = torch.randn(f.num_parameters, dtype=torch.float64)
    W = f.to_dense(flat)
    got, flat2, err = type(f).from_dense(W, rank=f.rank, tensorized_shape=shape)
    assert got == f
    assert err < 1e-6
    torch.testing.assert_close(got.to_dense(flat2), W, rtol=1e-6, atol=1e-6)
    # and a layer built from it computes the same function
    lin = nn.Linear(n_in, n_out, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(W)
    layer = FactorizedLinear.from_linear(lin, name, rank=f.rank, tensorized_shape=shape)
    x = torch.randn(3, n_in, dtype=torch.float64)
    torch.testing.assert_close(layer(x), lin(x), rtol=1e-6, atol=1e-6)
    assert layer.layout == f


def test_lowrank_from_dense_whitened_is_the_output_error_optimum():
    torch.manual_seed(3)
    W = torch.randn(9, 14, dtype=torch.float64)
    X = torch.randn(200, 14, dtype=torch.float64) @ torch.randn(14, 14, dtype=torch.float64)
    C = X.T @ X / X.shape[0]
    wh = A.cholesky_whitening(C)
    f, flat, _ = FZ.LowRank.from_dense(W, rank=3, whitening=wh)
    err_aware = torch.linalg.matrix_norm((W - f.to_dense(flat)) @ X.T)
    s = torch.linalg.svdvals(W @ torch.linalg.cholesky(C))
    optimum = math.sqrt(X.shape[0]) * torch.linalg.vector_norm(s[3:])
    assert float(err_aware) == pytest.approx(float(optimum), rel=1e-8)
    _, flat_plain, _ = FZ.LowRank.from_dense(W, rank=3)
    err_plain = torch.linalg.matrix_norm((W - f.to_dense(flat_plain)) @ X.T)
    assert err_aware < err_plain


def test_only_activation_aware_factorizations_take_a_whitening():
    W = torch.randn(10, 12, dtype=torch.float64)
    wh = A.cholesky_whitening(torch.eye(12, dtype=torch.float64))
    for name in ("cp", "tucker", "tt"):
        assert not FZ.get(name).activation_aware
        with pytest.raises(ValueError, match="activation-aware methods build low-rank"):
            FZ.get(name).from_dense(W, rank=CASES[name][2], tensorized_shape=CASES[name][3],
                                    whitening=wh)
    assert FZ.LowRank.activation_aware


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="tensorized_shape: only for"):
        FZ.LowRank.create(12, 10, 3, ((3, 4), (2, 5)))
    with pytest.raises(ValueError, match="rank: expected 1 <= rank"):
        FZ.LowRank.create(12, 10, 11)
    with pytest.raises(ValueError, match="expected exactly one of rank, ratio or energy"):
        FZ.CP.from_dense(torch.randn(10, 12), rank=2, ratio=0.5)
    with pytest.raises(ValueError, match="energy: not defined for factorization='tucker'"):
        FZ.Tucker.from_dense(torch.randn(10, 12), energy=0.9)
    with pytest.raises(ValueError, match="weight: expected finite values"):
        FZ.TensorTrain.from_dense(torch.full((10, 12), float("nan")), rank=2)
    with pytest.raises(ValueError, match="U, V: expected"):
        FZ.LowRank.from_factors(torch.randn(4, 3), torch.randn(2, 5))
