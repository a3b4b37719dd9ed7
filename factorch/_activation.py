"""Activation statistics of a model's layers, and the activation-aware
low-rank factorizations built on them (ASVD, SVD-LLM's whitening).

For a layer ``y = x · Wᵀ`` with calibration inputs ``X [N, in]``, the output
error of an approximation ``Ŵ`` is ``‖(W − Ŵ) Xᵀ‖_F``. With the second
moment ``C = XᵀX / N = L Lᵀ`` (Cholesky), ``‖(W − Ŵ) Xᵀ‖² = N ‖(W − Ŵ) L‖²``,
so the best rank-r ``Ŵ`` is the truncated SVD of ``A = W L`` mapped back,
``Ŵ = A_r L⁻¹`` (Eckart–Young on the whitened problem), and the squared
singular values of ``A`` beyond r are exactly the output error it leaves.
ASVD instead scales the input channels by ``s_j = mean|x_j|^α`` (``A = W S``,
``Ŵ = A_r S⁻¹``): cheaper statistics, no optimality.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import decompose as D


class InputStats:
    """Running statistics of the rows a layer reads: ``Σ xᵀx`` (float64,
    when ``second_moment``), ``Σ |x|`` per channel and the row count.

    Convolutions are seen through their patches (``F.unfold``): the rows are
    the ``C_in · kh · kw`` vectors the kernel is applied to."""

    def __init__(self, features: int, second_moment: bool, device, dtype=torch.float64):
        self.features = features
        self.rows = 0
        self.abs_sum = torch.zeros(features, dtype=torch.float64, device=device)
        self.xtx = (torch.zeros(features, features, dtype=dtype, device=device)
                    if second_moment else None)
        self._moment = None  # XᵀX / N, formed once after the last add

    def add(self, rows: Tensor) -> None:
        """rows: [n, features] in any float dtype."""
        r = rows.detach().to(torch.float64)
        self._moment = None
        self.rows += r.shape[0]
        self.abs_sum += r.abs().sum(0)
        if self.xtx is not None:
            self.xtx.addmm_(r.T, r)

    @property
    def nbytes(self) -> int:
        n = self.abs_sum.numel() * 8
        return n + (self.xtx.numel() * self.xtx.element_size() if self.xtx is not None else 0)

    def second_moment(self) -> Tensor:
        """``XᵀX / N`` [features, features] in float64 (formed once; layers
        sharing these statistics, and the report, read the same tensor)."""
        if self.xtx is None or self.rows == 0:
            raise RuntimeError("calibration: no second moment was collected for this layer "
                               "(it saw no calibration input)")
        if self._moment is None:
            self._moment = self.xtx.double() / self.rows
        return self._moment

    def mean_abs(self) -> Tensor:
        if self.rows == 0:
            raise RuntimeError("calibration: this layer saw no calibration input")
        return self.abs_sum / self.rows


def layer_rows(module: nn.Module, x: Tensor) -> Tensor:
    """The [n, features] rows that ``module``'s weight matrix multiplies:
    the last dim of a Linear's input, the unfolded patches of a convolution."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise ValueError(
                "calibration: activation statistics of a convolution need groups=1, "
                "padding_mode='zeros' and integer padding; use method='svd' for this layer"
            )
        if isinstance(module, nn.Conv1d):
            x = x.unsqueeze(-2)
            k, d, p, s = (1, *module.kernel_size), (1, *module.dilation), (0, *module.padding), (1, *module.stride)
        else:
            k, d, p, s = module.kernel_size, module.dilation, module.padding, module.stride
        if x.dim() == 3:
            x = x.unsqueeze(0)
        cols = torch.nn.functional.unfold(x, k, dilation=d, padding=p, stride=s)  # [n, C·k, L]
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    raise TypeError(f"calibration: no activation statistics for {type(module).__name__}")


def matrix_of(module: nn.Module) -> Tensor:
    """The weight as the [out, features] matrix the rows multiply (float64)."""
    W = module.weight.detach().double()
    return W.reshape(W.shape[0], -1)


@dataclass
class Whitening:
    """``A = W · T`` is what gets truncated; ``back(Qh)`` maps the right
    factor of A's SVD back to W's input space (``Qh · T⁻¹``). ``note`` says
    what was done to a covariance that was not positive definite."""

    T: Tensor | None  # None: the identity (plain SVD)
    inverse_right: object  # callable Qh -> Qh · T⁻¹
    note: str = ""


def cholesky_whitening(C: Tensor) -> Whitening:
    """``T = L`` with ``L Lᵀ = C`` (+ a ridge if C is not positive definite).

    A rank-deficient second moment (fewer rows than features, a dead input
    channel) is damped with ``λ = 10⁻⁸ · mean(diag C)``, ×100 until Cholesky
    succeeds (at most 10⁻² · mean diag); if even that fails (NaN, negative
    eigenvalues from a broken input), the symmetric eigendecomposition
    ``C = Q Λ Qᵀ`` with Λ clamped gives ``T = Q Λ^½``."""
    C = 0.5 * (C + C.T)
    scale = float(C.diagonal().mean()) if C.numel() else 0.0
    if not math.isfinite(scale):
        raise ValueError("calibration: the input second moment holds NaN or Inf")
    if scale <= 0.0:  # every input is zero: any output error is zero
        return Whitening(None, lambda Qh: Qh, "all calibration inputs were zero: plain SVD")
    eye = torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    lam = 0.0
    for k in range(5):
        L, info = torch.linalg.cholesky_ex(C + lam * eye)
        if int(info) == 0 and bool(torch.isfinite(L).all()):
            note = "" if lam == 0 else f"covariance not positive definite: ridge {lam:.1e}"
            return Whitening(L, lambda Qh, L=L: torch.linalg.solve_triangular(
                L, Qh, upper=False, left=False), note)
        lam = scale * 10.0 ** (-8 + 2 * k)
    evals, Q = torch.linalg.eigh(C)
    floor = 1e-8 * max(float(evals.max()), 1e-300)
    root = evals.clamp_min(floor).sqrt()
    return Whitening(Q * root, lambda Qh, Q=Q, root=root: (Qh / root) @ Q.T,
                     "covariance not positive definite: eigendecomposition, eigenvalues clamped")


def asvd_scaling(mean_abs: Tensor, alpha: float) -> Whitening:
    """``T = diag(mean|x_j|^α)``; channels that never fire get the smallest
    non-zero scale so that T stays invertible."""
    s = mean_abs.double().clamp_min(0) ** alpha
    pos = s[s > 0]
    if pos.numel() == 0:
        return Whitening(None, lambda Qh: Qh, "all calibration inputs were zero: plain SVD")
    note = "" if pos.numel() == s.numel() else f"{s.numel() - pos.numel()} dead input channels"
    s = s.clamp_min(float(pos.min()))
    return Whitening(torch.diag(s), lambda Qh, s=s: Qh / s, note)


@dataclass
class Spectrum:
    """The SVD of the matrix a method truncates, kept until the rank is known."""

    P: Tensor  # [out, k]
    S: Tensor  # [k]
    Qh: Tensor  # [k, features]
    whitening: Whitening

    def tail(self) -> Tensor:
        """tail[r] = Σ_{i >= r} S_i² (the truncation error at rank r), length k + 1."""
        s2 = self.S.double() ** 2
        return torch.cat([s2.flip(0).cumsum(0).flip(0), s2.new_zeros(1)])

    def factors(self, rank: int) -> tuple[Tensor, Tensor]:
        """U [out, r] = P_r √S_r and V [r, features] = √S_r Qh_r T⁻¹ (float64)."""
        root = self.S[:rank].sqrt()
        U = self.P[:, :rank] * root
        V = root[:, None] * self.whitening.inverse_right(self.Qh[:rank])
        return U, V


def spectrum(W: Tensor, whitening: Whitening) -> Spectrum:
    """Full SVD of ``W · T`` (factorch.decompose.svd, LAPACK in float64)."""
    A = W if whitening.T is None else W @ whitening.T
    res = D.svd(A)
    return Spectrum(res.U, res.S, res.Vh, whitening)


def output_error(W: Tensor, W_hat: Tensor, C: Tensor | None) -> float:
    """Relative output error ``‖(W − Ŵ)X‖ / ‖WX‖`` from ``C = XᵀX/N``; the
    relative weight error when C is None."""
    E = W - W_hat
    if C is None:
        den = float(torch.linalg.matrix_norm(W))
        return float(torch.linalg.matrix_norm(E)) / den if den > 0 else 0.0
    num = float(((E @ C) * E).sum())
    den = float(((W @ C) * W).sum())
    return math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0
