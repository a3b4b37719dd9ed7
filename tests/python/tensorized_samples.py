"""Sample inputs of the tensorized linear ops (CP, Tucker, TT), shared by the
value, gradient, gradcheck and opcheck tests: many mode shapes and ranks
(ranks below, at and above the mode sizes), d = 1..4, M = 1, empty batches,
batch dims, non-contiguous and broadcast x, with and without bias."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from helpers import rand
from factorch.factorizations import CP, TensorTrain, Tensorized, Tucker

OPS = {
    "cp": torch.ops.factorch.cp_linear,
    "tucker": torch.ops.factorch.tucker_linear,
    "tt": torch.ops.factorch.tt_linear,
}
BACKWARD_OPS = {
    "cp": torch.ops.factorch.cp_linear_backward,
    "tucker": torch.ops.factorch.tucker_linear_backward,
    "tt": torch.ops.factorch.tt_linear_backward,
}

LAYOUTS = {
    "cp": [
        CP((2, 3), (4,), 3),
        CP((2, 2, 2), (3, 2), 5),
        CP((4,), (5,), 1),
        CP((2, 3), (2, 2), 20),  # R above in and out
        CP((1, 3), (2, 1), 2),  # modes of size 1
    ],
    "tucker": [
        Tucker((2, 3), (4,), ((2, 2), (3,))),
        Tucker((3, 2, 2), (2, 3), ((2, 1, 2), (2, 2))),
        Tucker((4,), (5,), ((4,), (5,))),  # square factors
        Tucker((3, 3), (2, 3), ((2, 3), (2, 1))),
        Tucker((1, 3), (2, 1), ((1, 2), (2, 1))),
    ],
    "tt": [
        TensorTrain((2, 3), (4, 2), (1, 3, 1)),
        TensorTrain((2, 2, 2), (3, 2, 2), (1, 2, 3, 1)),
        TensorTrain((6,), (4,), (1, 1)),  # one core
        TensorTrain((3, 3, 3), (3, 3, 3), (1, 9, 9, 1)),  # the largest ranks
        TensorTrain((2, 2, 2, 2), (2, 2, 2, 2), (1, 4, 16, 4, 1)),  # merged groups
        TensorTrain((4, 4, 4), (2, 1, 2), (1, 3, 2, 1)),  # in >> out
        TensorTrain((2, 3), (2, 2), (1, 7, 1)),  # a rank above the unfolding's
    ],
}


@dataclass
class Sample:
    name: str
    layout: Tensorized
    x: torch.Tensor
    weights: torch.Tensor
    bias: torch.Tensor | None

    def args(self, keep=True):
        """Positional arguments of the op (Tucker's: keep its states)."""
        b = self.bias if self.bias is not None else self.x.new_empty(0)
        extra = (keep,) if isinstance(self.layout, Tucker) else ()
        return (self.x, self.weights, b, *self.layout.op_args(), *extra)

    def reference(self):
        """y in float64 from the dense W (autograd flows to x, weights, bias)."""
        W = self.layout.to_dense(self.weights.double())
        y = self.x.double() @ W.T
        return y + self.bias.double() if self.bias is not None else y


def samples(factorization, device, dtype, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    kw = dict(device=device, dtype=dtype, gen=g)

    def make(name, layout, lead, bias=True, x_fn=None):
        x = rand(*lead, layout.in_features, **kw)
        if x_fn is not None:
            x = x_fn(x)
        w = rand(layout.num_parameters, **kw)
        b = rand(layout.out_features, **kw) if bias else None
        for t in (x, w, b):
            if t is not None:
                t.requires_grad_(requires_grad)
        return Sample(f"{factorization} {name}", layout, x, w, b)

    layouts = LAYOUTS[factorization]
    for i, layout in enumerate(layouts):
        yield make(f"layout {i} {layout.in_modes}->{layout.out_modes} rank {layout.rank}", layout,
                   (5,), bias=i % 2 == 0)
    first = layouts[1]
    yield make("M=1", first, (1,))
    yield make("1-d x", first, ())
    yield make("3-d batch", first, (2, 3))
    yield make("empty batch", first, (0,))
    yield make("transposed x", first, (7,), x_fn=lambda x: x.T.contiguous().T)
    yield make("sliced x", layouts[0], (6,), x_fn=lambda x: torch.cat([x, x], -1)[:, ::2])
    yield make("permuted 3-d", first, (3, 2), x_fn=lambda x: x.transpose(0, 1))
    yield make("broadcast x", first, (1,), x_fn=lambda x: x.expand(4, x.shape[-1]))
    yield make("more rows", layouts[-1], (37,))


def numel(shape):
    return math.prod(shape)
