"""Robustness fuzz of the C ops behind the factorized convolutions and
embeddings, called directly: torch.ops.factorch.conv_chain /
conv_chain_backward, lowrank_embedding(_backward), tt_embedding(_backward).

Every case starts from a VALID call (a FactorizedConv1d/2d layout with a
random factorization and nn.Conv options; a random low-rank or TT table) and,
in the mutation categories, breaks one thing (the stage ints, a list's
length, a tensor's size, dtype, layout, device or values). The standard:

- the process never crashes or hangs (a hang dumps the tracebacks and exits,
  through faulthandler);
- a call returns, or raises RuntimeError / ValueError / TypeError /
  IndexError whose message names an argument;
- what it returns has the shapes the fake kernel predicts and the values of
  a reference in plain torch (each stage's taps gathered and summed by
  einsum; the table's rows), finite when the inputs were;
- each mutation category both returned and raised (its variants include
  harmless ones), so a category cannot silently test nothing.

Deterministic (fixed seeds). To find a case that kills the process, run with
FACTORCH_FUZZ_TRACE=1: every case is printed (flushed) before it runs.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import math
import os
import random
import re
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import torch

import factorch
from factorch import _lib
from factorch._ops import STAGE_INTS, conv_stage_out_numel, conv_stage_recomputed
from factorch.nn import FactorizedConv1d, FactorizedConv2d

ops = torch.ops.factorch
SEED = 20240611
ALLOWED = (RuntimeError, ValueError, TypeError, IndexError)
TRACE = os.environ.get("FACTORCH_FUZZ_TRACE") == "1"
HANG_S = 180  # the whole fuzz takes seconds (20 under ASan): far beyond that is a hang

# Ints that break sizes: zero, negatives, the int32/int64 edges, huge.
NASTY = [0, -1, -2, 1, 2, 3, 5, 2**31 - 1, 2**31, 2**32, 2**40, 2**62, 2**63 - 1,
         -2**31, -2**62, -2**63]
SMALL_CHUNKS = 2  # FCT_FLAG_SMALL_CHUNKS


# ---------------------------------------------------------------------------
# Cases and the runner
# ---------------------------------------------------------------------------
@dataclass
class Case:
    cat: str                            # category: "<op family>.<what is mutated>"
    desc: str
    call: Callable[[], object]          # runs the op
    verify: Callable[[object], None]    # asserts on what it returned
    names: tuple                        # arguments an error message may name
    must_return: bool = False           # the valid calls
    check_finite: bool = True           # factorch.set_check_finite(cpu=...) during the call
    threads: int = 0                    # torch.set_num_threads during the call (0: as is)
    small_chunks: bool = False          # FCT_FLAG_SMALL_CHUNKS during the call


def vary(r: random.Random, c: Case) -> Case:
    """Some cases run on other thread counts (the conv ops split the images
    over the pool's threads) or with chunks of <= 3 indices (embeddings)."""
    if r.random() < 0.3:
        c.threads = r.choice((1, 3, 4))
    c.small_chunks = r.random() < 0.3
    return c


def _names_an_argument(msg: str, names) -> bool:
    return any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", msg)
               for n in names)


def run_cases(cases):
    """Runs every case; returns ({cat: [returned, raised]}, failures)."""
    tally = defaultdict(lambda: [0, 0])
    failures = []
    default_check = factorch.get_check_finite()["cpu"]
    default_threads = torch.get_num_threads()
    for i, c in enumerate(cases):
        env = [f"threads {c.threads or default_threads}"] + \
            ["small chunks"] * c.small_chunks + ["unchecked"] * (not c.check_finite)
        what = f"[{i}] {c.cat}: {c.desc} ({', '.join(env)})"
        if TRACE:
            print(what, file=sys.stderr, flush=True)
        flags = (_lib.FLAG_CHECK_FINITE if c.check_finite else 0) | \
            (SMALL_CHUNKS if c.small_chunks else 0)
        _lib.glue.fct_torch_set_flags(0, flags)  # CPU
        if c.threads:
            torch.set_num_threads(c.threads)
        try:
            out = c.call()
        except ALLOWED as e:
            tally[c.cat][1] += 1
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            if c.must_return:
                failures.append(f"{what}: a valid call raised {type(e).__name__}: {msg}")
            elif not _names_an_argument(str(e), c.names):
                failures.append(f"{what}: the message names no argument: {msg}")
            continue
        except Exception as e:  # noqa: BLE001 - any other exception is a failure
            tally[c.cat][1] += 1
            failures.append(f"{what}: raised {type(e).__name__} (not allowed): {e}")
            continue
        finally:
            factorch.set_check_finite(cpu=default_check)
            torch.set_num_threads(default_threads)
        tally[c.cat][0] += 1
        try:
            c.verify(out)
        except Exception as e:  # noqa: BLE001 - a wrong result, or an oracle that cannot follow
            failures.append(f"{what}: returned a wrong result: {type(e).__name__}: {e}")
    return tally, failures


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------
def randn(r: random.Random, shape, dtype=torch.float64, scale=1.0):
    g = torch.Generator().manual_seed(r.getrandbits(62))
    return (torch.randn(tuple(shape), generator=g, dtype=torch.float64) * scale).to(dtype)


def randint(r: random.Random, lo, hi, shape, dtype=torch.int64):
    g = torch.Generator().manual_seed(r.getrandbits(62))
    return torch.randint(lo, hi, tuple(shape), generator=g, dtype=torch.int64).to(dtype)


def strided(t):
    """t's values through a view with doubled strides (not contiguous)."""
    if t.dim() == 0:
        return t
    big = torch.stack([t, torch.zeros_like(t)], dim=-1)  # [..., 2]
    return big[..., 0]


def flat2d(t):
    """t as [t.shape[0], the rest] (also when t is empty)."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:]))


def finite(*ts) -> bool:
    return all(not t.is_floating_point() or bool(torch.isfinite(t).all()) for t in ts
               if isinstance(t, torch.Tensor) and t.device.type != "meta")


def assert_close(got, want, dtype, what, inputs_finite=True):
    """got (any float dtype) against a float64 reference; NaN/Inf must sit in
    the same places. With non-finite inputs, only where the reference is
    non-finite may got be: the kernels skip the taps that fall on padding
    (0·NaN is NaN for the reference, nothing for them) and the
    rows of padding_idx, so they may give a number where the reference has
    NaN."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    g = got.detach().double()
    if not inputs_finite:
        bad = ~torch.isfinite(g) & torch.isfinite(want)
        assert not bool(bad.any()), f"{what}: non-finite where the reference is finite"
        keep = torch.isfinite(g) & torch.isfinite(want)
        g, want = g[keep], want[keep]
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    scale = 1.0 + (want[torch.isfinite(want)].abs().max().item() if want.numel() and
                   torch.isfinite(want).any() else 0.0)
    torch.testing.assert_close(g, want, rtol=tol, atol=tol * scale, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def mutate_list(r, values, k):
    """k random entries of `values` set to nasty ints (or left as they are)."""
    v = list(values)
    changes = []
    for _ in range(k):
        i = r.randrange(len(v))
        new = r.choice(NASTY + [v[i], v[i] + 1, v[i] - 1])
        changes.append(f"[{i}] {v[i]}->{new}")
        v[i] = new
    return v, ", ".join(changes)


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


def _tensor_variants(r, t):
    """(desc, t') for a tensor argument: dtype, ndim, layout, size variants,
    some harmless."""
    kind = r.choice(("same", "dtype", "2-D", "strided", "expanded", "numel+1", "numel-1",
                     "empty", "offset view", "0-d"))
    if kind == "same":
        return kind, t.clone()
    if kind == "dtype":
        dt = r.choice((torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
                       torch.int32, torch.bool, torch.complex64))
        return f"dtype {dt}", t.to(dt)
    if kind == "2-D":
        return kind, t.reshape(1, -1) if r.random() < 0.5 else t.reshape(-1, 1)
    if kind == "strided":
        return kind, strided(t)
    if kind == "expanded":
        return kind, t.reshape(-1)[:1].expand(t.numel()) if t.numel() else t
    if kind == "numel+1":
        return kind, torch.cat([t.reshape(-1), t.new_ones(1)])
    if kind == "numel-1":
        return kind, t.reshape(-1)[:-1] if t.numel() else t
    if kind == "empty":
        return kind, t.new_empty(0)
    if kind == "offset view":
        big = torch.cat([t.new_zeros(5), t.reshape(-1), t.new_zeros(3)])
        return kind, big[5:5 + t.numel()]
    return kind, t.reshape(-1)[:1].reshape(()) if t.numel() else t.new_zeros(())


def m_weights(r, c):
    kind, w = _tensor_variants(r, c.w)
    return f"weights {kind}", dataclasses.replace(c, w=w)


def m_bias(r, c):
    co = int(c.out_shape[0])
    b = c.bias if c.bias.numel() else randn(r, (co,), c.x.dtype)
    kind = r.choice(("variant", "size+1", "size-1", "[1, C]", "[C, 1]", "none"))
    if kind == "variant":
        kind, b = _tensor_variants(r, b)
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


def _poison(r, t):
    if not t.numel():
        return t, "empty"
    t = t.clone()
    v = r.choice((float("nan"), float("inf"), -float("inf")))
    i = r.randrange(t.numel())
    t.view(-1)[i] = v
    return t, f"{v} at {i}"


def m_nonfinite(r, c):
    which = r.choice(("x", "x", "weights", "bias"))
    if which == "x":
        t, d = _poison(r, c.x)
        c = dataclasses.replace(c, x=t)
    elif which == "weights":
        t, d = _poison(r, c.w)
        c = dataclasses.replace(c, w=t)
    else:
        t, d = _poison(r, c.bias)
        c = dataclasses.replace(c, bias=t)
    return f"{which} {d}", c


def m_meta(r, c):
    kind = r.choice(("all meta", "all meta", "x meta only", "weights meta only",
                     "all meta, stage ints"))
    meta = lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t  # noqa: E731
    if kind.startswith("all meta"):
        c2 = dataclasses.replace(c, x=meta(c.x), w=meta(c.w), bias=meta(c.bias), gy=meta(c.gy),
                                 saved=meta(c.saved))
        if kind.endswith("ints"):
            d, c2 = m_stage_ints(r, c2)
            kind += f" {d}"
        return kind, c2
    if kind == "x meta only":
        return kind, dataclasses.replace(c, x=meta(c.x))
    return kind, dataclasses.replace(c, w=meta(c.w))


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
        kind, s = _tensor_variants(r, s)
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
        kind, g = _tensor_variants(r, g)
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
        g, d = _poison(r, g)
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


def conv_cases(r: random.Random, n_valid: int, n_per_mutation: int):
    cases = []

    def fwd_case(cat, desc, c, must_return=False, check_finite=True):
        return vary(r, Case(cat, desc, lambda: ops.conv_chain(*c.fwd_args()),
                            verify_conv_forward(c), CONV_NAMES, must_return, check_finite))

    def bwd_case(cat, desc, c, must_return=False, check_finite=True):
        return vary(r, Case(cat, desc, lambda: ops.conv_chain_backward(*c.bwd_args()),
                            verify_conv_backward(c), CONV_NAMES, must_return, check_finite))

    def describe(c):
        return f"stages={c.stages} out_shape={c.out_shape} x={tuple(c.x.shape)} {c.x.dtype}"

    for _ in range(n_valid):
        c = conv_base(r)
        cases.append(fwd_case("conv.valid", describe(c), c, must_return=True))
    for _ in range(n_valid // 2):
        c = conv_backward_base(r)
        cases.append(bwd_case("conv.valid_bwd", describe(c), c, must_return=True))
    for _ in range(n_valid):
        c = random_chain(r)
        cases.append(fwd_case("conv.valid_random_chain", describe(c), c, must_return=True))
        c = conv_backward_base(r, random_chain)
        cases.append(bwd_case("conv.valid_random_chain_bwd", describe(c), c, must_return=True))
    for name, fn in CONV_FORWARD_MUTATIONS.items():
        for _ in range(n_per_mutation):
            c = conv_base(r)
            d, c2 = fn(r, c)
            # Non-finite values also run with the check off: the kernels must
            # carry NaN/Inf through, not crash on them.
            chk = not (name == "nonfinite" and r.random() < 0.3)
            cases.append(fwd_case(f"conv.{name}", f"{d}; base {describe(c)}", c2,
                                  check_finite=chk))
    for name, fn in CONV_BACKWARD_MUTATIONS.items():
        for _ in range(n_per_mutation):
            c = conv_backward_base(r)
            d, c2 = fn(r, c)
            cases.append(bwd_case(f"conv.{name}_bwd", f"{d}; base {describe(c)}", c2))
    return cases


# ---------------------------------------------------------------------------
# Embeddings: valid calls, the references
# ---------------------------------------------------------------------------
EMB_NAMES = ("indices", "U", "V", "padding_idx", "grad_y", "grad_U", "grad_V", "need_U",
             "need_V", "weights", "num_embeddings", "modes", "dims", "ranks", "cores",
             "grad_cores", "grad_weights", "y", "lowrank_embedding", "tt_embedding",
             "lowrank_embedding_backward", "tt_embedding_backward")


@dataclass
class EmbCall:
    indices: object
    pad: object
    U: object = None        # lowrank
    V: object = None
    w: object = None        # tt: the flat cores
    num: object = None
    modes: object = None
    dims: object = None
    ranks: object = None
    gy: object = None       # backward
    need: tuple = (True, True)

    def lr_args(self):
        return (self.indices, self.U, self.V, self.pad)

    def lr_bwd_args(self):
        return (self.gy, self.indices, self.U, self.V, self.pad, *self.need)

    def tt_args(self):
        return (self.indices, self.w, self.num, self.modes, self.dims, self.ranks, self.pad)

    def tt_bwd_args(self):
        return (self.gy, self.indices, self.w, self.num, self.modes, self.dims, self.ranks,
                self.pad)


def _index_shape(r):
    nd = r.choice((0, 1, 1, 2, 3))
    return tuple(r.choice((1, 2, 3, 4, 5) if r.random() < 0.9 else (0,)) for _ in range(nd))


def lowrank_base(r: random.Random) -> EmbCall:
    num, R, dim = r.randint(1, 20), r.randint(1, 5), r.randint(1, 8)
    dtype = r.choice((torch.float64, torch.float64, torch.float32))
    idx = randint(r, 0, num, _index_shape(r), r.choice((torch.int64, torch.int32)))
    pad = -1 if r.random() < 0.6 else r.randrange(num)
    U, V = randn(r, (num, R), dtype), randn(r, (R, dim), dtype)
    gy = randn(r, (*idx.shape, dim), dtype)
    return EmbCall(idx, pad, U=U, V=V, gy=gy, need=(r.random() < 0.8, r.random() < 0.8))


def tt_base(r: random.Random) -> EmbCall:
    d = r.randint(1, 3)
    modes = [r.randint(1, 4) for _ in range(d)]
    dims = [r.randint(1, 3) for _ in range(d)]
    ranks = [1] + [r.randint(1, 3) for _ in range(d - 1)] + [1]
    n_all = math.prod(modes)
    num = r.randint(max(1, n_all // 2), n_all)
    dtype = r.choice((torch.float64, torch.float64, torch.float32))
    numel = sum(ranks[k] * modes[k] * dims[k] * ranks[k + 1] for k in range(d))
    idx = randint(r, 0, num, _index_shape(r), r.choice((torch.int64, torch.int32)))
    pad = -1 if r.random() < 0.6 else r.randrange(num)
    gy = randn(r, (*idx.shape, math.prod(dims)), dtype)
    return EmbCall(idx, pad, w=randn(r, (numel,), dtype, 0.7), num=num, modes=modes, dims=dims,
                   ranks=ranks, gy=gy)


def _valid_rows(indices, num, pad):
    idx = indices.long().reshape(-1)
    assert bool(((idx >= 0) & (idx < num)).all()), "returned for out-of-range indices"
    return idx, idx != pad


def ref_lowrank(c: EmbCall, grads=False):
    num = c.U.shape[0]
    idx, keep = _valid_rows(c.indices, num, c.pad)
    U = c.U.detach().double().requires_grad_(grads)
    V = c.V.detach().double().requires_grad_(grads)
    # Padding rows are zeros, not 0·U[pad]: that would be NaN for an Inf in U.
    y = torch.zeros(idx.numel(), V.shape[1], dtype=torch.float64).index_put(
        (keep.nonzero()[:, 0],), U[idx[keep]] @ V)
    if not grads:
        return y.reshape(*c.indices.shape, V.shape[1])
    gy = c.gy.detach().double().reshape(y.shape)
    return torch.autograd.grad(y, (U, V), gy, allow_unused=True)


def _tt_cores(c: EmbCall, w):
    out, off = [], 0
    for k in range(len(c.modes)):
        shape = (c.ranks[k], c.modes[k], c.dims[k], c.ranks[k + 1])
        n = math.prod(shape)
        out.append(w[off:off + n].view(shape))
        off += n
    assert off == w.numel(), "weights: numel differs from the cores'"
    return out


def ref_tt(c: EmbCall, grads=False):
    """The looked-up rows, index by index through the cores' slices (works
    for any vocabulary size)."""
    idx, keep = _valid_rows(c.indices, c.num, c.pad)
    w = c.w.detach().double().reshape(-1).requires_grad_(grads)
    cores = _tt_cores(c, w)
    d, dim = len(cores), math.prod(c.dims)
    div = [math.prod(c.modes[k + 1:]) for k in range(d)]
    rows = idx[keep]  # padding rows stay zeros (not 0·row: NaN for an Inf)
    b = rows.numel()
    state = torch.ones(b, 1, 1, dtype=torch.float64)  # [B, D, r]
    for k, G in enumerate(cores):
        digit = (rows // div[k]) % c.modes[k]
        sl = G.permute(1, 0, 2, 3)[digit]  # [B, r, m, r']
        state = torch.einsum("bDr,brms->bDms", state, sl).reshape(b, state.shape[1] * G.shape[2],
                                                                    G.shape[3])
    y = torch.zeros(idx.numel(), dim, dtype=torch.float64).index_put(
        (keep.nonzero()[:, 0],), state.reshape(b, dim))
    if not grads:
        return y.reshape(*c.indices.shape, math.prod(c.dims))
    return torch.autograd.grad(y, w, c.gy.detach().double().reshape(y.shape), allow_unused=True)[0]


def verify_lowrank(c: EmbCall):
    def verify(y):
        want = (*c.indices.shape, c.V.shape[1])
        assert tuple(y.shape) == want, f"y: shape {tuple(y.shape)}, the fake says {want}"
        assert y.dtype == c.U.dtype
        if y.device.type == "meta":
            return
        assert_close(y, ref_lowrank(c), c.U.dtype, "y", finite(c.U, c.V))
    return verify


def verify_lowrank_backward(c: EmbCall):
    def verify(out):
        gU, gV = out
        for name, t, need, like in (("grad_U", gU, c.need[0], c.U), ("grad_V", gV, c.need[1], c.V)):
            want = tuple(like.shape) if need else (0,)
            assert tuple(t.shape) == want, f"{name}: shape {tuple(t.shape)}, the fake says {want}"
        if gU.device.type == "meta" or not any(c.need):
            return  # (nothing asked for: the indices are not read, nor checked)
        ok = finite(c.U, c.V, c.gy)
        rU, rV = ref_lowrank(c, grads=True)
        for name, t, need, ref, like in (("grad_U", gU, c.need[0], rU, c.U),
                                         ("grad_V", gV, c.need[1], rV, c.V)):
            if need:
                ref = ref if ref is not None else torch.zeros(like.shape, dtype=torch.float64)
                assert_close(t, ref, c.U.dtype, name, ok)
    return verify


def verify_tt(c: EmbCall):
    def verify(y):
        want = (*c.indices.shape, math.prod(c.dims))
        assert tuple(y.shape) == want, f"y: shape {tuple(y.shape)}, the fake says {want}"
        assert y.dtype == c.w.dtype
        if y.device.type == "meta":
            return
        assert_close(y, ref_tt(c), c.w.dtype, "y", finite(c.w))
    return verify


def verify_tt_backward(c: EmbCall):
    def verify(gw):
        assert tuple(gw.shape) == tuple(c.w.shape), f"grad_weights: shape {tuple(gw.shape)}"
        if gw.device.type == "meta":
            return
        ref = ref_tt(c, grads=True)
        ref = ref if ref is not None else torch.zeros(c.w.numel(), dtype=torch.float64)
        assert_close(gw.reshape(-1), ref, c.w.dtype, "grad_weights", finite(c.w, c.gy))
    return verify


# ---- mutations of an embedding call: (r, EmbCall) -> (desc, EmbCall) ---------
def me_indices(r, c):
    num = c.U.shape[0] if c.U is not None else c.num
    idx = c.indices
    kind = r.choice(("value", "value", "dtype", "8-d", "7-d", "0-d", "empty", "transposed",
                     "expanded", "strided"))
    if kind == "value":
        if idx.numel() == 0:
            idx = torch.zeros(3, dtype=idx.dtype)
        i64 = idx.dtype == torch.int64
        v = r.choice((num, num + 1, -1, -num, 2**31 - 1, -2**31, r.randrange(num)) +
                     ((2**40, 2**62, 2**63 - 1, -2**63) if i64 else ()))
        idx = idx.clone()
        i = r.randrange(idx.numel())
        idx.view(-1)[i] = v
        kind = f"value {v} at {i}"
    elif kind == "dtype":
        dt = r.choice((torch.float32, torch.float64, torch.bool, torch.uint8, torch.int16,
                       torch.int8, torch.int32, torch.int64))
        idx = idx.to(dt)
        kind = f"dtype {dt}"
    elif kind in ("8-d", "7-d", "0-d"):  # one index, as many dims (8: one too many)
        one = idx.reshape(-1)[:1] if idx.numel() else torch.zeros(1, dtype=idx.dtype)
        idx = one.reshape([1] * int(kind[0]))
    elif kind == "empty":
        idx = idx.new_zeros(r.choice(((0,), (3, 0, 2), (0, 0))))
    elif kind == "transposed":
        idx = idx.t() if idx.dim() == 2 else idx.reshape(-1, 1).t()
    elif kind == "expanded":
        idx = idx.reshape(-1)[:1].expand(6) if idx.numel() else idx
    else:
        idx = strided(idx)
    # grad_y follows the new index shape (the backward mutations then test
    # the indices, not grad_y).
    dim = c.gy.shape[-1]
    gy = randn(r, (*idx.shape, dim), c.gy.dtype)
    return f"indices {kind}", dataclasses.replace(c, indices=idx, gy=gy)


def me_padding_idx(r, c):
    num = c.U.shape[0] if c.U is not None else c.num
    top = math.prod(c.modes) if c.modes is not None else num
    p = r.choice((-1, r.randrange(num), num, top, num + 5, -2, -num, 2**31, 2**62, 2**63 - 1,
                  -2**63))
    return f"padding_idx {p}", dataclasses.replace(c, pad=p)


def me_lowrank_factors(r, c):
    U, V = c.U, c.V
    kind = r.choice(("U variant", "V variant", "U 1-D", "U 3-D", "V wrong R", "U column-major",
                     "U strided", "U expanded", "V transposed layout", "R = 0", "dim = 0",
                     "num = 0", "dtype mix", "nonfinite U", "nonfinite V", "V expanded huge"))
    if kind == "U variant":
        kind, U = _tensor_variants(r, U)
        kind = f"U {kind}"
    elif kind == "V variant":
        kind, V = _tensor_variants(r, V)
        kind = f"V {kind}"
    elif kind == "U 1-D":
        U = U.reshape(-1)
    elif kind == "U 3-D":
        U = U.unsqueeze(0)
    elif kind == "V wrong R":
        V = torch.cat([V, V[:1]])
    elif kind == "U column-major":
        U = U.t().contiguous().t()
    elif kind == "U strided":
        U = strided(U)
    elif kind == "U expanded":
        U = U[:1].expand(U.shape)
    elif kind == "V transposed layout":
        V = V.t().contiguous().t()
    elif kind == "R = 0":
        U, V = U[:, :0], V[:0]
    elif kind == "dim = 0":
        V = V[:, :0]
    elif kind == "num = 0":
        U = U[:0]
    elif kind == "dtype mix":
        V = V.to(torch.float32 if V.dtype == torch.float64 else torch.float64)
    elif kind == "nonfinite U":
        U, d = _poison(r, U)
        kind += f" {d}"
    elif kind == "V expanded huge":  # [R, 2^31..2^60] columns of stride 0: too wide for BLAS
        V = V[:, :1].expand(V.shape[0], r.choice((2**31, 2**40, 2**60)))
    else:
        V, d = _poison(r, V)
        kind += f" {d}"
    dim = V.shape[-1] if V.dim() >= 1 and V.shape[-1] < 2**31 else 1
    gy = randn(r, (*c.indices.shape, dim), c.gy.dtype)
    return kind, dataclasses.replace(c, U=U, V=V, gy=gy)


def me_emb_grad_y(r, c):
    g = c.gy
    kind = r.choice(("variant", "last dim+1", "flat", "transposed", "nonfinite", "extra dim",
                     "strided"))
    if kind == "variant":
        kind, g = _tensor_variants(r, g)
    elif kind == "last dim+1":
        g = torch.cat([g, g[..., :1]], -1)
    elif kind == "flat":
        g = g.reshape(-1)
    elif kind == "transposed":
        g = g.transpose(0, -1) if g.dim() >= 2 else g
    elif kind == "nonfinite":
        g, d = _poison(r, g)
        kind += f" {d}"
    elif kind == "extra dim":
        g = g.unsqueeze(0)
    else:
        g = strided(g)
    return f"grad_y {kind}", dataclasses.replace(c, gy=g)


def me_meta(r, c):
    kind = r.choice(("all meta", "all meta", "indices meta only", "factors meta only"))
    meta = lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t  # noqa: E731
    if kind == "all meta":
        return kind, dataclasses.replace(c, indices=meta(c.indices), U=meta(c.U), V=meta(c.V),
                                         w=meta(c.w), gy=meta(c.gy))
    if kind == "indices meta only":
        return kind, dataclasses.replace(c, indices=meta(c.indices))
    return kind, dataclasses.replace(c, U=meta(c.U), V=meta(c.V), w=meta(c.w))


def me_none(r, c):
    """None (an undefined tensor) for a tensor argument."""
    fields = ("indices", "gy") + (("U", "V") if c.U is not None else ("w",))
    which = r.choice(fields + ("nothing",))
    if which == "nothing":
        return "control", c
    return f"{which} None", dataclasses.replace(c, **{which: None})


def me_tt_lists(r, c):
    modes, dims, ranks = list(c.modes), list(c.dims), list(c.ranks)
    w = c.w
    kind = r.choice(("modes value", "dims value", "ranks value", "modes empty", "9 modes",
                     "8 modes of 1", "dims shorter", "ranks longer", "ranks ends", "vocabulary "
                     "overflows", "dims product overflows", "huge vocabulary",
                     "huge dim, no lookups", "as tuples"))
    num, idx, gy = c.num, c.indices, c.gy
    if kind == "modes value":
        modes, d = mutate_list(r, modes, 1)
        kind += f" {d}"
    elif kind == "dims value":
        dims, d = mutate_list(r, dims, 1)
        kind += f" {d}"
    elif kind == "ranks value":
        ranks, d = mutate_list(r, ranks, 1)
        kind += f" {d}"
    elif kind == "modes empty":
        modes = []
    elif kind == "9 modes":
        modes, dims, ranks = [1] * 9, [1] * 9, [1] * 10
        w = w.new_ones(9)
    elif kind == "8 modes of 1":  # valid: a table of one row of 1
        modes, dims, ranks, num = [1] * 8, [1] * 8, [1] * 9, 1
        w = randn(r, (8,), w.dtype)
        idx = idx.new_zeros(idx.shape)
        gy = randn(r, (*idx.shape, 1), w.dtype)
        if c.pad not in (-1, 0):
            c = dataclasses.replace(c, pad=-1)
    elif kind == "dims shorter":
        dims = dims[:-1]
    elif kind == "ranks longer":
        ranks = ranks + [1]
    elif kind == "ranks ends":
        ranks[r.choice((0, -1))] = r.choice((0, 2, -1, 2**62))
    elif kind == "vocabulary overflows":  # ∏ n_k = 2^64, the cores only 2048 numbers
        modes, dims, ranks = [256] * 8, [1] * 8, [1] * 9
        w = randn(r, (2048,), w.dtype)
    elif kind == "dims product overflows":
        modes, dims, ranks = [1] * 8, [256] * 8, [1] * 9
        w = randn(r, (2048,), w.dtype)
    elif kind == "huge vocabulary":  # ∏ n_k = 2^56 rows, valid: indices up to 2^56 - 1
        modes, dims, ranks = [128] * 8, [1] * 8, [1] * 9
        num = 2**56
        w = randn(r, (1024,), w.dtype, 0.9)
        idx = randint(r, 0, 2**56, idx.shape, torch.int64)
        gy = randn(r, (*idx.shape, 1), w.dtype)
        if c.pad != -1:
            c = dataclasses.replace(c, pad=r.choice((-1, 2**56 - 1, 12345)))
    elif kind == "huge dim, no lookups":  # y [0, 2^31]: nothing to compute
        modes, dims, ranks = [1, 1], [2**16, 2**15], [1, 1, 1]
        num = 1
        w = randn(r, (2**16 + 2**15,), w.dtype)
        idx = idx.new_zeros(0)
        gy = w.new_zeros(0, 2**31)
        c = dataclasses.replace(c, pad=-1)
    else:
        modes, dims, ranks = tuple(modes), tuple(dims), tuple(ranks)
    return f"lists {kind}", dataclasses.replace(c, modes=modes, dims=dims, ranks=ranks, w=w,
                                               num=num, indices=idx, gy=gy)


def me_tt_weights(r, c):
    kind, w = _tensor_variants(r, c.w)
    if kind == "same" and r.random() < 0.5:
        w, d = _poison(r, w)
        kind = f"nonfinite {d}"
    return f"weights {kind}", dataclasses.replace(c, w=w)


def me_tt_num(r, c):
    n_all = math.prod(c.modes)
    num = r.choice((-1, 0, 1, n_all, n_all + 1, c.num, 2**62, 2**63 - 1, -2**63))
    pad = c.pad if c.pad == -1 or (0 <= c.pad < max(num, 0)) else -1
    return f"num_embeddings {num}", dataclasses.replace(c, num=num, pad=pad)


def emb_cases(r: random.Random, n_valid: int, n_per_mutation: int):
    cases = []

    def lr(cat, desc, c, bwd, must=False):
        if bwd:
            return vary(r, Case(cat, desc, lambda: ops.lowrank_embedding_backward(*c.lr_bwd_args()),
                                verify_lowrank_backward(c), EMB_NAMES, must))
        return vary(r, Case(cat, desc, lambda: ops.lowrank_embedding(*c.lr_args()),
                            verify_lowrank(c), EMB_NAMES, must))

    def tt(cat, desc, c, bwd, must=False):
        if bwd:
            return vary(r, Case(cat, desc, lambda: ops.tt_embedding_backward(*c.tt_bwd_args()),
                                verify_tt_backward(c), EMB_NAMES, must))
        return vary(r, Case(cat, desc, lambda: ops.tt_embedding(*c.tt_args()), verify_tt(c),
                            EMB_NAMES, must))

    def lr_desc(c):
        return f"U {tuple(c.U.shape)} V {tuple(c.V.shape)} indices {tuple(c.indices.shape)} " \
               f"pad {c.pad}"

    def tt_desc(c):
        return f"num {c.num} modes {c.modes} dims {c.dims} ranks {c.ranks} indices " \
               f"{tuple(c.indices.shape)} pad {c.pad}"

    for bwd in (False, True):
        sfx = "_bwd" if bwd else ""
        for _ in range(n_valid):
            c = lowrank_base(r)
            cases.append(lr(f"lowrank.valid{sfx}", lr_desc(c), c, bwd, must=True))
            c = tt_base(r)
            cases.append(tt(f"tt.valid{sfx}", tt_desc(c), c, bwd, must=True))
        lr_muts = {"indices": me_indices, "padding_idx": me_padding_idx,
                   "factors": me_lowrank_factors, "meta": me_meta, "none": me_none}
        tt_muts = {"indices": me_indices, "padding_idx": me_padding_idx, "lists": me_tt_lists,
                   "weights": me_tt_weights, "num_embeddings": me_tt_num, "meta": me_meta,
                   "none": me_none}
        if bwd:
            lr_muts["grad_y"] = tt_muts["grad_y"] = me_emb_grad_y
        for name, fn in lr_muts.items():
            for _ in range(n_per_mutation):
                c = lowrank_base(r)
                d, c2 = fn(r, c)
                cases.append(lr(f"lowrank.{name}{sfx}", f"{d}; base {lr_desc(c)}", c2, bwd))
        for name, fn in tt_muts.items():
            for _ in range(n_per_mutation):
                c = tt_base(r)
                d, c2 = fn(r, c)
                cases.append(tt(f"tt.{name}{sfx}", f"{d}; base {tt_desc(c)}", c2, bwd))
    return cases


# ---------------------------------------------------------------------------
# The test
# ---------------------------------------------------------------------------
def _report(tally):
    width = max(len(k) for k in tally)
    lines = [f"{'category':<{width}}  returned  raised"]
    for k in sorted(tally):
        lines.append(f"{k:<{width}}  {tally[k][0]:>8}  {tally[k][1]:>6}")
    return "\n".join(lines)


def test_fuzz_ops_never_crash_and_return_right_results():
    # A hang fails loudly; into sys.__stderr__, a real file even when pytest
    # captures sys.stderr (--capture=sys, as make test-py-asan runs).
    faulthandler.dump_traceback_later(HANG_S, exit=True, file=sys.__stderr__)
    try:
        t0 = time.perf_counter()
        r = random.Random(SEED)
        torch.manual_seed(SEED)  # the layers' initialisation
        cases = conv_cases(r, n_valid=120, n_per_mutation=110)
        cases += emb_cases(r, n_valid=80, n_per_mutation=90)
        tally, failures = run_cases(cases)
        elapsed = time.perf_counter() - t0
    finally:
        faulthandler.cancel_dump_traceback_later()
    print(f"\n{len(cases)} calls in {elapsed:.1f} s\n{_report(tally)}")
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:40])
    # Every category ran; the valid ones only returned; each mutation
    # category both returned (its harmless variants) and raised.
    assert len(cases) >= 3000
    for cat, (ret, rai) in tally.items():
        if cat.split(".")[1].startswith("valid"):
            assert rai == 0 and ret > 0, (cat, ret, rai)
        else:
            assert ret > 0 and rai > 0, f"{cat}: returned {ret}, raised {rai}: not both"
