"""tucker_linear's kept states: the forward writes t = x projected on the
input factors and z = t·coreᵀ (ops/tucker_linear.c) where the shapes' budget
allows (T + S <= in + out), and the backward reads them instead of
recomputing them. The gradients with kept states must equal the recomputed
ones and a float64 dense reference, over M = 0, 1, odd, several chunks, with
and without bias, with the chunking flags; the rule must agree between the
fake and C; bad states raise naming them; the layer and the functional
keep them only when a backward can follow, unless told not to."""

from __future__ import annotations

import ctypes
import math
import random
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import factorch
import factorch.functional as F
from factorch import _lib
from factorch._ops import tucker_states_per_row
from factorch.factorizations import Tucker
from factorch.nn import FactorizedLinear

from helpers import DEVICES, FORCE_FORM_W, SMALL_CHUNKS, rand

ops = torch.ops.factorch

# Layouts whose kept states the cost model uses (the chain beats forming W;
# on small layers it forms W and the states go unused): 2 or 3 modes a
# side, one mode a side, odd ranks. T + S is within in + out for each.
LAYOUTS = [
    Tucker((8, 8, 8), (4, 8, 8), ((3, 2, 4), (2, 3, 2))),
    Tucker((16, 32), (8, 8, 8), ((8, 4), (2, 3, 2))),
    Tucker((8, 8, 8), (8, 8, 8), ((4, 4, 4), (4, 4, 4))),
    Tucker((512,), (512,), ((32,), (32,))),
    Tucker((32, 16), (512,), ((16, 8), (64,))),
]
SMALL = Tucker((2, 3), (4,), ((2, 2), (3,)))  # W is formed: states unused


def _kept_rows(layout, M, device="cpu", dtype=torch.float64):
    """The rows per chunk of the kept states the C plan reports, or None
    when it does not use them for this batch."""
    m = re.search(r"backward: kept t and z \(\d+ per row\), both passes in chunks of (\d+) rows",
                  layout.plan(M, device=device, dtype=dtype)["plan"])
    return int(m.group(1)) if m else None


def _assert_kept(layout, M, device):
    if device == "cpu" and M > 0:
        assert _kept_rows(layout, M) is not None, (layout.op_args(), M)


def _flags(device, extra):
    base = _lib.FLAG_CHECK_FINITE if factorch.get_check_finite()[device] else 0
    _lib.glue.fct_torch_set_flags(device == "cuda", base | extra)


def _reset_flags(device):
    _flags(device, 0)


def _inputs(layout, lead, device, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = rand(*lead, layout.in_features, device=device, gen=g, requires_grad=True)
    w = rand(layout.num_parameters, device=device, gen=g, requires_grad=True)
    b = rand(layout.out_features, device=device, gen=g, requires_grad=True) if bias else None
    return x, w, b


def _op(x, w, b, layout, keep):
    e = b if b is not None else x.new_empty(0)
    return ops.tucker_linear(x, w, e, *layout.op_args(), keep)


def _grads(x, w, b, layout, keep, gy):
    ins = [t for t in (x, w, b) if t is not None]
    y, states = _op(x, w, b, layout, keep)
    return (y, states) + torch.autograd.grad(y, ins, gy)


def _reference(x, w, b, layout, gy):
    ins = [t for t in (x, w, b) if t is not None]
    W = layout.to_dense(w.double())
    y = x.double() @ W.T
    if b is not None:
        y = y + b.double()
    return (y,) + torch.autograd.grad(y, ins, gy.double())


def test_the_rule_is_the_same_in_python_and_c():
    fn = _lib.core.fct_tucker_linear_states
    r = random.Random(0)
    I64 = ctypes.c_int64
    for _ in range(300):
        p, q = r.randint(1, 4), r.randint(1, 4)
        im = [r.randint(1, 6) for _ in range(p)]
        om = [r.randint(1, 6) for _ in range(q)]
        ir = [r.randint(1, 7) for _ in range(p)]
        orr = [r.randint(1, 7) for _ in range(q)]
        per = I64(-1)
        st = fn(p, (I64 * p)(*im), (I64 * p)(*ir), q, (I64 * q)(*om), (I64 * q)(*orr),
                ctypes.byref(per))
        assert st == 0
        assert per.value == tucker_states_per_row(im, om, ir, orr), (im, om, ir, orr)
    # Over the budget: not kept.
    assert tucker_states_per_row([2], [2], [4], [4]) == 0
    assert tucker_states_per_row([8] * 4, [8] * 4, [6] * 4, [6] * 4) == 2 * 6 ** 4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("M", [0, 1, 7, 130])
@pytest.mark.parametrize("bias", [True, False])
def test_kept_states_give_the_recomputed_and_the_reference_gradients(device, M, bias):
    for i, layout in enumerate(LAYOUTS):
        x, w, b = _inputs(layout, (M,), device, bias, seed=i)
        gy = rand(M, layout.out_features, device=device, gen=torch.Generator().manual_seed(9))
        kept = _grads(x, w, b, layout, True, gy)
        again = _grads(x, w, b, layout, False, gy)
        ref = _reference(x, w, b, layout, gy)
        per = tucker_states_per_row(*layout.op_args())
        assert per > 0
        assert kept[1].shape == (M * per,) and again[1].shape == (0,)
        _assert_kept(layout, M, device)
        for j, (a, c, r) in enumerate(zip(kept[:1] + kept[2:], again[:1] + again[2:], ref)):
            torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12,
                                       msg=f"{layout.op_args()} output {j}")
            torch.testing.assert_close(a.double(), r, rtol=1e-10, atol=1e-10,
                                       msg=f"{layout.op_args()} output {j} vs reference")


@pytest.mark.parametrize("device", DEVICES)
def test_unused_states_give_the_reference_gradients(device):
    """Where the cost model forms W instead (a small layer) the states are
    allocated but neither written nor read: the results are the same."""
    for M in (1, 7, 300):
        assert _kept_rows(SMALL, M) is None
        x, w, b = _inputs(SMALL, (M,), device, True)
        gy = rand(M, SMALL.out_features, device=device)
        kept = _grads(x, w, b, SMALL, True, gy)
        assert kept[1].shape == (M * 7,)
        for a, r in zip(kept[:1] + kept[2:], _reference(x, w, b, SMALL, gy)):
            torch.testing.assert_close(a.double(), r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_states_hold_t_and_z(device):
    """In one chunk of rows (a small batch) the states are t = x·(V_1 ⊗ ..
    ⊗ V_p) as [T, M], then z = t·coreᵀ as [S, M]: what the forward wrote
    and the backward reads."""
    for i, layout in enumerate(LAYOUTS):
        _assert_kept(layout, 7, device)
        x, w, b = _inputs(layout, (7,), device, True, seed=i)
        with torch.no_grad():
            _, states = _op(x, w, b, layout, True)
        in_modes, out_modes, in_ranks, out_ranks = layout.op_args()
        vs = layout.views(w.detach())
        p = len(in_modes)
        V = vs[1:1 + p]
        K = V[0]
        for v in V[1:]:
            K = torch.kron(K, v)
        T, S = K.shape[1], math.prod(out_ranks)
        t = x.detach() @ K                                   # [M, T]
        z = t @ vs[0].reshape(S, T).T                        # [M, S]
        torch.testing.assert_close(states[:T * 7].reshape(T, 7), t.T, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(states[T * 7:].reshape(S, 7), z.T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("flags", [SMALL_CHUNKS, FORCE_FORM_W, SMALL_CHUNKS | FORCE_FORM_W])
def test_kept_states_do_not_depend_on_the_flags(device, flags):
    """The states' layout is a function of the shapes alone: a forward run
    under the chunking or strategy flags and a backward without them (or
    the other way round) still agree with the reference."""
    layout = LAYOUTS[1]
    _assert_kept(layout, 33, device)
    x, w, b = _inputs(layout, (3, 11), device, True, seed=3)
    gy = rand(3, 11, layout.out_features, device=device)
    ref = _reference(x, w, b, layout, gy)
    for fwd_flags, bwd_flags in ((flags, 0), (0, flags), (flags, flags)):
        try:
            _flags(device, fwd_flags)
            y, states = _op(x, w, b, layout, True)
            _flags(device, bwd_flags)
            got = torch.autograd.grad(y, (x, w, b), gy)
        finally:
            _reset_flags(device)
        assert states.numel() > 0
        for a, r in zip((y,) + got, ref):
            torch.testing.assert_close(a.double(), r, rtol=1e-10, atol=1e-10,
                                       msg=f"flags {fwd_flags} then {bwd_flags}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", [1, 4])
def test_kept_states_over_several_chunks(device, which):
    """M large enough for several chunks of the kept states (chunks of at
    most 8 MiB of the backward's workspace: 2048 and 1024 rows of these
    layouts in float64), the last one partial."""
    layout = LAYOUTS[which]
    M = 2500
    if device == "cpu":
        rows = _kept_rows(layout, M)
        assert rows is not None and rows < M and M % rows != 0, rows
    x, w, b = _inputs(layout, (M,), device, True, seed=5)
    gy = rand(M, layout.out_features, device=device)
    kept = _grads(x, w, b, layout, True, gy)
    again = _grads(x, w, b, layout, False, gy)
    ref = _reference(x, w, b, layout, gy)
    assert kept[1].numel() == M * tucker_states_per_row(*layout.op_args())
    for a, c, r in zip(kept[:1] + kept[2:], again[:1] + again[2:], ref):
        torch.testing.assert_close(a, c, rtol=1e-11, atol=1e-11)
        torch.testing.assert_close(a.double(), r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_kept_states_with_some_gradients_only(device):
    """The backward computes only what is asked; with kept states each
    subset of the gradients still matches the reference."""
    layout = LAYOUTS[1]
    _assert_kept(layout, 9, device)
    x, w, b = _inputs(layout, (9,), device, True, seed=7)
    gy = rand(9, layout.out_features, device=device)
    ref = _reference(x, w, b, layout, gy)
    with torch.no_grad():
        y, states = _op(x, w, b, layout, True)
    assert states.numel() > 0
    for need in ((True, False, False), (False, True, False), (False, False, True),
                 (False, True, True)):
        for s in (states, states.new_empty(0)):
            gx, gw, gb = ops.tucker_linear_backward(gy, x.detach(), w.detach(), s,
                                                    *layout.op_args(), *need)
            for got, want, n in zip((gx, gw, gb), ref[1:], need):
                if n:
                    torch.testing.assert_close(got.double(), want, rtol=1e-10, atol=1e-10)
                else:
                    assert got.numel() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_with_kept_states(device):
    for layout in (LAYOUTS[0], LAYOUTS[3]):
        _assert_kept(layout, 2, device)
        x, w, b = _inputs(layout, (2,), device, True, seed=1)

        def f(x, w, b):
            return ops.tucker_linear(x, w, b, *layout.op_args(), True)[0]

        assert torch.autograd.gradcheck(f, (x, w, b)), layout.op_args()


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for dtype in (torch.float32, torch.float64):
        for layout in (LAYOUTS[1], LAYOUTS[3], SMALL):
            for M in (0, 5):
                x, w, b = _inputs(layout, (M,), device, True, seed=2)
                x, w, b = (t.detach().to(dtype).requires_grad_() for t in (x, w, b))
                for keep in (True, False):
                    torch.library.opcheck(ops.tucker_linear,
                                          (x, w, b, *layout.op_args(), keep))
                with torch.no_grad():
                    _, states = ops.tucker_linear(x, w, b, *layout.op_args(), True)
                gy = rand(M, layout.out_features, device=device, dtype=dtype)
                for s in (states, states.new_empty(0)):
                    torch.library.opcheck(
                        ops.tucker_linear_backward,
                        (gy, x.detach(), w.detach(), s, *layout.op_args(), True, True, True))


def test_bad_states_raise_naming_them():
    layout = SMALL
    x, w, b = (t.detach() for t in _inputs(layout, (4,), "cpu", True))
    args = layout.op_args()
    gy = rand(4, layout.out_features)
    _, states = ops.tucker_linear(x, w, b, *args, True)
    bwd = ops.tucker_linear_backward
    with pytest.raises(RuntimeError, match=r"states: expected shape \[28\]"):
        bwd(gy, x, w, states[:-1], *args, True, True, True)
    with pytest.raises(RuntimeError, match=r"states: .*dtype"):
        bwd(gy, x, w, states.float(), *args, True, True, True)
    with pytest.raises(RuntimeError, match=r"states: expected a C-contiguous tensor"):
        bwd(gy, x, w, torch.randn(56, dtype=x.dtype)[::2], *args, True, True, True)
    with pytest.raises(RuntimeError, match=r"states: expected shape \[28\]"):
        bwd(gy, x, w, states.reshape(4, 7), *args, True, True, True)
    with pytest.raises(RuntimeError, match=r"states: expected device meta"):
        bwd(gy.to("meta"), x.to("meta"), w.to("meta"), states, *args, True, True, True)
    # Shapes whose T + S exceeds in + out (ranks above the modes, which the
    # ops take) keep nothing; a states tensor for them is refused.
    over = ([2], [2], [4], [4])  # T + S = 8 > in + out = 4
    xo, wo, bo = rand(3, 2), rand(16 + 8 + 8), rand(2)
    y, so = ops.tucker_linear(xo, wo, bo, *over, True)
    assert so.shape == (0,)
    with pytest.raises(RuntimeError, match=r"states: expected NULL: no states are kept"):
        ops.tucker_linear_backward(rand(3, 2), xo, wo, rand(24), *over, True, True, True)


class _Record(TorchDispatchMode):
    """The keep argument of every tucker_linear call."""

    def __init__(self):
        super().__init__()
        self.keeps = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is ops.tucker_linear.default:
            self.keeps.append(args[-1])
        return func(*args, **(kwargs or {}))


def test_the_layer_keeps_states_only_when_a_backward_follows():
    torch.manual_seed(0)
    layer = FactorizedLinear(24, 30, "tucker", rank=((2, 2, 2), (2, 2, 2)),
                             tensorized_shape=((2, 3, 4), (5, 3, 2))).double()
    x = torch.randn(6, 24, dtype=torch.float64)
    with _Record() as r:
        layer(x)                       # parameters require grad
        with torch.no_grad():
            layer(x)
        with torch.inference_mode():
            layer(x)
        layer.keep_states = False
        layer(x)
        layer.keep_states = True
        F.tucker_linear(x, layer.core, layer.in_factors, layer.out_factors, layer.bias,
                        keep_states=False)
        F.tucker_linear(x, layer.core, layer.in_factors, layer.out_factors, layer.bias)
    assert r.keeps == [True, False, False, False, False, True]


def test_saved_memory_and_gradients_of_the_layer():
    """The layer saves states of M·(T + S) elements with keep_states, none
    without, and its gradients are the same either way."""
    torch.manual_seed(0)
    layer = FactorizedLinear(24, 30, "tucker", rank=((2, 2, 2), (2, 2, 2)),
                             tensorized_shape=((2, 3, 4), (5, 3, 2))).double()
    x = torch.randn(2, 5, 24, dtype=torch.float64, requires_grad=True)
    grads = []
    for keep in (True, False):
        layer.keep_states = keep
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t,
                                                      lambda t: t):
            y = layer(x)
        per = tucker_states_per_row(*layer.layout.op_args())
        assert (10 * per in saved) == keep and per == 16
        layer.zero_grad()
        x.grad = None
        (y * torch.arange(30, dtype=y.dtype)).sum().backward()
        grads.append((x.grad.clone(), layer.factors.grad.clone(), layer.bias.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_keeps_states(device):
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = FactorizedLinear(512, 512, "tucker", rank=4, tensorized_shape=((8, 8, 8), (8, 8, 8)),
                             device=device).double()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for M in (5, 9):
        _assert_kept(layer.layout, M, device)
        x = torch.randn(M, 512, dtype=torch.float64, device=device)
        layer.zero_grad()
        compiled(x).square().sum().backward()
        got = layer.factors.grad.clone()
        layer.zero_grad()
        layer.keep_states = False
        layer(x).square().sum().backward()
        layer.keep_states = True
        torch.testing.assert_close(got, layer.factors.grad, rtol=1e-12, atol=1e-12)
