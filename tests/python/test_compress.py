"""factorch.compress: activation-aware low-rank methods, rank allocation,
targets, sequential calibration, the report."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import factorch
from factorch import _activation as A
from factorch.nn import FactorizedConv2d, FactorizedLinear

from compress_models import SmallCNN, correlated_rows, tiny_bert, tiny_llama, token_batches

transformers = pytest.importorskip("transformers")


def _optimal_output_error(W, X, r):
    """min over rank-r Ŵ of ‖(W − Ŵ)Xᵀ‖_F: the tail of the singular values of
    W·Xᵀ (Eckart–Young; the optimum lies in the row space of Xᵀ)."""
    s = torch.linalg.svdvals(W.double() @ X.double().T)
    return float(s[r:].square().sum().sqrt())


def _one_layer(out_f, in_f, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(in_f, out_f, bias=False))


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_whitened_svd_reaches_the_eckart_young_optimum_of_the_output_error(shape):
    out_f, in_f = shape
    X = correlated_rows(600, in_f, seed=1, dtype=torch.float64)
    outs = {}
    for method in ("svd-llm", "svd", "asvd"):
        model = _one_layer(out_f, in_f).double()
        W = model[0].weight.detach().clone()
        rep = factorch.compress(model, ratio=0.5, method=method,
                                calibration=[X[:300], X[300:]], progress=False)
        layer = model[0]
        assert isinstance(layer, FactorizedLinear) and layer.factorization == "lowrank"
        r = layer.rank
        W_hat = (layer.U @ layer.V).detach()
        outs[method] = float(((W - W_hat) @ X.T).norm())
        if method == "svd-llm":
            best = _optimal_output_error(W, X, r)
            assert outs[method] == pytest.approx(best, rel=1e-6)
            # The report's output error is the same quantity, relative.
            rel = outs[method] / float((W @ X.T).norm())
            assert rep.layers[0].output_error == pytest.approx(rel, rel=1e-6)
    assert outs["svd-llm"] < outs["svd"] * 0.9
    assert outs["svd-llm"] <= outs["asvd"] * (1 + 1e-9)


def test_rank_deficient_covariance_and_a_dead_input_channel_do_not_crash():
    X = correlated_rows(10, 32, seed=2)  # 10 rows: XᵀX has rank 10 < 32
    X[:, 5] = 0.0  # a channel that never fires
    for method in ("svd-llm", "asvd"):
        model = _one_layer(16, 32)
        W = model[0].weight.detach().clone()
        rep = factorch.compress(model, ratio=0.95, method=method, calibration=[X],
                                progress=False)
        layer = model[0]
        W_hat = (layer.U @ layer.V).detach()
        assert torch.isfinite(W_hat).all()
        if method == "svd-llm":
            assert "ridge" in rep.layers[0].note or "eigen" in rep.layers[0].note
            # Only 10 directions carry data: rank 10 already reproduces them.
            assert layer.rank >= 10
            err = float(((W - W_hat) @ X.T).norm() / (W @ X.T).norm())
            assert err < 1e-3
        else:
            assert "dead input channels" in rep.layers[0].note


def test_cholesky_whitening_falls_back_to_an_eigendecomposition():
    C = torch.diag(torch.tensor([4.0, 1.0, -1.0], dtype=torch.float64))  # indefinite
    w = A.cholesky_whitening(C)
    assert "eigendecomposition" in w.note
    assert torch.allclose(w.inverse_right(w.T.clone()), torch.eye(3, dtype=torch.float64),
                          atol=1e-9)
    with pytest.raises(ValueError, match="NaN or Inf"):
        A.cholesky_whitening(torch.full((2, 2), float("nan"), dtype=torch.float64))


def test_whitening_inverse_is_exact():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(6, 6, generator=g, dtype=torch.float64)
    for C in (M @ M.T, torch.diag(torch.tensor([3.0, 2, 1, 0.5, 0.1, -0.2], dtype=torch.float64))):
        w = A.cholesky_whitening(C)
        eye = torch.eye(6, dtype=torch.float64)
        # back(Qh) = Qh · T⁻¹, so back(T) must be the identity.
        assert torch.allclose(w.inverse_right(w.T.clone()), eye, atol=1e-9)


def test_compress_a_small_llama_default_targets_and_uniform_budget():
    model = tiny_llama()
    batches = token_batches(8, 24, model.config.vocab_size, seed=0)
    before = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    rep = factorch.compress(model, ratio=0.6, method="svd-llm", calibration=batches,
                            progress=False)
    names = [lr.name for lr in rep.layers]
    assert len(names) == 2 * 7
    assert all(n.startswith("model.layers.") for n in names)
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.model.embed_tokens,
                                                               nn.Embedding)
    for lr in rep.layers:
        layer = model.get_submodule(lr.name)
        dense = before[lr.name]
        if lr.rank is None:
            assert isinstance(layer, nn.Linear)
            continue
        assert isinstance(layer, FactorizedLinear) and layer.rank == lr.rank
        assert lr.params_after == layer.U.numel() + layer.V.numel()
        assert lr.params_after <= 0.6 * lr.params_before
        W = dense.weight.detach().double()
        werr = float((W - (layer.U @ layer.V).detach().double()).norm() / W.norm())
        assert lr.weight_error == pytest.approx(werr, rel=1e-5)
        assert lr.output_error is not None and 0 <= lr.output_error <= 1
    assert rep.params_after <= 0.6 * rep.params_before
    out = model(**batches[0]).logits
    assert torch.isfinite(out).all()
    assert rep.model_params_after == sum(p.numel() for p in model.parameters())


def test_output_error_in_the_report_is_measured_on_the_calibration_data():
    model = tiny_llama(seed=3)
    batches = token_batches(4, 16, model.config.vocab_size, seed=1)
    dense = {}
    hooks = []
    for n, m in model.named_modules():  # capture what each dense layer sees
        if n.endswith("mlp.down_proj") or n.endswith("self_attn.q_proj"):
            hooks.append(m.register_forward_pre_hook(
                lambda mod, args, n=n: dense.setdefault(n, []).append(args[0].detach())))
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in hooks:
        h.remove()
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in dense}
    rep = factorch.compress(model, ratio=0.5, method="svd-llm", calibration=batches,
                            progress=False)
    by_name = {lr.name: lr for lr in rep.layers}
    for n, xs in dense.items():
        X = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).double()
        layer = model.get_submodule(n)
        W, W_hat = weights[n].double(), (layer.U @ layer.V).detach().double()
        measured = float(((W - W_hat) @ X.T).norm() / (W @ X.T).norm())
        assert by_name[n].output_error == pytest.approx(measured, rel=1e-4)


def test_targets_and_exclude():
    model = tiny_llama()
    rep = factorch.compress(model, ratio=0.5, method="svd", targets=["q_proj", "mlp.up_proj"],
                            progress=False)
    assert sorted(lr.name.split(".", 3)[3] for lr in rep.layers) == [
        "mlp.up_proj", "mlp.up_proj", "self_attn.q_proj", "self_attn.q_proj"]
    model = tiny_llama()
    rep = factorch.compress(model, ratio=0.5, method="svd", targets=r"model\.layers\.1\..*proj",
                            exclude=["o_proj"], progress=False)
    assert len(rep.layers) == 6 and all(".1." in lr.name for lr in rep.layers)
    assert not any(lr.name.endswith("o_proj") for lr in rep.layers)
    model = tiny_llama()  # the LM head and embeddings only when named
    rep = factorch.compress(model, ratio=0.5, method="svd", targets=["lm_head", "embed_tokens"],
                            progress=False)
    assert {lr.kind for lr in rep.layers} == {"Linear", "Embedding"}
    assert isinstance(model.model.embed_tokens, factorch.nn.FactorizedEmbedding)
    with pytest.raises(ValueError, match="targets: no module"):
        factorch.compress(tiny_llama(), method="svd", targets=["nothing"], progress=False)
    with pytest.raises(ValueError, match="targets: not a valid regular expression"):
        factorch.compress(tiny_llama(), method="svd", targets="(", progress=False)


def test_argument_errors_name_the_argument():
    m = tiny_llama()
    b = token_batches(2, 8, m.config.vocab_size, seed=0)
    for kwargs, match in [
        (dict(ratio=0.0), "ratio"), (dict(ratio=1.5), "ratio"), (dict(method="pca"), "method"),
        (dict(allocation="best"), "allocation"), (dict(factorization="cp", method="svd-llm"),
                                                  "factorization"),
        (dict(factorization="qr"), "factorization"), (dict(alpha=-1.0), "alpha"),
    ]:
        with pytest.raises(ValueError, match=match):
            factorch.compress(m, calibration=b, progress=False, **kwargs)
    with pytest.raises(ValueError, match="calibration"):
        factorch.compress(m, method="svd-llm", progress=False)
    with pytest.raises(TypeError, match="model"):
        factorch.compress("model", method="svd")


def test_global_allocation_meets_the_budget_and_lowers_the_total_error():
    results = {}
    for alloc in ("uniform", "global"):
        model = tiny_llama(layers=3, seed=5)
        batches = token_batches(8, 24, model.config.vocab_size, seed=2)
        rep = factorch.compress(model, ratio=0.6, method="svd-llm", calibration=batches,
                                allocation=alloc, progress=False, sensitivity_batches=0)
        results[alloc] = rep
    g = results["global"]
    budget = math.floor(0.6 * g.params_before)
    assert g.params_after <= budget
    assert g.params_after >= 0.99 * budget
    total = lambda rep: sum(lr.output_error ** 2 for lr in rep.layers)  # noqa: E731
    assert total(g) < total(results["uniform"])
    ranks = {lr.rank for lr in g.layers}
    assert len(ranks) > 2  # not uniform


def _manual_sensitivities(model, names, batches, loss_of):
    """mean_t ‖∂L/∂y_t‖² / out per layer, by a plain backward with retained
    output gradients."""
    outs = {}

    def keep(name):
        def hook(mod, args, out):
            out.retain_grad()
            outs[name] = out
        return hook

    hooks = [model.get_submodule(n).register_forward_hook(keep(n)) for n in names]
    sums = {n: 0.0 for n in names}
    rows = {n: 0 for n in names}
    for b in batches:
        outs.clear()
        model.zero_grad()
        loss_of(model, b).backward()
        for n in names:
            g = outs[n].grad.double()
            sums[n] += float(g.square().sum())
            rows[n] += g.numel() // g.shape[-1]
    for h in hooks:
        h.remove()
    return {n: sums[n] / rows[n] / model.get_submodule(n).weight.shape[0] for n in names}


def test_layer_sensitivities_are_the_mean_squared_output_gradients():
    from factorch.compression import layer_sensitivities

    model = tiny_llama(seed=4)
    batches = token_batches(8, 12, model.config.vocab_size, seed=6)
    mods = dict(factorch.select_targets(model))
    w, which = layer_sensitivities(model, mods, batches, n_batches=2)
    assert which == "loss"
    ref = _manual_sensitivities(model, list(mods), batches[:2],
                                lambda m, b: m(**b, labels=b["input_ids"]).loss)
    for n in mods:
        assert w[n] == pytest.approx(ref[n], rel=1e-4), n
    assert all(p.requires_grad for p in model.parameters())  # restored
    # Without a loss (an encoder): a random projection of the output.
    bert = tiny_bert()
    mods = dict(factorch.select_targets(bert))
    w, which = layer_sensitivities(bert, mods, batches[:1], n_batches=1)
    assert which == "output" and all(v > 0 for v in w.values())


def test_global_allocation_with_sensitivities_meets_the_budget():
    model = tiny_llama(layers=3, seed=5)
    batches = token_batches(8, 24, model.config.vocab_size, seed=2)
    rep = factorch.compress(model, ratio=0.6, method="svd-llm", calibration=batches,
                            allocation="global", progress=False)
    assert rep.sensitivity == "loss" and rep.sensitivity_seconds > 0
    budget = math.floor(0.6 * rep.params_before)
    assert 0.99 * budget <= rep.params_after <= budget


def test_allocate_global_keeps_a_layer_dense_when_that_is_cheapest():
    # Two layers: one with a flat spectrum that needs everything, one trivially rank 1.
    W1 = torch.randn(8, 8, dtype=torch.float64)
    W2 = torch.outer(torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64))
    from factorch.compression import _Candidate, allocate_global

    cands = []
    for name, W in (("a", W1), ("b", W2)):
        c = _Candidate(name, None, 8, 8)
        c.spectrum = A.spectrum(W, A.Whitening(None, lambda q: q))
        cands.append(c)
    allocate_global(cands, budget=64 + 16)
    assert cands[0].rank is None  # dense: 64 parameters, no error
    assert cands[1].rank == 1
    with pytest.raises(ValueError, match="ratio: too small"):
        allocate_global(cands, budget=10)


def test_sequential_calibration_holds_one_block_of_statistics():
    results = {}
    for seq in (False, True):
        model = tiny_llama(layers=3, seed=7)
        batches = token_batches(6, 20, model.config.vocab_size, seed=3)
        rep = factorch.compress(model, ratio=0.5, method="svd-llm", calibration=batches,
                                sequential=seq, progress=False)
        results[seq] = (rep, model)
        assert len(rep.layers) == 21
        assert all(isinstance(model.get_submodule(lr.name), FactorizedLinear)
                   for lr in rep.layers if lr.rank is not None)
        assert torch.isfinite(model(**batches[0]).logits).all()
    one, seq = results[False][0], results[True][0]
    assert seq.peak_statistics_bytes * 2.5 < one.peak_statistics_bytes
    # Block 0 sees the same inputs either way; later blocks see compressed ones.
    r0 = {lr.name: lr.rank for lr in one.layers}
    assert all(r0[lr.name] == lr.rank for lr in seq.layers)
    w0 = {lr.name: lr.output_error for lr in one.layers}
    assert all(w0[lr.name] == pytest.approx(lr.output_error, rel=1e-6)
               for lr in seq.layers if ".0." in lr.name)
    assert any(w0[lr.name] != pytest.approx(lr.output_error, rel=1e-3)
               for lr in seq.layers if ".2." in lr.name)


def test_sequential_with_global_allocation():
    model = tiny_llama(layers=2, seed=8)
    batches = token_batches(6, 20, model.config.vocab_size, seed=4)
    rep = factorch.compress(model, ratio=0.6, method="svd-llm", calibration=batches,
                            sequential=True, allocation="global", progress=False)
    assert rep.params_after <= math.floor(0.6 * rep.params_before)
    assert rep.params_after >= 0.98 * math.floor(0.6 * rep.params_before)


def test_encoder_compression_keeps_embeddings_close():
    model = tiny_bert()
    batches = token_batches(8, 16, model.config.vocab_size, seed=5)
    ref = model(**batches[0]).last_hidden_state.detach()
    rep = factorch.compress(model, ratio=0.9, method="svd-llm", calibration=batches,
                            progress=False)
    assert len(rep.layers) == 2 * 6  # query, key, value, attention out, intermediate, output
    out = model(**batches[0]).last_hidden_state
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1)).mean()
    assert cos > 0.9


def test_cnn_convolutions_compress_activation_aware():
    model = SmallCNN()
    torch.manual_seed(1)
    x = torch.randn(16, 3, 16, 16)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    feats = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: feats.setdefault(n, a[0].detach()))
             for n, m in convs.items()]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    rep = factorch.compress(model, ratio=0.5, method="svd-llm", calibration=[x[:8], x[8:]],
                            progress=False)
    kinds = {lr.name: lr.kind for lr in rep.layers}
    assert kinds == {"features.0": "Conv2d", "features.2": "Conv2d", "features.4": "Conv2d",
                     "head": "Linear"}
    for n, lr in ((lr.name, lr) for lr in rep.layers if lr.kind == "Conv2d"):
        new = model.get_submodule(n)
        if lr.rank is None:
            continue
        assert isinstance(new, FactorizedConv2d) and new.factorization == "lowrank"
        old = convs[n]
        y_old = torch.nn.functional.conv2d(feats[n], old.weight, None, old.stride, old.padding)
        y_new = (new(feats[n]) - new.bias.view(1, -1, 1, 1)).detach()
        measured = float((y_old - y_new).norm() / y_old.norm())
        assert lr.output_error == pytest.approx(measured, rel=1e-3)
    assert torch.isfinite(model(x)).all()


def test_tensorized_factorizations_go_through_from_linear():
    model = tiny_llama()
    rep = factorch.compress(model, ratio=0.3, method="svd", factorization="tt",
                            targets=["mlp.up_proj"], progress=False)
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, FactorizedLinear) and layer.factorization == "tt"
    assert rep.layers[0].params_after <= 0.3 * rep.layers[0].params_before


def test_report_table_json_csv_and_plot(tmp_path):
    model = tiny_llama()
    batches = token_batches(4, 16, model.config.vocab_size, seed=0)
    rep = factorch.compress(model, ratio=0.5, method="asvd", calibration=batches,
                            progress=False)
    text = rep.table()
    assert "model.layers.0.self_attn.q_proj" in text and "kept" in text
    rep.to_json(tmp_path / "r.json")
    rep.to_csv(tmp_path / "r.csv")
    import json

    back = factorch.CompressionReport.from_dict(json.loads((tmp_path / "r.json").read_text()))
    assert back.table() == text
    assert (tmp_path / "r.csv").read_text().count("\n") == len(rep.layers) + 1
    pytest.importorskip("matplotlib")
    rep.plot(tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_grouped_convolutions_fall_back_to_the_weight_and_still_get_ranks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, padding=1, groups=2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(32 * 6 * 6, 10))
    x = torch.randn(8, 8, 6, 6)
    rep = factorch.compress(model, ratio=0.5, method="svd-llm", calibration=[x],
                            allocation="global", progress=False)
    by = {lr.name: lr for lr in rep.layers}
    assert by["2"].method == "svd" and "weight-only" in by["2"].note
    assert by["0"].method == "svd-llm" and by["0"].output_error is not None
    assert by["2"].rank is None or by["2"].rank > 1
    assert torch.isfinite(model(x)).all()
