"""Helpers the Python tests share: the devices to test on, their dtypes,
random inputs that are never zero, and the sample inputs of the low-rank
linear op that drive its value, gradient and opcheck tests."""

from __future__ import annotations

import contextlib
import threading

import torch

import factorch
from factorch import _lib

# The C ops' FCT_FLAG_* bits the tests force (ops/include/factorch.h).
SMALL_CHUNKS = 2  # FCT_FLAG_SMALL_CHUNKS
FORCE_CONTRACT = 4  # FCT_FLAG_FORCE_CONTRACT
FORCE_FORM_W = 8  # FCT_FLAG_FORCE_FORM_W
STRATEGIES = {"contract": FORCE_CONTRACT, "form_w": FORCE_FORM_W,
              "form_w_small": FORCE_FORM_W | SMALL_CHUNKS}


@contextlib.contextmanager
def forced(flag):
    """The CPU ops run with `flag` set beside the finiteness check's bit."""
    base = _lib.FLAG_CHECK_FINITE if factorch.get_check_finite()["cpu"] else 0
    _lib.glue.fct_torch_set_flags(0, base | flag)
    try:
        yield
    finally:
        _lib.glue.fct_torch_set_flags(0, base)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and factorch.cuda_available() else [])


def dtypes_for(device):
    return [torch.float32, torch.float64] + (
        [torch.bfloat16, torch.float16] if device == "cuda" else []
    )


def rand(*shape, device="cpu", dtype=torch.float64, requires_grad=False, gen=None):
    """Uniform in ±[0.1, 1]: random, never zero."""
    mag = torch.rand(*shape, generator=gen, dtype=torch.float64) * 0.9 + 0.1
    sign = torch.randint(0, 2, shape, generator=gen).double() * 2 - 1
    t = (mag * sign).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


def lowrank_samples(device, dtype, requires_grad=False):
    """(name, x, U, V, bias) covering batch dims, M = 1, empty batches, rank 1,
    full rank, non-contiguous and broadcast inputs, with and without bias."""
    g = torch.Generator().manual_seed(0)
    kw = dict(device=device, dtype=dtype, gen=g)

    def make(name, xshape, out, r, bias=True, x_fn=None):
        x = rand(*xshape, **kw)
        if x_fn is not None:
            x = x_fn(x)
        inn = x.shape[-1]
        U, V = rand(out, r, **kw), rand(r, inn, **kw)
        b = rand(out, **kw) if bias else None
        ts = [x, U, V] + ([b] if b is not None else [])
        for t in ts:
            t.requires_grad_(requires_grad)
        return name, x, U, V, b

    yield make("2d", (7, 12), 9, 4)
    yield make("no bias", (7, 12), 9, 4, bias=False)
    yield make("rank 1", (5, 12), 9, 1)
    yield make("full rank", (5, 12), 9, 9)
    yield make("M=1", (1, 16), 11, 5)
    yield make("1-d x", (16,), 11, 5)
    yield make("3-d batch", (2, 3, 10), 6, 3)
    yield make("empty batch", (0, 10), 6, 3)
    yield make("transposed x", (12, 7), 9, 4, x_fn=lambda x: x.t())
    yield make("sliced x", (6, 24), 9, 4, x_fn=lambda x: x[:, ::2])
    yield make("permuted 3-d", (3, 2, 10), 6, 3, x_fn=lambda x: x.transpose(0, 1))
    yield make("broadcast x", (1, 10), 6, 3, x_fn=lambda x: x.expand(4, 10))


def fit(model, x, y, steps=150, lr=1e-2):
    """The MSE losses of `steps` Adam steps of model(x) towards y."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def in_threads(work, n=4):
    """Runs work() on n threads at once and waits for them all."""
    threads = [threading.Thread(target=work) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
