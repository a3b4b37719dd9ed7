"""Small models and texts for the compression tests: random transformers
built from transformers configs (no weights needed), a CNN, a word-level
tokenizer trained on generated text."""

from __future__ import annotations

import random

import torch
from torch import nn

WORDS = ("the a of to and in is it that was for on with as he be at by this had not are but "
         "from or have an they which one you were her all she there would their we him been "
         "has when who will more no if out so said what up its about into than them can only "
         "other new some could time these two may then do first any my now such like our over "
         "man me even most made after also did many before must through back years where much "
         "your way well down should because each just those people how too little state good "
         "very make world still own see men work long get here between both life being under "
         "never day same another know while last might us great old year off come since against "
         "go came right used take three").split()


def make_text(n_words: int, seed: int) -> str:
    """Sentences of common words with a little structure (a bigram chain),
    so that a model's activations are correlated, not white noise."""
    rng = random.Random(seed)
    follow = {w: rng.sample(WORDS, 12) for w in WORDS}
    out, w = [], rng.choice(WORDS)
    for i in range(n_words):
        out.append(w)
        w = rng.choice(follow[w]) if rng.random() < 0.8 else rng.choice(WORDS)
        if i % 13 == 12:
            out[-1] += "."
    return " ".join(out)


def word_tokenizer():
    """A word-level PreTrainedTokenizerFast over WORDS (built here, no files)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, ".": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]")


def tiny_llama(seed: int = 0, layers: int = 2, tie: bool = False, vocab: int | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab or len(WORDS) + 3, hidden_size=48, intermediate_size=96,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def save_tiny_llama(folder, seed: int = 0):
    """tiny_llama(seed) and word_tokenizer() saved into folder: a model
    directory as the command line reads one."""
    tiny_llama(seed=seed).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(WORDS) + 3, hidden_size=48, intermediate_size=96,
                     num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
    return BertModel(cfg).eval()


def token_batches(n: int, seq: int, vocab: int, seed: int, batch: int = 4) -> list[dict]:
    """Correlated token windows (a random walk over the vocabulary)."""
    g = torch.Generator().manual_seed(seed)
    steps = torch.randint(-3, 4, (n, seq), generator=g)
    ids = (steps.cumsum(1) + torch.randint(0, vocab, (n, 1), generator=g)) % vocab
    return [{"input_ids": ids[i:i + batch]} for i in range(0, n, batch)]


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        )
        self.head = nn.Linear(32 * 8 * 8, 10)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def correlated_rows(n: int, d: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """[n, d] rows with a strongly non-white covariance."""
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(d, d, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d,
                                                                              dtype=torch.float64)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) @ M.T).to(dtype)
