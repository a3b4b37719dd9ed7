"""FactorizedLinear: a drop-in for nn.Linear whose weight is kept factorized."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import factorizations as FZ
from .. import limits
from ..factorizations import LowRank
from . import _common
from ._common import FactorViews
from ._layout_state import LayoutState, plain

FACTORIZATIONS = tuple(FZ.REGISTRY)


def _check_features(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


class FactorizedLinear(FactorViews, LayoutState, nn.Module):
    """``y = x · Wᵀ + b`` with ``W`` stored factorized, never formed.

    ``factorization="lowrank"``: ``W ≈ U · V`` with ``U [out, r]`` and
    ``V [r, in]`` (truncated SVD), views of ONE flat parameter ``factors``
    (V first) as in every factorch layer. The forward and backward each run
    as one fused C op on it (``torch.ops.factorch.lowrank_linear_flat`` and
    its backward, which writes both factors' gradients into one flat tensor).

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
            ``factorizations.tt_max_ranks`` are allowed but redundant. A
            fraction gives balanced ranks within that parameter count.
            ``"same"``: the dense layer's parameter count (fraction 1.0).
        tensorized_shape: ``((i_1, .., i_d), (o_1, .., o_d))``, or None to
            factor in_features and out_features into balanced modes (about 8
            each: 4096 -> (8, 8, 8, 8)). Not for lowrank.
        bias, device, dtype: as for ``nn.Linear``.

    ``keep_states`` (attribute, tucker only; default True): when a backward
    can follow, the forward keeps x projected on the input factors and that
    times the core for the backward (``T + S`` elements per row, only where
    that is at most ``in + out``), instead of the backward recomputing them;
    False trades that memory for a slower backward.

    A rank whose parameters would not fit the memory available (or the cap
    of ``factorch.limits.set_memory_limit``) raises a ValueError naming
    ``rank`` and the bytes it would need, before anything is allocated.

    Random initialisation gives the output the variance ``nn.Linear``'s
    default initialisation gives, ``Var(W_ij) = 1/(3·in)``; for lowrank
    ``Var(W_ij) = r·Var(U)·Var(V)``, the others in factorch/factorizations.py
    (one class per factorization: layout, init, from/to dense, op, FLOPs).
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
        kind = FZ.get(factorization)
        self.in_features = _check_features("in_features", in_features)
        self.out_features = _check_features("out_features", out_features)
        self.factorization = factorization
        #: The layout (factorch.factorizations): shapes, ranks, the op.
        self.layout: FZ.Factorization = kind.create(in_features, out_features, rank,
                                                    tensorized_shape)
        if self.layout.tensorized_shape is not None:
            self.tensorized_shape = self.layout.tensorized_shape
        #: lowrank: r; cp: R; tucker: ((t_1..t_p), (s_1..s_q)); tt: (1, r_1, .., r_(d-1), 1).
        self.rank = self.layout.rank
        #: tucker: keep the forward's states for the backward (see above).
        self.keep_states = True
        limits.check_layer_parameters(
            "rank", f"a {factorization!r} layer {in_features} -> {out_features} of rank "
            f"{self.rank}", self.layout.num_parameters, device, dtype)
        kw = {"device": device, "dtype": dtype}
        self.factors = nn.Parameter(torch.empty(self.layout.num_parameters, **kw))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **kw))
        else:
            self.register_parameter("bias", None)
        #: Relative Frobenius error of the factorization when built by
        #: ``from_linear``; None for a randomly initialised layer.
        self.reconstruction_error: float | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.layout.init_(self.factors)
        if self.bias is not None:
            with torch.no_grad():
                b = 1.0 / math.sqrt(self.in_features)
                self.bias.uniform_(-b, b)

    def forward(self, x: Tensor) -> Tensor:
        x = _common.check_linear_input(x, self.in_features)
        if self.factorization == "tucker":
            keep = getattr(self, "keep_states", True)  # layers pickled before it existed
            return self.layout.linear(x, self.factors, self.bias, keep)
        return self.layout.linear(x, self.factors, self.bias)

    def layout_state(self) -> dict:
        """How ``factors`` is read, as plain data; stored in the state_dict
        (``_extra_state``) and checked on load (factorch/nn/_layout_state.py)."""
        return {"factorization": self.factorization, "in_features": self.in_features,
                "out_features": self.out_features, "rank": plain(self.layout.rank),
                "tensorized_shape": plain(self.layout.tensorized_shape)}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.factorization == "lowrank":
            LowRank.upgrade_state_dict(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------
    # Views of the flat parameter
    # ------------------------------------------------------------------
    _FACTOR_VIEWS = {"U": ("lowrank",), "V": ("lowrank",), "in_factors": ("cp", "tucker"),
                     "out_factors": ("cp", "tucker"), "core": ("tucker",), "cores": ("tt",)}

    def _views(self, what: str) -> list[Tensor]:
        self._check_view(what)
        return self.layout.views(self.factors)

    @property
    def U(self) -> Tensor:
        """lowrank: ``U [out, r]`` (a view of ``factors``)."""
        return self._views("U")[1]

    @property
    def V(self) -> Tensor:
        """lowrank: ``V [r, in]`` (a view of ``factors``)."""
        return self._views("V")[0]

    @property
    def in_factors(self) -> list[Tensor]:
        """cp: ``A_k [i_k, R]``; tucker: ``V_k [i_k, t_k]`` (views of ``factors``)."""
        vs = self._views("in_factors")
        p = len(self.layout.in_modes)
        return vs[:p] if self.factorization == "cp" else vs[1 : 1 + p]

    @property
    def out_factors(self) -> list[Tensor]:
        """cp: ``B_k [o_k, R]``; tucker: ``U_k [o_k, s_k]`` (views of ``factors``)."""
        vs = self._views("out_factors")
        p = len(self.layout.in_modes)
        return vs[p:] if self.factorization == "cp" else vs[1 + p :]

    @property
    def core(self) -> Tensor:
        """tucker: the core ``[s_1..s_q, t_1..t_p]`` (a view of ``factors``)."""
        return self._views("core")[0]

    @property
    def cores(self) -> list[Tensor]:
        """tt: ``G_k [r_(k-1), i_k, o_k, r_k]`` (views of ``factors``)."""
        return self._views("cores")

    # ------------------------------------------------------------------
    # Conversion
    # ------------------------------------------------------------------
    @classmethod
    def from_layout(cls, layout: FZ.Factorization, flat: Tensor, bias: Tensor | None = None
                    ) -> "FactorizedLinear":
        """The layer holding ``flat`` (the factors in ``layout``'s order, as
        ``factorch.factorizations`` classes return them) and ``bias``."""
        layer = cls(layout.in_features, layout.out_features, layout.name, rank=layout.rank,
                    tensorized_shape=layout.tensorized_shape, bias=bias is not None,
                    device=flat.device, dtype=flat.dtype)
        with torch.no_grad():
            layer.factors.copy_(flat)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def set_factors(self, layout: FZ.Factorization, flat: Tensor) -> None:
        """Replaces the factors by ``flat`` in ``layout`` (the same
        factorization and features; the ranks may change), keeping the
        ``factors`` Parameter object (an optimizer holding it keeps it)."""
        if (layout.name, layout.in_features, layout.out_features) != (
                self.factorization, self.in_features, self.out_features):
            raise ValueError(f"layout: expected a {self.factorization!r} layout of "
                             f"{self.in_features} -> {self.out_features}, got {layout!r}")
        if flat.shape != (layout.num_parameters,):
            raise ValueError(f"flat: expected [{layout.num_parameters}] for {layout!r}, got "
                             f"{list(flat.shape)}")
        self.layout = layout
        self.rank = layout.rank
        self.factors.data = flat.detach().to(self.factors.device, self.factors.dtype).contiguous()

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        factorization: str = "lowrank",
        rank=None,
        ratio: float | None = None,
        energy: float | None = None,
        tensorized_shape=None,
        whitening=None,
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
        constructor (cp, tucker, tt). ``whitening`` (lowrank only): an
        activation-aware whitening from factorch._activation (what
        ``factorch.compress`` passes for SVD-LLM and ASVD). The relative
        Frobenius error of the weight is stored in ``reconstruction_error``.
        When ``energy`` picks a rank with more parameters than the dense
        weight (past break-even) a UserWarning says so.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        kind = FZ.get(factorization)
        layout, flat, err = kind.from_dense(linear.weight, rank=rank, ratio=ratio, energy=energy,
                                            tensorized_shape=tensorized_shape,
                                            whitening=whitening)
        layer = cls.from_layout(layout, flat, linear.bias)
        layer.reconstruction_error = err
        _common.warn_past_break_even(f"{factorization!r} layer", energy, layer.rank,
                                     layout.num_parameters, layout.in_features *
                                     layout.out_features)
        return layer

    @property
    def weight(self) -> Tensor:
        """The dense weight [out_features, in_features] the factors represent,
        formed on each access and differentiable; not a parameter (training
        updates the factors) and never formed by the forward. For code
        written for nn.Linear that reads ``.weight`` (its dtype or device, a
        tied head)."""
        return self.layout.to_dense(self.factors)

    def to_linear(self) -> nn.Linear:
        """The dense ``nn.Linear`` with the weight the factors represent."""
        ref = self.factors
        dense = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=ref.device,
            dtype=ref.dtype,
        )
        with torch.no_grad():
            dense.weight.copy_(self.layout.to_dense(self.factors))
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
        return (self.in_features * self.out_features) / self.factors.numel()

    def flops(self, batch: int = 1) -> int:
        """Multiply-adds ×2 of one forward over ``batch`` rows (cp, tucker,
        tt: of the contraction order the C kernels choose for that batch,
        weight-side merges included)."""
        return self.layout.flops(batch, self.factors.device, self.factors.dtype)

    def plan(self, batch: int = 1) -> dict:
        """What the C kernels would do for ``batch`` rows (cp, tucker, tt):
        FLOPs forward and backward, workspace bytes, the contraction order,
        and per direction whether they contract x with the factors or form
        W in blocks first (``forward_strategy`` / ``backward_strategy``:
        "contract" or "form_w")."""
        if not isinstance(self.layout, FZ.Tensorized):
            raise TypeError("plan: only for factorization='cp', 'tucker' or 'tt'")
        return self.layout.plan(batch, self.factors.device, self.factors.dtype)

    def extra_repr(self) -> str:
        shape = "" if self.layout.tensorized_shape is None else f", tensorized_shape={self.tensorized_shape}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"factorization={self.factorization!r}, rank={self.rank}{shape}, "
            f"bias={self.bias is not None}"
        )
