"""torch.ops.factorch.lowrank_linear and its backward: values against a
float64 dense reference, gradcheck, opcheck, torch.compile, bad inputs."""

from __future__ import annotations

import pytest
import torch

import factorch
from factorch.functional import lowrank_linear

from helpers import DEVICES, dtypes_for, in_threads, lowrank_samples, rand

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def reference(x, U, V, b):
    y = x.double() @ (U.double() @ V.double()).T
    return y + b.double() if b is not None else y


@pytest.mark.parametrize("device", DEVICES)
def test_forward_matches_float64_reference(device):
    for dtype in dtypes_for(device):
        for name, x, U, V, b in lowrank_samples(device, dtype):
            y = lowrank_linear(x, U, V, b)
            ref = reference(x, U, V, b)
            assert y.shape == ref.shape, name
            assert y.dtype == dtype and y.device.type == device, name
            scale = ref.abs().max().item() if ref.numel() else 1.0
            err = (y.double() - ref).abs().max().item() if ref.numel() else 0.0
            assert err <= TOL[dtype] * max(scale, 1.0), f"{name} {dtype}: {err}"


@pytest.mark.parametrize("device", DEVICES)
def test_backward_matches_dense_autograd(device):
    for dtype in dtypes_for(device):
        for name, x, U, V, b in lowrank_samples(device, dtype, requires_grad=True):
            inputs = [t for t in (x, U, V, b) if t is not None]
            y = lowrank_linear(x, U, V, b)
            g = rand(*y.shape, device=device, dtype=dtype)
            got = torch.autograd.grad(y, inputs, g)
            ref_in = [t.detach().double().requires_grad_() for t in inputs]
            rx, rU, rV = ref_in[:3]
            rb = ref_in[3] if b is not None else None
            want = torch.autograd.grad(reference(rx, rU, rV, rb), ref_in, g.double())
            for i, (a, w) in enumerate(zip(got, want)):
                scale = max(w.abs().max().item() if w.numel() else 0.0, 1.0)
                err = (a.double() - w).abs().max().item() if w.numel() else 0.0
                assert err <= TOL[dtype] * 10 * scale, f"{name} {dtype} input {i}: {err}"


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    for name, x, U, V, b in lowrank_samples(device, torch.float64, requires_grad=True):
        if x.numel() == 0 or 0 in x.stride():
            continue  # gradcheck cannot perturb empty or overlapping inputs
        args = (x, U, V) + ((b,) if b is not None else ())
        assert torch.autograd.gradcheck(lowrank_linear, args), name


@pytest.mark.parametrize("device", DEVICES)
def test_only_requested_gradients_are_computed(device):
    x = rand(4, 8, device=device)
    U = rand(5, 3, device=device, requires_grad=True)
    V = rand(3, 8, device=device)
    lowrank_linear(x, U, V).sum().backward()
    assert U.grad is not None and x.grad is None and V.grad is None
    gx, gU, gV, gb = torch.ops.factorch.lowrank_linear_backward(
        rand(4, 5, device=device), x, U.detach(), V, x @ V.T, True, False, False, False
    )
    assert gx.shape == x.shape and gU.numel() == gV.numel() == gb.numel() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for dtype in (torch.float32, torch.float64):
        for name, x, U, V, b in lowrank_samples(device, dtype, requires_grad=True):
            bias = b if b is not None else x.new_empty(0)
            torch.library.opcheck(torch.ops.factorch.lowrank_linear, (x, U, V, bias))
            with torch.no_grad():
                y, t = torch.ops.factorch.lowrank_linear(x, U, V, bias)
            g = rand(*y.shape, device=device, dtype=dtype)
            args = (g, x.detach(), U.detach(), V.detach(), t, True, True, True, b is not None)
            torch.library.opcheck(torch.ops.factorch.lowrank_linear_backward, args)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    model = torch.nn.Sequential(
        factorch.nn.FactorizedLinear(16, 32, rank=4, device=device),
        torch.nn.GELU(),
        factorch.nn.FactorizedLinear(32, 8, rank=4, bias=False, device=device),
    )
    x = torch.randn(5, 16, device=device)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    y = compiled(x)
    torch.testing.assert_close(y, model(x))
    y.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("device", DEVICES)
def test_torch_export(device):
    layer = factorch.nn.FactorizedLinear(16, 8, rank=4, device=device)
    x = torch.randn(3, 16, device=device)
    ep = torch.export.export(layer, (x,))
    assert any("factorch.lowrank_linear" in str(n.target) for n in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(x), layer(x))


# --------------------------------------------------------------------------
# Bad inputs: a Python exception naming the argument, never a crash.
# --------------------------------------------------------------------------
def _ok(device="cpu", dtype=torch.float32):
    return rand(4, 6, device=device, dtype=dtype), rand(5, 3, device=device, dtype=dtype), rand(
        3, 6, device=device, dtype=dtype
    )


def test_dtype_mix_raises():
    x, U, V = _ok()
    with pytest.raises(RuntimeError, match=r"U: expected dtype float32 \(the dtype of x\), got float64"):
        lowrank_linear(x, U.double(), V)


def test_integer_dtype_raises():
    x, U, V = _ok()
    with pytest.raises(RuntimeError, match=r"x: expected dtype float32, float64.*got int64"):
        lowrank_linear(x.long(), U.long(), V.long())


def test_half_on_cpu_raises():
    x, U, V = _ok(dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"x: bfloat16 is supported on cuda only"):
        lowrank_linear(x, U, V)


def test_shape_mismatch_raises():
    x, U, V = _ok()
    with pytest.raises(RuntimeError, match=r"V: expected \[r, in\] with in = 7"):
        lowrank_linear(rand(4, 7, dtype=torch.float32), U, V)
    with pytest.raises(RuntimeError, match=r"U: expected \[out, r\] with r = 3"):
        lowrank_linear(x, rand(5, 2, dtype=torch.float32), V)
    with pytest.raises(RuntimeError, match=r"bias: expected shape \[5\]"):
        lowrank_linear(x, U, V, rand(4, dtype=torch.float32))
    with pytest.raises(RuntimeError, match=r"U: expected 2 dims"):
        lowrank_linear(x, U[None], V)
    x10 = x.reshape(1, 1, 1, 1, 1, 1, 1, 1, 4, 6)
    with pytest.raises(RuntimeError, match=r"x: expected 1 to 8 dims"):  # the op's limit ...
        torch.ops.factorch.lowrank_linear(x10, U, V, x.new_empty(0))
    # ... which the functional wrapper lifts by merging the leading dims
    torch.testing.assert_close(lowrank_linear(x10, U, V), lowrank_linear(x, U, V).reshape(
        1, 1, 1, 1, 1, 1, 1, 1, 4, -1))


def test_nan_and_inf_raise_naming_the_input():
    x, U, V = _ok()
    x[1, 2] = float("nan")
    with pytest.raises(RuntimeError, match=r"y: .*NaN/Inf.*the inputs x hold NaN or Inf"):
        lowrank_linear(x, U, V)
    V[0, 0] = float("inf")
    with pytest.raises(RuntimeError, match=r"the inputs x, V hold"):
        lowrank_linear(x, U, V)
    big = torch.full((2, 6), 3e38)
    with pytest.raises(RuntimeError, match=r"all inputs are finite \(overflow in float32\)"):
        x, U, V = _ok()
        lowrank_linear(big, U.abs(), V.abs())


def test_nan_check_can_be_turned_off():
    x, U, V = _ok()
    x[0, 0] = float("nan")
    factorch.set_check_finite(cpu=False)
    try:
        y = lowrank_linear(x, U, V)
    finally:
        factorch.set_check_finite(cpu=True)
    assert torch.isnan(y[0]).all() and torch.isfinite(y[1:]).all()


def test_nan_in_backward_raises():
    x, U, V = _ok()
    U.requires_grad_()
    y = lowrank_linear(x, U, V)
    g = torch.ones_like(y)
    g[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match=r"grad_y: 1 NaN/Inf values in the gradient"):
        y.backward(g)


def test_meta_tensors_infer_shapes_and_check_them():
    x, U, V = (t.to("meta") for t in _ok())
    y, t = torch.ops.factorch.lowrank_linear(x, U, V, x.new_empty(0))
    assert y.shape == (4, 5) and t.shape == (4, 3) and y.device.type == "meta"
    with pytest.raises(RuntimeError, match=r"V: expected \[r, in\] with in = 6"):
        torch.ops.factorch.lowrank_linear(x, U, V[:, :5], x.new_empty(0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_device_mix_raises():
    x, U, V = _ok()
    with pytest.raises(RuntimeError, match=r"expected device cuda:0 \(the device of x\)|device"):
        lowrank_linear(x.cuda(), U, V.cuda())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_matches_cpu():
    for name, x, U, V, b in lowrank_samples("cpu", torch.float64):
        y_cpu = lowrank_linear(x, U, V, b)
        y_gpu = lowrank_linear(x.cuda(), U.cuda(), V.cuda(), None if b is None else b.cuda())
        torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-12, atol=1e-12, msg=name)


def test_concurrent_calls_from_threads():
    """Kernels are re-entrant: backward runs on autograd worker threads."""
    x, U, V = _ok(dtype=torch.float64)
    want = lowrank_linear(x, U, V)
    errors = []

    def work():
        for _ in range(50):
            if not torch.equal(lowrank_linear(x, U, V), want):
                errors.append("mismatch")

    in_threads(work, 4)
    assert not errors
