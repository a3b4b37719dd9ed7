"""The full SVD of a 4096x4096 matrix: factorch.decompose.svd (LAPACK's gesdd
in float64, on OpenBLAS's threads for the call's duration) against
torch.linalg.svd in float32 and float64, interleaved rounds, minimum per
candidate. A check that the decompositions use every core; the whole table
is bench_decompose.py's.

    .venv/bin/python bench/bench_svd_threads.py [--rounds 2] [--n 4096]
"""

import argparse
import time

import torch

from factorch import decompose as D


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--n", type=int, default=4096)
    args = ap.parse_args()
    torch.manual_seed(0)
    A = torch.randn(args.n, args.n)
    A64 = A.double()
    cands = {
        "factorch svd (float64)": lambda: D.svd(A),
        "torch.linalg.svd float32": lambda: torch.linalg.svd(A, full_matrices=False),
        "torch.linalg.svd float64": lambda: torch.linalg.svd(A64, full_matrices=False),
    }
    times = {k: [] for k in cands}
    for _ in range(args.rounds):
        for k, f in cands.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    print(f"{args.n}x{args.n}, {torch.get_num_threads()} torch threads, {args.rounds} rounds")
    for k, v in times.items():
        print(f"{k:26s} min {min(v):7.2f} s  (" + ", ".join(f"{x:.2f}" for x in v) + ")")


if __name__ == "__main__":
    main()
