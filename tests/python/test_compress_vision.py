"""Vision models through factorch.compress: layers read as ``.weight`` by
their host model (transformers' patch embeddings cast the pixels to
``projection.weight.dtype`` in every forward)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import factorch
from factorch.nn import FactorizedConv1d, FactorizedConv2d, FactorizedEmbedding, FactorizedLinear


def _dense_of(layer):
    if isinstance(layer, FactorizedLinear):
        return layer.to_linear().weight
    if isinstance(layer, FactorizedEmbedding):
        return layer.to_embedding().weight
    return layer.to_conv().weight


@pytest.mark.parametrize("make", [
    lambda f: FactorizedLinear(12, 8, f, rank=0.5, dtype=torch.float64),
    lambda f: FactorizedConv2d(6, 8, 3, f, rank=0.5, dtype=torch.float64),
    lambda f: FactorizedConv2d(6, 8, (3, 2), f, rank=0.5, groups=2, dtype=torch.float64),
    lambda f: FactorizedConv1d(6, 8, 3, f, rank=0.5, dtype=torch.float64),
    lambda f: FactorizedEmbedding(24, 8, f, rank=0.5, padding_idx=3, dtype=torch.float64),
], ids=["linear", "conv2d", "conv2d-groups", "conv1d", "embedding"])
@pytest.mark.parametrize("factorization", ["lowrank", "cp", "tucker", "tt"])
def test_weight_is_the_dense_weight_formed_and_differentiable(make, factorization):
    torch.manual_seed(0)
    try:
        layer = make(factorization)
    except ValueError:  # not every layer has every factorization (embeddings: lowrank, tt)
        pytest.skip(f"{factorization} is not defined for this layer")
    w = layer.weight
    ref = _dense_of(layer)
    assert w.shape == ref.shape and w.dtype == torch.float64
    torch.testing.assert_close(w.detach(), ref, rtol=1e-12, atol=1e-12)
    # Not a parameter: the state dict and the optimiser see the factors only.
    assert "weight" not in dict(layer.named_parameters())
    assert "weight" not in layer.state_dict()
    w.square().sum().backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0)
               for n, p in layer.named_parameters() if n != "bias")


class _PatchModel(nn.Module):
    """A patch embedding the way transformers' ViT writes it (the input cast
    to ``projection.weight.dtype``), one block, a head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.projection = nn.Conv2d(1, 32, 4, stride=4)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)) for _ in range(2))
        self.head = nn.Linear(32, 10)

    def forward(self, pixel_values):
        x = self.projection(pixel_values.to(self.projection.weight.dtype)).flatten(2)
        x = x.transpose(1, 2)
        for b in self.blocks:
            x = x + b(x)
        return self.head(x.mean(1))


def test_a_model_reading_weight_dtype_compresses_saves_and_loads(tmp_path):
    pytest.importorskip("safetensors")
    g = torch.Generator().manual_seed(1)
    calib = [{"pixel_values": torch.randn(8, 1, 16, 16, generator=g)} for _ in range(3)]
    x = torch.randn(5, 1, 16, 16, generator=g)
    model = _PatchModel().eval()
    with torch.no_grad():
        dense = model(x)
    report = factorch.compress(model, ratio=0.9, method="svd-llm", calibration=calib,
                               targets=["projection", "0", "2"], progress=False)
    assert isinstance(model.projection, FactorizedConv2d)
    assert {lr.name for lr in report.layers} >= {"projection", "blocks.0.0", "blocks.1.2"}
    with torch.no_grad():
        out = model(x)
    assert torch.isfinite(out).all()
    assert torch.nn.functional.cosine_similarity(out.flatten(), dense.flatten(), 0) > 0.9
    factorch.save_compressed(model, tmp_path / "m")
    fresh = factorch.load_compressed(_PatchModel().eval(), tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(fresh(x), out)


def test_calibration_runs_in_eval_mode_and_puts_every_mode_back():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.Dropout(0.5), nn.Flatten(), nn.Linear(16 * 8 * 8, 10))
    model.train()
    model[2].eval()  # a mixed model: one module already in eval mode
    bn = {k: v.clone() for k, v in model[1].state_dict().items()}
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(4, 3, 8, 8, generator=g) * 3 + 1 for _ in range(3)]

    with torch.no_grad():  # what conv 2 reads in eval mode (BatchNorm's running statistics)
        ref = copy.deepcopy(model[:3]).eval()(calib[0])
    seen = []
    model[3].register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    factorch.compress(model, ratio=0.8, method="svd-llm", calibration=calib, progress=False)
    # BatchNorm's running statistics untouched by the calibration batches.
    for k, v in model[1].state_dict().items():
        assert torch.equal(v, bn[k]), k
    torch.testing.assert_close(seen[0], ref)
    # Modes as they were, the new layers with their predecessors'.
    assert isinstance(model[0], FactorizedConv2d) and isinstance(model[6], FactorizedLinear)
    assert [m.training for m in model] == [True, True, False, True, True, True, True]
