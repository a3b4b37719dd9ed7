"""How each factorized convolution is laid out as a chain of convolution
stages (the C op ``factorch::conv_chain``, ops/conv_chain.c): the factors'
shapes in the flat parameter, the stage list for an input size, the ranks
for a parameter budget, the initialisation and the dense reconstruction.

Per group of channels (``groups`` > 1 factorizes each group's weight on its
own; R is the rank per group, g the number of groups, Cig = C_in / g,
Cog = C_out / g, kk = kh·kw):

- ``lowrank``: ``[g·R, Cig, kh, kw]`` (kh x kw conv C_in -> g·R, stride,
  padding, dilation) then ``[C_out, R, 1, 1]`` (1x1 g·R -> C_out);
  W_g = U_g · V_g, the truncated SVD of W_g reshaped to [Cog, Cig·kk].
- ``tucker`` (Tucker-2): ``[g·R1, Cig, 1, 1]``, core ``[g·R2, R1, kh, kw]``,
  ``[C_out, R2, 1, 1]``: W_g = core_g ×_out U_out ×_in U_in.
- ``cp``: ``[g·R, Cig, 1, 1]``, depthwise ``[g·R, 1, kh, 1]`` (the height
  filter, carrying stride/padding/dilation of the height) and
  ``[g·R, 1, 1, kw]`` (the width's), ``[C_out, R, 1, 1]``:
  W[o, c, i, j] = Σ_r U_out[o, r]·K_h[r, i]·K_w[r, j]·U_in[r, c].
- ``tt`` (groups = 1): C_in = ∏ i_k and C_out = ∏ o_k (d modes each);
  the spatial core ``[r_d, 1, kh, kw]`` runs on every input channel alone,
  then one 1x1 stage per TT core, last core first, core k stored as
  ``[r_(k-1)·o_k, i_k·r_k, 1, 1]`` (r_0 = 1, r_d the spatial rank):
  W[(o), (i), kh, kw] = Σ G_1[:, i_1, o_1, :] ··· G_d[:, i_d, o_d, :]·K[:, kh, kw].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ._ops import STAGE_INTS
from ._tensorized import check_tensorized_shape, is_int

FACTORIZATIONS = ("lowrank", "tucker", "cp", "tt")


@dataclass(frozen=True)
class ConvGeometry:
    """A convolution's options, per axis (height, width); a 1-D convolution
    has height 1 and its kernel, stride, padding and dilation 1, 1, (0, 0), 1
    on that axis. pads: ((top, bottom), (left, right)) applied by the op (0
    when padding_mode is not "zeros": the module pads with F.pad first)."""

    in_channels: int
    out_channels: int
    kernel: tuple
    stride: tuple
    pads: tuple
    dilation: tuple
    groups: int

    @property
    def kk(self) -> int:
        return self.kernel[0] * self.kernel[1]

    @property
    def has_height(self) -> bool:
        """False for 1-D convolutions (and 1 x k kernels without height stride
        or padding): CP then has no height filter."""
        return not (self.kernel[0] == 1 and self.stride[0] == 1 and self.pads[0] == (0, 0))

    def out_size(self, h: int, w: int) -> tuple:
        return tuple(
            (n + p[0] + p[1] - d * (k - 1) - 1) // s + 1
            for n, p, d, k, s in zip((h, w), self.pads, self.dilation, self.kernel, self.stride)
        )


def _stage(batch, ci, h, w, co, kernel=(1, 1), stride=(1, 1), pads=((0, 0), (0, 0)),
           dilation=(1, 1), groups=1) -> list:
    return [batch, ci, h, w, co, kernel[0], kernel[1], stride[0], stride[1], pads[0][0],
            pads[1][0], pads[0][1], pads[1][1], dilation[0], dilation[1], groups]


@dataclass(frozen=True)
class ConvLayout:
    factorization: str
    geom: ConvGeometry
    rank: object  # lowrank, cp: R; tucker: (R_in, R_out); tt: (r_1, .., r_(d-1), r_d)
    in_modes: tuple = ()
    out_modes: tuple = ()

    # ---- the factors -----------------------------------------------------
    def shapes(self) -> list[tuple]:
        """Each stage's weight [out_channels, in_channels / groups, kh, kw]."""
        g, (kh, kw) = self.geom.groups, self.geom.kernel
        ci, co = self.geom.in_channels, self.geom.out_channels
        if self.factorization == "lowrank":
            r = self.rank
            return [(g * r, ci // g, kh, kw), (co, r, 1, 1)]
        if self.factorization == "tucker":
            r1, r2 = self.rank
            return [(g * r1, ci // g, 1, 1), (g * r2, r1, kh, kw), (co, r2, 1, 1)]
        if self.factorization == "cp":
            r = self.rank
            height = [(g * r, 1, kh, 1)] if self.geom.has_height else []
            return [(g * r, ci // g, 1, 1), *height, (g * r, 1, 1, kw), (co, r, 1, 1)]
        ranks = (1, *self.rank)  # r_0 .. r_d
        d = len(self.in_modes)
        shapes = [(ranks[d], 1, kh, kw)]
        for k in range(d - 1, -1, -1):  # last core first
            shapes.append((ranks[k] * self.out_modes[k], self.in_modes[k] * ranks[k + 1], 1, 1))
        return shapes

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(s) for s in self.shapes())

    def views(self, flat: Tensor) -> list[Tensor]:
        out, off = [], 0
        for s in self.shapes():
            n = math.prod(s)
            out.append(flat[off:off + n].view(s))
            off += n
        return out

    # ---- the stages for an input of h x w ---------------------------------
    def stages(self, h: int, w: int) -> tuple[list, list]:
        """(the flat int list of stages, y's per-image shape [C_out, OH, OW])."""
        G = self.geom
        g, ci, co = G.groups, G.in_channels, G.out_channels
        oh, ow = G.out_size(h, w)
        conv = {"kernel": G.kernel, "stride": G.stride, "pads": G.pads, "dilation": G.dilation}
        if self.factorization == "lowrank":
            r = self.rank
            st = [_stage(1, ci, h, w, g * r, groups=g, **conv),
                  _stage(1, g * r, oh, ow, co, groups=g)]
        elif self.factorization == "tucker":
            r1, r2 = self.rank
            st = [_stage(1, ci, h, w, g * r1, groups=g),
                  _stage(1, g * r1, h, w, g * r2, groups=g, **conv),
                  _stage(1, g * r2, oh, ow, co, groups=g)]
        elif self.factorization == "cp":
            r = g * self.rank
            (ph, pw), (sh, sw), (dh, dw), (kh, kw) = G.pads, G.stride, G.dilation, G.kernel
            height = [_stage(1, r, h, w, r, (kh, 1), (sh, 1), (ph, (0, 0)), (dh, 1), groups=r)]
            st = [_stage(1, ci, h, w, g * self.rank, groups=g),
                  *(height if G.has_height else []),
                  _stage(1, r, oh, w, r, (1, kw), (1, sw), ((0, 0), pw), (1, dw), groups=r),
                  _stage(1, r, oh, ow, co, groups=g)]
        else:
            ranks = (1, *self.rank)
            d, ins, outs = len(self.in_modes), self.in_modes, self.out_modes
            st = [_stage(ci, 1, h, w, ranks[d], **conv)]
            p = oh * ow
            for k in range(d - 1, -1, -1):
                cols = math.prod(outs[k + 1:]) * p
                st.append(_stage(math.prod(ins[:k]), ins[k] * ranks[k + 1], 1, cols,
                                 ranks[k] * outs[k]))
        flat = [v for s in st for v in s]
        assert len(flat) == STAGE_INTS * len(st)
        return flat, [co, oh, ow]

    def flops(self, h: int, w: int, batch: int = 1) -> int:
        """2 × multiply-adds of the forward for `batch` images of h x w."""
        flat, _ = self.stages(h, w)
        total = 0
        for i in range(0, len(flat), STAGE_INTS):
            b, c_in, hh, ww, c_out, kh, kw, sh, sw, pt, pl, pb, pr, dh, dw, g = flat[i:i + STAGE_INTS]
            o_h = (hh + pt + pb - dh * (kh - 1) - 1) // sh + 1
            o_w = (ww + pl + pr - dw * (kw - 1) - 1) // sw + 1
            total += 2 * b * c_out * o_h * o_w * (c_in // g) * kh * kw
        return batch * total

    # ---- initialisation and reconstruction --------------------------------
    def init_(self, flat: Tensor) -> None:
        """Uniform factors whose product has the variance of nn.Conv2d's
        default initialisation, Var(W) = 1 / (3·fan_in), fan_in = Cig·kk: each
        factor but the last keeps its stage's output at the scale of its
        input (variance 1 / its fan-in), the last one carries the 1/3 and the
        rank count (the sums over the ranks add their variances)."""
        G = self.geom
        cig, kk = G.in_channels // G.groups, G.kk
        (kh, kw) = G.kernel
        f = self.factorization
        if f == "lowrank":
            var = [1.0 / (cig * kk), 1.0 / (3 * self.rank)]
        elif f == "tucker":
            r1, r2 = self.rank
            var = [1.0 / cig, 1.0 / (r1 * kk), 1.0 / (3 * r2)]
        elif f == "cp":
            height = [1.0 / kh] if G.has_height else []
            var = [1.0 / cig, *height, 1.0 / kw, 1.0 / (3 * self.rank)]
        else:
            ranks = (1, *self.rank)
            d = len(self.in_modes)
            # Spatial core 1/kk, core k 1/(i_k·r_k): their product times the
            # r_1··r_d terms of the sum is 1/(C_in·kk); the first core adds 1/3.
            var = [1.0 / kk] + [
                (1.0 / (self.in_modes[k] * ranks[k + 1])) * (1.0 / 3 if k == 0 else 1.0)
                for k in range(d - 1, -1, -1)
            ]
        with torch.no_grad():
            for v, t in zip(var, self.views(flat)):
                b = math.sqrt(3.0 * v)
                t.uniform_(-b, b)

    def reconstruct(self, flat: Tensor) -> Tensor:
        """The dense weight [C_out, C_in / groups, kh, kw]."""
        G = self.geom
        g, co, cig = G.groups, G.out_channels, G.in_channels // G.groups
        kh, kw = G.kernel
        cog = co // g
        w = self.views(flat)
        f = self.factorization
        if f == "tt":
            ranks = (1, *self.rank)
            d = len(self.in_modes)
            # cur [(o_1..o_k), r_k, (i_1..i_k)] built from the first core on.
            cur = torch.ones(1, 1, 1, dtype=flat.dtype, device=flat.device)
            for k in range(d):
                core = w[d - k].reshape(ranks[k], self.out_modes[k], self.in_modes[k], ranks[k + 1])
                cur = torch.einsum("aqb,qoir->aorbi", cur, core)
                a, o, r, b, i = cur.shape
                cur = cur.reshape(a * o, r, b * i)
            spatial = w[0].reshape(ranks[d], kh * kw)
            return torch.einsum("orc,rk->ock", cur, spatial).reshape(co, cig, kh, kw)
        blocks = []
        for gi in range(g):
            def grp(t, rows):  # rows of group gi of a stage weight
                return t[gi * rows:(gi + 1) * rows]
            if f == "lowrank":
                r = self.rank
                V, U = grp(w[0], r).reshape(r, -1), grp(w[1], cog).reshape(cog, r)
                blocks.append((U @ V).reshape(cog, cig, kh, kw))
            elif f == "tucker":
                r1, r2 = self.rank
                Ui = grp(w[0], r1).reshape(r1, cig)
                core = grp(w[1], r2)
                Uo = grp(w[2], cog).reshape(cog, r2)
                blocks.append(torch.einsum("os,srij,rc->ocij", Uo, core, Ui))
            else:
                r = self.rank
                Ui = grp(w[0], r).reshape(r, cig)
                Kh = grp(w[1], r).reshape(r, kh) if G.has_height else Ui.new_ones(r, 1)
                Kw = grp(w[-2], r).reshape(r, kw)
                Uo = grp(w[-1], cog).reshape(cog, r)
                blocks.append(torch.einsum("or,ri,rj,rc->ocij", Uo, Kh, Kw, Ui))
        return torch.cat(blocks, 0)


# --------------------------------------------------------------------------
# Ranks
# --------------------------------------------------------------------------
def tt_modes(tensorized_shape, in_channels: int, out_channels: int) -> tuple:
    return check_tensorized_shape(tensorized_shape, in_channels, out_channels, same_length=True)


def resolve_rank(factorization: str, rank, geom: ConvGeometry, in_modes=(), out_modes=()):
    """The rank tuple of a layout from an int, a tuple, a fraction of the
    dense parameter count in (0, 1], or "same" (fraction 1.0)."""
    g, ci, co = geom.groups, geom.in_channels, geom.out_channels
    cig, cog, kk = ci // g, co // g, geom.kk
    dense = co * cig * kk
    if rank == "same":
        rank = 1.0
    if isinstance(rank, float):
        if not 0 < rank <= 1:
            raise ValueError(f"rank: expected a fraction in (0, 1], got {rank!r}")
        return _rank_for_budget(factorization, rank * dense, geom, in_modes, out_modes)
    if rank is None or isinstance(rank, bool):
        raise ValueError(f"rank: expected an int, a tuple or a fraction in (0, 1], got {rank!r}")
    f = factorization
    if f in ("lowrank", "cp"):
        if not is_int(rank) or rank < 1:
            raise ValueError(f"rank: expected a positive int or a fraction for {f}, got {rank!r}")
        if f == "lowrank" and rank > min(cig * kk, cog):
            raise ValueError(
                f"rank: expected 1 <= rank <= min(in_channels / groups · kh · kw, out_channels "
                f"/ groups) = {min(cig * kk, cog)} for lowrank, got {rank}"
            )
        return rank
    if f == "tucker":
        r = (rank, rank) if is_int(rank) else tuple(rank) if isinstance(rank, (tuple, list)) else None
        if r is None or len(r) != 2 or not all(is_int(v) and v >= 1 for v in r):
            raise ValueError(
                f"rank: expected an int or (rank_in, rank_out) of positive ints for tucker, "
                f"got {rank!r}"
            )
        if r[0] > cig or r[1] > cog:
            raise ValueError(
                f"rank: tucker ranks (rank_in, rank_out) = {r} exceed the channels per group "
                f"({cig}, {cog})"
            )
        return r
    d = len(in_modes)
    if is_int(rank):
        r = (rank,) * d
    elif isinstance(rank, (tuple, list)) and len(rank) == d and all(is_int(v) for v in rank):
        r = tuple(rank)
    else:
        raise ValueError(
            f"rank: expected an int or {d} ints (r_1, .., r_(d-1), then the spatial rank) for tt, "
            f"got {rank!r}"
        )
    if not all(v >= 1 for v in r):
        raise ValueError(f"rank: tt ranks must be >= 1, got {rank!r}")
    return r


def _rank_for_budget(f, budget, geom, in_modes, out_modes):
    """The largest balanced rank whose factors fit `budget` parameters (at
    least rank 1)."""
    g, ci, co = geom.groups, geom.in_channels, geom.out_channels
    cig, cog, kk = ci // g, co // g, geom.kk
    kh, kw = geom.kernel
    if f == "lowrank":
        r = int(budget // (ci * kk + co))
        return max(1, min(r, cig * kk, cog))
    if f == "cp":
        return max(1, int(budget // (ci + g * ((kh if geom.has_height else 0) + kw) + co)))
    if f == "tucker":
        # R_in : R_out follows C_in : C_out; grow while the count fits.
        def count(t):
            r1 = max(1, min(cig, round(t * cig)))
            r2 = max(1, min(cog, round(t * cog)))
            return (r1, r2), ci * r1 + g * r2 * r1 * kk + co * r2
        lo, hi = 0.0, 1.0
        for _ in range(50):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if count(mid)[1] <= budget else (lo, mid)
        return count(lo)[0]
    d = len(in_modes)
    best = (1,) * d
    for r in range(1, 4096):
        lay = ConvLayout("tt", geom, (r,) * d, tuple(in_modes), tuple(out_modes))
        if lay.num_parameters > budget:
            break
        best = (r,) * d
    return best
