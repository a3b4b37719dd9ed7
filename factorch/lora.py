"""LoRA adapters on every factorch layer and on torch's Linear, Embedding and
Conv2d: ``add_lora``, merge / unmerge, and PEFT's adapter format both ways.

A wrapped layer computes ``y = base(x) + s · B(A(drop(x)))`` with the
adapter ``A [r, in]``, ``B [out, r]`` and the scale ``s = alpha / r``
(``alpha / √r`` with rsLoRA). The module layout follows PEFT's with a single
adapter: the wrapper keeps the original layer as ``base_layer`` and the
adapter as ``lora_A`` / ``lora_B`` (``nn.Linear`` / ``nn.Conv2d`` modules) or,
for embeddings, the parameters ``lora_embedding_A [r, num]`` and
``lora_embedding_B [dim, r]``, so a wrapper's state_dict keys are PEFT's
without the adapter name (``q_proj.lora_A.weight`` where PEFT has
``q_proj.lora_A.default.weight``) and its saved adapters use exactly PEFT's
keys (``base_model.model.q_proj.lora_A.weight``).

Linear bases (``nn.Linear``, ``FactorizedLinear``) run through
``factorch.functional.lora_linear``: a dense base with its weight, a low-rank
base with its factors U, V (one fused op), cp / tucker / tt bases with the
output of their own forward (``base_out``).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter

import torch
from torch import Tensor, nn

from . import decompose as D
from . import functional as F
from .compression import _check_patterns, _matches, _set_module
from .factorizations import LowRank
from .nn import FactorizedLinear, _common

__all__ = [
    "LoraLayer",
    "LoraLinear",
    "LoraEmbedding",
    "LoraConv2d",
    "add_lora",
    "lora_layers",
    "merge",
    "unmerge",
    "merge_and_unload",
    "unload",
    "reset_adapter_",
    "save_adapter",
    "load_adapter",
]

INITS = ("default", "gaussian", "pissa", "olora")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
#: PEFT's prefix of every key in a saved adapter (PeftModel.base_model.model).
PEFT_PREFIX = "base_model.model."


def _scale(r: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


# --------------------------------------------------------------------------
# Wrappers
# --------------------------------------------------------------------------
class LoraLayer(nn.Module):
    """What every wrapper shares: the base layer, the rank, alpha, scale,
    dropout, the init used, and the merge state.

    Attributes:
        base_layer: the wrapped module.
        r, lora_alpha, use_rslora, scaling: the adapter's rank, alpha, whether
            the scale is ``alpha / √r`` (rsLoRA) rather than ``alpha / r``,
            and that scale.
        lora_dropout: the probability of dropout on the adapter's input while
            training (PEFT applies none on embeddings; neither does this).
        init: the initialisation the adapter got (one of ``INITS``).
        merged: whether the adapter is folded into ``base_layer`` (the
            forward then runs the base alone).
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float,
                 rslora: bool) -> None:
        super().__init__()
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r: expected a positive int, got {r!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ValueError(f"alpha: expected a finite number, got {alpha!r}")
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
        self.base_layer = base_layer
        self.r = r
        self.lora_alpha = alpha
        self.use_rslora = bool(rslora)
        self.scaling = _scale(r, alpha, self.use_rslora)
        self.lora_dropout = float(dropout)
        self.init = "default"
        self.merged = False
        # What unmerge needs (original tensors or modules); not in state_dict.
        self._unmerge_state: dict | None = None

    # Code written for the wrapped layer reads these (transformers reads
    # .weight.dtype of some projections; nn.Linear users read in_features).
    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def adapter_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def delta_weight(self) -> Tensor:
        """``s · B · A`` in the base weight's layout, float64."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        rs = ", rslora=True" if self.use_rslora else ""
        return (f"r={self.r}, alpha={self.lora_alpha}, scaling={self.scaling:.4g}, "
                f"dropout={self.lora_dropout}, init={self.init!r}{rs}, merged={self.merged}")


class LoraLinear(LoraLayer):
    """LoRA on ``nn.Linear`` or ``factorch.nn.FactorizedLinear`` (every
    factorization). ``lora_A = nn.Linear(in, r)``, ``lora_B = nn.Linear(r, out)``
    (no biases), in the base's dtype and device."""

    def __init__(self, base_layer: nn.Module, r: int = 16, alpha: float = 32, dropout: float = 0.0,
                 rslora: bool = False) -> None:
        if not isinstance(base_layer, (nn.Linear, FactorizedLinear)):
            raise TypeError(f"base_layer: expected an nn.Linear or a FactorizedLinear, got "
                            f"{type(base_layer).__name__}")
        super().__init__(base_layer, r, alpha, dropout, rslora)
        ref = _a_parameter(base_layer)
        kw = {"device": ref.device, "dtype": ref.dtype}
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **kw)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **kw)
        reset_adapter_(self, "default")

    def forward(self, x: Tensor) -> Tensor:
        base = self.base_layer
        if self.merged:
            return base(x)
        x = _common.check_linear_input(x, self.in_features)
        A, B, s = self.lora_A.weight, self.lora_B.weight, self.scaling
        p = self.lora_dropout if self.training else 0.0
        if isinstance(base, nn.Linear):
            return F.lora_linear(x, A, B, s, weight=base.weight, bias=base.bias, dropout=p)
        if base.factorization == "lowrank":
            return F.lora_linear(x, A, B, s, U=base.U, V=base.V, bias=base.bias, dropout=p)
        return F.lora_linear(x, A, B, s, base_out=base(x), dropout=p)

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [self.lora_A.weight, self.lora_B.weight]

    def delta_weight(self) -> Tensor:
        return self.scaling * (self.lora_B.weight.double() @ self.lora_A.weight.double())


class LoraEmbedding(LoraLayer):
    """LoRA on ``nn.Embedding``, PEFT's way: the adapter acts on the one-hot
    input, ``y = E[idx] + s · A[:, idx]ᵀ · Bᵀ`` with ``lora_embedding_A
    [r, num]`` and ``lora_embedding_B [dim, r]``. Its default init is PEFT's
    for embeddings: A zeros, B standard normal."""

    def __init__(self, base_layer: nn.Embedding, r: int = 16, alpha: float = 32,
                 dropout: float = 0.0, rslora: bool = False) -> None:
        if not isinstance(base_layer, nn.Embedding):
            raise TypeError(f"base_layer: expected an nn.Embedding, got {type(base_layer).__name__}")
        if base_layer.max_norm is not None:
            raise ValueError("base_layer: an nn.Embedding with max_norm (which renormalises its "
                             "table in place on lookup) is not supported")
        super().__init__(base_layer, r, alpha, dropout, rslora)
        W = base_layer.weight
        kw = {"device": W.device, "dtype": W.dtype}
        self.num_embeddings, self.embedding_dim = base_layer.num_embeddings, base_layer.embedding_dim
        self.lora_embedding_A = nn.Parameter(torch.empty(r, self.num_embeddings, **kw))
        self.lora_embedding_B = nn.Parameter(torch.empty(self.embedding_dim, r, **kw))
        reset_adapter_(self, "default")

    def forward(self, indices: Tensor) -> Tensor:
        base = self.base_layer
        y = base(indices)
        if self.merged:
            return y
        t = torch.nn.functional.embedding(indices, self.lora_embedding_A.T, padding_idx=base.padding_idx,
                                          scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)
        return y + self.scaling * (t @ self.lora_embedding_B.T)

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [self.lora_embedding_A, self.lora_embedding_B]

    def delta_weight(self) -> Tensor:  # [num, dim], the table's layout
        return self.scaling * (self.lora_embedding_B.double() @ self.lora_embedding_A.double()).T


class LoraConv2d(LoraLayer):
    """LoRA on ``nn.Conv2d`` (groups = 1), PEFT's way: ``lora_A`` is a conv
    with the base's kernel, stride, padding and dilation and r output
    channels, ``lora_B`` a 1×1 conv from r channels to the base's outputs."""

    def __init__(self, base_layer: nn.Conv2d, r: int = 16, alpha: float = 32, dropout: float = 0.0,
                 rslora: bool = False) -> None:
        if not isinstance(base_layer, nn.Conv2d):
            raise TypeError(f"base_layer: expected an nn.Conv2d, got {type(base_layer).__name__}")
        if base_layer.groups != 1:
            raise ValueError(f"base_layer: only convolutions with groups=1 get LoRA adapters, got "
                             f"groups={base_layer.groups}")
        super().__init__(base_layer, r, alpha, dropout, rslora)
        W = base_layer.weight
        kw = {"device": W.device, "dtype": W.dtype}
        b = base_layer
        self.in_channels, self.out_channels = b.in_channels, b.out_channels
        self.lora_A = nn.Conv2d(b.in_channels, r, b.kernel_size, b.stride, b.padding, b.dilation,
                                bias=False, padding_mode=b.padding_mode, **kw)
        self.lora_B = nn.Conv2d(r, b.out_channels, 1, bias=False, **kw)
        reset_adapter_(self, "default")

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        if self.training and self.lora_dropout > 0.0:
            x = torch.nn.functional.dropout(x, self.lora_dropout, training=True)
        return y + self.scaling * self.lora_B(self.lora_A(x))

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [self.lora_A.weight, self.lora_B.weight]

    def delta_weight(self) -> Tensor:  # [out, in, kh, kw]
        B = self.lora_B.weight.double()[:, :, 0, 0]
        return self.scaling * torch.einsum("or,rihw->oihw", B, self.lora_A.weight.double())


_WRAPPERS = ((FactorizedLinear, LoraLinear), (nn.Linear, LoraLinear),
             (nn.Embedding, LoraEmbedding), (nn.Conv2d, LoraConv2d))


def _wrapper_for(module: nn.Module):
    for kind, wrapper in _WRAPPERS:
        if isinstance(module, kind):
            return wrapper
    return None


def _a_parameter(module: nn.Module) -> Tensor:
    return next(iter(module.parameters()))


# --------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------
def reset_adapter_(layer: LoraLayer, init: str = "default") -> None:
    """(Re)initialises ``layer``'s adapter in place.

    ``"default"``: PEFT's: A Kaiming-uniform (``a = √5``, nn.Linear's), B
    zeros; embeddings: A zeros, B standard normal. ``"gaussian"``: PEFT's: A
    ~ N(0, σ = 1/r), B zeros (embeddings: as "default"). ``"pissa"`` and
    ``"olora"`` (linear layers with a dense or low-rank base) also change the
    base: see :func:`_pissa_` and :func:`_olora_`. All adapters but PiSSA's
    and OLoRA's start at ``B·A = 0``, so the layer's output is the base's.
    PiSSA and OLoRA rewrite the base for good: apply them once, to a layer
    fresh from its original weights (as :func:`add_lora` does).
    """
    if init not in INITS:
        raise ValueError(f"init: expected one of {list(INITS)}, got {init!r}")
    with torch.no_grad():
        if init in ("pissa", "olora"):
            (_pissa_ if init == "pissa" else _olora_)(layer)
        elif isinstance(layer, LoraEmbedding):
            nn.init.zeros_(layer.lora_embedding_A)
            nn.init.normal_(layer.lora_embedding_B)
        else:
            if init == "default":
                nn.init.kaiming_uniform_(layer.lora_A.weight, a=math.sqrt(5))
            else:
                nn.init.normal_(layer.lora_A.weight, std=1.0 / layer.r)
            nn.init.zeros_(layer.lora_B.weight)
    layer.init = init


def _weight_init_base(layer: LoraLayer, init: str) -> str:
    """'dense' or 'lowrank': the bases PiSSA and OLoRA can rewrite."""
    if not isinstance(layer, LoraLinear):
        raise ValueError(f"init: {init!r} is for linear layers only, got a "
                         f"{type(layer.base_layer).__name__}")
    base = layer.base_layer
    if isinstance(base, nn.Linear):
        kind = "dense"
    elif base.factorization == "lowrank":
        kind = "lowrank"
    else:
        raise ValueError(f"init: {init!r} needs a dense or low-rank base (the base keeps the "
                         f"residual of the weight), got factorization={base.factorization!r}")
    if kind == "dense":
        limit, what = min(layer.in_features, layer.out_features), "r <= min(in, out)"
    elif init == "olora":
        limit, what = base.rank, "r <= the base's rank"
    else:  # the residual keeps rank rb - r >= 1
        limit, what = base.rank - 1, "r < the base's rank"
    if layer.r > limit:
        raise ValueError(f"r: {init!r} on this base needs {what} ({limit}), got r = {layer.r}")
    return kind


def _factor_svd(U: Tensor, V: Tensor):
    """``U·V = L · diag(S) · Rh`` (the SVD of a product of thin factors) from
    the QR of both factors and the SVD of the small core ``Ru·Rvᵀ``, float64:
    O((out + in)·q²) instead of the dense weight's O(out·in·min)."""
    Qu, Ru = torch.linalg.qr(U.double())
    Qv, Rv = torch.linalg.qr(V.double().T)
    P, S, Qh = torch.linalg.svd(Ru @ Rv.T)
    return Qu @ P, S, Qh @ Qv.T


def _set_lowrank_factors(base: FactorizedLinear, U: Tensor, V: Tensor) -> None:
    """Replaces a low-rank layer's factors, keeping its Parameter object (the
    rank may change)."""
    base.set_factors(*LowRank.from_factors(U.to(base.factors.dtype), V.to(base.factors.dtype)))


def _pissa_(layer: LoraLinear) -> None:
    """PiSSA (Meng et al. 2024): the adapter takes the top-r singular triplets
    of W, ``B = U_r·√(S_r/s)``, ``A = √(S_r/s)·V_rᵀ`` (so ``s·B·A = U_r S_r V_rᵀ``);
    the base keeps the residual. A dense W is decomposed directly (factorch's
    LAPACK SVD); a low-rank base ``W = U·V`` through its factors, and keeps the
    other rb - r triplets as its factors (its rank becomes rb - r)."""
    kind = _weight_init_base(layer, "pissa")
    base, r, s = layer.base_layer, layer.r, layer.scaling
    if kind == "dense":
        res = D.svd(base.weight.detach().double(), r)
        L, S, Rh = res.U, res.S, res.Vh
    else:
        L, S, Rh = _factor_svd(base.U.detach(), base.V.detach())
    root = (S[:r] / s).sqrt()
    B, A = L[:, :r] * root, root[:, None] * Rh[:r]
    layer.lora_B.weight.copy_(B)
    layer.lora_A.weight.copy_(A)
    if kind == "dense":
        base.weight.copy_(base.weight.double() - s * (B @ A))
    else:
        rest = S[r:].sqrt()
        _set_lowrank_factors(base, L[:, r:] * rest, rest[:, None] * Rh[r:])
    _keep_init(layer)


def _olora_(layer: LoraLinear) -> None:
    """OLoRA (Büyükakyüz 2024): ``W = Q·R``; the adapter takes ``B = Q_r``
    (the first r orthonormal columns) and ``A = R_r`` (the first r rows of R);
    the base keeps ``W - s·Q_r·R_r``. A low-rank base ``W = U·V`` gets the QR
    through its factors: ``U = Qu·Ru``, ``Ru·V = Qm·Rm``, so ``W = (Qu·Qm)·Rm``;
    it keeps rank rb with the first r rows of Rm scaled by ``1 - s``."""
    kind = _weight_init_base(layer, "olora")
    base, r, s = layer.base_layer, layer.r, layer.scaling
    if kind == "dense":
        Q, R = torch.linalg.qr(base.weight.detach().double())
    else:
        Qu, Ru = torch.linalg.qr(base.U.detach().double())
        Qm, R = torch.linalg.qr(Ru @ base.V.detach().double())
        Q = Qu @ Qm
    B, A = Q[:, :r], R[:r]
    layer.lora_B.weight.copy_(B)
    layer.lora_A.weight.copy_(A)
    if kind == "dense":
        base.weight.copy_(base.weight.double() - s * (B @ A))
    else:
        R = R.clone()
        R[:r] *= 1.0 - s
        _set_lowrank_factors(base, Q, R)
    _keep_init(layer)


def _keep_init(layer: LoraLinear) -> None:
    """PiSSA and OLoRA change the base: the initial adapter is kept (buffers
    ``lora_A_init`` / ``lora_B_init``, in the state_dict) so that
    :func:`save_adapter` can write the change relative to the ORIGINAL weight,
    which a PEFT model built on the original dense model needs."""
    layer.register_buffer("lora_A_init", layer.lora_A.weight.detach().clone())
    layer.register_buffer("lora_B_init", layer.lora_B.weight.detach().clone())


# --------------------------------------------------------------------------
# add_lora
# --------------------------------------------------------------------------
def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    """The (name, wrapper) pairs of ``model``'s LoRA layers."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def _output_layers(model: nn.Module) -> set[int]:
    """ids of the modules the default targets leave out: a module named
    ``lm_head``, the model's output embeddings (transformers'
    ``get_output_embeddings()``), and any linear layer whose weight is shared
    with another module (a head tied to the input embeddings)."""
    out = set()
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        head = getter()
        if isinstance(head, nn.Module):
            out.add(id(head))
    owners: dict[int, set] = {}  # parameter -> the distinct modules holding it
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(id(m))
    for name, m in model.named_modules():
        if name.rpartition(".")[2] == "lm_head":
            out.add(id(m))
        w = getattr(m, "weight", None)
        if isinstance(m, nn.Linear) and isinstance(w, nn.Parameter) and len(owners[id(w)]) > 1:
            out.add(id(m))
    return out


def _select(model: nn.Module, targets, exclude) -> list[tuple[str, nn.Module]]:
    _check_patterns("targets", targets)
    _check_patterns("exclude", exclude)
    if targets is None or targets == "all-linear":
        skip = _output_layers(model)
        chosen = [(n, m) for n, m in model.named_modules()
                  if isinstance(m, (nn.Linear, FactorizedLinear)) and id(m) not in skip]
    else:
        chosen = []
        for name, m in model.named_modules():
            if not name or not _matches(name, targets):
                continue
            if _wrapper_for(m) is not None:
                chosen.append((name, m))
            elif not any(True for _ in m.children()):  # a leaf of a kind without an adapter
                raise ValueError(f"targets: matched {name!r}, a {type(m).__name__}; LoRA adapters "
                                 "exist for nn.Linear, FactorizedLinear, nn.Embedding, nn.Conv2d")
    if exclude is not None:
        chosen = [(n, m) for n, m in chosen if not _matches(n, exclude)]
    if not chosen:
        raise ValueError(f"targets: {targets!r} matched no nn.Linear, FactorizedLinear, "
                         "nn.Embedding or nn.Conv2d of model" if targets is not None
                         else "model: has no nn.Linear or FactorizedLinear outside the output layer")
    return chosen


def _pattern_value(patterns: dict | None, name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key K (a regex)
    such that the whole name matches ``(.*\\.)?(K)``, else ``default``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _check_pattern_dict(arg: str, patterns) -> None:
    if patterns is None:
        return
    if not isinstance(patterns, dict):
        raise TypeError(f"{arg}: expected a dict of regex -> value, got {type(patterns).__name__}")
    for key in patterns:
        try:
            re.compile(key)
        except (re.error, TypeError) as e:
            raise ValueError(f"{arg}: {key!r} is not a valid regular expression: {e}") from None


def add_lora(model: nn.Module, r: int = 16, alpha: float = 32, dropout: float = 0.0, targets=None,
             init: str = "default", rslora: bool = False, rank_pattern: dict | None = None,
             alpha_pattern: dict | None = None, exclude=None, freeze_base: bool = True) -> nn.Module:
    """Wraps the target layers of ``model`` in LoRA layers, in place, and
    returns the model (or the wrapper, when ``model`` itself is the target).

    Args:
        r, alpha: the adapters' rank and alpha; the scale is ``alpha / r``, or
            ``alpha / √r`` with ``rslora=True``.
        dropout: dropout probability on the adapters' input while training.
        targets: a regex matched against the whole module name, or a list of
            name suffixes (PEFT's ``target_modules``; the matcher of
            :func:`factorch.select_targets`). Default (or ``"all-linear"``):
            every ``nn.Linear`` and ``FactorizedLinear`` except the output
            layer (named ``lm_head``, transformers' output embeddings, or a
            linear layer whose weight is tied to another module). A matched
            ``nn.Linear``, ``FactorizedLinear``, ``nn.Embedding`` or
            ``nn.Conv2d`` gets an adapter; a matched container is passed
            over; any other matched layer is an error.
        init: ``"default"``, ``"gaussian"``, ``"pissa"`` or ``"olora"`` (see
            :func:`reset_adapter_`).
        rank_pattern, alpha_pattern: ``{regex: r}`` / ``{regex: alpha}``
            overriding r / alpha per layer, matched as PEFT does (the name
            ends with a match of the regex, at a dot).
        exclude: names (same forms as ``targets``) to leave out.
        freeze_base: True: every parameter of the model but the adapters' gets
            ``requires_grad = False``.
    """
    if lora_layers(model):
        raise ValueError("model: already has LoRA layers (merge_and_unload or unload them first)")
    if init not in INITS:
        raise ValueError(f"init: expected one of {list(INITS)}, got {init!r}")
    _check_pattern_dict("rank_pattern", rank_pattern)
    _check_pattern_dict("alpha_pattern", alpha_pattern)
    chosen = _select(model, targets, exclude)
    wrappers = []
    for name, m in chosen:
        ri = _pattern_value(rank_pattern, name, r)
        ai = _pattern_value(alpha_pattern, name, alpha)
        w = _wrapper_for(m)(m, r=ri, alpha=ai, dropout=dropout, rslora=rslora)
        if init != "default":
            reset_adapter_(w, init)
        wrappers.append((name, w))
    for name, w in wrappers:
        if name:
            _set_module(model, name, w)
        else:
            model = w
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
        for _, w in wrappers:
            for p in w.adapter_parameters():
                p.requires_grad_(True)
    return model


# --------------------------------------------------------------------------
# Merging
# --------------------------------------------------------------------------
def _merge_plan(layer: LoraLayer, rank, to_dense: bool) -> str:
    """How ``layer`` merges: 'dense' (W += s·B·A), 'extend' (low-rank base,
    factors extended), 'truncate' (extended, then re-truncated to ``rank``),
    'to_dense' (a factorized base replaced by its dense nn.Linear first)."""
    base = layer.base_layer
    if not isinstance(base, FactorizedLinear):
        return "dense"
    if to_dense:
        return "to_dense"
    if base.factorization != "lowrank":
        raise ValueError(
            f"merge: a {base.factorization!r} base cannot take a LoRA adapter exactly (its "
            "factorization would change kind); merge(model, to_dense=True) merges into its dense "
            "weight (an nn.Linear)")
    if rank is None:
        return "extend"
    limit = min(base.rank + layer.r, base.in_features, base.out_features)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
        raise ValueError(f"rank: expected an int in [1, {limit}] (the base rank plus r, at most "
                         f"min(in, out)), got {rank!r}")
    return "truncate"


def merge(model: nn.Module, rank: int | None = None, to_dense: bool = False,
          keep_original: bool = False) -> nn.Module:
    """Folds every LoRA adapter of ``model`` into its base layer; the forward
    then runs the bases alone. Returns ``model``.

    - dense bases (nn.Linear, nn.Embedding, nn.Conv2d): ``W += s·B·A``
      (computed in float64, added in W's dtype). :func:`unmerge` subtracts it
      again, which gives W back up to one rounding of W's dtype per entry
      (``|ΔW|·ε``); ``keep_original=True`` keeps a copy of W instead, so
      unmerge restores it bit for bit.
    - low-rank bases ``W = U·V`` (rank rb): exactly, by extending the factors,
      ``U' = [U, s·B]``, ``V' = [V; A]`` (the layer's rank becomes rb + r);
      unmerge slices them back, bit for bit. ``rank=k``: then re-truncated
      optimally to rank k (QR of both factors, SVD of the (rb+r)² core, the
      top k kept: the best rank-k approximation of the merged weight); the
      original factors are kept for unmerge.
    - cp / tucker / tt bases cannot take an adapter exactly: an error, unless
      ``to_dense=True``, which replaces every factorized base by its dense
      ``nn.Linear`` (``to_linear()``) and merges into it; unmerge puts the
      original factorized module back.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model: has no LoRA layers")
    if rank is not None and to_dense:
        raise ValueError("rank: re-truncates a low-rank base; not with to_dense=True")
    for name, layer in layers:
        if layer.merged:
            raise ValueError(f"model: {name or 'the model'} is already merged (unmerge first)")
    plans = [_merge_plan(layer, rank, to_dense) for _, layer in layers]  # all checked first
    with torch.no_grad():
        for (_, layer), plan in zip(layers, plans):
            _merge_layer(layer, plan, rank, keep_original)
    return model


def _merge_layer(layer: LoraLayer, plan: str, rank, keep_original: bool) -> None:
    state = {"plan": plan}
    if plan == "to_dense":
        old = state["base"] = layer.base_layer
        dense = old.to_linear()
        frozen = not any(p.requires_grad for n, p in old.named_parameters() if n != "bias")
        dense.weight.requires_grad_(not frozen)
        if old.bias is not None:
            dense.bias.requires_grad_(old.bias.requires_grad)
        layer.base_layer = dense
        plan = "dense"
    if plan == "dense":
        W = layer.base_layer.weight
        if keep_original:
            state["weight"] = W.detach().clone()
        W.add_(layer.delta_weight().to(W.dtype))
    else:
        base = layer.base_layer
        U, V = base.U.detach(), base.V.detach()
        sB, A = layer.scaling * layer.lora_B.weight.double(), layer.lora_A.weight.detach()
        state["rank"] = base.rank
        if plan == "extend":
            _set_lowrank_factors(base, torch.cat([U, sB.to(U.dtype)], 1), torch.cat([V, A], 0))
        else:
            state["U"], state["V"] = U.clone(), V.clone()
            L, S, Rh = _factor_svd(torch.cat([U.double(), sB], 1), torch.cat([V, A], 0))
            root = S[:rank].sqrt()
            _set_lowrank_factors(base, L[:, :rank] * root, root[:, None] * Rh[:rank])
    layer._unmerge_state = state
    layer.merged = True


def unmerge(model: nn.Module) -> nn.Module:
    """Undoes :func:`merge` on every merged LoRA layer of ``model`` (see
    there for what comes back bit for bit). Returns ``model``."""
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if not layer.merged:
                continue
            state = layer._unmerge_state or {"plan": "dense"}
            plan = state["plan"]
            if plan in ("dense", "to_dense"):
                if plan == "to_dense":
                    layer.base_layer = state["base"]
                elif "weight" in state:
                    layer.base_layer.weight.copy_(state["weight"])
                else:
                    W = layer.base_layer.weight
                    W.sub_(layer.delta_weight().to(W.dtype))
            else:
                base = layer.base_layer
                if plan == "extend":
                    rb = state["rank"]
                    _set_lowrank_factors(base, base.U[:, :rb].clone(), base.V[:rb].clone())
                else:
                    _set_lowrank_factors(base, state["U"], state["V"])
            layer._unmerge_state = None
            layer.merged = False
    return model


def merge_and_unload(model: nn.Module, rank: int | None = None,
                     to_dense: bool = False) -> nn.Module:
    """:func:`merge`, then every LoRA layer replaced by its (merged) base
    module. Returns the model (the base module when ``model`` was a LoRA
    layer itself). The bases keep the requires_grad they had."""
    merge(model, rank=rank, to_dense=to_dense)
    return _unwrap(model)


def unload(model: nn.Module) -> nn.Module:
    """Every LoRA layer replaced by its base module, the adapters dropped
    (merged ones are unmerged first)."""
    unmerge(model)
    return _unwrap(model)


def _unwrap(model: nn.Module) -> nn.Module:
    if isinstance(model, LoraLayer):
        return model.base_layer
    for name, layer in lora_layers(model):
        _set_module(model, name, layer.base_layer)
    return model


# --------------------------------------------------------------------------
# PEFT's adapter format
# --------------------------------------------------------------------------
def _adapter_tensors(layer: LoraLayer) -> tuple[Tensor, Tensor, int, float]:
    """(A, B, r, alpha) as PEFT's model on the ORIGINAL dense weights needs
    them: PiSSA / OLoRA adapters, whose base holds ``W - s·B0·A0``, become the
    rank-2r adapter ``[B, B0]·[A; -A0]`` (same scale), PEFT's own conversion."""
    if isinstance(layer, LoraEmbedding):
        return layer.lora_embedding_A, layer.lora_embedding_B, layer.r, layer.lora_alpha
    A, B = layer.lora_A.weight, layer.lora_B.weight
    if not hasattr(layer, "lora_A_init"):
        return A, B, layer.r, layer.lora_alpha
    r2 = 2 * layer.r
    alpha2 = layer.scaling * (math.sqrt(r2) if layer.use_rslora else r2)
    return (torch.cat([A, -layer.lora_A_init], 0), torch.cat([B, layer.lora_B_init], 1), r2, alpha2)


def _exact(name: str) -> str:
    """A rank_pattern / alpha_pattern key that PEFT's lookup (the name ends
    with ``(.*\\.)?(KEY)$``) matches for module ``name`` alone: the ``^``
    fails wherever the optional prefix took part of the name."""
    return "^" + re.escape(name)


def save_adapter(model: nn.Module, directory) -> None:
    """Writes ``model``'s adapters in PEFT's format: ``adapter_model.safetensors``
    (keys ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``;
    embeddings ``lora_embedding_A`` / ``lora_embedding_B``) and
    ``adapter_config.json`` (a LoRA config naming exactly these modules, with
    per-module ranks and alphas in rank_pattern / alpha_pattern).

    ``peft.PeftModel.from_pretrained(dense_model, directory)`` then gives the
    outputs this model gives on the same dense weights (a factorized base's
    dense equivalent). PiSSA / OLoRA adapters are written relative to the
    original weights (as rank 2r, see :func:`_adapter_tensors`)."""
    from safetensors.torch import save_file

    layers = lora_layers(model)
    if not layers:
        raise ValueError("model: has no LoRA layers")
    tensors, ranks, alphas = {}, {}, {}
    for name, layer in layers:
        if not name:
            raise ValueError("model: is a LoRA layer itself; PEFT's keys name layers inside a "
                             "model (save the model that holds it)")
        if layer.merged:
            raise ValueError(f"model: {name} is merged; unmerge it before saving the adapter")
        if isinstance(layer, LoraConv2d):
            b = layer.base_layer
            if b.dilation != (1, 1) or b.padding_mode != "zeros":
                raise ValueError(f"model: {name}: PEFT's conv adapter has no dilation and zero "
                                 "padding; this one cannot be written in its format")
        A, B, r, alpha = _adapter_tensors(layer)
        key = PEFT_PREFIX + name + "."
        if isinstance(layer, LoraEmbedding):
            tensors[key + "lora_embedding_A"], tensors[key + "lora_embedding_B"] = A, B
        else:
            tensors[key + "lora_A.weight"], tensors[key + "lora_B.weight"] = A, B
        ranks[name], alphas[name] = r, alpha
    r0 = Counter(ranks.values()).most_common(1)[0][0]
    a0 = Counter(alphas.values()).most_common(1)[0][0]
    rslora = {layer.use_rslora for _, layer in layers}
    if len(rslora) > 1:
        raise ValueError("model: mixes rsLoRA and plain LoRA scales, which one PEFT config "
                         "cannot describe")
    dropouts = {layer.lora_dropout for _, layer in layers}
    config = {
        "peft_type": "LORA",
        "r": r0,
        "lora_alpha": a0,
        "target_modules": "|".join(re.escape(n) for n, _ in layers),
        "rank_pattern": {_exact(n): v for n, v in ranks.items() if v != r0},
        "alpha_pattern": {_exact(n): v for n, v in alphas.items() if v != a0},
        "use_rslora": rslora.pop(),
        "lora_dropout": max(dropouts),
        "bias": "none",
        "lora_bias": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "task_type": None,
        "base_model_name_or_path": None,
        "inference_mode": True,
    }
    os.makedirs(directory, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
              os.path.join(directory, ADAPTER_WEIGHTS))
    with open(os.path.join(directory, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2)


# Config fields load_adapter does not implement, with the values that mean
# "not used".
_UNSUPPORTED = {
    "use_dora": (False, None),
    "lora_bias": (False, None),
    "fan_in_fan_out": (False, None),
    "modules_to_save": (None, []),
    "layers_to_transform": (None, []),
    "target_parameters": (None, []),
    "trainable_token_indices": (None, {}, []),
    "layer_replication": (None, []),
    "use_qalora": (False, None),
    "alora_invocation_tokens": (None,),
    "arrow_config": (None,),
    "monteclora_config": (None,),
    "velora_config": (None,),
    "kasa_config": (None,),
    "use_bdlora": (None, False),
}


def load_adapter(model: nn.Module, directory, freeze_base: bool = True) -> nn.Module:
    """Loads a LoRA adapter saved by PEFT (``save_pretrained``) or by
    :func:`save_adapter` into ``model``: wraps the modules its config targets
    as :func:`add_lora` would (its r, lora_alpha, use_rslora, rank_pattern,
    alpha_pattern, target_modules as a list or a regex, exclude_modules,
    lora_dropout) and copies the adapter weights in. Returns the model (the
    wrapper when ``model`` itself is the one target).

    DoRA, lora_bias, fan_in_fan_out, modules_to_save, layers_to_transform and
    the other variants raise a ValueError naming the field; so do adapter
    tensors the model has no place for, or places left without a tensor."""
    from safetensors.torch import load_file

    path_cfg = os.path.join(directory, ADAPTER_CONFIG)
    path_w = os.path.join(directory, ADAPTER_WEIGHTS)
    for p in (path_cfg, path_w):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"directory: {p} not found")
    with open(path_cfg) as f:
        cfg = json.load(f)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{ADAPTER_CONFIG}: peft_type {cfg.get('peft_type')!r}, expected 'LORA'")
    for field, unused in _UNSUPPORTED.items():
        if field in cfg and cfg[field] not in unused:
            raise ValueError(f"{ADAPTER_CONFIG}: {field} = {cfg[field]!r} is not supported")
    flags = [(p, p.requires_grad) for p in model.parameters()]
    targets = cfg.get("target_modules")
    if isinstance(targets, (list, tuple, set)):
        targets = list(targets)
    model = add_lora(model, r=cfg.get("r", 8), alpha=cfg.get("lora_alpha", 8),
                     dropout=cfg.get("lora_dropout", 0.0), targets=targets,
                     rslora=cfg.get("use_rslora", False), rank_pattern=cfg.get("rank_pattern"),
                     alpha_pattern=cfg.get("alpha_pattern"), exclude=cfg.get("exclude_modules"),
                     freeze_base=freeze_base)
    try:
        _copy_adapter_tensors(model, load_file(path_w))
    except Exception:
        model = unload(model)  # the model as it came
        for p, flag in flags:
            p.requires_grad_(flag)
        raise
    return model


def _copy_adapter_tensors(model: nn.Module, saved: dict) -> None:
    places = {}
    for name, layer in lora_layers(model):
        for attr, p in zip(("lora_embedding_A", "lora_embedding_B") if isinstance(layer, LoraEmbedding)
                           else ("lora_A.weight", "lora_B.weight"), layer.adapter_parameters()):
            places[PEFT_PREFIX + (name + "." if name else "") + attr] = p
    extra = sorted(set(saved) - set(places))
    missing = sorted(set(places) - set(saved))
    if extra or missing:
        raise ValueError(f"{ADAPTER_WEIGHTS}: does not fit the model: "
                         + (f"tensors without a layer: {extra[:5]}" if extra else "")
                         + ("; " if extra and missing else "")
                         + (f"layers without tensors: {missing[:5]}" if missing else ""))
    with torch.no_grad():
        for key, p in places.items():
            t = saved[key]
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"{ADAPTER_WEIGHTS}: {key} has shape {list(t.shape)}, the layer "
                                 f"expects {list(p.shape)}")
            p.copy_(t)
