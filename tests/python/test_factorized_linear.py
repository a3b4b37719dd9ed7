"""factorch.nn.FactorizedLinear: construction, initialisation, conversion
from and to nn.Linear, state_dict, training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import factorch
from factorch.nn import FactorizedLinear

from helpers import DEVICES, fit


def test_drop_in_for_linear_shapes():
    layer = FactorizedLinear(12, 7, rank=3)
    assert layer(torch.randn(2, 5, 12)).shape == (2, 5, 7)
    assert layer(torch.randn(12)).shape == (7,)
    assert layer.U.shape == (7, 3) and layer.V.shape == (3, 12) and layer.bias.shape == (7,)
    assert FactorizedLinear(12, 7, rank=3, bias=False).bias is None
    d = FactorizedLinear(12, 7, rank=3, dtype=torch.float64)
    assert d.U.dtype == torch.float64


def test_rank_as_fraction_of_parameters():
    layer = FactorizedLinear(100, 50, rank=0.5)
    # largest r with r·(100 + 50) <= 0.5·100·50
    assert layer.rank == 16
    assert layer.compression_ratio == pytest.approx(5000 / (16 * 150))
    assert layer.flops(batch=4) == 2 * 4 * 16 * 150
    assert layer.num_parameters == 16 * 150 + 50


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rank=0), "rank: expected 1 <= rank"),
        (dict(rank=8), r"min\(in_features, out_features\) = 7"),
        (dict(rank=None), "rank: expected a positive int"),
        (dict(rank=1.5), r"ratio: expected a fraction in \(0, 1\]"),
        (dict(rank=2, factorization="svd"), "factorization: expected one of"),
    ],
)
def test_bad_construction_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FactorizedLinear(12, 7, **kwargs)


def test_bad_feature_counts():
    with pytest.raises(ValueError, match="in_features: expected a positive int"):
        FactorizedLinear(0, 7, rank=1)


def test_input_feature_mismatch_raises():
    with pytest.raises(ValueError, match=r"x: expected a last dim of in_features = 12"):
        FactorizedLinear(12, 7, rank=3)(torch.randn(4, 11))


def test_init_output_variance_matches_nn_linear():
    torch.manual_seed(0)
    x = torch.randn(512, 256)
    dense, fact = [], []
    for _ in range(20):
        dense.append(nn.Linear(256, 128, bias=False)(x).var().item())
        fact.append(FactorizedLinear(256, 128, rank=32, bias=False)(x).var().item())
    d, f = sum(dense) / len(dense), sum(fact) / len(fact)
    assert f == pytest.approx(d, rel=0.15), (d, f)


def test_from_linear_full_rank_is_exact_and_to_linear_round_trips():
    torch.manual_seed(0)
    dense = nn.Linear(20, 12, dtype=torch.float64)
    layer = FactorizedLinear.from_linear(dense, rank=12)
    assert layer.reconstruction_error < 1e-12
    x = torch.randn(9, 20, dtype=torch.float64)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-10, atol=1e-10)
    back = layer.to_linear()
    assert isinstance(back, nn.Linear)
    torch.testing.assert_close(back.weight, dense.weight, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(back.bias, dense.bias)


def test_from_linear_truncation_error_is_eckart_young():
    torch.manual_seed(1)
    dense = nn.Linear(30, 20, dtype=torch.float64)
    s = torch.linalg.svdvals(dense.weight.detach())
    layer = FactorizedLinear.from_linear(dense, rank=5)
    want = (s[5:].norm() / s.norm()).item()
    assert layer.reconstruction_error == pytest.approx(want, rel=1e-9)
    W = layer.to_linear().weight.detach()
    got = ((W - dense.weight).norm() / dense.weight.norm()).item()
    assert got == pytest.approx(want, rel=1e-9)


def test_from_linear_ratio_and_energy():
    torch.manual_seed(2)
    dense = nn.Linear(40, 30)
    assert FactorizedLinear.from_linear(dense, ratio=0.25).rank == 4  # floor(.25*1200/70)
    s = torch.linalg.svdvals(dense.weight.detach().double())
    layer = FactorizedLinear.from_linear(dense, energy=0.9)
    kept = (s[: layer.rank] ** 2).sum() / (s**2).sum()
    kept_less = (s[: layer.rank - 1] ** 2).sum() / (s**2).sum()
    assert kept >= 0.9 > kept_less
    assert FactorizedLinear.from_linear(dense, energy=1.0).rank == 30


def test_from_linear_argument_errors():
    dense = nn.Linear(8, 6)
    with pytest.raises(ValueError, match="exactly one of rank, ratio or energy, got none"):
        FactorizedLinear.from_linear(dense)
    with pytest.raises(ValueError, match="exactly one of rank, ratio or energy, got rank, ratio"):
        FactorizedLinear.from_linear(dense, rank=2, ratio=0.5)
    with pytest.raises(ValueError, match=r"energy: expected a fraction in \(0, 1\]"):
        FactorizedLinear.from_linear(dense, energy=0)
    with pytest.raises(TypeError, match="linear: expected an nn.Linear"):
        FactorizedLinear.from_linear(nn.Conv1d(2, 2, 1), rank=1)
    with torch.no_grad():
        dense.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="weight: expected finite values"):
        FactorizedLinear.from_linear(dense, rank=2)


def test_state_dict_round_trip(tmp_path):
    torch.manual_seed(3)
    a = FactorizedLinear(10, 6, rank=3)
    path = tmp_path / "layer.pt"
    torch.save(a.state_dict(), path)
    b = FactorizedLinear(10, 6, rank=3)
    b.load_state_dict(torch.load(path))
    x = torch.randn(4, 10)
    torch.testing.assert_close(a(x), b(x))
    assert set(a.state_dict()) == {"factors", "bias", "_extra_state"}  # the layout
    with pytest.raises(RuntimeError, match=r"with layout .*'rank': 3.* this layer has layout"):
        FactorizedLinear(10, 6, rank=2).load_state_dict(a.state_dict())


def test_lowrank_factors_are_views_of_one_flat_parameter_and_old_state_dicts_load():
    torch.manual_seed(5)
    a = FactorizedLinear(10, 6, rank=3)
    assert [n for n, _ in a.named_parameters()] == ["factors", "bias"]
    U, V = a.U, a.V
    assert U.shape == (6, 3) and V.shape == (3, 10)
    assert U.data_ptr() == a.factors.data_ptr() + V.numel() * a.factors.element_size()
    x = torch.randn(4, 10)
    torch.testing.assert_close(a(x), x @ (U @ V).T + a.bias)
    a(x).sum().backward()  # the gradient reaches the flat parameter
    assert a.factors.grad is not None and a.factors.grad.abs().sum() > 0
    # A state_dict with separate U and V (before one flat parameter) loads.
    old = {"U": U.detach().clone(), "V": V.detach().clone(), "bias": a.bias.detach().clone()}
    b = FactorizedLinear(10, 6, rank=3)
    b.load_state_dict(old)
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_training_lowers_the_loss(device):
    torch.manual_seed(4)
    teacher = nn.Linear(32, 16, device=device)
    model = nn.Sequential(
        FactorizedLinear(32, 64, rank=16, device=device),
        nn.ReLU(),
        FactorizedLinear(64, 16, rank=16, device=device),
    )
    x = torch.randn(256, 32, device=device)
    with torch.no_grad():
        y = teacher(x)
    losses = fit(model, x, y, steps=150, lr=1e-2)
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])


def test_repr_names_the_factorization():
    assert "factorization='lowrank', rank=3" in repr(FactorizedLinear(10, 6, rank=3))


def test_set_factors_changes_the_rank_in_place_and_checks_the_layout():
    from factorch.factorizations import LowRank, TensorTrain

    torch.manual_seed(6)
    a = FactorizedLinear(10, 6, rank=3)
    param = a.factors
    U, V = torch.randn(6, 5), torch.randn(5, 10)
    a.set_factors(*LowRank.from_factors(U, V))
    assert a.factors is param and a.rank == 5 and a.layout.rank == 5
    x = torch.randn(4, 10)
    torch.testing.assert_close(a(x), x @ (U @ V).T + a.bias)
    with pytest.raises(ValueError, match="layout: expected a 'lowrank' layout of 10 -> 6"):
        a.set_factors(*LowRank.from_factors(torch.randn(7, 2), torch.randn(2, 10)))
    with pytest.raises(ValueError, match="layout: expected a 'lowrank' layout"):
        a.set_factors(TensorTrain((10,), (6,), (1, 1)), torch.randn(60))
    with pytest.raises(ValueError, match=r"flat: expected \[32\]"):
        a.set_factors(LowRank(10, 6, 2), torch.randn(31))
