"""FactorizedLinear with CP, Tucker and Tensor-Train weights against the
peers, forward+backward (output plus the gradients of x, the factors and the
bias), interleaved in one run:

- TensorLy-Torch's FactorizedLinear (tltorch), implementation="factorized"
  (one einsum, path chosen by opt_einsum) and "reconstructed" (rebuilds W,
  then F.linear); its "blocktt" is the TT-matrix;
- TorchTT's LinearLayerTT (a chain of tensordots over the cores), for TT;
- dense nn.Linear.

Layer: in = out = 4096 tensorized as (8, 8, 8, 8) on both sides; ranks are
tltorch's for the parameter fractions 0.1, 0.02, 0.005 (about 10x, 50x and
200x compression), so every library holds the same factor shapes; M = 1,
128, 2048 rows. factorch is first checked to compute the same function as
tltorch (its weights are copied in). Peers that would need more memory or
time than the limits below are skipped and say so, from an estimate made
before they run (opt_einsum's contraction path for tltorch; the tensordot
chain's sizes for torchtt).

    .venv/bin/pip install tensorly-torch torchtt   # the peers ("bench" extra)
    .venv/bin/python bench/bench_factorized_linear.py [--quick] [--forward] [--write bench/RESULTS.md]

--quick: one round of short samples and tighter limits on the peers, to
check the script (minutes); the full run is meant for a quiet machine.
--forward: the forward alone, under no_grad (its own section).
"""

from __future__ import annotations

import argparse
import math
import shlex
import statistics
import sys
import time
import warnings

import torch
from torch import nn

import factorch
from factorch.nn import FactorizedLinear

from harness import fmt_time, interleaved, machine, markdown_table, write_section

warnings.filterwarnings("ignore", message=".*C\\+\\+ implementation not available.*")

MODES = (8, 8, 8, 8)
FRACTIONS = [(0.1, "10x"), (0.02, "50x"), (0.005, "200x")]
BATCHES = [1, 128, 2048]
FACTS = ["cp", "tucker", "tt"]
TL_NAME = {"cp": "cp", "tucker": "tucker", "tt": "blocktt"}


def peers_available():
    try:
        import tltorch  # noqa: F401
        import torchtt  # noqa: F401
    except ImportError as e:
        sys.exit(f"bench: the peers are missing ({e}); install them with "
                 "`.venv/bin/pip install tensorly-torch torchtt`")


# --------------------------------------------------------------------------
# Layers with the same factor shapes in every library
# --------------------------------------------------------------------------
def tltorch_layer(fact, fraction, implementation):
    import tltorch

    torch.manual_seed(0)
    return tltorch.FactorizedLinear(MODES, MODES, factorization=TL_NAME[fact], rank=fraction,
                                    implementation=implementation)


def factorch_like(tl, fact):
    """A factorch layer with tltorch layer tl's ranks, its weights copied in."""
    w = tl.weight
    if fact == "cp":
        rank = int(w.rank)
    elif fact == "tucker":
        r = list(w.rank)  # tltorch: output ranks, then input ranks
        rank = (tuple(r[4:]), tuple(r[:4]))
    else:
        rank = tuple(int(v) for v in w.rank)
    ours = FactorizedLinear(4096, 4096, fact, rank=rank, tensorized_shape=(MODES, MODES))
    with torch.no_grad():
        if fact == "cp":  # tltorch: factors of the output modes first, weights λ
            outs, ins = w.factors[:4], w.factors[4:]
            for v, f in zip(ours.in_factors, ins):
                v.copy_(f)
            for k, (v, f) in enumerate(zip(ours.out_factors, outs)):
                v.copy_(f * w.weights[None, :] if k == 0 else f)
        elif fact == "tucker":
            ours.core.copy_(w.core)
            for v, f in zip(ours.in_factors, w.factors[4:]):
                v.copy_(f)
            for v, f in zip(ours.out_factors, w.factors[:4]):
                v.copy_(f)
        else:  # tltorch BlockTT cores are [r, o, i, r']
            for v, f in zip(ours.cores, w.factors):
                v.copy_(f.permute(0, 2, 1, 3))
        ours.bias.copy_(tl.bias)
    return ours


class TorchTT(nn.Module):
    """torchtt's LinearLayerTT on [M, 4096] rows."""

    def __init__(self, ranks):
        super().__init__()
        import torchtt

        self.layer = torchtt.nn.LinearLayerTT(list(MODES), list(MODES), list(ranks))

    def forward(self, x):
        return self.layer(x.reshape(x.shape[0], *MODES)).reshape(x.shape[0], -1)


# --------------------------------------------------------------------------
# Estimates that keep a peer from exhausting the (shared) machine
# --------------------------------------------------------------------------
def tltorch_estimate(fact, tl, M, implementation):
    """(bytes, seconds) one forward+backward of tltorch would need, roughly:
    the path opt_einsum picks (as torch.einsum does) for "factorized"; the
    reconstruction's largest product for "reconstructed". Seconds at ~80
    GFLOP/s (what its einsums reached here), x3 for the backward."""
    import opt_einsum

    w = tl.weight
    if implementation == "reconstructed":
        if fact == "cp":  # tensorly's cp_to_tensor: a Khatri–Rao of 7 factors [8^7, R]
            elems = 8**7 * int(w.rank)
            flops = 2 * 8 * elems
        else:
            elems, flops = 3 * 4096 * 4096, 2 * 4096 * 4096 * 256
        flops += 2 * M * 4096 * 4096
        return 4 * elems * 2, 3 * flops / 80e9
    if fact == "cp":
        eq = "bcdef,a,ga,ha,ia,ja,ca,da,ea,fa->bghij"
        shapes = [(M, *MODES), (w.rank,)] + [(8, w.rank)] * 8
    elif fact == "tucker":
        r = list(w.rank)
        eq = "zijkl,abcdefgh,ma,nb,oc,pd,ie,jf,kg,lh->zmnop"
        shapes = [(M, *MODES), tuple(r)] + [(8, v) for v in r]
    else:
        r = list(w.rank)
        eq = "zabcd,AeaB,BfbC,CgcD,DhdE->zefgh"
        shapes = [(M, *MODES)] + [(r[k], 8, 8, r[k + 1]) for k in range(4)]
    _, info = opt_einsum.contract_path(eq, *shapes, shapes=True, optimize="auto")
    return 4 * float(info.largest_intermediate) * 3, 3 * float(info.opt_cost) / 80e9


def torchtt_estimate(ranks, M):
    """The tensordot chain keeps, per core, [M, i_(>k), o_(<=k), r_k]."""
    sizes, flops = [], 0.0
    for k in range(4):
        rows = M * 8 ** (3 - k) * 8**k
        sizes.append(rows * 8 * ranks[k + 1])
        flops += 2 * rows * ranks[k] * 8 * 8 * ranks[k + 1]
    return 4 * sum(sizes) * 2, 3 * flops / 80e9


# --------------------------------------------------------------------------
# One case: a factorization, a compression, a batch size
# --------------------------------------------------------------------------
def run_case(fact, fraction, M, args, rows, floors, ratios):
    torch.manual_seed(0)
    tl_f = tltorch_layer(fact, fraction, "factorized")
    tl_r = tltorch_layer(fact, fraction, "reconstructed")
    ours = factorch_like(tl_f, fact)
    dense = nn.Linear(4096, 4096)
    x = torch.randn(M, 4096, requires_grad=True)
    g = torch.randn(M, 4096)
    if M == 1:  # the same function (cheap for every peer at one row)
        with torch.no_grad():
            want = tl_f(x)
            got = ours(x)
        err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
        assert err < 1e-3, f"{fact} {fraction}: factorch and tltorch disagree ({err:.2e})"

    cands, skipped = {"factorch": ours}, {}
    mem_cap, time_cap = args.max_peer_bytes, args.max_peer_seconds
    for name, mod, impl in (("tltorch factorized", tl_f, "factorized"),
                            ("tltorch reconstructed", tl_r, "reconstructed")):
        b, s = tltorch_estimate(fact, mod, M, impl)
        if b > mem_cap or s > time_cap:
            skipped[name] = f"skipped (est. {b / 2**30:.1f} GiB, {s:.0f} s/call)"
        else:
            cands[name] = mod
    if fact == "tt":
        ranks = ours.rank
        b, s = torchtt_estimate(ranks, M)
        if b > mem_cap or s > time_cap:
            skipped["torchtt"] = f"skipped (est. {b / 2**30:.1f} GiB, {s:.0f} s/call)"
        else:
            cands["torchtt"] = TorchTT(ranks)
    cands["nn.Linear"] = dense

    def step(mod):
        if args.forward:
            x0 = x.detach()

            def fwd():
                with torch.no_grad():
                    return mod(x0)
            return fwd
        params = [x, *mod.parameters()]
        return lambda: torch.autograd.grad(mod(x), params, g)

    fns = {n: step(m) for n, m in cands.items()}
    # Slow cases get fewer rounds so that the whole run stays near 10 minutes.
    t0 = time.perf_counter()
    fns["factorch"]()
    one = time.perf_counter() - t0
    rounds = args.rounds if one < 0.5 else max(1, min(args.rounds, 3))
    med = interleaved(fns, rounds, args.min_time, warm_each=False)

    names = ["factorch", "tltorch factorized", "tltorch reconstructed", "torchtt", "nn.Linear"]
    cell = {n: fmt_time(med[n]) if n in med else skipped.get(n, "—") for n in names}
    tl_best = min((med[n] for n in ("tltorch factorized", "tltorch reconstructed") if n in med),
                  default=None)
    vs_tl = f"{tl_best / med['factorch']:.2f}x" if tl_best else "—"
    vs_dense = f"{med['nn.Linear'] / med['factorch']:.2f}x"
    alt = min(med["nn.Linear"], tl_best) if tl_best else med["nn.Linear"]
    vs_alt = alt / med["factorch"]
    info = ours.plan(M)
    plan = (f"{info['plan']} [fwd {info['forward_strategy']}]" if args.forward else
            f"{info['plan']} [fwd {info['forward_strategy']}, bwd {info['backward_strategy']}]")
    row = [fact, f"{ours.compression_ratio:.1f}x", str(ours.rank).replace(" ", ""), str(M),
           *[cell[n] for n in names], vs_tl, vs_dense,
           f"{vs_alt:.2f}x{'' if vs_alt >= 0.9 else ' **below 0.9**'}", plan]
    ratios.setdefault("vs_tl", []).append(tl_best / med["factorch"] if tl_best else None)
    ratios.setdefault("vs_alt", []).append(vs_alt)
    rows.append(row)
    print(" | ".join(row), flush=True)
    if M == 2048 and fact == "tucker" and tl_best and not args.forward:
        label = dict(FRACTIONS)[fraction]
        ok = tl_best / med["factorch"] >= 2.5
        floors.append(f"- tucker {label} at M = 2048: {vs_tl} the faster tltorch mode (floor "
                      f"2.5x): {'met' if ok else 'NOT met'}")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one round, short samples, tight limits")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-time", type=float, default=0.2, help="seconds per timing sample")
    ap.add_argument("--max-peer-bytes", type=float, default=4 * 2**30,
                    help="skip a peer estimated to need more memory than this")
    ap.add_argument("--max-peer-seconds", type=float, default=40.0,
                    help="skip a peer estimated to take longer per call than this")
    ap.add_argument("--only", choices=FACTS, action="append", help="factorizations to run")
    ap.add_argument("--forward", action="store_true",
                    help="time the forward alone (under no_grad) instead of forward+backward")
    ap.add_argument("--write", metavar="RESULTS.md", help="write the table into this file")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.min_time = 1, 0.01
        args.max_peer_seconds = min(args.max_peer_seconds, 8.0)
    peers_available()
    raw = argv if argv is not None else sys.argv[1:]
    cmd = ".venv/bin/python bench/bench_factorized_linear.py " + " ".join(shlex.quote(a) for a in raw)

    rows, floors, ratios = [], [], {}
    start = time.perf_counter()
    for fact in args.only or FACTS:
        for fraction, _ in FRACTIONS:
            for M in BATCHES:
                run_case(fact, fraction, M, args, rows, floors, ratios)
    took = time.perf_counter() - start

    header = ["factorization", "compression", "rank", "M", "factorch", "tltorch factorized",
              "tltorch reconstructed", "torchtt", "nn.Linear", "vs best tltorch", "vs dense",
              "vs the faster of dense / tltorch", "factorch's plan"]
    tl = [r for r in ratios.get("vs_tl", []) if r]
    alt = ratios.get("vs_alt", [])
    if tl:
        geo = statistics.geometric_mean(tl)
        floors.append(f"- geometric mean vs the faster tltorch mode over the {len(tl)} cases it "
                      f"ran: {geo:.2f}x (floor 1.5x): {'met' if geo >= 1.5 else 'NOT met'}")
    floors.append(f"- at most 10% slower than the faster of nn.Linear and tltorch (ratio >= 0.9): "
                  f"{sum(a >= 0.9 for a in alt)} of {len(alt)} cases")
    table = markdown_table(header, rows)
    body = (
        f"Command: `{cmd}`{' (a quick check, not a measurement)' if args.quick else ''}\n\n"
        f"Machine: {machine()}; factorch {factorch.__version__} on cpu, "
        f"check_finite={factorch.get_check_finite()['cpu']}. The run took {took:.0f} s.\n"
        + ("Forward alone (y under no_grad)" if args.forward else
           "Forward+backward (y and the gradients of x, factors and bias)") +
        f" of a 4096 x 4096 layer "
        f"tensorized as (8, 8, 8, 8) x (8, 8, 8, 8), ranks as tltorch picks them for the "
        f"fractions 0.1 / 0.02 / 0.005 of the dense parameters. Median of up to {args.rounds} "
        f"interleaved rounds (fewer for cases whose factorch call takes > 0.5 s; each sample "
        f">= {args.min_time}s). Ratios > 1: factorch is faster.\n\n" + table +
        f"\n\nFloors ({'forward' if args.forward else 'fwd+bwd'}):\n\n" + "\n".join(floors)
    )
    print("\n" + table + "\n\n" + "\n".join(floors) + f"\n\n(took {took:.0f} s)")
    if args.write:
        title = "Tensorized linear layers, forward alone (cpu)" if args.forward else \
            "Tensorized linear layers (cpu)"
        write_section(args.write, title, body)


if __name__ == "__main__":
    main()
