"""torch.ops.factorch.lowrank_linear_flat (the low-rank op on a layer's one
flat parameter, V [r, in] then U [out, r]) and its backward: values and
gradients against a float64 reference, gradcheck, opcheck, compile, bad
inputs."""

from __future__ import annotations

import pytest
import torch

from factorch.factorizations import LowRank
from factorch.functional import lowrank_linear_flat

from helpers import DEVICES, dtypes_for, lowrank_samples, rand

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _flat(U, V, requires_grad=False):
    return LowRank.pack(U.detach(), V.detach()).contiguous().requires_grad_(requires_grad)


def reference(x, flat, b, out, r):
    n_in = x.shape[-1]
    V = flat[: r * n_in].reshape(r, n_in).double()
    U = flat[r * n_in:].reshape(out, r).double()
    y = x.double() @ (U @ V).T
    return y + b.double() if b is not None else y


@pytest.mark.parametrize("device", DEVICES)
def test_forward_and_backward_match_the_float64_reference(device):
    for dtype in dtypes_for(device):
        for name, x, U, V, b in lowrank_samples(device, dtype):
            out, r = U.shape
            w = _flat(U, V, requires_grad=True)
            xg = x.detach().clone().requires_grad_()
            bg = b.detach().clone().requires_grad_() if b is not None else None
            y = lowrank_linear_flat(xg, w, bg, out, r)
            ref_in = [t.detach().double().requires_grad_() for t in (xg, w)]
            bref = bg.detach().double().requires_grad_() if bg is not None else None
            ref = reference(ref_in[0], ref_in[1], bref, out, r)
            scale = max(ref.abs().max().item() if ref.numel() else 1.0, 1.0)
            tol = TOL[dtype] * scale * 4
            assert y.shape == ref.shape and y.dtype == dtype, name
            torch.testing.assert_close(y.double(), ref, rtol=0, atol=tol, msg=name)
            g = rand(*y.shape, device=device, dtype=dtype, gen=torch.Generator().manual_seed(1))
            y.backward(g)
            ref.backward(g.double())
            for got, want, what in ((xg.grad, ref_in[0].grad, "x"), (w.grad, ref_in[1].grad, "w")):
                assert got.shape == want.shape, (name, what)
                s = max(want.abs().max().item() if want.numel() else 1.0, 1.0)
                torch.testing.assert_close(got.double(), want, rtol=0, atol=TOL[dtype] * s * 8,
                                           msg=f"{name}: {what}")
            if bg is not None:
                torch.testing.assert_close(bg.grad.double(), bref.grad, rtol=0,
                                           atol=TOL[dtype] * scale * 8 * max(1, x.numel()))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    for name, x, U, V, b in lowrank_samples(device, torch.float64):
        if x.numel() == 0 or x.stride(-1) == 0:
            continue  # gradcheck cannot perturb empty or overlapping inputs
        out, r = U.shape
        args = (x.detach().clone().requires_grad_(), _flat(U, V, True),
                b.detach().clone().requires_grad_() if b is not None else None, out, r)
        assert torch.autograd.gradcheck(lowrank_linear_flat, args), name


def test_frozen_factors_get_no_gradient_computed():
    x = rand(5, 7, requires_grad=True)
    w = rand(3 * (7 + 4))
    y = lowrank_linear_flat(x, w, None, 4, 3)
    y.sum().backward()
    assert x.grad is not None and w.grad is None
    gx, gw, gb = torch.ops.factorch.lowrank_linear_flat_backward(
        torch.ones(5, 4, dtype=torch.float64), x.detach(), w, rand(5, 3), 4, 3, True, False, False)
    assert gx.shape == (5, 7) and gw.numel() == 0 and gb.numel() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for dtype in dtypes_for(device)[:2]:
        for name, x, U, V, b in list(lowrank_samples(device, dtype))[:6]:
            out, r = U.shape
            w = _flat(U, V)
            bias = b if b is not None else x.new_empty(0)
            torch.library.opcheck(torch.ops.factorch.lowrank_linear_flat, (x, w, bias, out, r))
            _, t = torch.ops.factorch.lowrank_linear_flat(x, w, bias, out, r)
            g = torch.ones(*x.shape[:-1], out, device=device, dtype=dtype)
            args = (g, x, w, t, out, r, True, True, b is not None)
            torch.library.opcheck(torch.ops.factorch.lowrank_linear_flat_backward, args)


def test_torch_compile_fullgraph():
    x, w, b = rand(6, 8), rand(3 * (8 + 5)), rand(5)
    fn = torch.compile(lambda x, w, b: lowrank_linear_flat(x, w, b, 5, 3), fullgraph=True,
                       backend="aot_eager")
    torch.testing.assert_close(fn(x, w, b), reference(x, w, b, 5, 3))


def test_bad_inputs_raise_naming_the_argument():
    x, w = rand(4, 8, dtype=torch.float32), rand(3 * (8 + 5), dtype=torch.float32)
    with pytest.raises(RuntimeError, match="weights: expected a contiguous 1-D tensor of 39"):
        lowrank_linear_flat(x, w[:-1], None, 5, 3)
    with pytest.raises(RuntimeError, match="weights: expected a contiguous 1-D tensor"):
        lowrank_linear_flat(x, w.reshape(3, 13), None, 5, 3)
    with pytest.raises(RuntimeError, match="rank: expected >= 1"):
        lowrank_linear_flat(x, w, None, 5, 0)
    with pytest.raises(RuntimeError, match="out_features: expected >= 1"):
        lowrank_linear_flat(x, w, None, 0, 3)
    with pytest.raises(RuntimeError, match="weights"):
        lowrank_linear_flat(x, w.double(), None, 5, 3)
    with pytest.raises(RuntimeError, match="bias"):
        lowrank_linear_flat(x, w, torch.ones(4), 5, 3)
    with pytest.raises(RuntimeError, match="weights"):
        lowrank_linear_flat(x, rand(2 * 39, dtype=torch.float32)[::2], None, 5, 3)
