"""Stateless factorized operations on torch tensors."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from . import _ops
from ._ops import ops

#: Dims the C ops take for an activation (FCT_MAX_DIMS in ops/; indices one
#: fewer, the lookup adds a dim); the functions here merge the leading dims of
#: inputs with more into one (a view where the strides allow, else a copy), as
#: nn.Linear and nn.Embedding take any number.
MAX_DIMS = 8


def _merge_leading(x, keep: int = 1, limit: int = MAX_DIMS):
    """(x with its leading dims merged into one when it has more than
    ``limit`` dims, the merged dims or None); ``keep`` trailing dims stay."""
    if not isinstance(x, Tensor) or x.dim() <= limit:
        return x, None
    lead = x.shape[: x.dim() - keep]
    return x.reshape(-1, *x.shape[x.dim() - keep:]), lead


def _split_leading(y: Tensor, lead, keep: int = 1) -> Tensor:
    """Undoes :func:`_merge_leading` on a result with ``keep`` trailing dims."""
    return y if lead is None else y.reshape(*lead, *y.shape[y.dim() - keep:])


def lowrank_linear(x: Tensor, U: Tensor, V: Tensor, bias: Tensor | None = None) -> Tensor:
    """``y = x @ V.T @ U.T + bias`` without forming ``U @ V``.

    Args:
        x: ``[..., in]``; any strides.
        U: ``[out, r]``.
        V: ``[r, in]``.
        bias: ``[out]`` or None.

    Returns:
        ``[..., out]``. Differentiable in every argument; one fused C op
        forward (``torch.ops.factorch.lowrank_linear``) and one backward.
        float32/float64 on CPU and CUDA, bfloat16/float16 on CUDA.
    """
    if bias is None:
        bias = x.new_empty(0)
    x, lead = _merge_leading(x)
    return _split_leading(_ops.call("lowrank_linear", x, U, V, bias)[0], lead)


def lowrank_linear_flat(x: Tensor, weights: Tensor, bias: Tensor | None, out_features: int,
                        rank: int) -> Tensor:
    """:func:`lowrank_linear` on a layer's flat parameter: ``V [rank, in]``
    then ``U [out_features, rank]``, row-major, back to back. Its gradient
    is one flat tensor of the same layout."""
    x, lead = _merge_leading(x)
    return _split_leading(_ops.call("lowrank_linear_flat", x, weights, _bias(x, bias),
                                    out_features, rank)[0], lead)


# --------------------------------------------------------------------------
# Tensorized layers. The ops take every factor or core in ONE flat tensor
# (what FactorizedLinear keeps as its parameter, so it calls them with no
# copy); these functions take them as lists, check them, and concatenate.
# --------------------------------------------------------------------------
def _bias(x: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty(0) if bias is None else bias


def _check_list(name: str, ts, ndim: int, what: str) -> list[Tensor]:
    ts = list(ts)
    if not ts:
        raise ValueError(f"{name}: expected at least one tensor {what}")
    for k, t in enumerate(ts):
        if not isinstance(t, Tensor) or t.dim() != ndim:
            got = f"{t.dim()} dims" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name}[{k}]: expected a {ndim}-dim tensor {what}, got {got}")
    return ts


def _tt_chain_ranks(G) -> list:
    """r_0 .. r_d of TT cores [r_(k-1), a_k, b_k, r_k], checking that each
    core's first dim is the last dim of the one before (the ends are the
    callers' to check)."""
    ranks = [G[0].shape[0]]
    for k, g in enumerate(G):
        if g.shape[0] != ranks[-1]:
            raise ValueError(f"cores[{k}]: expected a first dim of {ranks[-1]} (the last dim of "
                             f"cores[{k - 1}]), got {list(g.shape)}")
        ranks.append(g.shape[3])
    return ranks


def _flat(ts) -> Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def cp_linear_flat(x: Tensor, weights: Tensor, bias: Tensor | None, in_modes, out_modes,
                   rank: int) -> Tensor:
    """:func:`cp_linear` on the flat parameter layout (A_k then B_k, each
    [mode, rank] row-major, back to back)."""
    x, lead = _merge_leading(x)
    y = _ops.call("cp_linear", x, weights, _bias(x, bias), list(in_modes), list(out_modes),
                  rank)[0]
    return _split_leading(y, lead)


def tucker_linear_flat(x: Tensor, weights: Tensor, bias: Tensor | None, in_modes, out_modes,
                       in_ranks, out_ranks, keep_states: bool = True) -> Tensor:
    """:func:`tucker_linear` on the flat layout (core, then V_k, then U_k)."""
    x, lead = _merge_leading(x)
    args = (x, weights, _bias(x, bias))
    # keep: the C op writes what its backward would recompute (t and z,
    # within a budget: factorch._ops.tucker_states_per_row) when a backward
    # can follow (a jit trace records one value for every later call, so it
    # keeps them); the torch definition (forward mode, torch.func) has
    # autograd's own.
    keep = bool(keep_states) and (torch.jit.is_tracing() or (
        torch.is_grad_enabled() and any(t.requires_grad for t in args))) and (
        not _ops.needs_definition(args))
    y = _ops.call("tucker_linear", *args, list(in_modes), list(out_modes), list(in_ranks),
                  list(out_ranks), keep)[0]
    return _split_leading(y, lead)


def tt_linear_flat(x: Tensor, weights: Tensor, bias: Tensor | None, in_modes, out_modes,
                   ranks) -> Tensor:
    """:func:`tt_linear` on the flat layout (the cores back to back)."""
    x, lead = _merge_leading(x)
    return _split_leading(_ops.call("tt_linear", x, weights, _bias(x, bias), list(in_modes),
                                    list(out_modes), list(ranks)), lead)


def cp_linear(x: Tensor, in_factors, out_factors, bias: Tensor | None = None) -> Tensor:
    """``y = x @ W.T + bias`` with ``W[(o), (i)] = Σ_r ∏ A_k[i_k, r] · ∏ B_k[o_k, r]``.

    Args:
        x: ``[..., in]`` with ``in = ∏ i_k``; any strides.
        in_factors: ``A_k [i_k, R]``, one per input mode (the first is the
            slowest index of x's last dim).
        out_factors: ``B_k [o_k, R]``, one per output mode.
        bias: ``[out]`` or None.

    W is never formed: the C op builds column blocks of the Khatri–Rao
    products and runs GEMMs (``torch.ops.factorch.cp_linear``); one op
    forward, one backward. Differentiable in every argument.
    """
    A = _check_list("in_factors", in_factors, 2, "[i_k, R]")
    B = _check_list("out_factors", out_factors, 2, "[o_k, R]")
    R = A[0].shape[1]
    for name, fs in (("in_factors", A), ("out_factors", B)):
        for k, f in enumerate(fs):
            if f.shape[1] != R:
                raise ValueError(
                    f"{name}[{k}]: expected [mode, R] with R = {R} (the rank of in_factors[0]), "
                    f"got {list(f.shape)}"
                )
    return cp_linear_flat(x, _flat(A + B), bias, [f.shape[0] for f in A],
                          [f.shape[0] for f in B], R)


def tucker_linear(x: Tensor, core: Tensor, in_factors, out_factors,
                  bias: Tensor | None = None, keep_states: bool = True) -> Tensor:
    """``y = x @ W.T + bias`` with
    ``W[(o), (i)] = Σ core[s_1..s_q, t_1..t_p] · ∏ U_k[o_k, s_k] · ∏ V_k[i_k, t_k]``.

    Args:
        x: ``[..., in]``, ``in = ∏ i_k``.
        core: ``[s_1, .., s_q, t_1, .., t_p]`` (output ranks first).
        in_factors: ``V_k [i_k, t_k]``.
        out_factors: ``U_k [o_k, s_k]``.
        bias: ``[out]`` or None.
        keep_states: when a backward can follow, the forward keeps x
            projected on the input factors and that times the core
            (``[.., T + S]`` elements, only where ``T + S <= in + out``) so
            the backward does not recompute them; False recomputes them
            (less memory, a slower backward).
    """
    V = _check_list("in_factors", in_factors, 2, "[i_k, t_k]")
    U = _check_list("out_factors", out_factors, 2, "[o_k, s_k]")
    t = [v.shape[1] for v in V]
    s = [u.shape[1] for u in U]
    if not isinstance(core, Tensor) or tuple(core.shape) != (*s, *t):
        got = list(core.shape) if isinstance(core, Tensor) else type(core).__name__
        raise ValueError(
            f"core: expected shape {[*s, *t]} (the ranks of out_factors, then of in_factors), "
            f"got {got}"
        )
    return tucker_linear_flat(x, _flat([core] + V + U), bias, [v.shape[0] for v in V],
                              [u.shape[0] for u in U], t, s, keep_states)


def tt_linear(x: Tensor, cores, bias: Tensor | None = None) -> Tensor:
    """``y = x @ W.T + bias`` with the TT-matrix
    ``W[(o), (i)] = G_1[:, i_1, o_1, :] ··· G_d[:, i_d, o_d, :]``.

    Args:
        x: ``[..., in]``, ``in = ∏ i_k``.
        cores: ``G_k [r_(k-1), i_k, o_k, r_k]`` with ``r_0 = r_d = 1``.
        bias: ``[out]`` or None.

    The C op merges groups of neighbouring cores and sweeps x through them
    in the order its cost model finds cheapest for the batch size.
    """
    G = _check_list("cores", cores, 4, "[r_(k-1), i_k, o_k, r_k]")
    ranks = _tt_chain_ranks(G)
    if ranks[0] != 1 or ranks[-1] != 1:
        raise ValueError(
            f"cores: expected r_0 = r_d = 1 (the first dim of cores[0] and the last of "
            f"cores[{len(G) - 1}]), got {ranks[0]} and {ranks[-1]}"
        )
    return tt_linear_flat(x, _flat(G), bias, [g.shape[1] for g in G], [g.shape[2] for g in G],
                          ranks)


# --------------------------------------------------------------------------
# Factorized embeddings: y = T[indices] for a table T [num, dim]
# kept factorized; y has shape indices.shape + (dim,). Indices: int64 or
# int32, any shape, on the factors' device; out-of-range ones raise a
# RuntimeError naming `indices`. padding_idx (None, or an index, negative
# ones counted from the end as in nn.Embedding): its lookups give zero rows
# and pass no gradient. Differentiable in the factors.
# --------------------------------------------------------------------------
def _padding_idx(padding_idx, num: int) -> int:
    """nn.Embedding's padding_idx as the ops take it (-1: none)."""
    if padding_idx is None:
        return -1
    if isinstance(padding_idx, bool) or not isinstance(padding_idx, int) or not (
        -num <= padding_idx < num
    ):
        raise ValueError(
            f"padding_idx: expected None or an int in [-{num}, {num}) (num_embeddings = {num}), "
            f"got {padding_idx!r}"
        )
    return padding_idx + num if padding_idx < 0 else padding_idx


def lowrank_embedding(indices: Tensor, U: Tensor, V: Tensor, padding_idx=None) -> Tensor:
    """``(U @ V)[indices]`` without forming ``U @ V``: the rows of ``U`` the
    indices pick, times ``V`` (``torch.ops.factorch.lowrank_embedding``; its
    backward scatter-adds into the looked-up rows of ``U`` only).

    Args:
        indices: int64/int32 tensor of any shape.
        U: ``[num_embeddings, R]``.
        V: ``[R, embedding_dim]``.
        padding_idx: None or a row whose lookups give zeros and no gradient.
    """
    num = U.shape[0] if isinstance(U, Tensor) and U.dim() >= 1 else 0
    indices, lead = _merge_leading(indices, keep=0, limit=MAX_DIMS - 1)
    return _split_leading(_ops.call("lowrank_embedding", indices, U, V,
                                    _padding_idx(padding_idx, num)), lead)


def tt_embedding_flat(indices: Tensor, weights: Tensor, num_embeddings: int, modes, dims, ranks,
                      padding_idx=None) -> Tensor:
    """:func:`tt_embedding` on the flat layout (the cores back to back)."""
    indices, lead = _merge_leading(indices, keep=0, limit=MAX_DIMS - 1)
    y = _ops.call("tt_embedding", indices, weights, int(num_embeddings), list(modes),
                  list(dims), list(ranks), _padding_idx(padding_idx, int(num_embeddings)))
    return _split_leading(y, lead)


def tt_embedding(indices: Tensor, cores, num_embeddings: int | None = None,
                 padding_idx=None) -> Tensor:
    """Rows of the TT (TT-Rec) table: row i, with digits ``(i_1..i_d)`` of
    ``i`` in the mixed radix ``(n_1..n_d)`` (``i_1`` slowest), is
    ``G_1[:, i_1, :, :] ··· G_d[:, i_d, :, :]`` reshaped to
    ``embedding_dim = ∏ m_k``.

    Args:
        indices: int64/int32 tensor of any shape.
        cores: ``G_k [r_(k-1), n_k, m_k, r_k]`` with ``r_0 = r_d = 1``.
        num_embeddings: rows in use, at most ``∏ n_k`` (None: all of them).
        padding_idx: None or a row whose lookups give zeros and no gradient.

    One C op per direction, the chain of small products run per index; the
    backward writes the gradients of the looked-up slices only.
    """
    G = _check_list("cores", cores, 4, "[r_(k-1), n_k, m_k, r_k]")
    ranks = _tt_chain_ranks(G)
    if ranks[-1] != 1:
        raise ValueError(f"cores[{len(G) - 1}]: expected a last dim of 1 (r_d = 1), "
                         f"got {ranks[-1]}")
    modes = [g.shape[1] for g in G]
    total = 1
    for n in modes:
        total *= n
    num = total if num_embeddings is None else num_embeddings
    return tt_embedding_flat(indices, _flat(G), num, modes, [g.shape[2] for g in G], ranks,
                             padding_idx)


# --------------------------------------------------------------------------
# LoRA: a base layer plus a trainable low-rank adapter, in one C op per
# direction (torch.ops.factorch.lora_linear, ops/lora_linear.c).
# --------------------------------------------------------------------------
def lora_linear(x: Tensor, A: Tensor, B: Tensor, scale, *, weight: Tensor | None = None,
                bias: Tensor | None = None, U: Tensor | None = None, V: Tensor | None = None,
                base_out: Tensor | None = None, dropout: float = 0.0,
                generator: torch.Generator | None = None) -> Tensor:
    """``y = base + scale · (drop(x) @ A.T) @ B.T``: a LoRA adapter on a base layer.

    Args:
        x: ``[..., in]``; any strides.
        A: ``[r, in]``, the adapter's down projection.
        B: ``[out, r]``, its up projection.
        scale: the adapter's scale (LoRA's ``alpha / r``), a float.
        weight, bias: a dense base ``x @ weight.T + bias`` (``weight [out, in]``).
        U, V: a low-rank base ``(x @ V.T) @ U.T + bias`` (``U [out, rb]``,
            ``V [rb, in]``).
        base_out: the output ``[..., out]`` of any other base layer (CP,
            Tucker, TT, ...); no bias then (that layer adds its own).
        dropout: p in [0, 1) applied to the adapter's input only (inverted:
            kept elements scaled by ``1 / (1 - p)``); 0.0 in eval mode.
        generator: the ``torch.Generator`` the mask's seed is drawn from
            (default: torch's, so ``torch.manual_seed`` makes runs
            reproducible). A CUDA generator costs a sync to bring the seed to
            the host.

    Exactly one of ``weight``, ``(U, V)`` and ``base_out`` is given. One C op
    forward and one backward: the adapter's GEMM accumulates into the
    output, the dropout mask is a counter-based hash of (seed, element index)
    regenerated by the backward (no mask tensor is kept), and a frozen base
    gets no weight gradient computed or allocated. Differentiable in every
    tensor (``base_out``'s gradient is ``grad_y``), twice too (create_graph),
    in forward mode and under torch.func transforms (through its definition
    in torch ops, factorch/_decomp.py, which regenerates the same dropout
    mask from the seed; under vmap the seed's draw follows vmap's
    ``randomness``). float32/float64 on CPU and CUDA, bfloat16/float16 on CUDA.
    """
    n_bases = (weight is not None) + (U is not None or V is not None) + (base_out is not None)
    if n_bases != 1:
        raise ValueError(
            "lora_linear: expected exactly one base: weight, (U, V) or base_out; got "
            + (", ".join(n for n, t in (("weight", weight), ("U", U), ("V", V),
                                         ("base_out", base_out)) if t is not None) or "none")
        )
    if (U is None) != (V is None):
        raise ValueError(f"{'V' if V is None else 'U'}: a low-rank base needs both U and V")
    if bias is not None and base_out is not None:
        raise ValueError("bias: expected None with base_out (the base layer adds its own bias)")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not (
            0.0 <= dropout < 1.0):
        raise ValueError(f"dropout: expected a float p in [0, 1), got {dropout!r}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite float, got {scale!r}")
    none = x.new_empty(0)
    if dropout > 0:
        device = generator.device if generator is not None else "cpu"
        seed = torch.randint(-2**63, 2**63 - 1, (1,), dtype=torch.int64, device=device,
                             generator=generator)
        if seed.device.type != "cpu":
            seed = seed.cpu()
    else:
        seed = none  # not read
    if weight is not None:
        kind = _ops.LORA_DENSE
    elif U is not None:
        kind = _ops.LORA_LOWRANK
    else:
        kind = _ops.LORA_GIVEN

    def arg(t):
        return none if t is None else t

    x, lead = _merge_leading(x)
    base_out, _ = _merge_leading(base_out)
    y = _ops.call("lora_linear", x, A, B, arg(weight), arg(U), arg(V), arg(base_out), arg(bias),
                  seed, kind, float(scale), float(dropout))[0]
    return _split_leading(y, lead)


# torch.fx.symbolic_trace records each of these as one call: their checks
# branch on shapes, which symbolic tracing cannot follow. Models (and the
# factorch layers) calling them as ``factorch.functional.NAME`` trace.
for _name in ("lowrank_linear", "lowrank_linear_flat", "cp_linear_flat", "tucker_linear_flat",
              "tt_linear_flat", "cp_linear", "tucker_linear", "tt_linear", "lowrank_embedding",
              "tt_embedding_flat", "tt_embedding", "lora_linear"):
    torch.fx.wrap(_name)
