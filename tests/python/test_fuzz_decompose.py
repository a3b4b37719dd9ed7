"""Robustness fuzz of factorch.decompose: seeded random calls of svd,
randomized_svd, cp, tucker, tensor_train and tensor_train_matrix on torch
tensors and numpy arrays of random shapes, dtypes and strides (transposed,
sliced, broadcast), with random ranks and options, valid and not (ranks 0,
negative, too large, of the wrong type; NaN/Inf or zero inputs). Half of the
calls run the algorithms' GPU path on the CPU (FACTORCH_TEST_DEVICE_PATH=1).

The standard:
- the process never crashes;
- a call returns, or raises ValueError / TypeError (FactorchError is a
  ValueError) whose message names an argument;
- what returns is finite, in the input's kind and dtype, and its
  rel_error is the relative error of its to_tensor() (recomputed here in
  float64), below 1 + a little (no method returns worse than the zero
  tensor, but CP's unrefined starting point with n_iter_max=0), and
  exactly 0 for a zero input;
- NaN/Inf input always raises.

Deterministic (fixed seed); a few seconds.
"""

from __future__ import annotations

import math
import os
import random
import re

import numpy as np
import pytest
import torch

from factorch import decompose as D

SEED = 20261128
CALLS = 1500
NAMED = re.compile(r"^(tensor|matrix|rank(\[\d+\])?|n_iter_max|tol|l2_reg|init|eps|random_state|"
                   r"n_oversamples|n_iter|normalize_factors)\b")


METHODS = ("svd", "randomized_svd", "cp", "tucker", "tensor_train", "tensor_train_matrix")


def random_ndim(r: random.Random, name: str) -> int:
    """Mostly what the method takes, sometimes not."""
    if r.random() < 0.1:
        return r.randint(1, 5)
    if name in ("svd", "randomized_svd"):
        return 2
    if name == "tensor_train_matrix":
        return r.choice([2, 4])
    return r.randint(2, 4) if name != "tensor_train" else r.randint(1, 4)


def random_input(r: random.Random, nd: int):
    """(array, its values as a float64 numpy array)."""
    shape = [r.randint(1, 7) for _ in range(nd)]
    dtype = r.choice([torch.float32, torch.float64])
    g = torch.Generator().manual_seed(r.getrandbits(48))
    kind = r.random()
    if kind < 0.1:
        t = torch.zeros(shape, dtype=dtype)
    elif kind < 0.2:  # low rank: a product of two thin factors
        t = (torch.randn(shape[0], 2, generator=g, dtype=torch.float64)
             @ torch.randn(2, math.prod(shape[1:]), generator=g, dtype=torch.float64))
        t = t.reshape(shape).to(dtype)
    else:
        t = torch.randn(shape, generator=g, dtype=dtype) * 10.0 ** r.randint(-3, 3)
    layout = r.random()
    if layout < 0.25 and nd >= 2:
        t = t.transpose(0, nd - 1).contiguous().transpose(0, nd - 1)
    elif layout < 0.4:
        big = torch.randn([s * 2 for s in shape], generator=g, dtype=dtype)
        t = big[tuple(slice(0, None, 2) for _ in shape)]
    elif layout < 0.45 and shape[0] > 1:
        t = t[:1].expand(shape)  # stride 0
    if r.random() < 0.08 and t.numel():
        t = t.clone()
        t[np.unravel_index(r.randrange(t.numel()), shape)] = r.choice(
            [float("nan"), float("inf"), -float("inf")])
    ref = t.double().numpy().copy()
    if r.random() < 0.3:
        return t.numpy(), ref
    return t, ref


def random_rank(r: random.Random, sizes):
    roll = r.random()
    if roll < 0.05:
        return r.choice([0, -1, 10**12, 2.5, "3", None, True])
    if roll < 0.15:
        return [r.randint(-1, 9) for _ in range(r.choice([len(sizes), len(sizes) + 1, 1]))]
    return r.randint(1, 6)


def bad(r: random.Random, good, *wrong):
    """good, or (one time in 12) one of the wrong values."""
    return r.choice(wrong) if r.random() < 1 / 12 else good


def random_call(r: random.Random, name, x, shape):
    rank = random_rank(r, shape)
    if name == "svd":
        return name, lambda: D.svd(x, rank if r.random() < 0.9 else None)
    if name == "randomized_svd":
        p, q = bad(r, r.choice([0, 3, 10]), -2, 1.5), bad(r, r.choice([0, 1, 2]), -1, None)
        return name, lambda: D.randomized_svd(x, rank, n_oversamples=p, n_iter=q,
                                              random_state=r.choice([None, 7]))
    if name == "cp":
        kw = dict(init=bad(r, r.choice(["svd", "random"]), "bogus", 3),
                  n_iter_max=bad(r, r.choice([0, 3, 15]), -1, 2.0),
                  tol=bad(r, r.choice([0.0, 1e-8]), -1.0, float("inf")),
                  l2_reg=bad(r, r.choice([0.0, 1e-3]), float("nan"), -1.0),
                  normalize_factors=r.random() < 0.7, random_state=r.choice([None, 3]))
        return name, lambda: D.cp(x, rank, **kw)
    if name == "tucker":
        kw = dict(init=bad(r, r.choice(["svd", "random"]), "x"),
                  n_iter_max=bad(r, r.choice([0, 2, 6]), -3), tol=r.choice([0.0, 1e-8]))
        return name, lambda: D.tucker(x, rank, **kw)
    if name == "tensor_train":
        eps = bad(r, r.choice([None, None, 0.0, 0.1, 0.5]), -0.1, float("nan"))
        cap = None if eps is not None and r.random() < 0.5 else rank
        return name, lambda: D.tensor_train(x, rank=cap, eps=eps)
    return name, lambda: D.tensor_train_matrix(x, rank=rank)


def as64(a):
    if isinstance(a, torch.Tensor):
        return a.detach().double().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def check_result(name, res, x, ref):
    """The standard for a returned result (see the module docstring)."""
    fields = [f for f in vars(res).values() if isinstance(f, (torch.Tensor, np.ndarray))]
    for v in vars(res).values():
        if isinstance(v, list):
            fields += [f for f in v if isinstance(f, (torch.Tensor, np.ndarray))]
    kind = torch.Tensor if isinstance(x, torch.Tensor) else np.ndarray
    for f in fields:
        assert isinstance(f, kind), f"{name}: a {type(f).__name__} for a {kind.__name__} input"
        assert f.dtype == x.dtype, f"{name}: dtype {f.dtype} for a {x.dtype} input"
        assert np.isfinite(as64(f)).all(), f"{name}: non-finite factors"
    full = as64(res.to_tensor())
    want = ref if name != "tensor_train_matrix" else ref  # same values, modes regrouped
    norm = np.linalg.norm(want)
    err = np.linalg.norm(full.reshape(-1) - _matrix_order(name, want, full).reshape(-1))
    if norm == 0:
        assert res.rel_error == 0 and err == 0, f"{name}: zero input, error {res.rel_error}"
        return
    rel = err / norm
    f32 = x.dtype in (torch.float32, np.float32)
    tol = 1e-3 if f32 else 1e-6
    if not (name == "cp" and res.n_iter == 0):  # CP's starting point may be worse than 0
        assert res.rel_error <= 1 + tol, f"{name}: rel_error {res.rel_error} > 1"
    assert abs(rel - res.rel_error) <= tol * max(1.0, rel) + (3e-3 if f32 else 1e-7), (
        f"{name}: reported rel_error {res.rel_error}, measured {rel}")


def _matrix_order(name, ref, full):
    """ref in the layout to_tensor() returns (the same for every method)."""
    return ref.reshape(full.shape)


def test_fuzz_decompositions():
    r = random.Random(SEED)
    counts = {"returned": 0, "raised": 0, "device_path": 0}
    old = os.environ.get("FACTORCH_TEST_DEVICE_PATH")
    try:
        for i in range(CALLS):
            name = r.choice(METHODS)
            x, ref = random_input(r, random_ndim(r, name))
            split = r.random() < 0.5
            if split:
                os.environ["FACTORCH_TEST_DEVICE_PATH"] = "1"
                counts["device_path"] += 1
            else:
                os.environ.pop("FACTORCH_TEST_DEVICE_PATH", None)
            name, call = random_call(r, name, x, ref.shape)
            label = f"call {i}: {name} on {type(x).__name__} {tuple(ref.shape)} {x.dtype}"
            try:
                res = call()
            except (ValueError, TypeError) as e:
                msg = str(e)
                assert NAMED.match(msg), f"{label}: the message names no argument: {msg!r}"
                counts["raised"] += 1
                continue
            assert np.isfinite(ref).all(), f"{label}: NaN/Inf input returned a result"
            check_result(name, res, x, ref)
            counts["returned"] += 1
    finally:
        if old is None:
            os.environ.pop("FACTORCH_TEST_DEVICE_PATH", None)
        else:
            os.environ["FACTORCH_TEST_DEVICE_PATH"] = old
    assert counts["returned"] > CALLS // 3 and counts["raised"] > CALLS // 20, counts
