"""Large CPU workspaces come from a buffer the thread keeps between calls
(torch_glue/tensor_view.c): reused across calls of different sizes and ops
without changing results, grown when a call needs more, freed on request."""

import threading

import torch

import factorch
from factorch.nn import FactorizedLinear

SHAPE = ((8, 8, 8, 8), (8, 8, 8, 8))


def _grads(layer, x, g):
    x = x.clone().requires_grad_()
    layer.zero_grad()
    layer(x).backward(g)
    return x.grad.clone(), layer.factors.grad.clone()


def test_kept_buffer_is_reused_and_results_hold():
    torch.manual_seed(0)
    factorch.release_workspace()
    tucker = FactorizedLinear(4096, 4096, "tucker", rank=((6, 6, 6, 6), (6, 6, 6, 6)),
                              tensorized_shape=SHAPE)
    assert tucker.plan(2048)["backward_workspace"] >= 16 << 20
    x, g = torch.randn(2048, 4096), torch.randn(2048, 4096)
    want = _grads(tucker.double(), x.double(), g.double())
    tucker.float()
    first = _grads(tucker, x, g)
    kept = factorch.kept_workspace()
    assert kept >= tucker.plan(2048)["backward_workspace"]
    # Another op in between writes the same buffer with other values.
    cp = FactorizedLinear(4096, 4096, "cp", rank=64, tensorized_shape=SHAPE)
    if cp.plan(2048)["forward_workspace"] >= 16 << 20:
        with torch.no_grad():
            cp(torch.randn(2048, 4096))
    again = _grads(tucker, x, g)
    for a, b, w in zip(first, again, want):
        assert torch.equal(a, b)
        torch.testing.assert_close(a.double(), w, rtol=1e-3, atol=1e-3)
    assert factorch.kept_workspace() == kept
    assert factorch.release_workspace() == kept
    assert factorch.kept_workspace() == 0
    # Released: the next call allocates again and still computes the same.
    assert all(torch.equal(a, b) for a, b in zip(_grads(tucker, x, g), first))


def test_each_thread_keeps_its_own():
    factorch.release_workspace()
    layer = FactorizedLinear(4096, 4096, "tucker", rank=((6, 6, 6, 6), (6, 6, 6, 6)),
                             tensorized_shape=SHAPE)
    x, g = torch.randn(2048, 4096), torch.randn(2048, 4096)
    seen = {}

    def run():
        _grads(layer, x, g)
        seen["kept"] = factorch.kept_workspace()

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert seen["kept"] >= 16 << 20
    assert factorch.kept_workspace() == 0  # this thread ran nothing large
