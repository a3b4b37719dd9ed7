"""The machinery of the robustness fuzz of the C ops, called directly
(test_fuzz_conv_ops.py, test_fuzz_embedding_ops.py, and the bad arguments
of test_fuzz_linear_ops.py).

A fuzz test builds the cases of one mutation category from a VALID call,
breaking one thing in each (an int argument, a list's length, a tensor's
size, dtype, layout, device or values), and hands them to check_category,
which holds them to the standard:

- the process never crashes or hangs (a hang dumps the tracebacks and exits,
  through faulthandler);
- a call returns, or raises one of the allowed exceptions (RuntimeError /
  ValueError / TypeError / IndexError) whose message names an argument;
- what it returns passes the case's verify (the shapes the fake kernel
  predicts, the values of a float64 reference in plain torch, finite when
  the inputs were);
- a category of valid calls only returned, a category of calls that must
  fail only raised, and any other category both returned and raised (its
  variants include harmless ones), so that it cannot silently test nothing.

Each category draws from its own random.Random seeded by the test's seed and
the category's name (category_rng), so every pytest node is deterministic
and reproducible alone (pytest tests/python/test_fuzz_conv_ops.py -k
stages_ints). To find a case that kills the process, run with
FACTORCH_FUZZ_TRACE=1: every case is printed (flushed) before it runs.
"""

from __future__ import annotations

import faulthandler
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

import factorch
from factorch import _lib

ALLOWED = (RuntimeError, ValueError, TypeError, IndexError)
TRACE = os.environ.get("FACTORCH_FUZZ_TRACE") == "1"
HANG_S = 180  # one category takes well under a second (seconds under ASan): far beyond is a hang

# Ints that break sizes: zero, negatives, the int32/int64 edges, huge.
NASTY = [0, -1, -2, 1, 2, 3, 5, 2**31 - 1, 2**31, 2**32, 2**40, 2**62, 2**63 - 1,
         -2**31, -2**62, -2**63]
SMALL_CHUNKS = 2  # FCT_FLAG_SMALL_CHUNKS


# ---------------------------------------------------------------------------
# Cases and the runner
# ---------------------------------------------------------------------------
@dataclass
class Case:
    cat: str                            # category: "<op family>.<what is mutated>"
    desc: str
    call: Callable[[], object]          # runs the op
    verify: Callable[[object], None]    # asserts on what it returned
    names: tuple                        # arguments an error message may name
    must_return: bool = False           # the valid calls
    check_finite: bool = True           # factorch.set_check_finite(cpu=...) during the call
    threads: int = 0                    # torch.set_num_threads during the call (0: as is)
    small_chunks: bool = False          # FCT_FLAG_SMALL_CHUNKS during the call
    must_raise: bool = False            # calls every variant of which is invalid


def category_rng(seed: int, cat: str) -> random.Random:
    """The random source of one category: the same cases on every run, and
    the same whichever other categories run."""
    return random.Random(f"{seed}:{cat}")


def vary(r: random.Random, c: Case) -> Case:
    """Some cases run on other thread counts (the conv ops split the images
    over the pool's threads) or with chunks of <= 3 indices (embeddings)."""
    if r.random() < 0.3:
        c.threads = r.choice((1, 3, 4))
    c.small_chunks = r.random() < 0.3
    return c


def names_an_argument(msg: str, names) -> bool:
    return any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", msg)
               for n in names)


def run_cases(cases, allowed=ALLOWED):
    """Runs every case; returns ([returned, raised], failures)."""
    tally = [0, 0]
    failures = []
    default_check = factorch.get_check_finite()["cpu"]
    default_threads = torch.get_num_threads()
    for i, c in enumerate(cases):
        env = [f"threads {c.threads or default_threads}"] + \
            ["small chunks"] * c.small_chunks + ["unchecked"] * (not c.check_finite)
        what = f"[{i}] {c.cat}: {c.desc} ({', '.join(env)})"
        if TRACE:
            print(what, file=sys.stderr, flush=True)
        flags = (_lib.FLAG_CHECK_FINITE if c.check_finite else 0) | \
            (SMALL_CHUNKS if c.small_chunks else 0)
        _lib.glue.fct_torch_set_flags(0, flags)  # CPU
        if c.threads:
            torch.set_num_threads(c.threads)
        try:
            out = c.call()
        except allowed as e:
            tally[1] += 1
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            if c.must_return:
                failures.append(f"{what}: a valid call raised {type(e).__name__}: {msg}")
            elif not names_an_argument(str(e), c.names):
                failures.append(f"{what}: the message names no argument: {msg}")
            continue
        except Exception as e:  # noqa: BLE001 - any other exception is a failure
            tally[1] += 1
            failures.append(f"{what}: raised {type(e).__name__} (not allowed): {e}")
            continue
        finally:
            factorch.set_check_finite(cpu=default_check)
            torch.set_num_threads(default_threads)
        tally[0] += 1
        if c.must_raise:
            failures.append(f"{what}: returned, but every variant of it is invalid")
            continue
        try:
            c.verify(out)
        except Exception as e:  # noqa: BLE001 - a wrong result, or an oracle that cannot follow
            failures.append(f"{what}: returned a wrong result: {type(e).__name__}: {e}")
    return tally, failures


def check_category(cat: str, cases, allowed=ALLOWED) -> None:
    """Runs one category's cases under a hang guard and asserts the standard
    (the module's docstring)."""
    assert cases, f"{cat}: no cases"
    # A hang fails loudly; into sys.__stderr__, a real file even when pytest
    # captures sys.stderr (--capture=sys, as make test-py-asan runs).
    faulthandler.dump_traceback_later(HANG_S, exit=True, file=sys.__stderr__)
    try:
        t0 = time.perf_counter()
        (ret, rai), failures = run_cases(cases, allowed)
        elapsed = time.perf_counter() - t0
    finally:
        faulthandler.cancel_dump_traceback_later()
    print(f"\n{cat}: {len(cases)} calls in {elapsed:.2f} s, returned {ret}, raised {rai}")
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:40])
    if all(c.must_return for c in cases):
        assert rai == 0 and ret == len(cases), (cat, ret, rai)
    elif all(c.must_raise for c in cases):
        assert ret == 0 and rai == len(cases), (cat, ret, rai)
    else:
        assert ret > 0 and rai > 0, f"{cat}: returned {ret}, raised {rai}: not both"


# ---------------------------------------------------------------------------
# Inputs and their variants
# ---------------------------------------------------------------------------
def randn(r: random.Random, shape, dtype=torch.float64, scale=1.0):
    g = torch.Generator().manual_seed(r.getrandbits(62))
    return (torch.randn(tuple(shape), generator=g, dtype=torch.float64) * scale).to(dtype)


def randint(r: random.Random, lo, hi, shape, dtype=torch.int64):
    g = torch.Generator().manual_seed(r.getrandbits(62))
    return torch.randint(lo, hi, tuple(shape), generator=g, dtype=torch.int64).to(dtype)


def strided(t):
    """t's values through a view with doubled strides (not contiguous)."""
    if t.dim() == 0:
        return t
    big = torch.stack([t, torch.zeros_like(t)], dim=-1)  # [..., 2]
    return big[..., 0]


def flat2d(t):
    """t as [t.shape[0], the rest] (also when t is empty)."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:]))


def to_meta(t):
    """t on the meta device (anything not a tensor as it is)."""
    return t.to("meta") if isinstance(t, torch.Tensor) else t


def finite(*ts) -> bool:
    return all(not t.is_floating_point() or bool(torch.isfinite(t).all()) for t in ts
               if isinstance(t, torch.Tensor) and t.device.type != "meta")


def assert_close(got, want, dtype, what, inputs_finite=True):
    """got (any float dtype) against a float64 reference; NaN/Inf must sit in
    the same places. With non-finite inputs, only where the reference is
    non-finite may got be: the kernels skip the taps that fall on padding
    (0·NaN is NaN for the reference, nothing for them) and the
    rows of padding_idx, so they may give a number where the reference has
    NaN."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    g = got.detach().double()
    if not inputs_finite:
        bad = ~torch.isfinite(g) & torch.isfinite(want)
        assert not bool(bad.any()), f"{what}: non-finite where the reference is finite"
        keep = torch.isfinite(g) & torch.isfinite(want)
        g, want = g[keep], want[keep]
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    scale = 1.0 + (want[torch.isfinite(want)].abs().max().item() if want.numel() and
                   torch.isfinite(want).any() else 0.0)
    torch.testing.assert_close(g, want, rtol=tol, atol=tol * scale, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def mutate_list(r, values, k):
    """k random entries of `values` set to nasty ints (or left as they are)."""
    v = list(values)
    changes = []
    for _ in range(k):
        i = r.randrange(len(v))
        new = r.choice(NASTY + [v[i], v[i] + 1, v[i] - 1])
        changes.append(f"[{i}] {v[i]}->{new}")
        v[i] = new
    return v, ", ".join(changes)


def tensor_variants(r, t):
    """(desc, t') for a tensor argument: dtype, ndim, layout, size variants,
    some harmless."""
    kind = r.choice(("same", "dtype", "2-D", "strided", "expanded", "numel+1", "numel-1",
                     "empty", "offset view", "0-d"))
    if kind == "same":
        return kind, t.clone()
    if kind == "dtype":
        dt = r.choice((torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
                       torch.int32, torch.bool, torch.complex64))
        return f"dtype {dt}", t.to(dt)
    if kind == "2-D":
        return kind, t.reshape(1, -1) if r.random() < 0.5 else t.reshape(-1, 1)
    if kind == "strided":
        return kind, strided(t)
    if kind == "expanded":
        return kind, t.reshape(-1)[:1].expand(t.numel()) if t.numel() else t
    if kind == "numel+1":
        return kind, torch.cat([t.reshape(-1), t.new_ones(1)])
    if kind == "numel-1":
        return kind, t.reshape(-1)[:-1] if t.numel() else t
    if kind == "empty":
        return kind, t.new_empty(0)
    if kind == "offset view":
        big = torch.cat([t.new_zeros(5), t.reshape(-1), t.new_zeros(3)])
        return kind, big[5:5 + t.numel()]
    return kind, t.reshape(-1)[:1].reshape(()) if t.numel() else t.new_zeros(())


def poison(r, t):
    """(t with one element set to NaN, Inf or -Inf, desc)."""
    if not t.numel():
        return t, "empty"
    t = t.clone()
    v = r.choice((float("nan"), float("inf"), -float("inf")))
    i = r.randrange(t.numel())
    t.view(-1)[i] = v
    return t, f"{v} at {i}"
