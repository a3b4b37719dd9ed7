"""Interleaved timing for side-by-side benchmarks.

Every candidate of a case is timed in each round, in a rotated order, so that
a slow moment of the (noisy, shared) machine hits all of them alike; the
figure kept for each is the median over rounds, and ratios are taken between
medians of the same run.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from typing import Callable

import torch


def time_call(fn: Callable[[], object], min_time: float = 0.05, max_iters: int = 10_000,
              warm_up: bool = True) -> float:
    """Seconds per call of fn, averaged over enough calls to last min_time
    (warm_up=False: fn is already warm, skip the untimed first call, which
    matters when one call takes seconds)."""
    if warm_up:
        fn()
    n, elapsed = 1, 0.0
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        if elapsed >= min_time or n >= max_iters:
            return elapsed / n
        n = min(max_iters, max(n * 2, int(n * min_time / max(elapsed, 1e-9) * 1.2)))


def interleaved(cands: dict[str, Callable[[], object]], rounds: int, min_time: float,
                warm_each: bool = True) -> dict:
    """Median seconds per call of each candidate over `rounds` rotated rounds
    (warm_each=False: no untimed call before each sample, only the first
    warm-up of all candidates)."""
    names = list(cands)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for fn in cands.values():  # warm-up: allocator, BLAS threads, caches
        fn()
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            samples[n].append(time_call(cands[n], min_time, warm_up=warm_each))
    return {n: statistics.median(s) for n, s in samples.items()}


def interleaved_calls(cands: dict[str, Callable[[], object]], rounds: int, warm_up: bool = True,
                      before_each: Callable[[], object] | None = None) -> tuple[dict, dict]:
    """(median seconds of ONE call of each candidate over `rounds` rotated
    rounds, each candidate's last result): for calls long enough
    (milliseconds and up) to time one at a time, whose results are checked
    afterwards. warm_up: an untimed call of each candidate first.
    before_each: run untimed before each sample (gc.collect: one candidate's
    garbage is then not collected in another's time)."""
    names = list(cands)
    samples: dict[str, list[float]] = {n: [] for n in names}
    results: dict[str, object] = {}
    if warm_up:
        for n in names:
            results[n] = cands[n]()
    for r in range(rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            if before_each is not None:
                before_each()
            t0 = time.perf_counter()
            results[n] = cands[n]()
            samples[n].append(time.perf_counter() - t0)
    return {n: statistics.median(s) for n, s in samples.items()}, results


def openblas_kernel() -> str:
    """The kernel family OpenBLAS (scipy-openblas32, factorch's BLAS) picked in
    this process, and what in the environment forced it, e.g. "SkylakeX
    (own choice)" or "Haswell (OPENBLAS_CORETYPE=Haswell)"."""
    try:
        import scipy_openblas32

        kernel = scipy_openblas32.get_openblas_config().split()[-2]
    except Exception as e:  # noqa: BLE001 - a report, never a failure
        kernel = f"unknown ({type(e).__name__})"
    forced = [f"{k}={os.environ[k]}" for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if k in os.environ]
    return f"{kernel} ({', '.join(forced) if forced else 'own choice'})"


def kernel_pinned() -> bool:
    """Whether the environment overrides OpenBLAS's own kernel choice."""
    return any(k in os.environ for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"))


def section_title(title: str) -> str:
    """A RESULTS.md section title per OpenBLAS setting: the plain title for
    OpenBLAS's own choice (what a user's machine runs, where the floors
    hold), and a suffixed one for a pinned kernel, so a second run of the
    same benchmark with OPENBLAS_CORETYPE set writes its table beside the
    first instead of over it."""
    if not kernel_pinned():
        return title
    return f"{title} [OpenBLAS pinned: {openblas_kernel()}]"


def layer_step(mod, x, g, train: bool) -> Callable[[], object]:
    """One timed call of a layer: forward + backward (the gradients of x and
    of every parameter for grad_y = g) when train, else the forward under
    no_grad."""
    if train:
        params = [x, *mod.parameters()]
        return lambda: torch.autograd.grad(mod(x), params, g)

    def fwd():
        with torch.no_grad():
            return mod(x)

    return fwd


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, Python {sys.version.split()[0]}, "
        f"OpenBLAS kernel {openblas_kernel()}"
    )


def fmt_time(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.3f} s"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def write_section(path: str, title: str, body: str) -> None:
    """Replaces the section `## title` of a markdown file (or appends it);
    with OpenBLAS's kernel pinned by the environment the title carries the
    pinned kernel (section_title)."""
    title = section_title(title)
    try:
        text = open(path, encoding="utf-8").read()
    except FileNotFoundError:
        text = "# Benchmark results\n\nEach section says how it was produced; rerun the command to refresh it.\n"
    start = text.find(f"\n## {title}\n")
    section = f"\n## {title}\n\n{body.strip()}\n"
    if start < 0:
        text = text.rstrip("\n") + "\n" + section
    else:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + (text[end:] if end >= 0 else "")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
