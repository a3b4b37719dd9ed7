"""Decompositions of trained weights, computed by factorch's C library.

    >>> from factorch import decompose
    >>> U, S, Vh = decompose.svd(W, rank=64)                  # truncated SVD
    >>> res = decompose.randomized_svd(W, rank=256)           # O((m+n)·(r+p)) memory
    >>> cp = decompose.cp(T, rank=16)                         # CP-ALS
    >>> tk = decompose.tucker(T, rank=[16, 16, 3])            # Tucker-HOOI
    >>> tt = decompose.tensor_train(T, eps=1e-3)              # TT-SVD
    >>> ttm = decompose.tensor_train_matrix(W.reshape(8, 8, 8, 8, 8, 8), rank=16)
    >>> cp.rel_error, cp.errors, cp.to_tensor()

Inputs are torch tensors or numpy arrays (any strides, float32 or float64;
float16/bfloat16 torch tensors are decomposed as float32). They reach C
through DLPack without copies; results come back in the input's kind,
dtype and device. Argument names and meanings follow TensorLy
(``rank``, ``n_iter_max``, ``tol``, ``init``, ``l2_reg``, ``random_state``,
``normalize_factors``) so that its users can switch. Differences:
``random_state=None`` means seed 0 (deterministic), and ``cp`` normalises
its factors by default.

Every function runs on CUDA tensors with cuBLAS/cuSOLVER when factorch's
CUDA backend is loaded (else they are copied to the cpu and the results
copied back). ``cp`` keeps its small factor algebra (O((Σ I_n)·rank +
rank²) per mode) on the host and contracts the tensor on the GPU.

Every function computes in float64 (``randomized_svd`` reads the matrix in
its own dtype and orthogonalises in float64), is deterministic for a given
``random_state``, raises ``ValueError`` naming the argument for NaN/Inf
input or impossible ranks, and handles zero and rank-deficient inputs.
These are not autograd ops: inputs are detached.

Bounded work (factorch.limits): the results and the C workspace are checked
against the memory available on the device (or the cap of
``factorch.limits.set_memory_limit``) before anything is allocated, with a
``ValueError`` naming the argument and the bytes it would need;
``n_iter_max`` is at most ``limits.MAX_SWEEPS`` and ``randomized_svd``'s
``n_iter`` at most ``limits.MAX_POWER_ITERATIONS``.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from . import _decompose_capi as capi
from . import _lib, limits
from .dlpack import FactorchError

__all__ = [
    "svd",
    "randomized_svd",
    "cp",
    "tucker",
    "tensor_train",
    "tensor_train_matrix",
    "SVDResult",
    "CPResult",
    "TuckerResult",
    "TTResult",
    "TTMatrixResult",
    "FactorchError",
]


# ---------------------------------------------------------------------------
# Inputs, outputs and the array module (torch or numpy) of each call
# ---------------------------------------------------------------------------


def _prepare(x, name: str):
    """(array as handed to C, is_torch). Torch tensors are detached; 16-bit
    floats become float32; numpy arrays DLPack cannot export (read-only,
    big-endian, odd strides) are copied."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
        if t.dtype in (torch.float16, torch.bfloat16):
            t = t.float()
        if t.is_conj() or t.is_neg():
            t = t.resolve_conj().resolve_neg()
        return t, True
    if not isinstance(x, np.ndarray):
        if hasattr(x, "__dlpack__"):
            try:
                x = np.from_dlpack(x)
            except (BufferError, RuntimeError, TypeError) as e:
                raise TypeError(f"{name}: expected a torch tensor or a numpy array, got "
                                f"{type(x).__name__} ({e})") from None
        elif isinstance(x, (list, tuple)):
            x = np.asarray(x, dtype=np.float64)
        else:
            raise TypeError(f"{name}: expected a torch tensor or a numpy array, got "
                            f"{type(x).__name__}")
    if x.dtype == np.float16:
        x = x.astype(np.float32)
    if not x.dtype.isnative:
        x = x.astype(x.dtype.newbyteorder("="))  # DLPack holds the machine's byte order only
    if not x.flags.writeable:
        x = x.copy()  # numpy does not export read-only arrays through DLPack
    try:
        x.__dlpack__()
    except BufferError:
        x = np.ascontiguousarray(x)
    return x, False


def _empty(like, shape, is_torch):
    if is_torch:
        return torch.empty(tuple(shape), dtype=like.dtype, device=like.device)
    return np.empty(tuple(shape), dtype=like.dtype)


def _cpu_unless_cuda_backend(x):
    """(array to decompose, device to return the results to): a CUDA tensor
    is copied to the cpu only when factorch was built without CUDA."""
    if _cuda_without_backend(x):
        return x.cpu(), x.device
    return x, None


def _to(device, *arrays):
    if device is None:
        return arrays
    return tuple(a.to(device) for a in arrays)


def _seed(random_state) -> int:
    """A 64-bit seed: None -> 0, an int, or drawn from a numpy / torch
    generator."""
    if random_state is None:
        return 0
    if isinstance(random_state, bool):
        raise TypeError("random_state: expected None, an int or a generator, got bool")
    if isinstance(random_state, (int, np.integer)):
        return int(random_state) & (2**64 - 1)
    if isinstance(random_state, np.random.Generator):
        return int(random_state.integers(0, 2**63))
    if isinstance(random_state, np.random.RandomState):
        return int(random_state.randint(0, 2**31 - 1))
    if isinstance(random_state, torch.Generator):
        return int(torch.randint(0, 2**62, (1,), generator=random_state).item())
    raise TypeError(
        "random_state: expected None, an int, a numpy Generator/RandomState or a "
        f"torch.Generator, got {type(random_state).__name__}"
    )


def _check_int(name, v, lo, hi=None, why=""):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    v = int(v)
    if v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None or hi >= 2**31 - 1 else f"{lo} <= {name} <= {hi}"
        raise ValueError(f"{name}: expected {rng}{why}, got {v}")
    return v


def _result_bytes(like, shapes) -> int:
    """Bytes of results of these shapes in like's dtype."""
    item = like.element_size() if isinstance(like, torch.Tensor) else like.dtype.itemsize
    return sum(math.prod(s) for s in shapes) * item


def _check_results(like, name: str, what: str, shapes, extra: int = 0) -> int:
    """The bytes of the results (plus ``extra``), checked against
    factorch.limits before they are allocated."""
    n = _result_bytes(like, shapes) + extra
    limits.check_bytes(name, f"{what} (results)", n, capi.device_of(like))
    return n


def _check_float(name, v, lo=0.0):
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name}: expected a number, got {type(v).__name__}")
    v = float(v)
    if not (v >= lo) or not math.isfinite(v):
        raise ValueError(f"{name}: expected a finite number >= {lo}, got {v}")
    return v


def _shape(x):
    return tuple(int(s) for s in x.shape)


# Array-module helpers, so that results work for torch and numpy alike.
def _xp_moveaxis(x, src, dst):
    return torch.movedim(x, src, dst) if isinstance(x, torch.Tensor) else np.moveaxis(x, src, dst)


def _xp_tensordot(a, b, axes):
    return torch.tensordot(a, b, dims=axes) if isinstance(a, torch.Tensor) else np.tensordot(a, b, axes)


def _xp_permute(x, order):
    return x.permute(*order) if isinstance(x, torch.Tensor) else np.transpose(x, order)


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------


@dataclass
class SVDResult:
    """``matrix ≈ U @ diag(S) @ Vh``: U [m, r], S [r] (descending), Vh [r, n].
    Unpacks as ``U, S, Vh = result``."""

    U: object
    S: object
    Vh: object
    rel_error: float
    n_iter: int = 0

    def __iter__(self):
        return iter((self.U, self.S, self.Vh))

    def to_tensor(self):
        return (self.U * self.S) @ self.Vh


@dataclass
class CPResult:
    """``tensor ≈ Σ_r weights[r] · factors[0][:, r] ∘ factors[1][:, r] ∘ ...``.
    ``errors`` holds the relative error after each sweep; unpacks as
    ``weights, factors = result`` (TensorLy's CPTensor order)."""

    weights: object
    factors: list
    rel_error: float
    errors: list = field(default_factory=list)
    n_iter: int = 0
    converged: bool = False

    def __iter__(self):
        return iter((self.weights, self.factors))

    @property
    def rank(self) -> int:
        return int(self.factors[0].shape[1])

    def to_tensor(self):
        f, R = self.factors, self.rank
        acc = f[0] * self.weights
        for A in f[1:-1]:
            acc = (acc[:, None, :] * A[None, :, :]).reshape(-1, R)
        return (acc @ f[-1].T).reshape(tuple(int(A.shape[0]) for A in f))


@dataclass
class TuckerResult:
    """``tensor ≈ core ×_0 factors[0] ×_1 factors[1] ...`` with orthonormal
    factors [I_n, R_n]. Unpacks as ``core, factors = result``."""

    core: object
    factors: list
    rel_error: float
    errors: list = field(default_factory=list)
    n_iter: int = 0
    converged: bool = False

    def __iter__(self):
        return iter((self.core, self.factors))

    @property
    def rank(self) -> tuple:
        return tuple(int(U.shape[1]) for U in self.factors)

    def to_tensor(self):
        t = self.core
        for n, U in enumerate(self.factors):
            t = _xp_moveaxis(_xp_tensordot(U, t, ([1], [n])), 0, n)
        return t


@dataclass
class TTResult:
    """Tensor train: ``factors[k]`` is the core [rank[k], n_k, rank[k+1]],
    ``rank[0] == rank[-1] == 1``."""

    factors: list
    rank: tuple
    rel_error: float

    def __iter__(self):
        return iter(self.factors)

    @property
    def shape(self) -> tuple:
        return tuple(int(c.shape[1]) for c in self.factors)

    def to_tensor(self):
        full = self.factors[0].reshape(-1, self.factors[0].shape[-1])
        for c in self.factors[1:]:
            full = (full @ c.reshape(c.shape[0], -1)).reshape(-1, c.shape[-1])
        return full.reshape(self.shape)


@dataclass
class TTMatrixResult:
    """TT-matrix: ``factors[k]`` is the core [rank[k], I_k, J_k, rank[k+1]] of
    a tensor of shape (I_0, ..., I_{d-1}, J_0, ..., J_{d-1}), i.e. of the
    matrix [Π I, Π J]."""

    factors: list
    rank: tuple
    rel_error: float

    def __iter__(self):
        return iter(self.factors)

    @property
    def shape(self) -> tuple:
        return tuple(int(c.shape[1]) for c in self.factors) + tuple(
            int(c.shape[2]) for c in self.factors)

    def to_tensor(self):
        d = len(self.factors)
        full = self.factors[0].reshape(-1, self.factors[0].shape[-1])
        for c in self.factors[1:]:
            full = (full @ c.reshape(c.shape[0], -1)).reshape(-1, c.shape[-1])
        inter = []
        for c in self.factors:
            inter += [int(c.shape[1]), int(c.shape[2])]
        full = full.reshape(inter)  # (I_0, J_0, I_1, J_1, ...)
        return _xp_permute(full, [2 * k for k in range(d)] + [2 * k + 1 for k in range(d)])

    def to_matrix(self):
        d = len(self.factors)
        s = self.shape
        return self.to_tensor().reshape(math.prod(s[:d]), math.prod(s[d:]))


# ---------------------------------------------------------------------------
# SVD
# ---------------------------------------------------------------------------

_MATRIX = {"A": "matrix"}


def _cuda_without_backend(A) -> bool:
    return isinstance(A, torch.Tensor) and A.is_cuda and not _lib.core.fct_cuda_available()


def _svd_args(matrix, rank, name="matrix"):
    A, is_torch = _prepare(matrix, name)
    if A.ndim != 2:
        raise ValueError(f"{name}: expected 2 dims [m, n], got {A.ndim}")
    m, n = _shape(A)
    q = min(m, n)
    if rank is None:
        rank = q
    rank = _check_int("rank", rank, 1, q) if q >= 1 else _check_int("rank", rank, 1, 0)
    return A, is_torch, m, n, rank


def svd(matrix, rank: int | None = None) -> SVDResult:
    """Truncated SVD ``matrix ≈ U @ diag(S) @ Vh`` of rank ``rank`` (default:
    min(m, n)), by LAPACK's divide-and-conquer SVD in float64.

    ``rel_error`` is the exact relative Frobenius error, which equals the
    Eckart–Young optimum ``||S_tail|| / ||S||``. Signs are fixed so that the
    largest-magnitude entry of each column of U is positive. Cost: a full
    SVD, O(m·n·min(m, n)); use :func:`randomized_svd` for a small rank of a
    large matrix.
    """
    A, is_torch, m, n, r = _svd_args(matrix, rank)
    if _cuda_without_backend(A):  # factorch built without CUDA: on the CPU
        res = svd(A.cpu(), r)
        return SVDResult(*_to(A.device, res.U, res.S, res.Vh), res.rel_error)
    what = f"the SVD of a {m}x{n} matrix"
    nb = _check_results(A, "matrix", what, [(m, r), (r,), (r, n)])
    U, S, Vh = _empty(A, (m, r), is_torch), _empty(A, (r,), is_torch), _empty(A, (r, n), is_torch)
    info = capi.DecompInfo()
    args = [capi.view(A), capi.view(U), capi.view(S), capi.view(Vh)]
    capi.call(A, capi.core.fct_svd_workspace, capi.core.fct_svd, args, (ctypes.byref(info),),
              _MATRIX, budget=("matrix", what, nb))
    return SVDResult(U, S, Vh, float(info.rel_error))


def randomized_svd(matrix, rank: int, n_oversamples: int = 10, n_iter: int = 2,
                   random_state=None) -> SVDResult:
    """Randomized truncated SVD (Halko, Martinsson & Tropp 2011) with
    ``n_oversamples`` extra sketch columns and ``n_iter`` power iterations,
    the same parameters as ``torch.svd_lowrank(A, q=rank + n_oversamples,
    niter=n_iter)`` (and sklearn's ``randomized_svd``).

    Memory stays O((m + n)·(rank + n_oversamples)): the matrix is only read
    (2·n_iter + 2 passes, in its own dtype), so a 4096×11008 LLM weight or a
    reshaped 1024×512×3×3×3 conv weight never needs a full SVD.
    ``rel_error`` is computed from norms (``||A||² − Σ S²``), accurate to
    about 1e-8.
    """
    A, is_torch, m, n, r = _svd_args(matrix, rank)
    p = _check_int("n_oversamples", n_oversamples, 0)
    q = _check_int("n_iter", n_iter, 0, limits.MAX_POWER_ITERATIONS,
                   " (factorch.limits.MAX_POWER_ITERATIONS)")
    if _cuda_without_backend(A):
        res = randomized_svd(A.cpu(), r, p, q, random_state)
        return SVDResult(*_to(A.device, res.U, res.S, res.Vh), res.rel_error, n_iter=q)
    what = f"a randomized SVD of rank {r} of a {m}x{n} matrix"
    nb = _check_results(A, "rank", what, [(m, r), (r,), (r, n)])
    U, S, Vh = _empty(A, (m, r), is_torch), _empty(A, (r,), is_torch), _empty(A, (r, n), is_torch)
    opts = capi.RsvdOptions(p, q, 0, _seed(random_state))
    info = capi.DecompInfo()
    args = [capi.view(A), capi.view(U), capi.view(S), capi.view(Vh), ctypes.byref(opts)]
    capi.call(A, capi.core.fct_randomized_svd_workspace, capi.core.fct_randomized_svd, args,
              (ctypes.byref(info),), _MATRIX,
              budget=("n_oversamples" if p > r else "rank", f"{what} with {p} oversamples", nb))
    return SVDResult(U, S, Vh, float(info.rel_error), n_iter=q)


# ---------------------------------------------------------------------------
# CP and Tucker
# ---------------------------------------------------------------------------


def _iter_args(n_iter_max, tol):
    return (_check_int("n_iter_max", n_iter_max, 0, limits.MAX_SWEEPS,
                       " (factorch.limits.MAX_SWEEPS)"), _check_float("tol", tol))


def _init_mode(init, kinds):
    if isinstance(init, str):
        if init == "svd":
            return capi.INIT_SVD
        if init == "random":
            return capi.INIT_RANDOM
        raise ValueError(f"init: expected 'svd', 'random' or a {kinds}, got {init!r}")
    return capi.INIT_GIVEN


def _as_like(v, like, is_torch, name):
    """A given factor as an array of like's kind, dtype and device (copied)."""
    if is_torch:
        t = torch.as_tensor(v.detach() if isinstance(v, torch.Tensor) else np.asarray(v))
        return t.to(device=like.device, dtype=like.dtype).contiguous().clone()
    a = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
    return np.array(a, dtype=like.dtype, order="C", copy=True)


def cp(tensor, rank: int, init="svd", n_iter_max: int = 100, tol: float = 1e-8,
       l2_reg: float = 0.0, random_state=None, normalize_factors: bool = True) -> CPResult:
    """CP decomposition by alternating least squares (TensorLy's ``parafac``).

    ``init``: ``"svd"`` (leading left singular vectors of each unfolding,
    random columns beyond a mode's size), ``"random"`` (uniform [0, 1)), or a
    starting point: a :class:`CPResult` or ``(weights, factors)``.
    Stops when the relative error changes by less than ``tol`` between two
    sweeps (TensorLy's default ``cvg_criterion="abs_rec_error"``) or after
    ``n_iter_max`` sweeps. ``l2_reg`` adds ``l2_reg·||A_n||²`` to each
    least-squares problem. With ``normalize_factors`` (default) the factor
    columns have unit norm and ``weights`` holds the scale; without it the
    weights are 1 and the scale is spread evenly over the factors.
    Singular normal equations (rank above the tensor's, zero tensor) are
    solved by pseudo-inverse, not reported as singular.
    Cost per sweep: ~2·N·numel·rank flops.
    """
    X, is_torch = _prepare(tensor, "tensor")
    X, back = _cpu_unless_cuda_backend(X)
    if X.ndim < 2:
        raise ValueError(f"tensor: expected at least 2 dims, got {X.ndim}")
    R = _check_int("rank", rank, 1, 2**31 - 1)
    n_iter_max, tol = _iter_args(n_iter_max, tol)
    l2_reg = _check_float("l2_reg", l2_reg)
    mode = _init_mode(init, "CPResult or (weights, factors)")
    shape = _shape(X)
    what = f"CP-ALS of rank {R} of a tensor of shape {shape}"
    nb = _check_results(X, "rank", what, [(s, R) for s in shape] + [(R,)],
                        extra=8 * max(n_iter_max, 1))
    if mode == capi.INIT_GIVEN:
        try:
            w0, f0 = init
            f0 = list(f0)
        except (TypeError, ValueError):
            raise TypeError("init: expected 'svd', 'random', a CPResult or (weights, factors)") from None
        if len(f0) != len(shape):
            raise ValueError(f"init: expected {len(shape)} factors, got {len(f0)}")
        factors = [_as_like(f, X, is_torch, "init") for f in f0]
        for n, f in enumerate(factors):
            if tuple(f.shape) != (shape[n], R):
                raise ValueError(f"init: factor {n} must have shape {(shape[n], R)}, got "
                                 f"{tuple(f.shape)}")
        weights = _as_like(w0, X, is_torch, "init") if w0 is not None else None
        if weights is None:
            weights = _empty(X, (R,), is_torch)
            weights[:] = 1
    else:
        factors = [_empty(X, (s, R), is_torch) for s in shape]
        weights = _empty(X, (R,), is_torch)
    opts = capi.CpOptions(n_iter_max, mode, tol, l2_reg, _seed(random_state),
                          int(bool(normalize_factors)), 0)
    errors = (ctypes.c_double * max(n_iter_max, 1))()
    info = capi.DecompInfo()
    fv = capi.views(factors)
    args = [capi.view(X), len(factors), fv, capi.view(weights), ctypes.byref(opts)]
    capi.call(X, capi.core.fct_cp_als_workspace, capi.core.fct_cp_als, args,
              (errors, ctypes.byref(info)), budget=("rank", what, nb))
    weights, *factors = _to(back, weights, *factors)
    return CPResult(weights, list(factors), float(info.rel_error),
                    [float(e) for e in errors[: info.n_iter]], int(info.n_iter),
                    bool(info.converged))


def _tucker_ranks(rank, shape):
    N = len(shape)
    if rank is None:
        return list(shape)
    if isinstance(rank, (int, np.integer)) and not isinstance(rank, bool):
        r = _check_int("rank", rank, 1)
        return [min(r, s) for s in shape]  # a mode cannot hold more than its size
    if not isinstance(rank, Sequence) or len(rank) != N:
        raise ValueError(f"rank: expected an int or {N} ints (one per dim of tensor), got {rank!r}")
    return [_check_int(f"rank[{n}]", r, 1, shape[n]) for n, r in enumerate(rank)]


def tucker(tensor, rank=None, n_iter_max: int = 100, tol: float = 1e-8, init="svd",
           random_state=None) -> TuckerResult:
    """Tucker decomposition by HOOI (TensorLy's ``tucker``), starting from the
    truncated HOSVD (``init="svd"``), orthonormalised random factors
    (``"random"``), or given factors (a :class:`TuckerResult` or
    ``(core, factors)``; the core is not used).

    ``rank``: one int for every mode (capped at each mode's size), one int
    per mode (each in [1, size]), or None (full sizes). Stops when the
    relative error changes by less than ``tol`` between sweeps or after
    ``n_iter_max`` sweeps (``n_iter_max=0`` returns the HOSVD).
    """
    X, is_torch = _prepare(tensor, "tensor")
    X, back = _cpu_unless_cuda_backend(X)
    if X.ndim < 2:
        raise ValueError(f"tensor: expected at least 2 dims, got {X.ndim}")
    shape = _shape(X)
    if 0 in shape:
        raise ValueError(f"tensor: expected no empty dims, got shape {shape}")
    ranks = _tucker_ranks(rank, shape)
    n_iter_max, tol = _iter_args(n_iter_max, tol)
    what = f"Tucker-HOOI of rank {ranks} of a tensor of shape {shape}"
    nb = _check_results(X, "rank", what, [tuple(ranks)] + [(s, r) for s, r in zip(shape, ranks)],
                        extra=8 * max(n_iter_max, 1))
    mode = _init_mode(init, "TuckerResult or (core, factors)")
    if mode == capi.INIT_GIVEN:
        try:
            _, f0 = init
            f0 = list(f0)
        except (TypeError, ValueError):
            raise TypeError("init: expected 'svd', 'random', a TuckerResult or (core, factors)") from None
        factors = [_as_like(f, X, is_torch, "init") for f in f0]
        if [tuple(f.shape) for f in factors] != [(s, r) for s, r in zip(shape, ranks)]:
            raise ValueError("init: factors must have shapes "
                             f"{[(s, r) for s, r in zip(shape, ranks)]}, got "
                             f"{[tuple(f.shape) for f in factors]}")
    else:
        factors = [_empty(X, (s, r), is_torch) for s, r in zip(shape, ranks)]
    core = _empty(X, ranks, is_torch)
    opts = capi.TuckerOptions(n_iter_max, mode, tol, _seed(random_state))
    errors = (ctypes.c_double * max(n_iter_max, 1))()
    info = capi.DecompInfo()
    fv = capi.views(factors)
    args = [capi.view(X), capi.view(core), len(factors), fv, ctypes.byref(opts)]
    capi.call(X, capi.core.fct_tucker_hooi_workspace, capi.core.fct_tucker_hooi, args,
              (errors, ctypes.byref(info)), budget=("rank", what, nb))
    core, *factors = _to(back, core, *factors)
    return TuckerResult(core, list(factors), float(info.rel_error),
                        [float(e) for e in errors[: info.n_iter]], int(info.n_iter),
                        bool(info.converged))


# ---------------------------------------------------------------------------
# Tensor train
# ---------------------------------------------------------------------------


def _tt_caps(rank, N):
    if rank is None:
        return None
    if isinstance(rank, (int, np.integer)) and not isinstance(rank, bool):
        r = _check_int("rank", rank, 1)
        return [1] + [r] * (N - 1) + [1]
    if not isinstance(rank, Sequence) or len(rank) != N + 1:
        raise ValueError(f"rank: expected an int or {N + 1} ints (TT ranks, first and last 1), "
                         f"got {rank!r}")
    caps = [_check_int(f"rank[{k}]", r, 1) for k, r in enumerate(rank)]
    if caps[0] != 1 or caps[-1] != 1:
        raise ValueError(f"rank: expected the first and last TT ranks to be 1, got {caps[0]} and "
                         f"{caps[-1]}")
    return caps


def _tt(X, is_torch, mode_sizes, caps, eps):
    """TT-SVD of X read as tensor of `mode_sizes`; returns (cores, ranks, err)."""
    N = len(mode_sizes)
    ctx, err = capi.new_context()
    sizes, capsa = capi.i64_array(mode_sizes), capi.i64_array(caps)
    xv = capi.view(X)
    cap = ctypes.c_int64(0)
    rename = {"tensor": "tensor", "rank": "rank", "eps": "eps"}
    capi.check(capi.core.fct_tensor_train_capacity(ctypes.byref(ctx), xv, N, sizes, capsa,
                                                   ctypes.byref(cap)), err, rename)
    what = f"TT-SVD with rank caps {caps} of a tensor of modes {list(mode_sizes)}"
    nb = _check_results(X, "rank", what, [(cap.value,)])
    flat = _empty(X, (cap.value,), is_torch)
    ranks = (ctypes.c_int64 * (N + 1))()
    info = capi.DecompInfo()
    args = [xv, N, sizes, capsa, ctypes.c_double(eps), capi.view(flat)]
    capi.call(X, capi.core.fct_tensor_train_workspace, capi.core.fct_tensor_train, args,
              (ranks, ctypes.byref(info)), rename, budget=("rank", what, nb))
    rk = [int(r) for r in ranks]
    cores, off = [], 0
    for k in range(N):
        size = rk[k] * mode_sizes[k] * rk[k + 1]
        c = flat[off: off + size].reshape(rk[k], mode_sizes[k], rk[k + 1])
        cores.append(c.clone() if is_torch else c.copy())  # do not pin the whole buffer
        off += size
    return cores, tuple(rk), float(info.rel_error)


def _tt_eps(eps):
    return 0.0 if eps is None else _check_float("eps", eps)


def tensor_train(tensor, rank=None, eps: float | None = None) -> TTResult:
    """Tensor-train decomposition by TT-SVD (TensorLy's ``tensor_train``).

    ``rank``: a cap on every TT rank (int), the N + 1 ranks (first and last
    1), or None. ``eps``: relative error bound; each rank is the smallest
    with ``||tensor − TT|| <= eps·||tensor||`` (Oseledets' δ = eps/√(N−1)
    per step), then capped by ``rank``. Neither given: the exact TT (only
    numerically zero singular values dropped). ``rel_error`` is exact.
    """
    X, is_torch = _prepare(tensor, "tensor")
    X, back = _cpu_unless_cuda_backend(X)
    shape = _shape(X)
    if X.ndim < 1:
        raise ValueError("tensor: expected at least 1 dim, got 0")
    if 0 in shape:
        raise ValueError(f"tensor: expected no empty dims, got shape {shape}")
    caps = _tt_caps(rank, len(shape))
    e = _tt_eps(eps)
    if X.ndim > 8:  # the C side reads any number of modes through mode_sizes
        X = X.reshape(-1)
    cores, rk, err = _tt(X, is_torch, list(shape), caps, e)
    return TTResult(list(_to(back, *cores)), rk, err)


def tensor_train_matrix(tensor, rank=None, eps: float | None = None) -> TTMatrixResult:
    """TT-matrix decomposition (TensorLy's ``tensor_train_matrix``) of a
    tensor of shape (I_0, ..., I_{d-1}, J_0, ..., J_{d-1}): the TT-SVD of the
    tensor with modes (I_k, J_k) merged, cores [r_k, I_k, J_k, r_{k+1}].
    ``rank`` and ``eps`` as in :func:`tensor_train` (d + 1 ranks).
    The permutation is a strided view, packed once by the C side.
    """
    X, is_torch = _prepare(tensor, "tensor")
    X, back = _cpu_unless_cuda_backend(X)
    shape = _shape(X)
    if X.ndim < 2 or X.ndim % 2:
        raise ValueError(f"tensor: expected an even number of dims (I_0..I_d-1, J_0..J_d-1), got "
                         f"{X.ndim}")
    if 0 in shape:
        raise ValueError(f"tensor: expected no empty dims, got shape {shape}")
    d = X.ndim // 2
    caps = _tt_caps(rank, d)
    e = _tt_eps(eps)
    order = [i for k in range(d) for i in (k, d + k)]
    Xp = _xp_permute(X, order)
    if Xp.ndim > 8:
        Xp = Xp.reshape(-1)
    sizes = [shape[k] * shape[d + k] for k in range(d)]
    cores, rk, err = _tt(Xp, is_torch, sizes, caps, e)
    cores = [c.reshape(rk[k], shape[k], shape[d + k], rk[k + 1]) for k, c in enumerate(cores)]
    return TTMatrixResult(list(_to(back, *cores)), rk, err)
