"""FactorizedLinear: a drop-in for nn.Linear whose weight is kept factorized."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import functional as F
from .._rank import check_rank, truncated_svd_factors

FACTORIZATIONS = ("lowrank",)


def _check_factorization(factorization: str) -> None:
    if factorization not in FACTORIZATIONS:
        raise ValueError(
            f"factorization: expected one of {list(FACTORIZATIONS)}, got {factorization!r}"
        )


def _check_features(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


class FactorizedLinear(nn.Module):
    """``y = x · Wᵀ + b`` with ``W`` stored factorized, never formed.

    ``factorization="lowrank"``: ``W ≈ U · V`` with ``U [out, r]`` and
    ``V [r, in]`` (truncated SVD). The forward and backward each run as one
    fused C op (``torch.ops.factorch.lowrank_linear`` and its backward).

    Args:
        in_features, out_features: as for ``nn.Linear``.
        factorization: ``"lowrank"``.
        rank: an int in ``[1, min(in, out)]``, or a float in ``(0, 1]``: the
            fraction of the dense weight's parameter count to keep.
        bias, device, dtype: as for ``nn.Linear``.

    Random initialisation gives the output the variance ``nn.Linear``'s
    default initialisation gives: ``Var(W_ij) = r·Var(U)·Var(V) = 1/(3·in)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        factorization: str = "lowrank",
        rank: int | float | None = None,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        _check_factorization(factorization)
        self.in_features = _check_features("in_features", in_features)
        self.out_features = _check_features("out_features", out_features)
        self.factorization = factorization
        self.rank = check_rank(rank, in_features, out_features)
        kw = {"device": device, "dtype": dtype}
        self.U = nn.Parameter(torch.empty(out_features, self.rank, **kw))
        self.V = nn.Parameter(torch.empty(self.rank, in_features, **kw))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **kw))
        else:
            self.register_parameter("bias", None)
        #: Relative Frobenius error of the factorization when built by
        #: ``from_linear``; None for a randomly initialised layer.
        self.reconstruction_error: float | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # V: variance 1/in keeps t = x·Vᵀ at the scale of x; U: variance
        # 1/(3r) then gives W = U·V nn.Linear's variance 1/(3·in).
        bound_v = math.sqrt(3.0 / self.in_features)
        bound_u = 1.0 / math.sqrt(self.rank)
        with torch.no_grad():
            self.V.uniform_(-bound_v, bound_v)
            self.U.uniform_(-bound_u, bound_u)
            if self.bias is not None:
                b = 1.0 / math.sqrt(self.in_features)
                self.bias.uniform_(-b, b)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"x: expected a last dim of in_features = {self.in_features}, "
                f"got shape {list(x.shape)}"
            )
        return F.lowrank_linear(x, self.U, self.V, self.bias)

    # ------------------------------------------------------------------
    # Conversion
    # ------------------------------------------------------------------
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        factorization: str = "lowrank",
        rank: int | None = None,
        ratio: float | None = None,
        energy: float | None = None,
    ) -> "FactorizedLinear":
        """Factorizes a trained ``nn.Linear`` by truncated SVD (in float64).

        Exactly one of ``rank`` (an int), ``ratio`` (fraction of the dense
        parameter count) or ``energy`` (fraction of the squared singular
        values kept) sets the rank. The relative Frobenius error of the
        weight is stored in ``reconstruction_error``.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        _check_factorization(factorization)
        W = linear.weight
        U, V, err = truncated_svd_factors(W, rank=rank, ratio=ratio, energy=energy)
        layer = cls(
            linear.in_features,
            linear.out_features,
            factorization=factorization,
            rank=U.shape[1],
            bias=linear.bias is not None,
            device=W.device,
            dtype=W.dtype,
        )
        with torch.no_grad():
            layer.U.copy_(U)
            layer.V.copy_(V)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        layer.reconstruction_error = err
        return layer

    def to_linear(self) -> nn.Linear:
        """The dense ``nn.Linear`` with weight ``U · V``."""
        dense = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.U.device,
            dtype=self.U.dtype,
        )
        with torch.no_grad():
            dense.weight.copy_(self.U @ self.V)
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    # ------------------------------------------------------------------
    # Size and cost
    # ------------------------------------------------------------------
    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def compression_ratio(self) -> float:
        """Dense weight parameters over factor parameters (biases excluded)."""
        return (self.in_features * self.out_features) / (self.U.numel() + self.V.numel())

    def flops(self, batch: int = 1) -> int:
        """Multiply-adds ×2 of one forward over ``batch`` rows."""
        return 2 * batch * self.rank * (self.in_features + self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"factorization={self.factorization!r}, rank={self.rank}, "
            f"bias={self.bias is not None}"
        )
