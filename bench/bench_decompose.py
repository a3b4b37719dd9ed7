"""factorch.decompose against TensorLy (numpy and pytorch backends) and torch,
on the same inputs, in one run: time, peak memory and relative error side
by side.

    .venv/bin/python bench/bench_decompose.py [--quick] [--rounds 5] [--write bench/RESULTS.md]
    python bench/bench_decompose.py --device cuda [--no-full-svd] [--write RESULTS.md]

Cases: CP (parafac), Tucker (HOOI) and TT-SVD of 64×64×64 and
256×256×9 tensors at ranks 16 and 32; truncated SVD (torch.linalg.svd) and
randomized SVD (torch.svd_lowrank, same p = 10 and q = 2) of 4096×4096 and
4096×11008 matrices at rank 256. ``--quick`` runs small versions of the same
cases (a check that the script works, not a measurement).

Inputs. Tensors: a planted CP tensor of the case's rank plus 10 % Gaussian
noise, float64 (TensorLy's numpy default), shared by all candidates (numpy
arrays; torch tensors for TensorLy's pytorch backend). Matrices: float32,
singular values decaying like j^-0.75 (as trained weights do), random
singular vectors. Settings: n_iter_max=100, tol=1e-8, init="svd" for CP and
Tucker everywhere (TensorLy's tucker defaults to tol=1e-4: set to 1e-8);
Tucker ranks are the case's rank capped at each mode's size; TT ranks are
capped at the case's rank; TensorLy's random_state=0.

Time: candidates of a case run interleaved (harness.interleaved_calls:
rotated order each round, a warm-up call first, one call per sample after a
gc.collect()); the figure is the median over rounds. The full SVDs
(seconds each) run --full-svd-rounds times without warm-up, after the
others. Error: ||X − X̂||_F / ||X||_F computed here in float64 from each
candidate's reconstruction. Peak memory: the growth of the process's
resident set during one call (Linux VmHWM, reset through
/proc/self/clear_refs just before the call, minus VmRSS then), after
glibc's malloc_trim has handed freed memory back to the OS so that each
call's own allocations show; it counts numpy, torch and C allocations alike
(tracemalloc would miss torch's and C's), measured in a call of its own
after the timed ones (the full SVDs: in their first timed call).

``--device cuda``: every input on the GPU (factorch's CUDA engine, TensorLy's
pytorch backend on CUDA tensors, torch.linalg.svd / torch.svd_lowrank on
CUDA); each call ends with torch.cuda.synchronize(), and peak memory is
torch's peak allocation during the call (factorch's workspace comes from
torch's allocator; CP's small host-side factor algebra is not counted). The
section is "Decompositions (cuda)"; TensorLy's numpy backend is left out.

Floors checked: CP and Tucker at least 3x faster than TensorLy's
fastest backend at equal or lower error; randomized_svd at least as
accurate as torch.svd_lowrank with the same oversampling and iterations,
and no slower.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import shlex
import statistics
import sys
import time

import numpy as np
import torch

import factorch
from factorch import decompose as D

from harness import fmt_time, interleaved_calls, machine, markdown_table, write_section

try:
    import tensorly as tl
    from tensorly.decomposition import parafac, tensor_train, tucker
except ImportError:  # pragma: no cover
    tl = None

FULL = dict(tensors=[(64, 64, 64), (256, 256, 9)], ranks=[16, 32],
            matrices=[(4096, 4096), (4096, 11008)], mrank=256)
QUICK = dict(tensors=[(24, 24, 24), (64, 64, 9)], ranks=[4, 8],
             matrices=[(512, 512), (512, 1376)], mrank=32)


# ---------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------


def _status(key: str) -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _malloc_trim = _libc.malloc_trim
except (OSError, AttributeError):  # not glibc
    _malloc_trim = None


CUDA = False  # --device cuda (set by main)


def synced(fn):
    """fn, followed by torch.cuda.synchronize() on the GPU (its work is
    asynchronous)."""
    if not CUDA:
        return fn

    def run(*a):
        out = fn(*a)
        torch.cuda.synchronize()
        return out
    return run


def measured(fn):
    """(result, seconds, bytes the resident set grew to above its size before
    fn(), None where /proc/self/clear_refs is not available). On the GPU:
    torch's peak allocation above what was allocated before."""
    gc.collect()
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        return out, dt, max(0, torch.cuda.max_memory_allocated() - base)
    if _malloc_trim is not None:
        _malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = _status("VmRSS")
    except OSError:
        base = None
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    peak = _status("VmHWM")
    return out, dt, None if base is None or peak is None else max(0, peak - base)


def peak_memory(fn) -> int | None:
    return measured(fn)[2]


def fmt_mem(b: int | None) -> str:
    if b is None:
        return "n/a"
    if b < 1 << 20:
        return f"{b / 1024:.0f} KiB"
    if b < 1 << 30:
        return f"{b / (1 << 20):.1f} MiB"
    return f"{b / (1 << 30):.2f} GiB"


def rel_error(approx, X) -> float:
    a = approx.detach().cpu().double().numpy() if isinstance(approx, torch.Tensor) else np.asarray(approx, dtype=np.float64)
    x = X.detach().cpu().double().numpy() if isinstance(X, torch.Tensor) else np.asarray(X, dtype=np.float64)
    return float(np.linalg.norm(a - x) / np.linalg.norm(x))


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------


def planted_tensor(shape, R, seed=0, noise=0.1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    fs = [rng.standard_normal((s, R)) for s in shape]
    X = D.CPResult(np.ones(R), fs, 0.0).to_tensor()
    N = rng.standard_normal(X.shape)
    return X + noise * N * (np.linalg.norm(X) / np.linalg.norm(N))


def decaying_matrix(m, n, seed=0) -> torch.Tensor:
    """float32 [m, n] with singular values near (1 + j)^-0.75."""
    g = torch.Generator().manual_seed(seed)
    q = min(m, n)
    s = (1.0 + torch.arange(q, dtype=torch.float32)) ** -0.75
    left = torch.randn(m, q, generator=g) * s
    return (left @ torch.randn(q, n, generator=g)) / n**0.5


# ---------------------------------------------------------------------------
# Candidates
# ---------------------------------------------------------------------------


def tl_call(backend, fn):
    def run():
        with tl.backend_context(backend):
            return fn()
    return run


def tl_rec(backend, rec):
    def run(r):
        with tl.backend_context(backend):
            return rec(r)
    return run


def tensor_candidates(method, X, R):
    """name -> (call, reconstruction of a result, iterations of a result)."""
    Xt = torch.from_numpy(X)
    if CUDA:
        X = Xt = Xt.cuda()
    ranks = [min(R, s) for s in X.shape]
    if method == "CP":
        ours = (lambda: D.cp(X, R, init="svd", n_iter_max=100, tol=1e-8),
                lambda r: r.to_tensor(), lambda r: r.n_iter)
        def theirs(T):
            return (lambda: parafac(T, R, init="svd", n_iter_max=100, tol=1e-8, random_state=0,
                                    return_errors=True),
                    lambda r: tl.cp_to_tensor(r[0]), lambda r: len(r[1]))
    elif method == "Tucker":
        ours = (lambda: D.tucker(X, ranks, n_iter_max=100, tol=1e-8),
                lambda r: r.to_tensor(), lambda r: r.n_iter)
        def theirs(T):
            return (lambda: tucker(T, ranks, n_iter_max=100, tol=1e-8, init="svd", random_state=0,
                                   return_errors=True),
                    lambda r: tl.tucker_to_tensor(r[0]), lambda r: len(r[1]))
    else:  # TT
        ours = (lambda: D.tensor_train(X, rank=R), lambda r: r.to_tensor(), lambda r: None)
        def theirs(T):
            return (lambda: tensor_train(T, R), lambda r: tl.tt_to_tensor(r), lambda r: None)
    c = {"factorch": (synced(ours[0]), *ours[1:])}
    if tl is not None:
        for backend, T in (("numpy", X), ("pytorch", Xt)):
            if CUDA and backend == "numpy":
                continue
            call, rec, its = theirs(T)
            c[f"TensorLy {backend}"] = (synced(tl_call(backend, call)), tl_rec(backend, rec), its)
    return c


def matrix_candidates(A, r, full_svd: bool):
    c = {
        "factorch randomized_svd": (lambda: D.randomized_svd(A, r, n_oversamples=10, n_iter=2),
                                    lambda res: res.to_tensor()),
        "torch.svd_lowrank": (lambda: torch.svd_lowrank(A, q=r + 10, niter=2),
                              lambda res: (res[0][:, :r] * res[1][:r]) @ res[2][:, :r].T),
    }
    if full_svd:
        c["factorch svd"] = (lambda: D.svd(A, r), lambda res: res.to_tensor())
        c["torch.linalg.svd"] = (lambda: torch.linalg.svd(A, full_matrices=False),
                                 lambda res: (res[0][:, :r] * res[1][:r]) @ res[2][:r])
    return {k: (synced(call), rec) for k, (call, rec) in c.items()}


# ---------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------


def run_tensors(cfg, rounds, rows, floors):
    for shape in cfg["tensors"]:
        for R in cfg["ranks"]:
            X = planted_tensor(shape, R)
            for method in ("CP", "Tucker", "TT"):
                cands = tensor_candidates(method, X, R)
                med, res = interleaved_calls({n: c[0] for n, c in cands.items()}, rounds,
                                             before_each=gc.collect)
                err = {n: rel_error(cands[n][1](res[n]), X) for n in cands}
                mem = {n: peak_memory(cands[n][0]) for n in cands}
                label = f"{method} {'×'.join(map(str, shape))} r={R}"
                best_tl = min((n for n in cands if n != "factorch"), key=lambda n: med[n], default=None)
                for n in cands:
                    its = cands[n][2](res[n])
                    speed = f"{med[n] / med['factorch']:.2f}x" if n != "factorch" else "1x"
                    rows.append([label, n, fmt_time(med[n]), speed, fmt_mem(mem[n]),
                                 f"{err[n]:.6f}", "" if its is None else str(its)])
                    print(" | ".join(rows[-1]), flush=True)
                if method in ("CP", "Tucker") and best_tl:
                    ratio = med[best_tl] / med["factorch"]
                    ok_err = err["factorch"] <= err[best_tl] * (1 + 1e-6) + 1e-12
                    floors.append([label, f"{ratio:.2f}x vs {best_tl}", f"{err['factorch']:.6f} vs "
                                   f"{err[best_tl]:.6f}", "pass" if ratio >= 3 and ok_err else "FAIL"])


def run_matrices(cfg, rounds, full_rounds, full_svd, rows, floors):
    r = cfg["mrank"]
    for m, n in cfg["matrices"]:
        A = decaying_matrix(m, n)
        if CUDA:
            A = A.cuda()
        label = f"{m}×{n} r={r} float32"
        cands = matrix_candidates(A, r, full_svd)
        quick = {k: v for k, v in cands.items() if "randomized" in k or "lowrank" in k}
        slow = {k: v for k, v in cands.items() if k not in quick}
        med, res = interleaved_calls({k: v[0] for k, v in quick.items()}, rounds,
                                     before_each=gc.collect)
        mem = {k: peak_memory(quick[k][0]) for k in quick}
        for k, (fn, _) in slow.items():  # seconds each: memory from the first timed call
            res[k], t, mem[k] = measured(fn)
            times = [t] + [measured(fn)[1] for _ in range(full_rounds - 1)]
            med[k] = statistics.median(times)
        err = {k: rel_error(cands[k][1](res[k]), A) for k in cands}
        # factorch.svd's error is the Eckart–Young optimum, exactly
        opt = res["factorch svd"].rel_error if "factorch svd" in res else None
        for k in cands:
            base = "factorch randomized_svd" if k in quick else "factorch svd"
            rows.append([label, k, fmt_time(med[k]), f"{med[k] / med[base]:.2f}x", fmt_mem(mem[k]),
                         f"{err[k]:.6f}", f"{err[k] / opt:.5f}" if opt else ""])
            print(" | ".join(rows[-1]), flush=True)
        a, b = "factorch randomized_svd", "torch.svd_lowrank"
        ok = err[a] <= err[b] and med[a] <= med[b]
        floors.append([f"randomized_svd {label}", f"{med[b] / med[a]:.2f}x vs {b}",
                       f"{err[a]:.6f} vs {err[b]:.6f}", "pass" if ok else "FAIL"])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes, 3 rounds: a smoke test")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per case (default 5; quick 3)")
    ap.add_argument("--full-svd-rounds", type=int, default=1,
                    help="rounds of the full SVDs (each takes seconds)")
    ap.add_argument("--no-full-svd", action="store_true", help="skip torch.linalg.svd / svd")
    ap.add_argument("--only", choices=["tensors", "matrices"], help="run one half of the cases")
    ap.add_argument("--write", metavar="RESULTS.md", help="write the tables into this file")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="where the inputs live (cuda: needs factorch's CUDA backend)")
    args = ap.parse_args(argv)
    global CUDA
    CUDA = args.device == "cuda"
    if CUDA and not (torch.cuda.is_available() and factorch.cuda_available()):
        sys.exit("--device cuda: needs a CUDA device and factorch's CUDA backend")
    cfg = QUICK if args.quick else FULL
    rounds = args.rounds or (3 if args.quick else 5)
    cmd = ("python" if CUDA else ".venv/bin/python") + " bench/bench_decompose.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    if tl is None:
        print("tensorly is not installed (pip install tensorly): TensorLy columns skipped")

    # Start every thread pool (torch's, OpenBLAS's, numpy's) before timing.
    W = planted_tensor((16, 16, 16), 4)
    Wt = torch.from_numpy(W).cuda() if CUDA else torch.from_numpy(W)
    D.cp(Wt, 4), D.tucker(Wt, 4), D.randomized_svd(Wt.reshape(64, 64), 4), np.linalg.svd(W[0])
    D.tensor_train(Wt, rank=4)
    torch.svd_lowrank(Wt.reshape(64, 64), q=8)
    if tl is not None:
        parafac(W, 4, n_iter_max=2)
        with tl.backend_context("pytorch"):
            parafac(Wt, 4, n_iter_max=2)

    t0 = time.perf_counter()
    trows, mrows, floors = [], [], []
    if args.only != "matrices":
        run_tensors(cfg, rounds, trows, floors)
    if args.only != "tensors":
        run_matrices(cfg, rounds, args.full_svd_rounds, not args.no_full_svd, mrows, floors)
    elapsed = time.perf_counter() - t0

    t1 = markdown_table(["case", "candidate", "time", "vs factorch", "peak memory", "rel. error",
                         "sweeps"], trows)
    t2 = markdown_table(["case", "candidate", "time", "vs factorch", "peak memory", "rel. error",
                         "error / optimum"], mrows)
    t3 = markdown_table(["floor", "speed", "error (factorch vs other)", "result"], floors)
    body = (
        f"Command: `{cmd}` ({elapsed:.0f} s)\n\n"
        f"Machine: {machine()}"
        + (f", {torch.cuda.get_device_name()}" if CUDA else "")
        + f"; factorch {factorch.__version__}"
        + (f", TensorLy {tl.__version__}" if tl is not None else "")
        + f". Median of {rounds} interleaved rounds (full SVDs: {args.full_svd_rounds}). "
        "\"vs factorch\" > 1 means factorch is faster. Methods (inputs, settings, how time, "
        "error and memory are measured): the docstring of bench/bench_decompose.py.\n\n"
        "Tensors (float64):\n\n" + t1 + "\n\nMatrices:\n\n" + t2
        + "\n\nFloors (CP and Tucker: at least 3x TensorLy's fastest backend at equal or lower "
        "error; randomized_svd: as accurate as torch.svd_lowrank and no slower):\n\n" + t3
    )
    print("\n" + t1 + "\n\n" + t2 + "\n\n" + t3)
    print(f"\n{elapsed:.0f} s")
    if args.write:
        write_section(args.write, f"Decompositions ({args.device})" + (" — quick" if args.quick else ""),
                      body)


if __name__ == "__main__":
    main()
