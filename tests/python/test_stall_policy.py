"""The busy-machine policy of the CPU kernels (factorch.set_stall_policy).

Its mechanics (a late pool thread stops the pool for a hold, the hold ends,
stall_us=0 never stops it) are tested in C with stand-in pools
(tests/c/test_thread_pool.c); here: the Python surface, and that the kernels
give the same results whether the pool is used or resting.
"""

import pytest
import torch

import factorch
from factorch import _lib
from factorch.nn import FactorizedLinear


@pytest.fixture(autouse=True)
def default_policy():
    yield
    factorch.set_stall_policy()


@pytest.mark.parametrize("kwargs, name", [
    ({"stall_us": -1}, "stall_us"),
    ({"hold_min_ms": float("nan")}, "hold_min_ms"),
    ({"hold_max_ms": "1"}, "hold_max_ms"),
    ({"stall_us": True}, "stall_us"),
    ({"hold_min_ms": 5, "hold_max_ms": 1}, "hold_max_ms"),
])
def test_bad_policy_names_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        factorch.set_stall_policy(**kwargs)


def test_pool_stalls_reports_counts():
    s = factorch.pool_stalls()
    assert set(s) == {"stalls", "resting"}
    assert isinstance(s["stalls"], int) and s["stalls"] >= 0
    factorch.set_stall_policy()  # ends any hold
    assert factorch.pool_stalls()["resting"] is False


@pytest.mark.parametrize("factorization, rank, shape", [
    ("lowrank", 96, None),
    ("cp", 40, ((8, 8, 4), (8, 8, 4))),
    ("tucker", 3, ((8, 8, 4), (8, 8, 4))),
    ("tt", 6, ((8, 8, 4), (8, 8, 4))),
])
def test_same_results_with_the_pool_used_or_resting(factorization, rank, shape):
    """The pool in use (stall_us=0) and resting (a rest of 10 s, as after a
    stall): the same bits (a resting pool runs the same blocks serially), and
    the float64 layer's output and gradients."""
    torch.manual_seed(0)
    layer = FactorizedLinear(256, 256, factorization, rank=rank, tensorized_shape=shape)
    x = torch.randn(192, 256)
    g = torch.randn(192, 256)
    ref = FactorizedLinear(256, 256, factorization, rank=rank, tensorized_shape=shape).double()
    ref.load_state_dict(layer.state_dict())
    x64 = x.double().requires_grad_()
    ref(x64).backward(g.double())
    want_w = ref.factors.grad.float()
    got = {}
    for rest in (False, True):
        factorch.set_stall_policy(stall_us=0)
        if rest:
            _lib.core.fct_cpu_pool_rest(10 * 10**9)
        assert factorch.pool_stalls()["resting"] is rest
        for _ in range(3):
            xi = x.clone().requires_grad_()
            layer.zero_grad()
            y = layer(xi)
            y.backward(g)
            torch.testing.assert_close(y.double(), ref(x64).detach(), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(xi.grad, x64.grad.float(), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(layer.factors.grad, want_w, rtol=1e-3, atol=1e-3)
            now = (y.detach().clone(), xi.grad.clone(), layer.factors.grad.clone())
            for a, b in zip(got.setdefault(rest, now), now):
                assert torch.equal(a, b), "the same call gave other bits"
    for a, b in zip(got[False], got[True]):
        assert torch.equal(a, b), "the resting pool's results differ from the pool's"
