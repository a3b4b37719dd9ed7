"""What one call of a small factorized layer costs beyond its arithmetic:
FactorizedLinear (low rank) at 64 -> 64, rank 8, one row, against the same
factorization as two torch matmuls and against nn.Linear, for the forward
under no_grad, the forward recording a graph, and a training step (the
forward and the gradients of x and of every parameter).

    .venv/bin/python bench/bench_call_overhead.py [--rounds 9] [--write bench/RESULTS.md]
    .venv/bin/python bench/bench_call_overhead.py --callgrind [--write bench/RESULTS.md]

The first form times the calls (interleaved rounds, medians). The second
counts the instructions of each call under valgrind's callgrind, which the
machine's load does not change: each case runs its calls inside a small C
loop (compiled here with cc, the valgrind headers needed) that turns the
counting on around them only.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shlex
import subprocess
import sys
import tempfile

import torch
from torch import nn

from factorch.nn import FactorizedLinear

from bench_lowrank_linear import PlainLowRank
from harness import fmt_time, interleaved, machine, markdown_table, write_section

IN, OUT, RANK, M = 64, 64, 8, 1
CALLS = 200  # per case under callgrind


def cases() -> dict[tuple[str, str], object]:
    """(layer, pass) -> a call."""
    torch.manual_seed(0)
    fact = FactorizedLinear(IN, OUT, rank=RANK)
    mods = {"factorch": fact, "plain torch U·V": PlainLowRank(fact.U, fact.V, fact.bias),
            "nn.Linear": nn.Linear(IN, OUT)}
    x = torch.randn(M, IN, requires_grad=True)
    g = torch.randn(M, OUT)
    out = {}
    for name, mod in mods.items():
        params = [x, *mod.parameters()]

        def nograd(mod=mod):
            with torch.no_grad():
                return mod(x)

        out[name, "forward, no_grad"] = nograd
        out[name, "forward, graph"] = lambda mod=mod: mod(x)
        out[name, "training step"] = lambda mod=mod, params=params: torch.autograd.grad(
            mod(x), params, g)
    return out


PASSES = ["forward, no_grad", "forward, graph", "training step"]
LAYERS = ["factorch", "plain torch U·V", "nn.Linear"]


def table(values: dict, fmt) -> list[list[str]]:
    rows = []
    for p in PASSES:
        f, plain, dense = (values[n, p] for n in LAYERS)
        rows.append([p, fmt(f), fmt(plain), fmt(dense), f"{f / plain:.2f}",
                     f"{f / dense:.2f}"])
    return rows


# --------------------------------------------------------------------------
# Instruction counts under callgrind
# --------------------------------------------------------------------------
_LOOP_C = r"""
#include <valgrind/callgrind.h>
typedef void (*fn)(void);
/* Counts the instructions of k calls of f, alone, into a dump named name. */
void count_calls(fn f, int k, const char* name) {
  CALLGRIND_ZERO_STATS;
  CALLGRIND_TOGGLE_COLLECT;
  for (int i = 0; i < k; ++i) f();
  CALLGRIND_TOGGLE_COLLECT;
  CALLGRIND_DUMP_STATS_AT(name);
}
"""


def _count_in_this_process(lib_path: str) -> None:
    """The child under valgrind: each case's calls in the C loop."""
    lib = ctypes.CDLL(lib_path)
    callback = ctypes.CFUNCTYPE(None)
    keep = []
    for i, ((name, p), fn) in enumerate([(("empty", "empty"), lambda: None),
                                         *cases().items()]):
        for _ in range(20):
            fn()
        cb = callback(lambda fn=fn: (fn(), None)[1])
        keep.append(cb)
        lib.count_calls(cb, CALLS, f"{i}|{name}|{p}".encode())


def callgrind_counts() -> dict:
    """(layer, pass) -> instructions per call, the empty callback's subtracted."""
    tmp = tempfile.mkdtemp(prefix="fct_calls_")
    lib = os.path.join(tmp, "libcount.so")
    src = os.path.join(tmp, "count.c")
    with open(src, "w") as f:
        f.write(_LOOP_C)
    try:
        subprocess.run(["cc", "-O1", "-shared", "-fPIC", "-o", lib, src], check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        sys.exit(f"bench: cannot build the counting loop ({e}); it needs cc and valgrind's "
                 "headers (Debian: valgrind)")
    out = os.path.join(tmp, "cg.out")
    cmd = ["valgrind", "--tool=callgrind", "--collect-atstart=no",
           f"--callgrind-out-file={out}", sys.executable, os.path.abspath(__file__),
           "--_child", lib]
    try:
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except (OSError, subprocess.CalledProcessError) as e:
        sys.exit(f"bench: valgrind failed ({e})")
    counts = {}
    for fname in os.listdir(tmp):
        if not fname.startswith("cg.out"):
            continue
        name = total = None
        with open(os.path.join(tmp, fname)) as f:
            for line in f:
                if line.startswith("desc: Trigger: Client Request: "):
                    name = line.split(": ", 2)[2].strip()
                elif line.startswith(("summary: ", "totals: ")):
                    total = int(line.split()[1])
        if name and total is not None:
            _, layer, p = name.split("|")
            counts[layer, p] = total / CALLS
    empty = counts.pop(("empty", "empty"))
    return {k: v - empty for k, v in counts.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--min-time", type=float, default=0.2, help="seconds per timing sample")
    ap.add_argument("--callgrind", action="store_true",
                    help="count instructions under valgrind instead of timing")
    ap.add_argument("--write", metavar="RESULTS.md", help="write the table into this file")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        _count_in_this_process(args._child)
        return

    cmd = ".venv/bin/python bench/bench_call_overhead.py " + shlex.join(
        a for a in (argv if argv is not None else sys.argv[1:]))
    head = ["pass", "factorch", "plain torch U·V", "nn.Linear", "factorch / plain",
            "factorch / nn.Linear"]
    what = (f"FactorizedLinear low rank {IN} -> {OUT}, rank {RANK}, M = {M}, float32 on cpu; "
            "the no_grad forward includes entering torch.no_grad(). Ratios < 1 mean factorch "
            "costs less.")
    if args.callgrind:
        counts = callgrind_counts()
        rows = table(counts, lambda v: f"{v / 1000:.1f}k")
        title = "Per-call cost, instructions (cpu)"
        how = (f"Instructions per call counted by callgrind ({CALLS} calls per case, a "
               "Python callback's own cost subtracted). " + what)
    else:
        fns = cases()
        med = interleaved(fns, args.rounds, args.min_time)
        rows = table(med, fmt_time)
        title = "Per-call cost, time (cpu)"
        how = (f"Median of {args.rounds} interleaved rounds (each round times every case for "
               f">= {args.min_time}s). " + what)
    md = markdown_table(head, rows)
    print(md)
    if args.write:
        write_section(args.write, title,
                      f"Command: `{cmd.strip()}`\n\nMachine: {machine()}.\n{how}\n\n{md}\n")


if __name__ == "__main__":
    main()
