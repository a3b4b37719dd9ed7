"""The same layers timed on two builds of factorch (A/B), for a change that
must not move speed (a refactor) or one that should.

Each build is a source tree with its compiled libraries (a worktree and its
CMake build folder). The trees run in separate processes, alternating round
by round (A, B, B, A, ...), each process timing every case once (medians of
its own samples); a case's figure per build is the median over that build's
rounds, and B / A is the ratio of those medians.

    .venv/bin/python bench/ab_builds.py --a /work/ab-before:/work/ab-before/build/dev \\
        --b .:build/py [--rounds 6] [--quick] [--write bench/RESULTS.md --title "..."]

Cases: the low-rank table's shapes (bench_lowrank_linear.py) and CP / Tucker /
TT at 4096 = 8^4 x 8^4 (bench_factorized_linear.py's layout) at 10x and 50x,
forward + backward and forward alone.
"""

from __future__ import annotations

import argparse
import json
import re
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

LOWRANK = [(2048, 4096, 4096, 512), (128, 4096, 4096, 512), (1, 4096, 4096, 512),
           (2048, 1024, 1024, 64), (1, 64, 64, 8)]
TENSORIZED = [(fact, frac, M) for fact in ("cp", "tucker", "tt") for frac in (0.1, 0.02)
              for M in (1, 128, 2048)]


def child(min_time: float, samples: int, quick: bool, only: str | None) -> None:
    """Runs in a build's process: times every case, prints JSON."""
    sys.path.insert(0, str(HERE))
    import torch

    import harness
    from factorch.nn import FactorizedLinear

    def timed(label, layer, x, g, train):
        """Seconds per call, or None for a case --only leaves out."""
        if only and not re.search(only, label):
            return None
        fn = harness.layer_step(layer, x, g, train)
        fn()
        return statistics.median(harness.time_call(fn, min_time) for _ in range(samples))

    out = {}
    torch.manual_seed(0)
    for M, n_in, n_out, rank in LOWRANK:
        layer = FactorizedLinear(n_in, n_out, rank=rank)
        x, g = torch.randn(M, n_in, requires_grad=True), torch.randn(M, n_out)
        for train in (True, False):
            label = f"lowrank ({M}, {n_in}, {n_out}, {rank}) {'fwd+bwd' if train else 'fwd'}"
            out[label] = timed(label, layer, x, g, train)
    modes = (8, 8, 8, 8)
    for fact, frac, M in TENSORIZED:
        if quick and (frac != 0.02 or M == 2048):
            continue
        layer = FactorizedLinear(4096, 4096, fact, rank=frac, tensorized_shape=(modes, modes))
        x, g = torch.randn(M, 4096, requires_grad=True), torch.randn(M, 4096)
        for train in (True, False):
            label = f"{fact} {round(1 / frac)}x M={M} {'fwd+bwd' if train else 'fwd'}"
            out[label] = timed(label, layer, x, g, train)
    out = {k: v for k, v in out.items() if v is not None}
    print("AB-RESULT " + json.dumps(out), flush=True)


def run_build(spec: str, min_time: float, samples: int, quick: bool, only: str | None) -> dict:
    tree, libs = spec.split(":")
    tree, libs = Path(tree).resolve(), Path(libs if os.path.isabs(libs) else Path(tree) / libs).resolve()
    env = dict(os.environ, PYTHONPATH=str(tree), FACTORCH_LIB_DIR=str(libs),
               SKBUILD_EDITABLE_SKIP=str(Path(sys.prefix).parent / "build" / "py"))
    cmd = [sys.executable, str(HERE / "ab_builds.py"), "--child", "--min-time", str(min_time),
           "--samples", str(samples)] + (["--quick"] if quick else []) + \
        (["--only", only] if only else [])
    res = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, check=True)
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("AB-RESULT "))
    return json.loads(line[len("AB-RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", help="build A: TREE:LIBDIR (LIBDIR relative to TREE or absolute)")
    ap.add_argument("--b", help="build B: TREE:LIBDIR")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--min-time", type=float, default=0.05)
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--write", metavar="RESULTS.md")
    ap.add_argument("--title", default="A/B of two builds (cpu)")
    ap.add_argument("--quick", action="store_true",
                    help="the tensorized cases at 50x and M = 1, 128 only (minutes, not an hour)")
    ap.add_argument("--only", metavar="REGEX", help="the cases whose label matches")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.min_time, args.samples, args.quick, args.only)
        return
    sys.path.insert(0, str(HERE))
    import harness

    runs = {"A": [], "B": []}
    for r in range(args.rounds):
        for which in (("A", "B") if r % 2 == 0 else ("B", "A")):
            runs[which].append(run_build(getattr(args, which.lower()), args.min_time, args.samples,
                                         args.quick, args.only))
            print(f"round {r + 1}/{args.rounds}: {which} done", flush=True)
    rows, ratios = [], []
    for case in runs["A"][0]:
        a = statistics.median(x[case] for x in runs["A"])
        b = statistics.median(x[case] for x in runs["B"])
        spread = max(x[case] for x in runs["A"]) / min(x[case] for x in runs["A"]) - 1
        ratios.append(b / a)
        rows.append([case, harness.fmt_time(a), harness.fmt_time(b), f"{b / a:.3f}",
                     f"±{spread * 50:.1f}%"])
        print(" | ".join(rows[-1]), flush=True)
    geo = statistics.geometric_mean(ratios)
    cmd = ".venv/bin/python " + " ".join(shlex.quote(a) for a in sys.argv)
    body = (f"Command: `{cmd}`\n\nMachine: {harness.machine()}. A = `{args.a}`, B = `{args.b}`; "
            f"{args.rounds} rounds of one process per build (alternating), each sample the "
            f"median of {args.samples} of >= {args.min_time}s. 'A spread' is half A's "
            f"max/min over rounds: the noise a ratio should be read against.\n\n"
            + harness.markdown_table(["case", "A", "B", "B / A", "A spread"], rows)
            + f"\n\nGeometric mean of B / A over {len(ratios)} cases: {geo:.3f}.")
    if args.write:
        harness.write_section(args.write, args.title, body)


if __name__ == "__main__":
    main()
