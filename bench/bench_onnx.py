"""onnxruntime on an exported SmolLM2-sized transformer: the dense model
against the same model compressed to low-rank layers (factorch.compress,
ratio 0.6, plain SVD), both exported with factorch.export.to_onnx (dynamic
batch and sequence), timed on a prefill of 512 tokens, interleaved in one
run (medians).

The model is LlamaForCausalLM from a config with SmolLM2-135M's sizes
(hidden 576, intermediate 1536, 9 heads / 3 kv heads, vocab 49152, tied
embeddings) and random weights: no download. The prefill returns the last
position's logits (logits_to_keep=1), as a generation's first step does.

    .venv/bin/python bench/bench_onnx.py [--layers 30] [--rounds 5] [--write bench/RESULTS.md]
    .venv/bin/python bench/bench_onnx.py --quick       # 2 layers, 64 tokens: a smoke test
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.export import Dim

import factorch
import factorch.export as fe

from harness import fmt_time, interleaved, machine, markdown_table, write_section


class Prefill(nn.Module):
    """The last position's logits of a causal LM, no cache."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids):
        return self.lm(input_ids=input_ids, use_cache=False, logits_to_keep=1).logits


def smollm2_sized(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                      num_hidden_layers=layers, num_attention_heads=9, num_key_value_heads=3,
                      max_position_embeddings=2048, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def session(path, threads):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--ratio", type=float, default=0.6)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-time", type=float, default=0.0,
                    help="seconds per timing sample (0: one call, which takes seconds)")
    ap.add_argument("--quick", action="store_true", help="2 layers, 64 tokens, 2 rounds")
    ap.add_argument("--write", metavar="RESULTS.md", help="write the section into this file")
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.tokens, args.rounds = 2, 64, 2
    cmd = "make bench-onnx  # = .venv/bin/python bench/bench_onnx.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    threads = torch.get_num_threads()

    dense = smollm2_sized(args.layers)
    small = copy.deepcopy(dense)
    t0 = time.perf_counter()
    factorch.compress(small, ratio=args.ratio, method="svd", progress=False)
    t_compress = time.perf_counter() - t0
    count = {n: sum(p.numel() for p in m.parameters()) for n, m in (("dense", dense),
                                                                     ("lowrank", small))}
    ids = torch.randint(0, 49152, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    dyn = ({0: Dim("batch"), 1: Dim("seq")},)

    with tempfile.TemporaryDirectory() as tmp:
        sessions, export_s, errors = {}, {}, {}
        for name, lm in (("dense", dense), ("lowrank", small)):
            path = Path(tmp) / f"{name}.onnx"
            model = Prefill(lm).eval()
            t0 = time.perf_counter()
            fe.to_onnx(model, (ids[:, :8],), path, dynamic_shapes=dyn)
            export_s[name] = time.perf_counter() - t0
            sessions[name] = session(path, threads)
            with torch.no_grad():
                ref = model(ids).numpy()
            got = sessions[name].run(None, {"input_ids": ids.numpy()})[0]
            errors[name] = float(np.abs(got - ref).max() / np.abs(ref).max())
            print(f"{name}: exported in {export_s[name]:.1f} s, onnxruntime vs torch "
                  f"max rel err {errors[name]:.2e}", flush=True)
        feed = {"input_ids": ids.numpy()}
        cands = {n: (lambda s=s: s.run(None, feed)) for n, s in sessions.items()}
        med = interleaved(cands, args.rounds, args.min_time, warm_each=False)
        del sessions, cands

    rows = []
    for name in ("dense", "lowrank"):
        rows.append([name, f"{count[name] / 1e6:.1f} M", fmt_time(med[name]),
                     f"{args.tokens / med[name]:.0f}", f"{med['dense'] / med[name]:.2f}x",
                     f"{export_s[name]:.0f} s", f"{errors[name]:.1e}"])
    table = markdown_table(["model", "parameters", f"prefill {args.tokens} tokens",
                            "tokens/s", "vs dense", "export", "ORT vs torch (max rel)"], rows)
    body = (
        f"Command: `{cmd}`\n\n"
        f"Machine: {machine()}; onnxruntime CPUExecutionProvider, {threads} intra-op threads, "
        f"graph optimizations ALL. Model: LlamaForCausalLM config with SmolLM2-135M's sizes "
        f"(hidden 576, intermediate 1536, {args.layers} layers, 9 heads / 3 kv heads, vocab "
        f"49152, tied embeddings), random weights; `lowrank`: every projection of the blocks "
        f"compressed with `factorch.compress(ratio={args.ratio}, method='svd')` "
        f"({t_compress:.0f} s). Both exported by `factorch.export.to_onnx` with dynamic batch "
        f"and sequence. Prefill: batch 1, {args.tokens} tokens, the last position's logits. "
        f"Median of {args.rounds} interleaved rounds (one call per sample).\n\n" + table
    )
    print("\n" + table)
    if args.write:
        write_section(args.write, "ONNX Runtime prefill (SmolLM2-sized, random weights)", body)


if __name__ == "__main__":
    main()
