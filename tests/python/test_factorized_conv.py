"""factorch.nn.FactorizedConv1d / FactorizedConv2d (CP, Tucker-2, low-rank, TT)
and the op under them, torch.ops.factorch.conv_chain: outputs and gradients
against F.conv on the reconstructed kernel (float64) over a grid of every
nn.Conv option, gradcheck, opcheck, torch.compile, export, initialisation,
sizes, training, and bad arguments."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import factorch
from factorch.nn import FactorizedConv1d, FactorizedConv2d

from helpers import DEVICES, rand

FACTS = ["cp", "tucker", "lowrank", "tt"]
ops = torch.ops.factorch

# (kwargs, input H x W): stride / padding per axis, "same", "valid",
# dilation, groups, bias, every padding_mode, kernels 1, 2, 3, (3, 1), (1, 3), 5.
OPTIONS = [
    (dict(kernel_size=3), (7, 8)),
    (dict(kernel_size=3, stride=2, padding=1), (9, 9)),
    (dict(kernel_size=(3, 2), stride=(1, 2), padding=(2, 0), dilation=(1, 2)), (6, 9)),
    (dict(kernel_size=3, padding="same", dilation=2, bias=False), (8, 7)),
    (dict(kernel_size=2, padding="same"), (5, 6)),
    (dict(kernel_size=3, padding="valid", stride=3), (10, 11)),
    (dict(kernel_size=3, groups=2, padding=1), (6, 6)),
    (dict(kernel_size=(1, 3), padding=(0, 1)), (4, 7)),
    (dict(kernel_size=(3, 1), stride=(2, 1)), (7, 3)),
    (dict(kernel_size=1), (5, 5)),
    (dict(kernel_size=5, padding=2, stride=2), (5, 4)),
    (dict(kernel_size=3, padding=1, padding_mode="reflect"), (6, 7)),
    (dict(kernel_size=3, padding=(1, 2), padding_mode="replicate"), (5, 5)),
    (dict(kernel_size=3, padding=1, padding_mode="circular", stride=2), (6, 6)),
]


def _layer(fact, cls=FactorizedConv2d, cin=8, cout=12, rank=None, dtype=torch.float64, **kw):
    if fact == "tt" and kw.get("groups", 1) != 1:
        return None
    if rank is None:
        g = kw.get("groups", 1)
        rank = {"cp": 5, "tucker": (min(3, cin // g), min(4, cout // g)), "lowrank": min(4, cout // g),
                "tt": 3}[fact]
    return cls(cin, cout, factorization=fact, rank=rank, dtype=dtype, **kw)


@pytest.mark.parametrize("fact", FACTS)
def test_forward_and_gradients_equal_the_dense_conv(fact):
    torch.manual_seed(0)
    for kw, (h, w) in OPTIONS:
        layer = _layer(fact, **kw)
        if layer is None:
            continue
        dense = layer.to_conv()
        x = rand(3, 8, h, w, requires_grad=True)
        y = layer(x)
        yd = dense(x)
        torch.testing.assert_close(y, yd, rtol=1e-10, atol=1e-10, msg=lambda m: f"{kw}: {m}")
        # Input and bias gradients against the dense conv; the factors' by gradcheck below.
        g = rand(*y.shape)
        gx, = torch.autograd.grad(y, x, g)
        gxd, = torch.autograd.grad(yd, x, g)
        torch.testing.assert_close(gx, gxd, rtol=1e-10, atol=1e-10, msg=lambda m: f"{kw}: {m}")
        if layer.bias is not None:
            gb, = torch.autograd.grad(layer(x), layer.bias, g)
            torch.testing.assert_close(gb, g.sum((0, 2, 3)))


@pytest.mark.parametrize("fact", FACTS)
def test_conv1d(fact):
    torch.manual_seed(1)
    for kw, length in ((dict(kernel_size=3), 9), (dict(kernel_size=4, stride=2, padding=2), 11),
                       (dict(kernel_size=3, padding="same", dilation=2), 8),
                       (dict(kernel_size=3, padding=1, padding_mode="circular"), 7)):
        layer = _layer(fact, FactorizedConv1d, **kw)
        dense = layer.to_conv()
        assert isinstance(dense, nn.Conv1d)
        x = rand(2, 8, length)
        torch.testing.assert_close(layer(x), dense(x), rtol=1e-10, atol=1e-10)
        # unbatched input, as nn.Conv1d takes it
        torch.testing.assert_close(layer(x[0]), dense(x[0]), rtol=1e-10, atol=1e-10)
    if fact == "cp":  # no height filter in 1-D
        assert len(layer.weights) == 3


@pytest.mark.parametrize("fact", FACTS)
def test_gradcheck(fact):
    torch.manual_seed(2)
    for kw, (h, w) in (OPTIONS[1], OPTIONS[2], OPTIONS[6]):
        layer = _layer(fact, cin=4, cout=6, **kw)
        if layer is None:
            continue
        x = rand(2, 4, h, w, requires_grad=True)
        stages, out_shape = layer._layout.stages(h, w)
        factors = layer.factors.detach().clone().requires_grad_()
        bias = (layer.bias.detach().clone() if layer.bias is not None
                else torch.empty(0, dtype=torch.float64)).requires_grad_(layer.bias is not None)

        def f(x, factors, bias):
            return ops.conv_chain(x, factors, bias, stages, out_shape, True)[0]

        inputs = (x, factors, bias) if layer.bias is not None else (x, factors)
        fn = f if layer.bias is not None else (lambda x, fa: f(x, fa, bias))
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


def _op_samples():
    torch.manual_seed(3)
    for fact, (kw, (h, w)) in itertools.product(FACTS, (OPTIONS[0], OPTIONS[2], OPTIONS[6])):
        layer = _layer(fact, cin=4, cout=6, **kw)
        if layer is None or kw.get("padding_mode", "zeros") != "zeros":
            continue
        stages, out_shape = layer._layout.stages(h, w)
        for dtype in (torch.float32, torch.float64):
            x = rand(2, 4, h, w, dtype=dtype, requires_grad=True)
            factors = layer.factors.detach().to(dtype).requires_grad_()
            bias = rand(6, dtype=dtype, requires_grad=True)
            yield fact, (x, factors, bias, stages, out_shape, True)


def test_opcheck():
    for fact, args in _op_samples():
        torch.library.opcheck(ops.conv_chain.default, args)
        x, factors, bias, stages, out_shape, keep = args
        y, saved = ops.conv_chain(*args)
        g = torch.randn_like(y)
        torch.library.opcheck(ops.conv_chain_backward.default,
                              (g, x.detach(), factors.detach(), saved.detach(), stages,
                               True, True, True))


def test_inference_keeps_nothing_and_matches_training_forward():
    torch.manual_seed(4)
    for fact in FACTS:
        layer = _layer(fact, dtype=torch.float32, kernel_size=3, padding=1)
        x = torch.randn(5, 8, 9, 9)
        stages, out_shape = layer._layout.stages(9, 9)
        y1, s1 = ops.conv_chain(x, layer.factors.detach(), layer.bias.detach(), stages,
                                out_shape, False)
        y2, s2 = ops.conv_chain(x, layer.factors.detach(), layer.bias.detach(), stages,
                                out_shape, True)
        assert s1.numel() == 0 and s2.numel() > 0
        torch.testing.assert_close(y1, y2, rtol=0, atol=0)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), y1)


def test_strided_and_channels_last_inputs():
    torch.manual_seed(5)
    layer = _layer("tucker", kernel_size=3, padding=1)
    x = rand(4, 8, 7, 7)
    ref = layer(x.contiguous())
    cl = x.to(memory_format=torch.channels_last)
    torch.testing.assert_close(layer(cl), ref, rtol=1e-12, atol=1e-12)
    big = rand(4, 16, 7, 14)
    view = big[:, ::2, :, ::2]
    torch.testing.assert_close(layer(view), layer(view.contiguous()), rtol=1e-12, atol=1e-12)
    xg = cl.clone().requires_grad_()
    (layer(xg) * 2).sum().backward()
    xc = x.clone().requires_grad_()
    (layer(xc) * 2).sum().backward()
    torch.testing.assert_close(xg.grad, xc.grad)


def test_empty_batch_gives_empty_output_and_zero_gradients():
    for fact in FACTS:
        layer = _layer(fact, kernel_size=3, padding=1)
        x = torch.empty(0, 8, 5, 5, dtype=torch.float64, requires_grad=True)
        y = layer(x)
        assert y.shape == (0, 12, 5, 5)
        y.sum().backward()
        assert torch.count_nonzero(layer.factors.grad) == 0
        assert torch.count_nonzero(layer.bias.grad) == 0


@pytest.mark.parametrize("fact", FACTS)
def test_compile_fullgraph_and_export(fact):
    torch.manual_seed(6)
    layer = _layer(fact, dtype=torch.float32, kernel_size=3, stride=2, padding=1)
    x = torch.randn(2, 8, 9, 9, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), layer(x))
    compiled(x).sum().backward()
    gx = x.grad.clone()
    x.grad = None
    layer(x).sum().backward()
    torch.testing.assert_close(gx, x.grad)
    ep = torch.export.export(layer, (torch.randn(2, 8, 9, 9),))
    xx = torch.randn(2, 8, 9, 9)
    torch.testing.assert_close(ep.module()(xx), layer(xx))


def test_export_and_compile_with_dynamic_sizes():
    """The stage list is SymInt[]: batch, height and width can stay symbolic."""
    torch.manual_seed(13)
    layer = _layer("tucker", dtype=torch.float32, kernel_size=3, stride=2, padding=1)
    dims = {0: torch.export.Dim("n", min=2, max=64), 2: torch.export.Dim("h", min=4, max=64),
            3: torch.export.Dim("w", min=4, max=64)}
    ep = torch.export.export(layer, (torch.randn(4, 8, 10, 10),), dynamic_shapes={"x": dims})
    for shape in ((3, 8, 13, 9), (5, 8, 6, 17)):
        xx = torch.randn(*shape)
        torch.testing.assert_close(ep.module()(xx), layer(xx))
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
    for shape in ((3, 8, 13, 9), (5, 8, 6, 17)):
        xx = torch.randn(*shape, requires_grad=True)
        torch.testing.assert_close(compiled(xx), layer(xx))
        compiled(xx).sum().backward()


@pytest.mark.parametrize("fact", FACTS)
def test_init_gives_the_dense_output_variance(fact):
    torch.manual_seed(7)
    cin, cout = 64, 64
    x = torch.randn(8, cin, 12, 12)
    ratios = []
    for seed in range(3):
        torch.manual_seed(seed)
        layer = FactorizedConv2d(cin, cout, 3, factorization=fact, rank=0.25, padding=1,
                                 bias=False)
        dense = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        with torch.no_grad():
            ratios.append(layer(x).var().item() / dense(x).var().item())
    assert 0.6 < sum(ratios) / len(ratios) < 1.6, ratios


def test_rank_forms_sizes_and_flops():
    cp = FactorizedConv2d(256, 256, 3, factorization="cp", rank=0.125)
    assert cp.factors.numel() <= 0.125 * 256 * 256 * 9
    assert cp.compression_ratio == pytest.approx((256 * 256 * 9 + 256) / cp.num_parameters)
    assert cp.rank == int(0.125 * 256 * 256 * 9 // (256 + 3 + 3 + 256))
    tk = FactorizedConv2d(64, 128, 3, factorization="tucker", rank=0.25)
    r1, r2 = tk.rank
    assert tk.factors.numel() <= 0.25 * 64 * 128 * 9 and abs(r2 / r1 - 2) < 0.2
    assert FactorizedConv2d(8, 12, 3, factorization="tucker", rank=3).rank == (3, 3)
    lr = FactorizedConv2d(8, 12, 3, factorization="lowrank", rank=0.5)
    assert lr.rank == int(0.5 * 12 * 8 * 9 // (8 * 9 + 12))
    tt = FactorizedConv2d(64, 64, 3, factorization="tt", rank=4)
    assert tt.tensorized_shape == ((8, 8), (8, 8)) and tt.rank == (4, 4)
    same = FactorizedConv2d(8, 12, 3, factorization="cp", rank="same")
    assert same.factors.numel() <= 8 * 12 * 9
    # FLOPs: the stages' multiply-adds; Tucker: 1x1, kxk, 1x1.
    r1, r2 = tk.rank
    # 1x1 at 10x10, then the 3x3 (no padding) and the last 1x1 at 8x8
    assert tk.flops((10, 10), batch=2) == 2 * 2 * (100 * 64 * r1 + 64 * (r1 * r2 * 9 + r2 * 128))
    assert FactorizedConv1d(8, 12, 3, factorization="lowrank", rank=2).flops(10) == \
        2 * 8 * (8 * 3 * 2 + 2 * 12)


def test_training_run_lowers_the_loss():
    torch.manual_seed(8)
    net = nn.Sequential(FactorizedConv2d(3, 16, 3, factorization="tucker", rank=(3, 8), padding=1),
                        nn.ReLU(), FactorizedConv2d(16, 16, 3, factorization="cp", rank=8,
                                                    stride=2, padding=1),
                        nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 2))
    x = torch.randn(64, 3, 8, 8)
    target = (x[:, 0].mean((1, 2)) > 0).long()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = F.cross_entropy(net(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(in_channels=6, out_channels=8, kernel_size=3, groups=4), r"groups: in_channels \(6\)"),
        (dict(in_channels=8, out_channels=8, kernel_size=0), r"kernel_size: expected a positive"),
        (dict(in_channels=8, out_channels=8, kernel_size=3, stride=0), r"stride: expected"),
        (dict(in_channels=8, out_channels=8, kernel_size=3, padding=-1), r"padding: expected"),
        (dict(in_channels=8, out_channels=8, kernel_size=3, padding="full"), r"padding: expected"),
        (dict(in_channels=8, out_channels=8, kernel_size=3, padding="same", stride=2),
         r"padding='same'"),
        (dict(in_channels=8, out_channels=8, kernel_size=3, padding_mode="mirror"),
         r"padding_mode: expected"),
        (dict(in_channels=8, out_channels=8, kernel_size=3, factorization="svd"),
         r"factorization: expected"),
        (dict(in_channels=8, out_channels=8, kernel_size=3, factorization="lowrank", rank=100),
         r"rank: expected 1 <= rank"),
        (dict(in_channels=8, out_channels=8, kernel_size=3, factorization="tucker", rank=(9, 2)),
         r"exceed the channels"),
        (dict(in_channels=8, out_channels=8, kernel_size=3, factorization="cp", rank=0),
         r"rank: expected a positive int"),
        (dict(in_channels=8, out_channels=8, kernel_size=3, factorization="cp", rank=1.5),
         r"rank: expected a fraction"),
        (dict(in_channels=8, out_channels=8, kernel_size=3, factorization="tt", groups=2),
         r"groups: factorization='tt'"),
        (dict(in_channels=8, out_channels=8, kernel_size=3, factorization="tt", rank=(2, 2, 2)),
         r"rank: expected an int or 2 ints"),
        (dict(in_channels=0, out_channels=8, kernel_size=3), r"in_channels: expected"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FactorizedConv2d(**kwargs)


def test_bad_inputs_raise_naming_the_argument():
    layer = FactorizedConv2d(8, 8, 3, factorization="cp", rank=4)
    with pytest.raises(ValueError, match=r"x: expected 8 channels"):
        layer(torch.randn(2, 7, 5, 5))
    with pytest.raises(ValueError, match=r"x: expected 4 dims"):
        layer(torch.randn(2, 8, 5, 5, 1))
    with pytest.raises(ValueError, match=r"smaller than the dilated kernel"):
        layer(torch.randn(2, 8, 2, 5))
    with pytest.raises(RuntimeError, match=r"weights: expected dtype float64 \(the dtype of x\)"):
        layer(torch.randn(2, 8, 5, 5, dtype=torch.float64))
    # The op itself: malformed stage lists and shapes raise, never crash.
    x, w, b = torch.randn(2, 8, 5, 5), layer.factors.detach(), layer.bias.detach()
    stages, out_shape = layer._layout.stages(5, 5)
    with pytest.raises(RuntimeError, match=r"stages: expected 16 ints per stage"):
        ops.conv_chain(x, w, b, stages[:-1], out_shape, False)
    bad = list(stages)
    bad[15] = 3  # groups not dividing the channels
    with pytest.raises(RuntimeError, match=r"stages\[0\]: groups \(3\) must"):
        ops.conv_chain(x, w, b, bad, out_shape, False)
    bad = list(stages)
    bad[1] = 9  # stage 0 reads more than x holds
    with pytest.raises(RuntimeError, match=r"weights: expected a contiguous 1-D|x: expected"):
        ops.conv_chain(x, w, b, bad, out_shape, False)
    bad = list(stages)
    bad[16 + 5] = 50  # a kernel larger than the padded input
    with pytest.raises(RuntimeError, match=r"larger than the padded input"):
        ops.conv_chain(x, w, b, bad, out_shape, False)
    with pytest.raises(RuntimeError, match=r"out_shape: expected .* multiplying to 72"):
        ops.conv_chain(x, w, b, stages, [8, 5, 4], False)
    with pytest.raises(RuntimeError, match=r"bias: expected"):
        ops.conv_chain(x, w, torch.randn(7), stages, out_shape, False)
    with pytest.raises(RuntimeError, match=r"weights: expected a contiguous 1-D tensor of"):
        ops.conv_chain(x, w[:-1], b, stages, out_shape, False)
    huge = list(stages)
    huge[2] = huge[3] = 2 ** 40
    with pytest.raises(RuntimeError, match=r"overflow|expected"):
        ops.conv_chain(x, w, b, huge, out_shape, False)
    y, saved = ops.conv_chain(x, w, b, stages, out_shape, True)
    with pytest.raises(RuntimeError, match=r"saved: expected a C-contiguous tensor"):
        ops.conv_chain_backward(y, x, w, saved[:-1], stages, True, True, True)


def test_nan_input_is_reported():
    layer = FactorizedConv2d(8, 8, 3, factorization="tucker", rank=4)
    x = torch.randn(2, 8, 5, 5)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(RuntimeError, match=r"NaN/Inf.*x"):
        layer(x)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU")
@pytest.mark.parametrize("fact", FACTS)
def test_cuda_matches_cpu(fact):
    device = "cuda"
    torch.manual_seed(9)
    for kw, (h, w) in OPTIONS[:8]:
        layer = _layer(fact, dtype=torch.float64, **kw)
        if layer is None:
            continue
        x = rand(3, 8, h, w, requires_grad=True)
        y = layer(x)
        g = rand(*y.shape)
        grads = torch.autograd.grad(y, [x, *layer.parameters()], g)
        lc = layer.to(device)
        xc = x.detach().to(device).requires_grad_()
        yc = lc(xc)
        gc = torch.autograd.grad(yc, [xc, *lc.parameters()], g.to(device))
        torch.testing.assert_close(yc.cpu(), y, rtol=1e-9, atol=1e-9)
        for a, b in zip(gc, grads):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-9)
        layer.to("cpu")


@pytest.mark.parametrize("fact", FACTS)
def test_from_conv_recovers_a_planted_factorized_kernel(fact):
    """A kernel that IS factorized at the rank asked for comes back exactly,
    with every option carried over."""
    torch.manual_seed(10)
    opts = dict(kernel_size=3, stride=2, padding=1, dilation=1,
                groups=1 if fact == "tt" else 2, bias=True)
    planted = _layer(fact, cin=8, cout=12, **opts)
    conv = planted.to_conv()
    layer = FactorizedConv2d.from_conv(conv, fact, rank=planted.rank)
    assert layer.stride == conv.stride and layer.groups == conv.groups
    assert layer.reconstruction_error < 1e-6, layer.reconstruction_error
    x = rand(2, 8, 9, 9)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fact", FACTS)
def test_from_conv_on_a_random_kernel_by_ratio_and_energy(fact):
    torch.manual_seed(11)
    conv = nn.Conv2d(16, 16, 3, padding=1, dtype=torch.float64)
    small = FactorizedConv2d.from_conv(conv, fact, ratio=0.3)
    assert small.factors.numel() <= 0.3 * conv.weight.numel()
    assert 0 < small.reconstruction_error < 1
    # The layer's error on outputs is bounded by the kernel's error.
    x = rand(2, 16, 6, 6)
    dense_w = small.dense_weight()
    err = (small(x) - F.conv2d(x, dense_w, conv.bias, padding=1)).abs().max()
    assert err < 1e-10
    if fact != "cp":
        full = FactorizedConv2d.from_conv(conv, fact, energy=1.0)
        assert full.reconstruction_error < 1e-8
    else:
        with pytest.raises(ValueError, match="energy: not defined"):
            FactorizedConv2d.from_conv(conv, fact, energy=0.9)
    with pytest.raises(ValueError, match="exactly one of rank, ratio or energy"):
        FactorizedConv2d.from_conv(conv, fact, rank=2, ratio=0.5)


def test_from_conv1d_and_bad_arguments():
    conv = nn.Conv1d(8, 12, 5, padding=2, dtype=torch.float64)
    for fact in FACTS:
        layer = FactorizedConv1d.from_conv(conv, fact, energy=1.0) if fact != "cp" else \
            FactorizedConv1d.from_conv(conv, fact, rank=30)
        x = rand(2, 8, 11)
        assert layer(x).shape == conv(x).shape
        if fact != "cp":
            torch.testing.assert_close(layer(x), conv(x), rtol=1e-8, atol=1e-8)
    with pytest.raises(TypeError, match="conv: expected an Conv1d"):
        FactorizedConv1d.from_conv(nn.Conv2d(8, 8, 3), "tucker", rank=2)
    bad = nn.Conv2d(4, 4, 3)
    with torch.no_grad():
        bad.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        FactorizedConv2d.from_conv(bad, "tucker", rank=2)


def test_large_im2col_falls_back_to_one_worker():
    """An im2col buffer of ~150 MB per image: one worker per thread would need
    that much per thread, so the op runs the images one after the other with
    the primitives split over the threads instead (ops/conv_chain.c,
    plan_layout). The result is the same."""
    torch.manual_seed(12)
    layer = FactorizedConv2d(64, 8, 3, factorization="lowrank", rank=4, padding=1)
    x = torch.randn(2, 64, 256, 256, requires_grad=True)
    y = layer(x)
    dense = layer.to_conv()
    torch.testing.assert_close(y, dense(x), rtol=1e-4, atol=1e-4)
    g = torch.randn_like(y)
    gx, = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(gx, torch.autograd.grad(dense(x), x, g)[0], rtol=1e-4, atol=1e-4)
