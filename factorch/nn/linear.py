"""FactorizedLinear: a drop-in for nn.Linear whose weight is kept factorized."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import decompose as D
from .. import functional as F
from .._rank import check_one_rank_rule, check_rank, truncated_svd_factors
from .._tensorized import (
    Layout,
    check_tensorized_shape,
    init_,
    plan_info,
    reconstruct,
    resolve_rank,
    views,
)

FACTORIZATIONS = ("lowrank", "cp", "tucker", "tt")

_FLAT_OPS = {"cp": F.cp_linear_flat, "tucker": F.tucker_linear_flat, "tt": F.tt_linear_flat}


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

    ``factorization="cp" | "tucker" | "tt"``: W is tensorized as
    ``W[(o_1..o_d), (i_1..i_d)]`` (``in = ∏ i_k``, ``out = ∏ o_k``) and kept as
    a CP decomposition (rank R: a factor ``[i_k, R]`` per input mode and
    ``[o_k, R]`` per output mode), a Tucker decomposition (a core and a factor
    per mode) or a tensor train (cores ``[r_(k-1), i_k, o_k, r_k]``). All the
    factors live in ONE flat parameter, ``factors`` (views: ``in_factors``,
    ``out_factors``, ``core``, ``cores``); one C op per direction contracts x
    with them in the order its cost model picks for the batch size.

    Args:
        in_features, out_features: as for ``nn.Linear``.
        factorization: ``"lowrank"``, ``"cp"``, ``"tucker"`` or ``"tt"``.
        rank: lowrank: an int in ``[1, min(in, out)]``, or a float in
            ``(0, 1]``, the fraction of the dense weight's parameter count to
            keep. cp: an int R or a fraction. tucker: an int (every mode,
            capped at its size), ``((t_1..t_p), (s_1..s_q))`` or a fraction.
            tt: an int (every inner rank), the d - 1 inner ranks (or d + 1
            with the 1s at the ends), or a fraction; ranks above
            ``_tensorized.tt_max_ranks`` are allowed but redundant. A
            fraction gives balanced ranks within that parameter count.
            ``"same"``: the dense layer's parameter count (fraction 1.0).
        tensorized_shape: ``((i_1, .., i_d), (o_1, .., o_d))``, or None to
            factor in_features and out_features into balanced modes (about 8
            each: 4096 -> (8, 8, 8, 8)). Not for lowrank.
        bias, device, dtype: as for ``nn.Linear``.

    Random initialisation gives the output the variance ``nn.Linear``'s
    default initialisation gives, ``Var(W_ij) = 1/(3·in)``; for lowrank
    ``Var(W_ij) = r·Var(U)·Var(V)``, the others in factorch/_tensorized.py.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        factorization: str = "lowrank",
        rank=None,
        tensorized_shape=None,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        _check_factorization(factorization)
        self.in_features = _check_features("in_features", in_features)
        self.out_features = _check_features("out_features", out_features)
        self.factorization = factorization
        kw = {"device": device, "dtype": dtype}
        self._layout: Layout | None = None
        if factorization == "lowrank":
            if tensorized_shape is not None:
                raise ValueError(
                    "tensorized_shape: only for factorization='cp', 'tucker' or 'tt'; a "
                    "lowrank layer factors the [out, in] matrix as it is"
                )
            self.rank = check_rank(rank, in_features, out_features)
            self.U = nn.Parameter(torch.empty(out_features, self.rank, **kw))
            self.V = nn.Parameter(torch.empty(self.rank, in_features, **kw))
        else:
            ins, outs = check_tensorized_shape(
                tensorized_shape, in_features, out_features, same_length=factorization == "tt"
            )
            self._layout = Layout(factorization, ins, outs, resolve_rank(factorization, rank, ins, outs))
            self.tensorized_shape = (ins, outs)
            #: cp: R; tucker: ((t_1..t_p), (s_1..s_q)); tt: (1, r_1, .., r_(d-1), 1).
            self.rank = self._layout.rank
            self._op_args = self._layout.op_args()
            self.factors = nn.Parameter(torch.empty(self._layout.num_parameters, **kw))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **kw))
        else:
            self.register_parameter("bias", None)
        #: Relative Frobenius error of the factorization when built by
        #: ``from_linear``; None for a randomly initialised layer.
        self.reconstruction_error: float | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self._layout is None:
                # V: variance 1/in keeps t = x·Vᵀ at the scale of x; U: variance
                # 1/(3r) then gives W = U·V nn.Linear's variance 1/(3·in).
                bound_v = math.sqrt(3.0 / self.in_features)
                bound_u = 1.0 / math.sqrt(self.rank)
                self.V.uniform_(-bound_v, bound_v)
                self.U.uniform_(-bound_u, bound_u)
            else:
                init_(self._layout, self.factors)
            if self.bias is not None:
                b = 1.0 / math.sqrt(self.in_features)
                self.bias.uniform_(-b, b)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"x: expected a last dim of in_features = {self.in_features}, "
                f"got shape {list(x.shape)}"
            )
        if self._layout is None:
            return F.lowrank_linear(x, self.U, self.V, self.bias)
        return _FLAT_OPS[self.factorization](x, self.factors, self.bias, *self._op_args)

    # ------------------------------------------------------------------
    # Views of the flat parameter (cp, tucker, tt)
    # ------------------------------------------------------------------
    def _views(self, what: str, allowed: tuple) -> list[Tensor]:
        # TypeError, not AttributeError: nn.Module.__getattr__ would replace an
        # AttributeError raised in a property by a message without the reason.
        if self.factorization not in allowed:
            raise TypeError(
                f"{what}: a {self.factorization!r} layer has none (only {', '.join(allowed)})"
            )
        return views(self._layout, self.factors)

    @property
    def in_factors(self) -> list[Tensor]:
        """cp: ``A_k [i_k, R]``; tucker: ``V_k [i_k, t_k]`` (views of ``factors``)."""
        vs = self._views("in_factors", ("cp", "tucker"))
        p = len(self._layout.in_modes)
        return vs[:p] if self.factorization == "cp" else vs[1 : 1 + p]

    @property
    def out_factors(self) -> list[Tensor]:
        """cp: ``B_k [o_k, R]``; tucker: ``U_k [o_k, s_k]`` (views of ``factors``)."""
        vs = self._views("out_factors", ("cp", "tucker"))
        p = len(self._layout.in_modes)
        return vs[p:] if self.factorization == "cp" else vs[1 + p :]

    @property
    def core(self) -> Tensor:
        """tucker: the core ``[s_1..s_q, t_1..t_p]`` (a view of ``factors``)."""
        return self._views("core", ("tucker",))[0]

    @property
    def cores(self) -> list[Tensor]:
        """tt: ``G_k [r_(k-1), i_k, o_k, r_k]`` (views of ``factors``)."""
        return self._views("cores", ("tt",))

    # ------------------------------------------------------------------
    # Conversion
    # ------------------------------------------------------------------
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        factorization: str = "lowrank",
        rank=None,
        ratio: float | None = None,
        energy: float | None = None,
        tensorized_shape=None,
    ) -> "FactorizedLinear":
        """Factorizes a trained ``nn.Linear`` with factorch's C decompositions
        (float64): truncated SVD for ``"lowrank"``, CP-ALS for ``"cp"``,
        Tucker-HOOI for ``"tucker"``, TT-SVD of the tensorized weight for
        ``"tt"``.

        Exactly one of ``rank`` (as the layer's constructor takes it),
        ``ratio`` (fraction of the dense parameter count) or ``energy``
        (lowrank: fraction of the squared singular values kept; tt: the
        relative error bound ``sqrt(1 - energy)`` of TT-SVD; not defined for
        cp and tucker) sets the rank. ``tensorized_shape`` as for the
        constructor (cp, tucker, tt). The relative Frobenius error of the
        weight is stored in ``reconstruction_error``.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        _check_factorization(factorization)
        W = linear.weight
        kw = dict(bias=linear.bias is not None, device=W.device, dtype=W.dtype)
        if factorization == "lowrank":
            if tensorized_shape is not None:
                raise ValueError("tensorized_shape: only for factorization='cp', 'tucker' or 'tt'")
            U, V, err = truncated_svd_factors(W, rank=rank, ratio=ratio, energy=energy)
            layer = cls(linear.in_features, linear.out_features, "lowrank", rank=U.shape[1], **kw)
            values = {"U": U, "V": V}
        else:
            layer, err = _from_linear_tensorized(
                cls, linear, factorization, rank, ratio, energy, tensorized_shape, kw
            )
            values = {}
        with torch.no_grad():
            for name, v in values.items():
                getattr(layer, name).copy_(v)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        layer.reconstruction_error = err
        return layer

    @property
    def weight(self) -> Tensor:
        """The dense weight [out_features, in_features] the factors represent,
        formed on each access and differentiable; not a parameter (training
        updates the factors) and never formed by the forward. For code
        written for nn.Linear that reads ``.weight`` (its dtype or device, a
        tied head)."""
        if self._layout is None:
            return self.U @ self.V
        return reconstruct(self._layout, self.factors)

    def to_linear(self) -> nn.Linear:
        """The dense ``nn.Linear`` with the weight the factors represent."""
        ref = self.U if self._layout is None else self.factors
        dense = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=ref.device,
            dtype=ref.dtype,
        )
        with torch.no_grad():
            if self._layout is None:
                dense.weight.copy_(self.U @ self.V)
            else:
                dense.weight.copy_(reconstruct(self._layout, self.factors))
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
        kept = self.U.numel() + self.V.numel() if self._layout is None else self.factors.numel()
        return (self.in_features * self.out_features) / kept

    def flops(self, batch: int = 1) -> int:
        """Multiply-adds ×2 of one forward over ``batch`` rows (cp, tucker,
        tt: of the contraction order the C kernels choose for that batch,
        weight-side merges included)."""
        if self._layout is None:
            return 2 * batch * self.rank * (self.in_features + self.out_features)
        return plan_info(self._layout, batch, self.factors.device, self.factors.dtype)["forward_flops"]

    def plan(self, batch: int = 1) -> dict:
        """What the C kernels would do for ``batch`` rows (cp, tucker, tt):
        FLOPs forward and backward, workspace bytes, the contraction order."""
        if self._layout is None:
            raise TypeError("plan: only for factorization='cp', 'tucker' or 'tt'")
        return plan_info(self._layout, batch, self.factors.device, self.factors.dtype)

    def extra_repr(self) -> str:
        shape = "" if self._layout is None else f", tensorized_shape={self.tensorized_shape}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"factorization={self.factorization!r}, rank={self.rank}{shape}, "
            f"bias={self.bias is not None}"
        )


def _from_linear_tensorized(cls, linear, factorization, rank, ratio, energy, tensorized_shape, kw):
    """The cp / tucker / tt branch of FactorizedLinear.from_linear: decompose
    the tensorized weight, build the layer with the ranks found, copy the
    factors into its flat parameter. Returns (layer, relative error)."""
    check_one_rank_rule(rank, ratio, energy)
    if energy is not None and factorization != "tt":
        raise ValueError(
            f"energy: not defined for factorization={factorization!r}; give rank or ratio"
        )
    if ratio is not None and not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
        raise ValueError(f"ratio: expected a fraction in (0, 1], got {ratio!r}")
    if not torch.isfinite(linear.weight).all():
        raise ValueError("weight: expected finite values, found NaN or Inf")
    n_in, n_out = linear.in_features, linear.out_features
    ins, outs = check_tensorized_shape(
        tensorized_shape, n_in, n_out, same_length=factorization == "tt"
    )
    W = linear.weight.detach().double()
    if energy is not None:  # tt: the ranks come out of TT-SVD
        if not (isinstance(energy, (int, float)) and 0 < energy <= 1):
            raise ValueError(f"energy: expected a fraction in (0, 1], got {energy!r}")
        res = D.tensor_train_matrix(W.T.reshape(*ins, *outs), eps=math.sqrt(1.0 - energy))
    else:
        ranks = resolve_rank(factorization, float(ratio) if ratio is not None else rank, ins, outs)
        if factorization == "cp":
            # ALS crawls through flat stretches ("swamps"): a planted rank-6
            # weight needed ~800 sweeps (8 ms) to reach 0 error; 100 left 10%.
            res = D.cp(W.reshape(*outs, *ins), int(ranks), n_iter_max=1000, tol=1e-12,
                       normalize_factors=False)
        elif factorization == "tucker":
            t, s_ = ranks  # ((t_1..t_p), (s_1..s_q)): input and output ranks
            res = D.tucker(W.reshape(*outs, *ins), rank=[*s_, *t])
        else:
            res = D.tensor_train_matrix(W.T.reshape(*ins, *outs), rank=list(ranks))
    if factorization == "tt":  # TT-SVD may stop below a cap (the unfolding's rank)
        ranks = tuple(int(c.shape[0]) for c in res.factors) + (1,)
    layer = cls(n_in, n_out, factorization, rank=ranks, tensorized_shape=(ins, outs), **kw)
    # The flat parameter's views, in the order _tensorized.views lays them out.
    if factorization == "cp":
        q = len(outs)
        pieces = list(res.factors[q:]) + list(res.factors[:q])  # in factors, then out factors
    elif factorization == "tucker":
        q = len(outs)
        pieces = [res.core] + list(res.factors[q:]) + list(res.factors[:q])
    else:
        pieces = list(res.factors)
    with torch.no_grad():
        for view, value in zip(views(layer._layout, layer.factors), pieces):
            view.copy_(torch.as_tensor(value).reshape(view.shape))
    return layer, float(res.rel_error)
