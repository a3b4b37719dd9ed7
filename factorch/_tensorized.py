"""Tensorized shapes and rank helpers shared by the tensorized
factorizations (factorch/factorizations.py: CP, Tucker, Tensor-Train) and
the factorized convolutions and embeddings.

A weight W [out, in] is tensorized as W[(o_1..o_q), (i_1..i_p)] with
in = ∏ i_k and out = ∏ o_k (multi-indices row-major).
"""

from __future__ import annotations

import math

MAX_MODES = 8  # FCT_MAX_MODES in ops/include/factorch.h


# --------------------------------------------------------------------------
# Tensorized shapes
# --------------------------------------------------------------------------
def _prime_factors(n: int) -> list[int]:
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return out


def balanced_modes(n: int, d: int) -> tuple[int, ...]:
    """n as d factors as equal as possible, largest first: the prime factors,
    largest first, each multiplied into the currently smallest mode (modes
    of 1 fill in when n has fewer than d prime factors)."""
    modes = [1] * d
    for p in sorted(_prime_factors(n), reverse=True):
        i = min(range(d), key=lambda k: modes[k])
        modes[i] *= p
    return tuple(sorted(modes, reverse=True))


def auto_tensorized_shape(in_features: int, out_features: int) -> tuple[tuple, tuple]:
    """The same number of modes d for both sides: the smallest d in 2..6
    whose balanced modes are all <= 8 on both sides (4096 -> (8, 8, 8, 8)),
    else the d giving the smallest largest mode. Modes around 8 keep every
    factor small while the number of modes (and so of contraction steps)
    stays low."""
    best = None
    for d in range(2, 7):
        i, o = balanced_modes(in_features, d), balanced_modes(out_features, d)
        largest = max(i[0], o[0])
        if largest <= 8:
            return i, o
        if best is None or largest < best[0]:
            best = (largest, i, o)
    return best[1], best[2]


def check_tensorized_shape(tensorized_shape, in_features: int, out_features: int,
                           same_length: bool) -> tuple[tuple, tuple]:
    """Validates ((i_1..i_p), (o_1..o_q)) against the feature counts."""
    if tensorized_shape is None:
        return auto_tensorized_shape(in_features, out_features)
    try:
        ins, outs = (tuple(s) for s in tensorized_shape)
    except (TypeError, ValueError):
        raise ValueError(
            "tensorized_shape: expected ((i_1, .., i_d), (o_1, .., o_d)), "
            f"got {tensorized_shape!r}"
        ) from None
    for side, modes, total in (("input", ins, in_features), ("output", outs, out_features)):
        if not 1 <= len(modes) <= MAX_MODES or not all(
            isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in modes
        ):
            raise ValueError(
                f"tensorized_shape: expected 1 to {MAX_MODES} positive int {side} modes, "
                f"got {modes!r}"
            )
        if math.prod(modes) != total:
            name = "in_features" if side == "input" else "out_features"
            raise ValueError(
                f"tensorized_shape: the {side} modes {modes} multiply to {math.prod(modes)}, "
                f"expected {name} = {total}"
            )
    if same_length and len(ins) != len(outs):
        raise ValueError(
            "tensorized_shape: a Tensor-Train needs as many input as output modes, got "
            f"{len(ins)} and {len(outs)}"
        )
    return ins, outs


# --------------------------------------------------------------------------
# Rank helpers
# --------------------------------------------------------------------------
def grow_ranks(ranks: list[int], caps: list[int], count, budget: int, relative: bool) -> list[int]:
    """Raise the ranks one step at a time, always the smallest one (relative
    to its cap when `relative`: Tucker ranks relative to their mode sizes)
    that can still grow, while the parameter count stays within budget: a
    balanced choice close to the budget from below."""
    ranks = list(ranks)
    while True:
        order = sorted((r / c if relative else r, k) for k, (r, c) in enumerate(zip(ranks, caps))
                       if r < c)
        # Only the smallest may grow: when none of them fits, stop rather
        # than grow a larger one (which would unbalance the ranks).
        order = [(key, k) for key, k in order if key == order[0][0]]
        for _, k in order:
            ranks[k] += 1
            if count(ranks) <= budget:
                break
            ranks[k] -= 1
        else:
            return ranks


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def tucker_rank_list(rank, ins, outs):
    p, q = len(ins), len(outs)
    try:
        parts = list(rank)
    except TypeError:
        raise ValueError(f"rank: expected an int, a tuple, a fraction in (0, 1] or 'same', got {rank!r}") from None
    if len(parts) == 2 and all(isinstance(x, (tuple, list)) for x in parts):
        t, s = list(parts[0]), list(parts[1])
    elif len(parts) == p + q:
        t, s = parts[:p], parts[p:]
    else:
        raise ValueError(
            f"rank: expected Tucker ranks as ((t_1..t_{p}), (s_1..s_{q})) or {p + q} ints, got {rank!r}"
        )
    if len(t) != p or len(s) != q:
        raise ValueError(f"rank: expected {p} input and {q} output Tucker ranks, got {rank!r}")
    for side, rs, modes in (("input", t, ins), ("output", s, outs)):
        for k, (v, n) in enumerate(zip(rs, modes)):
            if not is_int(v) or not 1 <= v <= n:
                raise ValueError(
                    f"rank: {side} Tucker rank {k} = {v!r} is impossible: expected 1 <= rank <= "
                    f"{n} (its mode size)"
                )
    return list(t) + list(s)
