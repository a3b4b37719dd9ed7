"""What compression cost: perplexity of a causal LM, sentence-embedding
cosine of an encoder, and prefill / decoding speed, dense against compressed
in one interleaved run."""

from __future__ import annotations

import math
import statistics
import time

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from .compression import _progress
from .data import read_text, tokenize, windows


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer, text, seq_len: int = 256,
               max_windows: int | None = None, batch_size: int = 4,
               progress: bool = False) -> float:
    """Perplexity of a causal LM (``model(input_ids=...).logits``) on
    ``text`` (a path, ``fortunes:...`` or the text), over non-overlapping
    windows of ``seq_len`` tokens, token-weighted: ``exp`` of the mean
    negative log-likelihood of every token predicted (``seq_len - 1`` per
    window)."""
    ids = windows(tokenize(read_text(text), tokenizer), seq_len)
    if max_windows is not None:
        ids = ids[:max_windows]
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        starts = range(0, ids.shape[0], batch_size)
        for i in _progress(starts, progress, "perplexity", total=len(starts)):
            x = ids[i:i + batch_size].to(device)
            logits = model(input_ids=x).logits.float()
            loss = TF.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                    x[:, 1:].reshape(-1), reduction="sum")
            nll += float(loss)
            count += x[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(nll / count)


@torch.no_grad()
def sentence_embeddings(model: nn.Module, tokenizer, sentences: list[str]) -> Tensor:
    """Mean-pooled, L2-normalised last hidden states of an encoder (what
    sentence-transformers computes for all-MiniLM-L6-v2)."""
    enc = tokenizer(sentences, padding=True, truncation=True, return_tensors="pt")
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    h = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
    e = (h * mask).sum(1) / mask.sum(1).clamp_min(1)
    return TF.normalize(e.float(), dim=-1)


def embedding_cosine(reference: nn.Module, candidate: nn.Module, tokenizer,
                     sentences: list[str]) -> float:
    """Mean cosine between the two models' sentence embeddings."""
    a = sentence_embeddings(reference, tokenizer, sentences)
    b = sentence_embeddings(candidate, tokenizer, sentences)
    return float((a * b).sum(-1).mean())


def _prefill(model, ids):
    model(input_ids=ids, use_cache=False)


def _decode(model, ids, new_tokens):
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, use_cache=True, pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + new_tokens


@torch.no_grad()
def speed(models: dict[str, nn.Module], prefill_tokens: int = 512, prompt_tokens: int = 32,
          new_tokens: int = 32, rounds: int = 3, vocab_size: int | None = None,
          seed: int = 0) -> dict:
    """Prefill latency of one ``prefill_tokens`` sequence and greedy decoding
    speed (tokens/s, KV cache, after a ``prompt_tokens`` prompt) of each
    model, measured in turns (every round runs every model once), medians.

    Returns ``{name: {"prefill_s", "decode_tok_s", "prefill_runs", "decode_runs"}}``."""
    g = torch.Generator().manual_seed(seed)
    first = next(iter(models.values()))
    vocab = vocab_size or first.config.vocab_size
    device = next(first.parameters()).device
    long_ids = torch.randint(0, vocab, (1, prefill_tokens), generator=g).to(device)
    short_ids = torch.randint(0, vocab, (1, prompt_tokens), generator=g).to(device)
    runs = {n: {"prefill": [], "decode": []} for n in models}
    for m in models.values():  # warm-up: first-call allocations, lazy inits
        m.eval()
        _prefill(m, long_ids[:, :16])
        _decode(m, short_ids, 2)
    for _ in range(rounds):
        for n, m in models.items():
            t = time.perf_counter()
            _prefill(m, long_ids)
            runs[n]["prefill"].append(time.perf_counter() - t)
            t = time.perf_counter()
            _decode(m, short_ids, new_tokens)
            runs[n]["decode"].append(new_tokens / (time.perf_counter() - t))
    return {n: {"prefill_s": statistics.median(r["prefill"]),
                "decode_tok_s": statistics.median(r["decode"]),
                "prefill_runs": r["prefill"], "decode_runs": r["decode"]}
            for n, r in runs.items()}
