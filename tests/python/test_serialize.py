"""save_compressed / load_compressed: bit-exact round trips, clear errors for
damaged, foreign or mismatched folders; and the command line end to end."""

from __future__ import annotations

import json

import pytest
import torch

import factorch
from factorch.serialize import CompressedFormatError

from compress_models import make_text, save_tiny_llama, tiny_llama, token_batches

pytest.importorskip("transformers")
pytest.importorskip("safetensors")


def _compressed(tmp_path, tie=False, **kw):
    model = tiny_llama(seed=1, tie=tie)
    batches = token_batches(4, 16, model.config.vocab_size, seed=0)
    rep = factorch.compress(model, ratio=0.5, method="svd-llm", calibration=batches,
                            progress=False, **kw)
    d = factorch.save_compressed(model, tmp_path / "saved", report=rep)
    return model, batches, d


@pytest.mark.parametrize("tie", [False, True])
def test_round_trip_is_bit_exact(tmp_path, tie):
    model, batches, d = _compressed(tmp_path, tie=tie)
    fresh = tiny_llama(seed=99, tie=tie)  # same architecture, other random weights
    factorch.load_compressed(fresh, d)
    a, b = model.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    with torch.no_grad():
        assert torch.equal(model(**batches[0]).logits, fresh(**batches[0]).logits)
    if tie:
        assert fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr()
    meta = json.loads((d / "factorch.json").read_text())
    assert meta["factorch_version"] == factorch.__version__
    assert all(s["type"] == "FactorizedLinear" for s in meta["layers"].values())
    assert (d / "report.json").is_file()


def test_version_1_folders_with_separate_U_and_V_load(tmp_path):
    """Format 1 kept a low-rank linear's U and V as two tensors; version 2
    keeps one flat ``factors`` (V then U) in every layer type."""
    import safetensors.torch as st

    from factorch.serialize import _sha256

    model, batches, d = _compressed(tmp_path)
    tensors = st.load_file(str(d / "model.safetensors"))
    meta = json.loads((d / "factorch.json").read_text())
    assert meta["format_version"] == 2
    for name, spec in meta["layers"].items():
        flat = tensors.pop(name + ".factors")
        r, n_in, n_out = spec["rank"], spec["in_features"], spec["out_features"]
        tensors[name + ".V"] = flat[: r * n_in].reshape(r, n_in).clone()
        tensors[name + ".U"] = flat[r * n_in:].reshape(n_out, r).clone()
    st.save_file(tensors, str(d / "model.safetensors"))
    (d / "factorch.json").write_text(json.dumps(
        {**meta, "format_version": 1, "sha256": _sha256(d / "model.safetensors")}))
    fresh = factorch.load_compressed(tiny_llama(seed=99), d)
    with torch.no_grad():
        assert torch.equal(model(**batches[0]).logits, fresh(**batches[0]).logits)


def test_round_trip_of_every_layer_type(tmp_path):
    from torch import nn

    from factorch.nn import FactorizedConv2d, FactorizedEmbedding, FactorizedLinear

    def build(seed):
        torch.manual_seed(seed)
        return nn.ModuleDict({
            "emb": nn.Embedding(30, 8), "lin": nn.Linear(16, 12), "lin_tt": nn.Linear(16, 12),
            "lin_tk": nn.Linear(16, 12), "conv": nn.Conv2d(4, 8, 3, padding=1),
            "conv_tk": nn.Conv2d(4, 8, 3, stride=2)})

    m = build(0)
    m["emb"] = FactorizedEmbedding.from_embedding(m["emb"], "tt", ratio=0.5)
    m["lin"] = FactorizedLinear.from_linear(m["lin"], "cp", rank=3)
    m["lin_tt"] = FactorizedLinear.from_linear(m["lin_tt"], "tt", rank=2)
    m["lin_tk"] = FactorizedLinear.from_linear(m["lin_tk"], "tucker", rank=2)
    m["conv"] = FactorizedConv2d.from_conv(m["conv"], "cp", rank=4)
    m["conv_tk"] = FactorizedConv2d.from_conv(m["conv_tk"], "tucker", ratio=0.5)
    d = factorch.save_compressed(m, tmp_path / "all")
    fresh = factorch.load_compressed(build(1), d)
    for k, v in m.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k
    x = torch.randn(2, 16)
    assert torch.equal(m["lin_tt"](x), fresh["lin_tt"](x))
    img = torch.randn(1, 4, 9, 9)
    assert torch.equal(m["conv_tk"](img), fresh["conv_tk"](img))


def test_damaged_foreign_and_mismatched_folders_raise_clearly(tmp_path):
    model, _, d = _compressed(tmp_path)
    meta_path = d / "factorch.json"
    meta = json.loads(meta_path.read_text())

    meta_path.write_text("{ not json")
    with pytest.raises(CompressedFormatError, match="not valid JSON"):
        factorch.load_compressed(tiny_llama(), d)

    meta_path.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(CompressedFormatError, match="format version 99"):
        factorch.load_compressed(tiny_llama(), d)

    meta_path.write_text(json.dumps({**meta, "format": "something-else"}))
    with pytest.raises(CompressedFormatError, match="not a factorch compressed model"):
        factorch.load_compressed(tiny_llama(), d)

    meta_path.write_text(json.dumps(meta))
    blob = bytearray((d / "model.safetensors").read_bytes())
    blob[-3] ^= 0xFF
    (d / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(CompressedFormatError, match="SHA-256"):
        factorch.load_compressed(tiny_llama(), d)

    # A consistent file that lacks a tensor.
    model, _, d = _compressed(tmp_path / "b")
    import safetensors.torch as st

    tensors = st.load_file(str(d / "model.safetensors"))
    gone = "model.layers.0.self_attn.q_proj.factors"
    del tensors[gone]
    st.save_file(tensors, str(d / "model.safetensors"))
    from factorch.serialize import _sha256

    meta = json.loads((d / "factorch.json").read_text())
    (d / "factorch.json").write_text(json.dumps({**meta, "sha256": _sha256(d / "model.safetensors")}))
    fresh = tiny_llama()
    with pytest.raises(CompressedFormatError, match="missing from the file: " + gone):
        factorch.load_compressed(fresh, d)
    # and the model is left as it was (dense)
    assert isinstance(fresh.model.layers[0].self_attn.q_proj, torch.nn.Linear)

    # Another architecture.
    model, _, d = _compressed(tmp_path / "c")
    with pytest.raises(CompressedFormatError, match="has no module 'model.layers.1"):
        factorch.load_compressed(tiny_llama(layers=1), d)
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(LlamaConfig(vocab_size=model.config.vocab_size, hidden_size=64,
                                         intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(CompressedFormatError, match="in_features is 64"):
        factorch.load_compressed(wider, d)
    with pytest.raises(FileNotFoundError, match="factorch.json"):
        factorch.load_compressed(tiny_llama(), tmp_path)


def test_command_line_end_to_end(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from factorch import cli

    save_tiny_llama(tmp_path / "tiny", seed=2)
    (tmp_path / "calib.txt").write_text(make_text(3000, seed=1))
    (tmp_path / "eval.txt").write_text(make_text(2000, seed=2))
    out = tmp_path / "out"
    rc = cli.main(["compress", str(tmp_path / "tiny"), "--ratio", "0.6", "--method", "svd-llm",
                   "--allocation", "global", "--calib", str(tmp_path / "calib.txt"),
                   "--windows", "8", "--seq-len", "32", "--out", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj" in printed and "saved to" in printed
    for f in ("model.safetensors", "factorch.json", "report.json", "report.csv"):
        assert (out / f).is_file()
    rc = cli.main(["eval", str(tmp_path / "tiny"), "--compressed", str(out), "--text",
                   str(tmp_path / "eval.txt"), "--seq-len", "32", "--windows", "6",
                   "--json", str(tmp_path / "eval.json")])
    assert rc == 0
    res = json.loads((tmp_path / "eval.json").read_text())
    assert res["compressed_perplexity"] > 0 and res["dense_perplexity"] > 0
    rc = cli.main(["report", str(out), "--plot", str(tmp_path / "p.png"), "--rows", "3"])
    assert rc == 0
    assert "more" in capsys.readouterr().out
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    # Errors are messages with exit code 2, not tracebacks.
    rc = cli.main(["compress", "no-such-model", "--out", str(tmp_path / "x")])
    assert rc == 2 and "model:" in capsys.readouterr().err


def test_speed_runs_prefill_and_greedy_decoding_of_both_models():
    from factorch import evaluate

    dense = tiny_llama(seed=3)
    comp = tiny_llama(seed=3)
    factorch.compress(comp, ratio=0.5, method="svd", progress=False)
    sp = evaluate.speed({"dense": dense, "compressed": comp}, prefill_tokens=24,
                        prompt_tokens=4, new_tokens=5, rounds=2)
    for name in ("dense", "compressed"):
        assert len(sp[name]["prefill_runs"]) == 2 and sp[name]["prefill_s"] > 0
        assert sp[name]["decode_tok_s"] > 0
    from factorch.cli import speed_table

    assert "compressed" in speed_table(sp) and "x" in speed_table(sp)
