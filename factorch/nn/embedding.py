"""FactorizedEmbedding: a drop-in for nn.Embedding whose table is kept
factorized (low rank, or a Tensor-Train as in TT-Rec)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import functional as F
from .. import limits
from .._rank import check_one_rank_rule, lowrank_rank_for_ratio
from .._tensorized import MAX_MODES, balanced_modes
from ..factorizations import LowRank, TensorTrain
from ._common import FactorViews, warn_past_break_even
from ._layout_state import LayoutState, plain

FACTORIZATIONS = ("lowrank", "tt")

#: Cores of a TT table when tensorized_shape is None (TT-Rec's choice).
DEFAULT_TT_CORES = 3


def _check_factorization(factorization: str) -> None:
    if factorization not in FACTORIZATIONS:
        raise ValueError(
            f"factorization: expected one of {list(FACTORIZATIONS)}, got {factorization!r}"
        )


def _check_size(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def vocabulary_modes(num: int, d: int) -> tuple[int, ...]:
    """d mode sizes whose product is at least num, as equal as possible
    (largest first): all start at ⌈num^(1/d)⌉, then each is lowered while the
    product still covers num, so the vocabulary is padded up by little."""
    q = max(1, round(num ** (1.0 / d)))
    while q**d < num:
        q += 1
    while q > 1 and (q - 1) ** d >= num:
        q -= 1
    modes = [q] * d
    for k in range(d):
        while modes[k] > 1 and math.prod(modes) // modes[k] * (modes[k] - 1) >= num:
            modes[k] -= 1
    return tuple(sorted(modes, reverse=True))


def check_tt_shape(tensorized_shape, num: int, dim: int) -> tuple[tuple, tuple]:
    """((n_1..n_d), (m_1..m_d)): ∏ n_k >= num (the vocabulary padded up),
    ∏ m_k == dim. None: DEFAULT_TT_CORES balanced modes on both sides."""
    if tensorized_shape is None:
        d = DEFAULT_TT_CORES
        return vocabulary_modes(num, d), balanced_modes(dim, d)
    try:
        ns, ms = (tuple(s) for s in tensorized_shape)
    except (TypeError, ValueError):
        raise ValueError(
            "tensorized_shape: expected ((n_1, .., n_d), (m_1, .., m_d)), "
            f"got {tensorized_shape!r}"
        ) from None
    for side, modes in (("vocabulary", ns), ("embedding", ms)):
        if not 1 <= len(modes) <= MAX_MODES or not all(
            isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in modes
        ):
            raise ValueError(
                f"tensorized_shape: expected 1 to {MAX_MODES} positive int {side} modes, "
                f"got {modes!r}"
            )
    if len(ns) != len(ms):
        raise ValueError(
            "tensorized_shape: a Tensor-Train needs as many vocabulary as embedding modes, got "
            f"{len(ns)} and {len(ms)}"
        )
    if math.prod(ns) < num:
        raise ValueError(
            f"tensorized_shape: the vocabulary modes {ns} multiply to {math.prod(ns)}, expected "
            f"at least num_embeddings = {num}"
        )
    if math.prod(ms) != dim:
        raise ValueError(
            f"tensorized_shape: the embedding modes {ms} multiply to {math.prod(ms)}, expected "
            f"embedding_dim = {dim}"
        )
    return ns, ms


def _check_fraction(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
        raise ValueError(f"{name}: expected a fraction in (0, 1], got {v!r}")
    return float(v)


def lowrank_rank(rank, num: int, dim: int) -> int:
    """An int in [1, min(num, dim)], or a float fraction of the dense
    table's parameters (the largest R with R·(num + dim) <= fraction·num·dim)."""
    if isinstance(rank, bool) or rank is None:
        raise ValueError(f"rank: expected a positive int or a fraction in (0, 1], got {rank!r}")
    if isinstance(rank, float):
        return lowrank_rank_for_ratio(dim, num, _check_fraction("rank", rank))
    if not isinstance(rank, int):
        raise TypeError(f"rank: expected an int or a float, got {type(rank).__name__}")
    limit = min(num, dim)
    if not 1 <= rank <= limit:
        raise ValueError(
            f"rank: expected 1 <= rank <= min(num_embeddings, embedding_dim) = {limit}, got {rank}"
        )
    return rank


def tt_ranks(rank, ns: tuple, ms: tuple, num: int) -> tuple:
    """TT ranks (1, r_1, .., r_(d-1), 1) from an int, a tuple, "same" or a
    float fraction of the num·dim table's parameters (resolve_rank measures
    fractions against the padded ∏ n_k rows, hence the rescaling)."""
    if rank == "same":
        rank = 1.0
    if isinstance(rank, float):
        rank = _check_fraction("rank", rank) * num / math.prod(ns)
    return TensorTrain.resolve_rank(rank, ns, ms)


class FactorizedEmbedding(FactorViews, LayoutState, nn.Module):
    """``y = T[indices]`` with the table ``T [num_embeddings, embedding_dim]``
    stored factorized, never formed.

    ``factorization="lowrank"``: ``T = U · V``, ``U [num, R]``, ``V [R, dim]``,
    views of ONE flat parameter ``factors`` (V first) as in every factorch
    layer (layout: factorch.factorizations.LowRank). The forward gathers the rows of U the indices pick and multiplies them by
    V (one C op, ``torch.ops.factorch.lowrank_embedding``); the backward
    computes ``grad_V`` by GEMM and scatter-adds ``grad_y · Vᵀ`` into the
    looked-up rows of ``grad_U`` only.

    ``factorization="tt"`` (TT-Rec): the vocabulary is padded up to
    ``∏ n_k >= num_embeddings`` and ``embedding_dim = ∏ m_k``; the cores
    ``G_k [r_(k-1), n_k, m_k, r_k]`` live in the flat ``factors`` (views:
    ``cores``; layout: factorch.factorizations.TensorTrain of the table's
    transpose). Row i, with digits ``(i_1..i_d)`` (``i_1`` slowest),
    is ``G_1[:, i_1] ··· G_d[:, i_d]`` reshaped to ``embedding_dim``; the C op
    runs that chain of small products per index, forward and backward, and
    writes gradients into the looked-up slices only.

    Args:
        num_embeddings, embedding_dim: as for ``nn.Embedding``.
        factorization: ``"lowrank"`` or ``"tt"``.
        rank: lowrank: an int in ``[1, min(num, dim)]`` or a float in
            ``(0, 1]``, the fraction of the dense table's parameters to keep.
            tt: an int (every inner rank), the d - 1 inner ranks (or d + 1
            with the 1s at the ends), a fraction, or ``"same"``.
        tensorized_shape: tt only: ``((n_1..n_d), (m_1..m_d))``, or None for
            three cores with balanced modes.
        padding_idx: as for ``nn.Embedding``: lookups of this row give zeros
            and pass no gradient (the padding row stays zero).
        device, dtype: of the parameters.

    Random initialisation gives ``nn.Embedding``'s output statistics: every
    table entry has mean 0 and variance 1 (lowrank: U and V ~ N(0, 1/√R);
    tt: core k ~ N(0, 1/r_(k-1)), whose chain products have variance 1).
    Indices: int64 or int32 of any shape; out-of-range ones raise a
    RuntimeError naming ``indices``.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        factorization: str = "lowrank",
        rank=None,
        tensorized_shape=None,
        padding_idx: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        _check_factorization(factorization)
        self.num_embeddings = _check_size("num_embeddings", num_embeddings)
        self.embedding_dim = _check_size("embedding_dim", embedding_dim)
        self.factorization = factorization
        pad = F._padding_idx(padding_idx, num_embeddings)
        #: The padding row in [0, num_embeddings), or None.
        self.padding_idx = None if pad < 0 else pad
        kw = {"device": device, "dtype": dtype}
        if factorization == "lowrank":
            if tensorized_shape is not None:
                raise ValueError(
                    "tensorized_shape: only for factorization='tt'; a lowrank table factors "
                    "the [num_embeddings, embedding_dim] matrix as it is"
                )
            # The table T [num, dim] as the matrix U [num, R] · V [R, dim].
            self.layout = LowRank(embedding_dim, num_embeddings,
                                  lowrank_rank(rank, num_embeddings, embedding_dim))
        else:
            ns, ms = check_tt_shape(tensorized_shape, num_embeddings, embedding_dim)
            # The table (vocabulary padded to ∏ n_k rows) is Wᵀ for the TT
            # matrix W [dim, ∏ n_k] with input modes ns and output modes ms.
            self.layout = TensorTrain(ns, ms, tt_ranks(rank, ns, ms, num_embeddings))
            #: ((n_1..n_d), (m_1..m_d)): vocabulary and embedding modes.
            self.tensorized_shape = (ns, ms)
            self._op_args = self.layout.op_args()  # modes, dims, ranks
        #: lowrank: R; tt: (1, r_1, .., r_(d-1), 1)
        self.rank = self.layout.rank
        limits.check_layer_parameters(
            "rank", f"a {factorization!r} table {num_embeddings} x {embedding_dim} of rank "
            f"{self.rank}", self.layout.num_parameters, device, dtype)
        self.factors = nn.Parameter(torch.empty(self.layout.num_parameters, **kw))
        #: Relative Frobenius error of the table when built by
        #: ``from_embedding``; None for a randomly initialised layer.
        self.reconstruction_error: float | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.factorization == "lowrank":
                std = self.rank ** -0.25  # Var(T_ij) = R · Var(U) · Var(V) = 1
                self.factors.normal_(0.0, std)
                if self.padding_idx is not None:
                    self.U[self.padding_idx].zero_()
            else:
                # Var(T_ij) = ∏ inner ranks · ∏_k Var(G_k) = 1 with
                # Var(G_k) = 1 / r_(k-1) (each step's fan-in).
                r = self.layout.rank
                for k, v in enumerate(self.layout.views(self.factors)):
                    v.normal_(0.0, 1.0 / math.sqrt(r[k]))

    def forward(self, indices: Tensor) -> Tensor:
        if not isinstance(indices, (Tensor, torch.fx.Proxy)):
            raise TypeError(f"indices: expected a Tensor of int64 or int32, got "
                            f"{type(indices).__name__}")
        if self.factorization == "lowrank":
            U, V = self.layout.split(self.factors)
            return F.lowrank_embedding(indices, U, V, self.padding_idx)
        return F.tt_embedding_flat(indices, self.factors, self.num_embeddings, *self._op_args,
                                   self.padding_idx)

    def layout_state(self) -> dict:
        """How ``factors`` is read, as plain data; stored in the state_dict
        (``_extra_state``) and checked on load (factorch/nn/_layout_state.py)."""
        return {"factorization": self.factorization, "num_embeddings": self.num_embeddings,
                "embedding_dim": self.embedding_dim, "rank": plain(self.layout.rank),
                "tensorized_shape": plain(getattr(self, "tensorized_shape", None))}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.factorization == "lowrank":
            LowRank.upgrade_state_dict(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    _FACTOR_VIEWS = {"U": ("lowrank",), "V": ("lowrank",), "cores": ("tt",)}
    _VIEW_NOUN = "table"

    @property
    def U(self) -> Tensor:
        """lowrank: ``U [num_embeddings, R]`` (a view of ``factors``)."""
        self._check_view("U")
        return self.layout.split(self.factors)[0]

    @property
    def V(self) -> Tensor:
        """lowrank: ``V [R, embedding_dim]`` (a view of ``factors``)."""
        self._check_view("V")
        return self.layout.split(self.factors)[1]

    @property
    def cores(self) -> list[Tensor]:
        """tt: ``G_k [r_(k-1), n_k, m_k, r_k]`` (views of ``factors``)."""
        self._check_view("cores")
        return self.layout.views(self.factors)

    # ------------------------------------------------------------------
    # Conversion
    # ------------------------------------------------------------------
    def table(self) -> Tensor:
        """The dense table [num_embeddings, embedding_dim] the factors
        represent, padding row zero (for conversion and tests; the forward
        never forms it). Differentiable."""
        t = self.layout.to_dense(self.factors)
        if self.factorization == "tt":
            t = t.T[: self.num_embeddings]
        if self.padding_idx is not None:
            keep = torch.ones(self.num_embeddings, 1, dtype=t.dtype, device=t.device)
            keep[self.padding_idx] = 0
            t = t * keep
        return t

    @property
    def weight(self) -> Tensor:
        """The dense table (:meth:`table`), formed on each access; not a
        parameter. For code written for nn.Embedding that reads ``.weight``
        (its dtype or device, a head tied to it)."""
        return self.table()

    def to_embedding(self) -> nn.Embedding:
        """The dense ``nn.Embedding`` with the table the factors represent."""
        ref = self.factors
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx,
                           device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            emb.weight.copy_(self.table())
        return emb

    @classmethod
    def from_embedding(
        cls,
        embedding: nn.Embedding,
        factorization: str = "lowrank",
        rank=None,
        ratio: float | None = None,
        energy: float | None = None,
        tensorized_shape=None,
    ) -> "FactorizedEmbedding":
        """Factorizes a trained ``nn.Embedding`` with factorch's C
        decompositions (float64): truncated SVD of the table for
        ``"lowrank"``, TT-SVD of the tensorized table (zero rows padding the
        vocabulary up to ``∏ n_k``) for ``"tt"``.

        Exactly one of ``rank`` (as the constructor takes it), ``ratio``
        (fraction of the dense table's parameters) or ``energy`` (lowrank:
        fraction of the squared singular values kept; tt: TT-SVD's relative
        error bound ``sqrt(1 - energy)``) sets the rank. padding_idx is
        carried over (its row of the factorized table is zero). The relative
        Frobenius error of the table is stored in ``reconstruction_error``.
        When ``energy`` picks a rank with more parameters than the dense
        table (past break-even) a UserWarning says so.
        """
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(
                f"embedding: expected an nn.Embedding, got {type(embedding).__name__}"
            )
        _check_factorization(factorization)
        if embedding.max_norm is not None or embedding.scale_grad_by_freq:
            raise ValueError(
                "embedding: max_norm and scale_grad_by_freq are not supported by "
                "FactorizedEmbedding"
            )
        check_one_rank_rule(rank, ratio, energy)
        W = embedding.weight.detach()
        if not torch.isfinite(W).all():
            raise ValueError("weight: expected finite values, found NaN or Inf")
        num, dim = W.shape
        kw = dict(padding_idx=embedding.padding_idx, device=W.device, dtype=W.dtype)
        if factorization == "lowrank":
            if tensorized_shape is not None:
                raise ValueError("tensorized_shape: only for factorization='tt'")
            if rank is not None:
                rank = lowrank_rank(rank, num, dim)
            elif ratio is not None:
                rank = lowrank_rank_for_ratio(dim, num, _check_fraction("ratio", ratio))
            layout, flat, _ = LowRank.from_dense(W, rank=rank, energy=energy)
            layer = cls(num, dim, "lowrank", rank=layout.rank, **kw)
            with torch.no_grad():
                layer.factors.copy_(flat)
                if layer.padding_idx is not None:
                    layer.U[layer.padding_idx].zero_()
        else:
            ns, ms = check_tt_shape(tensorized_shape, num, dim)
            padded = torch.zeros(math.prod(ns), dim, dtype=torch.float64, device=W.device)
            padded[:num] = W.double()
            if energy is not None:
                layout, flat, _ = TensorTrain.from_dense(padded.T, energy=energy,
                                                         tensorized_shape=(ns, ms))
            else:
                frac = _check_fraction("ratio", ratio) if ratio is not None else rank
                layout, flat, _ = TensorTrain.from_dense(
                    padded.T, rank=tt_ranks(frac, ns, ms, num), tensorized_shape=(ns, ms))
            layer = cls(num, dim, "tt", rank=layout.rank, tensorized_shape=(ns, ms), **kw)
            with torch.no_grad():
                layer.factors.copy_(flat)
        with torch.no_grad():
            ref = W.double()
            norm = torch.linalg.vector_norm(ref)
            diff = torch.linalg.vector_norm(layer.table().double() - ref)
            layer.reconstruction_error = (diff / norm).item() if norm > 0 else diff.item()
        warn_past_break_even(f"{factorization!r} table", energy, layer.rank,
                             layer.factors.numel(), num * dim)
        return layer

    # ------------------------------------------------------------------
    # Size and cost (names as FactorizedLinear's)
    # ------------------------------------------------------------------
    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def compression_ratio(self) -> float:
        """Dense table parameters over factor parameters."""
        return (self.num_embeddings * self.embedding_dim) / self.num_parameters

    def flops(self, batch: int = 1) -> int:
        """Multiply-adds ×2 of one forward looking up ``batch`` indices
        (lowrank: one row of U times V each; tt: the chain of products)."""
        if self.factorization == "lowrank":
            return 2 * batch * self.rank * self.embedding_dim
        ms, r = self.layout.out_modes, self.layout.rank
        per, D_k = 0, ms[0]
        for k in range(1, len(ms)):
            per += 2 * D_k * r[k] * ms[k] * r[k + 1]
            D_k *= ms[k]
        return batch * per

    def extra_repr(self) -> str:
        shape = "" if self.factorization == "lowrank" else f", tensorized_shape={self.tensorized_shape}"
        pad = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, "
            f"factorization={self.factorization!r}, rank={self.rank}{shape}{pad}"
        )
