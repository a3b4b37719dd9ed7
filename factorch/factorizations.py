"""The factorizations a factorch layer keeps a weight matrix ``W [out, in]``
in: one class per factorization, looked up by name in one registry.

Every class answers the same questions, so the layers (factorch.nn) and the
whole-model compression (factorch.compression) treat them alike:

- parameter layout: ``shapes()`` of the factors, all back to back in ONE
  flat parameter (each row-major) in the order the C op reads them, and
  ``views(flat)``; ``num_parameters``;
- ``init_(flat)``: random factors whose W has nn.Linear's weight variance;
- ``from_dense(W, rank=|ratio=|energy=, whitening=)``: the factorization of
  a trained weight (factorch's C decompositions, float64), plain or, where
  ``activation_aware``, on the whitened weight ``W · T`` (SVD-LLM, ASVD;
  factorch/_activation.py);
- ``to_dense(flat)``: W back (for conversion and tests; no forward forms it);
- ``linear(x, flat, bias)``: ``x · Wᵀ + bias`` through the factorization's
  fused C op;
- ``flops(batch)``: 2 × multiply-adds of that forward.

Layouts (W[(o_1..o_q), (i_1..i_p)] tensorized with in = ∏ i_k, out = ∏ o_k):

- ``lowrank``: ``V [r, in]`` then ``U [out, r]`` (W = U · V; V first, as it
  is applied first: the same order as a low-rank convolution's stages).
- ``cp``: ``A_k [i_k, R]`` for the input modes, then ``B_k [o_k, R]``.
- ``tucker``: the core ``[s_1..s_q, t_1..t_p]``, then ``V_k [i_k, t_k]``,
  then ``U_k [o_k, s_k]``.
- ``tt``: the cores ``G_k [r_(k-1), i_k, o_k, r_k]``, r_0 = r_d = 1.
"""

from __future__ import annotations

import ctypes
import math

import torch
from torch import Tensor

from . import _lib
from ._dlpack_abi import DLDataType as _DLDataType
from ._dlpack_abi import DLDevice as _DLDevice
from . import decompose as D
from . import functional as F
from ._rank import check_one_rank_rule, check_rank, select_rank
from ._tensorized import check_tensorized_shape, grow_ranks, is_int, tucker_rank_list

#: name -> class, in the order the docs list them.
REGISTRY: dict[str, type["Factorization"]] = {}


def register(cls: type["Factorization"]) -> type["Factorization"]:
    """Adds a Factorization subclass under ``cls.name``."""
    REGISTRY[cls.name] = cls
    return cls


def get(name: str, allowed=None) -> type["Factorization"]:
    """The class registered as ``name``; ValueError naming the argument
    otherwise (``allowed``: the names a caller supports, default all)."""
    names = list(REGISTRY) if allowed is None else list(allowed)
    if name not in names:
        raise ValueError(f"factorization: expected one of {names}, got {name!r}")
    return REGISTRY[name]


def _check_fraction(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
        raise ValueError(f"{name}: expected a fraction in (0, 1], got {v!r}")
    return float(v)


def _finite(W: Tensor) -> None:
    if not torch.isfinite(W).all():
        raise ValueError("weight: expected finite values, found NaN or Inf")


class Factorization:
    """A layout of ``W [out, in]`` in factors (see the module docstring).

    An instance is a frozen description (features, ranks, modes); the values
    live in the layer's flat parameter, passed to each method."""

    name: str = ""
    #: from_dense takes a ``whitening`` (activation-aware methods).
    activation_aware: bool = False
    in_features: int
    out_features: int
    rank: object

    # ---- layout --------------------------------------------------------------
    def shapes(self) -> list[tuple]:
        raise NotImplementedError

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(s) for s in self.shapes())

    def views(self, flat: Tensor) -> list[Tensor]:
        """The factors as views of the flat parameter (no copies)."""
        out, off = [], 0
        for shape in self.shapes():
            n = math.prod(shape)
            out.append(flat[off:off + n].view(shape))
            off += n
        return out

    @property
    def tensorized_shape(self):
        """((i_1..i_p), (o_1..o_q)), or None for an untensorized matrix."""
        return None

    # ---- values ----------------------------------------------------------------
    def init_(self, flat: Tensor) -> None:
        raise NotImplementedError

    def to_dense(self, flat: Tensor) -> Tensor:
        raise NotImplementedError

    def linear(self, x: Tensor, flat: Tensor, bias: Tensor | None) -> Tensor:
        raise NotImplementedError

    def flops(self, batch: int = 1, device="cpu", dtype=torch.float32) -> int:
        raise NotImplementedError

    # ---- building ----------------------------------------------------------------
    @classmethod
    def create(cls, in_features: int, out_features: int, rank, tensorized_shape=None):
        """From a layer constructor's arguments (a rank as an int, a tuple, a
        fraction of the dense parameter count or "same")."""
        raise NotImplementedError

    @classmethod
    def from_dense(cls, W: Tensor, rank=None, ratio=None, energy=None, tensorized_shape=None,
                   whitening=None):
        """Factorizes ``W [out, in]``. Exactly one of rank / ratio / energy.
        Returns ``(layout, flat, rel_error)``: flat in W's dtype and device,
        rel_error the relative Frobenius error of W."""
        raise NotImplementedError

    def __eq__(self, other) -> bool:
        return (type(self) is type(other) and self.in_features == other.in_features
                and self.out_features == other.out_features and self.rank == other.rank
                and self.tensorized_shape == other.tensorized_shape)

    def __hash__(self) -> int:
        return hash((self.name, self.in_features, self.out_features, str(self.rank)))

    def __repr__(self) -> str:
        shape = "" if self.tensorized_shape is None else f", {self.tensorized_shape}"
        return f"{type(self).__name__}({self.in_features}, {self.out_features}, rank={self.rank}{shape})"


# --------------------------------------------------------------------------
# Low rank
# --------------------------------------------------------------------------
@register
class LowRank(Factorization):
    """``W = U · V``, ``U [out, r]``, ``V [r, in]``; one fused C op per
    direction on the flat parameter (torch.ops.factorch.lowrank_linear_flat,
    whose backward writes both factors' gradients into one flat tensor)."""

    name = "lowrank"
    activation_aware = True

    def __init__(self, in_features: int, out_features: int, rank: int):
        self.in_features, self.out_features = in_features, out_features
        self.rank = check_rank(rank, in_features, out_features)

    @classmethod
    def create(cls, in_features, out_features, rank, tensorized_shape=None):
        if tensorized_shape is not None:
            raise ValueError("tensorized_shape: only for factorization='cp', 'tucker' or 'tt'; a "
                             "lowrank layer factors the [out, in] matrix as it is")
        return cls(in_features, out_features, check_rank(rank, in_features, out_features))

    def shapes(self):
        return [(self.rank, self.in_features), (self.out_features, self.rank)]

    def split(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        """(U [out, r], V [r, in]), views of the flat parameter."""
        V, U = self.views(flat)
        return U, V

    @staticmethod
    def pack(U: Tensor, V: Tensor) -> Tensor:
        """The flat parameter holding U [out, r] and V [r, in]."""
        return torch.cat([V.reshape(-1), U.reshape(-1)])

    def init_(self, flat):
        # V: variance 1/in keeps t = x·Vᵀ at the scale of x; U: variance
        # 1/(3r) then gives W = U·V nn.Linear's variance 1/(3·in).
        U, V = self.split(flat)
        with torch.no_grad():
            b = math.sqrt(3.0 / self.in_features)
            V.uniform_(-b, b)
            b = 1.0 / math.sqrt(self.rank)
            U.uniform_(-b, b)

    def to_dense(self, flat):
        U, V = self.split(flat)
        return U @ V

    def linear(self, x, flat, bias):
        return F.lowrank_linear_flat(x, flat, bias, self.out_features, self.rank)

    def flops(self, batch=1, device="cpu", dtype=torch.float32):
        return 2 * batch * self.rank * (self.in_features + self.out_features)

    @classmethod
    def from_dense(cls, W, rank=None, ratio=None, energy=None, tensorized_shape=None,
                   whitening=None):
        """Truncated SVD of W, or of ``W · T`` mapped back when a whitening T
        is given (the Eckart–Young optimum of the output error; energy is
        then measured on the whitened spectrum). The singular values are
        split evenly: U = P·√S, V = √S·Qᵀ·T⁻¹."""
        from . import _activation as A
        from ._rank import truncated_svd_factors

        if tensorized_shape is not None:
            raise ValueError("tensorized_shape: only for factorization='cp', 'tucker' or 'tt'")
        if W.dim() != 2:
            raise ValueError(f"weight: expected 2 dims [out, in], got {W.dim()}")
        out_f, in_f = W.shape
        if whitening is None:
            U, V, err = truncated_svd_factors(W, rank=rank, ratio=ratio, energy=energy)
        else:
            check_one_rank_rule(rank, ratio, energy)
            _finite(W)
            W64 = W.detach().double()
            spec = A.spectrum(W64, whitening)
            r = select_rank(W, rank, ratio, energy, singular_values=spec.S)
            U, V = spec.factors(r)
            den = torch.linalg.matrix_norm(W64).clamp_min(1e-300)
            err = float(torch.linalg.matrix_norm(W64 - U @ V) / den)
            U, V = U.to(W.dtype), V.to(W.dtype)
        return cls(in_f, out_f, U.shape[1]), cls.pack(U, V).to(W.device), err

    @classmethod
    def from_factors(cls, U: Tensor, V: Tensor):
        """(layout, flat) for given factors U [out, r], V [r, in]."""
        if U.dim() != 2 or V.dim() != 2 or U.shape[1] != V.shape[0]:
            raise ValueError(f"U, V: expected [out, r] and [r, in], got {list(U.shape)} and "
                             f"{list(V.shape)}")
        return cls(V.shape[1], U.shape[0], U.shape[1]), cls.pack(U, V)

    @staticmethod
    def upgrade_state_dict(state_dict: dict, prefix: str) -> None:
        """Turns separate ``U`` / ``V`` entries (how low-rank layers were
        stored before every layer type kept one flat ``factors``) into the
        flat one, in place."""
        u, v = prefix + "U", prefix + "V"
        if u in state_dict and v in state_dict and prefix + "factors" not in state_dict:
            state_dict[prefix + "factors"] = LowRank.pack(state_dict.pop(u), state_dict.pop(v))


# --------------------------------------------------------------------------
# Tensorized: CP, Tucker, Tensor-Train
# --------------------------------------------------------------------------
class _PlanInfo(ctypes.Structure):
    _fields_ = [
        ("forward_flops", ctypes.c_double),
        ("backward_flops", ctypes.c_double),
        ("forward_workspace", ctypes.c_size_t),
        ("backward_workspace", ctypes.c_size_t),
        ("plan", ctypes.c_char * 256),
        ("forward_strategy", ctypes.c_char * 16),
        ("backward_strategy", ctypes.c_char * 16),
    ]

    def as_dict(self) -> dict:
        """The report as ``plan()`` returns it."""
        return {
            "forward_flops": int(self.forward_flops),
            "backward_flops": int(self.backward_flops),
            "forward_workspace": int(self.forward_workspace),
            "backward_workspace": int(self.backward_workspace),
            "plan": self.plan.decode(),
            "forward_strategy": self.forward_strategy.decode(),
            "backward_strategy": self.backward_strategy.decode(),
        }


def _ints(values):
    return (ctypes.c_int64 * len(values))(*values)


_DTYPES = {torch.float32: (2, 32), torch.float64: (2, 64), torch.float16: (2, 16),
           torch.bfloat16: (4, 16)}


def _parse_rank(rank):
    """"same" -> 1.0; None and bools refused; fractions checked."""
    if isinstance(rank, str):
        if rank != "same":
            raise ValueError(f"rank: expected an int, a tuple, a fraction in (0, 1] or 'same', "
                             f"got {rank!r}")
        return 1.0
    if isinstance(rank, bool) or rank is None:
        raise ValueError(f"rank: expected an int, a tuple, a fraction in (0, 1] or 'same', "
                         f"got {rank!r}")
    if isinstance(rank, float) and not 0 < rank <= 1:
        raise ValueError(f"rank: expected a fraction in (0, 1] of the dense parameters, "
                         f"got {rank!r}")
    return rank


class Tensorized(Factorization):
    """W tensorized as W[(o_1..o_q), (i_1..i_p)]; one fused C op per
    direction that contracts x with the factors in the order its cost model
    picks for the batch size (``plan``)."""

    #: Input and output mode counts must agree (TT).
    same_length = False

    def __init__(self, in_modes, out_modes, rank):
        self.in_modes, self.out_modes = tuple(in_modes), tuple(out_modes)
        self.in_features = math.prod(self.in_modes)
        self.out_features = math.prod(self.out_modes)
        self.rank = self.resolve_rank(rank, self.in_modes, self.out_modes)

    @property
    def tensorized_shape(self):
        return (self.in_modes, self.out_modes)

    @classmethod
    def create(cls, in_features, out_features, rank, tensorized_shape=None):
        ins, outs = check_tensorized_shape(tensorized_shape, in_features, out_features,
                                           same_length=cls.same_length)
        return cls(ins, outs, rank)

    @classmethod
    def resolve_rank(cls, rank, ins, outs):
        """The factorization's ranks from an int, a tuple, a fraction of the
        dense parameter count in (0, 1], or "same" (= 1.0)."""
        raise NotImplementedError

    def op_args(self) -> tuple:
        """The int arguments of the op after (x, weights, bias)."""
        raise NotImplementedError

    def _op(self):
        raise NotImplementedError

    def _plan_call(self, batch, dev, dt, info):
        raise NotImplementedError

    def linear(self, x, flat, bias):
        return self._op()(x, flat, bias, *self.op_args())

    def plan(self, batch: int = 1, device="cpu", dtype=torch.float32) -> dict:
        """What the C kernels would do for a batch of ``batch`` rows: FLOPs of
        the forward and backward, workspace bytes, the contraction order, and
        the strategy per direction ("contract": the chain of x with the
        factors; "form_w": W formed in row blocks, then dense GEMMs)."""
        dev = _DLDevice(2 if torch.device(device).type == "cuda" else 1, 0)
        code, bits = _DTYPES.get(dtype, (2, 32))
        info = _PlanInfo()
        st = self._plan_call(ctypes.c_int64(batch), dev, _DLDataType(code, bits, 1),
                             ctypes.byref(info))
        if st != 0:
            raise ValueError("plan: the C cost model refused the layout "
                             f"({_lib.core.fct_status_string(st).decode()})")
        return info.as_dict()

    def flops(self, batch=1, device="cpu", dtype=torch.float32):
        return self.plan(batch, device, dtype)["forward_flops"]

    def _init_variances(self) -> list[float]:
        raise NotImplementedError

    def init_(self, flat):
        """Every entry uniform U(-a, a), a = √(3σ²), drawn independently with
        zero mean, so entries of W are uncorrelated and Var(W_oi) is a product
        of the factors' variances σ² (``_init_variances``), chosen to give
        nn.Linear's 1 / (3·in) (it draws W from U(-1/√in, 1/√in))."""
        with torch.no_grad():
            for v, var in zip(self.views(flat), self._init_variances()):
                a = math.sqrt(3.0 * var)
                v.uniform_(-a, a)

    @classmethod
    def _decompose(cls, W64, ins, outs, rank, energy):
        """(ranks, factor pieces in flat order, rel_error) for W64 [out, in]."""
        raise NotImplementedError

    @classmethod
    def from_dense(cls, W, rank=None, ratio=None, energy=None, tensorized_shape=None,
                   whitening=None):
        if whitening is not None:
            raise ValueError(f"factorization={cls.name!r}: activation-aware methods build "
                             "low-rank factors only; use method='svd' (the weight alone)")
        check_one_rank_rule(rank, ratio, energy)
        if energy is not None and cls.name != "tt":
            raise ValueError(f"energy: not defined for factorization={cls.name!r}; give rank "
                             "or ratio")
        if ratio is not None:
            ratio = _check_fraction("ratio", ratio)
        if energy is not None:
            energy = _check_fraction("energy", energy)
        if W.dim() != 2:
            raise ValueError(f"weight: expected 2 dims [out, in], got {W.dim()}")
        _finite(W)
        out_f, in_f = W.shape
        ins, outs = check_tensorized_shape(tensorized_shape, in_f, out_f,
                                           same_length=cls.same_length)
        ranks, pieces, err = cls._decompose(W.detach().double(), ins, outs,
                                            ratio if ratio is not None else rank, energy)
        layout = cls(ins, outs, ranks)
        flat = torch.cat([torch.as_tensor(p).reshape(-1) for p in pieces])
        return layout, flat.to(W.dtype).to(W.device), err


@register
class CP(Tensorized):
    """CP of rank R: W = Σ_r ⊗_k B_k[:, r] ⊗_k A_k[:, r]."""

    name = "cp"

    @classmethod
    def resolve_rank(cls, rank, ins, outs):
        rank = _parse_rank(rank)
        dense = math.prod(ins) * math.prod(outs)
        if isinstance(rank, float):
            return max(1, int(rank * dense // (sum(ins) + sum(outs))))
        if not is_int(rank):
            raise ValueError(f"rank: a CP layer takes one rank (an int or a fraction), got {rank!r}")
        if not 1 <= rank <= dense:
            raise ValueError(f"rank: expected 1 <= rank <= in_features·out_features = {dense}, "
                             f"got {rank}")
        return rank

    def shapes(self):
        R = self.rank
        return [(i, R) for i in self.in_modes] + [(o, R) for o in self.out_modes]

    def op_args(self):
        return list(self.in_modes), list(self.out_modes), int(self.rank)

    def _op(self):
        return F.cp_linear_flat

    def _plan_call(self, batch, dev, dt, info):
        ins, outs = self.in_modes, self.out_modes
        return _lib.core.fct_cp_linear_plan(len(ins), _ints(ins), len(outs), _ints(outs),
                                            ctypes.c_int64(self.rank), batch, dev, dt, info)

    def _init_variances(self):
        # W = Σ_r ∏_k (p + q factors) -> Var W = R·σ^(2(p+q)).
        n = len(self.in_modes) + len(self.out_modes)
        return [(1.0 / (3.0 * self.in_features * self.rank)) ** (1.0 / n)] * n

    def to_dense(self, flat):
        vs = self.views(flat)
        p = len(self.in_modes)

        def khatri_rao(fs):
            out = fs[0]
            for f in fs[1:]:
                out = (out[:, None, :] * f[None, :, :]).reshape(-1, f.shape[1])
            return out

        return khatri_rao(vs[p:]) @ khatri_rao(vs[:p]).T

    @classmethod
    def _decompose(cls, W64, ins, outs, rank, energy):
        R = cls.resolve_rank(rank, ins, outs)
        # ALS crawls through flat stretches ("swamps"): a planted rank-6
        # weight needed ~800 sweeps (8 ms) to reach 0 error; 100 left 10%.
        res = D.cp(W64.reshape(*outs, *ins), int(R), n_iter_max=1000, tol=1e-12,
                   normalize_factors=False)
        q = len(outs)
        return R, list(res.factors[q:]) + list(res.factors[:q]), float(res.rel_error)


@register
class Tucker(Tensorized):
    """Tucker: a core [s_1..s_q, t_1..t_p] and a factor per mode."""

    name = "tucker"

    @classmethod
    def resolve_rank(cls, rank, ins, outs):
        rank = _parse_rank(rank)
        caps = list(ins) + list(outs)
        p = len(ins)
        if isinstance(rank, float):
            budget = rank * math.prod(ins) * math.prod(outs)

            def count(r):
                return cls(ins, outs, (tuple(r[:p]), tuple(r[p:]))).num_parameters

            r = grow_ranks([1] * len(caps), caps, count, budget, relative=True)
        elif is_int(rank):
            if rank < 1:
                raise ValueError(f"rank: expected a positive rank, got {rank}")
            r = [min(rank, c) for c in caps]
        else:
            r = tucker_rank_list(rank, ins, outs)
        return tuple(r[:p]), tuple(r[p:])

    def shapes(self):
        t, s = self.rank
        return ([(*s, *t)] + [(i, r) for i, r in zip(self.in_modes, t)]
                + [(o, r) for o, r in zip(self.out_modes, s)])

    def op_args(self):
        return list(self.in_modes), list(self.out_modes), list(self.rank[0]), list(self.rank[1])

    def _op(self):
        return F.tucker_linear_flat

    def linear(self, x, flat, bias, keep_states: bool = True):
        return F.tucker_linear_flat(x, flat, bias, *self.op_args(), keep_states)

    def _plan_call(self, batch, dev, dt, info):
        ins, outs = self.in_modes, self.out_modes
        t, s = self.rank
        return _lib.core.fct_tucker_linear_plan(len(ins), _ints(ins), _ints(t), len(outs),
                                                _ints(outs), _ints(s), batch, dev, dt, info)

    def _init_variances(self):
        # V_k with variance 1/i_k (x keeps its scale through each projection),
        # U_k with 1/s_k, the core with 1/(3T):
        # Var W = S·T · 1/(3T) · ∏ 1/i_k · ∏ 1/s_k = 1/(3·in).
        t, s = self.rank
        return ([1.0 / (3.0 * math.prod(t))] + [1.0 / i for i in self.in_modes]
                + [1.0 / r for r in s])

    def to_dense(self, flat):
        vs = self.views(flat)
        p = len(self.in_modes)
        core, V, U = vs[0], vs[1:1 + p], vs[1 + p:]
        t, s = self.rank

        def kron(ms):
            out = ms[0]
            for m in ms[1:]:
                out = torch.kron(out, m)
            return out

        return kron(U) @ core.reshape(math.prod(s), math.prod(t)) @ kron(V).T

    @classmethod
    def _decompose(cls, W64, ins, outs, rank, energy):
        t, s = cls.resolve_rank(rank, ins, outs)  # input and output ranks
        res = D.tucker(W64.reshape(*outs, *ins), rank=[*s, *t])
        q = len(outs)
        pieces = [res.core] + list(res.factors[q:]) + list(res.factors[:q])
        return (t, s), pieces, float(res.rel_error)


def tt_max_ranks(ins, outs) -> list[int]:
    """Largest meaningful inner TT ranks: r_k <= min(∏_{j<=k} i_j·o_j,
    ∏_{j>k} i_j·o_j), the ranks of W's unfoldings."""
    sizes = [i * o for i, o in zip(ins, outs)]
    return [min(math.prod(sizes[:k + 1]), math.prod(sizes[k + 1:])) for k in range(len(sizes) - 1)]


@register
class TensorTrain(Tensorized):
    """Tensor-Train (TT-matrix): cores G_k [r_(k-1), i_k, o_k, r_k]."""

    name = "tt"
    same_length = True

    @classmethod
    def resolve_rank(cls, rank, ins, outs):
        # The ranks are the cores' bond sizes. A rank above tt_max_ranks (the
        # rank of W's unfolding at that bond) is allowed but redundant: it
        # adds parameters and FLOPs, not expressiveness.
        rank = _parse_rank(rank)
        d = len(ins)
        if isinstance(rank, float):
            budget = rank * math.prod(ins) * math.prod(outs)

            def count(r):
                return cls(ins, outs, (1, *r, 1)).num_parameters

            # The largest uniform rank within the budget, as TensorLy/tltorch
            # choose it (so the same fraction gives the same layer), then
            # single steps on the smallest ranks while the budget allows.
            lo, hi = 1, max(1, int(budget))
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if count([mid] * (d - 1)) <= budget:
                    lo = mid
                else:
                    hi = mid - 1
            big = [lo + 1] * (d - 1)
            inner = grow_ranks([lo] * (d - 1), big, count, budget, relative=False) if d > 1 else []
        elif is_int(rank):
            if rank < 1:
                raise ValueError(f"rank: expected a positive rank, got {rank}")
            inner = [rank] * (d - 1)
        else:
            try:
                r = list(rank)
            except TypeError:
                raise ValueError("rank: expected an int, a tuple, a fraction in (0, 1] or "
                                 f"'same', got {rank!r}") from None
            if len(r) == d + 1:
                if r[0] != 1 or r[-1] != 1:
                    raise ValueError(f"rank: the d + 1 = {d + 1} TT ranks must start and end "
                                     f"with 1, got {tuple(r)}")
                r = r[1:-1]
            if len(r) != d - 1 or not all(is_int(v) for v in r):
                raise ValueError(f"rank: expected {d - 1} inner TT ranks (or {d + 1} with the "
                                 f"1s at the ends), got {tuple(rank)}")
            for k, v in enumerate(r):
                if v < 1:
                    raise ValueError(f"rank: TT rank r_{k + 1} = {v} is impossible: ranks "
                                     "must be >= 1")
            inner = r
        return (1, *inner, 1)

    def shapes(self):
        r = self.rank
        return [(r[k], i, o, r[k + 1]) for k, (i, o) in enumerate(zip(self.in_modes,
                                                                      self.out_modes))]

    def op_args(self):
        return list(self.in_modes), list(self.out_modes), list(self.rank)

    def _op(self):
        return F.tt_linear_flat

    def _plan_call(self, batch, dev, dt, info):
        ins, outs = self.in_modes, self.out_modes
        return _lib.core.fct_tt_linear_plan(len(ins), _ints(ins), _ints(outs), _ints(self.rank),
                                            batch, dev, dt, info)

    def _init_variances(self):
        # Var W = ∏_{k=1}^{d-1} r_k · ∏_k σ_k²; core k gets
        # σ_k² = 3^(-1/d) / (i_k·r_(k-1)) (its fan-in in the sweep), whose
        # product is 1 / (3·in·∏_{k=1}^{d-1} r_k).
        d, r = len(self.in_modes), self.rank
        return [3.0 ** (-1.0 / d) / (self.in_modes[k] * r[k]) for k in range(d)]

    def to_dense(self, flat):
        vs = self.views(flat)
        P = vs[0].reshape(vs[0].shape[1], vs[0].shape[2], vs[0].shape[3])  # [I, O, r]
        for G in vs[1:]:
            P = torch.einsum("IOr,riop->IiOop", P, G)
            P = P.reshape(P.shape[0] * P.shape[1], P.shape[2] * P.shape[3], P.shape[4])
        return P[..., 0].T

    @classmethod
    def _decompose(cls, W64, ins, outs, rank, energy):
        T = W64.T.reshape(*ins, *outs)
        if energy is not None:  # the ranks come out of TT-SVD
            res = D.tensor_train_matrix(T, eps=math.sqrt(1.0 - energy))
        else:
            res = D.tensor_train_matrix(T, rank=list(cls.resolve_rank(rank, ins, outs)))
        # TT-SVD may stop below a cap (the unfolding's rank).
        ranks = tuple(int(c.shape[0]) for c in res.factors) + (1,)
        return ranks, list(res.factors), float(res.rel_error)


__all__ = ["Factorization", "LowRank", "CP", "Tucker", "TensorTrain", "Tensorized", "REGISTRY",
           "register", "get", "tt_max_ranks"]
