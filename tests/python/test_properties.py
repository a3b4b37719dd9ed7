"""Property tests of the layers (hypothesis): random shapes, ranks, leading
dims, input strides (contiguous, transposed, sliced) and dtypes; every
forward and gradient compared with a float64 reference computed from the
formed dense weight (or table, or kernel); every rejected input a Python
exception whose message names the argument.

Tolerances are elementwise rounding bounds, not guesses: the same reference
computed on the absolute values of the inputs and factors bounds every
intermediate sum the kernels form, so ``|got - ref| <= c·eps·bound`` with c
covering the accumulation lengths (a few hundred at most here)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as TF

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from factorch.nn import FactorizedConv2d, FactorizedEmbedding, FactorizedLinear  # noqa: E402

from helpers import rand  # noqa: E402

SETTINGS = dict(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
#: Relative rounding per accumulation step allowed, by dtype (c·eps).
TOL = {torch.float32: 2e-5, torch.float64: 1e-13}
REJECTED = (ValueError, TypeError, RuntimeError)
DTYPES = st.sampled_from([torch.float32, torch.float64])


def _strided(shape, dtype, gen, layout):
    """A tensor of ``shape`` whose memory is contiguous, transposed (last two
    dims swapped in memory) or sliced (every other element of the last dim)."""
    if layout == "transposed" and len(shape) >= 2:
        t = rand(*shape[:-2], shape[-1], shape[-2], dtype=dtype, gen=gen).transpose(-1, -2)
    elif layout == "sliced":
        t = rand(*shape[:-1], 2 * shape[-1], dtype=dtype, gen=gen)[..., ::2]
    else:
        t = rand(*shape, dtype=dtype, gen=gen)
    assert tuple(t.shape) == tuple(shape)
    return t


def _check_close(name, got, ref, bound, dtype):
    """|got - ref| <= TOL·bound elementwise (bound: the reference on absolute
    values), plus a floor for sums that cancel to nothing."""
    assert got.shape == ref.shape, (name, got.shape, ref.shape)
    got = got.double()
    tol = TOL[dtype] * bound + TOL[dtype] * 1e-3
    bad = (got - ref).abs() > tol
    assert not bad.any(), (f"{name}: {int(bad.sum())} of {bad.numel()} entries off; worst "
                           f"{((got - ref).abs() - tol).max().item():.3g} beyond the bound")


def _grads(out, inputs, gy):
    """d(sum(gy·out)) / d(inputs), zeros where an input does not reach out."""
    gs = torch.autograd.grad((out * gy).sum(), inputs, allow_unused=True)
    return [torch.zeros_like(i) if g is None else g for i, g in zip(inputs, gs)]


def _check_against_dense(dense, y, got, x, factors, bias, gy, dtype):
    """y and got (the gradients of x, the factors and the bias, where there is
    one) against the float64 reference dense(x, factors, bias), each within
    its rounding bound: the same on the absolute values, against |gy|."""
    x64 = x.detach().double().requires_grad_()
    f64 = factors.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_() if bias is not None else None
    ref = dense(x64, f64, b64)
    refs = _grads(ref, [x64, f64] + ([b64] if bias is not None else []), gy)
    xa, fa = x64.detach().abs().requires_grad_(), f64.detach().abs().requires_grad_()
    ba = b64.detach().abs().requires_grad_() if bias is not None else None
    bound = dense(xa, fa, ba)
    bounds = _grads(bound, [xa, fa] + ([ba] if bias is not None else []), gy.abs())
    _check_close("y", y, ref.detach(), bound.detach(), dtype)
    for name, g, r, b in zip(("grad x", "grad factors", "grad bias"), got, refs, bounds):
        _check_close(name, g, r, b, dtype)


def _non_empty(lead):
    """Leading dims with no zero (a rejected input must hold elements)."""
    return tuple(max(1, n) for n in lead)


def _names_an_argument(err: Exception, names) -> bool:
    msg = str(err)
    return any(f"{n}:" in msg or f"({n}" in msg or f"of {n}" in msg for n in names)


# --------------------------------------------------------------------------
# FactorizedLinear, every factorization
# --------------------------------------------------------------------------
@st.composite
def linear_cases(draw):
    fact = draw(st.sampled_from(["lowrank", "cp", "tucker", "tt"]))
    if fact == "lowrank":
        in_f, out_f = draw(st.integers(1, 24)), draw(st.integers(1, 24))
        rank, shape = draw(st.integers(1, min(in_f, out_f))), None
    else:
        d = draw(st.integers(1, 3))
        dq = d if fact == "tt" else draw(st.integers(1, 3))
        ins = tuple(draw(st.lists(st.integers(1, 4), min_size=d, max_size=d)))
        outs = tuple(draw(st.lists(st.integers(1, 4), min_size=dq, max_size=dq)))
        in_f, out_f, shape = math.prod(ins), math.prod(outs), (ins, outs)
        rank = {"cp": st.integers(1, 6), "tucker": st.integers(1, 4),
                "tt": st.integers(1, 3)}[fact]
        rank = draw(rank)
        if fact == "cp":
            rank = min(rank, in_f * out_f)  # CP ranks above in·out are refused
    lead = tuple(draw(st.lists(st.integers(0, 3), min_size=0, max_size=3)))
    return dict(fact=fact, in_f=in_f, out_f=out_f, rank=rank, shape=shape,
                bias=draw(st.booleans()), lead=lead, dtype=draw(DTYPES),
                layout=draw(st.sampled_from(["contiguous", "transposed", "sliced"])),
                seed=draw(st.integers(0, 2**31 - 1)))


@settings(**SETTINGS)
@given(linear_cases())
def test_linear_matches_the_dense_reference(c):
    gen = torch.Generator().manual_seed(c["seed"])
    torch.manual_seed(c["seed"])
    layer = FactorizedLinear(c["in_f"], c["out_f"], c["fact"], rank=c["rank"],
                             tensorized_shape=c["shape"], bias=c["bias"], dtype=c["dtype"])
    x = _strided((*c["lead"], c["in_f"]), c["dtype"], gen, c["layout"]).requires_grad_()
    y = layer(x)
    gy = rand(*y.shape, dtype=torch.float64, gen=gen)
    params = [layer.factors] + ([layer.bias] if c["bias"] else [])
    got = _grads(y, [x] + params, gy.to(c["dtype"]))

    def dense(xv, fv, bv):  # the formed W
        out = xv @ layer.layout.to_dense(fv).T
        return out + bv if bv is not None else out

    _check_against_dense(dense, y, got, x, layer.factors, layer.bias if c["bias"] else None, gy,
                         c["dtype"])


@settings(**SETTINGS)
@given(linear_cases(), st.sampled_from(["last dim", "dtype", "not a tensor", "0-d", "bfloat16"]))
def test_linear_rejects_bad_inputs_naming_them(c, what):
    layer = FactorizedLinear(c["in_f"], c["out_f"], c["fact"], rank=c["rank"],
                             tensorized_shape=c["shape"], bias=c["bias"], dtype=c["dtype"])
    other = torch.float64 if c["dtype"] == torch.float32 else torch.float32
    lead = _non_empty(c["lead"])
    x = {"last dim": lambda: torch.zeros(*lead, c["in_f"] + 1, dtype=c["dtype"]),
         "dtype": lambda: torch.zeros(*lead, c["in_f"], dtype=other),
         "not a tensor": lambda: [[0.0] * c["in_f"]],
         "0-d": lambda: torch.tensor(1.0, dtype=c["dtype"]),
         "bfloat16": lambda: torch.zeros(2, c["in_f"], dtype=torch.bfloat16)}[what]()
    with pytest.raises(REJECTED) as e:
        layer(x)
    assert _names_an_argument(e.value, ["x"]), str(e.value)


# --------------------------------------------------------------------------
# FactorizedConv2d
# --------------------------------------------------------------------------
@st.composite
def conv_cases(draw):
    fact = draw(st.sampled_from(["lowrank", "cp", "tucker", "tt"]))
    groups = 1 if fact == "tt" else draw(st.sampled_from([1, 2]))
    cin = groups * draw(st.integers(1, 3))
    cout = groups * draw(st.integers(1, 3))
    k = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "circular"]))
    if mode != "zeros":  # torch's padding modes need pads below the size
        padding = tuple(min(p, 1) for p in padding)
    rank = draw(st.integers(1, 3))
    need = [dl * (kk - 1) + 1 for dl, kk in zip(dilation, k)]
    h = draw(st.integers(max(1, need[0] - 2 * padding[0], 2), 7))
    w = draw(st.integers(max(1, need[1] - 2 * padding[1], 2), 7))
    return dict(fact=fact, groups=groups, cin=cin, cout=cout, k=k, stride=stride,
                dilation=dilation, padding=padding, mode=mode, rank=rank,
                bias=draw(st.booleans()), n=draw(st.integers(0, 3)), h=h, w=w,
                dtype=draw(DTYPES), layout=draw(st.sampled_from(["contiguous", "transposed",
                                                                   "sliced"])),
                seed=draw(st.integers(0, 2**31 - 1)))


def _make_conv(c):
    kw = dict(stride=c["stride"], padding=c["padding"], dilation=c["dilation"],
              groups=c["groups"], bias=c["bias"], padding_mode=c["mode"], dtype=c["dtype"])
    try:
        return FactorizedConv2d(c["cin"], c["cout"], c["k"], c["fact"], rank=c["rank"], **kw)
    except ValueError as e:  # above the rank this geometry allows: rank 1 always fits
        assert str(e).startswith("rank:"), str(e)
        return FactorizedConv2d(c["cin"], c["cout"], c["k"], c["fact"], rank=1, **kw)


@settings(**SETTINGS)
@given(conv_cases())
def test_conv2d_matches_the_dense_reference(c):
    gen = torch.Generator().manual_seed(c["seed"])
    torch.manual_seed(c["seed"])
    conv = _make_conv(c)
    x = _strided((c["n"], c["cin"], c["h"], c["w"]), c["dtype"], gen,
                 c["layout"]).requires_grad_()
    y = conv(x)
    gy = rand(*y.shape, dtype=torch.float64, gen=gen)
    params = [conv.factors] + ([conv.bias] if c["bias"] else [])
    got = _grads(y, [x] + params, gy.to(c["dtype"]))

    pads = [p for p in reversed(c["padding"]) for _ in range(2)]

    def dense(xv, fv, bv):
        W = conv._layout.reconstruct(fv).reshape(c["cout"], c["cin"] // c["groups"], *c["k"])
        if c["mode"] != "zeros":
            xv, pad = TF.pad(xv, pads, mode=c["mode"]), 0
        else:
            pad = c["padding"]
        return TF.conv2d(xv, W, bv, c["stride"], pad, c["dilation"], c["groups"])

    _check_against_dense(dense, y, got, x, conv.factors, conv.bias if c["bias"] else None, gy,
                         c["dtype"])


@settings(**SETTINGS)
@given(conv_cases(), st.sampled_from(["channels", "dims", "dtype", "too small", "not a tensor"]))
def test_conv2d_rejects_bad_inputs_naming_them(c, what):
    conv = _make_conv(c)
    other = torch.float64 if c["dtype"] == torch.float32 else torch.float32
    n, ci = max(c["n"], 1), c["cin"]
    x = {"channels": lambda: torch.zeros(n, ci + 1, 8, 8, dtype=c["dtype"]),
         "dims": lambda: torch.zeros(n, ci, 8, 8, 1, dtype=c["dtype"]),
         "dtype": lambda: torch.zeros(n, ci, 8, 8, dtype=other),
         "too small": lambda: torch.zeros(n, ci, 1, 1, dtype=c["dtype"]),
         "not a tensor": lambda: 3.0}[what]()
    if what == "too small" and all(dl * (kk - 1) + 1 <= 1 + 2 * p for dl, kk, p in zip(
            c["dilation"], c["k"], c["padding"])):
        hypothesis.assume(False)  # a 1x1 input is fine for this kernel
    with pytest.raises(REJECTED) as e:
        conv(x)
    assert _names_an_argument(e.value, ["x"]), str(e.value)


# --------------------------------------------------------------------------
# FactorizedEmbedding
# --------------------------------------------------------------------------
@st.composite
def embedding_cases(draw):
    fact = draw(st.sampled_from(["lowrank", "tt"]))
    num, dim = draw(st.integers(1, 40)), draw(st.integers(1, 12))
    if fact == "lowrank":
        rank, shape = draw(st.integers(1, min(num, dim))), None
    else:
        d = draw(st.integers(1, 3))
        ms = tuple(draw(st.lists(st.integers(1, 4), min_size=d, max_size=d)))
        dim = math.prod(ms)
        ns = [2] * d
        while math.prod(ns) < num:  # vocabulary modes covering num
            ns[int(torch.tensor(ns).argmin())] += 1
        shape, rank = (tuple(ns), ms), draw(st.integers(1, 3))
    pad = draw(st.one_of(st.none(), st.integers(-num, num - 1)))
    lead = tuple(draw(st.lists(st.integers(0, 3), min_size=0, max_size=3)))
    return dict(fact=fact, num=num, dim=dim, rank=rank, shape=shape, pad=pad, lead=lead,
                dtype=draw(DTYPES), idx_dtype=draw(st.sampled_from([torch.int64, torch.int32])),
                sliced=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))


def _make_embedding(c):
    return FactorizedEmbedding(c["num"], c["dim"], c["fact"], rank=c["rank"],
                               tensorized_shape=c["shape"], padding_idx=c["pad"],
                               dtype=c["dtype"])


@settings(**SETTINGS)
@given(embedding_cases())
def test_embedding_matches_the_dense_table(c):
    gen = torch.Generator().manual_seed(c["seed"])
    torch.manual_seed(c["seed"])
    emb = _make_embedding(c)
    idx = torch.randint(0, c["num"], (*c["lead"], 2 if c["sliced"] else 1), generator=gen)
    idx = (idx[..., ::2] if c["sliced"] else idx[..., 0]).to(c["idx_dtype"])
    y = emb(idx)
    gy = rand(*y.shape, dtype=torch.float64, gen=gen)
    (got,) = _grads(y, [emb.factors], gy.to(c["dtype"]))

    def table(fv):
        t = emb.layout.to_dense(fv)
        if c["fact"] == "tt":
            t = t.T[: c["num"]]
        if emb.padding_idx is not None:
            keep = torch.ones(c["num"], 1, dtype=t.dtype)
            keep[emb.padding_idx] = 0
            t = t * keep
        return t

    f64 = emb.factors.detach().double().requires_grad_()
    ref = table(f64)[idx.long()]
    (ref_g,) = _grads(ref, [f64], gy)
    fa = f64.detach().abs().requires_grad_()
    bound = table(fa)[idx.long()]
    (bound_g,) = _grads(bound, [fa], gy.abs())
    _check_close("y", y, ref.detach(), bound.detach(), c["dtype"])
    _check_close("grad factors", got, ref_g, bound_g, c["dtype"])
    if emb.padding_idx is not None:  # the padding row reads as zeros
        assert (emb(torch.tensor([emb.padding_idx])) == 0).all()


@settings(**SETTINGS)
@given(embedding_cases(), st.sampled_from(["too large", "negative", "float", "not a tensor"]))
def test_embedding_rejects_bad_indices_naming_them(c, what):
    emb = _make_embedding(c)
    lead = _non_empty(c["lead"])
    idx = {"too large": lambda: torch.full((*lead, 1), c["num"]),
           "negative": lambda: torch.full((*lead, 1), -1),
           "float": lambda: torch.zeros(*lead, 1),
           "not a tensor": lambda: [0, 1]}[what]()
    with pytest.raises(REJECTED) as e:
        emb(idx)
    assert _names_an_argument(e.value, ["indices"]), str(e.value)


# --------------------------------------------------------------------------
# Constructor arguments: a valid layer with one argument (or none) replaced by
# an odd value; either it builds and runs, or the refusal names the argument
# --------------------------------------------------------------------------
ODD = st.one_of(st.integers(-3, 40), st.floats(-0.5, 1.5), st.just(float("nan")), st.none(),
                st.booleans(), st.sampled_from(["same", "bogus", (2, 2), (1, 2, 1), (0,), [],
                                                ((2, 2), (3, 2)), ((4,), (6,)), (4, 6)]))


ARG_NAMES = ["in_features", "out_features", "rank", "tensorized_shape", "factorization",
             "in_channels", "out_channels", "kernel_size", "groups", "stride", "padding",
             "dilation", "num_embeddings", "embedding_dim", "padding_idx", "bias"]


def _build_or_refuse(make, kwargs, bad, value, run):
    if bad is not None:
        kwargs = {**kwargs, bad: value}
    try:
        layer = make(**kwargs)
    except REJECTED as e:
        assert bad is not None, f"a valid layer was refused: {e}"
        # The argument itself, or one it conflicts with (in_features and
        # tensorized_shape, channels and groups).
        assert _names_an_argument(e, ARG_NAMES), str(e)
        hypothesis.event("refused")
        return
    hypothesis.event("built")
    run(layer, kwargs)


@settings(**SETTINGS)
@given(linear_cases(), st.sampled_from([None, "in_features", "out_features", "rank",
                                        "tensorized_shape", "factorization", "bias"]), ODD)
def test_linear_constructor_refusals_name_the_argument(c, bad, value):
    kwargs = dict(in_features=c["in_f"], out_features=c["out_f"], factorization=c["fact"],
                  rank=c["rank"], tensorized_shape=c["shape"])

    def run(layer, kw):
        y = layer(torch.randn(2, layer.in_features))
        assert y.shape == (2, layer.out_features) and torch.isfinite(y).all()

    _build_or_refuse(FactorizedLinear, kwargs, bad, value, run)


@settings(**SETTINGS)
@given(conv_cases(), st.sampled_from([None, "in_channels", "out_channels", "kernel_size",
                                      "rank", "stride", "padding", "dilation", "groups",
                                      "factorization"]), ODD)
def test_conv_constructor_refusals_name_the_argument(c, bad, value):
    kwargs = dict(in_channels=c["cin"], out_channels=c["cout"], kernel_size=c["k"],
                  factorization=c["fact"], rank=1, stride=c["stride"], padding=c["padding"],
                  dilation=c["dilation"], groups=c["groups"])

    def run(conv, kw):
        need = [d * (k - 1) + 1 for d, k in zip(conv.dilation, conv.kernel_size)]
        y = conv(torch.randn(1, conv.in_channels, max(need) + 1, max(need) + 1))
        assert y.shape[:2] == (1, conv.out_channels) and torch.isfinite(y).all()

    _build_or_refuse(FactorizedConv2d, kwargs, bad, value, run)


@settings(**SETTINGS)
@given(embedding_cases(), st.sampled_from([None, "num_embeddings", "embedding_dim", "rank",
                                           "padding_idx", "tensorized_shape",
                                           "factorization"]), ODD)
def test_embedding_constructor_refusals_name_the_argument(c, bad, value):
    kwargs = dict(num_embeddings=c["num"], embedding_dim=c["dim"], factorization=c["fact"],
                  rank=c["rank"], tensorized_shape=c["shape"], padding_idx=c["pad"])

    def run(emb, kw):
        y = emb(torch.arange(emb.num_embeddings))
        assert y.shape == (emb.num_embeddings, emb.embedding_dim) and torch.isfinite(y).all()

    _build_or_refuse(FactorizedEmbedding, kwargs, bad, value, run)
