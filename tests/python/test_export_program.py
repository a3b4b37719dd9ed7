"""torch.export of models holding every factorch layer: the program keeps the
factorch ops, survives torch.export.save -> load in a fresh process with the
same outputs, and decomposes into aten ops when asked."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch
from torch import nn
from torch.export import Dim

import factorch.export as fe
from factorch import lora
from factorch.nn import FactorizedConv1d, FactorizedConv2d, FactorizedEmbedding, FactorizedLinear


class EveryLayer(nn.Module):
    """One of each: linear (lowrank, cp, tucker, tt), conv 1d/2d, embedding
    (lowrank, tt), a LoRA wrapper."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.tok = FactorizedEmbedding(40, 16, "lowrank", rank=4, padding_idx=0)
        self.pos = FactorizedEmbedding(40, 16, "tt", rank=3)
        self.conv1 = FactorizedConv1d(16, 16, 3, "cp", rank=5, padding=1)
        self.conv2 = FactorizedConv2d(1, 4, 3, "tucker", rank=(1, 3), padding=1)
        self.lin = nn.ModuleList([FactorizedLinear(16, 16, f, rank=0.5)
                                  for f in ("lowrank", "cp", "tucker", "tt")])
        self.adapted = lora.LoraLinear(FactorizedLinear(16, 16, "lowrank", rank=4), r=2)
        self.conv_tt = FactorizedConv2d(4, 4, 3, "tt", rank=(2, 2), tensorized_shape=((2, 2), (2, 2)),
                                        padding=1)
        self.conv_lr = FactorizedConv2d(4, 1, 1, "lowrank", rank=1)

    def forward(self, ids):
        h = self.tok(ids) + self.pos(ids)                  # [B, S, 16]
        h = self.conv1(h.transpose(1, 2)).transpose(1, 2)
        for lin in self.lin:
            h = torch.tanh(lin(h))
        h = self.adapted(h)
        img = self.conv2(h.unsqueeze(1))                    # [B, 4, S, 16]
        return self.conv_lr(self.conv_tt(img)).squeeze(1)  # [B, S, 16]


DYN = ({0: Dim("batch"), 1: Dim("seq")},)


def factorch_targets(program):
    return {str(n.target) for n in program.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("factorch.")}


def test_program_keeps_every_factorch_op():
    model = EveryLayer().eval()
    ep = torch.export.export(model, (torch.randint(0, 40, (2, 6)),), dynamic_shapes=DYN)
    assert factorch_targets(ep) == {f"factorch.{n}.default" for n in (
        "lowrank_embedding", "tt_embedding", "conv_chain", "lowrank_linear_flat", "cp_linear", "lora_linear",
        "tucker_linear", "tt_linear")}
    # torch.export's default decompositions leave them too ...
    assert factorch_targets(ep.run_decompositions()) == factorch_targets(ep)
    # ... unless asked.
    dec = fe.decompose(ep)
    assert not factorch_targets(dec)
    ids = torch.randint(0, 40, (3, 5))
    with torch.no_grad():
        ref = model(ids)
        torch.testing.assert_close(ep.module()(ids), ref)
        torch.testing.assert_close(dec.module()(ids), ref, rtol=1e-5, atol=1e-6)


def test_training_program_runs_backward():
    """A program exported in training mode still differentiates through the
    ops' registered autograd."""
    model = EveryLayer().train()
    ids = torch.randint(0, 40, (2, 6))
    ep = torch.export.export(model, (ids,))
    m = ep.module()
    m(ids).square().sum().backward()
    grads = [p.grad for p in m.parameters()]
    assert all(g is not None for g in grads)


def test_save_load_in_a_fresh_process(tmp_path):
    model = EveryLayer().eval()
    ep = torch.export.export(model, (torch.randint(0, 40, (2, 6)),), dynamic_shapes=DYN)
    inputs = [torch.randint(0, 40, (2, 6)), torch.randint(0, 40, (4, 3))]
    with torch.no_grad():
        expected = [model(i) for i in inputs]
    torch.export.save(ep, str(tmp_path / "model.pt2"))
    torch.save({"inputs": inputs, "expected": expected}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import torch
        import factorch  # registers the ops the program calls
        ep = torch.export.load({str(tmp_path / 'model.pt2')!r})
        assert any(str(n.target).startswith("factorch.") for n in ep.graph.nodes)
        io = torch.load({str(tmp_path / 'io.pt')!r})
        with torch.no_grad():
            for x, y in zip(io["inputs"], io["expected"]):
                torch.testing.assert_close(ep.module()(x), y, rtol=0, atol=0)
        print("same outputs")
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=dict(os.environ), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "same outputs" in res.stdout
