"""Seeded fuzz of the linear ops (torch.ops.factorch.lowrank_linear,
cp_linear, tucker_linear, tt_linear) through factorch.functional: random mode counts
and sizes (size-1 modes included), ranks, leading batch shapes (M = 0 and 1
included), x layouts (transposed, sliced, broadcast), dtypes, bias or none,
and which gradients are asked for. Half the calls run under torch.no_grad().

Each call's output and gradients must match a float64 reference that forms
W from the factors (written here independently of factorch) and multiplies
by it, to a tolerance scaled by the magnitudes of the terms. A second part
mutates one thing (a rank that no longer matches its neighbours, x's
features, the bias' size, x's dtype, NaN in x), one pytest node per
mutation, and holds the calls to fuzz_harness's standard: each must raise an
exception naming an argument (NaN: from the finite check, on by default).

Deterministic (fixed seed); a few seconds.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from factorch import functional as F

from fuzz_harness import Case, category_rng, check_category, randn

SEED = 20261128
CALLS = 300


def modes(r: random.Random, d: int) -> list[int]:
    return [r.choice([1, 1, 2, 3, 4, 5]) for _ in range(d)]


def kr_rows(fs):
    """Khatri-Rao product of [n_k, R] factors, first factor slowest: [∏ n_k, R]."""
    acc = fs[0]
    for f in fs[1:]:
        acc = (acc[:, None, :] * f[None, :, :]).reshape(-1, f.shape[1])
    return acc


def dense_cp(A, B):
    return kr_rows(B) @ kr_rows(A).T


def dense_tucker(core, V, U):
    q = len(U)
    t = core
    for k, u in enumerate(U):  # output modes first
        t = torch.movedim(torch.tensordot(u, t, ([1], [k])), 0, k)
    for k, v in enumerate(V):
        t = torch.movedim(torch.tensordot(v, t, ([1], [q + k])), 0, q + k)
    out = math.prod(u.shape[0] for u in U)
    return t.reshape(out, -1)


def dense_tt(G):
    # cur [(i_1..i_k), (o_1..o_k), r_k]
    cur = torch.ones(1, 1, 1, dtype=G[0].dtype)
    for g in G:
        r0, i, o, r1 = g.shape
        cur = torch.einsum("abr,rios->aibos", cur, g)
        a, i_, b, o_, s = cur.shape
        cur = cur.reshape(a * i_, b * o_, s)
    return cur[:, :, 0].T  # [out, in]


def random_case(r: random.Random):
    kind = r.choice(["lowrank", "cp", "tucker", "tt"])
    dtype = r.choice([torch.float32, torch.float64])
    g = torch.Generator().manual_seed(r.getrandbits(48))
    if kind == "lowrank":
        ins, outs = [r.choice([1, 2, 3, 7, 16, 33])], [r.choice([1, 2, 5, 16, 31])]
        R = r.randint(1, 9)
        facs = [torch.randn(outs[0], R, generator=g, dtype=dtype),
                torch.randn(R, ins[0], generator=g, dtype=dtype)]
        run = lambda x, fs, b: F.lowrank_linear(x, fs[0], fs[1], b)
        dense = lambda fs: fs[0] @ fs[1]
    elif kind == "tt":
        d = r.randint(1, 4)
        ins, outs = modes(r, d), modes(r, d)
        ranks = [1] + [r.randint(1, 4) for _ in range(d - 1)] + [1]
        facs = [torch.randn(ranks[k], ins[k], outs[k], ranks[k + 1], generator=g, dtype=dtype)
                for k in range(d)]
        run = lambda x, fs, b: F.tt_linear(x, fs, b)
        dense = lambda fs: dense_tt(fs)
    elif kind == "cp":
        ins, outs = modes(r, r.randint(1, 3)), modes(r, r.randint(1, 3))
        R = r.randint(1, 6)
        facs = [torch.randn(n, R, generator=g, dtype=dtype) for n in ins + outs]
        p = len(ins)
        run = lambda x, fs, b: F.cp_linear(x, fs[:p], fs[p:], b)
        dense = lambda fs: dense_cp(fs[:p], fs[p:])
    else:
        ins, outs = modes(r, r.randint(1, 3)), modes(r, r.randint(1, 3))
        t = [r.randint(1, n) for n in ins]
        s = [r.randint(1, n) for n in outs]
        p = len(ins)
        facs = ([torch.randn(*s, *t, generator=g, dtype=dtype)]
                + [torch.randn(n, k, generator=g, dtype=dtype) for n, k in zip(ins, t)]
                + [torch.randn(n, k, generator=g, dtype=dtype) for n, k in zip(outs, s)])
        run = lambda x, fs, b: F.tucker_linear(x, fs[0], fs[1:1 + p], fs[1 + p:], b)
        dense = lambda fs: dense_tucker(fs[0], fs[1:1 + p], fs[1 + p:])
    n_in, n_out = math.prod(ins), math.prod(outs)
    lead = r.choice([[], [0], [1], [3], [2, 3], [r.randint(1, 40)]])
    x = torch.randn(*lead, n_in, generator=g, dtype=dtype)
    layout = r.random()
    if layout < 0.2 and x.dim() >= 2:
        x = x.transpose(0, -1).contiguous().transpose(0, -1)
    elif layout < 0.35:
        x = torch.randn(*lead, 2 * n_in, generator=g, dtype=dtype)[..., ::2]
    elif layout < 0.45 and x.dim() >= 2 and x.shape[0] > 0:
        x = x[:1].expand(x.shape)
    bias = torch.randn(n_out, generator=g, dtype=dtype) if r.random() < 0.6 else None
    return kind, x, facs, bias, run, dense


def amax(t) -> float:
    return t.detach().abs().max().item() if t.numel() else 0.0


def reference(x, facs, bias, dense):
    """y = x·Wᵀ + bias with W formed from the factors; differentiable."""
    W = dense(facs)
    y = x @ W.T
    if bias is not None:
        y = y + bias
    return y


def test_fuzz_linear_ops_values_and_gradients():
    r = random.Random(SEED)
    for i in range(CALLS):
        kind, x, facs, bias, run, dense = random_case(r)
        label = f"call {i}: {kind} x{tuple(x.shape)} {x.dtype} strides {x.stride()}"
        no_grad = r.random() < 0.5
        want = [r.random() < 0.7 for _ in range(len(facs) + 2)]
        xs = x.detach().clone().requires_grad_(want[0]) if not no_grad else x
        if not no_grad and x.stride() != xs.stride():
            xs = x.detach().requires_grad_(want[0])  # keep the layout under test
        fs = [f.detach().clone().requires_grad_(w and not no_grad) for f, w in zip(facs, want[1:])]
        b = None if bias is None else bias.detach().clone().requires_grad_(want[-1] and not no_grad)
        if no_grad:
            with torch.no_grad():
                y = run(xs, fs, b)
        else:
            y = run(xs, fs, b)
        x64 = x.detach().double().requires_grad_()
        f64 = [f.detach().double().requires_grad_() for f in facs]
        b64 = None if bias is None else bias.detach().double().requires_grad_()
        y64 = reference(x64, f64, b64, dense)
        # the magnitudes of the terms: the same product of absolute values
        mag = reference(x64.detach().abs(), [f.detach().abs() for f in f64],
                        None if b64 is None else b64.detach().abs(), dense)
        tol = (2e-5 if x.dtype == torch.float32 else 1e-12) * (1 + amax(mag))
        assert y.shape == y64.shape and y.dtype == x.dtype, label
        err = amax(y.double() - y64)
        assert err <= tol, f"{label}: output off by {err:.3g} (tolerance {tol:.3g})"
        if no_grad or not y.requires_grad:
            continue
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(i), dtype=x.dtype)
        y.backward(gy)
        y64.backward(gy.double())
        pairs = [(xs, x64, "grad_x")] + [(f, f64[k], f"grad_factor[{k}]") for k, f in enumerate(fs)]
        if b is not None:
            pairs.append((b, b64, "grad_bias"))
        for t, t64, name in pairs:
            if not t.requires_grad:
                continue
            assert t.grad is not None, f"{label}: no {name}"
            g_scale = 1 + amax(t64.grad) + amax(gy) * (1 + amax(mag))
            gtol = (5e-5 if x.dtype == torch.float32 else 1e-11) * g_scale
            err = amax(t.grad.double() - t64.grad)
            assert err <= gtol, f"{label}: {name} off by {err:.3g} (tolerance {gtol:.3g})"


NAMED = ("x", "U", "V", "in_factors", "out_factors", "core", "cores", "bias", "weights",
         "in_modes", "out_modes", "rank", "ranks", "in_ranks", "out_ranks")
MUTATIONS = ("rank_dim", "x_features", "bias_size", "dtype", "nan")
BAD_CALLS = CALLS // 2 // len(MUTATIONS)  # calls per mutation


def broken_call(r: random.Random, what: str) -> Case:
    """A random valid call with one thing broken, so that it must raise (NaN:
    through the finite check, on by default)."""
    kind, x, facs, bias, run, dense = random_case(r)
    while what == "nan" and x.numel() == 0:  # NaN needs an element to sit in
        kind, x, facs, bias, run, dense = random_case(r)
    fs = list(facs)
    n_out = dense([f.double() for f in facs]).shape[0]
    desc = f"{kind} x{tuple(x.shape)} {x.dtype}"
    if what == "rank_dim":  # a rank no longer matching its neighbours
        if kind == "lowrank":  # U's columns or V's rows
            k = r.randrange(2)
            dim = 1 - k
        elif kind == "cp":
            k, dim = r.randrange(len(fs)), 1
        elif kind == "tt":
            k = r.randrange(len(fs))
            dim = r.choice([0, 3])
        else:  # the core (any dim), or a factor's rank
            k = r.randrange(len(fs))
            dim = r.randrange(fs[0].dim()) if k == 0 else 1
        shape = list(fs[k].shape)
        shape[dim] += 1
        fs[k] = randn(r, shape, fs[k].dtype)
        desc += f", factor {k} {tuple(shape)}"
    elif what == "x_features":
        x = randn(r, (*x.shape[:-1], x.shape[-1] + 1), x.dtype)
    elif what == "bias_size":
        bias = randn(r, (n_out + 1,), x.dtype)
    elif what == "dtype":  # x's dtype no longer the factors'
        x = x.to(torch.float64 if x.dtype == torch.float32 else torch.float32)
    else:
        x = x.contiguous().clone()
        x.view(-1)[0] = float("nan")
    return Case(f"linear.{what}", desc, lambda: run(x, fs, bias), None, NAMED, must_raise=True)


@pytest.mark.parametrize("what", MUTATIONS)
def test_fuzz_linear_ops_bad_arguments(what):
    r = category_rng(SEED + 1, what)
    cases = [broken_call(r, what) for _ in range(BAD_CALLS)]
    check_category(f"linear.{what}", cases, allowed=(RuntimeError, ValueError, TypeError))
