"""factorch.dlpack: every op, forward and backward, on numpy, JAX (CPU) and
torch arrays against the torch ops in float64; inputs and outputs are not
copied (data pointers), the numpy path allocates only its outputs and the
op's workspace (tracemalloc); read-only arrays; errors."""

from __future__ import annotations

import tracemalloc
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch

import factorch.dlpack as fd
from factorch.nn import FactorizedConv2d, FactorizedEmbedding, FactorizedLinear

ops = torch.ops.factorch


def rnd(*shape, seed=[0]):
    seed[0] += 1
    g = torch.Generator().manual_seed(seed[0])
    return torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1


@dataclass
class Case:
    arrays: dict                      # name (as the C op names it) -> torch float64 tensor
    forward: Callable                 # arrays in some framework -> y
    y: torch.Tensor
    backward: Callable                # arrays -> dict of gradients
    grads: dict


def _linear_case(factorization, **kw):
    torch.manual_seed(0)
    layer = FactorizedLinear(24, 30, factorization, **kw).double()
    ints = tuple(layer.layout.op_args()) if factorization != "lowrank" else (30, layer.rank)
    x, gy = rnd(64, 8, 24), rnd(64, 8, 30)
    w, b = layer.factors.detach(), layer.bias.detach()
    name = "lowrank_linear_flat" if factorization == "lowrank" else f"{factorization}_linear"
    keep = (True,) if factorization == "tucker" else ()  # its states, for the backward
    out = getattr(ops, name)(x, w, b, *ints, *keep)
    y = out[0] if isinstance(out, tuple) else out
    extra = (out[1],) if isinstance(out, tuple) else ()  # t, z or Tucker's states
    gx, gw, gb = getattr(ops, name + "_backward")(gy, x, w, *extra, *ints, True, True, True)
    f, fb = getattr(fd, name), getattr(fd, name + "_backward")
    return Case(dict(x=x, weights=w, bias=b, grad_y=gy),
                lambda a: f(a["x"], a["weights"], a["bias"], *ints), y,
                lambda a: fb(a["grad_y"], a["x"], a["weights"], *ints),
                dict(x=gx, weights=gw, bias=gb))


def _lowrank_unflat_case():
    x, U, V, b, gy = rnd(64, 8, 24), rnd(30, 5), rnd(5, 24), rnd(30), rnd(64, 8, 30)
    y, t = ops.lowrank_linear(x, U, V, b)
    gx, gU, gV, gb = ops.lowrank_linear_backward(gy, x, U, V, t, True, True, True, True)
    return Case(dict(x=x, U=U, V=V, bias=b, grad_y=gy),
                lambda a: fd.lowrank_linear(a["x"], a["U"], a["V"], a["bias"]), y,
                lambda a: fd.lowrank_linear_backward(a["grad_y"], a["x"], a["U"], a["V"]),
                dict(x=gx, U=gU, V=gV, bias=gb))


def _conv_case(factorization, **kw):
    torch.manual_seed(0)
    conv = FactorizedConv2d(4, 6, 3, factorization, **kw).double()
    x = rnd(16, 4, 9, 9)
    stages, out_shape = conv._layout.stages(9, 9)
    w, b = conv.factors.detach(), conv.bias.detach()
    y, saved = ops.conv_chain(x, w, b, stages, out_shape, True)
    gy = rnd(*y.shape)
    gx, gw, gb = ops.conv_chain_backward(gy, x, w, saved, stages, True, True, True)

    def backward(a):
        _, s = fd.conv_chain(a["x"], a["weights"], a["bias"], stages, out_shape, keep=True)
        return fd.conv_chain_backward(a["grad_y"], a["x"], a["weights"], s, stages)

    return Case(dict(x=x, weights=w, bias=b, grad_y=gy),
                lambda a: fd.conv_chain(a["x"], a["weights"], a["bias"], stages, out_shape), y,
                backward, dict(x=gx, weights=gw, bias=gb))


def _embedding_case(factorization):
    torch.manual_seed(0)
    rank = 5 if factorization == "lowrank" else (1, 3, 2, 1)
    emb = FactorizedEmbedding(60, 24, factorization, rank=rank, padding_idx=2).double()
    idx = torch.randint(0, 60, (50, 7))
    idx[0, :3] = 2
    gy = rnd(50, 7, 24)
    if factorization == "lowrank":
        U, V = (t.detach().contiguous() for t in (emb.U, emb.V))
        y = ops.lowrank_embedding(idx, U, V, 2)
        gU, gV = ops.lowrank_embedding_backward(gy, idx, U, V, 2, True, True)
        return Case(dict(indices=idx, U=U, V=V, grad_y=gy),
                    lambda a: fd.lowrank_embedding(a["indices"], a["U"], a["V"], 2), y,
                    lambda a: fd.lowrank_embedding_backward(a["grad_y"], a["indices"], a["U"],
                                                            a["V"], 2),
                    dict(U=gU, V=gV))
    w = emb.factors.detach()
    ints = (60, *emb.layout.op_args())
    y = ops.tt_embedding(idx, w, *ints, 2)
    gw = ops.tt_embedding_backward(gy, idx, w, *ints, 2)
    return Case(dict(indices=idx, weights=w, grad_y=gy),
                lambda a: fd.tt_embedding(a["indices"], a["weights"], *ints, 2), y,
                lambda a: fd.tt_embedding_backward(a["grad_y"], a["indices"], a["weights"],
                                                   *ints, 2),
                dict(weights=gw))


def _lora_case(kind):
    """The fused LoRA op with dropout (seed fixed), every base gradient asked
    for: a dense base with bias, a low-rank base, a given base output."""
    x, A, B, gy = rnd(16, 6, 24), rnd(4, 24), rnd(30, 4), rnd(16, 6, 30)
    e = x.new_empty(0)
    arr = dict(x=x, A=A, B=B, grad_y=gy)
    if kind == "dense":
        arr.update(W=rnd(30, 24), bias=rnd(30))
    elif kind == "lowrank":
        arr.update(U=rnd(30, 5), V=rnd(5, 24))
    else:
        arr.update(base_out=rnd(16, 6, 30))
    seed, scale, p = 1234, 0.75, 0.25
    k = {"dense": 0, "lowrank": 1, "given": 2}[kind]
    W, U, V, bo, b = (arr.get(n, e) for n in ("W", "U", "V", "base_out", "bias"))
    y, t = ops.lora_linear(x, A, B, W, U, V, bo, b, torch.tensor([seed]), k, scale, p)
    want = {"dense": ("W", "bias"), "lowrank": ("U", "V"), "given": ()}[kind]
    flags = [True, True, True] + [n in want for n in ("W", "U", "V", "bias")]
    g = ops.lora_linear_backward(gy, x, A, B, W, U, V, t, torch.tensor([seed]), k, scale, p,
                                 *flags)
    names = ("x", "A", "B", "W", "U", "V", "bias")
    grads = {n: v for n, v, f in zip(names, g, flags) if f}
    base_args = {n: n for n in ("W", "U", "V", "bias", "base_out") if n in arr}

    def fwd(a):
        return fd.lora_linear(a["x"], a["A"], a["B"], scale, dropout=p, seed=seed,
                              **{n: a[n] for n in base_args})

    def bwd(a):
        kw = {n: a[n] for n in base_args if n != "base_out"}
        return fd.lora_linear_backward(a["grad_y"], a["x"], a["A"], a["B"], scale, dropout=p,
                                       seed=seed, given_base=kind == "given",
                                       need=("x", "A", "B", *want), **kw)

    return Case(arr, fwd, y, bwd, grads)


CASES = {
    "lora_linear_dense": lambda: _lora_case("dense"),
    "lora_linear_lowrank": lambda: _lora_case("lowrank"),
    "lora_linear_given": lambda: _lora_case("given"),
    "lowrank_linear": _lowrank_unflat_case,
    "lowrank_linear_flat": lambda: _linear_case("lowrank", rank=5),
    "cp_linear": lambda: _linear_case("cp", rank=6, tensorized_shape=((2, 3, 4), (5, 3, 2))),
    "tucker_linear": lambda: _linear_case("tucker", rank=((2, 2, 3), (3, 2, 2)),
                                          tensorized_shape=((2, 3, 4), (5, 3, 2))),
    "tt_linear": lambda: _linear_case("tt", rank=(1, 3, 4, 1),
                                      tensorized_shape=((2, 3, 4), (5, 3, 2))),
    "conv_chain_cp": lambda: _conv_case("cp", rank=3, padding=1),
    "conv_chain_tucker": lambda: _conv_case("tucker", rank=(2, 3), stride=2),
    "conv_chain_tt": lambda: _conv_case("tt", rank=(2, 2), tensorized_shape=((2, 2), (2, 3)),
                                        padding=1),
    "lowrank_embedding": lambda: _embedding_case("lowrank"),
    "tt_embedding": lambda: _embedding_case("tt"),
}


def _check(case, to_array, from_array):
    arrays = {k: to_array(v) for k, v in case.arrays.items()}
    y = case.forward(arrays)
    torch.testing.assert_close(from_array(y), case.y, rtol=1e-12, atol=1e-12)
    grads = case.backward(arrays)
    assert set(grads) == set(case.grads)
    for k, g in grads.items():
        torch.testing.assert_close(from_array(g), case.grads[k], rtol=1e-11, atol=1e-11)
    return arrays, y, grads


def _pointers_are(records, arrays, address):
    """Every array the C op got is the caller's memory itself."""
    seen = set()
    for rec in records:
        for name, arr in arrays.items():
            if name in rec["pointers"]:
                assert rec["pointers"][name] == address(arr), (rec["op"], name)
                seen.add(name)
    assert seen == set(arrays)


@pytest.mark.parametrize("name", list(CASES))
def test_numpy(name):
    case = CASES[name]()
    fd.trace = []
    try:
        arrays, y, grads = _check(case, lambda t: t.numpy(), torch.from_numpy)
        assert isinstance(y, np.ndarray) and all(isinstance(g, np.ndarray) for g in grads.values())
        _pointers_are(fd.trace, arrays, lambda a: a.ctypes.data)
        # The outputs the caller got are what the op wrote.
        assert fd.trace[0]["pointers"]["y"] == y.ctypes.data
    finally:
        fd.trace = None


@pytest.mark.parametrize("name", list(CASES))
def test_torch(name):
    case = CASES[name]()
    arrays, y, grads = _check(case, lambda t: t, lambda t: t)
    assert isinstance(y, torch.Tensor)


@pytest.mark.parametrize("name", list(CASES))
def test_numpy_allocates_only_outputs_and_workspace(name):
    """Peak traced memory of a call: its outputs, its workspace (+256
    alignment bytes) and 6-20 KB of ctypes structures; a copy of a batched
    input (x, grad_y: 12 KB to 120 KB) would not fit. The pointer checks of
    the other tests cover the small inputs (factors, indices)."""
    case = CASES[name]()
    arrays = {k: v.numpy() for k, v in case.arrays.items()}
    for fn in (case.forward, case.backward):
        if name.startswith("conv") and fn is case.backward:
            continue  # its helper forward call allocates `saved` as well
        fn(arrays)  # warm: ctypes caches, lazy imports
        fd.trace = []
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            res = fn(arrays)
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
        outs = res.values() if isinstance(res, dict) else [res]
        out_bytes = sum(o.nbytes + 64 for o in outs)
        ws = sum(r["workspace_bytes"] + 256 for r in fd.trace)
        fd.trace = None
        assert peak <= out_bytes + ws + 24_000, (peak, out_bytes, ws)


@pytest.fixture(scope="module")
def jnp():
    jax = pytest.importorskip("jax", reason="jax[cpu] is not installed")
    jax.config.update("jax_enable_x64", True)
    try:
        jax.devices("cpu")
    except RuntimeError as e:  # pragma: no cover
        pytest.skip(f"jax has no CPU backend: {e}")
    return pytest.importorskip("jax.numpy")


@pytest.mark.parametrize("name", list(CASES))
def test_jax(jnp, name):
    case = CASES[name]()
    fd.trace = []
    try:
        arrays, y, grads = _check(case, lambda t: jnp.asarray(t.numpy()),
                                  lambda a: torch.from_numpy(np.array(a)))  # a copy: JAX memory is read-only
        assert type(y).__module__.startswith("jax")
        assert all(type(g).__module__.startswith("jax") for g in grads.values())
        _pointers_are(fd.trace, arrays, lambda a: a.unsafe_buffer_pointer())
        # JAX took factorch's output buffers over without a copy.
        rec = fd.trace[0]
        assert rec["pointers"]["y"] == y.unsafe_buffer_pointer()
        names = {k: "grad_" + k for k in grads}
        for k, g in grads.items():
            assert fd.trace[-1]["pointers"][names[k]] == g.unsafe_buffer_pointer()
    finally:
        fd.trace = None


def test_read_only_numpy():
    """Read-only inputs through the versioned protocol; a read-only output
    is refused."""
    case = CASES["tt_linear"]()
    arrays = {k: v.numpy().copy() for k, v in case.arrays.items()}
    for a in arrays.values():
        a.flags.writeable = False
    np.testing.assert_allclose(case.forward(arrays), case.y.numpy(), rtol=1e-12)
    out = np.empty(case.y.shape)
    out.flags.writeable = False
    with pytest.raises(fd.FactorchError, match="y: the array is read-only"):
        fd.tt_linear(arrays["x"], arrays["weights"], None, (2, 3, 4), (5, 3, 2), (1, 3, 4, 1),
                     out=out)


def test_out_is_written_in_place():
    case = CASES["cp_linear"]()
    a = {k: v.numpy() for k, v in case.arrays.items()}
    out = np.empty(case.y.shape)
    res = fd.cp_linear(a["x"], a["weights"], a["bias"], (2, 3, 4), (5, 3, 2), 6, out=out)
    assert res is out
    np.testing.assert_allclose(out, case.y.numpy(), rtol=1e-12)


def test_errors_name_the_argument():
    x, w = np.zeros((4, 24)), np.zeros(10)
    with pytest.raises(fd.FactorchError, match=r"weights: expected a 1-D array of \d+ elements"):
        fd.tt_linear(x, w, None, (2, 3, 4), (5, 3, 2), (1, 3, 4, 1))
    with pytest.raises(fd.FactorchError, match=r"ranks: expected 4 to 4 ints >= 1"):
        fd.tt_linear(x, w, None, (2, 3, 4), (5, 3, 2), (1, 3, 1))
    with pytest.raises(fd.FactorchError, match=r"in_modes: expected"):
        fd.cp_linear(x, w, None, (2, -3, 4), (5, 3, 2), 2)
    with pytest.raises(TypeError, match=r"x: expected an array supporting DLPack"):
        fd.lowrank_linear_flat([[1.0]], w, None, 2, 1)
    with pytest.raises(fd.FactorchError, match=r"stages"):
        fd.conv_chain(np.zeros((1, 2, 3, 3)), w, None, [1] * 15 + [0], [1, 1, 1])
    n = 5 * (24 + 30)
    with pytest.raises(fd.FactorchError, match=r"x: expected dtype"):
        fd.lowrank_linear_flat(x.astype(np.int64), np.zeros(n), None, 30, 5)
    U, V = np.zeros((10, 3)), np.zeros((3, 4))
    with pytest.raises(fd.FactorchError, match=r"indices"):
        fd.lowrank_embedding(np.array([[0, 10]]), U, V)


def test_lora_base_arguments_are_checked():
    x, A, B = np.ones((2, 4)), np.ones((2, 4)), np.ones((3, 2))
    with pytest.raises(TypeError, match="base: expected exactly one of W, \\(U, V\\) or base_out"):
        fd.lora_linear(x, A, B, 1.0)
    with pytest.raises(TypeError, match="base: expected exactly one of"):
        fd.lora_linear(x, A, B, 1.0, W=np.ones((3, 4)), base_out=np.ones((2, 3)))
    with pytest.raises(TypeError, match="base: expected exactly one of"):
        fd.lora_linear(x, A, B, 1.0, U=np.ones((3, 2)))
    with pytest.raises(TypeError, match="need: 'W' asked for, but the call has no W"):
        fd.lora_linear_backward(np.ones((2, 3)), x, A, B, 1.0, U=np.ones((3, 2)),
                                V=np.ones((2, 4)), need=("W",))
    with pytest.raises(fd.FactorchError, match="A"):
        fd.lora_linear(x, np.ones((2, 5)), B, 1.0, W=np.ones((3, 4)))
