"""Robustness fuzz of the C ops behind the factorized embeddings, called
directly: torch.ops.factorch.lowrank_embedding(_backward) and
tt_embedding(_backward).

Every case starts from a VALID call (a random low-rank or TT table, indices
of any shape and integer dtype, padding_idx or none) and, in the mutation
categories, breaks one thing (the indices' values, dtype or shape,
padding_idx, the factors, the TT lists, the vocabulary size, grad_y, the
device). One pytest node per category; the standard they are held to is
fuzz_harness's: never crash, return what the fake kernel and a plain-torch
float64 reference (the table's rows) say, or raise a clear exception naming
an argument.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass

import pytest
import torch

from fuzz_harness import (Case, assert_close, category_rng, check_category, finite, mutate_list,
                          poison, randint, randn, strided, tensor_variants, to_meta, vary)

ops = torch.ops.factorch
SEED = 20240611
N_VALID = 80         # valid calls per category
N_PER_MUTATION = 90  # calls per mutation category


# ---------------------------------------------------------------------------
# Embeddings: valid calls, the references
# ---------------------------------------------------------------------------
EMB_NAMES = ("indices", "U", "V", "padding_idx", "grad_y", "grad_U", "grad_V", "need_U",
             "need_V", "weights", "num_embeddings", "modes", "dims", "ranks", "cores",
             "grad_cores", "grad_weights", "y", "lowrank_embedding", "tt_embedding",
             "lowrank_embedding_backward", "tt_embedding_backward")


@dataclass
class EmbCall:
    indices: object
    pad: object
    U: object = None        # lowrank
    V: object = None
    w: object = None        # tt: the flat cores
    num: object = None
    modes: object = None
    dims: object = None
    ranks: object = None
    gy: object = None       # backward
    need: tuple = (True, True)

    def lr_args(self):
        return (self.indices, self.U, self.V, self.pad)

    def lr_bwd_args(self):
        return (self.gy, self.indices, self.U, self.V, self.pad, *self.need)

    def tt_args(self):
        return (self.indices, self.w, self.num, self.modes, self.dims, self.ranks, self.pad)

    def tt_bwd_args(self):
        return (self.gy, self.indices, self.w, self.num, self.modes, self.dims, self.ranks,
                self.pad)


def _index_shape(r):
    nd = r.choice((0, 1, 1, 2, 3))
    return tuple(r.choice((1, 2, 3, 4, 5) if r.random() < 0.9 else (0,)) for _ in range(nd))


def lowrank_base(r: random.Random) -> EmbCall:
    num, R, dim = r.randint(1, 20), r.randint(1, 5), r.randint(1, 8)
    dtype = r.choice((torch.float64, torch.float64, torch.float32))
    idx = randint(r, 0, num, _index_shape(r), r.choice((torch.int64, torch.int32)))
    pad = -1 if r.random() < 0.6 else r.randrange(num)
    U, V = randn(r, (num, R), dtype), randn(r, (R, dim), dtype)
    gy = randn(r, (*idx.shape, dim), dtype)
    return EmbCall(idx, pad, U=U, V=V, gy=gy, need=(r.random() < 0.8, r.random() < 0.8))


def tt_base(r: random.Random) -> EmbCall:
    d = r.randint(1, 3)
    modes = [r.randint(1, 4) for _ in range(d)]
    dims = [r.randint(1, 3) for _ in range(d)]
    ranks = [1] + [r.randint(1, 3) for _ in range(d - 1)] + [1]
    n_all = math.prod(modes)
    num = r.randint(max(1, n_all // 2), n_all)
    dtype = r.choice((torch.float64, torch.float64, torch.float32))
    numel = sum(ranks[k] * modes[k] * dims[k] * ranks[k + 1] for k in range(d))
    idx = randint(r, 0, num, _index_shape(r), r.choice((torch.int64, torch.int32)))
    pad = -1 if r.random() < 0.6 else r.randrange(num)
    gy = randn(r, (*idx.shape, math.prod(dims)), dtype)
    return EmbCall(idx, pad, w=randn(r, (numel,), dtype, 0.7), num=num, modes=modes, dims=dims,
                   ranks=ranks, gy=gy)


def _valid_rows(indices, num, pad):
    idx = indices.long().reshape(-1)
    assert bool(((idx >= 0) & (idx < num)).all()), "returned for out-of-range indices"
    return idx, idx != pad


def ref_lowrank(c: EmbCall, grads=False):
    num = c.U.shape[0]
    idx, keep = _valid_rows(c.indices, num, c.pad)
    U = c.U.detach().double().requires_grad_(grads)
    V = c.V.detach().double().requires_grad_(grads)
    # Padding rows are zeros, not 0·U[pad]: that would be NaN for an Inf in U.
    y = torch.zeros(idx.numel(), V.shape[1], dtype=torch.float64).index_put(
        (keep.nonzero()[:, 0],), U[idx[keep]] @ V)
    if not grads:
        return y.reshape(*c.indices.shape, V.shape[1])
    gy = c.gy.detach().double().reshape(y.shape)
    return torch.autograd.grad(y, (U, V), gy, allow_unused=True)


def _tt_cores(c: EmbCall, w):
    out, off = [], 0
    for k in range(len(c.modes)):
        shape = (c.ranks[k], c.modes[k], c.dims[k], c.ranks[k + 1])
        n = math.prod(shape)
        out.append(w[off:off + n].view(shape))
        off += n
    assert off == w.numel(), "weights: numel differs from the cores'"
    return out


def ref_tt(c: EmbCall, grads=False):
    """The looked-up rows, index by index through the cores' slices (works
    for any vocabulary size)."""
    idx, keep = _valid_rows(c.indices, c.num, c.pad)
    w = c.w.detach().double().reshape(-1).requires_grad_(grads)
    cores = _tt_cores(c, w)
    d, dim = len(cores), math.prod(c.dims)
    div = [math.prod(c.modes[k + 1:]) for k in range(d)]
    rows = idx[keep]  # padding rows stay zeros (not 0·row: NaN for an Inf)
    b = rows.numel()
    state = torch.ones(b, 1, 1, dtype=torch.float64)  # [B, D, r]
    for k, G in enumerate(cores):
        digit = (rows // div[k]) % c.modes[k]
        sl = G.permute(1, 0, 2, 3)[digit]  # [B, r, m, r']
        state = torch.einsum("bDr,brms->bDms", state, sl).reshape(b, state.shape[1] * G.shape[2],
                                                                    G.shape[3])
    y = torch.zeros(idx.numel(), dim, dtype=torch.float64).index_put(
        (keep.nonzero()[:, 0],), state.reshape(b, dim))
    if not grads:
        return y.reshape(*c.indices.shape, math.prod(c.dims))
    return torch.autograd.grad(y, w, c.gy.detach().double().reshape(y.shape), allow_unused=True)[0]


def verify_lowrank(c: EmbCall):
    def verify(y):
        want = (*c.indices.shape, c.V.shape[1])
        assert tuple(y.shape) == want, f"y: shape {tuple(y.shape)}, the fake says {want}"
        assert y.dtype == c.U.dtype
        if y.device.type == "meta":
            return
        assert_close(y, ref_lowrank(c), c.U.dtype, "y", finite(c.U, c.V))
    return verify


def verify_lowrank_backward(c: EmbCall):
    def verify(out):
        gU, gV = out
        for name, t, need, like in (("grad_U", gU, c.need[0], c.U), ("grad_V", gV, c.need[1], c.V)):
            want = tuple(like.shape) if need else (0,)
            assert tuple(t.shape) == want, f"{name}: shape {tuple(t.shape)}, the fake says {want}"
        if gU.device.type == "meta" or not any(c.need):
            return  # (nothing asked for: the indices are not read, nor checked)
        ok = finite(c.U, c.V, c.gy)
        rU, rV = ref_lowrank(c, grads=True)
        for name, t, need, ref, like in (("grad_U", gU, c.need[0], rU, c.U),
                                         ("grad_V", gV, c.need[1], rV, c.V)):
            if need:
                ref = ref if ref is not None else torch.zeros(like.shape, dtype=torch.float64)
                assert_close(t, ref, c.U.dtype, name, ok)
    return verify


def verify_tt(c: EmbCall):
    def verify(y):
        want = (*c.indices.shape, math.prod(c.dims))
        assert tuple(y.shape) == want, f"y: shape {tuple(y.shape)}, the fake says {want}"
        assert y.dtype == c.w.dtype
        if y.device.type == "meta":
            return
        assert_close(y, ref_tt(c), c.w.dtype, "y", finite(c.w))
    return verify


def verify_tt_backward(c: EmbCall):
    def verify(gw):
        assert tuple(gw.shape) == tuple(c.w.shape), f"grad_weights: shape {tuple(gw.shape)}"
        if gw.device.type == "meta":
            return
        ref = ref_tt(c, grads=True)
        ref = ref if ref is not None else torch.zeros(c.w.numel(), dtype=torch.float64)
        assert_close(gw.reshape(-1), ref, c.w.dtype, "grad_weights", finite(c.w, c.gy))
    return verify


# ---- mutations of an embedding call: (r, EmbCall) -> (desc, EmbCall) ---------
def me_indices(r, c):
    num = c.U.shape[0] if c.U is not None else c.num
    idx = c.indices
    kind = r.choice(("value", "value", "dtype", "8-d", "7-d", "0-d", "empty", "transposed",
                     "expanded", "strided"))
    if kind == "value":
        if idx.numel() == 0:
            idx = torch.zeros(3, dtype=idx.dtype)
        i64 = idx.dtype == torch.int64
        v = r.choice((num, num + 1, -1, -num, 2**31 - 1, -2**31, r.randrange(num)) +
                     ((2**40, 2**62, 2**63 - 1, -2**63) if i64 else ()))
        idx = idx.clone()
        i = r.randrange(idx.numel())
        idx.view(-1)[i] = v
        kind = f"value {v} at {i}"
    elif kind == "dtype":
        dt = r.choice((torch.float32, torch.float64, torch.bool, torch.uint8, torch.int16,
                       torch.int8, torch.int32, torch.int64))
        idx = idx.to(dt)
        kind = f"dtype {dt}"
    elif kind in ("8-d", "7-d", "0-d"):  # one index, as many dims (8: one too many)
        one = idx.reshape(-1)[:1] if idx.numel() else torch.zeros(1, dtype=idx.dtype)
        idx = one.reshape([1] * int(kind[0]))
    elif kind == "empty":
        idx = idx.new_zeros(r.choice(((0,), (3, 0, 2), (0, 0))))
    elif kind == "transposed":
        idx = idx.t() if idx.dim() == 2 else idx.reshape(-1, 1).t()
    elif kind == "expanded":
        idx = idx.reshape(-1)[:1].expand(6) if idx.numel() else idx
    else:
        idx = strided(idx)
    # grad_y follows the new index shape (the backward mutations then test
    # the indices, not grad_y).
    dim = c.gy.shape[-1]
    gy = randn(r, (*idx.shape, dim), c.gy.dtype)
    return f"indices {kind}", dataclasses.replace(c, indices=idx, gy=gy)


def me_padding_idx(r, c):
    num = c.U.shape[0] if c.U is not None else c.num
    top = math.prod(c.modes) if c.modes is not None else num
    p = r.choice((-1, r.randrange(num), num, top, num + 5, -2, -num, 2**31, 2**62, 2**63 - 1,
                  -2**63))
    return f"padding_idx {p}", dataclasses.replace(c, pad=p)


def me_lowrank_factors(r, c):
    U, V = c.U, c.V
    kind = r.choice(("U variant", "V variant", "U 1-D", "U 3-D", "V wrong R", "U column-major",
                     "U strided", "U expanded", "V transposed layout", "R = 0", "dim = 0",
                     "num = 0", "dtype mix", "nonfinite U", "nonfinite V", "V expanded huge"))
    if kind == "U variant":
        kind, U = tensor_variants(r, U)
        kind = f"U {kind}"
    elif kind == "V variant":
        kind, V = tensor_variants(r, V)
        kind = f"V {kind}"
    elif kind == "U 1-D":
        U = U.reshape(-1)
    elif kind == "U 3-D":
        U = U.unsqueeze(0)
    elif kind == "V wrong R":
        V = torch.cat([V, V[:1]])
    elif kind == "U column-major":
        U = U.t().contiguous().t()
    elif kind == "U strided":
        U = strided(U)
    elif kind == "U expanded":
        U = U[:1].expand(U.shape)
    elif kind == "V transposed layout":
        V = V.t().contiguous().t()
    elif kind == "R = 0":
        U, V = U[:, :0], V[:0]
    elif kind == "dim = 0":
        V = V[:, :0]
    elif kind == "num = 0":
        U = U[:0]
    elif kind == "dtype mix":
        V = V.to(torch.float32 if V.dtype == torch.float64 else torch.float64)
    elif kind == "nonfinite U":
        U, d = poison(r, U)
        kind += f" {d}"
    elif kind == "V expanded huge":  # [R, 2^31..2^60] columns of stride 0: too wide for BLAS
        V = V[:, :1].expand(V.shape[0], r.choice((2**31, 2**40, 2**60)))
    else:
        V, d = poison(r, V)
        kind += f" {d}"
    dim = V.shape[-1] if V.dim() >= 1 and V.shape[-1] < 2**31 else 1
    gy = randn(r, (*c.indices.shape, dim), c.gy.dtype)
    return kind, dataclasses.replace(c, U=U, V=V, gy=gy)


def me_emb_grad_y(r, c):
    g = c.gy
    kind = r.choice(("variant", "last dim+1", "flat", "transposed", "nonfinite", "extra dim",
                     "strided"))
    if kind == "variant":
        kind, g = tensor_variants(r, g)
    elif kind == "last dim+1":
        g = torch.cat([g, g[..., :1]], -1)
    elif kind == "flat":
        g = g.reshape(-1)
    elif kind == "transposed":
        g = g.transpose(0, -1) if g.dim() >= 2 else g
    elif kind == "nonfinite":
        g, d = poison(r, g)
        kind += f" {d}"
    elif kind == "extra dim":
        g = g.unsqueeze(0)
    else:
        g = strided(g)
    return f"grad_y {kind}", dataclasses.replace(c, gy=g)


def me_meta(r, c):
    kind = r.choice(("all meta", "all meta", "indices meta only", "factors meta only"))
    if kind == "all meta":
        return kind, dataclasses.replace(c, indices=to_meta(c.indices), U=to_meta(c.U),
                                         V=to_meta(c.V), w=to_meta(c.w), gy=to_meta(c.gy))
    if kind == "indices meta only":
        return kind, dataclasses.replace(c, indices=to_meta(c.indices))
    return kind, dataclasses.replace(c, U=to_meta(c.U), V=to_meta(c.V), w=to_meta(c.w))


def me_none(r, c):
    """None (an undefined tensor) for a tensor argument."""
    fields = ("indices", "gy") + (("U", "V") if c.U is not None else ("w",))
    which = r.choice(fields + ("nothing",))
    if which == "nothing":
        return "control", c
    return f"{which} None", dataclasses.replace(c, **{which: None})


def me_tt_lists(r, c):
    modes, dims, ranks = list(c.modes), list(c.dims), list(c.ranks)
    w = c.w
    kind = r.choice(("modes value", "dims value", "ranks value", "modes empty", "9 modes",
                     "8 modes of 1", "dims shorter", "ranks longer", "ranks ends", "vocabulary "
                     "overflows", "dims product overflows", "huge vocabulary",
                     "huge dim, no lookups", "as tuples"))
    num, idx, gy = c.num, c.indices, c.gy
    if kind == "modes value":
        modes, d = mutate_list(r, modes, 1)
        kind += f" {d}"
    elif kind == "dims value":
        dims, d = mutate_list(r, dims, 1)
        kind += f" {d}"
    elif kind == "ranks value":
        ranks, d = mutate_list(r, ranks, 1)
        kind += f" {d}"
    elif kind == "modes empty":
        modes = []
    elif kind == "9 modes":
        modes, dims, ranks = [1] * 9, [1] * 9, [1] * 10
        w = w.new_ones(9)
    elif kind == "8 modes of 1":  # valid: a table of one row of 1
        modes, dims, ranks, num = [1] * 8, [1] * 8, [1] * 9, 1
        w = randn(r, (8,), w.dtype)
        idx = idx.new_zeros(idx.shape)
        gy = randn(r, (*idx.shape, 1), w.dtype)
        if c.pad not in (-1, 0):
            c = dataclasses.replace(c, pad=-1)
    elif kind == "dims shorter":
        dims = dims[:-1]
    elif kind == "ranks longer":
        ranks = ranks + [1]
    elif kind == "ranks ends":
        ranks[r.choice((0, -1))] = r.choice((0, 2, -1, 2**62))
    elif kind == "vocabulary overflows":  # ∏ n_k = 2^64, the cores only 2048 numbers
        modes, dims, ranks = [256] * 8, [1] * 8, [1] * 9
        w = randn(r, (2048,), w.dtype)
    elif kind == "dims product overflows":
        modes, dims, ranks = [1] * 8, [256] * 8, [1] * 9
        w = randn(r, (2048,), w.dtype)
    elif kind == "huge vocabulary":  # ∏ n_k = 2^56 rows, valid: indices up to 2^56 - 1
        modes, dims, ranks = [128] * 8, [1] * 8, [1] * 9
        num = 2**56
        w = randn(r, (1024,), w.dtype, 0.9)
        idx = randint(r, 0, 2**56, idx.shape, torch.int64)
        gy = randn(r, (*idx.shape, 1), w.dtype)
        if c.pad != -1:
            c = dataclasses.replace(c, pad=r.choice((-1, 2**56 - 1, 12345)))
    elif kind == "huge dim, no lookups":  # y [0, 2^31]: nothing to compute
        modes, dims, ranks = [1, 1], [2**16, 2**15], [1, 1, 1]
        num = 1
        w = randn(r, (2**16 + 2**15,), w.dtype)
        idx = idx.new_zeros(0)
        gy = w.new_zeros(0, 2**31)
        c = dataclasses.replace(c, pad=-1)
    else:
        modes, dims, ranks = tuple(modes), tuple(dims), tuple(ranks)
    return f"lists {kind}", dataclasses.replace(c, modes=modes, dims=dims, ranks=ranks, w=w,
                                               num=num, indices=idx, gy=gy)


def me_tt_weights(r, c):
    kind, w = tensor_variants(r, c.w)
    if kind == "same" and r.random() < 0.5:
        w, d = poison(r, w)
        kind = f"nonfinite {d}"
    return f"weights {kind}", dataclasses.replace(c, w=w)


def me_tt_num(r, c):
    n_all = math.prod(c.modes)
    num = r.choice((-1, 0, 1, n_all, n_all + 1, c.num, 2**62, 2**63 - 1, -2**63))
    pad = c.pad if c.pad == -1 or (0 <= c.pad < max(num, 0)) else -1
    return f"num_embeddings {num}", dataclasses.replace(c, num=num, pad=pad)




# ---------------------------------------------------------------------------
# The cases of one category, and the tests
# ---------------------------------------------------------------------------
def lowrank_desc(c):
    return f"U {tuple(c.U.shape)} V {tuple(c.V.shape)} indices {tuple(c.indices.shape)} " \
           f"pad {c.pad}"


def tt_desc(c):
    return f"num {c.num} modes {c.modes} dims {c.dims} ranks {c.ranks} indices " \
           f"{tuple(c.indices.shape)} pad {c.pad}"


@dataclass(frozen=True)
class Family:
    """One embedding op and its backward: the valid call, how each runs and
    is verified, and the mutations of its arguments (the backward's also
    mutate grad_y)."""
    name: str
    base: object
    describe: object
    forward: object
    verify: object
    backward: object
    verify_backward: object
    mutations: dict

    def categories(self):
        muts = list(self.mutations)
        return ["valid", *muts, "valid_bwd", *[f"{m}_bwd" for m in muts], "grad_y_bwd"]


LOWRANK = Family(
    "lowrank", lowrank_base, lowrank_desc,
    lambda c: ops.lowrank_embedding(*c.lr_args()), verify_lowrank,
    lambda c: ops.lowrank_embedding_backward(*c.lr_bwd_args()), verify_lowrank_backward,
    {"indices": me_indices, "padding_idx": me_padding_idx, "factors": me_lowrank_factors,
     "meta": me_meta, "none": me_none})
TT = Family(
    "tt", tt_base, tt_desc,
    lambda c: ops.tt_embedding(*c.tt_args()), verify_tt,
    lambda c: ops.tt_embedding_backward(*c.tt_bwd_args()), verify_tt_backward,
    {"indices": me_indices, "padding_idx": me_padding_idx, "lists": me_tt_lists,
     "weights": me_tt_weights, "num_embeddings": me_tt_num, "meta": me_meta, "none": me_none})


def category_cases(r: random.Random, fam: Family, cat: str):
    bwd = cat.endswith("_bwd")
    kind = cat[:-4] if bwd else cat
    run, verify = (fam.backward, fam.verify_backward) if bwd else (fam.forward, fam.verify)
    mutate = me_emb_grad_y if kind == "grad_y" else fam.mutations.get(kind)
    cases = []
    for _ in range(N_VALID if kind == "valid" else N_PER_MUTATION):
        c = fam.base(r)
        desc = fam.describe(c)
        if mutate is not None:
            d, c = mutate(r, c)
            desc = f"{d}; base {desc}"
        cases.append(vary(r, Case(f"{fam.name}.{cat}", desc, lambda c=c: run(c), verify(c),
                                  EMB_NAMES, must_return=kind == "valid")))
    return cases


def check_family(fam: Family, cat: str):
    check_category(f"{fam.name}.{cat}", category_cases(category_rng(SEED, f"{fam.name}.{cat}"),
                                                       fam, cat))


@pytest.mark.parametrize("cat", LOWRANK.categories())
def test_lowrank_embedding_never_crashes_and_returns_right_results(cat):
    check_family(LOWRANK, cat)


@pytest.mark.parametrize("cat", TT.categories())
def test_tt_embedding_never_crashes_and_returns_right_results(cat):
    check_family(TT, cat)
