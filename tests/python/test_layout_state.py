"""Each factorch layer stores its layout (factorization, features, modes,
ranks) in its state_dict and refuses one saved with another layout, even
when the flat parameter has the same size; state_dicts saved before the
layout was stored still load."""

from __future__ import annotations

import io
import json

import pytest
import torch
from torch import nn

from factorch.nn import FactorizedConv1d, FactorizedConv2d, FactorizedEmbedding, FactorizedLinear

from helpers import rand

KEY = "_extra_state"


def _pairs():
    """(name, make_a, make_b): two layers whose flat parameters have the same
    size but are read differently."""
    yield ("linear-tt-modes",
           lambda: FactorizedLinear(8, 6, "tt", rank=2, tensorized_shape=((2, 4), (2, 3))),
           lambda: FactorizedLinear(8, 6, "tt", rank=2, tensorized_shape=((4, 2), (3, 2))))
    yield ("linear-cp-modes",
           lambda: FactorizedLinear(8, 6, "cp", rank=2, tensorized_shape=((2, 4), (2, 3))),
           lambda: FactorizedLinear(8, 6, "cp", rank=2, tensorized_shape=((4, 2), (3, 2))))
    yield ("linear-tucker-ranks",
           lambda: FactorizedLinear(8, 8, "tucker", rank=((1, 2), (2, 1)),
                                    tensorized_shape=((2, 4), (4, 2))),
           lambda: FactorizedLinear(8, 8, "tucker", rank=((2, 1), (1, 2)),
                                    tensorized_shape=((4, 2), (2, 4))))
    yield ("linear-lowrank-transposed",  # V [r, in] + U [out, r]: the same numel
           lambda: FactorizedLinear(8, 6, "lowrank", rank=2, bias=False),
           lambda: FactorizedLinear(6, 8, "lowrank", rank=2, bias=False))
    yield ("embedding-tt-modes",
           lambda: FactorizedEmbedding(8, 6, "tt", rank=2, tensorized_shape=((2, 4), (2, 3))),
           lambda: FactorizedEmbedding(8, 6, "tt", rank=2, tensorized_shape=((4, 2), (3, 2))))
    yield ("conv-tt-modes",
           lambda: FactorizedConv2d(8, 8, 3, "tt", rank=2, bias=False,
                                    tensorized_shape=((2, 4), (4, 2))),
           lambda: FactorizedConv2d(8, 8, 3, "tt", rank=2, bias=False,
                                    tensorized_shape=((4, 2), (2, 4))))
    yield ("conv-cp-channels",
           lambda: FactorizedConv2d(4, 6, 3, "cp", rank=2, bias=False),
           lambda: FactorizedConv2d(6, 4, 3, "cp", rank=2, bias=False))
    yield ("conv1d-cp-channels",
           lambda: FactorizedConv1d(4, 6, 3, "cp", rank=2, bias=False),
           lambda: FactorizedConv1d(6, 4, 3, "cp", rank=2, bias=False))


PAIRS = list(_pairs())


def _same_sizes(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return all(sa[k].shape == sb[k].shape for k in sa if isinstance(sa[k], torch.Tensor))


@pytest.mark.parametrize("i", range(len(PAIRS)))
def test_a_state_dict_of_another_layout_is_refused(i):
    name, make_a, make_b = PAIRS[i]
    a, b = make_a(), make_b()
    assert _same_sizes(a, b), name  # what made the silent mix-up possible
    before = {k: v.clone() for k, v in b.state_dict().items() if isinstance(v, torch.Tensor)}
    for strict in (True, False):
        with pytest.raises(RuntimeError, match=r"saved from a \w+ with layout .* this layer "
                                               r"has layout"):
            b.load_state_dict(a.state_dict(), strict=strict)
    for k, v in b.state_dict().items():  # nothing was copied
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, before[k]), k


def test_the_message_names_both_layouts():
    a = FactorizedLinear(8, 6, "tt", rank=2, tensorized_shape=((2, 4), (2, 3)))
    b = FactorizedLinear(8, 6, "tt", rank=2, tensorized_shape=((4, 2), (3, 2)))
    with pytest.raises(RuntimeError) as e:
        b.load_state_dict(a.state_dict())
    msg = str(e.value)
    assert "[[2, 4], [2, 3]]" in msg and "[[4, 2], [3, 2]]" in msg


@pytest.mark.parametrize("i", range(len(PAIRS)))
def test_the_same_layout_round_trips(i):
    _, make_a, _ = PAIRS[i]
    a, b = make_a(), make_a()
    with torch.no_grad():
        a.factors.copy_(rand(a.factors.numel(), dtype=a.factors.dtype))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.factors, b.factors)


def test_the_extra_state_is_a_json_byte_tensor():
    layers = [FactorizedLinear(8, 6, "tucker", rank=((1, 2), (2, 1)),
                               tensorized_shape=((2, 4), (3, 2))),
              FactorizedConv2d(8, 6, 3, "tucker", rank=(2, 3)),
              FactorizedEmbedding(8, 6, "tt", rank=2)]
    for layer in layers:
        state = layer.state_dict()[KEY]
        # A tensor, so that code expecting a state_dict of tensors keeps working.
        assert isinstance(state, torch.Tensor) and state.dtype == torch.uint8
        layout = json.loads(bytes(state.tolist()).decode())
        assert layout == layer.layout_state()
        assert layout["factorization"] == layer.factorization
    # A plain dict is accepted too.
    layer = layers[0]
    layer.set_extra_state(layer.layout_state())


@pytest.mark.parametrize("i", range(len(PAIRS)))
def test_old_state_dicts_without_the_layout_still_load(i):
    _, make_a, _ = PAIRS[i]
    a, b = make_a(), make_a()
    sd = a.state_dict()
    del sd[KEY]
    b.load_state_dict(sd, strict=True)
    assert torch.equal(a.factors, b.factors)
    # A missing tensor is still reported.
    del sd["factors"]
    with pytest.raises(RuntimeError, match="Missing key.*factors"):
        b.load_state_dict(sd, strict=True)


def test_nested_models_and_torch_save():
    a = nn.Sequential(FactorizedLinear(8, 6, "tt", rank=2, tensorized_shape=((2, 4), (2, 3))),
                      nn.ReLU())
    b = nn.Sequential(FactorizedLinear(8, 6, "tt", rank=2, tensorized_shape=((4, 2), (3, 2))),
                      nn.ReLU())
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)  # plain data loads with weights_only
    with pytest.raises(RuntimeError, match=r"0\._extra_state: the state_dict was saved"):
        b.load_state_dict(sd)
    c = nn.Sequential(FactorizedLinear(8, 6, "tt", rank=2, tensorized_shape=((2, 4), (2, 3))),
                      nn.ReLU())
    c.load_state_dict(sd)
    x = torch.randn(3, 8)
    torch.testing.assert_close(c(x), a(x))


def test_set_extra_state_refuses_a_bad_state():
    layer = FactorizedLinear(8, 6, rank=2)
    with pytest.raises(ValueError, match=r"_extra_state: expected a layer layout .* got list"):
        layer.set_extra_state([1, 2])
    with pytest.raises(ValueError, match=r"expected a layer layout .* got a torch.float32"):
        layer.set_extra_state(torch.zeros(3))


def test_transformers_save_pretrained_and_state_dict_walks_still_work(tmp_path):
    pytest.importorskip("transformers")
    import factorch
    from compress_models import tiny_llama

    model = tiny_llama(seed=1)
    factorch.compress(model, ratio=0.5, method="svd", progress=False)
    # Code that expects a state_dict of tensors.
    copies = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert any(k.endswith(KEY) for k in copies)
    model.save_pretrained(tmp_path / "hf")  # huggingface_hub reads .device of every entry
    assert (tmp_path / "hf" / "model.safetensors").is_file()
