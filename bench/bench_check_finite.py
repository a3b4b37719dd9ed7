"""What the CPU's finiteness check costs: low-rank FactorizedLinear forwards
at LLM shapes (SmolLM2's 576 <-> 1536, LLaMA-7B's 4096 <-> 4096 / 11008,
ranks keeping 50% of the dense parameters), M = 1 and 512 rows, with
factorch.set_check_finite(cpu=True) (the default: every batch-sized output
is scanned, an error names the input that brought NaN or Inf) against
cpu=False, interleaved rounds, medians, under torch.no_grad().

    .venv/bin/python bench/bench_check_finite.py --write bench/RESULTS.md   # ~1.5 min
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import factorch  # noqa: E402
from factorch.nn import FactorizedLinear  # noqa: E402

TITLE = "Finiteness check cost (cpu)"
SHAPES = [(576, 1536), (1536, 576), (4096, 4096), (4096, 11008), (11008, 4096)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--min-time", type=float, default=0.2)
    ap.add_argument("--write", metavar="RESULTS.md")
    args = ap.parse_args()
    torch.manual_seed(0)
    before = factorch.get_check_finite()["cpu"]
    rows = []
    try:
        for n_in, n_out in SHAPES:
            rank = max(1, int(0.5 * n_in * n_out / (n_in + n_out)))
            layer = FactorizedLinear(n_in, n_out, "lowrank", rank=rank, bias=False)
            for M in (1, 512):
                x = torch.randn(M, n_in)

                def run(check, layer=layer, x=x):
                    factorch.set_check_finite(cpu=check)
                    return layer(x)

                with torch.no_grad():
                    t = harness.interleaved({"on": lambda: run(True), "off": lambda: run(False)},
                                            args.rounds, args.min_time)
                cost = t["on"] / t["off"] - 1
                rows.append([f"{n_in}→{n_out}", str(rank), str(M), harness.fmt_time(t["off"]),
                             harness.fmt_time(t["on"]), f"{cost * 100:+.1f}%"])
                print(" | ".join(rows[-1]), flush=True)
    finally:
        factorch.set_check_finite(cpu=before)
    cmd = ".venv/bin/python " + " ".join(shlex.quote(a) for a in sys.argv)
    body = (f"Command: `{cmd}`\n\nMachine: {harness.machine()}. Low-rank FactorizedLinear "
            f"(ranks keeping 50% of the dense parameters, no bias), forward under no_grad, "
            f"float32; median of {args.rounds} interleaved rounds (each sample >= "
            f"{args.min_time}s). The check scans y [M, out] once after the op (t [M, r] is "
            "not scanned).\n\n"
            + harness.markdown_table(["shape", "rank", "M", "check off", "check on", "cost"], rows))
    if args.write:
        harness.write_section(args.write, TITLE, body)


if __name__ == "__main__":
    main()
