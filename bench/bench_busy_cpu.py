"""factorch and torch on a busy CPU: each layer's time with the machine quiet
and with a competing CPU-bound process pinned to one core (a Python busy
loop under `taskset`), and the slowdown factor busy / quiet of each.

A shared machine is the usual case: a thread pool whose fork/join waits for a
descheduled thread loses a scheduler tick per join, so an op made of many
small parallel calls slows down far more than one large call. The floor: a
factorch layer's slowdown is at most torch's own slowdown on the same shape
(nn.Linear, the dense layer it replaces) times 1.2. factorch's kernels claim
their chunks as threads come and stop using the pool for a while when a call
waited long at its join (factorch.set_stall_policy); the table counts those
stalls.

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

import factorch
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
    ap.add_argument("--warmup", type=float, default=0.3,
                    help="seconds each candidate runs unmeasured when the busy state starts")
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
            stalls = {"quiet": 0, "busy": 0}
            for fn in cands.values():
                fn()
            for r in range(args.rounds):
                for state in ("quiet", "busy"):
                    names = list(cands)[r % 2:] + list(cands)[: r % 2]
                    # Steady state in each: a hold left by the busy state
                    # ends when the quiet one starts (as it would after a
                    # while); in the busy state each candidate first runs
                    # --warmup seconds unmeasured (factorch's holds grow there).
                    if state == "quiet":
                        factorch.set_stall_policy()
                    before = factorch.pool_stalls()["stalls"]
                    with Busy(args.core) if state == "busy" else contextlib.nullcontext():
                        for n in names:
                            if state == "busy":
                                harness.time_call(cands[n], args.warmup)
                            samples[state, n].append(harness.time_call(cands[n], args.min_time))
                    stalls[state] += factorch.pool_stalls()["stalls"] - before
            med = {k: statistics.median(v) for k, v in samples.items()}
            slow = {n: med["busy", n] / med["quiet", n] for n in cands}
            ok = slow["factorch"] <= 1.2 * slow["nn.Linear"]
            worst.append(ok)
            rows.append([label, str(M), "fwd+bwd" if train else "fwd",
                         harness.fmt_time(med["quiet", "factorch"]), harness.fmt_time(med["busy", "factorch"]),
                         f"{slow['factorch']:.2f}x",
                         harness.fmt_time(med["quiet", "nn.Linear"]), harness.fmt_time(med["busy", "nn.Linear"]),
                         f"{slow['nn.Linear']:.2f}x", "yes" if ok else "**no**",
                         f"{stalls['quiet']} / {stalls['busy']}"])
            print(" | ".join(rows[-1]), flush=True)
    cmd = ".venv/bin/python " + " ".join(shlex.quote(a) for a in sys.argv)
    body = (
        f"Command: `{cmd}`\n\nMachine: {harness.machine()}. The busy process: `taskset -c "
        f"{args.core} python -c '{BUSY_LOOP}'`, started before and killed after each busy "
        f"sample set; states alternate over {args.rounds} rounds, medians (each sample >= "
        f"{args.min_time}s; in the busy state each candidate first runs {args.warmup}s "
        f"unmeasured). Slowdown = busy / quiet; the floor: factorch's slowdown <= 1.2 x "
        f"nn.Linear's on the same shape. float32, bias on both. Stalls: factorch's parallel calls "
        f"whose caller waited at the pool's join (factorch.set_stall_policy: two in a row stop the "
        f"pool for a hold), over all rounds of a state.\n\n"
        + harness.markdown_table(["layer", "M", "pass", "factorch quiet", "factorch busy",
                                  "factorch slowdown", "nn.Linear quiet", "nn.Linear busy",
                                  "nn.Linear slowdown", "floor", "factorch stalls quiet / busy"],
                                 rows)
        + f"\n\nFloor met in {sum(worst)} of {len(worst)} cases."
    )
    if args.write:
        harness.write_section(args.write, TITLE, body)


if __name__ == "__main__":
    main()
