"""Robustness fuzz of the C ops behind the factorized convolutions, called
directly: torch.ops.factorch.conv_chain and conv_chain_backward.

Every case starts from a VALID call (a FactorizedConv1d/2d layout with a
random factorization and nn.Conv options, or a chain built stage by stage)
and, in the mutation categories, breaks one thing (the stage ints, a list's
length, a tensor's size, dtype, layout, device or values). One pytest node
per category; the standard they are held to is fuzz_harness's: never crash,
return what the fake kernel and a plain-torch float64 reference (each
stage's taps gathered and summed by einsum) say, or raise a clear exception
naming an argument.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from dataclasses import dataclass

import pytest
import torch

from factorch._ops import STAGE_INTS, conv_stage_out_numel, conv_stage_recomputed
from factorch.nn import FactorizedConv1d, FactorizedConv2d

from fuzz_harness import (Case, assert_close, category_rng, check_category, finite, flat2d,
                          mutate_list, poison, randn, strided, tensor_variants, to_meta, vary)

ops = torch.ops.factorch
SEED = 20240611
N_VALID = 120         # valid calls per category (valid_bwd: half as many)
N_PER_MUTATION = 110  # calls per mutation category


# ---------------------------------------------------------------------------
# conv_chain: valid calls from FactorizedConv layouts, the reference
# ---------------------------------------------------------------------------
FIELDS = ("batch", "in_channels", "in_h", "in_w", "out_channels", "kh", "kw", "stride_h",
          "stride_w", "pad_top", "pad_left", "pad_bottom", "pad_right", "dil_h", "dil_w",
          "groups")
CONV_NAMES = ("x", "weights", "bias", "stages", "out_shape", "keep", "saved", "grad_y",
              "grad_x", "grad_weights", "grad_bias", "need_x", "need_weights", "need_bias",
              "conv_chain", "conv_chain_backward")


@dataclass
class ConvCall:
    x: object
    w: object
    bias: object
    stages: object
    out_shape: object
    keep: object = True
    gy: object = None     # backward only
    saved: object = None  # backward only
    need: tuple = (True, True, True)

    def fwd_args(self):
        return (self.x, self.w, self.bias, self.stages, self.out_shape, self.keep)

    def bwd_args(self):
        return (self.gy, self.x, self.w, self.saved, self.stages, *self.need)


def split_into(r, n, d):
    """d positive ints (some may be 1) multiplying to n."""
    modes, p = [1] * d, 2
    while n > 1:
        while n % p == 0:
            modes[r.randrange(d)] *= p
            n //= p
        p += 1
    return tuple(modes)


def conv_base(r: random.Random) -> ConvCall:
    """A valid conv_chain call: a random FactorizedConv1d/2d (factorization,
    channels 1-8, kernel 1-4, stride, padding, dilation, groups) on a small
    batch."""
    nd = r.choice((1, 2))
    fact = r.choice(("lowrank", "tucker", "cp", "tt"))
    g = 1 if fact == "tt" else r.choice((1, 1, 1, 2, 4))
    cin, cout = g * r.randint(1, 8 // g), g * r.randint(1, 8 // g)
    kernel = tuple(r.randint(1, 4) for _ in range(nd))
    stride = tuple(r.randint(1, 3) for _ in range(nd))
    dil = tuple(r.randint(1, 2) for _ in range(nd))
    if all(s == 1 for s in stride) and r.random() < 0.2:
        padding = "same"
        pads = [(d * (k - 1)) for d, k in zip(dil, kernel)]
    else:
        padding = tuple(r.randint(0, 2) for _ in range(nd))
        pads = [2 * p for p in padding]
    sizes = [max(1, d * (k - 1) + 1 - p) + r.randint(0, 4)
             for d, k, p in zip(dil, kernel, pads)]
    cig, cog, kk = cin // g, cout // g, math.prod(kernel)
    kw = {}
    if fact == "lowrank":
        rank = r.randint(1, min(cig * kk, cog))
    elif fact == "cp":
        rank = r.randint(1, 4)
    elif fact == "tucker":
        rank = (r.randint(1, cig), r.randint(1, cog))
    else:
        d = r.randint(1, 3)
        kw["tensorized_shape"] = (split_into(r, cin, d), split_into(r, cout, d))
        rank = r.randint(1, 3) if r.random() < 0.5 else tuple(r.randint(1, 3) for _ in range(d))
    dtype = r.choice((torch.float64, torch.float64, torch.float32))
    cls = FactorizedConv2d if nd == 2 else FactorizedConv1d
    layer = cls(cin, cout, kernel, factorization=fact, rank=rank, stride=stride,
                padding=padding, dilation=dil, groups=g, bias=r.random() < 0.6, dtype=dtype,
                **kw)
    h, w = (1, sizes[0]) if nd == 1 else sizes
    stages, out_shape = layer._layout.stages(h, w)
    if nd == 1:
        out_shape = [out_shape[0], out_shape[2]]
    n = r.choice((0, 1, 1, 2, 3, 5))
    x = randn(r, (n, cin, *sizes), dtype)
    bias = layer.bias.detach() if layer.bias is not None else torch.empty(0, dtype=dtype)
    return ConvCall(x, layer.factors.detach(), bias, stages, out_shape, keep=r.random() < 0.6)


def split_stages(stages):
    stages = [int(v) for v in stages]
    return [stages[i:i + STAGE_INTS] for i in range(0, len(stages), STAGE_INTS)]


def _out_hw(s):
    """A stage's output height and width."""
    b, ci, h, w, co, kh, kw, sh, sw, pt, pl, pb, pr, dh, dw, g = s
    return (h + pt + pb - dh * (kh - 1) - 1) // sh + 1, (w + pl + pr - dw * (kw - 1) - 1) // sw + 1


def _taps(n_out, k, s, p, d, size):
    """(positions clamped into [0, size), inside mask) [n_out, k] of the
    input each output reads through each tap: o·s − p + i·d in Python ints
    (strides, paddings and dilations may be near 2^63)."""
    pos = [[o * s - p + i * d for i in range(k)] for o in range(n_out)]
    inside = torch.tensor([[0 <= v < size for v in row] for row in pos])
    return torch.tensor([[min(max(v, 0), size - 1) for v in row] for row in pos]), inside


def _stage_conv(inp, W, st):
    """One stage on [items, ci, h, w]: its taps gathered (no F.pad: the
    paddings may be huge), zero in the padding, then one einsum over the
    groups."""
    b, ci, h, w, co, kh, kw, sh, sw, pt, pl, pb, pr, dh, dw, g = st
    oh, ow = _out_hw(st)
    x = inp.reshape(-1, ci, h, w)
    ph, mh = _taps(oh, kh, sh, pt, dh, h)
    pw, mw = _taps(ow, kw, sw, pl, dw, w)
    cols = x[:, :, ph.reshape(-1)][:, :, :, pw.reshape(-1)].reshape(-1, ci, oh, kh, ow, kw)
    mask = (mh.reshape(oh, kh, 1, 1) & mw.reshape(1, 1, ow, kw))
    cols = torch.where(mask, cols, torch.zeros((), dtype=cols.dtype))
    cols = cols.reshape(-1, g, ci // g, oh, kh, ow, kw)
    out = torch.einsum("ngcHiWj,gocij->ngoHW", cols, W.reshape(g, co // g, ci // g, kh, kw))
    return out.reshape(-1, co, oh, ow)


def _stage_weights(w, stages):
    out, off = [], 0
    for st in stages:
        co, ci, kh, kw, g = st[4], st[1], st[5], st[6], st[15]
        n = co * (ci // g) * kh * kw
        out.append(w[off:off + n].view(co, ci // g, kh, kw))
        off += n
    assert off == w.numel(), f"weights: {w.numel()} elements for stages holding {off}"
    return out


def ref_chain(x, w, bias, stages, out_shape):
    """(y, saved) in float64, stage by stage."""
    st = split_stages(stages)
    n = x.shape[0]
    per = [conv_stage_out_numel(s) for s in st]
    ws = _stage_weights(w.detach().double().reshape(-1), st)
    cur = x.detach().double().reshape(n, -1) if n else x.new_empty(0, dtype=torch.float64)
    blocks = []
    for i, (s, W) in enumerate(zip(st, ws)):
        b, ci, h, wd = s[:4]
        assert n == 0 or cur.shape[1] == b * ci * h * wd, f"stages[{i}] reads a different size"
        out = _stage_conv(cur, W, s) if n else cur.new_empty(0)
        cur = out.reshape(n, per[i])
        if i < len(st) - 1 and not conv_stage_recomputed(i, len(st), s):
            blocks.append(cur.reshape(-1))
    y = cur.reshape(n, *out_shape)
    if bias is not None and bias.numel():  # None: an undefined tensor, read as no bias
        cy = int(out_shape[0])
        b64 = bias.detach().double().reshape(1, cy, 1)
        y = (y.reshape(n, cy, per[-1] // cy) + b64).reshape(y.shape)
    saved = torch.cat(blocks) if blocks else torch.empty(0, dtype=torch.float64)
    return y, saved


def ref_chain_backward(gy, x, w, saved, stages):
    """(grad_x, grad_weights, grad_bias) in float64: the input gradients through
    the chain, each stage's weight gradient from ITS INPUT AS GIVEN (x, then
    the blocks of `saved`, the recomputed stages' outputs computed again from
    their own inputs), as the C op reads them."""
    st = split_stages(stages)
    n = x.shape[0]
    per = [conv_stage_out_numel(s) for s in st]
    ins_numel = [s[0] * s[1] * s[2] * s[3] for s in st]
    w64 = w.detach().double().reshape(-1)
    ws = _stage_weights(w64, st)
    gy64 = gy.detach().double()
    gb = gy64.reshape(n, gy.shape[1], -1).sum((0, 2)) if n else gy64.new_zeros(gy.shape[1])
    if n == 0:
        return torch.zeros(x.shape, dtype=torch.float64), torch.zeros_like(w64), gb
    sv = saved.detach().double().reshape(-1)
    S = len(st)
    outs, off = [], 0  # each stage's output as the backward reads it
    for i in range(S - 1):
        if conv_stage_recomputed(i, S, st[i]):
            src = outs[i - 1]
            outs.append(_stage_conv(src, ws[i], st[i]).reshape(n, per[i]))
        else:
            outs.append(sv[off:off + n * per[i]].reshape(n, per[i]))
            off += n * per[i]
    gws = []
    g = gy64.reshape(n, per[-1])
    for i in range(S - 1, -1, -1):
        inp = x.detach().double().reshape(n, -1) if i == 0 else outs[i - 1]
        assert inp.shape[1] == ins_numel[i]
        inp = inp.clone().requires_grad_()
        W = ws[i].clone().requires_grad_()
        out = _stage_conv(inp, W, st[i]).reshape(n, per[i])
        gin, gw = torch.autograd.grad(out, (inp, W), g)
        gws.append(gw.reshape(-1))
        g = gin
    return g.reshape(x.shape), torch.cat(gws[::-1]), gb


def verify_conv_forward(c: ConvCall):
    x, w, bias, stages, out_shape, keep = c.fwd_args()

    def verify(out):
        y, saved = out
        n = x.shape[0]
        st = split_stages(stages)
        per = [conv_stage_out_numel(s) for s in st]
        want = (n, *[int(v) for v in out_shape])
        assert tuple(y.shape) == want, f"y: shape {tuple(y.shape)}, the fake says {want}"
        kept = sum(p for i, (p, s) in enumerate(zip(per[:-1], st))
                   if not conv_stage_recomputed(i, len(st), s))
        ws = (n * kept,) if keep else (0,)
        assert tuple(saved.shape) == ws, f"saved: shape {tuple(saved.shape)}, the fake says {ws}"
        assert y.dtype == x.dtype and saved.dtype == x.dtype and y.device == x.device
        if x.device.type == "meta":
            return
        ok = finite(x, w, bias)
        ry, rs = ref_chain(x, w, bias, stages, out_shape)
        assert_close(y, ry, x.dtype, "y", ok)
        if keep:
            assert_close(saved, rs, x.dtype, "saved", ok)

    return verify


def verify_conv_backward(c: ConvCall):
    gy, x, w, saved, stages, nx, nw, nb = c.bwd_args()

    def verify(out):
        gx, gw, gb = out
        for name, t, need, shape in (("grad_x", gx, nx, x.shape), ("grad_weights", gw, nw, w.shape),
                                     ("grad_bias", gb, nb, (gy.shape[1],))):
            want = tuple(shape) if need else (0,)
            assert tuple(t.shape) == want, f"{name}: shape {tuple(t.shape)}, the fake says {want}"
            assert t.dtype == x.dtype
        if x.device.type == "meta":
            return
        ok = finite(gy, x, w, saved)
        rx, rw, rb = ref_chain_backward(gy, x, w, saved, stages)
        for name, t, need, ref in (("grad_x", gx, nx, rx), ("grad_weights", gw, nw, rw),
                                   ("grad_bias", gb, nb, rb)):
            if need:
                assert_close(t, ref, x.dtype, name, ok)

    return verify


def random_chain(r: random.Random) -> ConvCall:
    """A valid chain built stage by stage, not from a layer: any groups
    (depthwise too), several items per image, strides and paddings larger
    than the kernel or the input, items regrouped into channels between
    stages."""
    b, c, h, w = r.randint(1, 3), r.randint(1, 6), r.randint(1, 7), r.randint(1, 7)
    first = b * c * h * w
    stages = []
    for i in range(r.randint(1, 4)):
        if i > 0 and r.random() < 0.2:  # the same elements, one item of b·c channels
            b, c = 1, b * c
        if r.random() < 0.25:
            g, co = c, c  # depthwise
        else:
            g = r.choice([d for d in range(1, c + 1) if c % d == 0])
            co = g * r.randint(1, 3)
        kh, kw, sh, sw, dh, dw = (r.randint(1, 4) for _ in range(6))
        pt, pl, pb, pr = (r.choice((0, 0, 1, 2, 5)) for _ in range(4))
        pb += max(0, dh * (kh - 1) + 1 - (h + pt + pb))  # the kernel must fit
        pr += max(0, dw * (kw - 1) + 1 - (w + pl + pr))
        st = [b, c, h, w, co, kh, kw, sh, sw, pt, pl, pb, pr, dh, dw, g]
        stages.append(st)
        (h, w), c = _out_hw(st), co
    dtype = r.choice((torch.float64, torch.float64, torch.float32))
    weights = torch.cat([randn(r, (s[4] * (s[1] // s[15]) * s[5] * s[6],), dtype,
                               1 / math.sqrt(s[1] // s[15] * s[5] * s[6])) for s in stages])
    n = r.choice((0, 1, 2, 3, 4))
    x = randn(r, (n, first), dtype).reshape(n, stages[0][0] * stages[0][1], stages[0][2],
                                              stages[0][3])
    bias = randn(r, (b * c,), dtype) if r.random() < 0.5 else torch.empty(0, dtype=dtype)
    return ConvCall(x, weights, bias, [v for st in stages for v in st], [b * c, h, w],
                    keep=r.random() < 0.6)


def conv_backward_base(r: random.Random, base=conv_base) -> ConvCall:
    """A valid backward call: the saved activations of a valid forward."""
    c = base(r)
    y, saved = ops.conv_chain(c.x, c.w, c.bias, c.stages, c.out_shape, True)
    need = tuple(r.random() < 0.7 for _ in range(3))
    return dataclasses.replace(c, keep=True, gy=randn(r, y.shape, c.x.dtype), saved=saved,
                               need=need)


# ---- mutations of a conv call: (r, ConvCall) -> (desc, ConvCall) ----------
def m_stage_ints(r, c):
    """1-3 random stage ints set to nasty values (or left as they are)."""
    v, desc = mutate_list(r, c.stages, r.randint(1, 3))
    desc = re.sub(r"\[(\d+)\]", lambda m: f"[{int(m[1]) // 16}].{FIELDS[int(m[1]) % 16]}", desc)
    return desc, dataclasses.replace(c, stages=v)


OVERFLOWS = [  # (fields set on one stage); products, sums and int32 limits
    {"in_h": 2**32, "in_w": 2**32},
    {"batch": 2**32, "in_channels": 2**32},
    {"out_channels": 2**62, "groups": 1},
    {"kh": 2**31, "dil_h": 2**33},
    {"kw": 3, "dil_w": 2**62},
    {"pad_top": 2**62, "pad_bottom": 2**62},
    {"pad_left": 2**63 - 1},
    {"pad_left": 2**62, "pad_right": 2**62, "kw": 2},
    {"in_w": 2**62, "stride_w": 2**62},
    {"in_channels": 2**62, "out_channels": 2**62, "groups": 2**62},
    {"in_h": 2**40},
    {"in_h": 2**31, "in_w": 1},
    {"kh": 2**20, "kw": 2**20, "pad_top": 2**20, "pad_bottom": 2**20, "pad_left": 2**20,
     "pad_right": 2**20},
    {"batch": -2**63},
    {"stride_h": -2**63, "stride_w": 2**63 - 1},
    {},  # control
]


def m_stage_overflow(r, c):
    st = split_stages(c.stages)
    i = r.randrange(len(st))
    combo = r.choice(OVERFLOWS)
    for k, v in combo.items():
        st[i][FIELDS.index(k)] = v
    return f"stages[{i}] {combo}", dataclasses.replace(c, stages=[v for s in st for v in s])


def m_stage_huge_valid(r, c):
    """Strides and dilations near 2^63 that keep the chain valid: a huge
    stride on an axis where the stage has one output (with new paddings, up
    to 2^61: the one output stays one while the stride exceeds the padded
    input), a huge dilation where its kernel is 1 (and, less often, anywhere:
    then the sizes change and the call must raise)."""
    st = split_stages(c.stages)
    i = r.randrange(len(st))
    s = st[i]
    oh, ow = _out_hw(s)
    huge = (2**31, 2**32, 2**40, 2**62, 2**63 - 1, 2**63 - 1)
    changes = []
    for o, k, stride, dil, pads in ((oh, 5, 7, 13, (9, 11)), (ow, 6, 8, 14, (10, 12))):
        if o == 1 or r.random() < 0.15:
            s[stride] = r.choice(huge)
            changes.append(f"{FIELDS[stride]}={s[stride]}")
            if r.random() < 0.7:
                s[pads[0]] = r.choice((0, 1, 2, 3, 2**20, 2**61))
                s[pads[1]] = r.choice((0, 2, 2**20))
                changes.append(f"pads {s[pads[0]]}, {s[pads[1]]}")
        if s[k] == 1 or r.random() < 0.15:
            s[dil] = r.choice(huge)
            changes.append(f"{FIELDS[dil]}={s[dil]}")
    desc = f"stages[{i}] {', '.join(changes) or 'unchanged'}"
    return desc, dataclasses.replace(c, stages=[v for t in st for v in t])


def _extend(c, count):
    """c with `count` 1x1 stages (identity weights) appended: the same y."""
    st = split_stages(c.stages)
    last = st[-1]
    oh, ow = _out_hw(last)
    co = last[4]
    extra = [last[0], co, oh, ow, co, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1]
    eye = torch.eye(co, dtype=c.w.dtype).reshape(-1)
    w = torch.cat([c.w] + [eye] * count)
    return [v for s in st + [extra] * count for v in s], w


def m_stage_length(r, c):
    """Stage lists of wrong lengths (0, 15, 17, 16·17 ints, 17 stages) and of
    other valid lengths (16 stages: identity 1x1 stages appended)."""
    n = len(c.stages) // STAGE_INTS
    kind = r.choice(("empty", "15 ints", "17 ints", "one int less", "one int more",
                     "16 stages", "17 stages", "drop the last stage", "twice", "16*17 ints"))
    w = c.w
    if kind == "empty":
        s = []
    elif kind == "15 ints":
        s = c.stages[:15]
    elif kind == "17 ints":
        s = c.stages[:16] + [1]
    elif kind == "one int less":
        s = c.stages[:-1]
    elif kind == "one int more":
        s = c.stages + [1]
    elif kind == "16 stages":
        s, w = _extend(c, 16 - n)
    elif kind == "17 stages":
        s, w = _extend(c, 17 - n)
    elif kind == "drop the last stage":
        s = c.stages[:-STAGE_INTS]
    elif kind == "twice":
        s = c.stages * 2
    else:
        s = (c.stages * 17)[:16 * 17]
    saved = c.saved
    if c.gy is not None and kind == "16 stages":  # a backward call: the new chain's activations
        saved = ref_chain(c.x, w, c.bias, s, c.out_shape)[1].to(c.x.dtype)
    return kind, dataclasses.replace(c, stages=s, w=w, saved=saved)


def m_out_shape(r, c):
    """out_shape of wrong lengths or values; reshapes of the same size work."""
    o = [int(v) for v in c.out_shape]
    per = math.prod(o)
    kind = r.choice(("empty", "flat", "[C, rest]", "trailing 1", "7 sizes", "8 sizes",
                     "an entry nasty", "permuted", "huge pair", "huge triple"))
    if kind == "empty":
        s = []
    elif kind == "flat":
        s = [per]
    elif kind == "[C, rest]":
        s = [o[0], per // o[0]]
    elif kind == "trailing 1":
        s = o + [1]
    elif kind == "7 sizes":
        s = o + [1] * (7 - len(o))
    elif kind == "8 sizes":
        s = o + [1] * (8 - len(o))
    elif kind == "an entry nasty":
        s, kind = mutate_list(r, o, 1)
    elif kind == "permuted":
        s = o[::-1]
    elif kind == "huge pair":
        s = [2**32, 2**32]
    else:
        s = [2**62, 2**62, 2**62]
    return f"out_shape {s} ({kind})", dataclasses.replace(c, out_shape=s)


def m_weights(r, c):
    kind, w = tensor_variants(r, c.w)
    return f"weights {kind}", dataclasses.replace(c, w=w)


def m_bias(r, c):
    co = int(c.out_shape[0])
    b = c.bias if c.bias.numel() else randn(r, (co,), c.x.dtype)
    kind = r.choice(("variant", "size+1", "size-1", "[1, C]", "[C, 1]", "none"))
    if kind == "variant":
        kind, b = tensor_variants(r, b)
    elif kind == "size+1":
        b = torch.cat([b, b[:1]])
    elif kind == "size-1":
        b = b[:-1]
    elif kind == "[1, C]":
        b = b.reshape(1, -1)
    elif kind == "[C, 1]":
        b = b.reshape(-1, 1)
    else:
        b = b.new_empty(0)
    return f"bias {kind}", dataclasses.replace(c, bias=b)


def m_x_layout(r, c):
    x = c.x
    kind = r.choice(("transposed H/W", "channels_last", "expanded batch", "strided",
                     "flat [N, per]", "batch and channels swapped", "trailing 1s",
                     "one image of all", "sliced batch"))
    if kind == "transposed H/W":
        x = x.transpose(-1, -2)
    elif kind == "channels_last":
        x = (x.to(memory_format=torch.channels_last) if x.dim() == 4
             else x.transpose(1, 2).contiguous().transpose(1, 2))
    elif kind == "expanded batch":
        x = x[:1].expand(x.shape) if x.shape[0] else x
    elif kind == "strided":
        x = strided(x)
    elif kind == "flat [N, per]":
        x = flat2d(x)
    elif kind == "batch and channels swapped":
        x = x.transpose(0, 1)
    elif kind == "trailing 1s":
        x = x.reshape(*x.shape, 1, 1)
    elif kind == "one image of all":
        x = x.reshape(1, -1)
    else:
        x = torch.cat([x, x])[x.shape[0] // 2:x.shape[0] // 2 + x.shape[0]]
    return kind, dataclasses.replace(c, x=x)


def m_x_dtype(r, c):
    dt = r.choice((torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
                   torch.int32, torch.bool, torch.uint8, torch.complex64))
    convert_all = r.random() < 0.5  # weights and bias follow, or keep theirs
    x = c.x.to(dt)
    w, b = (c.w.to(dt), c.bias.to(dt)) if convert_all else (c.w, c.bias)
    return f"x {dt}{' (all)' if convert_all else ''}", dataclasses.replace(c, x=x, w=w, bias=b)


def m_x_ndim(r, c):
    x = c.x
    kind = r.choice(("0-d", "1-d", "8-d", "9-d", "unsqueezed"))
    if kind == "0-d":
        x = x.reshape(-1)[:1].reshape(()) if x.numel() else x.new_zeros(())
    elif kind == "1-d":
        x = x.reshape(-1)
    elif kind == "8-d":
        x = x.reshape(*x.shape, *([1] * (8 - x.dim())))
    elif kind == "9-d":
        x = x.reshape(*x.shape, *([1] * (9 - x.dim())))
    else:
        x = x.unsqueeze(1)
    return kind, dataclasses.replace(c, x=x)


def m_x_empty(r, c):
    x = c.x
    shape = list(x.shape)
    kind = r.choice(("no images", "no channels", "no width", "all zero"))
    if kind == "no images":
        shape[0] = 0
    elif kind == "no channels":
        shape[1] = 0
    elif kind == "no width":
        shape[-1] = 0
    else:
        shape = [0] * len(shape)
    return kind, dataclasses.replace(c, x=x.new_zeros(shape))


def m_nonfinite(r, c):
    which = r.choice(("x", "x", "weights", "bias"))
    if which == "x":
        t, d = poison(r, c.x)
        c = dataclasses.replace(c, x=t)
    elif which == "weights":
        t, d = poison(r, c.w)
        c = dataclasses.replace(c, w=t)
    else:
        t, d = poison(r, c.bias)
        c = dataclasses.replace(c, bias=t)
    return f"{which} {d}", c


def m_meta(r, c):
    kind = r.choice(("all meta", "all meta", "x meta only", "weights meta only",
                     "all meta, stage ints"))
    if kind.startswith("all meta"):
        c2 = dataclasses.replace(c, x=to_meta(c.x), w=to_meta(c.w), bias=to_meta(c.bias),
                                 gy=to_meta(c.gy), saved=to_meta(c.saved))
        if kind.endswith("ints"):
            d, c2 = m_stage_ints(r, c2)
            kind += f" {d}"
        return kind, c2
    if kind == "x meta only":
        return kind, dataclasses.replace(c, x=to_meta(c.x))
    return kind, dataclasses.replace(c, w=to_meta(c.w))


def m_dtype_mix(r, c):
    other = torch.float32 if c.x.dtype == torch.float64 else torch.float64
    which = r.choice(("x", "weights", "bias", "none"))
    if which == "x":
        c = dataclasses.replace(c, x=c.x.to(other))
    elif which == "weights":
        c = dataclasses.replace(c, w=c.w.to(other))
    elif which == "bias":
        c = dataclasses.replace(c, bias=c.bias.to(other))
    return f"{which} as {other}", c


def m_py_types(r, c):
    kind = r.choice(("stages as tuple", "stages with a float", "stages with a bool",
                     "stages with a str", "stages None", "out_shape None", "keep None",
                     "x None", "x a list", "weights a float", "stages 2**64"))
    s, o, k, x, w = c.stages, c.out_shape, c.keep, c.x, c.w
    if kind == "stages as tuple":
        s = tuple(s)
    elif kind == "stages with a float":
        s = list(s[:-1]) + [float(s[-1])]
    elif kind == "stages with a bool":
        s = list(s[:-1]) + [True]
    elif kind == "stages with a str":
        s = list(s[:-1]) + ["1"]
    elif kind == "stages None":
        s = None
    elif kind == "out_shape None":
        o = None
    elif kind == "keep None":
        k = None
    elif kind == "x None":
        x = None
    elif kind == "x a list":
        x = x.tolist()
    elif kind == "weights a float":
        w = 1.0
    else:
        s = list(s[:-1]) + [2**64]
    return kind, dataclasses.replace(c, stages=s, out_shape=o, keep=k, x=x, w=w)


def m_none(r, c):
    """None for a tensor argument: torch passes an undefined tensor to the
    kernel (None for bias reads as no bias)."""
    which = r.choice(("x", "weights", "bias", "grad_y", "saved", "nothing"))
    if which == "nothing":
        return "control", c
    field = {"weights": "w", "grad_y": "gy"}.get(which, which)
    return f"{which} None", dataclasses.replace(c, **{field: None})


CONV_FORWARD_MUTATIONS = {
    "stages_ints": m_stage_ints, "stages_overflow": m_stage_overflow,
    "stages_huge_valid": m_stage_huge_valid, "stages_length": m_stage_length,
    "out_shape": m_out_shape, "weights": m_weights,
    "bias": m_bias, "x_layout": m_x_layout, "x_dtype": m_x_dtype, "x_ndim": m_x_ndim,
    "x_empty": m_x_empty, "nonfinite": m_nonfinite, "meta": m_meta, "dtype_mix": m_dtype_mix,
    "py_types": m_py_types, "none": m_none,
}


# ---- backward mutations ----------------------------------------------------
def mb_saved(r, c):
    kind = r.choice(("variant", "zeros (wrong values, right size)", "[N, per]"))
    s = c.saved
    if kind == "variant":
        kind, s = tensor_variants(r, s)
    elif kind.startswith("zeros"):
        s = torch.zeros_like(s)
    else:
        n = c.x.shape[0]
        s = s.reshape(n, -1) if n else s.reshape(0, 1)
    return f"saved {kind}", dataclasses.replace(c, saved=s)


def mb_grad_y(r, c):
    g = c.gy
    kind = r.choice(("variant", "flat [N, per]", "transposed", "1-D", "N+1", "wrong C",
                     "nonfinite", "channels_last"))
    check = True
    if kind == "variant":
        kind, g = tensor_variants(r, g)
    elif kind == "flat [N, per]":
        g = flat2d(g)
    elif kind == "transposed":
        g = g.transpose(-1, -2)
    elif kind == "1-D":
        g = g.reshape(-1)
    elif kind == "N+1":
        g = torch.cat([g, g[:1]]) if g.shape[0] else g.new_zeros(1, *g.shape[1:])
    elif kind == "wrong C":
        g = torch.cat([g, g[:, :1]], 1)
    elif kind == "nonfinite":
        g, d = poison(r, g)
        kind += f" {d}"
    else:
        g = g.to(memory_format=torch.channels_last) if g.dim() == 4 else strided(g)
    return f"grad_y {kind}", dataclasses.replace(c, gy=g)


CONV_BACKWARD_MUTATIONS = {
    "saved": mb_saved, "grad_y": mb_grad_y, "stages_ints": m_stage_ints,
    "stages_overflow": m_stage_overflow, "stages_huge_valid": m_stage_huge_valid,
    "stages_length": m_stage_length, "weights": m_weights,
    "x_layout": m_x_layout, "x_dtype": m_x_dtype, "x_empty": m_x_empty, "meta": m_meta,
    "none": m_none,
}



# ---------------------------------------------------------------------------
# The cases of one category, and the test
# ---------------------------------------------------------------------------
VALID = {  # category: (calls, the valid call, backward?)
    "valid": (N_VALID, conv_base, False),
    "valid_bwd": (N_VALID // 2, conv_base, True),
    "valid_random_chain": (N_VALID, random_chain, False),
    "valid_random_chain_bwd": (N_VALID, random_chain, True),
}
CATEGORIES = (list(VALID) + list(CONV_FORWARD_MUTATIONS)
              + [f"{name}_bwd" for name in CONV_BACKWARD_MUTATIONS])


def describe(c):
    return f"stages={c.stages} out_shape={c.out_shape} x={tuple(c.x.shape)} {c.x.dtype}"


def conv_case(r, cat, desc, c, bwd, must_return=False, check_finite=True):
    if bwd:
        call, verify = lambda: ops.conv_chain_backward(*c.bwd_args()), verify_conv_backward(c)
    else:
        call, verify = lambda: ops.conv_chain(*c.fwd_args()), verify_conv_forward(c)
    return vary(r, Case(f"conv.{cat}", desc, call, verify, CONV_NAMES, must_return,
                        check_finite))


def category_cases(r: random.Random, cat: str):
    if cat in VALID:
        n, base, bwd = VALID[cat]
        cases = []
        for _ in range(n):
            c = conv_backward_base(r, base) if bwd else base(r)
            cases.append(conv_case(r, cat, describe(c), c, bwd, must_return=True))
        return cases
    bwd = cat.endswith("_bwd")
    mutate = CONV_BACKWARD_MUTATIONS[cat[:-4]] if bwd else CONV_FORWARD_MUTATIONS[cat]
    cases = []
    for _ in range(N_PER_MUTATION):
        c = conv_backward_base(r) if bwd else conv_base(r)
        d, c2 = mutate(r, c)
        # Non-finite values also run with the check off: the kernels must
        # carry NaN/Inf through, not crash on them.
        chk = not (cat == "nonfinite" and r.random() < 0.3)
        cases.append(conv_case(r, cat, f"{d}; base {describe(c)}", c2, bwd, check_finite=chk))
    return cases


@pytest.mark.parametrize("cat", CATEGORIES)
def test_conv_chain_never_crashes_and_returns_right_results(cat):
    r = category_rng(SEED, f"conv.{cat}")
    torch.manual_seed(SEED)  # the layers' initialisation
    check_category(f"conv.{cat}", category_cases(r, cat))
