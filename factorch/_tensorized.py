"""Shapes, ranks, parameter layouts, initialisation and reconstruction of the
tensorized (CP, Tucker, Tensor-Train) linear layers.

A layer's weight W [out, in] is tensorized as W[(o_1..o_d), (i_1..i_d)] with
in = ∏ i_k and out = ∏ o_k (multi-indices row-major). All the factors or
cores of a layer live back to back in ONE flat parameter (each row-major),
in the order the C ops read them (torch_glue/*_linear_glue.c):

- CP: A_k [i_k, R] for the input modes, then B_k [o_k, R] for the output modes.
- Tucker: the core [s_1..s_q, t_1..t_p], then V_k [i_k, t_k], then U_k [o_k, s_k].
- TT: the cores G_k [r_(k-1), i_k, o_k, r_k], r_0 = r_d = 1.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from . import _lib

FACTORIZATIONS = ("cp", "tucker", "tt")
MAX_MODES = 8  # FCT_MAX_MODES in ops/include/factorch.h


# --------------------------------------------------------------------------
# Tensorized shapes
# --------------------------------------------------------------------------
def _prime_factors(n: int) -> list[int]:
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return out


def balanced_modes(n: int, d: int) -> tuple[int, ...]:
    """n as d factors as equal as possible, largest first: the prime factors,
    largest first, each multiplied into the currently smallest mode (modes
    of 1 fill in when n has fewer than d prime factors)."""
    modes = [1] * d
    for p in sorted(_prime_factors(n), reverse=True):
        i = min(range(d), key=lambda k: modes[k])
        modes[i] *= p
    return tuple(sorted(modes, reverse=True))


def auto_tensorized_shape(in_features: int, out_features: int) -> tuple[tuple, tuple]:
    """The same number of modes d for both sides: the smallest d in 2..6
    whose balanced modes are all <= 8 on both sides (4096 -> (8, 8, 8, 8)),
    else the d giving the smallest largest mode. Modes around 8 keep every
    factor small while the number of modes (and so of contraction steps)
    stays low."""
    best = None
    for d in range(2, 7):
        i, o = balanced_modes(in_features, d), balanced_modes(out_features, d)
        largest = max(i[0], o[0])
        if largest <= 8:
            return i, o
        if best is None or largest < best[0]:
            best = (largest, i, o)
    return best[1], best[2]


def check_tensorized_shape(tensorized_shape, in_features: int, out_features: int,
                           same_length: bool) -> tuple[tuple, tuple]:
    """Validates ((i_1..i_p), (o_1..o_q)) against the feature counts."""
    if tensorized_shape is None:
        return auto_tensorized_shape(in_features, out_features)
    try:
        ins, outs = (tuple(s) for s in tensorized_shape)
    except (TypeError, ValueError):
        raise ValueError(
            "tensorized_shape: expected ((i_1, .., i_d), (o_1, .., o_d)), "
            f"got {tensorized_shape!r}"
        ) from None
    for side, modes, total in (("input", ins, in_features), ("output", outs, out_features)):
        if not 1 <= len(modes) <= MAX_MODES or not all(
            isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in modes
        ):
            raise ValueError(
                f"tensorized_shape: expected 1 to {MAX_MODES} positive int {side} modes, "
                f"got {modes!r}"
            )
        if math.prod(modes) != total:
            name = "in_features" if side == "input" else "out_features"
            raise ValueError(
                f"tensorized_shape: the {side} modes {modes} multiply to {math.prod(modes)}, "
                f"expected {name} = {total}"
            )
    if same_length and len(ins) != len(outs):
        raise ValueError(
            "tensorized_shape: a Tensor-Train needs as many input as output modes, got "
            f"{len(ins)} and {len(outs)}"
        )
    return ins, outs


# --------------------------------------------------------------------------
# Ranks
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """A layer's factorization: modes, ranks and where each factor sits in the
    flat parameter."""

    factorization: str
    in_modes: tuple
    out_modes: tuple
    rank: object  # cp: int; tucker: (in_ranks, out_ranks); tt: (r_0, .., r_d)

    @property
    def in_features(self) -> int:
        return math.prod(self.in_modes)

    @property
    def out_features(self) -> int:
        return math.prod(self.out_modes)

    def shapes(self) -> list[tuple]:
        """Shapes of the factors or cores, in the flat parameter's order."""
        if self.factorization == "cp":
            R = self.rank
            return [(i, R) for i in self.in_modes] + [(o, R) for o in self.out_modes]
        if self.factorization == "tucker":
            t, s = self.rank
            return ([(*s, *t)] + [(i, r) for i, r in zip(self.in_modes, t)]
                    + [(o, r) for o, r in zip(self.out_modes, s)])
        r = self.rank
        return [(r[k], i, o, r[k + 1]) for k, (i, o) in enumerate(zip(self.in_modes, self.out_modes))]

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(s) for s in self.shapes())

    def op_args(self) -> tuple:
        """The int arguments of the op after (x, weights, bias)."""
        ins, outs = list(self.in_modes), list(self.out_modes)
        if self.factorization == "cp":
            return ins, outs, int(self.rank)
        if self.factorization == "tucker":
            return ins, outs, list(self.rank[0]), list(self.rank[1])
        return ins, outs, list(self.rank)


def _param_count(fact, ins, outs, rank) -> int:
    return Layout(fact, ins, outs, rank).num_parameters


def tt_max_ranks(ins, outs) -> list[int]:
    """Largest meaningful inner TT ranks: r_k <= min(∏_{j<=k} i_j·o_j,
    ∏_{j>k} i_j·o_j), the ranks of W's unfoldings."""
    sizes = [i * o for i, o in zip(ins, outs)]
    return [min(math.prod(sizes[: k + 1]), math.prod(sizes[k + 1 :])) for k in range(len(sizes) - 1)]


def _grow(ranks: list[int], caps: list[int], count, budget: int, relative: bool) -> list[int]:
    """Raise the ranks one step at a time, always the smallest one (relative
    to its cap when `relative`: Tucker ranks relative to their mode sizes)
    that can still grow, while the parameter count stays within budget: a
    balanced choice close to the budget from below."""
    ranks = list(ranks)
    while True:
        order = sorted((r / c if relative else r, k) for k, (r, c) in enumerate(zip(ranks, caps))
                       if r < c)
        # Only the smallest may grow: when none of them fits, stop rather
        # than grow a larger one (which would unbalance the ranks).
        order = [(key, k) for key, k in order if key == order[0][0]]
        for _, k in order:
            ranks[k] += 1
            if count(ranks) <= budget:
                break
            ranks[k] -= 1
        else:
            return ranks


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def resolve_rank(factorization: str, rank, ins: tuple, outs: tuple):
    """rank as an int, a tuple, a float fraction of the dense parameter count
    in (0, 1], or "same" (= 1.0), turned into the factorization's ranks."""
    dense = math.prod(ins) * math.prod(outs)
    if isinstance(rank, str):
        if rank != "same":
            raise ValueError(f"rank: expected an int, a tuple, a fraction in (0, 1] or 'same', got {rank!r}")
        rank = 1.0
    if isinstance(rank, bool) or rank is None:
        raise ValueError(f"rank: expected an int, a tuple, a fraction in (0, 1] or 'same', got {rank!r}")
    if isinstance(rank, float) and not 0 < rank <= 1:
        raise ValueError(f"rank: expected a fraction in (0, 1] of the dense parameters, got {rank!r}")
    budget = rank * dense if isinstance(rank, float) else None

    if factorization == "cp":
        if budget is not None:
            return max(1, int(budget // (sum(ins) + sum(outs))))
        if not _is_int(rank):
            raise ValueError(f"rank: a CP layer takes one rank (an int or a fraction), got {rank!r}")
        if not 1 <= rank <= dense:
            raise ValueError(f"rank: expected 1 <= rank <= in_features·out_features = {dense}, got {rank}")
        return rank

    if factorization == "tucker":
        caps = list(ins) + list(outs)
        p = len(ins)
        if budget is not None:
            def count(r):
                return _param_count("tucker", ins, outs, (tuple(r[:p]), tuple(r[p:])))
            r = _grow([1] * len(caps), caps, count, budget, relative=True)
        elif _is_int(rank):
            if rank < 1:
                raise ValueError(f"rank: expected a positive rank, got {rank}")
            r = [min(rank, c) for c in caps]
        else:
            r = _tucker_tuple(rank, ins, outs)
        return tuple(r[:p]), tuple(r[p:])

    # tt: the ranks are the cores' bond sizes. A rank above tt_max_ranks
    # (the rank of W's unfolding at that bond) is allowed but redundant: it
    # adds parameters and FLOPs, not expressiveness.
    d = len(ins)
    if budget is not None:
        def count(r):
            return _param_count("tt", ins, outs, (1, *r, 1))
        # The largest uniform rank within the budget, as TensorLy/tltorch
        # choose it (so the same fraction gives the same layer), then single
        # steps on the smallest ranks while the budget allows.
        lo, hi = 1, max(1, int(budget))
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if count([mid] * (d - 1)) <= budget:
                lo = mid
            else:
                hi = mid - 1
        big = [lo + 1] * (d - 1)
        inner = _grow([lo] * (d - 1), big, count, budget, relative=False) if d > 1 else []
    elif _is_int(rank):
        if rank < 1:
            raise ValueError(f"rank: expected a positive rank, got {rank}")
        inner = [rank] * (d - 1)
    else:
        try:
            r = list(rank)
        except TypeError:
            raise ValueError(f"rank: expected an int, a tuple, a fraction in (0, 1] or 'same', got {rank!r}") from None
        if len(r) == d + 1:
            if r[0] != 1 or r[-1] != 1:
                raise ValueError(f"rank: the d + 1 = {d + 1} TT ranks must start and end with 1, got {tuple(r)}")
            r = r[1:-1]
        if len(r) != d - 1 or not all(_is_int(v) for v in r):
            raise ValueError(
                f"rank: expected {d - 1} inner TT ranks (or {d + 1} with the 1s at the ends), "
                f"got {tuple(rank)}"
            )
        for k, v in enumerate(r):
            if v < 1:
                raise ValueError(f"rank: TT rank r_{k + 1} = {v} is impossible: ranks must be >= 1")
        inner = r
    return (1, *inner, 1)


def _tucker_tuple(rank, ins, outs):
    p, q = len(ins), len(outs)
    try:
        parts = list(rank)
    except TypeError:
        raise ValueError(f"rank: expected an int, a tuple, a fraction in (0, 1] or 'same', got {rank!r}") from None
    if len(parts) == 2 and all(isinstance(x, (tuple, list)) for x in parts):
        t, s = list(parts[0]), list(parts[1])
    elif len(parts) == p + q:
        t, s = parts[:p], parts[p:]
    else:
        raise ValueError(
            f"rank: expected Tucker ranks as ((t_1..t_{p}), (s_1..s_{q})) or {p + q} ints, got {rank!r}"
        )
    if len(t) != p or len(s) != q:
        raise ValueError(f"rank: expected {p} input and {q} output Tucker ranks, got {rank!r}")
    for side, rs, modes in (("input", t, ins), ("output", s, outs)):
        for k, (v, n) in enumerate(zip(rs, modes)):
            if not _is_int(v) or not 1 <= v <= n:
                raise ValueError(
                    f"rank: {side} Tucker rank {k} = {v!r} is impossible: expected 1 <= rank <= "
                    f"{n} (its mode size)"
                )
    return list(t) + list(s)


# --------------------------------------------------------------------------
# Views, initialisation, reconstruction
# --------------------------------------------------------------------------
def views(layout: Layout, flat: Tensor) -> list[Tensor]:
    """The factors or cores as views of the flat parameter (no copies)."""
    out, off = [], 0
    for shape in layout.shapes():
        n = math.prod(shape)
        out.append(flat[off : off + n].view(shape))
        off += n
    return out


def init_(layout: Layout, flat: Tensor) -> None:
    """Random factors whose W has nn.Linear's weight variance, 1 / (3·in)
    (nn.Linear draws W from U(-1/√in, 1/√in)). Every entry is drawn
    independently with zero mean, so entries of W are uncorrelated and
    Var(W_oi) is a product of the factors' variances:

    - CP: W = Σ_r ∏_k (p + q factors) -> Var W = R·σ^(2(p+q)); all factors get
      σ² = (1 / (3·in·R))^(1/(p+q)).
    - Tucker: V_k with variance 1/i_k (x keeps its scale through each
      projection), U_k with 1/s_k, the core with 1/(3T):
      Var W = S·T · 1/(3T) · ∏ 1/i_k · ∏ 1/s_k = 1/(3·in).
    - TT: Var W = ∏_{k=1}^{d-1} r_k · ∏_k σ_k²; core k gets
      σ_k² = 3^(-1/d) / (i_k·r_(k-1)) (its fan-in in the sweep), whose
      product is 1 / (3·in·∏_{k=1}^{d-1} r_k).

    Entries are uniform, U(-a, a) with a = √(3σ²)."""
    shapes = layout.shapes()
    vs = views(layout, flat)
    p, q = len(layout.in_modes), len(layout.out_modes)
    n_in = layout.in_features
    if layout.factorization == "cp":
        var = [(1.0 / (3.0 * n_in * layout.rank)) ** (1.0 / (p + q))] * (p + q)
    elif layout.factorization == "tucker":
        t, s = layout.rank
        var = [1.0 / (3.0 * math.prod(t))] + [1.0 / i for i in layout.in_modes] + [1.0 / r for r in s]
    else:
        d, r = p, layout.rank
        var = [3.0 ** (-1.0 / d) / (layout.in_modes[k] * r[k]) for k in range(d)]
    with torch.no_grad():
        for v, shape, vv in zip(vs, shapes, var):
            a = math.sqrt(3.0 * vv)
            v.uniform_(-a, a)


def reconstruct(layout: Layout, flat: Tensor) -> Tensor:
    """The dense W [out, in] (for to_linear and tests; never used by the
    forward)."""
    vs = views(layout, flat)
    p = len(layout.in_modes)
    if layout.factorization == "cp":
        def kr(fs):
            out = fs[0]
            for f in fs[1:]:
                out = (out[:, None, :] * f[None, :, :]).reshape(-1, f.shape[1])
            return out
        return kr(vs[p:]) @ kr(vs[:p]).T
    if layout.factorization == "tucker":
        core, V, U = vs[0], vs[1 : 1 + p], vs[1 + p :]
        t, s = layout.rank
        def kron(ms):
            out = ms[0]
            for m in ms[1:]:
                out = torch.kron(out, m)
            return out
        return kron(U) @ core.reshape(math.prod(s), math.prod(t)) @ kron(V).T
    P = vs[0].reshape(vs[0].shape[1], vs[0].shape[2], vs[0].shape[3])  # [I, O, r]
    for G in vs[1:]:
        P = torch.einsum("IOr,riop->IiOop", P, G)
        P = P.reshape(P.shape[0] * P.shape[1], P.shape[2] * P.shape[3], P.shape[4])
    return P[..., 0].T


# --------------------------------------------------------------------------
# The C cost model's report (fct_*_linear_plan)
# --------------------------------------------------------------------------
class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _PlanInfo(ctypes.Structure):
    _fields_ = [
        ("forward_flops", ctypes.c_double),
        ("backward_flops", ctypes.c_double),
        ("forward_workspace", ctypes.c_size_t),
        ("backward_workspace", ctypes.c_size_t),
        ("plan", ctypes.c_char * 256),
    ]


def _ints(values):
    return (ctypes.c_int64 * len(values))(*values)


_DTYPES = {torch.float32: (2, 32), torch.float64: (2, 64), torch.float16: (2, 16), torch.bfloat16: (4, 16)}


def plan_info(layout: Layout, batch: int, device="cpu", dtype=torch.float32) -> dict:
    """What the C kernels would do for a batch of `batch` rows: FLOPs of the
    forward and backward, workspace bytes, and the contraction order."""
    dev = _DLDevice(2 if torch.device(device).type == "cuda" else 1, 0)
    code, bits = _DTYPES.get(dtype, (2, 32))
    dt = _DLDataType(code, bits, 1)
    info = _PlanInfo()
    core = _lib.core
    ins, outs = layout.in_modes, layout.out_modes
    if layout.factorization == "cp":
        st = core.fct_cp_linear_plan(len(ins), _ints(ins), len(outs), _ints(outs),
                                     ctypes.c_int64(layout.rank), ctypes.c_int64(batch), dev, dt,
                                     ctypes.byref(info))
    elif layout.factorization == "tucker":
        t, s = layout.rank
        st = core.fct_tucker_linear_plan(len(ins), _ints(ins), _ints(t), len(outs), _ints(outs),
                                         _ints(s), ctypes.c_int64(batch), dev, dt, ctypes.byref(info))
    else:
        st = core.fct_tt_linear_plan(len(ins), _ints(ins), _ints(outs), _ints(layout.rank),
                                     ctypes.c_int64(batch), dev, dt, ctypes.byref(info))
    if st != 0:
        raise ValueError(f"plan: the C cost model refused the layout ({core.fct_status_string(st).decode()})")
    return {
        "forward_flops": int(info.forward_flops),
        "backward_flops": int(info.backward_flops),
        "forward_workspace": int(info.forward_workspace),
        "backward_workspace": int(info.backward_workspace),
        "plan": info.plan.decode(),
    }
