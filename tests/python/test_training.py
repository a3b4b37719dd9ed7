"""Every factorch layer (and LoRA adapters on dense and low-rank bases)
trains like a torch layer: torch.optim's AdamW (with
weight decay) and SGD steps change every parameter and lower a loss;
clip_grad_norm_ sees and scales the factor gradients; under
torch.autocast("cpu", bfloat16) the layers take the bfloat16 activations of
the layers before them and run in float32 (the CPU kernels are float32 /
float64); torch.utils.checkpoint (non-reentrant) gives the gradients of the
plain forward."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import factorch
from factorch.lora import LoraLinear
from factorch.nn import FactorizedConv1d, FactorizedConv2d, FactorizedEmbedding, FactorizedLinear


def _rows(g):
    return torch.randn(10, 16, generator=g)


# name -> (layer factory, input factory); every factorization of every layer.
CASES = {
    "linear-lowrank": (lambda: FactorizedLinear(16, 12, rank=4),
                       lambda g: torch.randn(2, 5, 16, generator=g)),
    "linear-cp": (lambda: FactorizedLinear(16, 12, "cp", rank=4), _rows),
    "linear-tucker": (lambda: FactorizedLinear(16, 12, "tucker", rank=2), _rows),
    "linear-tt": (lambda: FactorizedLinear(16, 12, "tt", rank=2), _rows),
    "conv2d-cp": (lambda: FactorizedConv2d(4, 8, 3, "cp", rank=4, padding=1),
                  lambda g: torch.randn(3, 4, 6, 6, generator=g)),
    "conv2d-tucker": (lambda: FactorizedConv2d(4, 8, 3, "tucker", rank=2, stride=2),
                      lambda g: torch.randn(3, 4, 7, 7, generator=g)),
    "conv2d-lowrank": (lambda: FactorizedConv2d(4, 8, 3, "lowrank", rank=3, groups=2, padding=1),
                       lambda g: torch.randn(3, 4, 6, 6, generator=g)),
    "conv2d-tt": (lambda: FactorizedConv2d(4, 8, 3, "tt", rank=2, padding=1),
                  lambda g: torch.randn(3, 4, 6, 6, generator=g)),
    "conv1d-tucker": (lambda: FactorizedConv1d(4, 6, 3, "tucker", rank=2, padding=1),
                      lambda g: torch.randn(3, 4, 9, generator=g)),
    # LoRA adapters (the fused lora_linear op) on a dense and on a low-rank base
    "lora-dense": (lambda: LoraLinear(nn.Linear(16, 12), r=2, alpha=4), _rows),
    "lora-lowrank": (lambda: LoraLinear(FactorizedLinear(16, 12, rank=4), r=2, alpha=4), _rows),
    "embedding-lowrank": (lambda: FactorizedEmbedding(30, 8, "lowrank", rank=4, padding_idx=0),
                          lambda g: torch.randint(0, 30, (4, 7), generator=g)),
    "embedding-tt": (lambda: FactorizedEmbedding(30, 8, "tt", rank=2),
                     lambda g: torch.randint(0, 30, (4, 7), generator=g)),
}
EMBEDDINGS = [n for n in CASES if n.startswith("embedding")]
DENSE_INPUT = [n for n in CASES if n not in EMBEDDINGS]


def make(name, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    layer_f, input_f = CASES[name]
    layer = layer_f().to(dtype)
    x = input_f(torch.Generator().manual_seed(seed + 1))
    if x.is_floating_point():
        x = x.to(dtype)
    return layer, x


def target_for(layer, x, seed=7):
    """A fixed random target of the layer's output shape, at its scale."""
    with torch.no_grad():
        y = layer(x)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(y.shape, generator=g, dtype=y.dtype) * y.std()


def mse(layer, x, target):
    """The loss the optimizer tests lower."""
    return (layer(x) - target).pow(2).mean()


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("name", list(CASES))
def test_optimizer_steps_change_every_parameter_and_lower_the_loss(name, optimizer):
    layer, x = make(name)
    target = target_for(layer, x)
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    if optimizer == "adamw":
        opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)
    else:
        opt = torch.optim.SGD(layer.parameters(), lr=0.05, momentum=0.9)
    with torch.no_grad():
        first = float(mse(layer, x, target))
    for _ in range(40):
        opt.zero_grad()
        loss = mse(layer, x, target)
        loss.backward()
        for n, p in layer.named_parameters():
            assert p.grad is not None and p.grad.shape == p.shape, n
        opt.step()
    with torch.no_grad():
        last = float(mse(layer, x, target))
    assert last < 0.9 * first, f"{name}/{optimizer}: loss {first:.4f} -> {last:.4f}"
    for n, p in layer.named_parameters():
        assert not torch.equal(p.detach(), before[n]), f"{name}/{optimizer}: {n} did not move"
        assert torch.isfinite(p).all(), n


@pytest.mark.parametrize("name", list(CASES))
def test_adamw_weight_decay_reaches_the_factors(name):
    """With the loss's gradient zero, AdamW's decoupled decay alone shrinks
    each factor parameter by (1 - lr·wd) per step."""
    layer, x = make(name)
    lr, wd = 0.1, 0.5
    opt = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=wd)
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    opt.zero_grad()
    (layer(x) * 0).sum().backward()  # gradients exist, all zero
    opt.step()
    for n, p in layer.named_parameters():
        torch.testing.assert_close(p.detach(), before[n] * (1 - lr * wd), msg=n)


@pytest.mark.parametrize("name", list(CASES))
def test_clip_grad_norm_sees_and_scales_the_factor_gradients(name):
    layer, x = make(name, dtype=torch.float64)
    mse(layer, x, target_for(layer, x)).backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert norm > 0
    got = torch.nn.utils.clip_grad_norm_(layer.parameters(), max_norm=float(norm) / 10)
    torch.testing.assert_close(got, norm)
    coef = (norm / 10) / (norm + 1e-6)  # clip_grad_norm_'s epsilon
    for g0, p in zip(grads, layer.parameters()):
        torch.testing.assert_close(p.grad, g0 * coef, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", DENSE_INPUT)
def test_autocast_bfloat16_runs_the_layer_in_float32(name):
    """A bf16 activation (what an nn.Linear before the layer gives under
    autocast) is cast to float32 for the C kernels: the output, the
    parameter gradients and the input gradient equal those of the float32
    layer on the bf16-rounded input."""
    layer, x = make(name)
    xb = x.bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(xb)
    assert y.dtype == torch.float32
    y.square().sum().backward()
    ref = copy.deepcopy(layer)
    for p in ref.parameters():
        p.grad = None
    xr = xb.detach().float().requires_grad_(True)
    y_ref = ref(xr)
    y_ref.square().sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    for (n, p), q in zip(layer.named_parameters(), ref.parameters()):
        assert p.grad.dtype == torch.float32, n
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=n)
    assert xb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(xb.grad, xr.grad.bfloat16(), rtol=0, atol=0)


def test_autocast_bfloat16_trains_a_model_mixing_torch_and_factorch_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), FactorizedLinear(16, 16, rank=4),
                          nn.ReLU(), FactorizedLinear(16, 16, "tt", rank=2), nn.Linear(16, 4))
    x, target = torch.randn(32, 16), torch.randn(32, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        assert out.dtype == torch.bfloat16  # the last nn.Linear runs in bf16
        loss = (out.float() - target).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("name", EMBEDDINGS)
def test_autocast_bfloat16_leaves_embeddings_in_float32(name):
    layer, idx = make(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(idx)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, layer(idx), rtol=0, atol=0)


def test_bfloat16_outside_autocast_is_a_clear_error():
    layer, x = make("linear-lowrank")
    with pytest.raises(RuntimeError, match="x: bfloat16 is supported on cuda only"):
        layer(x.bfloat16())


@pytest.mark.parametrize("name", list(CASES))
def test_checkpoint_gives_the_gradients_of_the_plain_forward(name):
    layer, x = make(name, dtype=torch.float64)
    target = target_for(layer, x)
    ref = copy.deepcopy(layer)
    floating = x.is_floating_point()
    xa = x.clone().requires_grad_(floating)
    xb = x.clone().requires_grad_(floating)
    y = checkpoint(layer, xa, use_reentrant=False)
    (y - target).pow(2).sum().backward()
    y_ref = ref(xb)
    (y_ref - target).pow(2).sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for (n, p), q in zip(layer.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12, msg=n)
    if floating:
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not (torch.cuda.is_available() and factorch.cuda_available()),
                    reason="needs a GPU and factorch's CUDA backend")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", DENSE_INPUT)
def test_cuda_autocast_runs_the_layer_in_autocasts_dtype(name, dtype):
    layer, x = make(name)
    layer, x = layer.cuda(), x.cuda()
    with torch.autocast("cuda", dtype=dtype):
        y = layer(x)
    assert y.dtype == dtype
    y_ref = layer(x)
    scale = y_ref.abs().max()
    assert (y.float() - y_ref).abs().max() <= 0.05 * scale
    y.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.parameters())
