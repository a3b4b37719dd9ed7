"""factorch and torch on a busy CPU: each layer's time with the machine quiet
and with a competing CPU-bound process pinned to one core (a Python busy
loop under `taskset`), and the slowdown factor busy / quiet of each.

A shared machine is the usual case: a thread pool whose fork/join waits for a
descheduled thread loses a scheduler tick per join, so an op made of many
small parallel calls slows down far more than one large call. The floor: a
factorch layer's slowdown is at most torch's own slowdown on the same shape
(nn.Linear, the dense layer it replaces) times 1.2.

States alternate round by round (quiet, busy, quiet, ...) and within a state
the candidates run in rotated order; figures are medians over rounds.

    .venv/bin/python bench/bench_busy_cpu.py [--rounds 5] [--write bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

import factorch  # noqa: F401  (registers the ops)
from factorch.nn import FactorizedLinear

import harness

TITLE = "Busy CPU (cpu)"

# (label, in, out, factorization, rank, tensorized_shape, M)
CASES = [
    ("lowrank 576→1536 r209", 576, 1536, "lowrank", 209, None, 1),
    ("lowrank 576→1536 r209", 576, 1536, "lowrank", 209, None, 16),
    ("lowrank 576→1536 r209", 576, 1536, "lowrank", 209, None, 512),
    ("lowrank 4096→4096 r1024", 4096, 4096, "lowrank", 1024, None, 1),
    ("lowrank 4096→4096 r1024", 4096, 4096, "lowrank", 1024, None, 16),
    ("cp 4096→4096 R64", 4096, 4096, "cp", 64, ((8, 8, 8, 8), (8, 8, 8, 8)), 1),
    ("cp 4096→4096 R64", 4096, 4096, "cp", 64, ((8, 8, 8, 8), (8, 8, 8, 8)), 128),
    ("tucker 4096→4096", 4096, 4096, "tucker", ((4, 4, 4, 4), (4, 4, 4, 4)),
     ((8, 8, 8, 8), (8, 8, 8, 8)), 1),
    ("tucker 4096→4096", 4096, 4096, "tucker", ((4, 4, 4, 4), (4, 4, 4, 4)),
     ((8, 8, 8, 8), (8, 8, 8, 8)), 128),
    ("tt 4096→4096 r16", 4096, 4096, "tt", (1, 16, 16, 16, 1), ((8, 8, 8, 8), (8, 8, 8, 8)), 1),
    ("tt 4096→4096 r16", 4096, 4096, "tt", (1, 16, 16, 16, 1), ((8, 8, 8, 8), (8, 8, 8, 8)), 128),
]

BUSY_LOOP = "while True: pass"


class Busy:
    """A CPU-bound process pinned to one core while the context is open."""

    def __init__(self, core: int):
        self.core = core
        self.proc = None

    def __enter__(self):
        self.proc = subprocess.Popen(["taskset", "-c", str(self.core), sys.executable, "-c", BUSY_LOOP])
        time.sleep(0.2)  # let it start spinning
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-time", type=float, default=0.1)
    ap.add_argument("--core", type=int, default=os.cpu_count() - 1,
                    help="the core the busy process is pinned to")
    ap.add_argument("--write", metavar="RESULTS.md")
    args = ap.parse_args()
    rows, worst = [], []
    for label, n_in, n_out, fact, rank, shape, M in CASES:
        for train in (False, True):
            torch.manual_seed(0)
            layer = FactorizedLinear(n_in, n_out, fact, rank=rank, tensorized_shape=shape)
            dense = nn.Linear(n_in, n_out)
            x = torch.randn(M, n_in, requires_grad=train)
            g = torch.randn(M, n_out)
            cands = {"factorch": harness.layer_step(layer, x, g, train),
                     "nn.Linear": harness.layer_step(dense, x, g, train)}
            samples = {(s, n): [] for s in ("quiet", "busy") for n in cands}
            for fn in cands.values():
                fn()
            for r in range(args.rounds):
                for state in ("quiet", "busy"):
                    names = list(cands)[r % 2:] + list(cands)[: r % 2]
                    with Busy(args.core) if state == "busy" else contextlib.nullcontext():
                        for n in names:
                            samples[state, n].append(harness.time_call(cands[n], args.min_time))
            med = {k: statistics.median(v) for k, v in samples.items()}
            slow = {n: med["busy", n] / med["quiet", n] for n in cands}
            ok = slow["factorch"] <= 1.2 * slow["nn.Linear"]
            worst.append(ok)
            rows.append([label, str(M), "fwd+bwd" if train else "fwd",
                         harness.fmt_time(med["quiet", "factorch"]), harness.fmt_time(med["busy", "factorch"]),
                         f"{slow['factorch']:.2f}x",
                         harness.fmt_time(med["quiet", "nn.Linear"]), harness.fmt_time(med["busy", "nn.Linear"]),
                         f"{slow['nn.Linear']:.2f}x", "yes" if ok else "**no**"])
            print(" | ".join(rows[-1]), flush=True)
    cmd = ".venv/bin/python " + " ".join(shlex.quote(a) for a in sys.argv)
    body = (
        f"Command: `{cmd}`\n\nMachine: {harness.machine()}. The busy process: `taskset -c "
        f"{args.core} python -c '{BUSY_LOOP}'`, started before and killed after each busy "
        f"sample set; states alternate over {args.rounds} rounds, medians (each sample >= "
        f"{args.min_time}s). Slowdown = busy / quiet; the floor: factorch's slowdown <= 1.2 x "
        f"nn.Linear's on the same shape. float32, bias on both.\n\n"
        + harness.markdown_table(["layer", "M", "pass", "factorch quiet", "factorch busy",
                                  "factorch slowdown", "nn.Linear quiet", "nn.Linear busy",
                                  "nn.Linear slowdown", "floor"], rows)
        + f"\n\nFloor met in {sum(worst)} of {len(worst)} cases."
    )
    if args.write:
        harness.write_section(args.write, TITLE, body)


if __name__ == "__main__":
    main()
