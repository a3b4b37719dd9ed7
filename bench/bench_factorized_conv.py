"""FactorizedConv2d with CP and Tucker kernels against the peers, forward
and forward+backward (output plus the gradients of x, the factors and the
bias), interleaved in one run:

- TensorLy-Torch's FactorizedConv (tltorch), implementation="factorized"
  (CP: a 1x1 conv, a depthwise conv per spatial mode, a 1x1 conv; Tucker:
  1x1, kh x kw on the core, 1x1 -- a chain of F.conv1d / F.conv2d calls) and
  "reconstructed" (rebuilds the kernel, then one F.conv2d);
- dense nn.Conv2d.

Layers, float32 on the CPU, batch 16:
  (a) 256 -> 256, 3x3, padding 1, on 56x56;
  (b) 64 -> 128, 3x3, stride 2, padding 1, on 112x112.
Ranks are tltorch's for the parameter fractions 0.25 and 0.125 (about 4x and
8x fewer weights than the dense kernel); tltorch's Tucker keeps the spatial
modes whole (fixed_rank_modes="spatial": Tucker-2, core [R_out, R_in, kh, kw]
plus a kh x kh and a kw x kw factor, which factorch folds into its core). The
tltorch layer is created first; the factorch layer gets the same ranks and
tltorch's weights copied in, and is checked to compute the same function
(output and input gradient, allclose) before anything is timed.

    .venv/bin/pip install tensorly-torch   # the peer ("bench" extra)
    .venv/bin/python bench/bench_factorized_conv.py [--quick] [--write bench/RESULTS.md]

--quick: one round of short samples, to check the script (about 30 s on
2 quiet cores); the full run (about 3 minutes) is meant for a quiet machine.
"""

from __future__ import annotations

import argparse
import math
import shlex
import statistics
import sys
import time
import warnings

import torch
from torch import nn

import factorch

from harness import fmt_time, interleaved, machine, markdown_table, write_section

warnings.filterwarnings("ignore", message=".*C\\+\\+ implementation not available.*")

BATCH = 16
# name: (in, out, kernel, stride, padding, input size)
SHAPES = {
    "a": (256, 256, 3, 1, 1, 56),
    "b": (64, 128, 3, 2, 1, 112),
}
FRACTIONS = [(0.25, "4x"), (0.125, "8x")]
FACTS = ["cp", "tucker"]
CANDS = ["factorch", "tltorch factorized", "tltorch reconstructed", "nn.Conv2d"]


def peers_available():
    try:
        import tltorch  # noqa: F401
    except ImportError as e:
        sys.exit(f"bench: the peer is missing ({e}); install it with "
                 "`.venv/bin/pip install tensorly-torch`")


def factorch_conv():
    """factorch.nn.FactorizedConv2d, or exit saying why it cannot run."""
    try:
        from factorch.nn import FactorizedConv2d
    except ImportError as e:
        sys.exit(f"bench: factorch.nn.FactorizedConv2d is missing ({e}); rebuild with `make build`")
    if not hasattr(torch.ops.factorch, "conv_chain"):
        sys.exit("bench: torch.ops.factorch.conv_chain is not registered: the built libraries "
                 "predate factorch/nn/conv.py; rebuild with `make build`")
    return FactorizedConv2d


# --------------------------------------------------------------------------
# Layers with the same factors in both libraries
# --------------------------------------------------------------------------
def tltorch_layer(shape, fact, fraction, implementation):
    """tltorch's FactorizedConv, randomly initialised (its constructor leaves
    the factors uninitialised) so that the kernel has nn.Conv2d's scale."""
    import tltorch

    cin, cout, k, stride, padding, _ = shape
    torch.manual_seed(0)
    extra = {"fixed_rank_modes": "spatial"} if fact == "tucker" else {}
    tl = tltorch.FactorizedConv(cin, cout, (k, k), factorization=fact, rank=fraction,
                                implementation=implementation, stride=stride, padding=padding,
                                bias=True, **extra)
    bound = 1 / math.sqrt(cin * k * k)
    with torch.no_grad():
        tl.weight.normal_(0, bound)  # std of the reconstructed kernel
        tl.bias.uniform_(-bound, bound)
    return tl


def factorch_like(FactorizedConv2d, tl, fact, shape):
    """A factorch layer with tltorch layer tl's ranks, its weights copied in.

    factorch's stages (``layer.weights``, views of its flat parameter): cp
    [R, C_in, 1, 1], [R, 1, kh, 1], [R, 1, 1, kw], [C_out, R, 1, 1]; tucker
    (rank (R_in, R_out)) [R_in, C_in, 1, 1], [R_out, R_in, kh, kw],
    [C_out, R_out, 1, 1]."""
    cin, cout, k, stride, padding, _ = shape
    w = tl.weight
    with torch.no_grad():
        if fact == "cp":
            # tltorch: factors [C_out, R], [C_in, R], [kh, R], [kw, R] and weights λ [R].
            ours = FactorizedConv2d(cin, cout, k, factorization="cp", rank=int(w.rank),
                                    stride=stride, padding=padding)
            out_f, in_f, h_f, w_f = w.factors
            src = [in_f.T, h_f.T, w_f.T, out_f * w.weights[None, :]]
        else:
            # tltorch: core [R_out, R_in, kh', kw'] with factors [C_out, R_out],
            # [C_in, R_in], [kh, kh'], [kw, kw']; the spatial ones fold into the core.
            import tensorly as tlpy

            r_out, r_in = int(w.rank[0]), int(w.rank[1])
            core = tlpy.tenalg.multi_mode_dot(w.core, list(w.factors[2:]), modes=[2, 3])
            ours = FactorizedConv2d(cin, cout, k, factorization="tucker", rank=(r_in, r_out),
                                    stride=stride, padding=padding)
            src = [w.factors[1].T, core, w.factors[0]]
        dst = ours.weights
        assert len(dst) == len(src), (fact, [tuple(v.shape) for v in dst])
        for v, t in zip(dst, src):
            v.copy_(t.reshape(v.shape))
        ours.bias.copy_(tl.bias)
    return ours


def check_same(ours, tl, fact, shape, label):
    """factorch and tltorch compute the same output and the same gradients of
    x, the bias and the factors (batch 2). Factor gradients are compared
    where the two parametrisations coincide: CP's four factors (the output
    one scaled by tltorch's λ), Tucker's two channel factors (tltorch's core
    carries the spatial factors that factorch folds in)."""
    cin, _, _, _, _, size = shape
    w = tl.weight
    torch.manual_seed(1)
    x = torch.randn(2, cin, size, size, requires_grad=True)
    y_tl = tl(x)
    g = torch.randn_like(y_tl)
    fs = list(w.factors)
    gx_tl, gb_tl, *gf_tl = torch.autograd.grad(y_tl, [x, tl.bias, *fs], g)
    y = ours(x)
    gx, gb, gflat = torch.autograd.grad(y, [x, ours.bias, ours.factors], g)
    base = ours.factors.storage_offset()
    gstage = [gflat[v.storage_offset() - base:][: v.numel()].view(v.shape) for v in ours.weights]
    pairs = [("output", y, y_tl), ("grad of x", gx, gx_tl), ("grad of the bias", gb, gb_tl)]
    if fact == "cp":  # tltorch: [C_out, R], [C_in, R], [kh, R], [kw, R]
        lam = w.weights.detach()
        pairs += [("grad of the input factor", gstage[0].flatten(1).T, gf_tl[1]),
                  ("grad of the height factor", gstage[1].flatten(1).T, gf_tl[2]),
                  ("grad of the width factor", gstage[2].flatten(1).T, gf_tl[3]),
                  ("grad of the output factor", gstage[3].flatten(1) * lam, gf_tl[0])]
    else:  # tltorch: [C_out, R_out], [C_in, R_in], then the spatial ones
        pairs += [("grad of the input factor", gstage[0].flatten(1).T, gf_tl[1]),
                  ("grad of the output factor", gstage[2].flatten(1), gf_tl[0])]
    for what, a, b in pairs:
        scale = b.abs().max().item()
        err = (a - b).abs().max().item() / max(scale, 1e-30)
        if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=1e-4 * scale):
            sys.exit(f"bench: {label}: factorch and tltorch disagree on the {what} "
                     f"(shapes {tuple(a.shape)} vs {tuple(b.shape)}, max relative error {err:.2e})")


# --------------------------------------------------------------------------
# One case: a shape, a factorization, a compression
# --------------------------------------------------------------------------
def run_case(FactorizedConv2d, shape_name, fact, fraction, args, out):
    shape = SHAPES[shape_name]
    cin, cout, k, stride, padding, size = shape
    tl_f = tltorch_layer(shape, fact, fraction, "factorized")
    tl_r = tltorch_layer(shape, fact, fraction, "reconstructed")
    label = f"{shape_name} {fact} {dict(FRACTIONS)[fraction]}"
    ours = factorch_like(FactorizedConv2d, tl_f, fact, shape)
    check_same(ours, tl_f, fact, shape, label)
    mods = {"factorch": ours, "tltorch factorized": tl_f}
    mods["tltorch reconstructed"] = tl_r
    torch.manual_seed(0)
    mods["nn.Conv2d"] = nn.Conv2d(cin, cout, k, stride=stride, padding=padding)

    torch.manual_seed(2)
    x = torch.randn(BATCH, cin, size, size, requires_grad=True)
    with torch.no_grad():
        g = torch.randn_like(mods["nn.Conv2d"](x))

    def fwd_bwd(mod):
        params = [x, *mod.parameters()]
        return lambda: torch.autograd.grad(mod(x), params, g)

    def fwd(mod):
        def call():
            with torch.no_grad():
                return mod(x)
        return call

    med = {}
    for mode, make in (("fwd+bwd", fwd_bwd), ("fwd", fwd)):
        fns = {n: make(m) for n, m in mods.items()}
        med[mode] = interleaved(fns, args.rounds, args.min_time, warm_each=False)

    compression = cin * cout * k * k / ours.factors.numel()  # of the kernel (bias excluded)
    row = [f"({shape_name}) {cin}->{cout} {k}x{k} s{stride} @{size}", fact,
           f"{compression:.1f}x", str(ours.rank).replace(" ", "")]
    for mode in ("fwd+bwd", "fwd"):
        m = med[mode]
        tl_best = min(m["tltorch factorized"], m["tltorch reconstructed"])
        row += [fmt_time(m[n]) for n in CANDS]
        row += [f"{tl_best / m['factorch']:.2f}x", f"{m['nn.Conv2d'] / m['factorch']:.2f}x"]
    out["rows"].append(row)
    print(" | ".join(row), flush=True)

    for mode in ("fwd+bwd", "fwd"):
        m = med[mode]
        tl_best = min(m["tltorch factorized"], m["tltorch reconstructed"])
        out["ratios"].setdefault(mode, []).append(
            (tl_best / m["factorch"], min(tl_best, m["nn.Conv2d"]) / m["factorch"]))


def floor_lines(ratios):
    """The floors over the table: every layer at most 10% slower than the
    faster of nn.Conv2d and tltorch, and the geometric mean over the table
    at least 1.5x tltorch's faster mode; fwd+bwd and forward alone."""
    lines = []
    for mode, rs in ratios.items():
        ok = sum(best >= 0.9 for _, best in rs)
        geo = statistics.geometric_mean([tl for tl, _ in rs])
        lines.append(f"- {mode}: at most 10% slower than the faster of nn.Conv2d and tltorch "
                     f"(ratio >= 0.9) in {ok} of {len(rs)} cases (lowest "
                     f"{min(b for _, b in rs):.2f}x); geometric mean vs the faster tltorch mode "
                     f"{geo:.2f}x (floor 1.5x): {'met' if geo >= 1.5 else 'NOT met'}")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one round of short samples")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-time", type=float, default=0.2, help="seconds per timing sample")
    ap.add_argument("--only", choices=FACTS, action="append", help="factorizations to run")
    ap.add_argument("--shapes", choices=list(SHAPES), action="append", help="shapes to run")
    ap.add_argument("--write", metavar="RESULTS.md", help="write the table into this file")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.min_time = 1, 0.01
    peers_available()
    FactorizedConv2d = factorch_conv()
    raw = argv if argv is not None else sys.argv[1:]
    cmd = ".venv/bin/python bench/bench_factorized_conv.py " + " ".join(shlex.quote(a) for a in raw)

    out = {"rows": [], "ratios": {}}
    start = time.perf_counter()
    for shape_name in args.shapes or list(SHAPES):
        for fact in args.only or FACTS:
            for fraction, _ in FRACTIONS:
                run_case(FactorizedConv2d, shape_name, fact, fraction, args, out)
    took = time.perf_counter() - start

    header = ["layer", "factorization", "compression", "rank"]
    for mode in ("fwd+bwd", "fwd"):
        header += [f"{mode} {n}" for n in CANDS] + [f"{mode} vs best tltorch", f"{mode} vs dense"]
    table = markdown_table(header, out["rows"])
    floors = "\n".join(floor_lines(out["ratios"]))
    body = (
        f"Command: `{cmd}`{' (a quick check, not a measurement)' if args.quick else ''}\n\n"
        f"Machine: {machine()}; factorch {factorch.__version__} on cpu, "
        f"check_finite={factorch.get_check_finite()['cpu']}. The run took {took:.0f} s.\n"
        f"float32, batch {BATCH}. fwd+bwd: the output and the gradients of x, the factors and "
        f"the bias; fwd: the output under no_grad. Ranks as tltorch picks them for the fractions "
        f"0.25 / 0.125 of the dense kernel's parameters (Tucker: spatial modes kept, Tucker-2), "
        f"the same factors in both libraries (checked allclose). Median of {args.rounds} "
        f"interleaved rounds (each sample >= {args.min_time}s). Ratios > 1: factorch is "
        f"faster.\n\n" + table + "\n\nFloors:\n\n" + floors
    )
    print("\n" + table + "\n\n" + floors + f"\n\n(took {took:.0f} s)")
    if args.write:
        write_section(args.write, "Factorized convolutions (cpu)", body)


if __name__ == "__main__":
    main()
