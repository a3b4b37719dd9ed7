"""torch.ops.factorch.lora_linear and its backward: values against
base + s·(drop(x)·Aᵀ)·Bᵀ computed with torch ops in float64 (the dropout mask
drawn by this file's own numpy copy of the hash), gradcheck, opcheck,
torch.compile, bad inputs, double backward and forward-mode AD."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import factorch
from factorch import _ops
from factorch.functional import lora_linear

from helpers import DEVICES, dtypes_for, rand

TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}
op = torch.ops.factorch.lora_linear
op_bwd = torch.ops.factorch.lora_linear_backward


# --------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------
def keep_mask(seed: int, shape, p: float) -> torch.Tensor:
    """The op's mask, written again: element i (row-major over x folded to
    [M, in]) is kept when splitmix64's output at position i + 1 of the
    stream seeded with `seed` is >= p·2^64."""
    n = int(np.prod(shape))
    i = np.arange(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(seed % 2**64) + (i + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    keep = z >= np.uint64(int(p * 2.0**64)) if p > 0 else np.ones(n, dtype=bool)
    return torch.from_numpy(keep.reshape(shape))


def reference(s, **over):
    """base + s·(drop(x)·Aᵀ)·Bᵀ in float64 with torch ops (differentiable)."""
    a = {**s, **over}
    x, A, B = (t.double() for t in (a["x"], a["A"], a["B"]))
    p = a["dropout"]
    xd = x * keep_mask(a["seed"], x.shape, p).to(x.device) / (1 - p)
    t = xd @ A.T
    if a.get("weight") is not None:
        base = x @ a["weight"].double().T
    elif a.get("U") is not None:
        base = (x @ a["V"].double().T) @ a["U"].double().T
    else:
        base = a["base_out"].double()
    if a.get("bias") is not None:
        base = base + a["bias"].double()
    return base + a["scale"] * (t @ B.T), t


def seed_tensor(seed: int) -> torch.Tensor:
    return torch.tensor([seed - 2**64 if seed >= 2**63 else seed], dtype=torch.int64)


def call(s, **over):
    """The op itself with the sample's seed (so the reference knows the
    mask): returns (y, t)."""
    a = {**s, **over}
    x = a["x"]
    e = x.new_empty(0)

    def arg(name):
        return e if a.get(name) is None else a[name]

    kind = (_ops.LORA_DENSE if a.get("weight") is not None
            else _ops.LORA_LOWRANK if a.get("U") is not None else _ops.LORA_GIVEN)
    return op(x, a["A"], a["B"], arg("weight"), arg("U"), arg("V"), arg("base_out"), arg("bias"),
              seed_tensor(a["seed"]), kind, float(a["scale"]), float(a["dropout"]))


BASE_KEYS = ("weight", "U", "V", "base_out", "bias")


def tensors_of(s):
    """The differentiable inputs of a sample, in a fixed order."""
    return {k: s[k] for k in ("x", "A", "B") + BASE_KEYS if s.get(k) is not None}


def lora_samples(device, dtype, requires_grad=False):
    """Dicts with x, A, B, scale, dropout, seed and one base (weight or U, V
    or base_out, with or without bias): empty batches, M = 1, larger
    batches, r = 1 and r = min(in, out), batch dims, non-contiguous x."""
    g = torch.Generator().manual_seed(0)
    kw = dict(device=device, dtype=dtype, gen=g)
    n = [0]

    def make(name, xshape, out, r, base="dense", bias=True, p=0.0, x_fn=None, rb=3):
        n[0] += 1
        x = rand(*xshape, **kw)
        if x_fn is not None:
            x = x_fn(x)
        inn = x.shape[-1]
        s = dict(name=f"{name} ({base}, p={p}, bias={bias})", x=x, A=rand(r, inn, **kw),
                 B=rand(out, r, **kw), scale=0.5 + 0.25 * n[0], dropout=p,
                 seed=(0x9E3779B97F4A7C15 * n[0]) % 2**64)
        if base == "dense":
            s["weight"] = rand(out, inn, **kw)
        elif base == "lowrank":
            s["U"], s["V"] = rand(out, rb, **kw), rand(rb, inn, **kw)
        else:
            s["base_out"] = rand(*x.shape[:-1], out, **kw)
            bias = False
        if bias:
            s["bias"] = rand(out, **kw)
        for t in tensors_of(s).values():
            t.requires_grad_(requires_grad)
        return s

    for base in ("dense", "lowrank", "given"):
        for p in (0.0, 0.25):
            yield make("2d", (7, 12), 9, 4, base, p=p)
            yield make("no bias", (7, 12), 9, 4, base, bias=False, p=p)
            yield make("rank 1", (5, 12), 9, 1, base, p=p)
            yield make("r = min(in, out)", (5, 12), 9, 9, base, p=p)
            yield make("M=1", (1, 16), 11, 5, base, p=p)
            yield make("empty batch", (0, 10), 6, 3, base, p=p)
            yield make("large batch", (300, 24), 20, 6, base, p=p)
            yield make("3-d batch", (2, 3, 10), 6, 3, base, p=p)
            yield make("transposed x", (12, 7), 9, 4, base, p=p, x_fn=lambda x: x.t())
            yield make("permuted 3-d", (3, 2, 10), 6, 3, base, p=p,
                       x_fn=lambda x: x.transpose(0, 1))


def close(got, want, dtype, what, factor=1.0):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if want.numel() == 0:
        return
    scale = max(want.abs().max().item(), 1.0)
    err = (got.double() - want).abs().max().item()
    assert err <= TOL[dtype] * factor * scale, f"{what}: error {err:.3g} (scale {scale:.3g})"


# --------------------------------------------------------------------------
# Values and gradients
# --------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_forward_matches_float64_reference(device):
    for dtype in dtypes_for(device):
        for s in lora_samples(device, dtype):
            y, t = call(s)
            ry, rt = reference(s)
            assert y.dtype == dtype and y.device.type == device, s["name"]
            close(y, ry, dtype, f"{s['name']} {dtype} y")
            close(t, rt, dtype, f"{s['name']} {dtype} t")


@pytest.mark.parametrize("device", DEVICES)
def test_backward_matches_float64_reference(device):
    for dtype in dtypes_for(device):
        for s in lora_samples(device, dtype, requires_grad=True):
            ins = tensors_of(s)
            y, _ = call(s)
            g = rand(*y.shape, device=device, dtype=dtype)
            got = torch.autograd.grad(y, list(ins.values()), g)
            ref_in = {k: v.detach().double().requires_grad_() for k, v in ins.items()}
            want = torch.autograd.grad(reference(s, **ref_in)[0], list(ref_in.values()),
                                       g.double())
            for name, a, w in zip(ins, got, want):
                close(a, w, dtype, f"{s['name']} {dtype} grad of {name}", factor=10)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    """Every input, and the frozen base (only x, A, B), with dropout on or
    off: the fixed seed makes the op a deterministic function, so gradcheck
    also proves the backward regenerates the forward's mask."""
    for s in lora_samples(device, torch.float64, requires_grad=True):
        if s["x"].numel() == 0 or s["x"].shape[0] > 50:
            continue  # empty: nothing to perturb; large: slow
        names = list(tensors_of(s))
        for trainable in (names, ["x", "A", "B"]):

            def f(*ts):
                return call(s, **dict(zip(trainable, ts)))[0]

            args = tuple(s[k] for k in trainable)
            assert torch.autograd.gradcheck(f, args), f"{s['name']} {trainable}"


def test_gradient_of_base_out_is_grad_y():
    s = next(x for x in lora_samples("cpu", torch.float64, requires_grad=True)
             if x.get("base_out") is not None)
    y, _ = call(s)
    g = torch.randn_like(y)
    (gb,) = torch.autograd.grad(y, [s["base_out"]], g)
    assert torch.equal(gb, g)


@pytest.mark.parametrize("device", DEVICES)
def test_frozen_base_gets_no_weight_gradient(device, monkeypatch):
    """The default LoRA case: W frozen, so the backward op is asked for x, A
    and B only and returns empty tensors for the weight and bias."""
    x = rand(6, 8, device=device, requires_grad=True)
    A = rand(2, 8, device=device, requires_grad=True)
    B = rand(5, 2, device=device, requires_grad=True)
    W, b = rand(5, 8, device=device), rand(5, device=device)
    calls = []

    class Spy:
        def __getattr__(self, name):
            return getattr(torch.ops.factorch, name)

        def lora_linear_backward(self, *args):
            out = op_bwd(*args)
            calls.append((args[-7:], [tuple(t.shape) for t in out]))
            return out

    monkeypatch.setattr(_ops, "ops", Spy())
    lora_linear(x, A, B, 2.0, weight=W, bias=b).sum().backward()
    needs, shapes = calls[0]
    assert needs == (True, True, True, False, False, False, False)
    assert shapes[3] == (0,) and shapes[6] == (0,)
    assert W.grad is None and b.grad is None and x.grad is not None and A.grad is not None
    # Adapter only (x needs no gradient, the first layer of a model): no grad_x either.
    x2 = x.detach()
    gx, gA, gB, gW, gU, gV, gb = op_bwd(torch.ones(6, 5, device=device, dtype=x2.dtype), x2, A.detach(),
                                        B.detach(), W, x2.new_empty(0), x2.new_empty(0),
                                        x2.new_empty(0), x2.new_empty(0, dtype=torch.int64),
                                        _ops.LORA_DENSE, 2.0, 0.0, False, True, True, False,
                                        False, False, False)
    assert gx.numel() == gW.numel() == gb.numel() == 0 and gA.shape == A.shape


# --------------------------------------------------------------------------
# Dropout
# --------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_dropout_mask_recovered_with_identity_adapter(device):
    """A = I (r = in) makes t = drop(x): the mask shows directly, and must be
    the reference's, keep about 1 - p, and scale kept elements by 1/(1-p)."""
    M, n = 400, 64
    x = rand(M, n, device=device)
    s = dict(x=x, A=torch.eye(n, device=device, dtype=x.dtype), B=rand(3, n, device=device),
             weight=rand(3, n, device=device), scale=1.0, dropout=0.3, seed=12345)
    _, t = call(s)
    keep = keep_mask(12345, (M, n), 0.3).to(device)
    torch.testing.assert_close(t, torch.where(keep, x / 0.7, 0.0), rtol=1e-14, atol=0)
    frac = keep.double().mean().item()
    assert abs(frac - 0.7) < 5 * (0.21 / (M * n)) ** 0.5
    _, t2 = call(s, seed=12346)
    assert not torch.equal(t2 != 0, t != 0)


def test_dropout_reproducible_with_manual_seed_and_generator():
    x, A, B, W = rand(8, 16), rand(4, 16), rand(6, 4), rand(6, 16)
    torch.manual_seed(7)
    y1 = lora_linear(x, A, B, 1.0, weight=W, dropout=0.5)
    torch.manual_seed(7)
    y2 = lora_linear(x, A, B, 1.0, weight=W, dropout=0.5)
    y3 = lora_linear(x, A, B, 1.0, weight=W, dropout=0.5)
    assert torch.equal(y1, y2) and not torch.equal(y2, y3)
    g = torch.Generator().manual_seed(3)
    y4 = lora_linear(x, A, B, 1.0, weight=W, dropout=0.5, generator=g)
    # The wrapper's seed is one draw from the generator; the op then draws the mask.
    seed = torch.randint(-2**63, 2**63 - 1, (1,), dtype=torch.int64,
                         generator=torch.Generator().manual_seed(3)).item()
    ref, _ = reference(dict(x=x, A=A, B=B, weight=W, scale=1.0, dropout=0.5, seed=seed % 2**64))
    close(y4, ref, torch.float64, "generator")
    assert torch.equal(lora_linear(x, A, B, 1.0, weight=W, dropout=0.0),
                       lora_linear(x, A, B, 1.0, weight=W))


def test_dropout_backward_uses_the_forward_mask():
    x = rand(30, 20, requires_grad=True)
    A, B, W = rand(5, 20, requires_grad=True), rand(7, 5, requires_grad=True), rand(7, 20)
    g = torch.Generator().manual_seed(11)
    y = lora_linear(x, A, B, 0.7, weight=W, dropout=0.4, generator=g)
    seed = torch.randint(-2**63, 2**63 - 1, (1,), dtype=torch.int64,
                         generator=torch.Generator().manual_seed(11)).item() % 2**64
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, A, B], gy)
    ref_in = [t.detach().requires_grad_() for t in (x, A, B)]
    ry, _ = reference(dict(x=ref_in[0], A=ref_in[1], B=ref_in[2], weight=W, scale=0.7,
                           dropout=0.4, seed=seed))
    want = torch.autograd.grad(ry, ref_in, gy)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU")
def test_cuda_matches_cpu_including_the_mask():
    for s in lora_samples("cpu", torch.float64):
        cuda = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
        y_cpu, t_cpu = call(s)
        y_gpu, t_gpu = call(cuda)
        torch.testing.assert_close(t_gpu.cpu(), t_cpu, rtol=1e-12, atol=1e-12, msg=s["name"])
        torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-12, atol=1e-12, msg=s["name"])


# --------------------------------------------------------------------------
# opcheck, torch.compile, export
# --------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for dtype in (torch.float32, torch.float64):
        for i, s in enumerate(lora_samples(device, dtype, requires_grad=True)):
            if i % 3:
                continue  # a third of the samples covers every base, p and shape kind
            a = {k: s.get(k) for k in BASE_KEYS}
            e = s["x"].new_empty(0)
            kind = (_ops.LORA_DENSE if a["weight"] is not None
                    else _ops.LORA_LOWRANK if a["U"] is not None else _ops.LORA_GIVEN)
            args = (s["x"], s["A"], s["B"], *(e if a[k] is None else a[k] for k in BASE_KEYS),
                    seed_tensor(s["seed"]), kind, float(s["scale"]), float(s["dropout"]))
            torch.library.opcheck(op, args)
            with torch.no_grad():
                y, t = op(*args)
            det = [v.detach() if isinstance(v, torch.Tensor) else v for v in args]
            bargs = (torch.randn_like(y), det[0], det[1], det[2], det[3], det[4], det[5], t,
                     det[8], kind, det[10], det[11], True, True, True,
                     kind == _ops.LORA_DENSE, kind == _ops.LORA_LOWRANK,
                     kind == _ops.LORA_LOWRANK, a["bias"] is not None)
            torch.library.opcheck(op_bwd, bargs)


def _layer_fn(device, p):
    W = rand(12, 16, device=device, dtype=torch.float32)
    A = rand(4, 16, device=device, dtype=torch.float32, requires_grad=True)
    B = rand(12, 4, device=device, dtype=torch.float32, requires_grad=True)

    def f(x):
        h = lora_linear(x, A, B, 2.0, weight=W, dropout=p)
        return torch.nn.functional.gelu(h)

    return f, (A, B)


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device, backend, p):
    torch._dynamo.reset()
    f, params = _layer_fn(device, p)
    x = torch.randn(5, 16, device=device, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    y = compiled(x)
    if p == 0:
        torch.testing.assert_close(y, f(x))
    y.sum().backward()
    assert x.grad is not None and all(t.grad is not None for t in params)
    explained = torch._dynamo.explain(f)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_torch_export_keeps_the_op():
    W, A, B = rand(8, 16, dtype=torch.float32), rand(2, 16, dtype=torch.float32), rand(
        8, 2, dtype=torch.float32)

    class M(torch.nn.Module):
        def forward(self, x):
            return lora_linear(x, A, B, 0.5, weight=W)

    x = torch.randn(3, 16)
    ep = torch.export.export(M(), (x,))
    assert any("factorch.lora_linear" in str(n.target) for n in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(x), M()(x))


# --------------------------------------------------------------------------
# Double backward, forward-mode AD
# --------------------------------------------------------------------------
def test_double_backward_with_dropout_uses_the_same_mask():
    # More in tests/python/test_autograd_modes.py (gradgradcheck of every op).
    x = rand(4, 6, requires_grad=True)
    A, B, W = rand(2, 6, requires_grad=True), rand(5, 2, requires_grad=True), rand(5, 6)
    e = x.new_empty(0)

    def penalty(f):
        (gx,) = torch.autograd.grad(f(x).square().sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), (A, B))

    got = penalty(lambda x: torch.ops.factorch.lora_linear(
        x, A, B, W, e, e, e, e, seed_tensor(5), 0, 1.0, 0.3)[0])
    keep = keep_mask(5, x.shape, 0.3)
    want = penalty(lambda x: x @ W.t() + ((x * keep / 0.7) @ A.t()) @ B.t())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_forward_mode_ad_gives_the_tangent():
    import torch.autograd.forward_ad as fwAD

    x, A, B, W = rand(4, 6), rand(2, 6), rand(5, 2), rand(5, 6)
    tx = rand(4, 6)
    with fwAD.dual_level():
        y = lora_linear(fwAD.make_dual(x, tx), A, B, 1.0, weight=W)
        torch.testing.assert_close(fwAD.unpack_dual(y).tangent, tx @ (W + B @ A).t())
    tA = rand(2, 6)
    _, t = torch.func.jvp(lambda a: lora_linear(x, a, B, 1.0, weight=W), (A,), (tA,))
    torch.testing.assert_close(t, x @ (B @ tA).t())


# --------------------------------------------------------------------------
# Bad inputs: an exception naming the argument, never a crash.
# --------------------------------------------------------------------------
def _ok(dtype=torch.float32):
    return dict(x=rand(4, 6, dtype=dtype), A=rand(3, 6, dtype=dtype), B=rand(5, 3, dtype=dtype),
                W=rand(5, 6, dtype=dtype))


def test_wrapper_rejects_bad_bases_and_options():
    a = _ok()
    x, A, B, W = a["x"], a["A"], a["B"], a["W"]
    with pytest.raises(ValueError, match=r"exactly one base.*got none"):
        lora_linear(x, A, B, 1.0)
    with pytest.raises(ValueError, match=r"exactly one base.*got weight, base_out"):
        lora_linear(x, A, B, 1.0, weight=W, base_out=rand(4, 5, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"V: a low-rank base needs both"):
        lora_linear(x, A, B, 1.0, U=rand(5, 2, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"bias: expected None with base_out"):
        lora_linear(x, A, B, 1.0, base_out=rand(4, 5, dtype=torch.float32),
                    bias=rand(5, dtype=torch.float32))
    for p in (1.0, -0.1, float("nan"), 1.5, "0.1", True):
        with pytest.raises(ValueError, match=r"dropout: expected a float p in \[0, 1\)"):
            lora_linear(x, A, B, 1.0, weight=W, dropout=p)
    for s in (float("inf"), float("nan"), None):
        with pytest.raises(ValueError, match=r"scale: expected a finite float"):
            lora_linear(x, A, B, s, weight=W)


def test_op_rejects_bad_dropout_and_kind():
    a = _ok()
    e = a["x"].new_empty(0)
    seed = torch.tensor([1])
    for p in (1.0, -0.5):
        with pytest.raises(RuntimeError, match=r"dropout: expected p in \[0, 1\)"):
            op(a["x"], a["A"], a["B"], a["W"], e, e, e, e, seed, 0, 1.0, p)
    with pytest.raises(RuntimeError, match=r"base_kind: expected 0 \(dense\), 1 \(low-rank\) or 2"):
        op(a["x"], a["A"], a["B"], a["W"], e, e, e, e, seed, 5, 1.0, 0.0)
    with pytest.raises(RuntimeError, match=r"seed: expected a one-element int64 cpu tensor"):
        op(a["x"], a["A"], a["B"], a["W"], e, e, e, e, e, 0, 1.0, 0.5)


def test_shape_mismatches_raise_naming_the_argument():
    a = _ok()
    x, A, B, W = a["x"], a["A"], a["B"], a["W"]
    f32 = dict(dtype=torch.float32)
    cases = [
        (dict(A=rand(3, 7, **f32)), r"A: expected \[r, in\] with in = 6"),
        (dict(B=rand(5, 2, **f32)), r"B: expected \[out, r\] with r = 3"),
        (dict(weight=rand(4, 6, **f32)), r"W: expected \[out, in\] = \[5, 6\]"),
        (dict(bias=rand(4, **f32)), r"bias: expected shape \[5\]"),
        (dict(A=A[None]), r"A: expected 2 dims"),
        (dict(weight=None, U=rand(5, 2, **f32), V=rand(2, 7, **f32)), r"V: expected \[rb, in\]"),
        (dict(weight=None, U=rand(4, 2, **f32), V=rand(2, 6, **f32)), r"U: expected \[out, rb\]"),
        (dict(weight=None, base_out=rand(4, 6, **f32)), r"base_out: expected"),
    ]
    for over, msg in cases:
        kw = {"weight": W, **{k: v for k, v in over.items() if k not in ("x", "A", "B")}}
        kw = {k: v for k, v in kw.items() if v is not None}
        args = (over.get("x", x), over.get("A", A), over.get("B", B))
        with pytest.raises(RuntimeError, match=msg):
            lora_linear(*args, 1.0, **kw)
    # More than 8 dims: the op refuses them, the functional wrapper merges the leading dims.
    x10, none = x.reshape(1, 1, 1, 1, 1, 1, 1, 1, 4, 6), x.new_empty(0)
    with pytest.raises(RuntimeError, match=r"x: expected 1 to 8 dims"):
        torch.ops.factorch.lora_linear(x10, A, B, W, none, none, none, none, none,
                                       _ops.LORA_DENSE, 1.0, 0.0)
    torch.testing.assert_close(lora_linear(x10, A, B, 1.0, weight=W),
                               lora_linear(x, A, B, 1.0, weight=W).reshape(*x10.shape[:-1], -1))


def test_dtype_mix_and_unsupported_dtypes_raise():
    a = _ok()
    with pytest.raises(RuntimeError, match=r"A: expected dtype float32 \(the dtype of x\), got float64"):
        lora_linear(a["x"], a["A"].double(), a["B"], 1.0, weight=a["W"])
    with pytest.raises(RuntimeError, match=r"W: expected dtype float32 \(the dtype of x\)"):
        lora_linear(a["x"], a["A"], a["B"], 1.0, weight=a["W"].double())
    b = _ok(torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"x: bfloat16 is supported on cuda only"):
        lora_linear(b["x"], b["A"], b["B"], 1.0, weight=b["W"])
    with pytest.raises(RuntimeError, match=r"x: expected dtype float32, float64.*got int64"):
        lora_linear(a["x"].long(), a["A"].long(), a["B"].long(), 1.0, weight=a["W"].long())


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU")
def test_device_mix_raises():
    a = _ok()
    with pytest.raises(RuntimeError, match=r"expected device cuda:0 \(the device of x\)|device"):
        lora_linear(a["x"].cuda(), a["A"].cuda(), a["B"], 1.0, weight=a["W"].cuda())


def test_meta_tensors_infer_shapes_and_check_them():
    a = {k: v.to("meta") for k, v in _ok().items()}
    e = a["x"].new_empty(0)
    seed = torch.tensor([1])
    y, t = op(a["x"], a["A"], a["B"], a["W"], e, e, e, e, seed, 0, 1.0, 0.2)
    assert y.shape == (4, 5) and t.shape == (4, 3) and y.device.type == "meta"
    with pytest.raises(RuntimeError, match=r"A: expected \[r, in\] with in = 6"):
        op(a["x"], a["A"][:, :5], a["B"], a["W"], e, e, e, e, seed, 0, 1.0, 0.0)
    with pytest.raises(RuntimeError, match=r"dropout: expected p in \[0, 1\)"):
        op(a["x"], a["A"], a["B"], a["W"], e, e, e, e, seed, 0, 1.0, 1.0)


def test_nan_in_x_raises_naming_it():
    a = _ok()
    a["x"][1, 2] = float("nan")
    with pytest.raises(RuntimeError, match=r"y: .*NaN/Inf.*the inputs x hold NaN or Inf"):
        lora_linear(a["x"], a["A"], a["B"], 1.0, weight=a["W"])
