"""factorch.nn.FactorizedEmbedding and the ops behind it
(torch.ops.factorch.lowrank_embedding / tt_embedding and their backwards):
values against F.embedding on the reconstructed table in float64,
gradcheck, opcheck, torch.compile, padding_idx, sparse gradients,
initialisation, conversion from and to nn.Embedding, bad inputs, training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import factorch
from factorch.functional import lowrank_embedding, tt_embedding, tt_embedding_flat
from factorch.nn import FactorizedEmbedding

from helpers import DEVICES

ops = torch.ops.factorch

# (num_embeddings, embedding_dim, factorization, kwargs)
LAYERS = [
    (37, 12, "lowrank", dict(rank=5)),
    (37, 12, "tt", dict(rank=3)),  # auto shape: vocabulary padded up to ∏ n_k >= 37
    (30, 12, "tt", dict(rank=(2, 3), tensorized_shape=((2, 3, 5), (2, 3, 2)))),
]


def index_samples(num, device="cpu"):
    """(name, indices) covering shapes, dtypes, strides, repeats, the ends."""
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randint(0, num, s, generator=g).to(device)  # noqa: E731
    yield "1-d", rnd(9)
    yield "2-d", rnd(3, 4)
    yield "3-d", rnd(2, 2, 3)
    yield "0-d", torch.tensor(num - 1, device=device)
    yield "int32", rnd(5).int()
    yield "transposed", rnd(4, 3).t()
    yield "repeats and ends", torch.tensor([0, num - 1, 0, 3, 3, 3, num - 1], device=device)
    yield "empty", rnd(0, 4)


def layer(num, dim, fact, kw, padding_idx=None, device="cpu", seed=0):
    torch.manual_seed(seed)
    return FactorizedEmbedding(num, dim, fact, padding_idx=padding_idx, dtype=torch.float64,
                               device=device, **kw)


# --------------------------------------------------------------------------
# Values and gradients
# --------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num, dim, fact, kw", LAYERS)
def test_forward_matches_embedding_of_the_table(device, num, dim, fact, kw):
    m = layer(num, dim, fact, kw, device=device)
    table = m.table().detach()
    assert table.shape == (num, dim)
    for name, idx in index_samples(num, device):
        y = m(idx)
        assert y.shape == (*idx.shape, dim) and y.dtype == torch.float64, name
        torch.testing.assert_close(y, TF.embedding(idx, table), rtol=1e-12, atol=1e-12,
                                   msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num, dim, fact, kw", LAYERS)
def test_backward_matches_dense_autograd(device, num, dim, fact, kw):
    m = layer(num, dim, fact, kw, padding_idx=3, device=device)
    for name, idx in index_samples(num, device):
        g = torch.randn(*idx.shape, dim, dtype=torch.float64, device=device)
        got = torch.autograd.grad(m(idx), list(m.parameters()), g, allow_unused=True)
        want = torch.autograd.grad(TF.embedding(idx, m.table(), padding_idx=3), list(m.parameters()),
                                   g, allow_unused=True)
        for a, w in zip(got, want):
            w = torch.zeros_like(a) if w is None else w
            torch.testing.assert_close(a, w, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    g = torch.Generator().manual_seed(1)
    U = torch.randn(9, 3, dtype=torch.float64, generator=g).to(device).requires_grad_()
    V = torch.randn(3, 5, dtype=torch.float64, generator=g).to(device).requires_grad_()
    idx = torch.tensor([[0, 8, 2], [2, 2, 4]], device=device)
    assert torch.autograd.gradcheck(lambda u, v: lowrank_embedding(idx, u, v), (U, V))
    assert torch.autograd.gradcheck(lambda u, v: lowrank_embedding(idx, u, v, padding_idx=2),
                                    (U, V))
    m = layer(30, 12, "tt", dict(rank=(2, 3), tensorized_shape=((2, 3, 5), (2, 3, 2))),
              device=device)
    w = m.factors.detach().clone().requires_grad_()
    args = (30, *m._op_args)
    idx = torch.tensor([0, 29, 7, 7, 13, 22], device=device)
    assert torch.autograd.gradcheck(lambda w: tt_embedding_flat(idx, w, *args), (w,))
    assert torch.autograd.gradcheck(lambda w: tt_embedding_flat(idx, w, *args, padding_idx=7),
                                    (w,))


@pytest.mark.parametrize("device", DEVICES)
def test_functional_tt_embedding_takes_a_list_of_cores(device):
    m = layer(30, 12, "tt", dict(rank=(2, 3), tensorized_shape=((2, 3, 5), (2, 3, 2))),
              device=device)
    idx = torch.tensor([[1, 29], [5, 0]], device=device)
    torch.testing.assert_close(tt_embedding(idx, m.cores, 30), m(idx))
    full = tt_embedding(idx, m.cores)  # num_embeddings = ∏ n_k
    torch.testing.assert_close(full, m(idx))
    with pytest.raises(ValueError, match=r"cores\[1\]: expected a first dim of 2"):
        tt_embedding(idx, [m.cores[0], m.cores[2]])


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    g = torch.Generator().manual_seed(2)
    U = torch.randn(11, 3, generator=g).to(device).requires_grad_()
    V = torch.randn(3, 6, generator=g).to(device).requires_grad_()
    m = FactorizedEmbedding(30, 12, "tt", rank=(2, 3), tensorized_shape=((2, 3, 5), (2, 3, 2)),
                            device=device)
    tt_args = (30, *m._op_args)
    for idx in (torch.tensor([[0, 10], [4, 4]], device=device), torch.tensor([3], device=device).int()):
        for pad in (-1, 4):
            torch.library.opcheck(ops.lowrank_embedding, (idx, U, V, pad))
            gy = torch.randn(*idx.shape, 6, device=device)
            torch.library.opcheck(ops.lowrank_embedding_backward,
                                  (gy, idx, U.detach(), V.detach(), pad, True, True))
            torch.library.opcheck(ops.tt_embedding, (idx, m.factors, *tt_args[:4], pad))
            gy = torch.randn(*idx.shape, 12, device=device)
            torch.library.opcheck(ops.tt_embedding_backward,
                                  (gy, idx, m.factors.detach(), *tt_args[:4], pad))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    torch.manual_seed(3)
    a = FactorizedEmbedding(40, 8, rank=4, padding_idx=0, device=device)
    b = FactorizedEmbedding(40, 8, "tt", rank=2, device=device)

    def f(idx):
        return (a(idx) * b(idx)).sum(-1)

    idx = torch.randint(0, 40, (5, 3), device=device)
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    y = compiled(idx)
    torch.testing.assert_close(y, f(idx))
    y.sum().backward()
    assert all(p.grad is not None for p in (*a.parameters(), *b.parameters()))


def test_torch_export():
    torch.manual_seed(3)
    model = nn.ModuleList([FactorizedEmbedding(40, 8, rank=4),
                           FactorizedEmbedding(40, 8, "tt", rank=2)])

    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, idx):
            return self.m[0](idx) + self.m[1](idx)

    idx = torch.randint(0, 40, (5, 3))
    ep = torch.export.export(Both(), (idx,))
    targets = {str(n.target) for n in ep.graph.nodes}
    assert {"factorch.lowrank_embedding.default", "factorch.tt_embedding.default"} <= targets
    torch.testing.assert_close(ep.module()(idx), Both()(idx))


def test_meta_tensors_infer_shapes():
    U, V = torch.empty(10, 3, device="meta"), torch.empty(3, 7, device="meta")
    idx = torch.empty(2, 5, dtype=torch.int64, device="meta")
    assert ops.lowrank_embedding(idx, U, V, -1).shape == (2, 5, 7)
    w = torch.empty(1 * 2 * 2 * 2 + 2 * 5 * 3 * 1, device="meta")  # cores [1,2,2,2], [2,5,3,1]
    y = ops.tt_embedding(idx, w, 10, [2, 5], [2, 3], [1, 2, 1], -1)
    assert y.shape == (2, 5, 6) and y.device.type == "meta"
    with pytest.raises(RuntimeError, match=r"indices: expected dtype int64 or int32"):
        ops.lowrank_embedding(idx.float(), U, V, -1)


# --------------------------------------------------------------------------
# padding_idx and sparse gradients
# --------------------------------------------------------------------------
@pytest.mark.parametrize("num, dim, fact, kw", LAYERS)
def test_padding_idx_gives_zero_rows_and_no_gradient(num, dim, fact, kw):
    m = layer(num, dim, fact, kw, padding_idx=-2)  # negative: counted from the end
    p = num - 2
    assert m.padding_idx == p
    idx = torch.tensor([[p, 1, p], [2, p, 1]])
    y = m(idx)
    assert torch.equal(y[idx == p], torch.zeros(3, dim, dtype=y.dtype))
    # Lookups of the padding row change no gradient.
    g = torch.randn(2, 3, dim, dtype=torch.float64)
    with_pad = torch.autograd.grad((m(idx) * g).sum(), list(m.parameters()))
    keep = idx != p
    without = torch.autograd.grad((m(idx[keep]) * g[keep]).sum(), list(m.parameters()))
    for a, b in zip(with_pad, without):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    if fact == "lowrank":
        assert torch.equal(m.U[p], torch.zeros_like(m.U[p]))  # initialised to zero
    emb = m.to_embedding()
    assert emb.padding_idx == p and torch.equal(emb.weight[p], torch.zeros(dim, dtype=y.dtype))


def test_gradients_touch_only_the_looked_up_rows():
    m = layer(50, 8, "lowrank", dict(rank=4))
    idx = torch.tensor([3, 17, 3, 42])
    m(idx).sum().backward()
    touched = torch.zeros(50, dtype=torch.bool)
    touched[idx] = True
    gU, _ = m.layout.split(m.factors.grad)  # U's gradient, as U is a view of factors
    assert torch.equal(gU[~touched], torch.zeros_like(gU[~touched]))
    assert (gU[touched].abs().sum(1) > 0).all()

    # TT: only the slices G_k[:, i_k] of the indices' digits get gradients.
    m = layer(60, 8, "tt", dict(rank=2, tensorized_shape=((3, 4, 5), (2, 2, 2))))
    idx = torch.tensor([7, 7, 59])  # digits (0, 1, 2) and (2, 3, 4)
    m(idx).sum().backward()
    flat = m.factors.grad
    off = 0
    for k, core in enumerate(m.cores):
        g = flat[off: off + core.numel()].view(core.shape)
        off += core.numel()
        used = {int(i) // (60 // math.prod(m.tensorized_shape[0][: k + 1]))
                % m.tensorized_shape[0][k] for i in idx}
        for j in range(core.shape[1]):
            if j in used:
                assert g[:, j].abs().sum() > 0, (k, j)
            else:
                assert torch.equal(g[:, j], torch.zeros_like(g[:, j])), (k, j)


def test_empty_indices_give_empty_output_and_zero_gradients():
    for fact, kw in (("lowrank", dict(rank=3)), ("tt", dict(rank=2))):
        m = layer(20, 6, fact, kw)
        y = m(torch.empty(0, 3, dtype=torch.int64))
        assert y.shape == (0, 3, 6)
        y.sum().backward()
        assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in m.parameters())


# --------------------------------------------------------------------------
# Construction, initialisation, size
# --------------------------------------------------------------------------
@pytest.mark.parametrize("fact, kw", [("lowrank", dict(rank=16)), ("tt", dict(rank=8))])
def test_init_matches_nn_embedding_statistics(fact, kw):
    # Entries share factors, so one table's variance fluctuates (TT: ~10%
    # from seed to seed): average over a few.
    means, variances, outputs = [], [], []
    for seed in range(4):
        torch.manual_seed(seed)
        m = FactorizedEmbedding(4096, 64, fact, **kw)
        t = m.table().detach()
        means.append(t.mean().item())
        variances.append(t.var().item())
        outputs.append(m(torch.randint(0, 4096, (2048,))).detach().var().item())
    assert abs(sum(means) / 4) < 0.03
    assert sum(variances) / 4 == pytest.approx(1.0, rel=0.12)  # nn.Embedding: N(0, 1)
    assert sum(outputs) / 4 == pytest.approx(1.0, rel=0.12)


def test_sizes_ranks_and_flops():
    m = FactorizedEmbedding(1000, 64, rank=0.25)
    assert m.rank == math.floor(0.25 * 1000 * 64 / 1064)
    assert m.num_parameters == m.rank * 1064
    assert m.compression_ratio == pytest.approx(64000 / m.num_parameters)
    assert m.flops(batch=10) == 2 * 10 * m.rank * 64

    t = FactorizedEmbedding(1000, 64, "tt", rank=0.05)
    assert t.tensorized_shape == ((10, 10, 10), (4, 4, 4))
    assert t.num_parameters <= 0.05 * 1000 * 64
    r = t.rank
    assert t.num_parameters == 10 * 4 * r[1] + r[1] * 10 * 4 * r[2] + r[2] * 10 * 4
    assert t.flops(batch=3) == 3 * (2 * 4 * r[1] * 4 * r[2] + 2 * 16 * r[2] * 4)
    assert t.compression_ratio == pytest.approx(64000 / t.num_parameters)
    assert len(t.cores) == 3 and t.cores[1].shape == (r[1], 10, 4, r[2])
    same = FactorizedEmbedding(1001, 64, "tt", rank=4)  # padded: 11·10·10 >= 1001
    assert math.prod(same.tensorized_shape[0]) >= 1001
    assert math.prod(same.tensorized_shape[0]) < 1331
    assert "factorization='tt'" in repr(same) and "tensorized_shape" in repr(same)


def test_state_dict_round_trip():
    a = layer(30, 8, "tt", dict(rank=3))
    b = layer(30, 8, "tt", dict(rank=3), seed=9)
    b.load_state_dict(a.state_dict())
    idx = torch.tensor([1, 29, 4])
    torch.testing.assert_close(a(idx), b(idx))
    assert set(a.state_dict()) == {"factors", "_extra_state"}  # the layout
    lr = layer(30, 8, "lowrank", dict(rank=3))
    assert set(lr.state_dict()) == {"factors", "_extra_state"}
    # separate U and V (how low-rank tables were stored before) still load
    fresh = layer(30, 8, "lowrank", dict(rank=3), seed=9)
    fresh.load_state_dict({"U": lr.U.detach().clone(), "V": lr.V.detach().clone()})
    assert torch.equal(fresh(idx), lr(idx))


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((0, 8), dict(rank=2), "num_embeddings: expected a positive int"),
        ((10, 8.0), dict(rank=2), "embedding_dim: expected a positive int"),
        ((10, 8), dict(rank=9), r"min\(num_embeddings, embedding_dim\) = 8"),
        ((10, 8), dict(rank=None), "rank: expected a positive int"),
        ((10, 8), dict(rank=1.5), r"rank: expected a fraction in \(0, 1\]"),
        ((10, 8), dict(rank=2, factorization="cp"), "factorization: expected one of"),
        ((10, 8), dict(rank=2, padding_idx=10), r"padding_idx: expected None or an int in \[-10, 10\)"),
        ((10, 8), dict(rank=2, tensorized_shape=((2, 5), (2, 4))), "only for factorization='tt'"),
        ((10, 8), dict(factorization="tt", rank=2, tensorized_shape=((2, 4), (2, 4))),
         "at least num_embeddings = 10"),
        ((10, 8), dict(factorization="tt", rank=2, tensorized_shape=((2, 5), (2, 3))),
         "expected embedding_dim = 8"),
        ((10, 8), dict(factorization="tt", rank=2, tensorized_shape=((2, 5), (8,))),
         "as many vocabulary as embedding modes"),
        ((10, 8), dict(factorization="tt", rank=(2, 2, 2)), "inner TT ranks"),
    ],
)
def test_bad_construction_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        FactorizedEmbedding(*args, **kwargs)


def test_cores_of_a_lowrank_table_raise():
    with pytest.raises(AttributeError, match="cores: a 'lowrank' table has none"):
        FactorizedEmbedding(10, 4, rank=2).cores


# --------------------------------------------------------------------------
# Bad indices: a Python exception naming the argument, never a crash
# --------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fact, kw", [("lowrank", dict(rank=3)), ("tt", dict(rank=2))])
def test_bad_indices_raise(device, fact, kw):
    m = FactorizedEmbedding(20, 6, fact, device=device, **kw)
    with pytest.raises(RuntimeError, match=r"indices: 1 value out of range \[0, 20\).* is 20"):
        m(torch.tensor([0, 20, 3], device=device))
    with pytest.raises(RuntimeError, match=r"indices: 2 values out of range.*position 1, is -1"):
        m(torch.tensor([[0, -1], [-5, 3]], device=device).int())
    with pytest.raises(RuntimeError, match=r"indices: expected dtype int64 or int32, got float32"):
        m(torch.zeros(3, device=device))
    with pytest.raises(RuntimeError, match=r"indices: expected dtype int64 or int32, got uint8"):
        m(torch.zeros(3, dtype=torch.uint8, device=device))
    # 8 index dims and more: past the op's limit (7), the layer merges the leading dims.
    y8 = m(torch.zeros([1] * 8, dtype=torch.int64, device=device))
    assert y8.shape == (1,) * 8 + (m.embedding_dim,)
    torch.testing.assert_close(y8.reshape(1, -1), m(torch.zeros(1, dtype=torch.int64,
                                                                device=device)))
    # Out-of-range indices in the backward op called directly.
    idx = torch.tensor([0, 25], device=device)
    if fact == "lowrank":
        with pytest.raises(RuntimeError, match="indices: 1 value out of range"):
            ops.lowrank_embedding_backward(torch.ones(2, 6, device=device), idx, m.U.detach(),
                                           m.V.detach(), -1, True, True)
    else:
        with pytest.raises(RuntimeError, match="indices: 1 value out of range"):
            ops.tt_embedding_backward(torch.ones(2, 6, device=device), idx, m.factors.detach(),
                                      20, *m._op_args, -1)


def test_bad_op_arguments_raise():
    U, V = torch.randn(10, 3), torch.randn(3, 4)
    idx = torch.tensor([1, 2])
    with pytest.raises(RuntimeError, match=r"V: expected \[R, embedding_dim\] with R = 3"):
        ops.lowrank_embedding(idx, U, V[:2], -1)
    with pytest.raises(RuntimeError, match=r"V: expected dtype float32 \(the dtype of U\)"):
        ops.lowrank_embedding(idx, U, V.double(), -1)
    with pytest.raises(RuntimeError, match=r"padding_idx: expected -1 \(none\) or an index in \[0, 10\)"):
        ops.lowrank_embedding(idx, U, V, 10)
    with pytest.raises(RuntimeError, match=r"U: bfloat16 is supported on cuda only"):
        ops.lowrank_embedding(idx, U.bfloat16(), V.bfloat16(), -1)
    w = torch.randn(1 * 2 * 2 * 2 + 2 * 5 * 3 * 1)  # cores [1,2,2,2], [2,5,3,1]
    with pytest.raises(RuntimeError, match=r"num_embeddings: expected 0 to 10"):
        ops.tt_embedding(idx, w, 11, [2, 5], [2, 3], [1, 2, 1], -1)
    with pytest.raises(RuntimeError, match=r"weights: expected a contiguous 1-D tensor of 38"):
        ops.tt_embedding(idx, w[:-1], 10, [2, 5], [2, 3], [1, 2, 1], -1)
    with pytest.raises(RuntimeError, match=r"ranks: expected the first and last"):
        ops.tt_embedding(idx, w, 10, [2, 5], [2, 3], [2, 2, 1], -1)
    with pytest.raises(RuntimeError, match=r"dims: expected 2 to 2 embedding mode sizes"):
        ops.tt_embedding(idx, w, 10, [2, 5], [6], [1, 2, 1], -1)
    with pytest.raises(ValueError, match=r"padding_idx: expected None or an int"):
        lowrank_embedding(idx, U, V, padding_idx=11)


@pytest.mark.skipif(not (torch.cuda.is_available() and factorch.cuda_available()),
                    reason="needs a GPU")
def test_device_mix_raises():
    m = FactorizedEmbedding(10, 4, rank=2, device="cuda")
    with pytest.raises(RuntimeError, match=r"indices: expected device cuda:0 \(the device of U\)"):
        m(torch.tensor([1, 2]))


@pytest.mark.skipif(not (torch.cuda.is_available() and factorch.cuda_available()),
                    reason="needs a GPU")
@pytest.mark.parametrize("num, dim, fact, kw", LAYERS)
def test_cuda_matches_cpu(num, dim, fact, kw):
    cpu = layer(num, dim, fact, kw, padding_idx=2)
    gpu = layer(num, dim, fact, kw, padding_idx=2, device="cuda")
    gpu.load_state_dict(cpu.state_dict())
    for name, idx in index_samples(num):
        g = torch.randn(*idx.shape, dim, dtype=torch.float64)
        yc, yg = cpu(idx), gpu(idx.cuda())
        torch.testing.assert_close(yg.cpu(), yc, rtol=1e-12, atol=1e-12, msg=name)
        gc = torch.autograd.grad(yc, list(cpu.parameters()), g)
        gg = torch.autograd.grad(yg, list(gpu.parameters()), g.cuda())
        for a, b in zip(gc, gg):
            torch.testing.assert_close(b.cpu(), a, rtol=1e-10, atol=1e-12, msg=name)


# --------------------------------------------------------------------------
# Conversion from and to nn.Embedding
# --------------------------------------------------------------------------
def test_from_embedding_lowrank_full_rank_is_exact_and_round_trips():
    torch.manual_seed(5)
    dense = nn.Embedding(20, 8, padding_idx=4, dtype=torch.float64)
    m = FactorizedEmbedding.from_embedding(dense, rank=8)
    assert m.reconstruction_error < 1e-12 and m.padding_idx == 4
    idx = torch.randint(0, 20, (6, 3))
    torch.testing.assert_close(m(idx), dense(idx), rtol=1e-10, atol=1e-10)
    back = m.to_embedding()
    assert isinstance(back, nn.Embedding) and back.padding_idx == 4
    torch.testing.assert_close(back.weight, dense.weight, rtol=1e-10, atol=1e-10)


def test_from_embedding_lowrank_truncation_error_is_eckart_young():
    torch.manual_seed(6)
    dense = nn.Embedding(40, 16, dtype=torch.float64)
    s = torch.linalg.svdvals(dense.weight.detach())
    m = FactorizedEmbedding.from_embedding(dense, rank=5)
    want = (s[5:].norm() / s.norm()).item()
    assert m.reconstruction_error == pytest.approx(want, rel=1e-9)
    got = ((m.to_embedding().weight - dense.weight).norm() / dense.weight.norm()).item()
    assert got == pytest.approx(want, rel=1e-9)
    assert FactorizedEmbedding.from_embedding(dense, ratio=0.25).rank == 40 * 16 // 4 // 56
    e = FactorizedEmbedding.from_embedding(dense, energy=0.9)
    kept = (s[: e.rank] ** 2).sum() / (s**2).sum()
    assert kept >= 0.9 > (s[: e.rank - 1] ** 2).sum() / (s**2).sum()


def test_from_embedding_tt():
    torch.manual_seed(7)
    # A table that is exactly a TT of ranks (1, 2, 3, 1) over ((2, 3, 5), (2, 3, 2)).
    src = layer(30, 12, "tt", dict(rank=(2, 3), tensorized_shape=((2, 3, 5), (2, 3, 2))))
    dense = src.to_embedding()
    m = FactorizedEmbedding.from_embedding(dense, "tt", rank=(2, 3),
                                           tensorized_shape=((2, 3, 5), (2, 3, 2)))
    assert m.reconstruction_error < 1e-10
    idx = torch.randint(0, 30, (4, 5))
    torch.testing.assert_close(m(idx), dense(idx), rtol=1e-9, atol=1e-9)
    # energy: TT-SVD's bound sqrt(1 - energy) holds, ranks come out of it.
    noisy = nn.Embedding(30, 12, dtype=torch.float64)
    e = FactorizedEmbedding.from_embedding(noisy, "tt", energy=0.9,
                                           tensorized_shape=((2, 3, 5), (2, 3, 2)))
    assert e.reconstruction_error <= math.sqrt(0.1) + 1e-9
    # a padded vocabulary (auto shape) and a fraction of the parameters
    big = nn.Embedding(100, 16, padding_idx=0, dtype=torch.float64)
    r = FactorizedEmbedding.from_embedding(big, "tt", ratio=0.5)
    assert r.num_parameters <= 0.5 * 100 * 16 and r.padding_idx == 0
    assert 0 < r.reconstruction_error < 1
    W = r.to_embedding().weight
    want = ((W - big.weight).norm() / big.weight.norm()).item()
    assert r.reconstruction_error == pytest.approx(want, rel=1e-9)


def test_from_embedding_argument_errors():
    dense = nn.Embedding(10, 4)
    with pytest.raises(ValueError, match="exactly one of rank, ratio or energy, got none"):
        FactorizedEmbedding.from_embedding(dense)
    with pytest.raises(ValueError, match="got rank, energy"):
        FactorizedEmbedding.from_embedding(dense, rank=2, energy=0.5)
    with pytest.raises(TypeError, match="embedding: expected an nn.Embedding"):
        FactorizedEmbedding.from_embedding(nn.Linear(2, 2), rank=1)
    with pytest.raises(ValueError, match="max_norm and scale_grad_by_freq are not supported"):
        FactorizedEmbedding.from_embedding(nn.Embedding(10, 4, max_norm=1.0), rank=1)
    with pytest.raises(ValueError, match=r"ratio: expected a fraction in \(0, 1\]"):
        FactorizedEmbedding.from_embedding(dense, "tt", ratio=2.0)
    with torch.no_grad():
        dense.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="weight: expected finite values"):
        FactorizedEmbedding.from_embedding(dense, rank=2)


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fact, kw", [("lowrank", dict(rank=8)), ("tt", dict(rank=6))])
def test_training_lowers_the_loss(device, fact, kw):
    torch.manual_seed(8)
    num, dim = 200, 16
    # A teacher of the same kind and a lower rank: a table the student can fit.
    teacher = FactorizedEmbedding(num, dim, fact, rank=kw["rank"] // 2, device=device)
    target = teacher.table().detach()
    m = FactorizedEmbedding(num, dim, fact, padding_idx=0, device=device, **kw)
    opt = torch.optim.Adam(m.parameters(), lr=2e-2)
    losses = []
    for _ in range(150):
        idx = torch.randint(1, num, (256,), device=device)
        opt.zero_grad()
        loss = TF.mse_loss(m(idx), target[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], (losses[0], losses[-1])
    assert torch.equal(m(torch.tensor([0], device=device)), torch.zeros(1, dim, device=device))
