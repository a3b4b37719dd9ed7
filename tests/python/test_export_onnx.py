"""ONNX export of every factorch layer and option, run in onnxruntime
(CPUExecutionProvider) at two input sizes through one file, against the
factorch forward; the aten definitions of the ops against the ops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.export import Dim

import factorch
import factorch.export as fe
from factorch import _decomp, lora
from factorch.nn import FactorizedConv1d, FactorizedConv2d, FactorizedEmbedding, FactorizedLinear

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

ops = torch.ops.factorch
RTOL = 1e-5


def run_ort(path, *inputs):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)}
    return sess.run(None, feed)


def assert_close(got, ref, rtol=RTOL):
    """Equal within rtol relative to the largest entry of the reference."""
    ref = np.asarray(ref, dtype=np.float64)
    scale = max(float(np.abs(ref).max()), 1e-30)
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), ref, rtol=rtol,
                               atol=rtol * scale)


def export_and_compare(tmp_path, model, inputs_a, inputs_b, dynamic_shapes, fold=False):
    """Exports at inputs_a, runs inputs_a and inputs_b (other sizes) through
    the same file; returns the ONNX node types."""
    model.eval()
    path = tmp_path / "model.onnx"
    fe.to_onnx(model, inputs_a, path, dynamic_shapes=dynamic_shapes, fold_weights=fold)
    for inputs in (inputs_a, inputs_b):
        with torch.no_grad():
            ref = model(*inputs)
        got = run_ort(path, *inputs)[0]
        assert got.shape == tuple(ref.shape)
        assert_close(got, ref.numpy())
    proto = onnx.load(str(path))
    return [n.op_type for n in proto.graph.node], proto


BATCH, SEQ = Dim("batch"), Dim("seq")
SEQ_DYN = ({0: BATCH, 1: SEQ},)


# --------------------------------------------------------------------------
# Linear layers
# --------------------------------------------------------------------------
LINEAR = [
    ("lowrank", dict(rank=5)),
    ("cp", dict(rank=6, tensorized_shape=((2, 3, 4), (5, 3, 2)))),
    ("tucker", dict(rank=((2, 2, 3), (3, 2, 2)), tensorized_shape=((2, 3, 4), (5, 3, 2)))),
    ("tt", dict(rank=(1, 3, 4, 1), tensorized_shape=((2, 3, 4), (5, 3, 2)))),
    ("tt", dict(rank=0.3)),  # balanced modes of its own
]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("factorization,kw", LINEAR, ids=[f"{f}{i}" for i, (f, _) in enumerate(LINEAR)])
def test_linear(tmp_path, factorization, kw, bias, fold):
    torch.manual_seed(0)
    layer = FactorizedLinear(24, 30, factorization, bias=bias, **kw)
    types, proto = export_and_compare(tmp_path, layer, (torch.randn(2, 5, 24),),
                                      (torch.randn(3, 7, 24),), SEQ_DYN, fold=fold)
    if factorization == "lowrank":
        assert types.count("MatMul") == 2 and types.count("Add") == bias
    elif fold:  # W formed once, stored as an initializer [30, 24] or its transpose
        assert types.count("MatMul") == 1
        assert any(sorted(i.dims) == [24, 30] for i in proto.graph.initializer)
    else:
        assert types.count("MatMul") >= 2


def test_lowrank_functional_op(tmp_path):
    """The unflattened op (factorch.functional.lowrank_linear) too."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.U, self.V, self.b = (nn.Parameter(torch.randn(*s)) for s in ((9, 3), (3, 12), (9,)))

        def forward(self, x):
            return factorch.functional.lowrank_linear(x, self.U, self.V, self.b)

    types, _ = export_and_compare(tmp_path, M(), (torch.randn(4, 12),), (torch.randn(1, 12),),
                                  ({0: BATCH},))
    assert types == ["MatMul", "MatMul", "Add"]


# --------------------------------------------------------------------------
# Convolutions
# --------------------------------------------------------------------------
CONV2D = [
    ("lowrank", dict(rank=4, stride=2, padding=1)),
    ("lowrank", dict(rank=3, kernel_size=(2, 2), padding="same")),  # asymmetric pads
    ("cp", dict(rank=5, padding=1, dilation=2)),
    ("cp", dict(rank=5, kernel_size=(1, 3), padding=(0, 1))),  # no height filter
    ("tucker", dict(rank=(2, 3), groups=2, bias=False, padding="same")),
    ("tucker", dict(rank=0.5, stride=(2, 1), padding_mode="reflect", padding=1)),
    ("tt", dict(rank=(2, 3), tensorized_shape=((2, 4), (3, 4)), padding=1)),
    ("tt", dict(rank=0.5, padding_mode="circular", padding=1, stride=2)),
]


@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("factorization,kw", CONV2D, ids=[f"{f}{i}" for i, (f, _) in enumerate(CONV2D)])
def test_conv2d(tmp_path, factorization, kw, fold):
    torch.manual_seed(0)
    kw = dict(kw)
    k = kw.pop("kernel_size", 3)
    conv = FactorizedConv2d(8, 12, k, factorization, **kw)
    types, _ = export_and_compare(tmp_path, conv, (torch.randn(2, 8, 9, 10),),
                                  (torch.randn(3, 8, 9, 10),), ({0: BATCH},), fold=fold)
    n_conv = types.count("Conv")
    assert n_conv == 1 if fold and factorization != "lowrank" else n_conv >= 2


def test_conv2d_dynamic_spatial(tmp_path):
    """The op's stage list is SymInt[]: height and width stay dynamic."""
    torch.manual_seed(0)
    conv = FactorizedConv2d(6, 8, 3, "cp", rank=4, padding=1)
    dyn = ({0: BATCH, 2: Dim("h", min=3), 3: Dim("w", min=3)},)
    export_and_compare(tmp_path, conv, (torch.randn(2, 6, 9, 10),), (torch.randn(1, 6, 5, 13),), dyn)


CONV1D = [("lowrank", dict(rank=4, padding=2)), ("cp", dict(rank=5, stride=2)),
          ("tucker", dict(rank=(3, 3), dilation=2, padding="same")),
          ("tt", dict(rank=(2, 2), tensorized_shape=((2, 4), (3, 4))))]


@pytest.mark.parametrize("factorization,kw", CONV1D, ids=[f for f, _ in CONV1D])
def test_conv1d_dynamic_length(tmp_path, factorization, kw):
    torch.manual_seed(0)
    conv = FactorizedConv1d(8, 12, 3, factorization, **kw)
    export_and_compare(tmp_path, conv, (torch.randn(2, 8, 17),), (torch.randn(3, 8, 11),),
                       ({0: BATCH, 2: Dim("length", min=8)},))


# --------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------
@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("padding_idx", [None, 3])
@pytest.mark.parametrize("factorization,rank", [("lowrank", 6), ("tt", (1, 3, 2, 1))])
def test_embedding(tmp_path, factorization, rank, padding_idx, fold):
    torch.manual_seed(0)
    emb = FactorizedEmbedding(50, 24, factorization, rank=rank, padding_idx=padding_idx)
    a = torch.randint(0, 50, (2, 5))
    a[0, 0] = 3
    b = torch.tensor([[3, 0, 49]])
    types, _ = export_and_compare(tmp_path, emb, (a,), (b,), SEQ_DYN, fold=fold)
    assert "Gather" in types


def test_embedding_int32_indices(tmp_path):
    emb = FactorizedEmbedding(40, 12, "tt", rank=3)
    export_and_compare(tmp_path, emb, (torch.randint(0, 40, (3, 4), dtype=torch.int32),),
                       (torch.randint(0, 40, (1, 2), dtype=torch.int32),), SEQ_DYN)


# --------------------------------------------------------------------------
# LoRA wrappers
# --------------------------------------------------------------------------
def _randomize_adapter(layer):
    with torch.no_grad():
        for p in layer.adapter_parameters():
            p.normal_(0, 0.3)
    return layer


@pytest.mark.parametrize("base", ["linear", "lowrank", "cp", "tucker", "tt"])
def test_lora_linear(tmp_path, base):
    torch.manual_seed(0)
    if base == "linear":
        b = nn.Linear(24, 30)
    else:
        b = FactorizedLinear(24, 30, base, rank=0.4)
    layer = _randomize_adapter(lora.LoraLinear(b, r=4, alpha=8, dropout=0.1))
    export_and_compare(tmp_path, layer, (torch.randn(2, 5, 24),), (torch.randn(1, 3, 24),), SEQ_DYN)


def test_lora_embedding_and_conv(tmp_path):
    torch.manual_seed(0)
    emb = _randomize_adapter(lora.LoraEmbedding(nn.Embedding(40, 16, padding_idx=0), r=4))
    export_and_compare(tmp_path, emb, (torch.randint(0, 40, (2, 6)),), (torch.tensor([[0, 5]]),),
                       SEQ_DYN)
    conv = _randomize_adapter(lora.LoraConv2d(nn.Conv2d(6, 8, 3, padding=1), r=3))
    export_and_compare(tmp_path, conv, (torch.randn(2, 6, 8, 8),), (torch.randn(1, 6, 8, 8),),
                       ({0: BATCH},))


# --------------------------------------------------------------------------
# A model of every layer, and a compressed transformer
# --------------------------------------------------------------------------
class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = FactorizedEmbedding(30, 16, "tt", rank=3)
        self.conv = FactorizedConv1d(16, 16, 3, "tucker", rank=(4, 4), padding=1)
        self.l1 = FactorizedLinear(16, 32, "cp", rank=6)
        self.l2 = lora.LoraLinear(FactorizedLinear(32, 16, "lowrank", rank=4), r=2)
        self.head = FactorizedLinear(16, 30, "tt", rank=3)

    def forward(self, ids):
        h = self.emb(ids)                                       # [B, S, 16]
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)        # along the sequence
        return self.head(self.l2(torch.relu(self.l1(h))))


def test_mixed_model_with_plain_torch_onnx_export(tmp_path):
    """torch.onnx.export itself, inside factorch.export.onnx_ready()."""
    torch.manual_seed(0)
    model = Mixed().eval()
    a, b = torch.randint(0, 30, (2, 7)), torch.randint(0, 30, (3, 4))
    path = tmp_path / "mixed.onnx"
    with torch.no_grad(), fe.onnx_ready():
        torch.onnx.export(model, (a,), str(path), dynamo=True, dynamic_shapes=SEQ_DYN,
                          verbose=False)
        onnx.checker.check_model(str(path), full_check=True)
        for ids in (a, b):
            assert_close(run_ort(path, ids)[0], model(ids).numpy())
    assert {n.domain for n in onnx.load(str(path)).graph.node} <= {""}


class Logits(nn.Module):
    """A causal LM's logits without the cache (what an ONNX graph returns)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids):
        return self.lm(input_ids=input_ids, use_cache=False).logits


@pytest.mark.parametrize("factorization", ["lowrank", "tucker"])
def test_compressed_tiny_llama(tmp_path, factorization):
    pytest.importorskip("transformers")
    from compress_models import tiny_llama

    lm = tiny_llama(seed=1)
    factorch.compress(lm, ratio=0.6, method="svd", factorization=factorization, progress=False)
    n_fact = sum(isinstance(m, FactorizedLinear) for m in lm.modules())
    assert n_fact == 14  # 7 projections in each of the 2 blocks
    model = Logits(lm).eval()
    a = torch.randint(0, 100, (2, 9))
    b = torch.randint(0, 100, (1, 17))
    export_and_compare(tmp_path, model, (a,), (b,), SEQ_DYN)


def test_rejects_custom_domains():
    proto = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Thing", ["x"], ["y"], domain="com.example")], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]))
    with pytest.raises(RuntimeError, match="non-standard operator domains"):
        fe._check_domains(proto)


# --------------------------------------------------------------------------
# The aten definitions against the C ops (float64, random inputs)
# --------------------------------------------------------------------------
def _close64(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_decompositions_cover_every_forward_op():
    forward = {n for n in dir(ops) if not n.endswith("_backward") and not n.startswith("_")
               and isinstance(getattr(ops, n), torch._ops.OpOverloadPacket)}
    covered = {op.name().split("::")[1] for op in _decomp.DECOMPOSITIONS}
    assert forward <= covered, forward - covered


@pytest.mark.parametrize("groups,rtl", [([(0, 0), (1, 1), (2, 2)], True),
                                        ([(0, 0), (1, 1), (2, 2)], False),
                                        ([(0, 1), (2, 2)], True), ([(0, 0), (1, 2)], False),
                                        ([(0, 2)], True)])
def test_tt_every_grouping_and_direction(monkeypatch, groups, rtl):
    monkeypatch.setattr(_decomp, "tt_plan", lambda *a, **k: (groups, rtl))
    g = torch.Generator().manual_seed(0)
    ins, outs, ranks = (2, 3, 4), (5, 3, 2), (1, 3, 4, 1)
    n = sum(ranks[k] * ins[k] * outs[k] * ranks[k + 1] for k in range(3))
    x = torch.randn(2, 3, 24, generator=g, dtype=torch.float64)
    w = torch.randn(n, generator=g, dtype=torch.float64)
    b = torch.randn(30, generator=g, dtype=torch.float64)
    args = (x, w, b, list(ins), list(outs), list(ranks))
    _close64(_decomp.tt_linear(*args), ops.tt_linear(*args))


def test_tt_plan_is_read():
    groups, rtl = _decomp.tt_plan((6, 6, 4, 4), (8, 8, 6, 4), (1, 35, 34, 35, 1), 512)
    assert groups == [(0, 1), (2, 3)] and not rtl


def test_conv_chain_saved_matches_the_op():
    """With keep=True the definition also returns the C op's `saved`."""
    torch.manual_seed(0)
    for f in ("cp", "tucker", "tt", "lowrank"):
        conv = FactorizedConv2d(4, 6, 3, f, rank=0.6, padding=1).double()
        x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
        stages, out_shape = conv._layout.stages(5, 5)
        args = (x, conv.factors.detach(), conv.bias.detach(), stages, out_shape, True)
        (y1, s1), (y2, s2) = _decomp.conv_chain(*args), ops.conv_chain(*args)
        _close64(y1, y2)
        _close64(s1, s2)


def test_decompose_program_removes_factorch_ops():
    torch.manual_seed(0)
    model = Mixed().eval()
    ids = torch.randint(0, 30, (2, 5))
    ep = torch.export.export(model, (ids,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any(t.startswith("factorch.") for t in targets)
    dec = fe.decompose(ep)
    targets = {str(n.target) for n in dec.graph.nodes if n.op == "call_function"}
    assert not any(t.startswith("factorch.") for t in targets)
    with torch.no_grad():
        torch.testing.assert_close(dec.module()(ids), model(ids), rtol=1e-5, atol=1e-6)


def test_definitions_are_in_torchs_table_only_inside_onnx_ready():
    """Left in torch's decomposition table, fake tensors and AOT autograd
    would run the aten definitions instead of the ops' fakes and kernels."""
    from torch._decomp import decomposition_table

    op = ops.lowrank_linear_flat.default
    assert op not in decomposition_table
    with fe.onnx_ready():
        assert decomposition_table[op] is _decomp.DECOMPOSITIONS[op]
    assert op not in decomposition_table
