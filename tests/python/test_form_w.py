"""The two strategies of the Tucker and TT linear ops (CP has the chain
only): the contraction chain of x with the factors, and forming W (in row
blocks) from the factors followed by dense GEMMs. Each is forced in turn
(FCT_FLAG_FORCE_CONTRACT / FCT_FLAG_FORCE_FORM_W) and checked against a
float64 reference on random inputs: forward and backward, with and without
bias, odd shapes, M = 0, 1 and large, blocks of one row (FCT_FLAG_SMALL_CHUNKS),
gradcheck through the forced W path; and ``plan`` reports the choice."""

from __future__ import annotations

import pytest
import torch

import factorch
from factorch.factorizations import CP, TensorTrain, Tucker

from helpers import FORCE_CONTRACT, FORCE_FORM_W, STRATEGIES, forced, rand
from tensorized_samples import OPS, samples

FACTS = ["tucker", "tt"]


def _first(y):
    return y[0] if isinstance(y, (tuple, list)) else y


def _op_args(layout):
    """The op's arguments after (x, weights, bias): Tucker's keep its states."""
    return (*layout.op_args(), True) if isinstance(layout, Tucker) else tuple(layout.op_args())


def _cases(fact):
    """The shared samples plus larger batches and odd mode sizes."""
    yield from samples(fact, "cpu", torch.float64, requires_grad=True)
    g = torch.Generator().manual_seed(1)
    extra = {
        "tucker": [Tucker((3, 5), (7, 2), ((2, 3), (3, 2))),
                   Tucker((5,), (3, 3, 2), ((4,), (2, 3, 2)))],
        "tt": [TensorTrain((3, 5), (7, 2), (1, 4, 1)),
               TensorTrain((3, 2, 5), (2, 3, 3), (1, 3, 5, 1))],
    }[fact]
    from tensorized_samples import Sample
    for layout in extra:
        for M, bias in ((1, True), (257, False), (300, True), (0, True)):
            x = rand(M, layout.in_features, dtype=torch.float64, gen=g).requires_grad_()
            w = rand(layout.num_parameters, dtype=torch.float64, gen=g).requires_grad_()
            b = rand(layout.out_features, dtype=torch.float64, gen=g).requires_grad_() \
                if bias else None
            yield Sample(f"{layout!r} M={M} bias={bias}", layout, x, w, b)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("fact", FACTS)
def test_forced_strategy_matches_float64_reference(fact, strategy):
    for s in _cases(fact):
        ins = [t for t in (s.x, s.weights, s.bias) if t is not None]
        with forced(STRATEGIES[strategy]):
            y = _first(OPS[fact](*s.args()))
            g = rand(*y.shape, dtype=torch.float64)
            got = torch.autograd.grad(y, ins, g, allow_unused=True)
        ref = s.reference()
        torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10, msg=s.name)
        want = torch.autograd.grad(ref, ins, g)
        for i, (a, w) in enumerate(zip(got, want)):
            torch.testing.assert_close(a, w, rtol=1e-9, atol=1e-9,
                                       msg=f"{s.name} {strategy} input {i}")


@pytest.mark.parametrize("strategy", ["form_w", "form_w_small"])
@pytest.mark.parametrize("fact", FACTS)
def test_gradcheck_through_forced_form_w(fact, strategy):
    op = OPS[fact]
    for s in list(_cases(fact)):
        if s.x.numel() == 0 or 0 in s.x.stride() or s.x.shape[0] > 8:
            continue
        extra = _op_args(s.layout)
        has_bias = s.bias is not None

        def f(x, w, *b):
            return _first(op(x, w, b[0] if b else x.new_empty(0), *extra))

        ins = (s.x, s.weights) + ((s.bias,) if has_bias else ())
        with forced(STRATEGIES[strategy]):
            assert torch.autograd.gradcheck(f, ins, atol=1e-8), s.name


@pytest.mark.parametrize("fact", FACTS)
def test_float32_forced_strategies_agree(fact):
    for s in list(_cases(fact)):
        x = s.x.detach().float()
        w = s.weights.detach().float()
        b = s.bias.detach().float() if s.bias is not None else x.new_empty(0)
        ys = []
        for flag in (FORCE_CONTRACT, FORCE_FORM_W):
            with forced(flag):
                ys.append(_first(OPS[fact](x, w, b, *_op_args(s.layout))))
        torch.testing.assert_close(ys[0], ys[1], rtol=1e-4, atol=1e-4, msg=s.name)


@pytest.mark.parametrize("layout", [
    Tucker((8, 8, 8), (8, 8, 8), ((8, 8, 8), (8, 8, 8))),
    TensorTrain((8, 8), (8, 8), (1, 64, 1)),
], ids=["tucker", "tt"])
def test_plan_reports_the_strategy(layout):
    """Full ranks: W costs no more than the factors, so forming it wins at a
    large batch and the chain at M = 1."""
    small, large = layout.plan(1), layout.plan(4096)
    assert small["forward_strategy"] == "contract" and small["backward_strategy"] == "contract"
    assert large["forward_strategy"] == "form_w" and large["backward_strategy"] == "form_w"


def test_layer_plan_reports_the_strategy():
    for fact in ("cp", "tucker", "tt"):
        layer = factorch.nn.FactorizedLinear(64, 64, fact, rank=0.5,
                                             tensorized_shape=((8, 8), (8, 8)))
        p = layer.plan(16)
        assert p["forward_strategy"] in ("contract", "form_w"), fact
        assert p["backward_strategy"] in ("contract", "form_w"), fact
    assert CP((8, 8), (8, 8), 20).plan(4096)["forward_strategy"] == "contract"


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("fact", FACTS)
def test_strided_x_and_grad_y_under_each_strategy(fact, strategy):
    """x and grad_y that BLAS cannot read in place are packed into the
    workspace whole, also when W is formed block by block."""
    g = torch.Generator().manual_seed(2)
    layout = {"tucker": Tucker((3, 5), (7, 2), ((2, 3), (3, 2))),
              "tt": TensorTrain((3, 2, 5), (2, 3, 3), (1, 3, 5, 1))}[fact]
    for M in (1, 37, 300):
        x = rand(M, 2 * layout.in_features, dtype=torch.float64, gen=g)[:, ::2].requires_grad_()
        w = rand(layout.num_parameters, dtype=torch.float64, gen=g).requires_grad_()
        b = rand(layout.out_features, dtype=torch.float64, gen=g).requires_grad_()
        gy = rand(layout.out_features, M, dtype=torch.float64, gen=g).T  # column-major
        with forced(STRATEGIES[strategy]):
            y = _first(OPS[fact](x, w, b, *_op_args(layout)))
            got = torch.autograd.grad(y, (x, w, b), gy)
        y_ref = x @ layout.to_dense(w).T + b  # W [out, in]
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        want = torch.autograd.grad(y_ref, (x, w, b), gy)
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9, msg=f"{fact} {strategy} M={M}")
