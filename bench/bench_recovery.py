"""Recovery after compression: how much of SmolLM2-135M's perplexity lost to
compression a short distillation from the dense model gives back.

SmolLM2-135M-Instruct compressed at ratio 0.8 with SVD-LLM, uniform
allocation (every linear layer of the 30 decoder blocks; calibration: 64
windows x 128 tokens of the calibration fortunes), then distilled from the
dense model (factorch.distill: token-level KL, T = 1, AdamW, cosine schedule
after a 5% warmup) on windows of the same calibration fortunes, which share
no text with the evaluation fortunes the perplexity is measured on:

  - trainable="factors": every factor of the compressed layers trains;
  - trainable="lora": LoRA adapters (r 16, alpha 32) on every linear layer
    of the blocks train, the factors frozen (when factorch.lora exists;
    skipped with a note otherwise).

Perplexity (factorch.evaluate.perplexity, 48 windows x 256 tokens of the
evaluation fortunes) of the dense, the compressed and each distilled model,
and the share of the compressed model's perplexity gap to the dense model
each closes.

Learning rates: 1e-4 for the factors, picked on a 30-step trial (it closed
58% of the gap on 16 evaluation windows); 5e-4 for LoRA, not tuned.

    .venv/bin/python bench/bench_recovery.py --write bench/RESULTS.md   # ~7 min on 2 cores
    .venv/bin/python bench/bench_recovery.py --steps 50,200 --write bench/RESULTS.md  # 2 budgets
    .venv/bin/python bench/bench_recovery.py --quick                    # smoke test (~1.5 min)
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import factorch  # noqa: E402
from factorch import data, evaluate, models  # noqa: E402

CALIB = "fortunes:" + ",".join(data.CALIBRATION_FILES)
TEXT = "fortunes:" + ",".join(data.EVALUATION_FILES)
TITLE = "Recovery after compression (SmolLM2-135M)"


def millions(model) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--write", help="markdown file whose section to replace")
    p.add_argument("--quick", action="store_true", help="a few steps and windows (smoke test)")
    p.add_argument("--ratio", type=float, default=0.8)
    p.add_argument("--windows", type=int, default=64, help="compression calibration windows")
    p.add_argument("--eval-windows", type=int, default=48)
    p.add_argument("--steps", default="50",
                   help="distillation steps per run; a comma list gives one run per budget")
    p.add_argument("--batch", type=int, default=4, help="windows per step")
    p.add_argument("--window", type=int, default=128, help="tokens per window")
    p.add_argument("--lr-factors", type=float, default=1e-4)
    p.add_argument("--lr-lora", type=float, default=5e-4)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--note", default="", help="a sentence on the machine's state for the section")
    p.add_argument("--only", choices=["factors", "lora"], help="run one distillation only")
    a = p.parse_args()
    if a.quick:
        a.windows, a.eval_windows, a.steps = 8, 4, "3"
    budgets = sorted({int(v) for v in str(a.steps).split(",")})
    torch.manual_seed(0)
    t_all = time.perf_counter()

    loaded = models.load("smollm2")
    teacher, tok = loaded.model, loaded.tokenizer
    compressed = models.load("smollm2").model
    calib = data.text_batches(CALIB, tok, a.window, a.windows, 8)
    t = time.perf_counter()
    factorch.compress(compressed, ratio=a.ratio, method="svd-llm", calibration=calib,
                      allocation="uniform", progress=False)
    compress_s = time.perf_counter() - t
    print(f"compressed in {compress_s:.0f} s", flush=True)

    def ppl(m):
        return evaluate.perplexity(m, tok, TEXT, max_windows=a.eval_windows)

    ppl_dense, ppl_comp = ppl(teacher), ppl(compressed)
    gap = ppl_comp - ppl_dense
    print(f"perplexity: dense {ppl_dense:.2f}, compressed {ppl_comp:.2f}", flush=True)

    # Training windows: the calibration fortunes in order (the text holds
    # ~1700 windows of 128 tokens; a run reads steps x batch of them).
    n_train = max(budgets) * a.batch
    train_all = data.text_batches(CALIB, tok, a.window, n_train, a.batch)
    rows = [["dense", "-", "-", millions(teacher), "-", f"{ppl_dense:.2f}", "1.00", "-"],
            [f"svd-llm {a.ratio} uniform", "-", "-", millions(compressed), "-",
             f"{ppl_comp:.2f}", f"{ppl_comp / ppl_dense:.2f}", "0%"]]
    notes = []
    runs = [("factors", a.lr_factors), ("lora", a.lr_lora)]
    if a.only:
        runs = [r for r in runs if r[0] == a.only]
    runs = [(t, lr, steps) for t, lr in runs for steps in budgets]
    for trainable, lr, steps in runs:
        train = train_all[:steps]  # the first steps x batch windows
        budget = f"{steps} x {a.batch} x {a.window} = {steps * a.batch * a.window:,} tokens"
        student = copy.deepcopy(compressed)
        extra = ""
        if trainable == "lora":
            if importlib.util.find_spec("factorch.lora") is None:
                notes.append("LoRA: skipped, factorch.lora is not in this build.")
                print(notes[-1], flush=True)
                continue
            from factorch import lora

            lora.add_lora(student, r=a.lora_r, alpha=2 * a.lora_r)
            extra = f" (r {a.lora_r})"
            if not any(n.startswith("LoRA:") for n in notes):
                notes.append(f"LoRA: `factorch.lora.add_lora(r={a.lora_r}, alpha={2 * a.lora_r})` "
                             f"on every linear layer but the LM head; only the adapters train; "
                             f"evaluated unmerged (merged into the low-rank factors, each rank "
                             f"grows by r: the parameter count shown).")
        hist = factorch.distill(student, teacher, train, steps=steps, lr=lr,
                                trainable=trainable, warmup=max(1, steps // 20),
                                progress=not a.write)
        after = ppl(student)
        closed = (ppl_comp - after) / gap if gap > 0 else float("nan")
        print(f"{trainable}: {hist.summary()}\n  perplexity {after:.2f} "
              f"({closed:.0%} of the gap closed)", flush=True)
        rows.append(["+ distill", trainable + extra, f"{lr:.0e}", millions(student), budget,
                     f"{after:.2f}", f"{after / ppl_dense:.2f}", f"{closed:.0%}"])
        rows[-1][4] += f", {hist.seconds / 60:.1f} min"
        del student

    cmd = "python bench/bench_recovery.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    lines = [
        f"Command: `{cmd}` ({harness.machine()}); {(time.perf_counter() - t_all) / 60:.0f} min "
        f"in all{'; ' + a.note if a.note else ''}.",
        "",
        f"SmolLM2-135M-Instruct (float32) compressed with `factorch.compress(ratio={a.ratio}, "
        f"method='svd-llm', allocation='uniform')`, calibrated on {a.windows} windows x "
        f"{a.window} tokens of the fortunes {', '.join(data.CALIBRATION_FILES)} "
        f"({compress_s:.0f} s). Distillation from the dense model: `factorch.distill` "
        f"(token-level KL at T = 1, AdamW, no weight decay, gradient norm clipped to 1, "
        f"cosine schedule after a 5% warmup) on the first steps x {a.batch} windows of the "
        f"calibration fortunes (the compression's calibration read the first {a.windows}). "
        f"Perplexity: {a.eval_windows} windows x 256 tokens of "
        f"{', '.join(data.EVALUATION_FILES)} (no text shared with the training). "
        f"Gap closed: (compressed - distilled) / (compressed - dense) perplexity. "
        f"Budget: steps x windows x tokens, and the distillation's wall time.",
        "",
        harness.markdown_table(["model", "trainable", "lr", "parameters", "budget",
                                "perplexity", "x dense", "gap closed"], rows),
    ]
    lines += [""] + notes if notes else []
    body = "\n".join(lines)
    print(body)
    if a.write:
        harness.write_section(a.write, TITLE, body)


if __name__ == "__main__":
    main()
