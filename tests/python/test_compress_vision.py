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


# ----------------------------------------------------------------------------
# A tiny random ViT (transformers) and a small CNN through compress
# ----------------------------------------------------------------------------
def _tiny_vit(seed=0):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=1, hidden_size=32,
                                 num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, num_labels=5)
    torch.manual_seed(seed)
    return transformers.ViTForImageClassification(cfg).eval()


def _images(n, seed, size=16):
    """Smooth images (blurred noise): neighbouring pixels correlated, so the
    patch conv's inputs are far from white."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size + 4, size + 4, generator=g)
    return nn.functional.avg_pool2d(x, 5, stride=1)


def _cosine(a, b):
    return float(nn.functional.cosine_similarity(a.flatten(), b.flatten(), 0))


def test_tiny_vit_svd_llm_compresses_the_patch_conv_and_keeps_the_logits():
    model = _tiny_vit()
    patch = "vit.embeddings.patch_embeddings.projection"
    # The default targets are the linears of the encoder blocks only: the
    # patch conv is named explicitly.
    default = [n for n, _ in factorch.select_targets(model)]
    assert patch not in default and len(default) == 12
    calib = [{"pixel_values": _images(16, seed)} for seed in range(3)]
    x = _images(8, 10)
    with torch.no_grad():
        dense = model(pixel_values=x).logits
    cos = {}
    for method in ("svd", "svd-llm"):
        m = _tiny_vit()
        report = factorch.compress(m, ratio=0.95, method=method, targets=[patch, *default],
                                   calibration=calib if method != "svd" else None,
                                   progress=False)
        conv = m.get_submodule(patch)
        assert isinstance(conv, FactorizedConv2d) and conv.factorization == "lowrank"
        assert conv.kernel_size == (4, 4) and conv.stride == (4, 4)
        first = report.layers[0]
        assert first.name == patch and first.kind == "Conv2d" and first.rank == conv.rank
        assert report.kept <= 0.95
        assert sum(isinstance(mod, FactorizedLinear) for mod in m.modules()) == 12
        with torch.no_grad():
            out = m(pixel_values=x).logits  # reads projection.weight.dtype
        assert torch.isfinite(out).all()
        cos[method] = _cosine(out, dense)
    assert cos["svd-llm"] > 0.99
    assert cos["svd-llm"] > cos["svd"]  # activation-aware keeps the outputs closer


@pytest.mark.parametrize("factorization", ["cp", "tucker"])
def test_cp_and_tucker_convolutions_of_a_small_cnn_through_compress(factorization):
    from compress_models import SmallCNN

    model = SmallCNN().eval()
    convs = ["features.0", "features.2", "features.4"]
    expect = {n: FactorizedConv2d.from_conv(model.get_submodule(n), factorization, ratio=0.7)
              for n in convs}
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(x)
    report = factorch.compress(model, ratio=0.7, method="svd", factorization=factorization,
                               targets=convs, progress=False)
    assert [lr.name for lr in report.layers] == convs
    for name, lr in zip(convs, report.layers):
        layer = model.get_submodule(name)
        assert isinstance(layer, FactorizedConv2d) and layer.factorization == factorization
        # What the layer's own from_conv builds, with its geometry (padding, stride) kept.
        assert layer.rank == expect[name].rank and layer.stride == expect[name].stride
        torch.testing.assert_close(layer.factors, expect[name].factors)
        assert lr.factorization == factorization and lr.params_after < lr.params_before
        assert lr.weight_error == pytest.approx(expect[name].reconstruction_error)
    assert isinstance(model.head, nn.Linear)  # not a target: left alone
    assert report.model_params_after < report.model_params_before
    with torch.no_grad():
        out = model(x)
    assert torch.isfinite(out).all()
    # Random kernels are not low-rank (30-60% kernel error at this ratio): a
    # loose check that the logits still follow the dense ones.
    assert _cosine(out, dense) > 0.4
