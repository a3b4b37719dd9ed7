"""The CPU finiteness check counts NaN/Inf exactly: the count a message gives
is the number of non-finite elements, for both dtypes, dense and strided
tensors, small ones (scanned serially) and large ones (scanned in blocks on
the thread pool), whatever the kind (NaN, +Inf, -Inf) and position."""

from __future__ import annotations

import re

import pytest
import torch

from factorch.functional import lowrank_linear


def _grad_count_message(g: torch.Tensor, dtype: torch.dtype) -> int:
    """The count in the backward's message for grad_y = g."""
    M, out = g.shape
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(M, 7, generator=gen, dtype=dtype)
    U = torch.randn(out, 3, generator=gen, dtype=dtype, requires_grad=True)
    V = torch.randn(3, 7, generator=gen, dtype=dtype)
    y = lowrank_linear(x, U, V)
    with pytest.raises(RuntimeError, match=r"grad_y: \d+ NaN/Inf values in the gradient") as e:
        y.backward(g)
    return int(re.search(r"grad_y: (\d+) NaN/Inf", str(e.value)).group(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("M,out", [(3, 5), (512, 1024)])  # 512·1024 = 2^19: the block scan
@pytest.mark.parametrize("strided", [False, True])
def test_the_count_of_non_finite_values_is_exact(dtype, M, out, strided):
    gen = torch.Generator().manual_seed(M + out + strided)
    base = torch.randn(M, 2 * out if strided else out, generator=gen, dtype=dtype)
    g = base[:, ::2] if strided else base
    n = g.numel()
    # Values next to the non-finite ones: the largest finite, the smallest
    # subnormal, and negative zero must not count.
    specials = [torch.finfo(dtype).max, -torch.finfo(dtype).max, torch.finfo(dtype).tiny / 4, -0.0]
    spots = torch.randperm(n, generator=gen)[: min(n, 40)]
    flat = g.reshape(-1) if not strided else None
    bad = 0
    for i, k in enumerate(spots.tolist()):
        r, c = divmod(k, g.shape[1])
        kind = i % 5
        if kind < 3:
            g[r, c] = (float("nan"), float("inf"), float("-inf"))[kind]
            bad += 1
        else:
            g[r, c] = specials[i % len(specials)]
    assert flat is None or flat.data_ptr() == g.data_ptr()
    assert int((~torch.isfinite(g)).sum()) == bad
    assert _grad_count_message(g, dtype) == bad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_non_finite_value_at_the_very_end_of_a_large_tensor_counts(dtype):
    g = torch.randn(512, 1024, dtype=dtype)
    g[-1, -1] = float("-inf")
    assert _grad_count_message(g, dtype) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_finite_large_gradient_passes(dtype):
    x = torch.randn(512, 7, dtype=dtype)
    U = torch.randn(1024, 3, dtype=dtype, requires_grad=True)
    V = torch.randn(3, 7, dtype=dtype)
    g = torch.randn(512, 1024, dtype=dtype)
    g[0, 0] = 1e30  # large, finite: no overflow downstream
    lowrank_linear(x, U, V).backward(g)
    ref = (g.double().T @ (x.double() @ V.double().T)).to(dtype)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(U.grad, ref, rtol=tol, atol=tol * ref.abs().max().item())
