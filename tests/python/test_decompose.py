"""factorch.decompose: truncated and randomized SVD, CP-ALS, Tucker-HOOI,
TT-SVD and TT-matrix on torch tensors and numpy arrays (C kernels through
DLPack)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

import factorch
from factorch import _lib
from factorch import decompose as D

CUDA = torch.cuda.is_available() and factorch.cuda_available()
SVD_DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


def rel(a, b) -> float:
    a = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a).double().cpu()
    b = torch.as_tensor(np.asarray(b) if not isinstance(b, torch.Tensor) else b).double().cpu()
    return ((a - b).norm() / b.norm()).item()


def decaying(m, n, decay=1.0, seed=0, dtype=torch.float64):
    """A [m, n] with singular values j^-decay and random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    s = torch.arange(1, k + 1, dtype=torch.float64) ** -decay
    return ((U * s) @ V.T).to(dtype), s


def planted_cp(shape, R, seed=0):
    g = torch.Generator().manual_seed(seed)
    fs = [torch.randn(s, R, generator=g, dtype=torch.float64) for s in shape]
    return D.CPResult(torch.ones(R, dtype=torch.float64), fs, 0.0).to_tensor()


def planted_tucker(shape, ranks, seed=0):
    g = torch.Generator().manual_seed(seed)
    core = torch.randn(*ranks, generator=g, dtype=torch.float64)
    fs = [torch.randn(s, r, generator=g, dtype=torch.float64) for s, r in zip(shape, ranks)]
    return D.TuckerResult(core, fs, 0.0).to_tensor()


def planted_tt(shape, ranks, seed=0):
    g = torch.Generator().manual_seed(seed)
    cores = [torch.randn(ranks[k], s, ranks[k + 1], generator=g, dtype=torch.float64)
             for k, s in enumerate(shape)]
    return D.TTResult(cores, tuple(ranks), 0.0).to_tensor()


# ---------------------------------------------------------------------------
# SVD
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", SVD_DEVICES)
@pytest.mark.parametrize("shape", [(30, 20), (20, 30), (25, 25)])
@pytest.mark.parametrize("rank", [1, 5, 20])
def test_svd_error_is_eckart_young(device, shape, rank):
    A = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    A = A.to(device)
    s = torch.linalg.svdvals(A.cpu())
    res = D.svd(A, rank)
    want = (s[rank:].norm() / s.norm()).item()
    assert res.rel_error == pytest.approx(want, rel=1e-10, abs=1e-14)
    assert rel(res.to_tensor(), A) == pytest.approx(want, rel=1e-9, abs=1e-12)
    torch.testing.assert_close(res.S.cpu(), s[:rank], rtol=1e-12, atol=1e-12)
    U, S, Vh = res  # unpacks like torch.linalg.svd
    assert U.shape == (shape[0], rank) and Vh.shape == (rank, shape[1]) and U.device == A.device
    eye = torch.eye(rank, dtype=torch.float64)
    torch.testing.assert_close((U.T @ U).cpu(), eye, atol=1e-12, rtol=0)
    torch.testing.assert_close((Vh @ Vh.T).cpu(), eye, atol=1e-12, rtol=0)
    # the sign convention: each column's largest entry is positive
    idx = U.abs().argmax(0)
    assert (U[idx, torch.arange(rank, device=U.device)] > 0).all()


def test_svd_float32_and_numpy_and_strides():
    A, s = decaying(40, 24, dtype=torch.float32)
    res = D.svd(A, 6)
    assert res.U.dtype == torch.float32
    want = (s[6:].norm() / s.norm()).item()
    assert res.rel_error == pytest.approx(want, rel=1e-5)  # computed in float64
    An = A.double().numpy()
    sn = np.linalg.svd(An, compute_uv=False)
    want = np.linalg.norm(sn[6:]) / np.linalg.norm(sn)
    rn = D.svd(An, 6)
    assert isinstance(rn.U, np.ndarray) and rn.U.dtype == np.float64
    assert rn.rel_error == pytest.approx(want, rel=1e-10)
    # a transposed (column-major) and a strided view, no copies on our side
    rt = D.svd(An.T, 6)
    assert rt.rel_error == pytest.approx(want, rel=1e-10)
    big = np.zeros((80, 48))
    big[::2, ::2] = An
    rs = D.svd(big[::2, ::2], 6)
    np.testing.assert_allclose(rs.S, rn.S, rtol=1e-12)
    # read-only numpy arrays and float16 torch tensors are accepted too
    ro = An.copy()
    ro.flags.writeable = False
    assert D.svd(ro, 2).rel_error > 0
    assert D.svd(A.half(), 2).U.dtype == torch.float32


def test_svd_zero_and_rank_deficient():
    Z = torch.zeros(6, 4, dtype=torch.float64)
    res = D.svd(Z, 2)
    assert res.rel_error == 0 and (res.S == 0).all() and torch.isfinite(res.U).all()
    A = torch.randn(10, 3, dtype=torch.float64) @ torch.randn(3, 8, dtype=torch.float64)
    res = D.svd(A, 3)
    assert res.rel_error < 1e-14
    assert D.svd(A, 5).S[3:].abs().max() < 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_randomized_svd_at_least_as_accurate_as_svd_lowrank(dtype):
    """Same oversampling p and power iterations q as torch.svd_lowrank(q=r+p,
    niter=q), on a matrix with a decaying spectrum; medians over seeds,
    since both are random."""
    A, s = decaying(300, 200, decay=1.0, dtype=dtype)
    r, p, q = 20, 10, 2
    optimum = (s[r:].norm() / s.norm()).item()
    ours, theirs = [], []
    for seed in range(7):
        res = D.randomized_svd(A, r, n_oversamples=p, n_iter=q, random_state=seed)
        ours.append(rel(res.to_tensor(), A))
        assert res.rel_error == pytest.approx(ours[-1], abs=1e-7 if dtype == torch.float64 else 1e-4)
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(A, q=r + p, niter=q)
        theirs.append(rel((U[:, :r] * S[:r]) @ V[:, :r].T, A))
    assert min(ours) >= optimum * (1 - 1e-6)
    assert np.median(ours) <= np.median(theirs), (np.median(ours), np.median(theirs), optimum)


@pytest.mark.parametrize("device", SVD_DEVICES)
def test_randomized_svd_seed_and_exact_low_rank(device):
    A = (torch.randn(50, 4, dtype=torch.float64) @ torch.randn(4, 70, dtype=torch.float64)).to(device)
    a = D.randomized_svd(A, 4, random_state=3)
    b = D.randomized_svd(A, 4, random_state=3)
    c = D.randomized_svd(A, 4, random_state=np.random.default_rng(0))
    assert torch.equal(a.U, b.U) and torch.equal(a.Vh, b.Vh) and torch.equal(a.S, b.S)
    assert rel(a.to_tensor(), A) < 1e-12 and rel(c.to_tensor(), A) < 1e-12
    assert a.rel_error < 1e-7
    # a different seed draws a different sketch (same subspace here, so
    # compare the sketch through a rank-deficient request)
    B = torch.randn(60, 40, dtype=torch.float64).to(device)
    assert not torch.equal(D.randomized_svd(B, 3, n_iter=0, random_state=1).U,
                           D.randomized_svd(B, 3, n_iter=0, random_state=2).U)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device and factorch's CUDA backend")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_svds_match_the_cpu(dtype):
    """The same algorithms and the same sketch (counter-based RNG) on both."""
    A, _ = decaying(120, 80, dtype=dtype)
    tol = 1e-9 if dtype == torch.float64 else 1e-3
    for fn in (lambda M: D.svd(M, 10), lambda M: D.randomized_svd(M, 10, random_state=4)):
        c, g = fn(A), fn(A.cuda())
        assert g.U.is_cuda and g.U.dtype == dtype
        torch.testing.assert_close(g.S.cpu(), c.S, atol=tol, rtol=tol)
        torch.testing.assert_close(g.U.cpu(), c.U, atol=tol * 10, rtol=0)
        torch.testing.assert_close(g.Vh.cpu(), c.Vh, atol=tol * 10, rtol=0)
        assert g.rel_error == pytest.approx(c.rel_error, abs=tol)
    with pytest.raises(ValueError, match="matrix: holds 1 NaN/Inf values"):
        B = A.cuda().clone()
        B[3, 4] = float("nan")
        D.svd(B, 2)


def test_randomized_svd_numpy_and_conv_weight_shape():
    w = np.random.default_rng(0).standard_normal((64, 32, 3, 3)).astype(np.float32)
    res = D.randomized_svd(w.reshape(64, -1), 16, random_state=0)
    assert isinstance(res.S, np.ndarray) and res.S.dtype == np.float32
    exact = D.svd(w.reshape(64, -1).astype(np.float64), 16)
    assert res.rel_error <= exact.rel_error * 1.05


def test_svd_bad_arguments_name_the_argument():
    A = torch.randn(6, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"rank: expected 1 <= rank <= 4"):
        D.svd(A, 5)
    with pytest.raises(ValueError, match=r"rank: expected 1 <= rank <= 4"):
        D.randomized_svd(A, 0)
    with pytest.raises(TypeError, match="rank: expected an int"):
        D.svd(A, 2.5)
    with pytest.raises(ValueError, match="n_oversamples: expected >= 0"):
        D.randomized_svd(A, 2, n_oversamples=-1)
    with pytest.raises(ValueError, match="matrix: expected 2 dims"):
        D.svd(torch.randn(2, 3, 4), 1)
    with pytest.raises(ValueError, match=r"matrix: expected dtype float32 or float64, got int64"):
        D.svd(torch.ones(3, 3, dtype=torch.int64), 1)
    B = A.clone()
    B[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"matrix: holds 1 NaN/Inf values"):
        D.svd(B, 2)
    B[2, 1] = float("inf")
    with pytest.raises(ValueError, match=r"matrix: holds 1 NaN/Inf values"):
        D.randomized_svd(B.numpy(), 2)
    with pytest.raises(TypeError, match="random_state: expected"):
        D.randomized_svd(A, 2, random_state="x")
    with pytest.raises(TypeError, match="matrix: expected a torch tensor or a numpy array"):
        D.svd("abc", 1)


# ---------------------------------------------------------------------------
# CP
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape,R", [((6, 7, 8), 3), ((5, 4, 3, 6), 2), ((9, 12), 4), ((4, 5, 6), 5),
                                     ((30, 5, 25), 7)])  # a middle mode smaller than the rank
def test_cp_recovers_planted_tensor(shape, R):
    X = planted_cp(shape, R, seed=R)
    res = D.cp(X, R, n_iter_max=1000, tol=1e-14)
    assert rel(res.to_tensor(), X) < 1e-6, (res.n_iter, res.rel_error)
    assert res.rel_error < 1e-6
    assert len(res.errors) == res.n_iter and res.errors[-1] == res.rel_error
    w, fs = res  # TensorLy's (weights, factors) order
    for f in fs:
        torch.testing.assert_close(f.norm(dim=0), torch.ones(R, dtype=torch.float64))


def test_cp_tol_and_n_iter_max_behave_as_documented():
    X = torch.randn(8, 9, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    res = D.cp(X, 4, tol=1e-4)
    e = res.errors
    assert res.converged and res.n_iter < 100
    assert abs(e[-2] - e[-1]) < 1e-4  # stopped at the first small change
    assert all(abs(e[i - 1] - e[i]) >= 1e-4 for i in range(1, len(e) - 1))
    assert all(e[i] <= e[i - 1] + 1e-9 for i in range(1, len(e)))  # ALS is monotone
    res = D.cp(X, 4, n_iter_max=5, tol=0)
    assert res.n_iter == 5 and not res.converged and len(res.errors) == 5
    res0 = D.cp(X, 4, n_iter_max=0)
    assert res0.n_iter == 0 and res0.rel_error == pytest.approx(rel(res0.to_tensor(), X), abs=1e-7)


def test_cp_same_seed_same_result_and_inits():
    X = torch.randn(6, 7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    a = D.cp(X, 3, init="random", random_state=5, n_iter_max=20)
    b = D.cp(X, 3, init="random", random_state=5, n_iter_max=20)
    c = D.cp(X, 3, init="random", random_state=6, n_iter_max=20)
    assert all(torch.equal(f, g) for f, g in zip(a.factors, b.factors))
    assert torch.equal(a.weights, b.weights)
    assert not torch.equal(a.factors[1], c.factors[1])
    # restarting from a result continues where it stopped
    d = D.cp(X, 3, init=a, n_iter_max=5)
    assert d.errors[0] <= a.rel_error + 1e-9
    # normalize_factors=False: weights of 1, the same tensor
    e = D.cp(X, 3, init="random", random_state=5, n_iter_max=20, normalize_factors=False)
    assert torch.all(e.weights == 1)
    assert rel(e.to_tensor(), a.to_tensor()) < 1e-12


def test_cp_l2_reg_rank_deficient_zero_and_numpy():
    X = planted_cp((5, 6, 7), 2)
    loose = D.cp(X, 5, tol=0, n_iter_max=50)  # rank above the tensor's: singular normal eqs.
    assert all(torch.isfinite(f).all() for f in loose.factors) and loose.rel_error < 1e-6
    reg = D.cp(X, 2, l2_reg=10.0)
    plain = D.cp(X, 2)
    assert reg.weights.abs().sum() < plain.weights.abs().sum()
    Z = D.cp(torch.zeros(3, 4, 5, dtype=torch.float64), 2)
    assert Z.rel_error == 0 and (Z.weights == 0).all()
    Xn = X.numpy()
    rn = D.cp(Xn, 2, n_iter_max=500, tol=1e-14)
    assert isinstance(rn.weights, np.ndarray) and rel(rn.to_tensor(), X) < 1e-6
    r32 = D.cp(X.float(), 2, n_iter_max=300, tol=1e-12)  # float32 in, float64 inside
    assert r32.weights.dtype == torch.float32 and rel(r32.to_tensor(), X) < 1e-5


def test_cp_bad_arguments():
    X = torch.randn(3, 4, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="rank: expected >= 1"):
        D.cp(X, 0)
    with pytest.raises(ValueError, match="tol: expected a finite number >= 0"):
        D.cp(X, 2, tol=-1)
    with pytest.raises(ValueError, match="l2_reg: expected a finite number >= 0"):
        D.cp(X, 2, l2_reg=float("nan"))
    with pytest.raises(ValueError, match="init: expected 'svd', 'random'"):
        D.cp(X, 2, init="hosvd")
    with pytest.raises(ValueError, match="tensor: expected at least 2 dims"):
        D.cp(torch.randn(5), 2)
    X[0, 1, 2] = float("inf")
    with pytest.raises(ValueError, match="tensor: holds 1 NaN/Inf values"):
        D.cp(X, 2)


# ---------------------------------------------------------------------------
# Tucker
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape,ranks", [((6, 7, 8), (2, 3, 4)), ((30, 5, 4), (3, 2, 2)),
                                         ((4, 5, 3, 6), (2, 2, 3, 2)), ((10, 12), (3, 3))])
def test_tucker_recovers_planted_tensor(shape, ranks):
    X = planted_tucker(shape, ranks)
    res = D.tucker(X, list(ranks))
    assert rel(res.to_tensor(), X) < 1e-6
    assert res.rank == tuple(ranks)
    for U in res.factors:
        torch.testing.assert_close(U.T @ U, torch.eye(U.shape[1], dtype=torch.float64),
                                   atol=1e-10, rtol=0)
    core, factors = res


def test_tucker_tol_init_seed_and_rank_forms():
    X = torch.randn(9, 8, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    hosvd = D.tucker(X, 3, n_iter_max=0)
    assert hosvd.n_iter == 0 and hosvd.rank == (3, 3, 3)
    hooi = D.tucker(X, 3, tol=1e-6)
    assert hooi.rel_error <= hosvd.rel_error + 1e-12 and hooi.converged
    e = hooi.errors
    assert abs(e[-2] - e[-1]) < 1e-6 and all(e[i] <= e[i - 1] + 1e-9 for i in range(1, len(e)))
    a = D.tucker(X, [2, 3, 4], init="random", random_state=1, n_iter_max=3, tol=0)
    b = D.tucker(X, [2, 3, 4], init="random", random_state=1, n_iter_max=3, tol=0)
    assert torch.equal(a.core, b.core) and a.n_iter == 3
    c = D.tucker(X, [2, 3, 4], init=a, n_iter_max=2)
    assert c.rel_error <= a.rel_error + 1e-12
    assert D.tucker(X, 100).rank == (9, 8, 7)  # an int is capped at each mode's size
    assert D.tucker(X).rel_error < 1e-7  # full ranks: exact
    Xn = D.tucker(X.numpy(), 3, tol=1e-6)
    assert isinstance(Xn.core, np.ndarray) and Xn.rel_error == pytest.approx(hooi.rel_error, abs=1e-6)


def test_tucker_bad_arguments():
    X = torch.randn(3, 4, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"rank\[1\]: expected 1 <= rank\[1\] <= 4"):
        D.tucker(X, [2, 5, 2])
    with pytest.raises(ValueError, match="rank: expected an int or 3 ints"):
        D.tucker(X, [2, 2])
    with pytest.raises(ValueError, match="n_iter_max: expected 0 <= n_iter_max"):
        D.tucker(X, 2, n_iter_max=-1)
    X[1, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="tensor: holds 1 NaN/Inf values"):
        D.tucker(X, 2)


# ---------------------------------------------------------------------------
# Tensor train
# ---------------------------------------------------------------------------


def test_tensor_train_recovers_planted_ranks():
    ranks = (1, 2, 3, 2, 1)
    X = planted_tt((4, 5, 6, 3), ranks)
    res = D.tensor_train(X, eps=1e-10)
    assert res.rank == ranks and rel(res.to_tensor(), X) < 1e-10
    exact = D.tensor_train(X)  # neither rank nor eps: numerically exact
    assert exact.rank == ranks and exact.rel_error < 1e-12
    capped = D.tensor_train(X, rank=[1, 2, 3, 2, 1])
    assert capped.rank == ranks and rel(capped.to_tensor(), X) < 1e-10


def test_tensor_train_eps_and_rank_behave_as_documented():
    X = torch.randn(5, 6, 4, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for eps in (0.05, 0.2, 0.5):
        res = D.tensor_train(X, eps=eps)
        err = rel(res.to_tensor(), X)
        assert err <= eps and res.rel_error == pytest.approx(err, rel=1e-9)
        # minimal: each rank one smaller would break the per-step bound
    assert D.tensor_train(X, eps=0.5).rank < D.tensor_train(X, eps=0.05).rank
    res = D.tensor_train(X, rank=3)
    assert max(res.rank) == 3 and res.rank[0] == res.rank[-1] == 1
    assert res.rel_error == pytest.approx(rel(res.to_tensor(), X), rel=1e-9)
    both = D.tensor_train(X, rank=2, eps=0.01)  # the cap wins
    assert max(both.rank) == 2
    tn = D.tensor_train(X.numpy(), rank=3)
    assert isinstance(tn.factors[0], np.ndarray) and tn.rank == res.rank


def test_tensor_train_many_modes_and_zero():
    X = planted_tt((2,) * 10, (1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 1))  # more dims than DLPack views here
    res = D.tensor_train(X, eps=1e-10)
    assert rel(res.to_tensor(), X) < 1e-10 and max(res.rank) <= 2
    Z = D.tensor_train(torch.zeros(3, 4, 5, dtype=torch.float64), eps=0.1)
    assert Z.rank == (1, 1, 1, 1) and Z.rel_error == 0


def test_tensor_train_matrix_recovers_a_tt_matrix():
    # W [(I0 I1 I2), (J0 J1 J2)] from planted TT-matrix cores
    g = torch.Generator().manual_seed(4)
    I, J, rk = (3, 4, 2), (2, 3, 4), (1, 2, 3, 1)
    cores = [torch.randn(rk[k], I[k], J[k], rk[k + 1], generator=g, dtype=torch.float64)
             for k in range(3)]
    W = D.TTMatrixResult(cores, rk, 0.0).to_tensor()
    assert W.shape == I + J
    res = D.tensor_train_matrix(W, eps=1e-10)
    assert res.rank == rk and rel(res.to_tensor(), W) < 1e-10
    assert res.factors[1].shape == (2, 4, 3, 3)
    assert res.to_matrix().shape == (24, 24)
    capped = D.tensor_train_matrix(W, rank=2)
    assert max(capped.rank) == 2 and capped.rel_error == pytest.approx(
        rel(capped.to_tensor(), W), rel=1e-9)
    rn = D.tensor_train_matrix(W.numpy(), rank=2)
    np.testing.assert_allclose(rn.to_tensor(), capped.to_tensor().numpy(), atol=1e-12)


def test_tensor_train_bad_arguments():
    X = torch.randn(3, 4, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="rank: expected the first and last TT ranks to be 1"):
        D.tensor_train(X, rank=[2, 2, 2, 1])
    with pytest.raises(ValueError, match=r"rank: expected an int or 4 ints"):
        D.tensor_train(X, rank=[1, 2, 1])
    with pytest.raises(ValueError, match="eps: expected a finite number >= 0"):
        D.tensor_train(X, eps=-0.1)
    with pytest.raises(ValueError, match="tensor: expected an even number of dims"):
        D.tensor_train_matrix(X, rank=2)
    X[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="tensor: holds 1 NaN/Inf values"):
        D.tensor_train(X, rank=2)


@pytest.mark.parametrize("shape", [(3, 1, 5), (4, 1, 4), (2, 1, 1, 3), (3, 2, 1, 4)])
def test_cp_reports_its_error_with_size_one_modes(shape):
    """Two bugs the fuzz (test_fuzz_decompose.py) found: a mode of size 1
    inside a dimension-tree group was skipped in the MTTKRP (its factor's
    entry is ±1 once normalised: the sign got lost), so rel_error claimed 0
    for a model worse than zero."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(*shape, generator=g, dtype=torch.float64)
    for R in (2, 3, 5):
        res = D.cp(X, R, n_iter_max=4, tol=0)
        # rel_error comes from norms: accurate to about 1e-8 absolute (factorch.h)
        assert res.rel_error == pytest.approx(rel(res.to_tensor(), X), abs=1e-7), (shape, R)
        assert res.rel_error <= 1


def test_tucker_rank_above_the_unfoldings_rank_gives_orthonormal_factors():
    """dsyevr (index range: inverse iteration) returned columns of norm ~1e3
    for a cluster of zero eigenvalues, with info 0; the factor is now
    repaired by QR, and the error is that of the returned factors."""
    g = torch.Generator().manual_seed(0)
    X = (torch.randn(7, 2, generator=g, dtype=torch.float64)
         @ torch.randn(2, 72, generator=g, dtype=torch.float64)).reshape(7, 6, 6, 2)
    for n_iter_max in (0, 2):
        res = D.tucker(X, [5, 5, 5, 2], n_iter_max=n_iter_max, tol=0)
        for U in res.factors:
            eye = torch.eye(U.shape[1], dtype=U.dtype)
            assert (U.T @ U - eye).abs().max() < 1e-12
        assert res.rel_error == pytest.approx(rel(res.to_tensor(), X), abs=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gpu_path_of_the_algorithms_on_the_cpu(dtype, monkeypatch):
    """FACTORCH_TEST_DEVICE_PATH=1: the CPU engine keeps host and engine
    memory apart, so CP, Tucker and TT take the code path they take on a
    GPU (host buffers allocated apart, data moved through to_host and
    to_device), with the CPU's arithmetic: the same bits as the plain run."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(6, 7, 8, generator=g, dtype=torch.float64).to(dtype)
    X = X.transpose(0, 2).contiguous().transpose(0, 2)  # strided: loaded, not read in place
    runs = [
        lambda T: D.cp(T, 9, n_iter_max=12, tol=0, l2_reg=1e-3),  # rank 9 > I_0: small modes
        lambda T: D.cp(T, 3, init="random", n_iter_max=12, tol=0, normalize_factors=False),
        lambda T: D.tucker(T, [3, 2, 4], n_iter_max=3, tol=0),
        lambda T: D.tucker(T, [6, 2, 2], init="random", n_iter_max=3, tol=0),
        lambda T: D.tensor_train(T, eps=0.3),
        lambda T: D.tensor_train_matrix(T[:, :6, :6].reshape(6, 2, 3, 6).permute(0, 1, 3, 2)
                                        .reshape(6, 2, 6, 3)[:2, :, :2, :], rank=2),
    ]
    for i, fn in enumerate(runs):
        plain = fn(X)
        monkeypatch.setenv("FACTORCH_TEST_DEVICE_PATH", "1")
        split = fn(X)
        monkeypatch.delenv("FACTORCH_TEST_DEVICE_PATH")
        assert split.rel_error == plain.rel_error, i
        torch.testing.assert_close(split.to_tensor(), plain.to_tensor(), rtol=0, atol=0)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device and factorch's CUDA backend")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_cp_tucker_tt_match_the_cpu(dtype):
    """CP, Tucker and TT on the CUDA engine (cuBLAS/cuSOLVER) against the CPU
    engine: same errors, same reconstructions, outputs on the input's device
    and dtype; strided input; NaN rejected on the GPU too."""
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    X = (planted_cp((9, 10, 11), 3) + 1e-3 * torch.randn(9, 10, 11, dtype=torch.float64,
                                                       generator=torch.Generator().manual_seed(5)))
    X = X.to(dtype)
    Xs = X.cuda().transpose(0, 2).contiguous().transpose(0, 2)  # strided on the GPU
    assert not Xs.is_contiguous()
    runs = [
        lambda T: D.cp(T, 3, init="random", n_iter_max=30, tol=0),  # same host-side init
        lambda T: D.cp(T, 3, n_iter_max=30, tol=0),
        lambda T: D.tucker(T, 3, n_iter_max=5, tol=0),
        lambda T: D.tucker(T, 3, init="random", n_iter_max=5, tol=0),
        lambda T: D.tucker(T, [9, 2, 2], n_iter_max=3, tol=0),  # a mode larger than the rest
        lambda T: D.tensor_train(T, rank=[1, 3, 4, 1]),
        lambda T: D.tensor_train(T, eps=1e-2),
        lambda T: D.tensor_train_matrix(T.reshape(3, 3, 10, 11)[:, :, :2, :2], rank=2),
    ]
    for i, fn in enumerate(runs):
        c = fn(X)
        for T in (X.cuda(), Xs):
            g = fn(T)
            out = g.to_tensor()
            assert out.is_cuda and out.dtype == dtype, i
            assert g.rel_error == pytest.approx(c.rel_error, abs=tol * 10), i
            torch.testing.assert_close(out.cpu(), c.to_tensor(), atol=tol * 100, rtol=0)
            if hasattr(c, "rank"):
                assert g.rank == c.rank, i
    with pytest.raises(ValueError, match="tensor: holds 1 NaN/Inf values"):
        B = X.cuda().clone()
        B[1, 2, 3] = float("nan")
        D.tucker(B, 2)

# ---------------------------------------------------------------------------
# Threads: long LAPACK calls run on OpenBLAS's threads, given back after
# ---------------------------------------------------------------------------


def openblas_threads() -> int:
    return _lib.core.fct_cpu_set_num_threads(0)  # 0: leaves the count as it is


def polled(fn):
    """fn() on a thread of its own (ctypes releases the GIL) while this one
    polls OpenBLAS's thread count: (fn's result, the counts seen)."""
    out, seen, done = [], set(), threading.Event()

    def run():
        try:
            out.append(fn())
        except BaseException as e:  # re-raised below
            out.append(e)
        finally:
            done.set()

    t = threading.Thread(target=run)
    t.start()
    while not done.is_set():
        seen.add(openblas_threads())
        time.sleep(0.002)  # must not take a core from OpenBLAS
    t.join()
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0], seen


@pytest.fixture
def two_torch_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_long_lapack_calls_take_torchs_threads_and_give_them_back(two_torch_threads):
    """Under torch OpenBLAS is single-threaded; a decomposition's LAPACK call
    of ~0.6 s or more of one core (here a 1300x1200 SVD) runs with OpenBLAS's
    count raised to torch.get_num_threads(), then set back to 1. Below that,
    nothing changes: the same bits whatever torch's thread count."""
    assert openblas_threads() == 1
    g = torch.Generator().manual_seed(0)
    A = torch.randn(1300, 1200, generator=g, dtype=torch.float64)
    res, seen = polled(lambda: D.svd(A, 40))
    assert 2 in seen and seen <= {1, 2}
    assert openblas_threads() == 1
    want = torch.linalg.svdvals(A)[:40]
    torch.testing.assert_close(res.S, want, rtol=1e-12, atol=0)
    small = A[:200, :150]
    a = D.svd(small, 20)
    torch.set_num_threads(1)
    b = D.svd(small, 20)
    for x, y in zip((a.U, a.S, a.Vh), (b.U, b.S, b.Vh)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_decomposition_gives_the_threads_back(dtype, two_torch_threads, monkeypatch):
    """FACTORCH_TEST_LAPACK_THREADS=1 gives every LAPACK call the threads
    (a test hook): each decomposition leaves OpenBLAS at 1 thread and its
    results within rounding of the single-threaded ones."""
    g = torch.Generator().manual_seed(1)
    M = torch.randn(600, 500, generator=g, dtype=torch.float64).to(dtype)
    X = torch.randn(12, 13, 14, generator=g, dtype=torch.float64).to(dtype)
    W = torch.randn(4, 4, 4, 4, 4, 4, generator=g, dtype=torch.float64).to(dtype)
    runs = [
        lambda: D.svd(M, 30),
        lambda: D.randomized_svd(M, 30, n_iter=2),
        lambda: D.cp(X, 4, n_iter_max=10, tol=0),
        lambda: D.tucker(X, [4, 5, 6], n_iter_max=3, tol=0),
        lambda: D.tucker(X, [4, 5, 6], init="random", n_iter_max=3, tol=0),
        lambda: D.tensor_train(X, rank=[1, 5, 6, 1]),
        lambda: D.tensor_train_matrix(W, rank=5),
    ]
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    for i, fn in enumerate(runs):
        plain = fn()
        monkeypatch.setenv("FACTORCH_TEST_LAPACK_THREADS", "1")
        threaded, seen = polled(fn)
        monkeypatch.delenv("FACTORCH_TEST_LAPACK_THREADS")
        assert openblas_threads() == 1, i
        assert seen <= {1, 2}, i
        if i == 0:  # long enough to be seen
            assert 2 in seen
        assert threaded.rel_error == pytest.approx(plain.rel_error, abs=tol), i
        torch.testing.assert_close(threaded.to_tensor(), plain.to_tensor(), atol=tol * 10,
                                   rtol=0)
