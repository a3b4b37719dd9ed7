"""The ``factorch`` command line.

    factorch compress MODEL --ratio 0.8 --method svd-llm --calib FILE --out DIR
    factorch eval MODEL [--compressed DIR] --text FILE [--speed]
    factorch report DIR [--plot PNG]
    factorch finetune MODEL --compressed DIR --calib FILE... --steps N --out DIR

MODEL is ``smollm2``, ``minilm``, a Hugging Face model folder or a .gguf
file (factorch.models). Texts are file paths or ``fortunes:NAME,NAME``
(Debian's fortune files); the defaults calibrate and evaluate on disjoint
fortune files (factorch.data).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .data import CALIBRATION_FILES, EVALUATION_FILES

DEFAULT_CALIB = "fortunes:" + ",".join(CALIBRATION_FILES)
DEFAULT_TEXT = "fortunes:" + ",".join(EVALUATION_FILES)


def _targets(v):
    if v is None:
        return None
    return v.split(",") if "," in v or v.isidentifier() else v


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="factorch", description="Compress models by factorizing "
                                "their weights, evaluate and report.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="compress a model and save it")
    c.add_argument("model", help="smollm2, minilm, a model folder or a .gguf file")
    c.add_argument("--ratio", type=float, default=0.8,
                   help="fraction of the targeted weights' parameters kept (default 0.8)")
    c.add_argument("--method", default="svd-llm", choices=["svd", "asvd", "svd-llm"])
    c.add_argument("--allocation", default="uniform", choices=["uniform", "global"])
    c.add_argument("--factorization", default="lowrank",
                   choices=["lowrank", "cp", "tucker", "tt"])
    c.add_argument("--alpha", type=float, default=0.5, help="ASVD's exponent (default 0.5)")
    c.add_argument("--calib", default=DEFAULT_CALIB,
                   help="calibration text: a file or fortunes:NAME,... (default: %(default)s)")
    c.add_argument("--windows", type=int, default=128, help="calibration windows (default 128)")
    c.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--targets", help="regex over module names, or comma-separated suffixes")
    c.add_argument("--exclude", help="regex or comma-separated suffixes to leave dense")
    c.add_argument("--sequential", action="store_true",
                   help="calibrate block by block on the compressed blocks' outputs")
    c.add_argument("--out", required=True, help="folder to save the compressed model in")
    c.add_argument("--no-progress", action="store_true")

    e = sub.add_parser("eval", help="perplexity (causal LM) or embedding cosine (encoder)")
    e.add_argument("model")
    e.add_argument("--compressed", help="a folder written by `factorch compress`")
    e.add_argument("--text", default=DEFAULT_TEXT,
                   help="evaluation text: a file or fortunes:NAME,... (default: %(default)s)")
    e.add_argument("--windows", type=int, default=None, help="at most this many windows")
    e.add_argument("--seq-len", type=int, default=256)
    e.add_argument("--speed", action="store_true",
                   help="also time prefill and greedy decoding, dense against compressed")
    e.add_argument("--json", help="write the results to this JSON file")

    f = sub.add_parser("finetune", help="recover a compressed model's quality by distilling "
                       "it from the dense model (factorch.distill)")
    f.add_argument("model", help="the dense teacher: smollm2, a model folder or a .gguf file")
    f.add_argument("--compressed", required=True,
                   help="the student: a folder written by `factorch compress`")
    f.add_argument("--calib", nargs="+", default=[DEFAULT_CALIB],
                   help="training text: files or fortunes:NAME,... (default: %(default)s)")
    f.add_argument("--steps", type=int, required=True, help="optimizer steps")
    f.add_argument("--out", required=True, help="folder to save the fine-tuned model in")
    f.add_argument("--lr", type=float, default=1e-4, help="AdamW's peak learning rate")
    f.add_argument("--trainable", default="factors", choices=["factors", "lora", "all"],
                   help="what trains: the factorch layers' factors (default), LoRA adapters "
                   "added to every linear layer, or every parameter")
    f.add_argument("--lora-r", type=int, default=16,
                   help="the adapters' rank for --trainable lora (alpha = 2r; default 16)")
    f.add_argument("--loss", default="kl", choices=["kl", "ce", "kl+ce"])
    f.add_argument("--batch", type=int, default=4, help="windows per step (default 4)")
    f.add_argument("--window", type=int, default=128, help="tokens per window (default 128)")
    f.add_argument("--windows", type=int, default=None,
                   help="use at most this many windows of the text (default: all, cycled)")
    f.add_argument("--warmup", type=int, default=None,
                   help="linear warmup steps (default: 5%% of the steps)")
    f.add_argument("--no-progress", action="store_true")

    r = sub.add_parser("report", help="print the per-layer report of a compressed model")
    r.add_argument("dir")
    r.add_argument("--plot", help="write the per-layer plot to this PNG")
    r.add_argument("--rows", type=int, default=None, help="print at most this many layers")
    return p


def _load(name):
    from . import models

    return models.load(name)


def cmd_compress(a) -> int:
    import factorch
    from . import data

    t0 = time.perf_counter()
    loaded = _load(a.model)
    print(f"model: {loaded.source} ({sum(p.numel() for p in loaded.model.parameters()):,} "
          f"parameters), loaded in {time.perf_counter() - t0:.1f} s")
    batches = None
    if a.method != "svd":
        batches = data.text_batches(a.calib, loaded.tokenizer, a.seq_len, a.windows,
                                    a.batch_size)
        print(f"calibration: {a.windows} windows x {a.seq_len} tokens of {a.calib}")
    t = time.perf_counter()
    report = factorch.compress(loaded.model, ratio=a.ratio, method=a.method,
                               calibration=batches, targets=_targets(a.targets),
                               exclude=_targets(a.exclude), factorization=a.factorization,
                               allocation=a.allocation, sequential=a.sequential,
                               progress=not a.no_progress, alpha=a.alpha)
    took = time.perf_counter() - t
    print(report.table(max_rows=None if len(report.layers) <= 40 else 20))
    out = Path(a.out)
    factorch.save_compressed(loaded.model, out, report=report)
    report.to_csv(out / "report.csv")
    plot = out / "report.png"
    try:
        report.plot(plot)
    except ImportError as err:
        plot = None
        print(f"(no plot: {err})")
    (out / "source.json").write_text(json.dumps({"model": a.model, "command": sys.argv[1:]}))
    print(f"compressed in {took:.1f} s; saved to {out}/ (model.safetensors, factorch.json, "
          f"report.json, report.csv{', report.png' if plot else ''})")
    return 0


def cmd_eval(a) -> int:
    import factorch
    from . import evaluate

    dense = _load(a.model)
    results = {"model": a.model, "text": a.text}
    comp = None
    if a.compressed:
        comp = _load(a.model).model
        factorch.load_compressed(comp, a.compressed)
    if dense.kind == "causal-lm":
        results["dense_perplexity"] = evaluate.perplexity(
            dense.model, dense.tokenizer, a.text, a.seq_len, a.windows, progress=True)
        print(f"dense perplexity:      {results['dense_perplexity']:.3f}")
        if comp is not None:
            results["compressed_perplexity"] = evaluate.perplexity(
                comp, dense.tokenizer, a.text, a.seq_len, a.windows, progress=True)
            print(f"compressed perplexity: {results['compressed_perplexity']:.3f} "
                  f"({results['compressed_perplexity'] / results['dense_perplexity']:.2f}x)")
    else:
        from .data import read_text

        sentences = [s for s in read_text(a.text).split("\n") if s.strip()][: a.windows or 256]
        if comp is None:
            print("encoder: give --compressed DIR to compare its sentence embeddings")
        else:
            results["embedding_cosine"] = evaluate.embedding_cosine(
                dense.model, comp, dense.tokenizer, sentences)
            print(f"mean sentence-embedding cosine to the dense model: "
                  f"{results['embedding_cosine']:.4f} over {len(sentences)} lines")
    if a.speed and comp is not None and dense.kind == "causal-lm":
        sp = evaluate.speed({"dense": dense.model, "compressed": comp})
        results["speed"] = sp
        print(speed_table(sp))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


def speed_table(sp: dict) -> str:
    base = sp.get("dense")
    lines = [f"{'model':<12} {'prefill 512 (s)':>16} {'decode (tok/s)':>15}  vs dense"]
    for n, r in sp.items():
        rel = "" if base is None or n == "dense" else (
            f"  prefill {base['prefill_s'] / r['prefill_s']:.2f}x, "
            f"decode {r['decode_tok_s'] / base['decode_tok_s']:.2f}x")
        lines.append(f"{n:<12} {r['prefill_s']:>16.3f} {r['decode_tok_s']:>15.1f}{rel}")
    return "\n".join(lines)


def _calibration_text(sources) -> str:
    from .data import read_text

    parts = []
    for src in sources:
        if not src.startswith("fortunes:") and not Path(src).is_file():
            raise FileNotFoundError(f"calib: no such file: {src}")
        parts.append(read_text(src if src.startswith("fortunes:") else Path(src)))
    return "\n\n".join(parts)


def cmd_finetune(a) -> int:
    import shutil

    import factorch
    from . import data
    from .nn import FactorizedLinear

    if a.steps < 1:
        raise ValueError(f"steps: expected a positive int, got {a.steps}")
    lora = None
    if a.trainable == "lora":
        import importlib
        import importlib.util

        if importlib.util.find_spec("factorch.lora") is None:
            raise ImportError("--trainable lora needs factorch.lora (LoRA adapters), which this "
                              "factorch does not have; use --trainable factors")
        lora = importlib.import_module("factorch.lora")
    t0 = time.perf_counter()
    teacher = _load(a.model)
    if teacher.kind != "causal-lm":
        raise ValueError(f"model: finetune distills causal LMs; {a.model} is an {teacher.kind}")
    student = _load(a.model).model
    factorch.load_compressed(student, a.compressed)
    print(f"teacher: {teacher.source}; student: {a.compressed} "
          f"({sum(p.numel() for p in student.parameters()):,} parameters); loaded in "
          f"{time.perf_counter() - t0:.1f} s")
    text = _calibration_text(a.calib)
    batches = data.text_batches(text, teacher.tokenizer, a.window, a.windows, a.batch)
    n_windows = sum(b["input_ids"].shape[0] for b in batches)
    print(f"training text: {n_windows} windows x {a.window} tokens of {', '.join(a.calib)}; "
          f"{a.steps} steps x {a.batch} windows = {a.steps * a.batch * a.window:,} tokens")
    if lora is not None:
        other = sorted({m.factorization for m in student.modules()
                        if isinstance(m, FactorizedLinear) and m.factorization != "lowrank"})
        if other:
            raise ValueError(f"--trainable lora: the student has {'/'.join(other)} layers, into "
                             f"which adapters cannot be merged exactly; use --trainable factors")
        lora.add_lora(student, r=a.lora_r, alpha=2 * a.lora_r)
    warmup = a.warmup if a.warmup is not None else max(0, a.steps // 20)
    hist = factorch.distill(student, teacher.model, batches, steps=a.steps, lr=a.lr,
                            trainable=a.trainable, loss=a.loss, warmup=warmup,
                            progress=not a.no_progress)
    print(hist.summary())
    if lora is not None:  # the adapters folded into the factors (low-rank: rank + r)
        student = lora.merge_and_unload(student)
    out = Path(a.out)
    factorch.save_compressed(student, out)
    report = Path(a.compressed) / "report.json"
    if lora is None and report.is_file():  # same layers and ranks as before
        shutil.copyfile(report, out / "report.json")
    (out / "distill.json").write_text(json.dumps(hist.to_dict()))
    (out / "source.json").write_text(json.dumps({"model": a.model, "compressed": a.compressed,
                                                 "command": sys.argv[1:]}))
    print(f"saved to {out}/ (model.safetensors, factorch.json, distill.json)")
    return 0


def cmd_report(a) -> int:
    from .compression import CompressionReport

    p = Path(a.dir) / "report.json"
    if not p.is_file():
        print(f"factorch report: no report.json in {a.dir}", file=sys.stderr)
        return 2
    rep = CompressionReport.from_dict(json.loads(p.read_text()))
    print(rep.table(max_rows=a.rows))
    if a.plot:
        rep.plot(a.plot)
        print(f"plot: {a.plot}")
    return 0


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    try:
        return {"compress": cmd_compress, "eval": cmd_eval, "report": cmd_report,
                "finetune": cmd_finetune}[a.command](a)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"factorch {a.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
