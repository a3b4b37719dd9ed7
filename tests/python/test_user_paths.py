"""Paths users expect to work: torch.jit.trace and torch.fx of every layer,
inputs of any rank, the numpy / JAX entry points on empty, read-only and
big-endian arrays, bounded work from harmless-looking arguments, warnings
for ranks past break-even, and torch.autocast on the CPU."""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from factorch import lora
from factorch.nn import FactorizedConv1d, FactorizedConv2d, FactorizedEmbedding, FactorizedLinear

from helpers import rand


def _layers():
    """(name, layer, input): every layer type and factorization, float64,
    random factors."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    out = []
    for fact, rank in (("lowrank", 4), ("cp", 3), ("tucker", 2), ("tt", 2)):
        out.append((f"linear-{fact}", FactorizedLinear(16, 12, fact, rank=rank,
                                                       dtype=torch.float64),
                    rand(3, 2, 16, gen=g)))
    for fact in ("lowrank", "cp", "tucker", "tt"):
        out.append((f"conv2d-{fact}",
                    FactorizedConv2d(4, 6, 3, fact, rank=2, padding=1, stride=(1, 2),
                                     dtype=torch.float64),
                    rand(2, 4, 6, 7, gen=g)))
    out.append(("conv2d-reflect", FactorizedConv2d(4, 6, 3, "tucker", rank=2, padding=1,
                                                   padding_mode="reflect", dtype=torch.float64),
                rand(2, 4, 5, 5, gen=g)))
    out.append(("conv1d-cp", FactorizedConv1d(4, 6, 3, "cp", rank=2, dtype=torch.float64),
                rand(2, 4, 9, gen=g)))
    out.append(("embedding-lowrank", FactorizedEmbedding(20, 8, rank=3, dtype=torch.float64),
                torch.randint(0, 20, (2, 5), generator=g)))
    out.append(("embedding-tt", FactorizedEmbedding(27, 8, "tt", rank=2, dtype=torch.float64),
                torch.randint(0, 27, (2, 5), generator=g)))
    bases = {"lora-dense": (nn.Linear(16, 12, dtype=torch.float64), rand(3, 16, gen=g)),
             "lora-lowrank": (FactorizedLinear(16, 12, rank=4, dtype=torch.float64),
                              rand(3, 16, gen=g)),
             "lora-tt": (FactorizedLinear(16, 12, "tt", rank=2, dtype=torch.float64),
                         rand(3, 16, gen=g)),
             "lora-embedding": (nn.Embedding(10, 8, dtype=torch.float64),
                                torch.randint(0, 10, (2, 5), generator=g)),
             "lora-conv2d": (nn.Conv2d(3, 4, 3, dtype=torch.float64), rand(2, 3, 6, 6, gen=g))}
    for name, (base, x) in bases.items():
        holder = nn.Sequential(base)
        lora.add_lora(holder, r=2, targets=["0"])
        m = holder[0]
        with torch.no_grad():  # a non-zero adapter, so it shows in the output
            for p in m.adapter_parameters():
                p.copy_(rand(*p.shape, dtype=p.dtype, gen=g))
        out.append((name, m, x))
    return out


LAYERS = _layers()
IDS = [n for n, _, _ in LAYERS]


# --------------------------------------------------------------------------
# 1. torch.jit.trace and torch.fx.symbolic_trace
# --------------------------------------------------------------------------
@pytest.mark.parametrize("fact,others", [("lowrank", ["core", "cores", "in_factors"]),
                                         ("cp", ["U", "V", "core", "cores"]),
                                         ("tucker", ["U", "V", "cores"]),
                                         ("tt", ["U", "V", "core", "in_factors", "out_factors"])])
def test_views_of_other_factorizations_are_absent_attributes(fact, others):
    m = FactorizedLinear(16, 12, fact, rank=2)
    for name in others:
        assert not hasattr(m, name)
        with pytest.raises(AttributeError, match=f"{name}: a '{fact}' layer has none"):
            getattr(m, name)
    names = dict(inspect.getmembers(m))
    assert "factors" in names and not set(others) & set(names)
    conv = FactorizedConv2d(4, 4, 3, "cp", rank=2)
    assert not hasattr(conv, "U") and not hasattr(conv, "V")
    emb = FactorizedEmbedding(10, 4, "tt", rank=2)
    assert not hasattr(emb, "U") and hasattr(emb, "cores")
    with pytest.raises(AttributeError, match="U: a 'tt' table has none"):
        emb.U
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        m.nonexistent


@pytest.mark.parametrize("name,layer,x", LAYERS, ids=IDS)
def test_jit_trace_matches_eager(name, layer, x):
    layer.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace is deprecated
        traced = torch.jit.trace(layer, x)
    y = layer(x)
    assert y.abs().sum() > 0
    torch.testing.assert_close(traced(x), y, rtol=1e-12, atol=1e-12)
    if x.is_floating_point():  # the traced module trains: same gradients
        xe = x.clone().requires_grad_()
        xt = x.clone().requires_grad_()
        w = rand(*y.shape, gen=torch.Generator().manual_seed(5))
        (layer(xe) * w).sum().backward()
        (traced(xt) * w).sum().backward()
        torch.testing.assert_close(xt.grad, xe.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,layer,x", LAYERS, ids=IDS)
def test_fx_symbolic_trace_matches_eager(name, layer, x):
    layer.eval()
    gm = torch.fx.symbolic_trace(layer)
    torch.testing.assert_close(gm(x), layer(x), rtol=1e-12, atol=1e-12)
    model = nn.Sequential(nn.Identity(), layer)  # the layer inside a traced model
    torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), layer(x), rtol=1e-12,
                               atol=1e-12)


def test_fx_graph_keeps_the_input_checks():
    gm = torch.fx.symbolic_trace(FactorizedLinear(16, 12, "tt", rank=2))
    with pytest.raises(ValueError, match="x: expected a last dim of in_features = 16"):
        gm(torch.randn(3, 15))
    gm = torch.fx.symbolic_trace(FactorizedConv2d(4, 6, 3, "cp", rank=2))
    with pytest.raises(ValueError, match="x: expected 4 channels"):
        gm(torch.randn(2, 3, 5, 5))


def test_jit_traced_conv_refuses_another_input_size():
    conv = FactorizedConv2d(4, 6, 3, "cp", rank=2, padding=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace is deprecated
        traced = torch.jit.trace(conv, torch.randn(2, 4, 5, 5))
    x = torch.randn(3, 4, 5, 5)  # another batch size is fine
    torch.testing.assert_close(traced(x), conv(x))
    with pytest.raises(RuntimeError, match="x: expected"):
        traced(torch.randn(2, 4, 7, 7))


# --------------------------------------------------------------------------
# 2. Shapes: 0-d inputs, more than 8 dims
# --------------------------------------------------------------------------
LINEAR_LIKE = [c for c in LAYERS if c[0].startswith(("linear", "lora-dense", "lora-lowrank",
                                                     "lora-tt"))]


@pytest.mark.parametrize("name,layer,x", LINEAR_LIKE, ids=[c[0] for c in LINEAR_LIKE])
def test_0d_input_names_x(name, layer, x):
    with pytest.raises(ValueError, match="x: expected at least 1 dim"):
        layer(torch.tensor(1.0, dtype=torch.float64))


def test_0d_input_to_a_conv_names_x():
    with pytest.raises(ValueError, match="x: expected 4 dims"):
        FactorizedConv2d(4, 6, 3, "cp", rank=2)(torch.tensor(1.0))


@pytest.mark.parametrize("mode,size,ok", [("reflect", 2, False), ("reflect", 3, True),
                                          ("circular", 1, False), ("circular", 2, True)])
def test_padding_mode_larger_than_the_input_names_x(mode, size, ok):
    conv = FactorizedConv2d(2, 3, 3, "cp", rank=2, padding=2, padding_mode=mode)
    x = torch.randn(1, 2, size, 6)
    if ok:  # what nn.Conv2d accepts
        ref = nn.Conv2d(2, 3, 3, padding=2, padding_mode=mode)
        with torch.no_grad():
            ref.weight.copy_(conv.weight)
            ref.bias.copy_(conv.bias)
        torch.testing.assert_close(conv(x), ref(x), rtol=1e-5, atol=1e-5)
    else:
        with pytest.raises(ValueError, match=f"x: padding_mode='{mode}' with padding 2 needs"):
            conv(x)


@pytest.mark.parametrize("lead", [(1, 2, 1, 2, 1, 1, 2, 1), (2, 1, 3, 1, 1, 2, 1, 1, 1, 2),
                                  (1, 2, 1, 0, 1, 1, 2, 1)])
@pytest.mark.parametrize("name,layer,x", LINEAR_LIKE, ids=[c[0] for c in LINEAR_LIKE])
def test_more_than_8_dims_as_nn_linear(name, layer, x, lead):
    ref = nn.Linear(16, 12, dtype=torch.float64)
    with torch.no_grad():  # the dense layer computing the same function
        W = layer.weight if not isinstance(layer, lora.LoraLayer) else (
            layer.base_layer.weight + layer.delta_weight())
        ref.weight.copy_(W)
        ref.bias.copy_(layer.bias)
    g = torch.Generator().manual_seed(3)
    xs = {"contiguous": rand(*lead, 16, gen=g),
          "permuted": rand(*reversed(lead), 16, gen=g).permute(*range(len(lead) - 1, -1, -1),
                                                               len(lead)),
          "sliced": rand(*lead, 32, gen=g)[..., ::2]}
    for what, xi in xs.items():
        xi = xi.clone().requires_grad_()
        xr = xi.detach().clone().requires_grad_()
        y = layer(xi)
        yr = ref(xr)
        assert y.shape == yr.shape, what
        torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-10, msg=what)
        w = rand(*y.shape, gen=g)
        (y * w).sum().backward()
        (yr * w).sum().backward()
        torch.testing.assert_close(xi.grad, xr.grad, rtol=1e-10, atol=1e-10, msg=what)


def test_merged_leading_dims_are_a_view_where_the_strides_allow():
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Spy(TorchDispatchMode):  # the x each factorch op receives
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "factorch":
                seen.append((args[0].data_ptr(), tuple(args[0].shape)))
            return func(*args, **(kwargs or {}))

    layer = FactorizedLinear(16, 12, "tt", rank=2)
    lead = (1, 2, 1, 2, 1, 1, 2, 1)
    for x in (torch.randn(*lead, 16), torch.randn(*lead, 32)[..., ::2]):
        seen.clear()
        with Spy():
            y = layer(x)
        assert seen == [(x.data_ptr(), (8, 16))]  # one op, on a view of x's memory
        assert y.shape == (*lead, 12)


@pytest.mark.parametrize("fact", ["lowrank", "tt"])
def test_more_than_7_index_dims_as_nn_embedding(fact):
    emb = FactorizedEmbedding(27, 8, fact, rank=2, dtype=torch.float64)
    ref = emb.to_embedding()
    g = torch.Generator().manual_seed(4)
    idx = torch.randint(0, 27, (2, 1, 2, 1, 1, 2, 1, 3, 2), generator=g)
    y = emb(idx)
    torch.testing.assert_close(y, ref(idx), rtol=1e-12, atol=1e-12)
    w = rand(*y.shape, gen=g)
    (g_op,) = torch.autograd.grad((y * w).sum(), emb.factors)
    (g_ref,) = torch.autograd.grad((emb.table()[idx] * w).sum(), emb.factors)
    torch.testing.assert_close(g_op, g_ref, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------
# 3. The numpy / JAX path (factorch.dlpack)
# --------------------------------------------------------------------------
def _np_forward_cases():
    """(name, call(x, out=None), x, y_shape_per_row): every forward op of
    factorch.dlpack on float64 numpy arrays; x has a leading batch dim."""
    import factorch.dlpack as fd

    torch.manual_seed(0)
    g = np.random.default_rng(0)
    U, V, b = g.standard_normal((6, 3)), g.standard_normal((3, 8)), g.standard_normal(6)
    A, B, W = g.standard_normal((2, 8)), g.standard_normal((6, 2)), g.standard_normal((6, 8))
    cases = [("lowrank_linear", lambda x, out=None: fd.lowrank_linear(x, U, V, b, out=out),
              (8,), (6,)),
             ("lowrank_linear_flat", lambda x, out=None: fd.lowrank_linear_flat(
                 x, np.concatenate([V.ravel(), U.ravel()]), b, 6, 3, out=out), (8,), (6,)),
             ("lora_linear", lambda x, out=None: fd.lora_linear(x, A, B, 0.5, W=W, bias=b,
                                                                out=out), (8,), (6,))]
    for fact in ("cp", "tucker", "tt"):
        m = FactorizedLinear(16, 12, fact, rank=2, dtype=torch.float64)
        flat, bias, args = m.factors.detach().numpy(), m.bias.detach().numpy(), m.layout.op_args()
        fn = getattr(fd, f"{fact}_linear")
        cases.append((f"{fact}_linear", lambda x, out=None, fn=fn, flat=flat, bias=bias,
                      args=args: fn(x, flat, bias, *args, out=out), (16,), (12,)))
    conv = FactorizedConv2d(4, 6, 3, "cp", rank=2, dtype=torch.float64)
    st, osh = conv._layout.stages(5, 5)
    cases.append(("conv_chain", lambda x, out=None: fd.conv_chain(
        x, conv.factors.detach().numpy(), conv.bias.detach().numpy(), st, osh, out=out),
        (4, 5, 5), tuple(osh)))
    return cases


NP_CASES = _np_forward_cases()


@pytest.mark.parametrize("name,call,row,yrow", NP_CASES, ids=[c[0] for c in NP_CASES])
def test_numpy_empty_batch_gives_empty_output(name, call, row, yrow):
    x = np.empty((0, *row))
    assert x.strides == (0,) * x.ndim  # what numpy gives empty arrays
    y = call(x)
    assert y.shape == (0, *yrow)
    out = np.empty((0, *yrow))
    assert call(x, out=out) is out
    x1 = np.random.default_rng(1).standard_normal((2, *row))  # the same call, non-empty
    y1 = call(x1)
    assert y1.shape == (2, *yrow) and np.abs(y1).sum() > 0


@pytest.mark.parametrize("arg", ["x", "U", "V", "bias"])
def test_numpy_big_endian_names_the_argument(arg):
    import factorch.dlpack as fd

    g = np.random.default_rng(2)
    a = {"x": g.standard_normal((4, 8)), "U": g.standard_normal((6, 3)),
         "V": g.standard_normal((3, 8)), "bias": g.standard_normal(6)}
    a[arg] = a[arg].astype(">f8")
    with pytest.raises(ValueError, match=rf"{arg}: expected an array in the machine's byte "
                                         r"order, got dtype '>f8'"):
        fd.lowrank_linear(a["x"], a["U"], a["V"], a["bias"])
    a[arg] = a[arg].astype(a[arg].dtype.newbyteorder("="))  # what the message says to do
    ref = a["x"] @ a["V"].T @ a["U"].T + a["bias"]
    np.testing.assert_allclose(fd.lowrank_linear(a["x"], a["U"], a["V"], a["bias"]), ref,
                               rtol=1e-12)


def test_numpy_read_only_inputs_are_accepted():
    import factorch.dlpack as fd

    g = np.random.default_rng(3)
    x, U, V = g.standard_normal((4, 8)), g.standard_normal((6, 3)), g.standard_normal((3, 8))
    for a in (x, U, V):
        a.flags.writeable = False
    np.testing.assert_allclose(fd.lowrank_linear(x, U, V), x @ V.T @ U.T, rtol=1e-12)


class _Refusing:
    """A DLPack producer that refuses every export (as numpy does a
    read-only array without DLPack 1.0)."""

    def __dlpack__(self, **kw):
        raise BufferError("cannot export")

    def __dlpack_device__(self):
        return (1, 0)


def test_an_array_its_producer_refuses_names_the_argument():
    import factorch.dlpack as fd

    g = np.random.default_rng(4)
    with pytest.raises(ValueError, match="V: expected an array its producer can export through "
                                         r"DLPack, got one it refused \(cannot export\)"):
        fd.lowrank_linear(g.standard_normal((4, 8)), g.standard_normal((6, 3)), _Refusing())


@pytest.fixture(scope="module")
def jnp():
    jax = pytest.importorskip("jax", reason="jax[cpu] is not installed")
    try:
        jax.devices("cpu")
    except RuntimeError as e:  # pragma: no cover
        pytest.skip(f"jax has no CPU backend: {e}")
    return pytest.importorskip("jax.numpy")


@pytest.mark.parametrize("name,call,row,yrow", NP_CASES, ids=[c[0] for c in NP_CASES])
def test_jax_out_is_refused_and_left_alone(jnp, name, call, row, yrow):
    x = np.random.default_rng(5).standard_normal((3, *row))
    out = jnp.zeros((3, *yrow), dtype=jnp.float32)
    with pytest.raises(ValueError, match="out: JAX arrays are immutable"):
        call(x.astype(np.float32), out=out)
    assert float(jnp.abs(out).sum()) == 0.0


def test_jax_empty_batch(jnp):
    import factorch.dlpack as fd

    g = np.random.default_rng(6)
    U, V = jnp.asarray(g.standard_normal((6, 3)), dtype=jnp.float32), jnp.asarray(
        g.standard_normal((3, 8)), dtype=jnp.float32)
    y = fd.lowrank_linear(jnp.zeros((0, 8), dtype=jnp.float32), U, V)
    assert y.shape == (0, 6) and type(y).__module__.startswith("jax")


# --------------------------------------------------------------------------
# 4. Bounded work from harmless-looking arguments
# --------------------------------------------------------------------------
@pytest.fixture
def memory_cap():
    """Sets factorch.limits' cap for a test; the default again after it."""
    from factorch import limits

    yield limits.set_memory_limit
    limits.set_memory_limit(None)


def test_decompositions_refuse_work_beyond_the_memory(memory_cap):
    import factorch.decompose as D

    x = np.random.default_rng(7).standard_normal((10, 12, 14))
    # The C workspace of CP-ALS grows as rank²: rank 10**6 would take 64 TB.
    with pytest.raises(ValueError, match=r"rank: CP-ALS of rank 1000000 .* needs 64\.0 TB "
                                         r"\(\d+ bytes\), more than the memory available"):
        D.cp(x, rank=10**6)
    memory_cap(100_000)  # a cap of its own: small calls still run, large ones are refused
    assert D.cp(x, rank=2, n_iter_max=5).rank == 2
    with pytest.raises(ValueError, match=r"rank: CP-ALS of rank 200 .* more than the cap of "
                                         r"factorch.limits.set_memory_limit \(100\.0 kB\)"):
        D.cp(x, rank=200)
    with pytest.raises(ValueError, match="rank: Tucker-HOOI"):
        D.tucker(torch.randn(40, 40, 40, dtype=torch.float64), rank=[40, 40, 40])
    with pytest.raises(ValueError, match="matrix: the SVD of a 120x140 matrix"):
        D.svd(torch.randn(120, 140, dtype=torch.float64))
    with pytest.raises(ValueError, match="n_oversamples: a randomized SVD of rank 3"):
        D.randomized_svd(torch.randn(300, 300, dtype=torch.float64), 3, n_oversamples=200)
    with pytest.raises(ValueError, match="rank: TT-SVD"):
        D.tensor_train(torch.randn(8, 8, 8, 8, 8, dtype=torch.float64), rank=64)


def test_iteration_counts_are_capped():
    import factorch.decompose as D
    from factorch import limits

    x = np.random.default_rng(8).standard_normal((6, 7, 8))
    for call, name, cap in ((lambda n: D.cp(x, 2, n_iter_max=n), "n_iter_max", limits.MAX_SWEEPS),
                            (lambda n: D.tucker(x, 2, n_iter_max=n), "n_iter_max",
                             limits.MAX_SWEEPS),
                            (lambda n: D.randomized_svd(x[0], 2, n_iter=n), "n_iter",
                             limits.MAX_POWER_ITERATIONS)):
        with pytest.raises(ValueError, match=rf"{name}: expected 0 <= {name} <= {cap} "
                                             r"\(factorch.limits.MAX_"):
            call(2**31 - 1)
        call(3)  # ordinary counts run


@pytest.mark.parametrize("make", [
    lambda: FactorizedLinear(4096, 4096, "tt", rank=10**6),
    lambda: FactorizedLinear(65536, 65536, "cp", rank=10**9),
    lambda: FactorizedConv2d(64, 64, 3, "tt", rank=10**6),
    lambda: FactorizedEmbedding(10**6, 64, "tt", rank=10**5),
], ids=["linear-tt", "linear-cp", "conv-tt", "embedding-tt"])
def test_layers_refuse_absurd_ranks(make):
    with pytest.raises(ValueError, match=r"rank: a '(tt|cp)' .* \(\d+ parameters of "
                                         r"float32\) needs [\d.]+ [TG]B"):
        make()


def test_layer_memory_cap_and_meta_device(memory_cap):
    memory_cap(64 * 64 * 4)  # room for a dense 64x64 float32 weight
    FactorizedLinear(64, 64, "lowrank", rank=8)  # 8·128 parameters: fits
    with pytest.raises(ValueError, match=r"rank: a 'lowrank' layer 64 -> 64 of rank 64 "
                                         r"\(8192 parameters of float64\)"):
        FactorizedLinear(64, 64, "lowrank", rank=64, dtype=torch.float64)
    # The meta device allocates nothing: never refused.
    FactorizedLinear(64, 64, "tt", rank=10**6, device="meta")


# --------------------------------------------------------------------------
# 5. energy= past break-even warns
# --------------------------------------------------------------------------
def _full_rank_weight(*shape):
    """A random weight with a flat spectrum: energy 0.999 keeps nearly every
    singular value."""
    return rand(*shape, gen=torch.Generator().manual_seed(9))


@pytest.mark.parametrize("fact", ["lowrank", "tt"])
def test_from_linear_energy_past_break_even_warns(fact):
    dense = nn.Linear(48, 40, dtype=torch.float64)
    with torch.no_grad():
        dense.weight.copy_(_full_rank_weight(40, 48))
    with pytest.warns(UserWarning, match=r"energy=0.999: the rank it picks, .* gives this "
                                         rf"'{fact}' layer \d+ parameters, more than the 1920 "
                                         r"of the dense weight .* keep the layer dense") as rec:
        layer = FactorizedLinear.from_linear(dense, fact, energy=0.999)
    assert rec[0].filename == __file__  # the caller's line
    assert layer.factors.numel() > 48 * 40
    with warnings.catch_warnings():  # below break-even: no warning
        warnings.simplefilter("error")
        small = FactorizedLinear.from_linear(dense, fact, energy=0.3)
        FactorizedLinear.from_linear(dense, fact, rank=2)
    assert small.factors.numel() < 48 * 40


@pytest.mark.parametrize("fact", ["lowrank", "tucker", "tt"])
def test_from_conv_energy_past_break_even_warns(fact):
    conv = nn.Conv2d(8, 8, 3, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(_full_rank_weight(8, 8, 3, 3))
    with pytest.warns(UserWarning, match=rf"gives this '{fact}' convolution \d+ parameters, "
                                         r"more than the 576 of the dense weight") as rec:
        FactorizedConv2d.from_conv(conv, fact, energy=0.9999)
    assert rec[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FactorizedConv2d.from_conv(conv, fact, rank=1)


@pytest.mark.parametrize("fact", ["lowrank", "tt"])
def test_from_embedding_energy_past_break_even_warns(fact):
    emb = nn.Embedding(27, 16, dtype=torch.float64)
    with torch.no_grad():
        emb.weight.copy_(_full_rank_weight(27, 16))
    with pytest.warns(UserWarning, match=rf"gives this '{fact}' table \d+ parameters, more "
                                         r"than the 432 of the dense weight") as rec:
        FactorizedEmbedding.from_embedding(emb, fact, energy=0.9999)
    assert rec[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FactorizedEmbedding.from_embedding(emb, fact, energy=0.2)


# --------------------------------------------------------------------------
# 6. torch.autocast on the CPU: a bfloat16 layer before every layer type
# --------------------------------------------------------------------------
def _autocast_models():
    """(name, model, x, the factorch / LoRA module): a dense torch layer
    (which autocast runs in bfloat16) before each layer type, float32."""
    torch.manual_seed(10)
    out = []
    for fact in ("lowrank", "cp", "tucker", "tt"):
        m = nn.Sequential(nn.Linear(16, 16), FactorizedLinear(16, 12, fact, rank=2))
        out.append((f"linear-{fact}", m, torch.randn(3, 16), m[1]))
        m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1),
                          FactorizedConv2d(4, 6, 3, fact, rank=2, padding=1))
        out.append((f"conv2d-{fact}", m, torch.randn(2, 3, 6, 6), m[1]))
    m = nn.Sequential(nn.Conv1d(3, 4, 3), FactorizedConv1d(4, 6, 3, "tucker", rank=2))
    out.append(("conv1d-tucker", m, torch.randn(2, 3, 9), m[1]))
    for fact in ("lowrank", "tt"):  # indices in; a dense layer after
        m = nn.Sequential(FactorizedEmbedding(20, 16, fact, rank=2), nn.Linear(16, 8))
        out.append((f"embedding-{fact}", m, torch.randint(0, 20, (2, 5)), m[0]))
    bases = {"dense": nn.Linear(16, 12), "lowrank": FactorizedLinear(16, 12, rank=3),
             "cp": FactorizedLinear(16, 12, "cp", rank=2),
             "tt": FactorizedLinear(16, 12, "tt", rank=2)}
    for name, base in bases.items():
        m = nn.Sequential(nn.Linear(16, 16), base)
        lora.add_lora(m, r=2, targets=["1"])
        out.append((f"lora-{name}", m, torch.randn(3, 16), m[1]))
    m = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Conv2d(3, 4, 3))
    lora.add_lora(m, r=2, targets=["1"])
    out.append(("lora-conv2d", m, torch.randn(2, 3, 6, 6), m[1]))
    m = nn.Sequential(nn.Embedding(10, 16), nn.Linear(16, 8))
    lora.add_lora(m, r=2, targets=["0"])
    out.append(("lora-embedding", m, torch.randint(0, 10, (2, 5)), m[0]))
    for _, m, _, layer in out:
        if isinstance(layer, lora.LoraLayer):  # a non-zero adapter, so it shows
            with torch.no_grad():
                for p in layer.adapter_parameters():
                    p.normal_()
    return out


AUTOCAST = _autocast_models()


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("bf16_params", [False, True], ids=["float32-params", "bf16-params"])
@pytest.mark.parametrize("name,model,x,layer", AUTOCAST, ids=[c[0] for c in AUTOCAST])
def test_cpu_autocast_bfloat16_matches_float32(name, model, x, layer, bf16_params):
    import copy

    model = copy.deepcopy(model)
    layer = [m for m in model.modules() if type(m) is type(layer)][0]
    params = [p for p in layer.parameters() if p.requires_grad]
    w = torch.randn(*model(x).shape, generator=torch.Generator().manual_seed(11))
    ref = model(x)
    ref_grads = torch.autograd.grad((ref * w).sum(), params)
    if bf16_params:
        model = model.bfloat16()
        params = [p for p in layer.parameters() if p.requires_grad]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype in (torch.float32, torch.bfloat16)
    grads = torch.autograd.grad((y.float() * w).sum(), params)
    assert _rel(y, ref) < 3e-2, _rel(y, ref)  # bfloat16 keeps 8 bits of mantissa
    for g, gr in zip(grads, ref_grads):
        assert g.shape == gr.shape
        assert _rel(g, gr) < 6e-2, _rel(g, gr)


def test_decompositions_take_big_endian_and_read_only_numpy():
    import factorch.decompose as D

    x = np.random.default_rng(12).standard_normal((7, 5))
    ref = D.svd(x, rank=3)
    for a in (x.astype(">f8"), x.copy()):
        if a.dtype.isnative:
            a.flags.writeable = False
        res = D.svd(a, rank=3)
        np.testing.assert_allclose(res.S, ref.S, rtol=1e-12)
        np.testing.assert_allclose(res.to_tensor(), ref.to_tensor(), rtol=1e-10, atol=1e-12)
