"""Choosing the rank of a low-rank factorization, and truncated SVD splits."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .decompose import svd


def lowrank_rank_for_ratio(in_features: int, out_features: int, ratio: float) -> int:
    """Largest rank whose factors U [out, r] and V [r, in] hold at most
    ``ratio`` times the parameters of the dense [out, in] weight (at least 1)."""
    if not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
        raise ValueError(f"ratio: expected a fraction in (0, 1], got {ratio!r}")
    r = math.floor(ratio * in_features * out_features / (in_features + out_features))
    return max(1, min(r, in_features, out_features))


def check_rank(rank, in_features: int, out_features: int) -> int:
    """Validates an explicit integer rank, or turns a float into a rank as a
    fraction of the dense parameter count."""
    if isinstance(rank, bool) or rank is None:
        raise ValueError(f"rank: expected a positive int or a fraction in (0, 1], got {rank!r}")
    if isinstance(rank, float):
        return lowrank_rank_for_ratio(in_features, out_features, rank)
    if not isinstance(rank, int):
        raise TypeError(f"rank: expected an int or a float, got {type(rank).__name__}")
    limit = min(in_features, out_features)
    if not 1 <= rank <= limit:
        raise ValueError(
            f"rank: expected 1 <= rank <= min(in_features, out_features) = {limit}, got {rank}"
        )
    return rank


def rank_for_energy(singular_values: Tensor, energy: float) -> int:
    """Smallest rank keeping at least ``energy`` of the squared singular values."""
    if not (isinstance(energy, (int, float)) and 0 < energy <= 1):
        raise ValueError(f"energy: expected a fraction in (0, 1], got {energy!r}")
    s2 = singular_values.double() ** 2
    total = s2.sum()
    if total == 0:
        return 1
    kept = torch.cumsum(s2, 0) / total
    # The tolerance keeps energy=1.0 from demanding ranks lost to rounding.
    r = int(torch.searchsorted(kept, torch.tensor(energy - 1e-12, dtype=kept.dtype)).item()) + 1
    return min(r, singular_values.numel())


def check_one_rank_rule(rank, ratio, energy) -> None:
    """Exactly one of rank / ratio / energy must be given (from_linear,
    from_conv, from_embedding)."""
    given = [n for n, v in (("rank", rank), ("ratio", ratio), ("energy", energy)) if v is not None]
    if len(given) != 1:
        raise ValueError(
            "expected exactly one of rank, ratio or energy, got "
            + (", ".join(given) if given else "none")
        )


def select_rank(
    weight: Tensor, rank=None, ratio=None, energy=None, singular_values: Tensor | None = None
) -> int:
    """Exactly one of rank / ratio / energy decides the rank of a [out, in]
    weight's factorization."""
    check_one_rank_rule(rank, ratio, energy)
    out_features, in_features = weight.shape
    if rank is not None:
        return check_rank(rank, in_features, out_features)
    if ratio is not None:
        return lowrank_rank_for_ratio(in_features, out_features, ratio)
    assert singular_values is not None
    return rank_for_energy(singular_values, energy)


def truncated_svd_factors(weight: Tensor, rank=None, ratio=None, energy=None):
    """W [out, in] ≈ U [out, r] · V [r, in] by truncated SVD in float64
    (factorch.decompose.svd, LAPACK in C), the singular values split evenly
    (U = P·√S, V = √S·Qᵀ) so that both factors have the same scale.

    Returns (U, V, relative Frobenius error of the truncation), U and V in
    the weight's dtype and device.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight: expected 2 dims [out, in], got {weight.dim()}")
    if not torch.isfinite(weight).all():
        raise ValueError("weight: expected finite values, found NaN or Inf")
    w = weight.detach().double()
    if energy is None:  # the rank is known: only its factors are written
        r = select_rank(weight, rank, ratio, energy)
        res = svd(w, r)
        P, S, Qh, err = res.U, res.S, res.Vh, res.rel_error
    else:  # all singular values first, to find the rank holding `energy`
        res = svd(w)
        r = select_rank(weight, rank, ratio, energy, singular_values=res.S)
        P, S, Qh = res.U[:, :r], res.S[:r], res.Vh[:r]
        total = torch.linalg.vector_norm(res.S)
        err = (torch.linalg.vector_norm(res.S[r:]) / total).item() if total > 0 else 0.0
    root = S.sqrt()
    U = P * root
    V = root[:, None] * Qh
    return U.to(weight.dtype), V.to(weight.dtype), err
