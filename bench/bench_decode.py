"""The decode path: low-rank layers at LLM shapes for a few rows (M = 1 ... 16,
what generating tokens one step at a time runs), forward only, against
nn.Linear of the same shape, interleaved in one run.

A low-rank layer keeping a fraction f of the dense parameters does f of the
dense FLOPs and reads f of the dense weight bytes, so both the compute-bound
and the bandwidth-bound speedup over nn.Linear is 1/f. The floor: at least
0.9 x that.

    .venv/bin/python bench/bench_decode.py [--rounds 7] [--write bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import shlex
import sys

import torch
from torch import nn

import factorch  # noqa: F401
from factorch.nn import FactorizedLinear

import harness

TITLE = "Decode path: low rank at LLM shapes (cpu)"

SHAPES = [("SmolLM2", 576, 576), ("SmolLM2", 576, 1536), ("SmolLM2", 1536, 576),
          ("LLaMA-7B", 4096, 4096), ("LLaMA-7B", 4096, 11008), ("LLaMA-7B", 11008, 4096)]
KEEP = (0.8, 0.5)
ROWS = (1, 4, 16)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--min-time", type=float, default=0.1)
    ap.add_argument("--write", metavar="RESULTS.md")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows, met = [], []
    for model, n_in, n_out in SHAPES:
        dense = nn.Linear(n_in, n_out)
        for keep in KEEP:
            rank = int(keep * n_in * n_out / (n_in + n_out))
            layer = FactorizedLinear(n_in, n_out, rank=rank)
            frac = rank * (n_in + n_out) / (n_in * n_out)
            for M in ROWS:
                x = torch.randn(M, n_in)

                def run(mod, x=x):
                    with torch.no_grad():
                        return mod(x)

                t = harness.interleaved({"factorch": lambda: run(layer), "nn.Linear": lambda: run(dense)},
                                        args.rounds, args.min_time)
                speedup, bound = t["nn.Linear"] / t["factorch"], 1 / frac
                ok = speedup >= 0.9 * bound
                if M in (1, 16):
                    met.append(ok)
                rows.append([f"{model} {n_in}→{n_out}", f"{keep:.0%}", str(rank), str(M),
                             harness.fmt_time(t["factorch"]), harness.fmt_time(t["nn.Linear"]),
                             f"{speedup:.2f}x", f"{bound:.2f}x", f"{speedup / bound:.2f}",
                             ("yes" if ok else "**no**") if M in (1, 16) else ""])
                print(" | ".join(rows[-1]), flush=True)
    cmd = ".venv/bin/python " + " ".join(shlex.quote(a) for a in sys.argv)
    body = (
        f"Command: `{cmd}`\n\nMachine: {harness.machine()}. Forward under no_grad, float32, "
        f"bias on both; ranks keeping 80% and 50% of the dense parameters; median of "
        f"{args.rounds} interleaved rounds (each sample >= {args.min_time}s). Bound = dense "
        "parameters / low-rank parameters (FLOPs and weight bytes scale alike); floor: speedup "
        ">= 0.9 x bound at M = 1 and 16 (M = 4 shown for the trend).\n\n"
        + harness.markdown_table(["layer", "kept", "rank", "M", "factorch", "nn.Linear", "speedup",
                                  "bound", "of bound", "floor"], rows)
        + f"\n\nFloor met in {sum(met)} of {len(met)} cases."
    )
    if args.write:
        harness.write_section(args.write, TITLE, body)


if __name__ == "__main__":
    main()
