"""factorch.lora: every wrapped layer against base + s·adapter in plain torch
(float64), the inits (PiSSA and OLoRA against torch.linalg's SVD and QR),
targets and patterns, merge / unmerge / merge_and_unload round trips,
state_dict, torch.compile, PEFT's format both ways, and a short fine-tune."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from factorch import lora
from factorch.nn import FactorizedLinear

F = torch.nn.functional
D64 = torch.float64

# (factorization, rank, tensorized_shape) of the FactorizedLinear bases, 12 -> 8
FACTORIZED = {
    "lowrank": ("lowrank", 5, None),
    "cp": ("cp", 3, ((3, 4), (2, 4))),
    "tucker": ("tucker", 2, ((3, 4), (2, 4))),
    "tt": ("tt", 2, ((3, 4), (2, 4))),
}


def _linear_base(kind, device="cpu", dtype=D64, seed=0):
    torch.manual_seed(seed)
    if kind == "linear":
        return nn.Linear(12, 8, device=device, dtype=dtype)
    fac, rank, shape = FACTORIZED[kind]
    return FactorizedLinear(12, 8, fac, rank=rank, tensorized_shape=shape, device=device,
                            dtype=dtype)


def _dense_weight(base) -> torch.Tensor:
    """The base's dense weight in float64, by plain torch: the Linear's own,
    U @ V, or the reconstruction of the tensorized factors."""
    if isinstance(base, nn.Linear):
        return base.weight.detach().double().clone()
    return base.to_linear().weight.detach().double()


def _randomize_adapter(layer, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.adapter_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=D64).to(p))


def _randomize_adapters(model, seed=1):
    for k, (_, layer) in enumerate(lora.lora_layers(model)):
        _randomize_adapter(layer, seed + k)


# --------------------------------------------------------------------------
# Each wrapped layer against plain torch in float64
# --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "lowrank", "cp", "tucker", "tt"])
def test_linear_layers_against_reference(kind, device):
    base = _linear_base(kind, device)
    W, b = _dense_weight(base), base.bias.detach().double()
    layer = lora.add_lora(base, r=3, alpha=5.0)
    assert isinstance(layer, lora.LoraLinear) and layer.base_layer is base
    _randomize_adapter(layer)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    x = torch.randn(2, 4, 12, dtype=D64, device=device, requires_grad=True)
    y = layer(x)
    s = 5.0 / 3
    ref = x @ W.T + b + s * (x @ A.T) @ B.T
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    # Gradients of the adapter and the input against the reference's.
    g = torch.randn_like(y)
    gx, gA, gB = torch.autograd.grad(y, (x, A, B), g)
    rx, rA, rB = torch.autograd.grad(ref, (x, A, B), g)
    for got, want in ((gx, rx), (gA, rA), (gB, rB)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_linear_gradcheck_float64():
    layer = lora.add_lora(_linear_base("lowrank"), r=2, alpha=3.0, freeze_base=False)
    _randomize_adapter(layer)
    params = dict(layer.named_parameters())
    x = torch.randn(3, 12, dtype=D64, requires_grad=True)

    def f(x, A, B, factors):  # the low-rank base's U and V are views of factors
        p = dict(params, **{"lora_A.weight": A, "lora_B.weight": B,
                            "base_layer.factors": factors})
        return torch.func.functional_call(layer, p, (x,))

    args = (x, *(params[k].detach().clone().requires_grad_(True) for k in
                 ("lora_A.weight", "lora_B.weight", "base_layer.factors")))
    assert torch.autograd.gradcheck(f, args)


def test_linear_dropout_only_in_training():
    # r = in and out > r: A and B invertible / of full column rank, so the
    # adapter's input drop(x) can be read back from the output.
    torch.manual_seed(0)
    layer = lora.add_lora(nn.Linear(12, 16, dtype=D64), r=12, alpha=12.0, dropout=0.5)
    _randomize_adapter(layer)
    x = torch.randn(64, 12, dtype=D64)
    base = layer.base_layer(x)
    A, B = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    layer.eval()
    torch.testing.assert_close(layer(x), base + (x @ A.T) @ B.T)
    layer.train()
    y = layer(x).detach()
    t = torch.linalg.lstsq(B, (y - base).T).solution.T  # drop(x) @ A.T
    xd = torch.linalg.solve(A, t.T).T
    zero, kept = xd.abs() < 1e-8, (xd - 2 * x).abs() < 1e-8  # inverted dropout, p = 0.5
    assert torch.all(zero | kept)
    assert 0.35 < zero.double().mean() < 0.65


@pytest.mark.parametrize("padding_idx", [None, 2])
def test_embedding_against_reference(padding_idx, device):
    torch.manual_seed(0)
    emb = nn.Embedding(10, 6, padding_idx=padding_idx, device=device, dtype=D64)
    layer = lora.LoraEmbedding(emb, r=3, alpha=6.0)
    _randomize_adapter(layer)
    idx = torch.tensor([[0, 2, 9], [2, 5, 5]], device=device)
    A, B = layer.lora_embedding_A, layer.lora_embedding_B
    one_hot = F.one_hot(idx, 10).double()
    ref = emb.weight[idx] + 2.0 * (one_hot @ A.T) @ B.T
    torch.testing.assert_close(layer(idx), ref, rtol=1e-12, atol=1e-12)
    layer(idx).sum().backward()
    if padding_idx is not None:  # as nn.Embedding: no gradient into the padding row
        assert torch.all(A.grad[:, padding_idx] == 0)
    assert A.grad[:, 5].abs().sum() > 0


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 0, 1), (1, 2, 2)])
def test_conv2d_against_reference(stride, padding, dilation, device):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, stride=stride, padding=padding, dilation=dilation, device=device,
                     dtype=D64)
    layer = lora.LoraConv2d(conv, r=2, alpha=3.0)
    _randomize_adapter(layer)
    x = torch.randn(2, 3, 9, 9, dtype=D64, device=device)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    assert A.shape == (2, 3, 3, 3) and B.shape == (5, 2, 1, 1)
    kw = dict(stride=stride, padding=padding, dilation=dilation)
    ref = F.conv2d(x, conv.weight, conv.bias, **kw) + 1.5 * F.conv2d(F.conv2d(x, A, **kw), B)
    torch.testing.assert_close(layer(x), ref, rtol=1e-12, atol=1e-12)


def test_conv2d_groups_rejected():
    with pytest.raises(ValueError, match="groups"):
        lora.LoraConv2d(nn.Conv2d(4, 4, 3, groups=2), r=2)


def test_rslora_scale():
    layer = lora.add_lora(_linear_base("linear"), r=4, alpha=6.0, rslora=True)
    assert layer.scaling == pytest.approx(6.0 / math.sqrt(4))
    _randomize_adapter(layer)
    x = torch.randn(3, 12, dtype=D64)
    W, b = _dense_weight(layer.base_layer), layer.base_layer.bias
    ref = x @ W.T + b + 3.0 * (x @ layer.lora_A.weight.T) @ layer.lora_B.weight.T
    torch.testing.assert_close(layer(x), ref)


def test_bad_arguments():
    with pytest.raises(ValueError, match="r:"):
        lora.add_lora(nn.Linear(4, 4), r=0)
    with pytest.raises(ValueError, match="dropout"):
        lora.add_lora(nn.Linear(4, 4), r=2, dropout=1.0)
    with pytest.raises(ValueError, match="init"):
        lora.add_lora(nn.Linear(4, 4), r=2, init="loftq")
    with pytest.raises(ValueError, match="alpha"):
        lora.add_lora(nn.Linear(4, 4), r=2, alpha=float("nan"))
    with pytest.raises(ValueError, match="rank_pattern"):
        lora.add_lora(nn.Linear(4, 4), r=2, rank_pattern={"(": 3})
    with pytest.raises(ValueError, match="max_norm"):
        lora.LoraEmbedding(nn.Embedding(5, 4, max_norm=1.0), r=2)
    layer = lora.add_lora(FactorizedLinear(12, 8, rank=4), r=2)
    with pytest.raises(ValueError, match="x:"):
        layer(torch.randn(3, 11))


# --------------------------------------------------------------------------
# Inits
# --------------------------------------------------------------------------
def test_default_and_gaussian_inits():
    torch.manual_seed(0)
    base = nn.Linear(256, 64, dtype=D64)
    x = torch.randn(5, 256, dtype=D64)
    for init in ("default", "gaussian"):
        layer = lora.add_lora(copy.deepcopy(base), r=4, alpha=8, init=init)
        assert layer.init == init
        assert torch.all(layer.lora_B.weight == 0)
        torch.testing.assert_close(layer(x), base(x))
        A = layer.lora_A.weight
        if init == "default":  # Kaiming-uniform, a = √5: U(±1/√in)
            bound = 1 / math.sqrt(256)
            assert A.abs().max() <= bound and A.abs().max() > 0.9 * bound
        else:  # PEFT's gaussian: standard deviation 1/r
            assert abs(A.std().item() - 0.25) < 0.025
    emb = lora.LoraEmbedding(nn.Embedding(300, 16), r=4)
    assert torch.all(emb.lora_embedding_A == 0)
    assert abs(emb.lora_embedding_B.std().item() - 1.0) < 0.2


def _top_r(W, r):
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return U[:, :r] @ torch.diag(S[:r]) @ Vh[:r], S


@pytest.mark.parametrize("kind", ["linear", "lowrank"])
def test_pissa_init(kind):
    base = _linear_base(kind) if kind == "linear" else FactorizedLinear(12, 8, rank=6, dtype=D64)
    W = _dense_weight(base)
    x = torch.randn(4, 12, dtype=D64)
    y0 = base(x).detach()
    r, alpha = 3, 6.0
    layer = lora.add_lora(base, r=r, alpha=alpha, init="pissa")
    s = alpha / r
    A, B = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    top, S = _top_r(W, r)
    torch.testing.assert_close(s * B @ A, top, rtol=1e-9, atol=1e-9)
    # B = U_r·√(S_r/s), A = √(S_r/s)·V_rᵀ: orthogonal columns / rows of norm² S_r/s.
    torch.testing.assert_close(B.T @ B, torch.diag(S[:r] / s), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(A @ A.T, torch.diag(S[:r] / s), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(_dense_weight(layer.base_layer), W - top, rtol=1e-9, atol=1e-9)
    if kind == "lowrank":
        assert layer.base_layer.rank == 3 and layer.base_layer.U.shape == (8, 3)
    torch.testing.assert_close(layer(x), y0, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["linear", "lowrank"])
def test_olora_init(kind):
    base = _linear_base(kind) if kind == "linear" else FactorizedLinear(12, 8, rank=6, dtype=D64)
    W = _dense_weight(base)
    x = torch.randn(4, 12, dtype=D64)
    y0 = base(x).detach()
    r, alpha = 3, 2.0
    layer = lora.add_lora(base, r=r, alpha=alpha, init="olora")
    s = alpha / r
    A, B = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    Q, R = torch.linalg.qr(W)
    QR_r = Q[:, :r] @ R[:r]  # sign-free: the product of the first r QR terms
    torch.testing.assert_close(B @ A, QR_r, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(B.T @ B, torch.eye(r, dtype=D64), rtol=1e-9, atol=1e-9)
    assert torch.all(torch.tril(A, -1).abs() < 1e-12)  # A = R_r: upper trapezoidal
    torch.testing.assert_close(_dense_weight(layer.base_layer), W - s * QR_r, rtol=1e-9, atol=1e-9)
    if kind == "lowrank":
        assert layer.base_layer.rank == 6
    torch.testing.assert_close(layer(x), y0, rtol=1e-9, atol=1e-9)


def test_pissa_olora_float32_output_kept():
    torch.manual_seed(0)
    base = nn.Linear(64, 48)
    x = torch.randn(8, 64)
    y0 = base(x).detach()
    for init in ("pissa", "olora"):
        layer = lora.add_lora(copy.deepcopy(base), r=8, alpha=16, init=init)
        torch.testing.assert_close(layer(x), y0, rtol=1e-4, atol=1e-5)


def test_weight_inits_bad_bases():
    with pytest.raises(ValueError, match="dense or low-rank"):
        lora.add_lora(_linear_base("cp"), r=2, init="pissa")
    with pytest.raises(ValueError, match="linear layers only"):
        lora.reset_adapter_(lora.LoraEmbedding(nn.Embedding(10, 4), r=2), "olora")
    with pytest.raises(ValueError, match="r:"):
        lora.add_lora(FactorizedLinear(12, 8, rank=3, dtype=D64), r=3, init="pissa")
    with pytest.raises(ValueError, match="r:"):
        lora.add_lora(nn.Linear(12, 4), r=5, init="olora")


# --------------------------------------------------------------------------
# Targets, patterns, trainable parameters
# --------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.v_proj = FactorizedLinear(d, d, rank=3)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(x + self.v_proj(torch.relu(self.q_proj(x))))


class TinyLM(nn.Module):
    def __init__(self, vocab=20, d=8, tied=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([Block(d), Block(d)])
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, idx):
        h = self.embed(idx)
        for blk in self.layers:
            h = blk(h)
        return self.head(h)


def _names(model):
    return sorted(n for n, _ in lora.lora_layers(model))


def test_default_targets_skip_tied_and_named_heads():
    m = lora.add_lora(TinyLM(tied=True), r=2)
    assert _names(m) == ["layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj",
                         "layers.1.v_proj"]
    m = TinyLM()
    m.lm_head = m.head
    del m.head
    m = lora.add_lora(m, r=2)
    assert "lm_head" not in _names(m) and len(_names(m)) == 4
    m = lora.add_lora(TinyLM(), r=2)  # untied, not named lm_head: an ordinary linear layer
    assert "head" in _names(m)


def test_targets_list_regex_exclude_and_errors():
    m = lora.add_lora(TinyLM(), r=2, targets=["q_proj", "embed"])
    assert _names(m) == ["embed", "layers.0.q_proj", "layers.1.q_proj"]
    assert isinstance(m.embed, lora.LoraEmbedding)
    m = lora.add_lora(TinyLM(), r=2, targets=r"layers\.\d+\.(q|v)_proj", exclude=["1.v_proj"])
    assert _names(m) == ["layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj"]
    with pytest.raises(ValueError, match="matched no"):  # a container alone: nothing to wrap
        lora.add_lora(TinyLM(), r=2, targets=r"layers\.0")
    with pytest.raises(ValueError, match="matched no"):
        lora.add_lora(TinyLM(), r=2, targets=["k_proj"])
    with pytest.raises(ValueError, match="LayerNorm"):
        lora.add_lora(TinyLM(), r=2, targets=r".*norm")
    with pytest.raises(TypeError, match="targets"):
        lora.add_lora(TinyLM(), r=2, targets=3)
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.add_lora(lora.add_lora(TinyLM(), r=2), r=2)


def test_rank_and_alpha_patterns():
    m = lora.add_lora(TinyLM(), r=2, alpha=4, targets=["q_proj", "v_proj"],
                      rank_pattern={r"layers\.1\.q_proj": 5, "v_proj": 3},
                      alpha_pattern={"q_proj": 10})
    got = {n: (l.r, l.lora_alpha) for n, l in lora.lora_layers(m)}
    assert got == {"layers.0.q_proj": (2, 10), "layers.1.q_proj": (5, 10),
                   "layers.0.v_proj": (3, 4), "layers.1.v_proj": (3, 4)}
    assert m.layers[1].q_proj.lora_A.weight.shape == (5, 8)
    assert m.layers[1].q_proj.scaling == 2.0


def test_only_adapters_trainable():
    m = lora.add_lora(TinyLM(), r=2, targets=["q_proj", "v_proj", "embed"])
    trainable = sorted(n for n, p in m.named_parameters() if p.requires_grad)
    assert trainable and all(".lora_" in n for n in trainable)
    assert len(trainable) == 2 * 5
    m = lora.add_lora(TinyLM(), r=2, freeze_base=False)
    assert all(p.requires_grad for p in m.parameters())


def test_state_dict_keys_and_round_trip(tmp_path):
    torch.manual_seed(0)
    m = lora.add_lora(TinyLM(), r=2, targets=["q_proj", "v_proj", "embed"])
    _randomize_adapters(m)
    keys = set(m.state_dict())
    for k in ("layers.0.q_proj.base_layer.weight", "layers.0.q_proj.lora_A.weight",
              "layers.0.q_proj.lora_B.weight", "layers.1.v_proj.base_layer.factors",
              "embed.base_layer.weight", "embed.lora_embedding_A", "embed.lora_embedding_B"):
        assert k in keys
    torch.save(m.state_dict(), tmp_path / "sd.pt")
    torch.manual_seed(1)
    fresh = lora.add_lora(TinyLM(), r=2, targets=["q_proj", "v_proj", "embed"])
    fresh.load_state_dict(torch.load(tmp_path / "sd.pt"))
    idx = torch.randint(0, 20, (2, 5))
    torch.testing.assert_close(fresh(idx), m(idx), rtol=0, atol=0)


# --------------------------------------------------------------------------
# Merging
# --------------------------------------------------------------------------
def test_merge_unmerge_dense_linear():
    torch.manual_seed(0)
    layer = lora.add_lora(nn.Linear(32, 24), r=4, alpha=8)
    _randomize_adapter(layer)
    x = torch.randn(6, 32)
    y = layer(x).detach()
    W0 = layer.base_layer.weight.detach().clone()
    ref = W0.double() + 2.0 * layer.lora_B.weight.double() @ layer.lora_A.weight.double()
    lora.merge(layer)
    assert layer.merged
    torch.testing.assert_close(layer.base_layer.weight.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="already merged"):
        lora.merge(layer)
    lora.unmerge(layer)
    assert not layer.merged
    # Subtracting rounds once per entry: within an ulp of the merged values.
    W1 = layer.base_layer.weight.detach()
    bound = torch.finfo(torch.float32).eps * ref.abs().float() + 1e-30
    assert torch.all((W1 - W0).abs() <= bound)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    lora.merge(layer, keep_original=True)
    lora.unmerge(layer)
    assert torch.equal(layer.base_layer.weight, W1)


def test_merge_lowrank_extends_factors_and_unmerge_is_exact():
    torch.manual_seed(0)
    layer = lora.add_lora(FactorizedLinear(20, 16, rank=5), r=3, alpha=6)
    _randomize_adapter(layer)
    base = layer.base_layer
    U0, V0 = base.U.detach().clone(), base.V.detach().clone()
    x = torch.randn(7, 20)
    y = layer(x).detach()
    lora.merge(layer)
    assert base.rank == 8 and base.U.shape == (16, 8) and base.V.shape == (8, 20)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    W = U0.double() @ V0.double() + 2.0 * layer.lora_B.weight.double() @ layer.lora_A.weight.double()
    torch.testing.assert_close(_dense_weight(base), W, rtol=1e-5, atol=1e-5)
    lora.unmerge(layer)
    assert base.rank == 5 and torch.equal(base.U, U0) and torch.equal(base.V, V0)


@pytest.mark.parametrize("k", [2, 6, 8])
def test_merge_lowrank_retruncated_is_optimal(k):
    torch.manual_seed(0)
    layer = lora.add_lora(FactorizedLinear(20, 16, rank=5, dtype=D64), r=3, alpha=6)
    _randomize_adapter(layer)
    base = layer.base_layer
    U0, V0 = base.U.detach().clone(), base.V.detach().clone()
    W = U0 @ V0 + 2.0 * layer.lora_B.weight.detach() @ layer.lora_A.weight.detach()
    lora.merge(layer, rank=k)
    assert base.rank == k
    err = torch.linalg.matrix_norm(_dense_weight(base) - W)
    S = torch.linalg.svdvals(W)
    optimal = torch.linalg.vector_norm(S[k:])
    torch.testing.assert_close(err, optimal, rtol=1e-9, atol=1e-9)
    lora.unmerge(layer)
    assert torch.equal(base.U, U0) and torch.equal(base.V, V0)
    with pytest.raises(ValueError, match="rank"):
        lora.merge(layer, rank=9)


def test_merge_tensorized_needs_to_dense_and_is_atomic():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(12, 12), _linear_base("tt", dtype=torch.float32))
    m = lora.add_lora(m, r=2)
    _randomize_adapters(m)
    x = torch.randn(3, 12)
    y = m(x).detach()
    with pytest.raises(ValueError, match="to_dense=True"):
        lora.merge(m)
    assert not any(l.merged for _, l in lora.lora_layers(m))  # nothing was merged
    tt = m[1].base_layer
    lora.merge(m, to_dense=True)
    assert isinstance(m[1].base_layer, nn.Linear)
    torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)
    lora.unmerge(m)
    assert m[1].base_layer is tt
    torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)


def test_merge_embedding_and_conv():
    torch.manual_seed(0)
    emb = lora.LoraEmbedding(nn.Embedding(10, 6, dtype=D64), r=3, alpha=6)
    conv = lora.LoraConv2d(nn.Conv2d(3, 5, 3, padding=1, stride=2, dtype=D64), r=2, alpha=3)
    for layer, x in ((emb, torch.randint(0, 10, (4, 3))), (conv, torch.randn(2, 3, 8, 8, dtype=D64))):
        _randomize_adapter(layer)
        y = layer(x).detach()
        lora.merge(layer)
        torch.testing.assert_close(layer(x), y, rtol=1e-12, atol=1e-12)
        lora.unmerge(layer)
        torch.testing.assert_close(layer(x), y, rtol=1e-12, atol=1e-12)


def test_merge_and_unload():
    torch.manual_seed(0)
    m = lora.add_lora(TinyLM(), r=2, targets=["q_proj", "v_proj", "embed", "head"])
    _randomize_adapters(m)
    idx = torch.randint(0, 20, (2, 5))
    y = m(idx).detach()
    out = lora.merge_and_unload(m)
    assert out is m and not lora.lora_layers(m)
    assert type(m.embed) is nn.Embedding and type(m.layers[0].q_proj) is nn.Linear
    assert isinstance(m.layers[1].v_proj, FactorizedLinear) and m.layers[1].v_proj.rank == 5
    torch.testing.assert_close(m(idx), y, rtol=1e-5, atol=1e-5)
    single = lora.add_lora(nn.Linear(4, 3), r=2)
    assert type(lora.merge_and_unload(single)) is nn.Linear


def test_unload_drops_the_adapters():
    torch.manual_seed(0)
    plain = TinyLM()
    idx = torch.randint(0, 20, (2, 5))
    y = plain(idx).detach()
    q = plain.layers[0].q_proj
    m = lora.add_lora(plain, r=2)
    _randomize_adapters(m)
    lora.merge(m)
    m = lora.unload(m)  # unmerged first, then unwrapped
    assert m.layers[0].q_proj is q and not lora.lora_layers(m)
    torch.testing.assert_close(m(idx), y, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------
class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 12)
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.dense = nn.Linear(12, 12)
        self.low = FactorizedLinear(12, 12, rank=4)
        self.tt = FactorizedLinear(12, 8, "tt", rank=2, tensorized_shape=((3, 4), (2, 4)))

    def forward(self, idx):
        h = self.embed(idx)
        h = self.conv(h[:, None])[:, 0]
        return self.tt(torch.relu(self.low(self.dense(h))))


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    m = lora.add_lora(Mixed(), r=2, dropout=0.1, targets=["embed", "conv", "dense", "low", "tt"])
    _randomize_adapters(m)
    m.eval()
    idx = torch.randint(0, 16, (2, 5))
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(idx), m(idx))
    m.train()
    compiled(idx).sum().backward()  # training mode: dropout in the graph, gradients flow
    assert all(p.grad is not None for n, p in m.named_parameters() if p.requires_grad)


# --------------------------------------------------------------------------
# PEFT interop
# --------------------------------------------------------------------------
try:
    import peft
except ImportError:  # the tests above still run
    peft = None
needs_peft = pytest.mark.skipif(peft is None, reason="peft is not installed (the dev extra)")


class Dense(nn.Module):
    """A dense model with one of each kind that has an adapter."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 12)
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.fc1 = nn.Linear(24, 16)
        self.fc2 = nn.Linear(16, 16)
        self.out = nn.Linear(16, 5)

    def forward(self, idx):
        h = self.embed(idx)                               # [b, t, 12]
        h = self.conv(h[:, None]).permute(0, 2, 1, 3)     # [b, t, 2, 12]
        h = h.reshape(*h.shape[:2], 24)
        return self.out(torch.tanh(self.fc2(torch.tanh(self.fc1(h)))))


def _peft_load(dense, directory):
    return peft.PeftModel.from_pretrained(dense, str(directory)).eval()


@needs_peft
@pytest.mark.parametrize("rslora", [False, True])
def test_save_adapter_loads_in_peft(tmp_path, rslora):
    torch.manual_seed(0)
    dense = Dense()
    m = copy.deepcopy(dense)
    # fc2 on a full-rank low-rank base: the same weight as the dense model's, to rounding.
    m.fc2 = FactorizedLinear.from_linear(m.fc2, rank=16)
    m = lora.add_lora(m, r=4, alpha=8, rslora=rslora, targets=["embed", "conv", "fc1", "fc2"],
                      rank_pattern={"fc2": 2}, alpha_pattern={"conv": 3, "embed": 5})
    _randomize_adapters(m)
    lora.save_adapter(m, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is rslora
    pm = _peft_load(_copy_dense(dense), tmp_path)
    idx = torch.randint(0, 16, (3, 7))
    torch.testing.assert_close(pm(idx), m(idx), rtol=1e-5, atol=1e-5)
    assert pm.base_model.model.fc2.r["default"] == 2
    # And the same file back into factorch.
    back = lora.load_adapter(_copy_dense(dense), tmp_path)
    torch.testing.assert_close(back(idx), m(idx), rtol=1e-5, atol=1e-5)


def _copy_dense(dense):
    fresh = Dense()
    fresh.load_state_dict(dense.state_dict())
    return fresh


@needs_peft
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_save_adapter_pissa_olora_relative_to_original(tmp_path, init):
    torch.manual_seed(0)
    dense = Dense()
    m = lora.add_lora(_copy_dense(dense), r=3, alpha=6, targets=["fc1", "fc2"], init=init)
    # Train-like change of the adapter, so it differs from its init.
    with torch.no_grad():
        for _, layer in lora.lora_layers(m):
            layer.lora_A.weight.add_(0.05 * torch.randn_like(layer.lora_A.weight))
    lora.save_adapter(m, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 6
    pm = _peft_load(_copy_dense(dense), tmp_path)
    idx = torch.randint(0, 16, (3, 7))
    torch.testing.assert_close(pm(idx), m(idx), rtol=1e-4, atol=1e-5)


@needs_peft
@pytest.mark.parametrize("targets", ["list", "regex"])
def test_peft_adapter_loads_into_factorch(tmp_path, targets):
    torch.manual_seed(0)
    dense = Dense()
    target_modules = (["embed", "conv", "fc1", "fc2"] if targets == "list"
                      else r"(embed|conv|fc\d)")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, use_rslora=True,
                          rank_pattern={"fc2": 2, "conv": 3}, alpha_pattern={"fc1": 3, "embed": 7})
    pm = peft.get_peft_model(_copy_dense(dense), cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(str(tmp_path))
    pm.eval()
    idx = torch.randint(0, 16, (3, 7))
    want = pm(idx)
    m = lora.load_adapter(_copy_dense(dense), tmp_path)
    assert _names(m) == ["conv", "embed", "fc1", "fc2"]
    assert m.fc2.r == 2 and m.conv.r == 3 and m.fc1.lora_alpha == 3
    assert m.fc1.scaling == pytest.approx(3 / math.sqrt(4))
    torch.testing.assert_close(m(idx), want, rtol=1e-5, atol=1e-5)
    # Into factorch layers: fc1 and fc2 as full-rank low-rank layers first.
    f = _copy_dense(dense)
    f.fc1 = FactorizedLinear.from_linear(f.fc1, rank=16)
    f.fc2 = FactorizedLinear.from_linear(f.fc2, rank=16)
    f = lora.load_adapter(f, tmp_path)
    assert isinstance(f.fc1.base_layer, FactorizedLinear)
    torch.testing.assert_close(f(idx), want, rtol=1e-4, atol=1e-4)


@needs_peft
def test_peft_exclude_modules(tmp_path):
    torch.manual_seed(0)
    dense = Dense()
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2", "out"],
                          exclude_modules=["out"])
    pm = peft.get_peft_model(_copy_dense(dense), cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_()
    pm.save_pretrained(str(tmp_path))
    idx = torch.randint(0, 16, (2, 4))
    m = lora.load_adapter(_copy_dense(dense), tmp_path)
    assert _names(m) == ["fc1", "fc2"]
    torch.testing.assert_close(m(idx), pm.eval()(idx), rtol=1e-5, atol=1e-5)


@needs_peft
def test_load_adapter_rejects_what_it_cannot_do(tmp_path):
    torch.manual_seed(0)
    pm = peft.get_peft_model(Dense(), peft.LoraConfig(r=2, target_modules=["fc1"], use_dora=True))
    pm.save_pretrained(str(tmp_path / "dora"))
    with pytest.raises(ValueError, match="use_dora"):
        lora.load_adapter(Dense(), tmp_path / "dora")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lora.load_adapter(Dense(), tmp_path / "nothing")
    m = lora.add_lora(Dense(), r=2, targets=["fc1"])
    lora.save_adapter(m, tmp_path / "fc1")
    wrong = Dense()
    wrong.fc1 = nn.Linear(24, 17)
    with pytest.raises(ValueError, match="shape"):
        lora.load_adapter(wrong, tmp_path / "fc1")
    assert type(wrong.fc1) is nn.Linear  # left as it came
    assert all(p.requires_grad for p in wrong.parameters())


try:
    import transformers
except ImportError:
    transformers = None


def _tiny_llama(seed=0):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


@needs_peft
@pytest.mark.skipif(transformers is None, reason="transformers is not installed")
def test_llama_round_trip_with_peft(tmp_path):
    llama = _tiny_llama()
    ids = torch.randint(0, 64, (2, 9))
    m = copy.deepcopy(llama)
    # v_proj of the first block kept as an exact low-rank layer.
    v = m.model.layers[0].self_attn.v_proj
    m.model.layers[0].self_attn.v_proj = FactorizedLinear.from_linear(v, rank=16)
    m = lora.add_lora(m, r=4, alpha=8, rank_pattern={r"layers\.1\.mlp\.down_proj": 6})
    names = _names(m)
    assert "lm_head" not in names and len(names) == 2 * 7
    _randomize_adapters(m)
    for _, layer in lora.lora_layers(m):
        with torch.no_grad():
            layer.lora_B.weight.mul_(0.1)
    want = m(ids).logits
    lora.save_adapter(m, tmp_path / "fx")
    pm = _peft_load(copy.deepcopy(llama), tmp_path / "fx")
    torch.testing.assert_close(pm(ids).logits, want, rtol=1e-4, atol=1e-4)
    # PEFT saves, factorch loads.
    pm.save_pretrained(str(tmp_path / "peft"))
    back = lora.load_adapter(copy.deepcopy(llama), tmp_path / "peft")
    torch.testing.assert_close(back(ids).logits, want, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------
# A short fine-tune
# --------------------------------------------------------------------------
@pytest.fixture
def one_thread():
    """Tiny ops on a machine whose cores are shared: torch's thread pool joins
    dominate (README, CPU threads); one thread keeps this test at ~0.2 s."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_short_finetune_lowers_the_loss(one_thread):
    torch.manual_seed(0)
    model = TinyLM(vocab=20, d=16)
    model = lora.add_lora(model, r=4, alpha=8, dropout=0.05,
                          targets=["q_proj", "v_proj", "head"])
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    data = torch.randint(0, 20, (8, 12))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    model.train()
    for _ in range(40):
        logits = model(data[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 20), data[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    for n, p in model.named_parameters():  # the frozen base did not move
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    # Merging keeps the fine-tuned outputs.
    model.eval()
    y = model(data).detach()
    lora.merge(model)
    torch.testing.assert_close(model(data), y, rtol=1e-4, atol=1e-4)
