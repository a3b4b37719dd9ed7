"""FactorizedConv*.from_conv: factorize a trained convolution's kernel with
factorch's C decompositions (float64), group by group, into the stage
weights of factorch/_conv_layout.py."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import decompose as D
from .._conv_layout import FACTORIZATIONS, resolve_rank
from .._rank import check_one_rank_rule, rank_for_energy
from ..factorizations import LowRank
from ._common import warn_past_break_even


def _unfold_rank(W: Tensor, mode: int, energy: float) -> int:
    """Rank keeping `energy` of the squared singular values of W's mode unfolding."""
    m = W.movedim(mode, 0).reshape(W.shape[mode], -1)
    return rank_for_energy(D.svd(m).S, energy)


def _check_one(rank, ratio, energy):
    check_one_rank_rule(rank, ratio, energy)
    for name, v in (("ratio", ratio), ("energy", energy)):
        if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool)
                                  and 0 < v <= 1):
            raise ValueError(f"{name}: expected a fraction in (0, 1], got {v!r}")


def from_conv(cls, conv, factorization, rank, ratio, energy, tensorized_shape):
    """Builds cls (FactorizedConv1d/2d) computing `conv` approximately."""
    nd = cls._nd
    want = nn.Conv1d if nd == 1 else nn.Conv2d
    if not isinstance(conv, want):
        raise TypeError(f"conv: expected an {want.__name__}, got {type(conv).__name__}")
    if factorization not in FACTORIZATIONS:
        raise ValueError(
            f"factorization: expected one of {list(FACTORIZATIONS)}, got {factorization!r}"
        )
    _check_one(rank, ratio, energy)
    if energy is not None and factorization == "cp":
        raise ValueError("energy: not defined for factorization='cp'; give rank or ratio")
    W = conv.weight.detach()
    if not torch.isfinite(W).all():
        raise ValueError("conv.weight: expected finite values, found NaN or Inf")
    opts = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
                device=W.device, dtype=W.dtype)
    g, co, ci = conv.groups, conv.out_channels, conv.in_channels
    cog, cig = co // g, ci // g
    W4 = W.double().cpu().reshape(co, cig, *((1,) if nd == 1 else ()), *W.shape[2:])
    kh, kw = W4.shape[2], W4.shape[3]
    groups = [W4[i * cog:(i + 1) * cog] for i in range(g)]
    # A probe layer (any rank) gives the geometry the rank rules need.
    probe = cls(ci, co, conv.kernel_size, factorization=factorization, rank=1,
                tensorized_shape=tensorized_shape, **{**opts, "device": "meta"})
    geom, ins, outs = probe._geom, probe._layout.in_modes, probe._layout.out_modes
    f = factorization
    if f == "lowrank":
        if energy is not None:
            r = max(rank_for_energy(D.svd(Wg.reshape(cog, -1)).S, energy) for Wg in groups)
        else:
            r = resolve_rank(f, float(ratio) if ratio is not None else rank, geom)
        pieces = [[], []]
        for Wg in groups:
            fac, flat, _ = LowRank.from_dense(Wg.reshape(cog, -1), rank=r)
            U, V = fac.split(flat)
            pieces[0].append(V.reshape(r, cig, kh, kw))
            pieces[1].append(U.reshape(cog, r, 1, 1))
        ranks = r
    elif f == "tucker":
        if energy is not None:
            r1 = max(_unfold_rank(Wg, 1, energy) for Wg in groups)
            r2 = max(_unfold_rank(Wg, 0, energy) for Wg in groups)
            ranks = (r1, r2)
        else:
            ranks = resolve_rank(f, float(ratio) if ratio is not None else rank, geom)
        r1, r2 = ranks
        pieces = [[], [], []]
        for Wg in groups:
            res = D.tucker(Wg, rank=[r2, r1, kh, kw])
            Uo, Ui, Fh, Fw = (torch.as_tensor(u) for u in res.factors)
            # The spatial factors are square (full rank): fold them into the core.
            core = torch.einsum("abij,hi,wj->abhw", torch.as_tensor(res.core), Fh, Fw)
            pieces[0].append(Ui.T.reshape(r1, cig, 1, 1))
            pieces[1].append(core)
            pieces[2].append(Uo.reshape(cog, r2, 1, 1))
    elif f == "cp":
        r = resolve_rank(f, float(ratio) if ratio is not None else rank, geom)
        height = geom.has_height
        pieces = [[], [], [], []] if height else [[], [], []]
        for Wg in groups:
            t = Wg if height else Wg[:, :, 0]
            # ALS stalls in flat stretches; a few hundred sweeps are cheap here.
            res = D.cp(t, r, n_iter_max=500, tol=1e-10, normalize_factors=False)
            lam = torch.as_tensor(res.weights)
            fs = [torch.as_tensor(a) for a in res.factors]
            pieces[0].append(fs[1].T.reshape(r, cig, 1, 1))
            if height:
                pieces[1].append(fs[2].T.reshape(r, 1, kh, 1))
            pieces[-2].append(fs[-1].T.reshape(r, 1, 1, kw))
            pieces[-1].append((fs[0] * lam).reshape(cog, r, 1, 1))
        ranks = r
    else:
        d = len(ins)
        # T[(i_1 o_1), .., (i_d o_d), (kh kw)]: a TT whose last core is the spatial one.
        T = W4.reshape(*outs, *ins, kh * kw)
        T = T.permute(*[p for k in range(d) for p in (d + k, k)], 2 * d)
        T = T.reshape(*[i * o for i, o in zip(ins, outs)], kh * kw)
        if energy is not None:
            res = D.tensor_train(T, eps=math.sqrt(1.0 - energy))
        else:
            r = resolve_rank(f, float(ratio) if ratio is not None else rank, geom, ins, outs)
            res = D.tensor_train(T, rank=[1, *r, 1])
        cores = [torch.as_tensor(c) for c in res.factors]
        ranks = tuple(int(c.shape[2]) for c in cores[:-1])  # r_1 .. r_d
        pieces = [[cores[-1].reshape(ranks[-1], 1, kh, kw)]]
        for k in range(d - 1, -1, -1):
            c = cores[k].reshape(cores[k].shape[0], ins[k], outs[k], cores[k].shape[2])
            pieces.append([c.permute(0, 2, 1, 3).reshape(-1, ins[k] * c.shape[3], 1, 1)])
    layer = cls(ci, co, conv.kernel_size, factorization=f, rank=ranks,
                tensorized_shape=tensorized_shape if f == "tt" else None, **opts)
    with torch.no_grad():
        for view, parts in zip(layer.weights, pieces):
            view.copy_(torch.cat(parts, 0).reshape(view.shape))
        if conv.bias is not None:
            layer.bias.copy_(conv.bias)
        dense = W4.reshape(W.shape)
        err = torch.linalg.vector_norm(layer.dense_weight().double().cpu() - dense)
        total = torch.linalg.vector_norm(dense)
    layer.reconstruction_error = (err / total).item() if total > 0 else 0.0
    warn_past_break_even(f"{f!r} convolution", energy, layer.rank, layer.factors.numel(),
                         W.numel(), stacklevel=4)
    return layer
