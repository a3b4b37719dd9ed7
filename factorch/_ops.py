"""Fake (meta) kernels and autograd for the ops registered from C.

The schemas and the CPU/CUDA kernels are registered by libfactorch_torch
(torch_glue/register.c); this module adds what torch.compile, torch.export and
training need, on the same names.
"""

from __future__ import annotations

import torch

from . import _lib  # noqa: F401  (registers the ops)

ops = torch.ops.factorch


# --------------------------------------------------------------------------
# lowrank_linear(x, U, V, bias) -> (y, t);  y = x·Vᵀ·Uᵀ + bias,  t = x·Vᵀ
# --------------------------------------------------------------------------
def _check_lowrank(x, U, V, bias):
    torch._check(x.dim() >= 1, lambda: f"x: expected at least 1 dim, got {x.dim()}")
    torch._check(U.dim() == 2, lambda: f"U: expected 2 dims [out, r], got {U.dim()}")
    torch._check(V.dim() == 2, lambda: f"V: expected 2 dims [r, in], got {V.dim()}")
    torch._check(
        V.shape[1] == x.shape[-1],
        lambda: f"V: expected [r, in] with in = {x.shape[-1]} (the last dim of x), "
        f"got {list(V.shape)}",
    )
    torch._check(
        U.shape[1] == V.shape[0],
        lambda: f"U: expected [out, r] with r = {V.shape[0]} (the first dim of V), "
        f"got {list(U.shape)}",
    )
    for name, t in (("U", U), ("V", V)):
        torch._check(
            t.dtype == x.dtype,
            lambda: f"{name}: expected dtype {x.dtype} (the dtype of x), got {t.dtype}",
        )
    if bias.numel() != 0:
        torch._check(
            bias.dim() == 1 and bias.shape[0] == U.shape[0],
            lambda: f"bias: expected shape [{U.shape[0]}], got {list(bias.shape)}",
        )


@torch.library.register_fake("factorch::lowrank_linear")
def _lowrank_linear_fake(x, U, V, bias):
    _check_lowrank(x, U, V, bias)
    lead = x.shape[:-1]
    return x.new_empty((*lead, U.shape[0])), x.new_empty((*lead, V.shape[0]))


@torch.library.register_fake("factorch::lowrank_linear_backward")
def _lowrank_linear_backward_fake(grad_y, x, U, V, t, need_x, need_U, need_V, need_bias):
    def out(need, shape):
        return x.new_empty(shape if need else (0,))

    return (
        out(need_x, x.shape),
        out(need_U, U.shape),
        out(need_V, V.shape),
        out(need_bias, (U.shape[0],)),
    )


def _lowrank_linear_setup(ctx, inputs, output):
    x, U, V, bias = inputs
    _, t = output
    ctx.save_for_backward(x, U, V, t)
    ctx.has_bias = bias.numel() != 0
    ctx.mark_non_differentiable(t)


def _lowrank_linear_backward(ctx, grad_y, _grad_t):
    x, U, V, t = ctx.saved_tensors
    nx, nU, nV, nb = ctx.needs_input_grad
    nb = nb and ctx.has_bias
    gx, gU, gV, gb = ops.lowrank_linear_backward(grad_y, x, U, V, t, nx, nU, nV, nb)
    return (gx if nx else None, gU if nU else None, gV if nV else None, gb if nb else None)


torch.library.register_autograd(
    "factorch::lowrank_linear", _lowrank_linear_backward, setup_context=_lowrank_linear_setup
)
