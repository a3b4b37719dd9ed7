"""The fused LoRA op against the frozen base layer alone and against PEFT's
unmerged LoRA, forward and forward+backward, interleaved in one run:

- base: ``F.linear(x, W)``, W frozen: what the layer costs without an adapter;
- factorch: ``factorch.functional.lora_linear(x, A, B, s, weight=W)``, one C
  op per direction (the adapter's GEMM accumulates into the base's output);
- PEFT: ``peft.get_peft_model`` with ``LoraConfig(r=16, target_modules=
  ["proj"])`` on a tiny module holding one ``nn.Linear``, unmerged (the
  base and the adapter run as separate torch ops and are added).

The same W, A and B in all three (checked allclose, output and gradients,
before anything is timed); r = 16, alpha = 32, no bias, dropout 0 (PEFT's
default), float32 on the CPU. fwd = the output under torch.no_grad();
fwd+bwd = the output and the gradients of x, A and B (of x only for the
base), the base frozen, as in LoRA fine-tuning. Shapes: a 4096 x 4096
projection (Llama-2-7B's attention) at M = 1, 512 and 2048 rows, and
SmolLM2-135M's 576 -> 1536 MLP projection at M = 1 and 512.

Every round times each candidate of a case in a rotated order; the figure
is the median over rounds and ratios are taken between medians of the
same run ("overhead" = factorch / base − 1).

    .venv/bin/python bench/bench_lora.py [--rounds 7] [--threads N] [--quick] [--write bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import shlex
import sys

import torch
import torch.nn.functional as F
from torch import nn

import factorch
from factorch.functional import lora_linear

from harness import fmt_time, interleaved, machine, markdown_table, write_section

SHAPES = [  # (label, in, out, M)
    ("4096×4096", 4096, 4096, 1),
    ("4096×4096", 4096, 4096, 512),
    ("4096×4096", 4096, 4096, 2048),
    ("576→1536", 576, 1536, 1),
    ("576→1536", 576, 1536, 512),
]
RANK, ALPHA = 16, 32


class Tiny(nn.Module):
    def __init__(self, n_in, n_out):
        super().__init__()
        self.proj = nn.Linear(n_in, n_out, bias=False)

    def forward(self, x):
        return self.proj(x)


def make(n_in, n_out, M):
    import peft

    torch.manual_seed(0)
    W = torch.randn(n_out, n_in) / n_in**0.5
    A = (torch.randn(RANK, n_in) / n_in**0.5).requires_grad_()
    B = (torch.randn(n_out, RANK) / RANK**0.5).requires_grad_()
    x = torch.randn(M, n_in, requires_grad=True)
    g = torch.randn(M, n_out)
    tiny = Tiny(n_in, n_out)
    with torch.no_grad():
        tiny.proj.weight.copy_(W)
    model = peft.get_peft_model(tiny, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                      target_modules=["proj"]))
    layer = model.base_model.model.proj
    pA, pB = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        pA.copy_(A)
        pB.copy_(B)
    scale = layer.scaling["default"]
    assert scale == ALPHA / RANK

    def fused(x):
        return lora_linear(x, A, B, scale, weight=W)

    # factorch and PEFT agree (float32, sums of thousands of terms: relative
    # to the largest entry) before anything is timed.
    def agree(a, b, what):
        err = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)
        assert err < 1e-4, f"{what}: factorch and PEFT differ by {err:.2g} (relative)"

    want = model(x)
    agree(fused(x), want, "y")
    gw = torch.autograd.grad(want, [x, pA, pB], g)
    gf = torch.autograd.grad(fused(x), [x, A, B], g)
    for name, a, b in zip(("grad_x", "grad_A", "grad_B"), gf, gw):
        agree(a, b, name)

    def fwd(fn):
        def run():
            with torch.no_grad():
                return fn(x)
        return run

    def train(fn, params):
        return lambda: torch.autograd.grad(fn(x), params, g)

    return {
        False: {"base": fwd(lambda x: F.linear(x, W)), "factorch": fwd(fused), "PEFT": fwd(model)},
        True: {"base": train(lambda x: F.linear(x, W), [x]),
               "factorch": train(fused, [x, A, B]),
               "PEFT": train(model, [x, pA, pB])},
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--min-time", type=float, default=0.2, help="seconds per timing sample")
    ap.add_argument("--quick", action="store_true", help="2 rounds of short samples, to check the script")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--write", metavar="RESULTS.md", help="write the table into this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.rounds, args.min_time = 2, 0.02
    cmd = ".venv/bin/python bench/bench_lora.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))

    rows = []
    for label, n_in, n_out, M in SHAPES:
        cands = make(n_in, n_out, M)
        for train in (False, True):
            med = interleaved(cands[train], args.rounds, args.min_time)
            b, f, p = med["base"], med["factorch"], med["PEFT"]
            row = [label, str(M), "fwd+bwd" if train else "fwd", fmt_time(b), fmt_time(f),
                   fmt_time(p), f"{(f / b - 1) * 100:+.1f}%", f"{(p / b - 1) * 100:+.1f}%",
                   f"{p / f:.2f}x"]
            rows.append(row)
            print(" | ".join(row), flush=True)

    header = ["shape", "M", "pass", "base F.linear", "factorch LoRA", "PEFT LoRA",
              "factorch overhead", "PEFT overhead", "factorch vs PEFT"]
    table = markdown_table(header, rows)
    body = (
        f"Command: `{cmd}`\n\n"
        f"Machine: {machine()}; factorch {factorch.__version__}, PEFT "
        f"{__import__('peft').__version__}, float32 on cpu, "
        f"check_finite={factorch.get_check_finite()['cpu']}. Median of {args.rounds} interleaved "
        f"rounds (each round times every candidate for >= {args.min_time}s). r = {RANK}, "
        f"alpha = {ALPHA}, no bias, no dropout; the base frozen. fwd+bwd = the output and the "
        "gradients of x, A and B (of x for the base). Overheads are over the base alone; "
        "\"factorch vs PEFT\" > 1 means factorch is faster.\n\n" + table
    )
    print("\n" + table)
    if args.write:
        title = "LoRA linear (cpu)" if not args.threads else f"LoRA linear (cpu, {args.threads} thread{'s' if args.threads > 1 else ''})"
        write_section(args.write, title, body)


if __name__ == "__main__":
    main()
