"""Calibration and evaluation text: token windows from plain text files.

The text the examples and the command line use comes from Debian's
``fortunes`` package (plain files of quotations under
``/usr/share/games/fortunes``; ``make fortunes`` fetches the package with
``apt-get download`` into ``.data/fortunes`` without root). Calibration and
evaluation read different files: :data:`CALIBRATION_FILES` and
:data:`EVALUATION_FILES` share none.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import Tensor

#: Fortune files the calibration statistics are collected on ...
CALIBRATION_FILES = ("cookie", "computers", "people", "definitions")
#: ... and, disjoint from them, the files perplexity is measured on.
EVALUATION_FILES = ("literature", "science", "politics", "wisdom")

_FORTUNE_DIRS = ("/usr/share/games/fortunes",)


def fortunes_dir() -> Path:
    """Where the fortune files are: ``$FACTORCH_FORTUNES``, the system's
    ``/usr/share/games/fortunes``, or ``.data/fortunes`` under the current
    directory (``make fortunes``)."""
    cands = [os.environ.get("FACTORCH_FORTUNES"), *_FORTUNE_DIRS,
             str(Path.cwd() / ".data" / "fortunes")]
    for c in cands:
        if c and all((Path(c) / n).is_file() for n in (*CALIBRATION_FILES, *EVALUATION_FILES)):
            return Path(c)
    raise FileNotFoundError(
        "fortunes: the text files of Debian's fortunes package were not found (looked in "
        + ", ".join(c for c in cands if c)
        + "); run `make fortunes` (apt-get download, no root) or set FACTORCH_FORTUNES")


def fortunes_text(names) -> str:
    """The quotations of the named fortune files as one text, the ``%``
    separator lines removed (one blank line between quotations)."""
    d = fortunes_dir()
    parts = []
    for n in names:
        p = d / n
        if not p.is_file():
            raise FileNotFoundError(f"names: no fortune file {n!r} in {d}")
        raw = p.read_text(encoding="utf-8", errors="replace")
        parts += [q.strip() for q in re.split(r"^%\s*$", raw, flags=re.M) if q.strip()]
    return "\n\n".join(parts)


def read_text(source) -> str:
    """A path to a text file, or the text itself when it holds a newline or
    no such file exists; ``fortunes:NAME,NAME`` reads fortune files."""
    if isinstance(source, Path):
        return source.read_text(encoding="utf-8", errors="replace")
    if not isinstance(source, str):
        raise TypeError(f"text: expected a path or a str, got {type(source).__name__}")
    if source.startswith("fortunes:"):
        return fortunes_text([n for n in source[len("fortunes:"):].split(",") if n])
    if "\n" not in source and len(source) < 4096 and Path(source).is_file():
        return Path(source).read_text(encoding="utf-8", errors="replace")
    return source


def tokenize(text: str, tokenizer) -> Tensor:
    """All of ``text`` as one int64 vector of token ids (no special tokens)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long)


def windows(ids: Tensor, seq_len: int, n_windows: int | None = None) -> Tensor:
    """Non-overlapping windows ``[n, seq_len]`` of a token vector (the tail
    shorter than ``seq_len`` is dropped)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len: expected an int >= 2, got {seq_len!r}")
    n = ids.numel() // seq_len
    if n_windows is not None:
        if isinstance(n_windows, bool) or not isinstance(n_windows, int) or n_windows < 1:
            raise ValueError(f"n_windows: expected a positive int, got {n_windows!r}")
        if n_windows > n:
            raise ValueError(f"n_windows: the text holds {n} windows of {seq_len} tokens "
                             f"({ids.numel()} tokens), {n_windows} were asked for")
        n = n_windows
    if n == 0:
        raise ValueError(f"text: {ids.numel()} tokens do not fill one window of {seq_len}")
    return ids[: n * seq_len].reshape(n, seq_len)


def text_batches(text, tokenizer, seq_len: int = 256, n_windows: int | None = 128,
                 batch_size: int = 8) -> list[dict]:
    """Calibration batches for :func:`factorch.compress`: the text (a path,
    ``fortunes:...`` or the text itself) tokenized, cut into ``n_windows``
    non-overlapping windows of ``seq_len`` tokens, grouped ``batch_size`` at a
    time as ``{"input_ids": [b, seq_len]}`` (what ``model(**batch)`` takes)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    w = windows(tokenize(read_text(text), tokenizer), seq_len, n_windows)
    return [{"input_ids": w[i:i + batch_size]} for i in range(0, w.shape[0], batch_size)]
