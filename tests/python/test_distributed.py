"""Data-parallel training over factorch layers: DistributedDataParallel and
FSDP2 (fully_shard) with gloo, 2 processes on localhost. A few SGD steps on
half the batch each give parameters identical across ranks and equal (to
float32 rounding) to one process training on the whole batch."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from factorch.nn import FactorizedConv1d, FactorizedEmbedding, FactorizedLinear

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

STEPS, BATCH, SEQ, VOCAB = 3, 8, 6, 40


class Net(nn.Module):
    """Every factorch layer kind, each with ONE flat parameter (+ bias)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.tok = FactorizedEmbedding(VOCAB, 16, "lowrank", rank=4)
        self.pos = FactorizedEmbedding(VOCAB, 16, "tt", rank=3)
        self.conv = FactorizedConv1d(16, 16, 3, "tucker", rank=(4, 4), padding=1)
        self.blocks = nn.ModuleList([FactorizedLinear(16, 16, f, rank=0.5)
                                     for f in ("lowrank", "cp", "tucker", "tt")])
        self.head = FactorizedLinear(16, 4, "lowrank", rank=2)

    def forward(self, ids):
        h = self.tok(ids) + self.pos(ids)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        for b in self.blocks:
            h = h + torch.tanh(b(h))
        return self.head(h)


def data():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (STEPS, BATCH, SEQ), generator=g)
    target = torch.randn(STEPS, BATCH, SEQ, 4, generator=g)
    return ids, target


def train(model, ids, target):
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    for step in range(ids.shape[0]):
        opt.zero_grad()
        loss = (model(ids[step]) - target[step]).square().mean()
        loss.backward()
        opt.step()


def _worker(rank, world, port, mode, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        model = Net()
        if mode == "ddp":
            # Small buckets: the flat parameters land in several of them.
            wrapped = nn.parallel.DistributedDataParallel(model, find_unused_parameters=False,
                                                          bucket_cap_mb=0.001)
        else:
            from torch.distributed.fsdp import fully_shard

            for m in [model.tok, model.pos, model.conv, *model.blocks, model.head]:
                fully_shard(m)
            wrapped = fully_shard(model)
        ids, target = data()
        half = BATCH // world
        sl = slice(rank * half, (rank + 1) * half)
        train(wrapped, ids[:, sl], target[:, sl])
        if mode == "ddp":
            params = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:  # the full tensors from the shards
            # (the layers' layouts, _extra_state, are plain tensors, not shards)
            params = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                      for k, v in model.state_dict().items()}
        gathered = [None] * world
        dist.all_gather_object(gathered, params)
        if rank == 0:
            torch.save(gathered, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(mode, tmp_path):
    out = tmp_path / f"{mode}.pt"
    mp.spawn(_worker, args=(2, _free_port(), mode, str(out)), nprocs=2, join=True)
    per_rank = torch.load(out)
    ref = Net()
    train(ref, *data())
    return per_rank, ref.state_dict()


def test_ddp_matches_one_process(tmp_path):
    (a, b), ref = _run("ddp", tmp_path)
    layouts = [k for k in ref if k.endswith("_extra_state")]  # one per factorch layer
    assert a.keys() == ref.keys() and len(ref) - len(layouts) == 14  # 8 flat factors + 6 biases
    assert len(layouts) == 8
    for k in ref:
        assert torch.equal(a[k], b[k]), k  # identical across ranks
        torch.testing.assert_close(a[k], ref[k], rtol=2e-5, atol=2e-6)
        if k not in layouts:
            assert not torch.equal(ref[k], Net().state_dict()[k]), k  # it did train


def test_fsdp2_matches_one_process(tmp_path):
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    (a, b), ref = _run("fsdp", tmp_path)
    for k in ref:
        assert torch.equal(a[k], b[k]), k
        torch.testing.assert_close(a[k], ref[k], rtol=2e-5, atol=2e-6)
