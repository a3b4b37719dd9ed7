"""Every factorch op written again in standard aten ops (matmul, reshape,
conv2d, embedding), for export and for the autograd the C ops lack.

Autograd (factorch/_ops.py, through :func:`definition`): a backward run with
create_graph=True differentiates these definitions so that its gradients
are differentiable again, and the layers run them instead of the C ops
under forward-mode AD and the torch.func transforms (vmap, jvp, jacfwd,
jacrev, grad): they use only differentiable, batchable torch ops.

``torch.export.export`` keeps the ``factorch::`` ops as they are (their fakes
give the shapes); these definitions replace them only when a program is
decomposed: ``torch.onnx.export(..., dynamo=True)`` decomposes every op it has
no ONNX translation for through torch's global decomposition table, where
:func:`in_decomposition_table` puts them, so each factorch op becomes a subgraph of standard
ONNX operators (MatMul, Reshape, Add, Conv, Gather, ...) that onnxruntime or
TensorRT run with no plugin. ``factorch.export.decompose(ep)`` does the same
to an ExportedProgram.

The contractions follow the C kernels' own order (ops/*.c): low rank
``(x·Vᵀ)·Uᵀ``; CP ``(x·KR(A))·KR(B)ᵀ``; Tucker projects x on the input
factors (last mode first), multiplies by the core, expands on the output
factors (first mode first); TT merges the groups of cores the C plan picks
for the batch and sweeps x through them in its direction. Weight-side work
(slicing the flat parameter, Khatri–Rao products, merged TT cores) reads
parameters only, so an ONNX optimiser folds it into initializers.

Adding an op: a function of the op's arguments returning what the op returns,
written with torch ops, under ``@register("name")``.

The definitions are lent to torch's global decomposition table only inside
:func:`in_decomposition_table` (``factorch.export.to_onnx`` uses it):
registered for good, fake tensors and AOT autograd would run them in place of
the ops' fakes and C kernels.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as TF
import contextlib

from torch._decomp import decomposition_table

from . import _ops  # noqa: F401  (the ops and their fakes)

ops = torch.ops.factorch

#: op overload -> its definition in aten ops (what factorch.export uses).
DECOMPOSITIONS: dict = {}


def register(name: str):
    """Registers fn as the aten-level definition of ``factorch::name`` (in
    DECOMPOSITIONS; :func:`in_decomposition_table` lends them to torch)."""
    op = getattr(ops, name).default

    def deco(fn):
        DECOMPOSITIONS[op] = fn
        return fn

    return deco


@contextlib.contextmanager
def in_decomposition_table():
    """Puts the definitions into torch's global decomposition table for the
    block (what ``torch.onnx.export(dynamo=True)`` consults for ops it has
    no ONNX translation of), and takes them out after. Not for good: fake
    tensors and AOT autograd consult that table too, and would then run
    these definitions instead of the ops' fakes and C kernels."""
    before = {op: decomposition_table.get(op) for op in DECOMPOSITIONS}
    decomposition_table.update(DECOMPOSITIONS)
    try:
        yield
    finally:
        for op, fn in before.items():
            if fn is None:
                decomposition_table.pop(op, None)
            else:
                decomposition_table[op] = fn


def _views(flat, shapes):
    out, off = [], 0
    for s in shapes:
        n = math.prod(s)
        out.append(flat[off:off + n].view(*s))
        off += n
    return out


def _add_bias(y, bias):
    return y + bias if bias.numel() != 0 else y


def _hint(v, default: int = 512) -> int:
    """An int for a size that may be symbolic (the example's value)."""
    if isinstance(v, int):
        return v
    try:
        return int(v.node.hint)
    except Exception:  # no hint: a representative batch
        return default


# --------------------------------------------------------------------------
# Low rank
# --------------------------------------------------------------------------
def _lowrank(x, U, V, bias):
    t = torch.matmul(x, V.t())
    return _add_bias(torch.matmul(t, U.t()), bias), t


@register("lowrank_linear")
def lowrank_linear(x, U, V, bias):
    return _lowrank(x, U, V, bias)


@register("lowrank_linear_flat")
def lowrank_linear_flat(x, weights, bias, out_features, rank):
    V, U = _views(weights, [(rank, x.shape[-1]), (out_features, rank)])
    return _lowrank(x, U, V, bias)


# --------------------------------------------------------------------------
# CP, Tucker, TT on the flat layouts of factorch/factorizations.py
# --------------------------------------------------------------------------
def _int64(c: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return c - (1 << 64) if c >= 1 << 63 else c


def _shr(z, k: int):
    """Logical (unsigned) right shift of int64 bits."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def lora_dropout_keep(seed, n: int, p: float, device):
    """ops/lora_dropout.h's mask in torch ops: element i (row-major over x
    folded to [M, in]) is kept when splitmix64's output at position i + 1
    of the stream seeded with `seed` is >= p·2^64 (unsigned). uint64 has too
    few torch ops, so the bits live in int64, whose + and * wrap the same
    way; the unsigned comparison flips the top bits."""
    z = seed.reshape(()).to(device=device, dtype=torch.int64) + torch.arange(
        1, n + 1, dtype=torch.int64, device=device) * _int64(0x9E3779B97F4A7C15)
    z = (z ^ _shr(z, 30)) * _int64(0xBF58476D1CE4E5B9)
    z = (z ^ _shr(z, 27)) * _int64(0x94D049BB133111EB)
    z = z ^ _shr(z, 31)
    threshold = int(p * 2.0**64)  # fct_dropout_threshold
    top = -(1 << 63)
    return (z ^ top) >= _int64(threshold ^ (1 << 63))


def lora_linear_train(x, A, B, W, U, V, base_out, bias, seed, base_kind, scale, dropout):
    """lora_linear with dropout > 0 too: the mask regenerated from `seed` as
    the C kernels draw it (for the autograd paths in _ops, not for export:
    ONNX has no unsigned 64-bit arithmetic to run it with)."""
    if dropout == 0.0:
        return lora_linear(x, A, B, W, U, V, base_out, bias, seed, base_kind, scale, dropout)
    keep = lora_dropout_keep(seed, x.numel(), dropout, x.device).reshape(x.shape)
    xd = x * keep.to(x.dtype) * (1.0 / (1.0 - dropout))
    t = torch.matmul(xd, A.transpose(0, 1))
    return _lora_base(x, W, U, V, base_out, bias, base_kind) + scale * torch.matmul(
        t, B.transpose(0, 1)), t


def _lora_base(x, W, U, V, base_out, bias, base_kind):
    if base_kind == 0:
        return _add_bias(torch.matmul(x, W.transpose(0, 1)), bias)
    if base_kind == 1:
        return _lowrank(x, U, V, bias)[0]
    return base_out


@register("lora_linear")
def lora_linear(x, A, B, W, U, V, base_out, bias, seed, base_kind, scale, dropout):
    """y = base + s·(x·Aᵀ)·Bᵀ; base_kind 0: x·Wᵀ + bias, 1: (x·Vᵀ)·Uᵀ + bias,
    2: base_out. Only without dropout (export in eval mode): the mask comes
    from the C kernels' counter-based hash, which has no standard-operator
    form (``lora_linear_train`` has it in torch ops, for autograd)."""
    if dropout != 0.0:
        raise ValueError("lora_linear: cannot export with dropout > 0 (put the model in eval "
                         "mode: model.eval())")
    t = torch.matmul(x, A.transpose(0, 1))
    return _lora_base(x, W, U, V, base_out, bias, base_kind) + scale * torch.matmul(
        t, B.transpose(0, 1)), t


def definition(name: str):
    """The torch-ops definition of factorch::<name> that autograd uses
    (factorch/_ops.py: double backward, forward mode, torch.func): the
    export one, but lora_linear with its dropout mask."""
    if name == "lora_linear":
        return lora_linear_train
    return DECOMPOSITIONS[getattr(ops, name).default]


def _khatri_rao(fs):
    """[∏ i_k, R] with row (i_1..i_p) row-major = ∏_k fs[k][i_k, :]."""
    out = fs[0]
    for f in fs[1:]:
        out = (out.unsqueeze(1) * f.unsqueeze(0)).reshape(-1, f.shape[1])
    return out


@register("cp_linear")
def cp_linear(x, weights, bias, in_modes, out_modes, rank):
    fs = _views(weights, [(i, rank) for i in in_modes] + [(o, rank) for o in out_modes])
    p = len(in_modes)
    z = torch.matmul(x, _khatri_rao(fs[:p]))
    y = torch.matmul(z, _khatri_rao(fs[p:]).t())
    return _add_bias(y, bias), z


@register("tucker_linear")
def tucker_linear(x, weights, bias, in_modes, out_modes, in_ranks, out_ranks, keep):
    p, q = len(in_modes), len(out_modes)
    S, T = math.prod(out_ranks), math.prod(in_ranks)
    shapes = ([(S, T)] + [(i, t) for i, t in zip(in_modes, in_ranks)]
              + [(o, s) for o, s in zip(out_modes, out_ranks)])
    vs = _views(weights, shapes)
    core, Vs, Us = vs[0], vs[1:1 + p], vs[1 + p:]
    lead = x.shape[:-1]
    # State [M, i_1..i_k, t_(k+1)..t_p]; project mode k (last first):
    # [M·∏i_<k, i_k, ∏t_>k] -> V_kᵀ [t_k, i_k] @ it (a broadcast MatMul).
    h = x
    for k in range(p - 1, -1, -1):
        after = math.prod(in_ranks[k + 1:])
        h = torch.matmul(Vs[k].t(), h.reshape(-1, in_modes[k], after))
    h = torch.matmul(h.reshape(-1, T), core.t())  # [M, s_1..s_q]
    # Expand mode k (first first): [M·∏o_<k, s_k, ∏s_>k] -> U_k @ it.
    for k in range(q):
        after = math.prod(out_ranks[k + 1:])
        h = torch.matmul(Us[k], h.reshape(-1, out_ranks[k], after))
    y = h.reshape(*lead, math.prod(out_modes))
    # states: the op's shape (its fake's); their layout is the C op's own
    # (chunks of rows it picks), so zeros here. Only the C backward reads
    # states, and it never gets these: autograd differentiates this
    # definition instead.
    from ._ops import tucker_states_per_row

    per_row = tucker_states_per_row(in_modes, out_modes, in_ranks, out_ranks) if keep else 0
    return _add_bias(y, bias), x.new_zeros((math.prod(lead) * per_row,))


_TT_PLAN = re.compile(r"forward: groups ((?:\[\d+(?:-\d+)?\] ?)+) (right-to-left|left-to-right)")


def tt_plan(in_modes, out_modes, ranks, batch: int, dtype=torch.float32):
    """(groups as (first, last) core ranges, right_to_left) of the C forward
    for `batch` rows (fct_tt_linear_plan)."""
    from .factorizations import TensorTrain

    plan = TensorTrain(in_modes, out_modes, ranks).plan(batch, "cpu", dtype)["plan"]
    m = _TT_PLAN.search(plan)
    if m is None:  # an unknown plan string: one core per group, right to left
        return [(k, k) for k in range(len(in_modes))], True
    groups = []
    for g in re.findall(r"\[(\d+)(?:-(\d+))?\]", m.group(1)):
        groups.append((int(g[0]), int(g[1] or g[0])))
    return groups, m.group(2) == "right-to-left"


def _merge_cores(cores):
    """One core [r, ∏i, ∏o, r'] from consecutive cores [r_(k-1), i_k, o_k, r_k]."""
    G = cores[0]
    for C in cores[1:]:
        r, i, o, _ = G.shape
        _, j, p, s = C.shape
        G = torch.einsum("aios,sjpt->aijopt", G, C).reshape(r, i * j, o * p, s)
    return G


@register("tt_linear")
def tt_linear(x, weights, bias, in_modes, out_modes, ranks):
    d = len(in_modes)
    cores = _views(weights, [(ranks[k], in_modes[k], out_modes[k], ranks[k + 1])
                             for k in range(d)])
    lead = x.shape[:-1]
    M = 1
    for v in lead:
        M = M * _hint(v)
    groups, right_to_left = tt_plan(in_modes, out_modes, ranks, max(M, 1), weights.dtype)
    G = [_merge_cores(cores[a:b + 1]) for a, b in groups]
    I = [g.shape[1] for g in G]
    O = [g.shape[2] for g in G]
    n = len(G)
    if right_to_left:
        # State [M, I_1..I_j, r_j, O_(j+1)..O_n]; group j contracts (I_j, r_j)
        # with G_j as [(r_(j-1)·O_j), (I_j·r_j)] from the left.
        h = x
        for j in range(n - 1, -1, -1):
            r0, i, o, r1 = G[j].shape
            core = G[j].permute(0, 2, 1, 3).reshape(r0 * o, i * r1)
            h = torch.matmul(core, h.reshape(-1, i * r1, math.prod(O[j + 1:])))
    else:
        # State [M, O_1..O_(j-1), r_(j-1), I_j..I_n]; group j contracts
        # (r_(j-1), I_j) with G_j as [(O_j·r_j), (r_(j-1)·I_j)].
        h = x
        for j in range(n):
            r0, i, o, r1 = G[j].shape
            core = G[j].permute(2, 3, 0, 1).reshape(o * r1, r0 * i)
            h = torch.matmul(core, h.reshape(-1, r0 * i, math.prod(I[j + 1:])))
    y = h.reshape(*lead, math.prod(out_modes))
    return _add_bias(y, bias)


# --------------------------------------------------------------------------
# Convolution chains: one Conv per stage (groups, stride, padding, dilation)
# --------------------------------------------------------------------------
@register("conv_chain")
def conv_chain(x, weights, bias, stages, out_shape, keep):
    from ._ops import STAGE_INTS, conv_stage_recomputed

    st = [stages[i:i + STAGE_INTS] for i in range(0, len(stages), STAGE_INTS)]
    ws = _views(weights, [(s[4], s[1] // s[15], s[5], s[6]) for s in st])
    n = x.shape[0]
    h, saved = x, []
    for k, (s, w) in enumerate(zip(st, ws)):
        _b, ci, hh, ww, _co, _kh, _kw, sh, sw, pt, pl, pb, pr, dh, dw, g = s
        h = h.reshape(-1, ci, hh, ww)
        if pt == pb and pl == pr:
            pad = (pt, pl)
        else:  # asymmetric ("same" with an even kernel): zeros first
            h, pad = TF.pad(h, (pl, pr, pt, pb)), (0, 0)
        h = TF.conv2d(h, w, None, (sh, sw), pad, (dh, dw), g)
        if keep and k < len(st) - 1 and not conv_stage_recomputed(k, len(st), s):
            saved.append(h.reshape(-1))
    y = h.reshape(n, *out_shape)
    if bias.numel() != 0:
        y = y + bias.reshape(-1, *([1] * (len(out_shape) - 1)))
    keep_all = torch.cat(saved) if saved else x.new_empty(0)
    return y, keep_all


# --------------------------------------------------------------------------
# Embeddings: Gather, then MatMul (lowrank) or the chain of core slices (TT)
# --------------------------------------------------------------------------
def _mask_padding(y, indices, padding_idx):
    if padding_idx < 0:
        return y
    return y * (indices != padding_idx).unsqueeze(-1).to(y.dtype)


@register("lowrank_embedding")
def lowrank_embedding(indices, U, V, padding_idx):
    y = torch.matmul(TF.embedding(indices, U), V)
    return _mask_padding(y, indices, padding_idx)


@register("tt_embedding")
def tt_embedding(indices, weights, num_embeddings, modes, dims, ranks, padding_idx):
    d = len(modes)
    cores = _views(weights, [(ranks[k], modes[k], dims[k], ranks[k + 1]) for k in range(d)])
    idx = indices.to(torch.int64).reshape(-1)
    h = None
    for k in range(d):
        r0, nk, mk, r1 = ranks[k], modes[k], dims[k], ranks[k + 1]
        table = cores[k].permute(1, 0, 2, 3).reshape(nk, r0 * mk * r1)
        digit = (idx // math.prod(modes[k + 1:])) % nk
        g = TF.embedding(digit, table)  # [B, r0·m_k·r1]
        if h is None:
            h = g.reshape(-1, mk, r1)
        else:  # [B, D, r0] @ [B, r0, m_k·r1] -> [B, D·m_k, r1]
            h = torch.matmul(h, g.reshape(-1, r0, mk * r1)).reshape(-1, h.shape[1] * mk, r1)
    y = h.reshape(*indices.shape, math.prod(dims))
    return _mask_padding(y, indices, padding_idx)


def decompositions() -> dict:
    """torch.export's default decomposition table plus every factorch op's
    definition (for ``ExportedProgram.run_decompositions``)."""
    table = torch.export.default_decompositions()
    for op, fn in DECOMPOSITIONS.items():
        table[op] = fn
    return table
