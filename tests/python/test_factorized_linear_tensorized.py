"""factorch.nn.FactorizedLinear with factorization="cp", "tucker" and "tt":
tensorized shapes (given and automatic), the forms of rank, initialisation,
to_linear, sizes and FLOPs, state_dict, training, and bad arguments."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from factorch._tensorized import auto_tensorized_shape, balanced_modes
from factorch.factorizations import CP, TensorTrain, Tucker
from factorch.nn import FactorizedLinear

from helpers import DEVICES, fit

FACTS = ["cp", "tucker", "tt"]


@pytest.mark.parametrize("fact", FACTS)
def test_forward_equals_the_reconstructed_dense_layer(fact):
    torch.manual_seed(0)
    for shape, rank, bias in (
        (((2, 3, 2), (3, 4)) if fact != "tt" else ((2, 3, 2), (3, 2, 2)), 3, True),
        (((4, 4), (2, 5)), 2, False),
        (((12,), (10,)), 4, True),
    ):
        n_in, n_out = math.prod(shape[0]), math.prod(shape[1])
        layer = FactorizedLinear(n_in, n_out, fact, rank=rank, tensorized_shape=shape, bias=bias,
                                 dtype=torch.float64)
        dense = layer.to_linear()
        assert isinstance(dense, nn.Linear) and dense.weight.shape == (n_out, n_in)
        for lead in ((7,), (2, 3), ()):
            x = torch.randn(*lead, n_in, dtype=torch.float64)
            torch.testing.assert_close(layer(x), dense(x), rtol=1e-11, atol=1e-11)


def test_balanced_modes_and_automatic_shapes():
    assert balanced_modes(4096, 4) == (8, 8, 8, 8)
    assert balanced_modes(768, 3) == (12, 8, 8)
    assert balanced_modes(7, 3) == (7, 1, 1)
    assert auto_tensorized_shape(4096, 4096) == ((8, 8, 8, 8), (8, 8, 8, 8))
    assert auto_tensorized_shape(64, 48) == ((8, 8), (8, 6))
    ins, outs = auto_tensorized_shape(768, 3072)
    assert len(ins) == len(outs) and math.prod(ins) == 768 and math.prod(outs) == 3072
    layer = FactorizedLinear(4096, 1024, "tt", rank=4)
    assert layer.tensorized_shape == ((8, 8, 8, 8), (8, 8, 4, 4))
    assert len(layer.cores) == 4


def test_rank_forms():
    d8 = ((8, 8, 8, 8), (8, 8, 8, 8))
    cp = FactorizedLinear(4096, 4096, "cp", rank=0.02, tensorized_shape=d8)
    # largest R with R·(Σ i + Σ o) <= 0.02·4096²
    assert cp.rank == int(0.02 * 4096 * 4096 // 64)
    assert cp.compression_ratio == pytest.approx(4096 * 4096 / (cp.rank * 64))
    tt = FactorizedLinear(4096, 4096, "tt", rank=0.02, tensorized_shape=d8)
    assert tt.rank[0] == tt.rank[-1] == 1 and max(tt.rank) - min(tt.rank[1:-1]) <= 1
    assert tt.factors.numel() <= 0.02 * 4096 * 4096
    assert FactorizedLinear(64, 64, "tt", rank=5, tensorized_shape=((8, 8), (8, 8))).rank == (1, 5, 1)
    assert FactorizedLinear(64, 64, "tt", rank=(1, 6, 1)).rank == (1, 6, 1)
    assert FactorizedLinear(64, 64, "tt", rank=(6,)).rank == (1, 6, 1)
    tk = FactorizedLinear(64, 48, "tucker", rank=7)  # capped at each mode size
    assert tk.rank == ((7, 7), (7, 6))
    tk = FactorizedLinear(64, 48, "tucker", rank=((2, 3), (4, 5)))
    assert tk.core.shape == (4, 5, 2, 3)
    assert FactorizedLinear(64, 48, "tucker", rank=(2, 3, 4, 5)).rank == ((2, 3), (4, 5))
    same = FactorizedLinear(64, 48, "cp", rank="same")
    assert same.factors.numel() <= 64 * 48 < same.factors.numel() + 8 + 8 + 8 + 6
    tk = FactorizedLinear(256, 256, "tucker", rank=0.1, tensorized_shape=((4, 4, 4, 4),) * 2)
    assert tk.factors.numel() <= 0.1 * 256 * 256
    assert max(max(r) for r in tk.rank) - min(min(r) for r in tk.rank) <= 1


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(factorization="cp", rank=0), ValueError, r"rank: expected 1 <= rank"),
        (dict(factorization="tucker", rank=0), ValueError, r"rank: expected a positive rank"),
        (dict(factorization="tt", rank=0), ValueError, r"rank: expected a positive rank"),
        (dict(factorization="tt", rank=(1, 0, 1)), ValueError, r"rank: TT rank r_1 = 0 is impossible"),
        (dict(factorization="tt", rank=(2, 3, 1)), ValueError, r"must start and end with 1"),
        (dict(factorization="tt", rank=(2, 3)), ValueError, r"expected 1 inner TT ranks"),
        (dict(factorization="tucker", rank=((9, 2), (2, 2))), ValueError,
         r"input Tucker rank 0 = 9 is impossible: expected 1 <= rank <= 8"),
        (dict(factorization="tucker", rank=(2, 2, 2)), ValueError, r"expected Tucker ranks as"),
        (dict(factorization="cp", rank=(2, 3)), ValueError, r"a CP layer takes one rank"),
        (dict(factorization="cp", rank=1.5), ValueError, r"rank: expected a fraction in \(0, 1\]"),
        (dict(factorization="cp", rank="half"), ValueError, r"rank: expected an int, a tuple"),
        (dict(factorization="cp", rank=None), ValueError, r"rank: expected an int, a tuple"),
        (dict(factorization="cp", rank=2, tensorized_shape=((8, 4), (8, 6))), ValueError,
         r"tensorized_shape: the input modes \(8, 4\) multiply to 32, expected in_features = 64"),
        (dict(factorization="tt", rank=2, tensorized_shape=((8, 8), (48,))), ValueError,
         r"a Tensor-Train needs as many input as output modes"),
        (dict(factorization="cp", rank=2, tensorized_shape=((8, 8), (8, 0, 6))), ValueError,
         r"tensorized_shape: expected 1 to 8 positive int output modes"),
        (dict(factorization="cp", rank=2, tensorized_shape=(64, 48)), ValueError,
         r"tensorized_shape: expected \(\(i_1"),
        (dict(factorization="lowrank", rank=2, tensorized_shape=((8, 8), (8, 6))), ValueError,
         r"tensorized_shape: only for factorization="),
        (dict(factorization="ttm", rank=2), ValueError, r"factorization: expected one of"),
    ],
)
def test_bad_construction_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        FactorizedLinear(64, 48, **kwargs)


@pytest.mark.parametrize("fact", FACTS)
def test_input_feature_mismatch_raises(fact):
    with pytest.raises(ValueError, match=r"x: expected a last dim of in_features = 64"):
        FactorizedLinear(64, 48, fact, rank=2)(torch.randn(4, 63))


@pytest.mark.parametrize("fact", FACTS)
def test_init_output_variance_matches_nn_linear(fact):
    torch.manual_seed(0)
    x = torch.randn(512, 256)
    dense, fact_vars = [], []
    for _ in range(30):
        dense.append(nn.Linear(256, 128, bias=False)(x).var().item())
        layer = FactorizedLinear(256, 128, fact, rank=8 if fact != "cp" else 64, bias=False)
        with torch.no_grad():
            fact_vars.append(layer(x).var().item())
    d, f = sum(dense) / len(dense), sum(fact_vars) / len(fact_vars)
    assert f == pytest.approx(d, rel=0.2), (d, f)


@pytest.mark.parametrize("fact", FACTS)
def test_sizes_and_flops(fact):
    layer = FactorizedLinear(4096, 4096, fact, rank={"cp": 1311, "tucker": 4, "tt": 25}[fact],
                             tensorized_shape=((8,) * 4, (8,) * 4))
    layout = layer.layout
    assert layer.num_parameters == layout.num_parameters + 4096
    assert layer.compression_ratio == pytest.approx(4096 * 4096 / layout.num_parameters)
    assert 150 < layer.compression_ratio < 300
    f1, f2048 = layer.flops(1), layer.flops(2048)
    assert 0 < f1 < f2048
    dense = 2 * 2048 * 4096 * 4096
    assert f2048 < dense  # ~200x compression is cheaper than dense in FLOPs
    if fact == "tt":  # pairs of merged cores: 2 GEMMs of 2·64·(25·64)·64 per row
        assert f2048 == pytest.approx(2048 * 2 * 2 * 64 * 25 * 64 * 64, rel=0.01)
        assert "groups [0-1] [2-3]" in layer.plan(2048)["plan"]
    if fact == "cp":
        assert f2048 == pytest.approx(2 * 2048 * 1311 * 8192, rel=0.01)


@pytest.mark.parametrize("fact", FACTS)
def test_views_share_the_flat_parameter(fact):
    layer = FactorizedLinear(64, 48, fact, rank=3)
    first = layer.cores[0] if fact == "tt" else (layer.core if fact == "tucker" else layer.in_factors[0])
    assert first.data_ptr() == layer.factors.data_ptr()
    with torch.no_grad():
        first.zero_()
    assert layer.factors[: first.numel()].abs().sum() == 0
    total = sum(v.numel() for v in (layer.cores if fact == "tt" else
                                    ([layer.core] if fact == "tucker" else []) + layer.in_factors + layer.out_factors))
    assert total == layer.factors.numel()


def test_views_of_other_factorizations_raise():
    with pytest.raises(AttributeError, match=r"cores: a 'cp' layer has none"):
        FactorizedLinear(64, 48, "cp", rank=3).cores
    with pytest.raises(AttributeError, match=r"core: a 'tt' layer has none"):
        FactorizedLinear(64, 48, "tt", rank=3).core


@pytest.mark.parametrize("fact", FACTS)
def test_state_dict_round_trip(fact, tmp_path):
    torch.manual_seed(3)
    a = FactorizedLinear(64, 48, fact, rank=3)
    path = tmp_path / "layer.pt"
    torch.save(a.state_dict(), path)
    b = FactorizedLinear(64, 48, fact, rank=3)
    b.load_state_dict(torch.load(path))
    x = torch.randn(4, 64)
    torch.testing.assert_close(a(x), b(x))
    assert set(a.state_dict()) == {"factors", "bias", "_extra_state"}  # the layout
    with pytest.raises(RuntimeError, match=r"with layout .* this layer has layout"):
        FactorizedLinear(64, 48, fact, rank=2).load_state_dict(a.state_dict())


@pytest.mark.parametrize("fact", FACTS)
@pytest.mark.parametrize("device", DEVICES)
def test_training_lowers_the_loss(device, fact):
    torch.manual_seed(4)
    teacher = nn.Linear(32, 16, device=device)
    model = nn.Sequential(
        FactorizedLinear(32, 64, fact, rank=8 if fact != "cp" else 32, device=device),
        nn.ReLU(),
        FactorizedLinear(64, 16, fact, rank=8 if fact != "cp" else 32, device=device),
    )
    x = torch.randn(256, 32, device=device)
    with torch.no_grad():
        y = teacher(x)
    losses = fit(model, x, y, steps=150, lr=1e-2)
    assert losses[-1] < 0.2 * losses[0], (losses[0], losses[-1])


def test_repr_names_the_factorization_and_shape():
    r = repr(FactorizedLinear(64, 48, "tt", rank=3))
    assert "factorization='tt', rank=(1, 3, 1), tensorized_shape=((8, 8), (8, 6))" in r


def test_layout_parameter_counts():
    assert CP((2, 3), (4,), 5).num_parameters == 5 * 9
    assert Tucker((2, 3), (4,), ((2, 2), (3,))).num_parameters == 3 * 4 + 2 * 2 + 3 * 2 + 4 * 3
    assert TensorTrain((2, 3), (4, 2), (1, 3, 1)).num_parameters == 2 * 4 * 3 + 3 * 3 * 2


# --------------------------------------------------------------------------
# from_linear for cp / tucker / tt (C decompositions: CP-ALS, HOOI, TT-SVD)
# --------------------------------------------------------------------------
PLANTED = [
    ("cp", 6),
    ("tucker", ((2, 2, 2), (3, 2, 2))),
    ("tt", (1, 3, 3, 1)),
]
SHAPE = ((4, 4, 4), (4, 4, 3))


@pytest.mark.parametrize("factorization, rank", PLANTED)
def test_from_linear_recovers_a_planted_factorization(factorization, rank):
    torch.manual_seed(0)
    src = FactorizedLinear(64, 48, factorization, rank=rank, tensorized_shape=SHAPE,
                           dtype=torch.float64)
    dense = src.to_linear()
    layer = FactorizedLinear.from_linear(dense, factorization, rank=rank, tensorized_shape=SHAPE)
    assert layer.reconstruction_error < 1e-6
    x = torch.randn(7, 64, dtype=torch.float64)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("factorization", ["cp", "tucker", "tt"])
def test_from_linear_error_is_the_weight_error_and_bounds_outputs(factorization):
    torch.manual_seed(1)
    dense = torch.nn.Linear(64, 48, dtype=torch.float64)
    layer = FactorizedLinear.from_linear(dense, factorization, ratio=0.3, tensorized_shape=SHAPE)
    W, Wf = dense.weight.detach(), layer.to_linear().weight.detach()
    err = ((Wf - W).norm() / W.norm()).item()
    assert err == pytest.approx(layer.reconstruction_error, rel=1e-6, abs=1e-9)
    assert 0 < err < 1 and layer.compression_ratio > 2
    x = torch.randn(32, 64, dtype=torch.float64)
    # ||(W - Wf)·x|| <= ||W - Wf||_F·||x||: outputs are off by at most the weight error.
    diff = (layer(x) - dense(x)).norm(dim=1)
    assert (diff <= err * W.norm() * x.norm(dim=1) + 1e-9).all()


def test_from_linear_tt_energy_sets_the_error_bound():
    torch.manual_seed(2)
    dense = torch.nn.Linear(64, 48, dtype=torch.float64)
    for energy in (0.5, 0.9, 0.99):
        layer = FactorizedLinear.from_linear(dense, "tt", energy=energy, tensorized_shape=SHAPE)
        assert layer.reconstruction_error <= (1 - energy) ** 0.5 + 1e-12


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(factorization="cp", energy=0.9), ValueError, "energy: not defined for factorization='cp'"),
        (dict(factorization="tucker"), ValueError, "exactly one of rank, ratio or energy, got none"),
        (dict(factorization="tt", ratio=2.0), ValueError, r"ratio: expected a fraction in \(0, 1\]"),
        (dict(factorization="cp", rank=0), ValueError, "rank"),
        (dict(factorization="tt", rank=2, tensorized_shape=((4, 4, 5), (4, 4, 3))), ValueError,
         "tensorized_shape"),
    ],
)
def test_from_linear_tensorized_argument_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        FactorizedLinear.from_linear(torch.nn.Linear(64, 48), **kwargs)
