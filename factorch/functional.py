"""Stateless factorized operations on torch tensors."""

from __future__ import annotations

import torch
from torch import Tensor

from ._ops import ops


def lowrank_linear(x: Tensor, U: Tensor, V: Tensor, bias: Tensor | None = None) -> Tensor:
    """``y = x @ V.T @ U.T + bias`` without forming ``U @ V``.

    Args:
        x: ``[..., in]``; any strides.
        U: ``[out, r]``.
        V: ``[r, in]``.
        bias: ``[out]`` or None.

    Returns:
        ``[..., out]``. Differentiable in every argument; one fused C op
        forward (``torch.ops.factorch.lowrank_linear``) and one backward.
        float32/float64 on CPU and CUDA, bfloat16/float16 on CUDA.
    """
    if bias is None:
        bias = x.new_empty(0)
    return ops.lowrank_linear(x, U, V, bias)[0]
