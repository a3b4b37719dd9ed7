"""The two strategies of the factorized convolutions (ops/conv_chain.c): the
chain of stages, and forming the dense kernel W from the factors followed by
one dense convolution. Each is forced in turn (FCT_FLAG_FORCE_CONTRACT /
FCT_FLAG_FORCE_FORM_W, with FCT_FLAG_SMALL_CHUNKS for basis chunks of 3
images) and checked against a float64 reference, torch's conv2d with the
dense kernel formed in float64 from the factors in Python, on random inputs:
CP, Tucker-2 and low-rank, stride 1 and 2, padding, dilation, groups, odd
sizes, batch 0/1/several, with and without bias, forward and every gradient;
gradcheck through the forced W path; TT (whose chain does not compose into
one convolution) falls back to the chain under FORCE_FORM_W; and ``plan``
reports the choice, which the cost model makes from the batch size."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import factorch
from factorch.nn import FactorizedConv1d, FactorizedConv2d

from helpers import FORCE_CONTRACT, FORCE_FORM_W, STRATEGIES, forced, rand

FACTS = ["cp", "tucker", "lowrank"]

# (in, out, kernel, stride, padding, dilation, groups, bias, N, H, W)
CASES = [
    (5, 7, 3, 1, 1, 1, 1, True, 3, 9, 8),
    (6, 4, (3, 2), 2, 0, 1, 1, False, 2, 11, 7),
    (8, 6, 3, 2, (1, 2), 1, 2, True, 3, 10, 9),
    (4, 6, (1, 3), 1, (0, 1), (1, 2), 2, False, 1, 5, 9),
    (3, 5, 5, (2, 1), 2, 1, 1, True, 1, 7, 6),
    (6, 9, 3, 1, 0, 2, 3, True, 4, 8, 8),
    (5, 7, 3, 1, 1, 1, 1, True, 0, 6, 6),
    (4, 4, 1, 2, 0, 1, 1, True, 2, 7, 7),
]


def _layer(fact, case, dtype=torch.float64, cls=FactorizedConv2d, seed=0):
    ci, co, k, s, p, d, g, bias, *_ = case
    torch.manual_seed(seed)
    m = cls(ci, co, k, factorization=fact, rank=0.6, stride=s, padding=p, dilation=d, groups=g,
            bias=bias, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # never zero, not the init's scale only
        m.factors.copy_(rand(m.factors.numel(), dtype=dtype, gen=gen))
        if m.bias is not None:
            m.bias.copy_(rand(co, dtype=dtype, gen=gen))
    return m


def _reference(m, x, factors, bias):
    """torch's conv with the dense kernel formed in float64 from the factors
    (Python's reconstruction, differentiable in the factors)."""
    w = m._layout.reconstruct(factors).reshape(m.out_channels, m.in_channels // m.groups,
                                               *m._layout.geom.kernel)
    pads = m._layout.geom.pads
    xp = F.pad(x, (pads[1][0], pads[1][1], pads[0][0], pads[0][1]))
    if x.dim() == 3:
        xp = xp.unsqueeze(2)
    y = F.conv2d(xp, w, bias, m._layout.geom.stride, 0, m._layout.geom.dilation, m.groups)
    return y.squeeze(2) if x.dim() == 3 else y


def _check(m, x, flag, rtol=1e-10, atol=1e-10):
    ins = [x, m.factors] + ([m.bias] if m.bias is not None else [])
    with forced(flag):
        y = m(x)
        g = rand(*y.shape, dtype=y.dtype, gen=torch.Generator().manual_seed(5))
        got = torch.autograd.grad(y, ins, g)
    ref = _reference(m, x, m.factors, m.bias)
    torch.testing.assert_close(y, ref, rtol=rtol, atol=atol)
    want = torch.autograd.grad(ref, ins, g)
    for i, (a, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, w, rtol=rtol * 10, atol=atol * 10, msg=f"input {i}")


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("fact", FACTS)
def test_forced_strategy_matches_float64_reference(fact, strategy):
    for case in CASES:
        m = _layer(fact, case)
        n, h, w = case[8:]
        x = rand(n, case[0], h, w, gen=torch.Generator().manual_seed(1)).requires_grad_()
        _check(m, x, STRATEGIES[strategy])
        if n:
            p = m._plan((h, w), n, STRATEGIES[strategy])
            want = "contract" if strategy == "contract" else "form_w"
            assert p["forward_strategy"] == want and p["backward_strategy"] == want, (case, p)


@pytest.mark.parametrize("strategy", ["form_w", "form_w_small"])
@pytest.mark.parametrize("fact", FACTS)
def test_conv1d_and_padding_modes_under_form_w(fact, strategy):
    m = FactorizedConv1d(6, 5, 3, factorization=fact, rank=0.6, stride=2, padding=2,
                         dtype=torch.float64)
    x = rand(3, 6, 11, gen=torch.Generator().manual_seed(2)).requires_grad_()
    _check(m, x, STRATEGIES[strategy])
    m = FactorizedConv2d(5, 6, 3, factorization=fact, rank=0.6, padding=1,
                         padding_mode="reflect", dtype=torch.float64)
    x = rand(2, 5, 7, 6, gen=torch.Generator().manual_seed(3)).requires_grad_()
    with forced(STRATEGIES[strategy]):
        y = m(x)
    torch.testing.assert_close(y, m.to_conv()(x), rtol=1e-10, atol=1e-10)


def test_strided_input_and_grad_y_under_form_w():
    m = _layer("tucker", CASES[0])
    x = rand(3, 9, 8, 5, gen=torch.Generator().manual_seed(4)).permute(0, 3, 1, 2)
    x.requires_grad_()
    assert not x.is_contiguous()
    with forced(FORCE_FORM_W):
        y = m(x)
        g = rand(*y.shape[::-1], gen=torch.Generator().manual_seed(6)).permute(3, 2, 1, 0)
        got = torch.autograd.grad(y, [x, m.factors, m.bias], g)
    ref = _reference(m, x, m.factors, m.bias)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    for a, w in zip(got, torch.autograd.grad(ref, [x, m.factors, m.bias], g)):
        torch.testing.assert_close(a, w, rtol=1e-9, atol=1e-9)


def test_only_some_gradients_under_form_w():
    """grad_x alone (frozen factors) and the factors' alone."""
    m = _layer("cp", CASES[2])
    x = rand(3, 8, 10, 9, gen=torch.Generator().manual_seed(7)).requires_grad_()
    ref = _reference(m, x, m.factors, m.bias)
    g = rand(*ref.shape, gen=torch.Generator().manual_seed(8))
    for ins in ([x], [m.factors], [m.bias, m.factors]):
        with forced(FORCE_FORM_W):
            got = torch.autograd.grad(m(x), ins, g)
        for a, w in zip(got, torch.autograd.grad(ref, ins, g, retain_graph=True)):
            torch.testing.assert_close(a, w, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("strategy", ["form_w", "form_w_small"])
@pytest.mark.parametrize("fact", FACTS)
def test_gradcheck_through_forced_form_w(fact, strategy):
    small = [(3, 4, (3, 2), 2, 1, 1, 1, True), (4, 4, 3, 1, (1, 0), 1, 2, False)]
    for case in small:
        m = _layer(fact, case)
        x = rand(2, case[0], 5, 4, gen=torch.Generator().manual_seed(9)).requires_grad_()
        ins = (x, m.factors) + ((m.bias,) if m.bias is not None else ())
        layout, pads, nd = m._layout, m._pads, m._nd

        def f(x, w, *b):
            from factorch.nn.conv import _conv_forward
            return _conv_forward(x, w, b[0] if b else None, layout, nd, pads, "zeros")

        with forced(STRATEGIES[strategy]):
            assert torch.autograd.gradcheck(f, ins, atol=1e-8), (fact, case)


@pytest.mark.parametrize("fact", FACTS)
def test_float32_forced_strategies_agree(fact):
    for case in CASES[:4]:
        m = _layer(fact, case, dtype=torch.float32)
        n, h, w = case[8:]
        x = rand(n, case[0], h, w, dtype=torch.float32, gen=torch.Generator().manual_seed(10))
        ys = []
        for flag in (FORCE_CONTRACT, FORCE_FORM_W):
            with forced(flag):
                ys.append(m(x))
        torch.testing.assert_close(ys[0], ys[1], rtol=1e-4, atol=1e-4)


def test_chain_that_does_not_compose_falls_back_under_form_w():
    """TT's chain (the spatial core on every input channel: batch > 1) runs
    the chain also when FORM_W is forced; two spatial stages on one axis
    (a chain built by hand) as well."""
    m = FactorizedConv2d(8, 6, 3, factorization="tt", tensorized_shape=((2, 4), (3, 2)),
                         rank=(2, 3), padding=1, dtype=torch.float64)
    x = rand(3, 8, 7, 6, gen=torch.Generator().manual_seed(11)).requires_grad_()
    assert m._plan((7, 6), 3, FORCE_FORM_W)["forward_strategy"] == "contract"
    assert "does not compose" in m._plan((7, 6), 3, FORCE_FORM_W)["plan"]
    _check(m, x, FORCE_FORM_W)

    # Two 3x3 stages, padded: composing them would be wrong at the borders.
    from factorch._conv_layout import _stage
    ops = torch.ops.factorch
    st = _stage(1, 3, 6, 6, 4, (3, 3), pads=((1, 1), (1, 1))) + \
        _stage(1, 4, 6, 6, 2, (3, 3), pads=((1, 1), (1, 1)))
    w1, w2 = rand(4, 3, 3, 3), rand(2, 4, 3, 3)
    xx = rand(2, 3, 6, 6)
    with forced(FORCE_FORM_W):
        y, _ = ops.conv_chain(xx, torch.cat([w1.flatten(), w2.flatten()]), xx.new_empty(0), st,
                              [2, 6, 6], False)
    ref = F.conv2d(F.conv2d(xx, w1, padding=1), w2, padding=1)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)


def test_plan_picks_by_batch_size():
    """Full Tucker ranks: the chain costs more FLOPs than the dense kernel,
    so forming W wins for a large batch; for one small image forming W
    (2304-row basis) costs more than the chain."""
    m = FactorizedConv2d(64, 64, 3, factorization="tucker", rank=(64, 64), padding=1)
    small, large = m.plan((4, 4), 1), m.plan((32, 32), 16)
    assert small["forward_strategy"] == "contract", small
    assert small["backward_strategy"] == "contract", small
    assert large["forward_strategy"] == "form_w", large
    assert large["backward_strategy"] == "form_w", large
    # Compressed 8x at a large batch: the chain's FLOPs are the smaller.
    c = FactorizedConv2d(256, 256, 3, factorization="tucker", rank=1 / 8, padding=1)
    assert c.plan((56, 56), 16)["forward_strategy"] == "contract"
    tt = FactorizedConv2d(16, 16, 3, factorization="tt", rank=4, padding=1)
    assert tt.plan((32, 32), 64)["forward_strategy"] == "contract"
    with pytest.raises(ValueError, match="batch"):
        m.plan((4, 4), -1)


def test_training_forward_follows_the_backward_choice():
    """A training step under the automatic choice, where forming W wins,
    matches the reference (the forward does not save the chain's
    activations, the backward does not read them)."""
    m = FactorizedConv2d(64, 64, 3, factorization="tucker", rank=(64, 64), padding=1,
                         dtype=torch.float64)
    p = m.plan((32, 32), 16)
    assert p["backward_strategy"] == "form_w"
    x = rand(16, 64, 32, 32, gen=torch.Generator().manual_seed(12)).requires_grad_()
    _check(m, x, 0, rtol=1e-9, atol=1e-9)
