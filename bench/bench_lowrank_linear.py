"""FactorizedLinear (lowrank) against nn.Linear and against the same
factorization written as two plain torch matmuls, forward+backward and
forward only, interleaved in one run.

    .venv/bin/python bench/bench_lowrank_linear.py [--rounds 7] [--write bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import shlex
import sys

import torch
from torch import nn

import factorch
from factorch.nn import FactorizedLinear

from harness import fmt_time, interleaved, layer_step, machine, markdown_table, write_section

SHAPES = [  # (M, in, out, rank)
    (2048, 4096, 4096, 512),
    (128, 4096, 4096, 512),
    (1, 4096, 4096, 512),
    (2048, 1024, 1024, 64),
    (1, 64, 64, 8),  # per-call overhead
]


class PlainLowRank(nn.Module):
    """The same factorization as two torch matmuls (what users write today)."""

    def __init__(self, U, V, bias):
        super().__init__()
        self.U, self.V, self.bias = (nn.Parameter(t.detach().clone()) for t in (U, V, bias))

    def forward(self, x):
        return torch.nn.functional.linear(torch.nn.functional.linear(x, self.V), self.U, self.bias)


def candidates(M, n_in, n_out, rank, device, train):
    torch.manual_seed(0)
    fact = FactorizedLinear(n_in, n_out, rank=rank, device=device)
    plain = PlainLowRank(fact.U, fact.V, fact.bias)
    dense = nn.Linear(n_in, n_out, device=device)
    x = torch.randn(M, n_in, device=device, requires_grad=train)
    g = torch.randn(M, n_out, device=device)
    mods = {"factorch": fact, "plain torch U·V": plain, "nn.Linear": dense}

    return {name: layer_step(m, x, g, train) for name, m in mods.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--min-time", type=float, default=0.2, help="seconds per timing sample")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--write", metavar="RESULTS.md", help="write the table into this file")
    args = ap.parse_args(argv)
    cmd = "make bench-lowrank_linear  # = .venv/bin/python bench/bench_lowrank_linear.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )

    rows = []
    for M, n_in, n_out, rank in SHAPES:
        res = {}
        for train in (True, False):
            med = interleaved(candidates(M, n_in, n_out, rank, args.device, train), args.rounds, args.min_time)
            res[train] = med
        ft, pt, dt = (res[True][k] for k in ("factorch", "plain torch U·V", "nn.Linear"))
        ff, pf, df = (res[False][k] for k in ("factorch", "plain torch U·V", "nn.Linear"))
        row = [
            f"({M}, {n_in}, {n_out}, {rank})",
            fmt_time(ft), fmt_time(pt), fmt_time(dt),
            f"{dt / ft:.2f}x", f"{pt / ft:.2f}x", f"{(ft - pt) * 1e6:+.1f} µs",
            fmt_time(ff), fmt_time(pf), fmt_time(df), f"{df / ff:.2f}x", f"{pf / ff:.2f}x",
        ]
        rows.append(row)
        print(" | ".join(row), flush=True)

    header = [
        "(M, in, out, rank)",
        "fwd+bwd factorch", "fwd+bwd plain U·V", "fwd+bwd nn.Linear",
        "vs dense", "vs plain", "factorch − plain",
        "fwd factorch", "fwd plain U·V", "fwd nn.Linear", "fwd vs dense", "fwd vs plain",
    ]
    table = markdown_table(header, rows)
    body = (
        f"Command: `{cmd}`\n\n"
        f"Machine: {machine()}; factorch {factorch.__version__} on {args.device}, "
        f"check_finite={factorch.get_check_finite()[args.device.split(':')[0]]}.\n"
        f"Median of {args.rounds} interleaved rounds (each round times every candidate for "
        f">= {args.min_time}s). Ratios > 1 mean factorch is faster. "
        "fwd+bwd = output plus the gradients of x, weights and bias.\n\n" + table
    )
    print("\n" + table)
    if args.write:
        write_section(args.write, f"Low-rank linear ({args.device})", body)


if __name__ == "__main__":
    main()
