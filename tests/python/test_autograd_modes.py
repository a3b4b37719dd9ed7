"""Autograd beyond the first-order backward: double backward (gradients of
gradients: gradgradcheck, gradient penalties), forward-mode AD (dual
tensors, torch.func.jvp / jacfwd), the torch.func transforms (jacrev, grad,
vmap) over every layer, and mixed devices (meta parameters with a CPU input
and the reverse). Every result is compared with a dense float64 reference
or with the C ops' own first-order results; none may be silently zero."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as TF
from torch import nn
from torch.autograd import forward_ad as fwAD
from torch.autograd import gradgradcheck
from torch.func import functional_call

import factorch.functional as F
from factorch.lora import LoraLinear
from factorch.nn import FactorizedConv1d, FactorizedConv2d, FactorizedEmbedding, FactorizedLinear

from helpers import rand
from test_lora_linear_op import keep_mask, seed_tensor

D64 = torch.float64

LINEAR = [("lowrank", 3, None), ("cp", 3, ((2, 3), (3, 2))), ("tucker", 2, ((2, 3), (3, 2))),
          ("tt", 2, ((2, 3), (3, 2))), ("tt", 2, ((2, 1, 3), (1, 3, 2)))]
CONV = ["lowrank", "cp", "tucker", "tt"]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _fill(module, seed=0):
    """Random non-zero values in every parameter (LoRA's B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(rand(*p.shape, dtype=p.dtype, gen=g))
    return module


def _linear(fz, rank, ts, bias=True):
    return _fill(FactorizedLinear(6, 6, fz, rank=rank, tensorized_shape=ts, bias=bias,
                                  dtype=D64))


def _conv(fz, cls=FactorizedConv2d, bias=True, **kw):
    return _fill(cls(4, 6, 3, fz, rank=2, padding=1, bias=bias, dtype=D64, **kw))


def _loras():
    """(name, LoRA layer) over every kind of base: dense, low-rank, another
    factorization (its output as base_out)."""
    bases = [("dense", nn.Linear(6, 5, dtype=D64)),
             ("lowrank", FactorizedLinear(6, 5, "lowrank", rank=2, dtype=D64)),
             ("tt", FactorizedLinear(6, 6, "tt", rank=2, tensorized_shape=((2, 3), (3, 2)),
                                     dtype=D64))]
    for name, base in bases:
        layer = _fill(LoraLinear(base, r=2, alpha=3.0))
        yield name, layer


def _lora_dense(layer):
    """The dense float64 W + s·B·A and the bias the LoRA layer computes."""
    base = layer.base_layer
    W = base.weight.detach().double() + layer.delta_weight()
    b = base.bias.detach() if base.bias is not None else None
    return W, b


# --------------------------------------------------------------------------
# Double backward
# --------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_gradgradcheck_lowrank_linear_ops(bias):
    x, U, V = rand(3, 6, requires_grad=True), rand(5, 2, requires_grad=True), rand(
        2, 6, requires_grad=True)
    b = rand(5, requires_grad=True) if bias else None
    args = (x, U, V) + ((b,) if bias else ())
    assert gradgradcheck(lambda x, U, V, *b: F.lowrank_linear(x, U, V, *b), args)
    w = torch.cat([V.detach().reshape(-1), U.detach().reshape(-1)]).requires_grad_()
    args = (x, w) + ((b,) if bias else ())
    assert gradgradcheck(lambda x, w, *b: F.lowrank_linear_flat(x, w, b[0] if b else None, 5, 2),
                         args)


@pytest.mark.parametrize("fz,rank,ts", LINEAR)
@pytest.mark.parametrize("bias", [True, False])
def test_gradgradcheck_factorized_linear(fz, rank, ts, bias):
    layer = _linear(fz, rank, ts, bias)
    x = rand(2, 6, requires_grad=True)
    params = {n: p.detach().clone().requires_grad_() for n, p in layer.named_parameters()}
    names = list(params)

    def f(x, *ps):
        return functional_call(layer, dict(zip(names, ps)), (x,))

    assert gradgradcheck(f, (x, *params.values()))


@pytest.mark.parametrize("fz", CONV)
@pytest.mark.parametrize("cls", [FactorizedConv2d, FactorizedConv1d])
def test_gradgradcheck_factorized_conv(fz, cls):
    layer = _conv(fz, cls, bias=fz != "cp")
    x = rand(2, 4, 4, 4, requires_grad=True) if cls is FactorizedConv2d else rand(
        2, 4, 5, requires_grad=True)
    params = {n: p.detach().clone().requires_grad_() for n, p in layer.named_parameters()}
    names = list(params)

    def f(x, *ps):
        return functional_call(layer, dict(zip(names, ps)), (x,))

    assert gradgradcheck(f, (x, *params.values()))


@pytest.mark.parametrize("fz,pad", [("lowrank", None), ("lowrank", 3), ("tt", None), ("tt", 0)])
def test_gradgradcheck_factorized_embedding(fz, pad):
    layer = _fill(FactorizedEmbedding(12, 6, fz, rank=2, padding_idx=pad, dtype=D64))
    idx = torch.tensor([[1, 3, 11], [0, 7, 3]])
    w = layer.factors.detach().clone().requires_grad_()
    assert gradgradcheck(lambda w: functional_call(layer, {"factors": w}, (idx,)), (w,))


@pytest.mark.parametrize("bias", [True, False])
def test_gradgradcheck_lora_linear(bias):
    x, A, B = rand(3, 6, requires_grad=True), rand(2, 6, requires_grad=True), rand(
        5, 2, requires_grad=True)
    W, U, V = rand(5, 6, requires_grad=True), rand(5, 3, requires_grad=True), rand(
        3, 6, requires_grad=True)
    b = rand(5, requires_grad=True) if bias else None
    bo = rand(3, 5, requires_grad=True)
    assert gradgradcheck(lambda x, A, B, W, *b: F.lora_linear(
        x, A, B, 0.7, weight=W, bias=b[0] if b else None), (x, A, B, W) + ((b,) if bias else ()))
    assert gradgradcheck(lambda x, A, B, U, V, *b: F.lora_linear(
        x, A, B, 0.7, U=U, V=V, bias=b[0] if b else None),
        (x, A, B, U, V) + ((b,) if bias else ()))
    assert gradgradcheck(lambda x, A, B, bo: F.lora_linear(x, A, B, 0.7, base_out=bo),
                         (x, A, B, bo))


def _lora_dropout(x, A, B, W, b, seed, p, scale=0.7):
    """The op with dropout p and a fixed seed (deterministic: the mask is a
    hash of the seed and the element index)."""
    e = x.new_empty(0)
    return torch.ops.factorch.lora_linear(x, A, B, W, e, e, e, b, seed_tensor(seed), 0, scale,
                                          p)[0]


def _lora_dropout_reference(x, A, B, W, b, seed, p, scale=0.7):
    xd = x * keep_mask(seed, x.shape, p) / (1 - p)
    return x @ W.t() + b + scale * (xd @ A.t()) @ B.t()


@pytest.mark.parametrize("seed", [3, 2**63 + 11])
def test_lora_linear_with_dropout_twice_differentiable(seed):
    x, A, B = rand(4, 6, requires_grad=True), rand(2, 6, requires_grad=True), rand(
        5, 2, requires_grad=True)
    W, b = rand(5, 6, requires_grad=True), rand(5, requires_grad=True)
    assert gradgradcheck(lambda *a: _lora_dropout(*a, seed, 0.4), (x, A, B, W, b))
    # The gradient penalty with the same mask as the forward (the C kernels'
    # hash, written again with numpy in test_lora_linear_op.py).
    got = _penalty(lambda x: _lora_dropout(x, A, B, W, b, seed, 0.4), x, (A, B, W))
    want = _penalty(lambda x: _lora_dropout_reference(x, A, B, W, b, seed, 0.4), x, (A, B, W))
    assert want[0].abs().max() > 1e-3
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def _penalty(f, x, params):
    """The gradient of ||d(sum f(x)²)/dx||² w.r.t. params (a gradient penalty)."""
    (gx,) = torch.autograd.grad(f(x).square().sum(), x, create_graph=True)
    return torch.autograd.grad(gx.square().sum(), params)


def test_gradient_penalty_lowrank_linear_equals_dense():
    x = rand(4, 6, requires_grad=True)
    U, V, b = rand(5, 2, requires_grad=True), rand(2, 6, requires_grad=True), rand(
        5, requires_grad=True)
    got = _penalty(lambda x: F.lowrank_linear(x, U, V, b), x, (U, V, b))
    want = _penalty(lambda x: x @ (U @ V).t() + b, x, (U, V, b))
    assert got[0].abs().max() > 1e-3  # the reference is not zero: the check can fail
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("fz,rank,ts", LINEAR)
def test_gradient_penalty_factorized_linear_equals_dense(fz, rank, ts):
    layer = _linear(fz, rank, ts)
    x = rand(3, 6, requires_grad=True)
    got = _penalty(layer, x, (layer.factors,))[0]
    # Dense: the W the factors represent, formed with torch ops (differentiable).
    want = _penalty(lambda x: x @ layer.layout.to_dense(layer.factors).t() + layer.bias, x,
                    (layer.factors,))[0]
    assert want.abs().max() > 1e-3
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("fz", CONV)
def test_gradient_penalty_factorized_conv_equals_dense(fz):
    layer = _conv(fz)
    x = rand(2, 4, 5, 5, requires_grad=True)
    got = _penalty(layer, x, (layer.factors,))[0]
    want = _penalty(lambda x: TF.conv2d(x, layer.weight, layer.bias, padding=1), x,
                    (layer.factors,))[0]
    assert want.abs().max() > 1e-3
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("fz", ["lowrank", "tt"])
def test_second_order_embedding_equals_dense_table(fz):
    layer = _fill(FactorizedEmbedding(12, 6, fz, rank=2, dtype=D64))
    idx = torch.tensor([1, 3, 11, 3])
    probe = rand(4, 6)

    def loss(table_fn):
        (g,) = torch.autograd.grad((table_fn() * probe).square().sum(), layer.factors,
                                   create_graph=True)
        return torch.autograd.grad(g.square().sum(), layer.factors)[0]

    got = loss(lambda: layer(idx))
    want = loss(lambda: layer.weight[idx])
    assert want.abs().max() > 1e-3
    torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------
# Forward mode and torch.func: jacfwd / jacrev against the dense reference
# --------------------------------------------------------------------------
def _linear_cases():
    for fz, rank, ts in LINEAR:
        layer = _linear(fz, rank, ts)
        yield f"linear-{fz}-{ts}", layer, layer.layout.to_dense(layer.factors).detach()
    for name, layer in _loras():
        yield f"lora-{name}", layer, _lora_dense(layer)[0]


@pytest.mark.parametrize("case", list(range(len(LINEAR) + 3)))
@pytest.mark.parametrize("transform", ["jacfwd", "jacrev"])
def test_jacobians_of_linear_layers_equal_the_dense_weight(case, transform):
    name, layer, W = list(_linear_cases())[case]
    x = rand(6)
    J = getattr(torch.func, transform)(layer)(x)
    assert W.abs().max() > 0.1
    torch.testing.assert_close(J, W, msg=name)
    # Batched: d y_i / d x_j = W (block-diagonal over the batch rows).
    Xb = rand(2, 6)
    Jb = getattr(torch.func, transform)(layer)(Xb)
    for i in range(2):
        torch.testing.assert_close(Jb[i, :, i], W, msg=name)


@pytest.mark.parametrize("fz", CONV)
@pytest.mark.parametrize("cls", [FactorizedConv2d, FactorizedConv1d])
@pytest.mark.parametrize("transform", ["jacfwd", "jacrev"])
def test_jacobians_of_conv_layers_equal_the_dense_conv(fz, cls, transform):
    layer = _conv(fz, cls)
    x = rand(1, 4, 4, 4) if cls is FactorizedConv2d else rand(1, 4, 5)
    dense = layer.to_conv()
    J = getattr(torch.func, transform)(layer)(x)
    want = torch.autograd.functional.jacobian(dense, x)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(J, want)


@pytest.mark.parametrize("fz", ["lowrank", "tt"])
@pytest.mark.parametrize("transform", ["jacfwd", "jacrev"])
def test_jacobians_of_embeddings_in_the_factors(fz, transform):
    layer = _fill(FactorizedEmbedding(12, 6, fz, rank=2, padding_idx=2, dtype=D64))
    idx = torch.tensor([[1, 2], [11, 1]])
    w = layer.factors.detach().clone()

    def f(w):
        return functional_call(layer, {"factors": w}, (idx,))

    J = getattr(torch.func, transform)(f)(w)
    # Reference: the C ops' own first-order backward, one output at a time.
    want = torch.autograd.functional.jacobian(f, w)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(J, want)


def test_func_grad_and_hessian_of_a_layer():
    layer = _linear("tt", 2, ((2, 3), (3, 2)))
    W = layer.layout.to_dense(layer.factors).detach()
    x = rand(6)
    g = torch.func.grad(lambda x: layer(x).square().sum())(x)
    y = x @ W.t() + layer.bias.detach()
    torch.testing.assert_close(g, 2 * W.t() @ y)
    H = torch.func.hessian(lambda x: layer(x).square().sum())(x)
    torch.testing.assert_close(H, 2 * W.t() @ W)


def _all_layers():
    for fz, rank, ts in LINEAR:
        yield f"linear-{fz}", _linear(fz, rank, ts), rand(5, 6)
    for fz in CONV:
        yield f"conv2d-{fz}", _conv(fz), rand(5, 2, 4, 4, 4)
        yield f"conv1d-{fz}", _conv(fz, FactorizedConv1d), rand(5, 2, 4, 5)
    for name, layer in _loras():
        yield f"lora-{name}", layer, rand(5, 3, 6)


ALL = [name for name, _, _ in _all_layers()]


@pytest.mark.parametrize("name", ALL)
def test_vmap_equals_the_loop(name):
    _, layer, X = next(c for c in _all_layers() if c[0] == name)
    got = torch.vmap(layer)(X)
    want = torch.stack([layer(x) for x in X])
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("fz", ["lowrank", "tt"])
def test_vmap_embedding_equals_the_loop(fz):
    layer = _fill(FactorizedEmbedding(12, 6, fz, rank=2, dtype=D64))
    idx = torch.tensor([[1, 2, 3], [11, 0, 5]])
    torch.testing.assert_close(torch.vmap(layer)(idx), torch.stack([layer(i) for i in idx]))


@pytest.mark.parametrize("name", ALL)
def test_dual_tensors_give_the_tangent(name):
    _, layer, X = next(c for c in _all_layers() if c[0] == name)
    X = X[0]
    T = rand(*X.shape)
    with fwAD.dual_level():
        y = layer(fwAD.make_dual(X, T))
        tangent = fwAD.unpack_dual(y).tangent
    # Every layer is linear in x: the tangent is the layer without its bias on T.
    want = layer(T) - layer(torch.zeros_like(T))
    assert tangent is not None and want.abs().max() > 0.1
    torch.testing.assert_close(tangent, want)


@pytest.mark.parametrize("name", ALL)
def test_jvp_in_the_parameters(name):
    _, layer, X = next(c for c in _all_layers() if c[0] == name)
    X = X[0]
    params = {n: p.detach() for n, p in layer.named_parameters()}
    tangents = {n: rand(*p.shape) for n, p in params.items()}

    def f(ps):
        return functional_call(layer, ps, (X,))

    _, got = torch.func.jvp(f, (params,), (tangents,))
    # Reference: the C ops' first-order reverse mode, contracted with the tangents.
    flat = [params[n] for n in params]

    def g(*ps):
        return f(dict(zip(params, ps)))

    jac = torch.autograd.functional.jacobian(g, tuple(flat))
    want = sum(torch.tensordot(j, tangents[n], dims=tangents[n].dim())
               for j, n in zip(jac, params))
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want)


def test_lora_with_dropout_in_forward_mode_uses_the_op_mask():
    layer = _fill(LoraLinear(nn.Linear(6, 5, dtype=D64), r=2, dropout=0.5))
    layer.train()
    x, tx = rand(3, 6), rand(3, 6)
    torch.manual_seed(7)  # the seed functional.lora_linear draws next
    seed = int(torch.randint(-2**63, 2**63 - 1, (1,), dtype=torch.int64)) % 2**64
    torch.manual_seed(7)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(layer(fwAD.make_dual(x, tx))).tangent
    W = layer.base_layer.weight.detach()
    A, B = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    keep = keep_mask(seed, x.shape, 0.5)
    assert 0 < keep.sum() < keep.numel()
    want = tx @ W.t() + layer.scaling * ((tx * keep / 0.5) @ A.t()) @ B.t()
    torch.testing.assert_close(tangent, want)
    # Under vmap (jacfwd) the seed's draw follows vmap's randomness flag: torch's error
    # by default, never a silent result.
    with pytest.raises(RuntimeError, match="randomness"):
        torch.func.jacfwd(layer)(x[0])
    layer.eval()  # no dropout
    torch.testing.assert_close(torch.func.jacfwd(layer)(x[0]), _lora_dense(layer)[0])


@pytest.mark.parametrize("fz", ["tt", "lowrank"])
def test_export_and_compile_keep_the_c_ops(fz):
    layer = _linear(fz, 2, None if fz == "lowrank" else ((2, 3), (3, 2)))
    x = rand(3, 6)
    op = "factorch.tt_linear" if fz == "tt" else "factorch.lowrank_linear_flat"
    ep = torch.export.export(layer, (x,))
    assert any(op in str(n.target) for n in ep.graph.nodes)
    # A compiled training step: the C forward and the C backward, not the definitions.
    from torch._functorch.aot_autograd import aot_module_simplified

    graphs = {}

    def backend(gm, example):
        def keep(kind):
            def compiler(g, _):
                graphs[kind] = {str(n.target) for n in g.graph.nodes}
                return g
            return compiler
        return aot_module_simplified(gm, example, fw_compiler=keep("fw"), bw_compiler=keep("bw"))

    xg = rand(3, 6, requires_grad=True)
    torch.compile(layer, backend=backend, fullgraph=True)(xg).sum().backward()
    assert f"{op}.default" in graphs["fw"]
    assert f"{op}_backward.default" in graphs["bw"]
    torch._dynamo.reset()


# --------------------------------------------------------------------------
# Mixed devices: never a result on the wrong device or of uninitialised memory
# --------------------------------------------------------------------------
def _device_cases(device):
    for fz, rank, ts in LINEAR[:4]:
        yield (f"linear-{fz}", lambda fz=fz, rank=rank, ts=ts: FactorizedLinear(
            6, 6, fz, rank=rank, tensorized_shape=ts, device=device), (4, 6))
    for fz in CONV:
        yield f"conv2d-{fz}", lambda fz=fz: FactorizedConv2d(4, 6, 3, fz, rank=2,
                                                             device=device), (1, 4, 5, 5)
        yield f"conv1d-{fz}", lambda fz=fz: FactorizedConv1d(4, 6, 3, fz, rank=2,
                                                             device=device), (1, 4, 5)
    yield "lora-dense", lambda: LoraLinear(nn.Linear(6, 5, device=device), r=2), (4, 6)
    yield "lora-lowrank", lambda: LoraLinear(FactorizedLinear(6, 5, rank=2, device=device),
                                             r=2), (4, 6)
    yield "lora-tt", lambda: LoraLinear(FactorizedLinear(6, 6, "tt", rank=2, device=device),
                                        r=2), (4, 6)


@pytest.mark.parametrize("i", range(len(list(_device_cases("cpu")))))
@pytest.mark.parametrize("params,inputs", [("meta", "cpu"), ("cpu", "meta")])
def test_mixed_devices_raise_naming_the_argument(i, params, inputs):
    name, make, shape = list(_device_cases(params))[i]
    layer = make()
    x = torch.randn(*shape, device=inputs)
    with pytest.raises(RuntimeError, match=rf"\w+: expected device {inputs} \(the device of x\), "
                                           rf"got {params}"):
        layer(x)


@pytest.mark.parametrize("fz", ["lowrank", "tt"])
@pytest.mark.parametrize("params,inputs", [("meta", "cpu"), ("cpu", "meta")])
def test_mixed_devices_embedding_raise(fz, params, inputs):
    layer = FactorizedEmbedding(12, 6, fz, rank=2, device=params)
    with pytest.raises(RuntimeError, match=rf"indices: expected device {params} .* got {inputs}"):
        layer(torch.tensor([1, 2], device=inputs))


@pytest.mark.parametrize("op", ["lowrank_linear", "lowrank_linear_flat"])
def test_lowrank_ops_mixed_devices_raise(op):
    x = torch.randn(4, 6)
    U, V = torch.randn(5, 2, device="meta"), torch.randn(2, 6, device="meta")
    with pytest.raises(RuntimeError, match=r"expected device cpu \(the device of x\), got meta"):
        if op == "lowrank_linear":
            torch.ops.factorch.lowrank_linear(x, U, V, x.new_empty(0))
        else:
            torch.ops.factorch.lowrank_linear_flat(x, torch.randn(22, device="meta"),
                                                   x.new_empty(0), 2, 2)
