"""torch.ops.factorch.{cp,tucker,tt}_linear and their backward ops: values and
gradients against a float64 reconstruct-then-matmul reference over many
shapes and ranks, gradcheck, opcheck, torch.compile(fullgraph=True),
torch.export, the chunked paths, and bad inputs."""

from __future__ import annotations

import pytest
import torch

import factorch
from factorch import _lib
from factorch.functional import cp_linear, tt_linear, tucker_linear
from factorch.nn import FactorizedLinear

from helpers import DEVICES, SMALL_CHUNKS, dtypes_for, in_threads, rand
from tensorized_samples import BACKWARD_OPS, OPS, samples

FACTS = ["cp", "tucker", "tt"]
TOL = {torch.float64: 1e-11, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}


def _err(a, ref):
    if ref.numel() == 0:
        return 0.0, 1.0
    return (a.double() - ref).abs().max().item(), max(ref.abs().max().item(), 1.0)


@pytest.mark.parametrize("fact", FACTS)
@pytest.mark.parametrize("device", DEVICES)
def test_forward_matches_float64_reference(device, fact):
    for dtype in dtypes_for(device):
        for s in samples(fact, device, dtype):
            y = OPS[fact](*s.args())
            y = y[0] if isinstance(y, (tuple, list)) else y
            ref = s.reference()
            assert y.shape == ref.shape and y.dtype == dtype, s.name
            err, scale = _err(y, ref)
            assert err <= TOL[dtype] * scale, f"{s.name} {dtype}: {err}"


@pytest.mark.parametrize("fact", FACTS)
@pytest.mark.parametrize("device", DEVICES)
def test_backward_matches_dense_autograd(device, fact):
    for dtype in dtypes_for(device):
        for s in samples(fact, device, dtype, requires_grad=True):
            ins = [t for t in (s.x, s.weights, s.bias) if t is not None]
            y = OPS[fact](*s.args())
            y = y[0] if isinstance(y, (tuple, list)) else y
            g = rand(*y.shape, device=device, dtype=dtype)
            got = torch.autograd.grad(y, ins, g)
            want = torch.autograd.grad(s.reference(), ins, g.double())
            for i, (a, w) in enumerate(zip(got, want)):
                err, scale = _err(a, w.double())
                assert err <= 10 * TOL[dtype] * scale, f"{s.name} {dtype} input {i}: {err}"


@pytest.mark.parametrize("fact", FACTS)
@pytest.mark.parametrize("device", DEVICES)
def test_small_chunks_give_the_same_results(device, fact):
    """FCT_FLAG_SMALL_CHUNKS forces chunks of <= 3 rows / rank columns: the
    chunked paths must agree with the one-chunk ones."""
    cuda = device == "cuda"
    flags = _lib.FLAG_CHECK_FINITE if factorch.get_check_finite()[device] else 0
    for s in samples(fact, device, torch.float64, requires_grad=True):
        ins = [t for t in (s.x, s.weights, s.bias) if t is not None]
        y = OPS[fact](*s.args())
        y = y[0] if isinstance(y, (tuple, list)) else y
        g = torch.ones_like(y)
        want = (y,) + torch.autograd.grad(y, ins, g)
        _lib.glue.fct_torch_set_flags(cuda, flags | SMALL_CHUNKS)
        try:
            y2 = OPS[fact](*s.args())
            y2 = y2[0] if isinstance(y2, (tuple, list)) else y2
            got = (y2,) + torch.autograd.grad(y2, ins, g)
        finally:
            _lib.glue.fct_torch_set_flags(cuda, flags)
        for a, w in zip(got, want):
            torch.testing.assert_close(a, w, rtol=1e-12, atol=1e-12, msg=s.name)


@pytest.mark.parametrize("fact", FACTS)
@pytest.mark.parametrize("device", DEVICES)
def test_only_requested_gradients_are_computed(device, fact):
    for s in list(samples(fact, device, torch.float64))[:3]:
        w = s.weights.clone().requires_grad_()
        args = list(s.args())
        args[1] = w
        y = OPS[fact](*args)
        y = y[0] if isinstance(y, (tuple, list)) else y
        y.sum().backward()
        ref_w = s.weights.clone().requires_grad_()
        s.weights = ref_w
        s.reference().sum().backward()
        torch.testing.assert_close(w.grad, ref_w.grad, rtol=1e-11, atol=1e-11, msg=s.name)
        assert s.x.grad is None
        g = torch.ones_like(y)
        extra = s.layout.op_args()
        z = (OPS[fact](*s.args())[1],) if fact in ("cp", "tucker") else ()
        for need in ((True, False, False), (False, True, False), (False, False, True)):
            gx, gw, gb = BACKWARD_OPS[fact](g, s.x, s.weights.detach(), *z, *extra, *need)
            assert gx.shape == (s.x.shape if need[0] else (0,)), s.name
            assert gw.shape == (s.weights.shape if need[1] else (0,)), s.name
            assert gb.shape == ((s.layout.out_features,) if need[2] else (0,)), s.name


@pytest.mark.parametrize("fact", FACTS)
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device, fact):
    op = OPS[fact]
    for s in samples(fact, device, torch.float64, requires_grad=True):
        if s.x.numel() == 0 or 0 in s.x.stride():
            continue  # gradcheck cannot perturb empty or overlapping inputs
        extra = s.args()[3:]
        has_bias = s.bias is not None

        def f(x, w, *b):
            out = op(x, w, b[0] if b else x.new_empty(0), *extra)
            return out[0] if isinstance(out, (tuple, list)) else out

        args = (s.x, s.weights) + ((s.bias,) if has_bias else ())
        assert torch.autograd.gradcheck(f, args), s.name


@pytest.mark.parametrize("fact", FACTS)
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, fact):
    for dtype in (torch.float32, torch.float64):
        for s in samples(fact, device, dtype, requires_grad=True):
            torch.library.opcheck(OPS[fact], s.args())
            with torch.no_grad():
                out = OPS[fact](*s.args())
            y = out[0] if isinstance(out, (tuple, list)) else out
            g = rand(*y.shape, device=device, dtype=dtype)
            x, w = s.x.detach(), s.weights.detach()
            flags = (True, True, s.bias is not None)
            if fact in ("cp", "tucker"):
                args = (g, x, w, out[1], *s.layout.op_args(), *flags)
            else:
                args = (g, x, w, *s.layout.op_args(), *flags)
            torch.library.opcheck(BACKWARD_OPS[fact], args)


def _model(device):
    return torch.nn.Sequential(
        FactorizedLinear(24, 36, "cp", rank=5, tensorized_shape=((4, 6), (6, 6)), device=device),
        torch.nn.GELU(),
        FactorizedLinear(36, 16, "tucker", rank=3, device=device),
        torch.nn.GELU(),
        FactorizedLinear(16, 12, "tt", rank=3, bias=False, device=device),
    )


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _model(device)
    x = torch.randn(5, 24, device=device)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    y = compiled(x)
    torch.testing.assert_close(y, model(x))
    y.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    # A second batch size: recompiles (dynamic shapes) without a graph break.
    y2 = compiled(torch.randn(9, 24, device=device))
    assert y2.shape == (9, 12)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_export(device):
    model = _model(device)
    x = torch.randn(3, 24, device=device)
    ep = torch.export.export(model, (x,))
    targets = " ".join(str(n.target) for n in ep.graph.nodes)
    for op in ("cp_linear", "tucker_linear", "tt_linear"):
        assert f"factorch.{op}" in targets
    torch.testing.assert_close(ep.module()(x), model(x))


def test_meta_tensors_infer_shapes():
    x = torch.empty(4, 6, device="meta")
    w = torch.empty(3 * (2 + 3 + 4), device="meta")
    y, z = torch.ops.factorch.cp_linear(x, w, x.new_empty(0), [2, 3], [4], 3)
    assert y.shape == (4, 4) and z.shape == (4, 3) and y.device.type == "meta"
    w = torch.empty(1 * 2 * 2 * 3 + 3 * 3 * 2 * 1, device="meta")
    assert torch.ops.factorch.tt_linear(x, w, x.new_empty(0), [2, 3], [2, 2], [1, 3, 1]).shape == (4, 4)
    with pytest.raises(RuntimeError, match=r"x: expected a last dim of 6"):
        torch.ops.factorch.tt_linear(x[:, :5], w, x.new_empty(0), [2, 3], [2, 2], [1, 3, 1])


# --------------------------------------------------------------------------
# The functional API: lists of factors, checked in Python.
# --------------------------------------------------------------------------
def test_functional_matches_the_layer():
    torch.manual_seed(1)
    x = torch.randn(5, 12, dtype=torch.float64)
    for fact, rank in (("cp", 4), ("tucker", 2), ("tt", 3)):
        layer = FactorizedLinear(12, 10, fact, rank=rank, tensorized_shape=((3, 4), (2, 5)),
                                 dtype=torch.float64)
        if fact == "cp":
            y = cp_linear(x, layer.in_factors, layer.out_factors, layer.bias)
        elif fact == "tucker":
            y = tucker_linear(x, layer.core, layer.in_factors, layer.out_factors, layer.bias)
        else:
            y = tt_linear(x, layer.cores, layer.bias)
        torch.testing.assert_close(y, layer(x), rtol=1e-12, atol=1e-12)
        y.sum().backward()  # gradients flow back through the concatenation
        assert layer.factors.grad is not None and layer.factors.grad.abs().sum() > 0


def test_mismatched_factors_raise_naming_them():
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match=r"in_factors\[1\]: expected \[mode, R\] with R = 3"):
        cp_linear(x, [torch.randn(2, 3), torch.randn(3, 4)], [torch.randn(5, 3)])
    with pytest.raises(ValueError, match=r"out_factors\[0\]: expected \[mode, R\] with R = 3"):
        cp_linear(x, [torch.randn(2, 3), torch.randn(3, 3)], [torch.randn(5, 2)])
    with pytest.raises(ValueError, match=r"core: expected shape \[4, 2, 2\]"):
        tucker_linear(x, torch.randn(4, 2, 3), [torch.randn(2, 2), torch.randn(3, 2)],
                      [torch.randn(5, 4)])
    with pytest.raises(ValueError, match=r"cores\[1\]: expected a first dim of 3 \(the last dim of cores\[0\]\)"):
        tt_linear(x, [torch.randn(1, 2, 2, 3), torch.randn(2, 3, 2, 1)])
    with pytest.raises(ValueError, match=r"cores: expected r_0 = r_d = 1"):
        tt_linear(x, [torch.randn(1, 2, 2, 3), torch.randn(3, 3, 2, 2)])
    with pytest.raises(ValueError, match=r"cores\[0\]: expected a 4-dim tensor"):
        tt_linear(x, [torch.randn(2, 2, 3)])
    with pytest.raises(RuntimeError, match=r"x: expected a last dim of 6 \(in: the product"):
        tt_linear(torch.randn(4, 7), [torch.randn(1, 2, 2, 3), torch.randn(3, 3, 2, 1)])


# --------------------------------------------------------------------------
# Bad arguments to the ops: a RuntimeError naming the argument, never a crash.
# --------------------------------------------------------------------------
def test_bad_op_arguments_raise():
    x = torch.randn(4, 6)
    w = torch.randn(3 * (2 + 3 + 4))
    e = x.new_empty(0)
    cp = torch.ops.factorch.cp_linear
    with pytest.raises(RuntimeError, match=r"weights: expected a contiguous 1-D tensor of 27 elements"):
        cp(x, w[:-1], e, [2, 3], [4], 3)
    with pytest.raises(RuntimeError, match=r"weights: expected a contiguous 1-D tensor"):
        cp(x, torch.randn(54)[::2], e, [2, 3], [4], 3)
    with pytest.raises(RuntimeError, match=r"weights: expected dtype float32 \(the dtype of x\)"):
        cp(x, w.double(), e, [2, 3], [4], 3)
    with pytest.raises(RuntimeError, match=r"in_modes: expected 1 to 8 input mode sizes, each >= 1, got \[2, 0\]"):
        cp(x, w, e, [2, 0], [4], 3)
    with pytest.raises(RuntimeError, match=r"in_modes: expected 1 to 8"):
        cp(x, w, e, [], [4], 3)
    with pytest.raises(RuntimeError, match=r"rank: expected >= 1, got 0"):
        cp(x, w, e, [2, 3], [4], 0)
    with pytest.raises(RuntimeError, match=r"x: expected a last dim of 6"):
        cp(torch.randn(4, 5), w, e, [2, 3], [4], 3)
    with pytest.raises(RuntimeError, match=r"bias: expected shape \[4\]"):
        cp(x, w, torch.randn(3), [2, 3], [4], 3)
    tt = torch.ops.factorch.tt_linear
    wt = torch.randn(1 * 2 * 2 * 3 + 3 * 3 * 2 * 1)
    with pytest.raises(RuntimeError, match=r"ranks: expected the first and last of the d \+ 1 ranks to be 1"):
        tt(x, wt, e, [2, 3], [2, 2], [2, 3, 1])
    with pytest.raises(RuntimeError, match=r"ranks: expected 3 to 3 ranks"):
        tt(x, wt, e, [2, 3], [2, 2], [1, 3, 3, 1])
    with pytest.raises(RuntimeError, match=r"out_modes: expected 2 to 2 output mode sizes"):
        tt(x, wt, e, [2, 3], [4], [1, 3, 1])
    tk = torch.ops.factorch.tucker_linear
    with pytest.raises(RuntimeError, match=r"in_ranks: expected 2 to 2 ranks"):
        tk(x, torch.randn(30), e, [2, 3], [4], [2], [3], True)


def test_nan_in_a_core_is_named():
    torch.manual_seed(2)
    layer = FactorizedLinear(12, 10, "tt", rank=3, tensorized_shape=((3, 4), (2, 5)))
    with torch.no_grad():
        layer.cores[1][0, 0, 0, 0] = float("nan")
    with pytest.raises(RuntimeError, match=r"y: .*NaN/Inf.*the inputs cores\[1\] hold NaN or Inf"):
        layer(torch.randn(3, 12))


def test_nan_in_grad_y_is_named():
    layer = FactorizedLinear(12, 10, "cp", rank=3, tensorized_shape=((3, 4), (2, 5)))
    y = layer(torch.randn(3, 12))
    g = torch.ones_like(y)
    g[0, 0] = float("inf")
    with pytest.raises(RuntimeError, match=r"grad_y: 1 NaN/Inf values in the gradient flowing into cp_linear"):
        y.backward(g)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("fact", FACTS)
def test_cuda_matches_cpu(fact):
    for s in samples(fact, "cpu", torch.float64):
        y_cpu = OPS[fact](*s.args())
        args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in s.args()]
        y_gpu = OPS[fact](*args)
        if fact in ("cp", "tucker"):
            y_cpu, y_gpu = y_cpu[0], y_gpu[0]
        torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-11, atol=1e-11, msg=s.name)


def test_concurrent_calls_from_threads():
    """Backward runs on autograd worker threads: the kernels are re-entrant."""
    torch.manual_seed(3)
    layers = [FactorizedLinear(16, 16, f, rank=3, dtype=torch.float64) for f in FACTS]
    x = torch.randn(9, 16, dtype=torch.float64)
    want = [layer(x) for layer in layers]
    errors = []

    def work():
        for _ in range(30):
            for layer, w in zip(layers, want):
                if not torch.equal(layer(x), w):
                    errors.append("mismatch")

    in_threads(work, 4)
    assert not errors
