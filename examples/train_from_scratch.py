"""Train an MLP whose hidden layers are ``FactorizedLinear`` from scratch.

What it shows: a factorized layer is a drop-in for ``nn.Linear`` that trains
from a random initialisation like any other module (its forward and backward
run as factorch's fused C ops). The script builds the same MLP twice -- once
with ``nn.Linear`` hidden layers, once with ``FactorizedLinear(rank=R)`` ones
(the 20-way output head stays dense in both) -- trains both with the same
optimiser, data and seed, and prints parameters, training time, final train
loss and test accuracy side by side.

The task is synthetic and generated here (no downloads): points of a 6-d
Gaussian latent space are labelled by radial shell x angular sector (20
classes), then mapped into 256 dimensions by a fixed random tanh embedding
plus noise, so the classes lie on a curved 6-d manifold in 256-d space with
nonlinear boundaries; chance is 5 %. A linear classifier trained the same
way is printed as a reference for how far a nonlinear model has to go.

Run (from the repository root; about 5-10 s on 2 CPU cores):

    .venv/bin/python examples/train_from_scratch.py
    .venv/bin/python examples/train_from_scratch.py --epochs 30 --rank 16 --seed 1
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

import torch
from torch import nn

import factorch
from factorch.nn import FactorizedLinear

IN_DIM = 256
LATENT_DIM = 6
NUM_CLASSES = 20
EMBED_WIDTH = 64
HIDDEN = 512
N_TRAIN = 8000
N_TEST = 2000
BATCH = 128


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=20, help="training epochs (default 20)")
    p.add_argument("--rank", type=int, default=32,
                   help="rank of every FactorizedLinear hidden layer (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of data, init and order (default 0)")
    args = p.parse_args()
    if args.epochs < 1:
        p.error("--epochs must be >= 1")
    if not 1 <= args.rank <= min(IN_DIM, HIDDEN):
        p.error(f"--rank must be in [1, {min(IN_DIM, HIDDEN)}]")
    return args


def reproduce_command(args: argparse.Namespace) -> str:
    argv = ["python", sys.argv[0], "--epochs", str(args.epochs),
            "--rank", str(args.rank), "--seed", str(args.seed)]
    return shlex.join(argv)


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------
def make_dataset(seed: int):
    """(x_train, y_train, x_test, y_test).

    Latent z ~ N(0, I_6). The label combines the shell of |z| (4 radial
    bins at the quartiles) with the sector of the angle of (z_0, z_1)
    (5 equal sectors): 20 roughly balanced classes whose boundaries are
    spheres and half-planes in latent space. z is embedded into 256-d as
    tanh(z·A1)·A2 + noise; tanh is odd, so x is an odd function of z while
    the shell is an even one: no linear read-out of x recovers it.
    """
    g = torch.Generator().manual_seed(seed)
    n = N_TRAIN + N_TEST
    z = torch.randn(n, LATENT_DIM, generator=g)
    radius = z.norm(dim=1)
    shell = torch.bucketize(radius, torch.quantile(radius, torch.tensor([0.25, 0.5, 0.75])))
    angle = torch.atan2(z[:, 1], z[:, 0])
    sector = ((angle + torch.pi) / (2 * torch.pi) * 5).long().clamp(max=4)
    y = shell * 5 + sector

    a1 = torch.randn(LATENT_DIM, EMBED_WIDTH, generator=g) / LATENT_DIM ** 0.5
    a2 = torch.randn(EMBED_WIDTH, IN_DIM, generator=g) / EMBED_WIDTH ** 0.5
    x = torch.tanh(z @ a1) @ a2 + 0.1 * torch.randn(n, IN_DIM, generator=g)
    x = (x - x.mean(0)) / x.std(0)
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


# ----------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------
def make_linear_probe() -> nn.Module:
    return nn.Linear(IN_DIM, NUM_CLASSES)


def make_mlp(rank: int | None) -> nn.Sequential:
    """256 -> 512 -> 512 -> 20. Hidden layers dense when ``rank`` is None,
    else ``FactorizedLinear`` of that rank; the head is dense in both."""

    def hidden(i: int, o: int) -> nn.Module:
        return nn.Linear(i, o) if rank is None else FactorizedLinear(i, o, rank=rank)

    return nn.Sequential(
        hidden(IN_DIM, HIDDEN), nn.GELU(),
        hidden(HIDDEN, HIDDEN), nn.GELU(),
        nn.Linear(HIDDEN, NUM_CLASSES),
    )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------
def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int):
    """Adam + cosine schedule; returns (seconds, mean loss of the last epoch)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    steps = epochs * ((len(x) + BATCH - 1) // BATCH)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    t0 = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        total, seen = 0.0, 0
        for i in range(0, len(x), BATCH):
            idx = order[i:i + BATCH]
            loss = loss_fn(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            seen += len(idx)
    return time.perf_counter() - t0, total / seen


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(dim=1) == y).float().mean().item()


def run(name: str, build, data, args) -> dict:
    x_tr, y_tr, x_te, y_te = data
    torch.manual_seed(args.seed)  # same init stream for every model
    model = build()
    seconds, loss = train(model, x_tr, y_tr, args.epochs, args.seed)
    return {
        "model": name,
        "params": count_parameters(model),
        "time_s": seconds,
        "train_loss": loss,
        "train_acc": accuracy(model, x_tr, y_tr),
        "test_acc": accuracy(model, x_te, y_te),
    }


# ----------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------
def print_table(rows: list[dict]) -> None:
    header = f"{'model':<33} {'params':>9} {'train time':>11} {'train loss':>11} " \
             f"{'train acc':>10} {'test acc':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['model']:<33} {r['params']:>9,} {r['time_s']:>10.2f}s "
              f"{r['train_loss']:>11.4f} {r['train_acc']:>9.1%} {r['test_acc']:>9.1%}")


def main() -> int:
    args = parse_args()
    print(f"reproduce: {reproduce_command(args)}")
    print(f"factorch {factorch.__version__}, torch {torch.__version__}; "
          f"{torch.get_num_threads()} torch CPU threads (factorch's kernels run in torch's pool)")
    data = make_dataset(args.seed)
    print(f"task: {NUM_CLASSES} classes, {IN_DIM}-d inputs on a {LATENT_DIM}-d nonlinear "
          f"manifold; {N_TRAIN} train / {N_TEST} test points; chance = {1 / NUM_CLASSES:.1%}")
    print(f"MLP {IN_DIM}->{HIDDEN}->{HIDDEN}->{NUM_CLASSES} (GELU), {args.epochs} epochs, "
          f"batch {BATCH}, Adam lr 2e-3 cosine\n")

    rows = [
        run("MLP, dense (nn.Linear)", lambda: make_mlp(None), data, args),
        run(f"MLP, factorized (rank {args.rank})", lambda: make_mlp(args.rank), data, args),
        run("linear classifier (reference)", make_linear_probe, data, args),
    ]
    print_table(rows)

    dense, fact, probe = rows
    hidden_dense = IN_DIM * HIDDEN + HIDDEN * HIDDEN
    hidden_fact = args.rank * (IN_DIM + HIDDEN) + args.rank * (HIDDEN + HIDDEN)
    print(f"\nhidden-layer weights: {hidden_dense:,} dense vs {hidden_fact:,} factorized "
          f"({hidden_dense / hidden_fact:.1f}x fewer); whole model "
          f"{dense['params'] / fact['params']:.1f}x fewer parameters")
    print(f"test accuracy: factorized {fact['test_acc']:.1%} vs dense {dense['test_acc']:.1%} "
          f"(linear classifier {probe['test_acc']:.1%}, chance {1 / NUM_CLASSES:.1%})")

    chance = 1 / NUM_CLASSES
    if fact["test_acc"] < 5 * chance:
        print("WARNING: the factorized model did not learn well above chance")
    return 0


if __name__ == "__main__":
    sys.exit(main())
