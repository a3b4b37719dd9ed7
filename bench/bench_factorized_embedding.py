"""FactorizedEmbedding ("lowrank" and "tt") against the same factorization
written in plain torch ops and against dense nn.Embedding, forward and
forward+backward (the output plus the gradients of the factors; of the
table for nn.Embedding), all interleaved in one run:

- factorch: ``factorch.nn.FactorizedEmbedding`` (one C op per direction:
  ``torch.ops.factorch.lowrank_embedding`` / ``tt_embedding``);
- plain torch, the SAME factors copied in (checked allclose against
  factorch, output and every factor's gradient, before anything is timed):
  lowrank ``F.embedding(idx, U) @ V``; tt the TT-Rec contraction of the
  looked-up core slices (``PlainTT`` below: gather ``G_k[:, i_k]`` for every
  index, then one ``torch.bmm`` per core), autograd for the backward;
- dense ``nn.Embedding`` of the same vocabulary and dim (its backward
  returns the dense [num, dim] gradient of the table, as in training).

Tables (float32, CPU): SmolLM2-135M's 49152 x 576 and Llama-2's 32000 x
4096. Batches of 1, 512 and 8192 token ids, drawn from a Zipf law (s = 1,
the shape of token frequencies in text) over a random permutation of the
vocabulary, so batches repeat ids as text does. Ranks: the fractions 0.1
and 0.02 of the dense table's parameters (about 10x and 50x compression),
resolved by FactorizedEmbedding itself; TT: its automatic three-core shape.

Each (table, batch, mode) is one interleaved group of 9 candidates (dense,
and factorch / plain torch for each factorization and compression): every
round times each of them in a rotated order, the figure is the median over
rounds. A group's rounds are cut (to >= 1) to fit --group-budget seconds,
and a candidate whose single call takes >= 1 s counts its first
(warm-up) call as a sample: the slow TT calls at batch 8192 would otherwise
take the whole run. The rounds of each group are in the table.

    .venv/bin/python bench/bench_factorized_embedding.py [--quick] [--write bench/RESULTS.md]

--quick: one round of short samples on batches 1 and 512, to check the
script (about 20 s on 2 quiet cores); the full run (about 3 minutes) is
meant for a quiet machine.
"""

from __future__ import annotations

import argparse
import math
import shlex
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import factorch

from harness import fmt_time, machine, markdown_table, time_call, write_section

# name: (num_embeddings, embedding_dim)
SHAPES = {
    "smollm2": (49152, 576),   # SmolLM2-135M
    "llama2": (32000, 4096),   # Llama-2-7B
}
SHAPE_LABEL = {"smollm2": "SmolLM2-135M", "llama2": "Llama-2"}
BATCHES = [1, 512, 8192]
QUICK_BATCHES = [1, 512]
FACTS = ["lowrank", "tt"]
FRACTIONS = [(0.1, "10x"), (0.02, "50x")]
CHECK_BATCH = 256     # ids in the allclose check (Zipf: with repeats)
SLOW_CALL = 1.0       # seconds: a first call this slow is a sample
PLAIN_CHUNK_BYTES = 1 << 30  # PlainTT: gathered slices per chunk of ids


def factorch_embedding():
    """factorch.nn.FactorizedEmbedding, or exit saying why it cannot run."""
    try:
        from factorch.nn import FactorizedEmbedding
    except ImportError as e:
        sys.exit(f"bench: factorch.nn.FactorizedEmbedding is missing ({e}); rebuild with "
                 "`make build`")
    for op in ("lowrank_embedding", "tt_embedding"):
        if not hasattr(torch.ops.factorch, op):
            sys.exit(f"bench: torch.ops.factorch.{op} is not registered: the built libraries "
                     "predate factorch/nn/embedding.py; rebuild with `make build`")
    return FactorizedEmbedding


def zipf_ids(num: int, batch: int, seed: int) -> torch.Tensor:
    """batch token ids in [0, num): P(k-th most frequent) ∝ 1/k, the
    frequencies assigned to a random permutation of the vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num, generator=gen)
    weights = 1.0 / torch.arange(1, num + 1, dtype=torch.float64)
    return perm[torch.multinomial(weights, batch, replacement=True, generator=gen)]


# --------------------------------------------------------------------------
# The same factorizations in plain torch ops
# --------------------------------------------------------------------------
class PlainLowRank:
    """T = U · V; a lookup is ``F.embedding(idx, U) @ V``."""

    def __init__(self, layer):
        self.U = layer.U.detach().clone().requires_grad_()
        self.V = layer.V.detach().clone().requires_grad_()
        self.params = [self.U, self.V]

    def forward(self, idx):
        return F.embedding(idx, self.U) @ self.V

    def fwd(self, idx):
        with torch.no_grad():
            return self.forward(idx)

    def fwd_bwd(self, idx, g):
        y = self.forward(idx)
        return y, torch.autograd.grad(y, self.params, g)


class PlainTT:
    """TT-Rec in plain torch. Cores ``G_k [r_(k-1), n_k, m_k, r_k]``
    (r_0 = r_d = 1); id i has the digits ``(i_1..i_d)`` in the mixed radix
    ``(n_1..n_d)``, i_1 slowest, and its row is
    ``G_1[:, i_1] · G_2[:, i_2] ··· G_d[:, i_d]`` reshaped to ∏ m_k.

    For a batch of B ids: gather every id's slice of every core
    (``S_k = G_k[:, i_k]`` as ``[B, r_(k-1), m_k·r_k]``), then run the chain
    left to right as batched matrix products: the state ``[B, D, r]``
    (D = m_1···m_(k-1)) times S_k is ``[B, D, m_k·r_k]``, viewed as
    ``[B, D·m_k, r_k]``; after the last core it is the rows ``[B, dim]``.
    Autograd differentiates it (the gather's backward scatter-adds into the
    cores). The gathered slices take r_(k-1)·m_k·r_k floats per id and core
    (1.6 MB per id for Llama-2 at 10x), so ids run in chunks whose slices
    fit PLAIN_CHUNK_BYTES; with a backward, one autograd.grad per chunk and
    the cores' gradients summed (one chunk in most cases here)."""

    def __init__(self, cores):
        self.cores = [c.detach().clone().requires_grad_() for c in cores]
        self.params = self.cores
        self.ns = [c.shape[1] for c in cores]
        per_id = sum(c[:, 0].numel() for c in cores) * cores[0].element_size()
        self.chunk = max(1, PLAIN_CHUNK_BYTES // per_id)

    def forward(self, idx):
        B = idx.numel()
        digits, rest = [], idx
        for n in reversed(self.ns):
            digits.append(rest % n)
            rest = rest // n
        digits.reverse()
        state = None
        for k, (G, i) in enumerate(zip(self.cores, digits)):
            r0, _, m, r1 = G.shape
            S = G.permute(1, 0, 2, 3)[i]  # [B, r0, m, r1]: the looked-up slices
            if k == 0:
                state = S.reshape(B, m, r1)  # r0 = 1
            else:
                state = torch.bmm(state, S.reshape(B, r0, m * r1)).reshape(B, -1, r1)
        return state.reshape(B, -1)

    def fwd(self, idx):
        with torch.no_grad():
            if idx.numel() <= self.chunk:
                return self.forward(idx)
            return torch.cat([self.forward(c) for c in idx.split(self.chunk)])

    def fwd_bwd(self, idx, g):
        ys, grads = [], None
        for ic, gc in zip(idx.split(self.chunk), g.split(self.chunk)):
            y = self.forward(ic)
            gs = torch.autograd.grad(y, self.params, gc)
            if grads is None:
                grads = list(gs)
            else:
                for a, b in zip(grads, gs):
                    a.add_(b)
            ys.append(y.detach())
        return (ys[0] if len(ys) == 1 else torch.cat(ys)), grads


def plain_like(layer):
    return PlainLowRank(layer) if layer.factorization == "lowrank" else PlainTT(layer.cores)


def factorch_grads(layer, grads):
    """factorch's gradients, shaped as PlainLowRank's / PlainTT's params."""
    if layer.factorization == "lowrank":
        return list(grads)  # U, V
    (gflat,) = grads
    base = layer.factors.storage_offset()
    return [gflat[c.storage_offset() - base:][: c.numel()].view(c.shape) for c in layer.cores]


def check_same(layer, plain, label):
    """factorch and the plain-torch version give the same rows and the same
    gradients of every factor (CHECK_BATCH Zipf ids, so with repeats)."""
    num, dim = layer.num_embeddings, layer.embedding_dim
    idx = zipf_ids(num, CHECK_BATCH, seed=7)
    if idx.unique().numel() == idx.numel():
        sys.exit(f"bench: {label}: the check batch has no repeated ids")
    g = torch.randn(CHECK_BATCH, dim, generator=torch.Generator().manual_seed(8))
    y = layer(idx)
    ours = factorch_grads(layer, torch.autograd.grad(y, list(layer.parameters()), g))
    y_p, theirs = plain.fwd_bwd(idx, g)
    pairs = [("output", y, y_p)] + [(f"grad of factor {k}", a, b)
                                   for k, (a, b) in enumerate(zip(ours, theirs))]
    for what, a, b in pairs:
        scale = b.abs().max().item()
        err = (a - b).abs().max().item() / max(scale, 1e-30)
        if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=1e-4 * scale):
            sys.exit(f"bench: {label}: factorch and plain torch disagree on the {what} "
                     f"(shapes {tuple(a.shape)} vs {tuple(b.shape)}, max relative error "
                     f"{err:.2e})")


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------
def interleaved_budget(cands: dict, rounds: int, min_time: float, budget: float):
    """harness.interleaved with a time budget: one warm-up call of each
    candidate (timed; kept as a sample when >= SLOW_CALL seconds), then up
    to `rounds` rotated rounds of harness.time_call samples, as many as fit
    `budget` seconds by the warm-up's estimate (at least one sample each).
    Returns ({name: median seconds per call}, rounds run)."""
    names = list(cands)
    samples: dict[str, list[float]] = {n: [] for n in names}
    est = 0.0
    for n in names:
        t0 = time.perf_counter()
        cands[n]()
        t = time.perf_counter() - t0
        if t >= SLOW_CALL:
            samples[n].append(t)
        est += max(t, min_time)
    n_rounds = max(0, min(rounds, int(budget // est)))
    for r in range(max(n_rounds, 1)):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            if r < n_rounds or not samples[n]:
                samples[n].append(time_call(cands[n], min_time, warm_up=False))
    return {n: statistics.median(s) for n, s in samples.items()}, min(len(s) for s in samples.values())


def run_shape(FactorizedEmbedding, shape_name, args, out):
    num, dim = SHAPES[shape_name]
    layers, plains = {}, {}
    for fact in args.only or FACTS:
        for fraction, cx in FRACTIONS:
            key = f"{fact} {cx}"
            torch.manual_seed(0)
            layer = FactorizedEmbedding(num, dim, fact, rank=fraction)
            plains[key] = plain_like(layer)
            check_same(layer, plains[key], f"{SHAPE_LABEL[shape_name]} {key}")
            layers[key] = layer
    torch.manual_seed(0)
    dense = nn.Embedding(num, dim)

    for batch in args.batches:
        idx = zipf_ids(num, batch, seed=batch)
        g = torch.randn(batch, dim, generator=torch.Generator().manual_seed(batch + 1))

        def fwd_bwd_of(mod):
            params = list(mod.parameters())
            return lambda: torch.autograd.grad(mod(idx), params, g)

        def fwd_of(mod):
            def call():
                with torch.no_grad():
                    return mod(idx)
            return call

        cands = {"fwd+bwd": {"dense": fwd_bwd_of(dense)}, "fwd": {"dense": fwd_of(dense)}}
        for key in layers:
            cands["fwd+bwd"][f"{key} factorch"] = fwd_bwd_of(layers[key])
            cands["fwd+bwd"][f"{key} torch"] = (lambda p: lambda: p.fwd_bwd(idx, g))(plains[key])
            cands["fwd"][f"{key} factorch"] = fwd_of(layers[key])
            cands["fwd"][f"{key} torch"] = (lambda p: lambda: p.fwd(idx))(plains[key])
        med, rounds = {}, {}
        for mode in ("fwd+bwd", "fwd"):
            t0 = time.perf_counter()
            med[mode], rounds[mode] = interleaved_budget(cands[mode], args.rounds, args.min_time,
                                                         args.group_budget)
            print(f"  [{SHAPE_LABEL[shape_name]} batch {batch} {mode}: {rounds[mode]} rounds, "
                  f"{time.perf_counter() - t0:.0f} s]", flush=True)
        distinct = idx.unique().numel()
        for key, layer in layers.items():
            row = [f"{SHAPE_LABEL[shape_name]} {num}x{dim}", f"{batch} ({distinct})", key,
                   str(layer.rank).replace(" ", ""), f"{layer.num_parameters:,}"]
            for mode in ("fwd+bwd", "fwd"):
                m = med[mode]
                f, p, d = m[f"{key} factorch"], m[f"{key} torch"], m["dense"]
                row += [fmt_time(f), fmt_time(p), fmt_time(d), f"{p / f:.2f}x", f"{d / f:.2f}x"]
            row.append(f"{rounds['fwd+bwd']}/{rounds['fwd']}")
            out["rows"].append(row)
            print(" | ".join(row), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help=f"one round of short samples, batches {QUICK_BATCHES}")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-time", type=float, default=0.1, help="seconds per timing sample")
    ap.add_argument("--group-budget", type=float, default=10.0,
                    help="seconds of timed rounds per (table, batch, mode) group (>= 1 round)")
    ap.add_argument("--only", choices=FACTS, action="append", help="factorizations to run")
    ap.add_argument("--shapes", choices=list(SHAPES), action="append", help="tables to run")
    ap.add_argument("--batches", type=int, action="append", help=f"batch sizes (default {BATCHES})")
    ap.add_argument("--write", metavar="RESULTS.md", help="write the table into this file")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.min_time = 1, 0.01
        args.batches = args.batches or QUICK_BATCHES
    args.batches = args.batches or BATCHES
    FactorizedEmbedding = factorch_embedding()
    raw = argv if argv is not None else sys.argv[1:]
    cmd = ".venv/bin/python bench/bench_factorized_embedding.py " + " ".join(
        shlex.quote(a) for a in raw)

    out = {"rows": []}
    start = time.perf_counter()
    for shape_name in args.shapes or list(SHAPES):
        run_shape(FactorizedEmbedding, shape_name, args, out)
    took = time.perf_counter() - start

    header = ["table", "batch (distinct)", "factorization", "rank", "parameters"]
    for mode in ("fwd+bwd", "fwd"):
        header += [f"{mode} factorch", f"{mode} plain torch", f"{mode} nn.Embedding",
                   f"{mode} vs plain", f"{mode} vs dense"]
    header.append("rounds")
    table = markdown_table(header, out["rows"])
    dense_params = ", ".join(f"{SHAPE_LABEL[s]} {math.prod(SHAPES[s]):,}"
                             for s in args.shapes or list(SHAPES))
    body = (
        f"Command: `{cmd}`{' (a quick check, not a measurement)' if args.quick else ''}\n\n"
        f"Machine: {machine()}; factorch {factorch.__version__} on cpu, "
        f"check_finite={factorch.get_check_finite()['cpu']}. The run took {took:.0f} s.\n"
        f"float32. fwd+bwd: the output and the gradients of the factors (nn.Embedding: of its "
        f"table, dense); fwd: the output under no_grad. Ids: Zipf (s = 1) over the vocabulary, "
        f"distinct ids in parentheses. Ranks: FactorizedEmbedding's for the fractions 0.1 / 0.02 "
        f"of the dense table's parameters ({dense_params}); TT: three cores, its automatic shape. "
        f"Plain torch: the same factors in torch ops (lowrank `F.embedding(idx, U) @ V`; tt the "
        f"TT-Rec chain, gathered core slices and `torch.bmm`), checked allclose against "
        f"factorch (output and factor gradients). Median of the rounds shown (fwd+bwd/fwd; "
        f"up to {args.rounds}, cut to fit {args.group_budget:g} s per group; calls >= "
        f"{SLOW_CALL:g} s count their warm-up call), each sample >= {args.min_time}s, all "
        f"candidates of a table and batch interleaved. Ratios > 1: factorch is faster.\n\n"
        + table
    )
    print("\n" + table + f"\n\n(took {took:.0f} s)")
    if args.write:
        write_section(args.write, "Factorized embeddings (cpu)", body)


if __name__ == "__main__":
    main()
