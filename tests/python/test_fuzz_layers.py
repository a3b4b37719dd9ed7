"""Seeded fuzz of the layer conversions: FactorizedLinear.from_linear,
FactorizedConv1d/2d.from_conv and FactorizedEmbedding.from_embedding with
random sizes (primes and 1 included), factorizations, rank rules (rank,
ratio, energy; valid and not) and conv options (stride, padding, dilation,
groups, bias), in float32 and float64.

For each conversion that returns, the layer must be consistent with itself
and with the dense layer it came from:
- reconstruction_error is the relative Frobenius error of to_linear() /
  to_conv() / to_embedding()'s weight against the original (what the
  attribute promises), and below 1 + a little;
- the factorized forward equals the forward of its own dense
  reconstruction (to_*()), on random inputs;
- num_parameters and compression_ratio agree with the parameters;
- bias and every nn option are carried over.
A conversion may instead raise ValueError / TypeError naming an argument.

Deterministic (fixed seed); a few seconds.
"""

from __future__ import annotations

import random
import re

import torch
from torch import nn

from factorch.nn import FactorizedConv1d, FactorizedConv2d, FactorizedEmbedding, FactorizedLinear

SEED = 20261128
CALLS = 120
NAMED = re.compile(r"^(rank|ratio|energy|factorization|tensorized_shape|linear|conv|embedding|"
                   r"in_features|out_features|groups|padding|kernel_size)\b")


def size(r: random.Random) -> int:
    return r.choice([1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 17, 24, 32])


def rank_rule(r: random.Random, factorization: str) -> dict:
    roll = r.random()
    if roll < 0.35:
        return {"ratio": r.choice([0.05, 0.2, 0.5, 0.9, 1.0, 0.0, 1.5])}
    if roll < 0.6 and factorization in ("lowrank", "tt"):
        return {"energy": r.choice([0.5, 0.9, 0.99, 1.0, 0.0, 1.2])}
    if factorization == "tucker" and r.random() < 0.5:
        return {"rank": (r.randint(1, 4), r.randint(1, 4))}
    return {"rank": r.choice([1, 2, 3, 5, 8, 0, -1])}


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    n = b.norm().item()
    return (a - b).norm().item() / n if n > 0 else (a - b).norm().item()


def amax(t) -> float:
    return t.detach().abs().max().item() if t.numel() else 0.0


def close(a, b, dtype, scale) -> bool:
    tol = (5e-4 if dtype == torch.float32 else 1e-9) * (1 + scale)
    return amax(a.detach().double() - b.detach().double()) <= tol


def check_common(label, layer, dense_w, recon_w, dtype):
    err = rel(recon_w, dense_w)
    # CP and Tucker report the error from norms: about 1e-8 absolute (factorch.h)
    tol = 1e-4 if dtype == torch.float32 else 1e-7
    assert layer.reconstruction_error is not None, f"{label}: no reconstruction_error"
    assert abs(layer.reconstruction_error - err) <= tol + 1e-3 * err, (
        f"{label}: reconstruction_error {layer.reconstruction_error}, measured {err}")
    assert layer.reconstruction_error <= 1 + 1e-6, f"{label}: error above 1"
    n = sum(p.numel() for p in layer.parameters())
    assert layer.num_parameters == n, f"{label}: num_parameters {layer.num_parameters} != {n}"


def linear_case(r: random.Random, i: int):
    f = r.choice(["lowrank", "cp", "tucker", "tt"])
    dtype = r.choice([torch.float32, torch.float64])
    lin = nn.Linear(size(r), size(r), bias=r.random() < 0.7, dtype=dtype)
    rule = rank_rule(r, f)
    label = f"call {i}: from_linear {f} {lin.in_features}->{lin.out_features} {dtype} {rule}"
    layer = FactorizedLinear.from_linear(lin, factorization=f, **rule)
    back = layer.to_linear()
    check_common(label, layer, lin.weight, back.weight, dtype)
    assert (back.bias is None) == (lin.bias is None), label
    if lin.bias is not None:
        assert torch.equal(back.bias.detach(), lin.bias.detach()), f"{label}: bias changed"
    x = torch.randn(r.randint(0, 5), lin.in_features, dtype=dtype)
    with torch.no_grad():
        scale = amax(back.weight.abs().sum(1)) * max(1.0, amax(x))
        assert close(layer(x), back(x), dtype, scale), f"{label}: forward differs from to_linear()'s"


def conv_case(r: random.Random, i: int):
    one_d = r.random() < 0.3
    f = r.choice(["lowrank", "cp", "tucker", "tt"])
    dtype = r.choice([torch.float32, torch.float64])
    groups = 1 if f == "tt" else r.choice([1, 1, 2])
    cin, cout = groups * r.choice([1, 2, 3, 4, 6]), groups * r.choice([1, 2, 3, 4, 5])
    k = r.choice([1, 2, 3]) if one_d else (r.choice([1, 3]), r.choice([1, 2, 3]))
    opts = dict(stride=r.choice([1, 2]), padding=r.choice([0, 1]), dilation=r.choice([1, 2]),
                groups=groups, bias=r.random() < 0.7)
    Conv = nn.Conv1d if one_d else nn.Conv2d
    conv = Conv(cin, cout, k, dtype=dtype, **opts)
    rule = rank_rule(r, f)
    label = f"call {i}: from_conv {f} {conv} {dtype} {rule}"
    Fact = FactorizedConv1d if one_d else FactorizedConv2d
    layer = Fact.from_conv(conv, factorization=f, **rule)
    back = layer.to_conv()
    check_common(label, layer, conv.weight, back.weight, dtype)
    for name in ("stride", "padding", "dilation", "groups", "kernel_size"):
        assert getattr(back, name) == getattr(conv, name), f"{label}: {name} not carried over"
    shape = (r.randint(1, 3), cin, 9) if one_d else (r.randint(1, 3), cin, 7, 8)
    x = torch.randn(*shape, dtype=dtype)
    with torch.no_grad():
        scale = back.weight.abs().sum().item() * amax(x)
        assert close(layer(x), back(x), dtype, scale), f"{label}: forward differs from to_conv()'s"


def embedding_case(r: random.Random, i: int):
    f = r.choice(["lowrank", "tt"])
    dtype = r.choice([torch.float32, torch.float64])
    num, dim = r.choice([1, 5, 17, 64, 100]), r.choice([1, 4, 6, 16])
    pad = r.choice([None, None, 0, num - 1])
    emb = nn.Embedding(num, dim, padding_idx=pad, dtype=dtype)
    rule = rank_rule(r, f)
    label = f"call {i}: from_embedding {f} {num}x{dim} pad={pad} {dtype} {rule}"
    layer = FactorizedEmbedding.from_embedding(emb, factorization=f, **rule)
    back = layer.to_embedding()
    check_common(label, layer, emb.weight, back.weight, dtype)
    idx = torch.randint(0, num, (r.randint(0, 6),))
    with torch.no_grad():
        scale = amax(back.weight)
        assert close(layer(idx), back(idx), dtype, scale), f"{label}: lookup differs"


def test_fuzz_layer_conversions():
    r = random.Random(SEED)
    torch.manual_seed(SEED)
    returned = raised = 0
    for i in range(CALLS):
        case = r.choice([linear_case, linear_case, conv_case, conv_case, embedding_case])
        try:
            case(r, i)
            returned += 1
        except (ValueError, TypeError) as e:
            assert NAMED.match(str(e)), f"call {i} ({case.__name__}): message names no argument: {e}"
            raised += 1
    assert returned > CALLS // 2 and raised > 0, (returned, raised)
