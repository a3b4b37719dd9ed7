"""Train a small CNN on Fashion-MNIST with dense, CP and Tucker convolutions.

What it shows: ``factorch.nn.FactorizedConv2d`` is a drop-in for
``nn.Conv2d`` that trains from a random initialisation like any other module
(each layer's forward and backward run as one fused C op). The script builds
the same CNN three times -- with ``nn.Conv2d``, with CP convolutions (1x1
C_in->R, depthwise kh x 1, depthwise 1 x kw, 1x1 R->C_out) and with Tucker-2
convolutions (1x1 C_in->R_in, kh x kw R_in->R_out, 1x1 R_out->C_out) -- trains
each with the same data, order, optimiser and seed, and prints test accuracy,
parameter counts and training time side by side.

    28x28x1 -> conv 1->32 3x3 (always dense: one input channel) -> pool
            -> conv 32->64 3x3 -> pool -> conv 64->128 3x3 stride 2
            -> conv 128->128 3x3 -> global average pool -> linear 128->10
    (every conv: no bias, then BatchNorm and ReLU)

The three convolutions after the first are factorized with ``rank=1/C`` (C =
``--compression``, default 4), the fraction of each dense kernel's parameters
the factors may hold, so the convolutions keep about C times fewer parameters
(the table shows the ranks the layers chose: CP R, Tucker (R_in, R_out)).

With ``--compress`` the trained dense CNN is then compressed after training,
without fine-tuning, by ``factorch.compress`` on the same three convolutions
(``targets``: convs 2-4), at each ``--compress-ratios`` fraction of their
parameters: CP and Tucker-2 from the kernels alone (``method="svd"``), and
low-rank with SVD-LLM (``method="svd-llm"``, a few training batches as
calibration), the same ratio in every conv or ranks allocated across them.
A second table gives test accuracy, parameters, compression time and
forward speed (ms per batch of 256 test images, interleaved rounds, medians)
before and after.

Data: Fashion-MNIST as Debian's ``dataset-fashion-mnist`` package ships it
(the original IDX files, gzipped), read here with numpy. ``make fashion-mnist``
fetches the package with ``apt-get download`` (no root) and unpacks the files
into ``.data/fashion-mnist/``; a system-wide install
(``/usr/share/datasets/fashion-mnist``) is used as well.

Run (from the repository root; 2-4 minutes on 2 CPU cores, 10 s with --quick):

    make fashion-mnist
    .venv/bin/python examples/train_fashion_mnist.py
    .venv/bin/python examples/train_fashion_mnist.py --quick          # smoke test, < 30 s
    .venv/bin/python examples/train_fashion_mnist.py --epochs 5 --compression 8 --write results.md
    .venv/bin/python examples/train_fashion_mnist.py --only dense --compress   # + 1-2 minutes
"""

from __future__ import annotations

import argparse
import copy
import gzip
import math
import shlex
import statistics
import struct
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import factorch
from factorch.nn import FactorizedConv2d

ROOT = Path(__file__).resolve().parent.parent
DATA_DIRS = [ROOT / ".data" / "fashion-mnist", Path("/usr/share/datasets/fashion-mnist")]
FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
VARIANTS = [("dense", "nn.Conv2d"), ("cp", "CP"), ("tucker", "Tucker-2")]
QUICK = {"epochs": 1, "limit": 5000, "test_limit": 1000}
#: --compress's defaults, and with --quick.
COMPRESS_DEFAULTS = {"compress_ratios": [0.5, 0.25], "calib_batches": 4, "rounds": 7}
COMPRESS_QUICK = {"compress_ratios": [0.5], "calib_batches": 2, "rounds": 3}
#: compress's variants: (factorization, method, allocation).
COMPRESSED = [("cp", "svd", "uniform"), ("tucker", "svd", "uniform"),
              ("lowrank", "svd-llm", "uniform"), ("lowrank", "svd-llm", "global")]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=2, help="training epochs (default 2)")
    p.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (default 2e-3)")
    p.add_argument("--compression", type=float, default=4.0,
                   help="dense / factorized parameters of each factorized conv (default 4)")
    p.add_argument("--limit", type=int, default=None,
                   help="train on the first N training images (default: all 60000)")
    p.add_argument("--test-limit", type=int, default=None,
                   help="test on the first N test images (default: all 10000)")
    p.add_argument("--only", choices=[v for v, _ in VARIANTS], action="append",
                   help="variants to run (repeatable; default: all three)")
    p.add_argument("--seed", type=int, default=0, help="seed of init and data order (default 0)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="folder with the four *-ubyte.gz files (default: .data/fashion-mnist, "
                        "then /usr/share/datasets/fashion-mnist)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: {QUICK['epochs']} epoch on {QUICK['limit']} training and "
                        f"{QUICK['test_limit']} test images (< 30 s)")
    p.add_argument("--write", metavar="FILE.md",
                   help="also write the table into this markdown file (its own section)")
    p.add_argument("--compress", action="store_true",
                   help="then compress the trained dense CNN with factorch.compress (CP, "
                        "Tucker, SVD-LLM low-rank) and compare accuracy, parameters and speed")
    p.add_argument("--compress-ratios", type=float, nargs="+", default=None, metavar="R",
                   help="fractions of convs 2-4's parameters kept (default 0.5 0.25; "
                        "--quick: 0.5)")
    p.add_argument("--calib-batches", type=int, default=None,
                   help="training batches read by SVD-LLM's calibration (default 4; --quick: 2)")
    p.add_argument("--rounds", type=int, default=None,
                   help="speed rounds with --compress (default 7; --quick: 3)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; on a small shared machine 1 can "
                        "be faster)")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs = QUICK["epochs"]
        args.limit = args.limit or QUICK["limit"]
        args.test_limit = args.test_limit or QUICK["test_limit"]
    for name, v in (COMPRESS_QUICK if args.quick else COMPRESS_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, v)
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    if args.epochs < 1:
        p.error("--epochs must be >= 1")
    if args.batch < 1:
        p.error("--batch must be >= 1")
    if args.compression <= 1:
        p.error("--compression must be > 1")
    for name in ("limit", "test_limit"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.compress:
        if args.only and "dense" not in args.only:
            p.error("--compress compresses the trained dense CNN: add --only dense")
        if not all(0 < r <= 1 for r in args.compress_ratios):
            p.error("--compress-ratios must be in (0, 1]")
        if args.calib_batches < 1 or args.rounds < 1:
            p.error("--calib-batches and --rounds must be >= 1")
    return args


# ----------------------------------------------------------------------------
# Data: IDX files (http://yann.lecun.com/exdb/mnist/, "FILE FORMATS")
# ----------------------------------------------------------------------------
def read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (gzipped or not) as a uint8 array.

    Layout: two zero bytes, a type code (0x08 = unsigned byte), the number of
    dimensions d, then d big-endian uint32 sizes, then the data, row-major.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        buf = f.read()
    if len(buf) < 4 or buf[:2] != b"\0\0" or buf[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (header {buf[:4]!r})")
    ndim = buf[3]
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", buf[4:header])
    data = np.frombuffer(buf, dtype=np.uint8, offset=header)
    if data.size != math.prod(dims):
        raise ValueError(f"{path}: expected {math.prod(dims)} values for shape {dims}, "
                         f"found {data.size} (truncated or corrupt file)")
    return data.reshape(dims)


def find_file(name: str, data_dir: Path | None) -> Path:
    dirs = [data_dir] if data_dir is not None else DATA_DIRS
    for d in dirs:
        for candidate in (d / f"{name}.gz", d / name):
            if candidate.is_file():
                return candidate
    where = " or ".join(str(d) for d in dirs)
    sys.exit(
        f"error: Fashion-MNIST file {name}.gz not found in {where}.\n"
        f"Fetch it (from the repository root) with:\n\n"
        f"    make fashion-mnist\n\n"
        f"which runs `apt-get download dataset-fashion-mnist` and unpacks the files into "
        f".data/fashion-mnist/ (no root needed), or install the package system-wide with "
        f"`sudo apt-get install dataset-fashion-mnist`."
    )


def load_fashion_mnist(data_dir: Path | None):
    """(x_train [60000, 1, 28, 28] float32, y_train int64, x_test, y_test),
    pixels scaled to [0, 1] then standardised with the training set's mean
    and standard deviation."""
    arrays = {k: read_idx(find_file(v, data_dir)) for k, v in FILES.items()}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.ndim != 3 or x.shape[1:] != (28, 28) or y.shape != (x.shape[0],):
            raise ValueError(f"{split}: unexpected shapes images {x.shape}, labels {y.shape}")
        if y.max() >= len(CLASSES):
            raise ValueError(f"{split}: label {y.max()} out of range")
    x_tr = torch.from_numpy(arrays["train_x"].astype(np.float32) / 255.0).unsqueeze(1)
    x_te = torch.from_numpy(arrays["test_x"].astype(np.float32) / 255.0).unsqueeze(1)
    mean, std = x_tr.mean(), x_tr.std()
    y_tr = torch.from_numpy(arrays["train_y"].astype(np.int64))
    y_te = torch.from_numpy(arrays["test_y"].astype(np.int64))
    return (x_tr - mean) / std, y_tr, (x_te - mean) / std, y_te


# ----------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------
def make_cnn(factorization: str, compression: float) -> nn.Sequential:
    """The CNN above; convolutions 2-4 are nn.Conv2d for "dense", else
    FactorizedConv2d keeping 1/compression of each dense kernel's parameters."""

    def conv(cin: int, cout: int, stride: int = 1) -> nn.Module:
        if factorization == "dense":
            return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        return FactorizedConv2d(cin, cout, 3, factorization=factorization, rank=1 / compression,
                                stride=stride, padding=1, bias=False)

    def block(layer: nn.Module, cout: int) -> list[nn.Module]:
        return [layer, nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(nn.Conv2d(1, 32, 3, padding=1, bias=False), 32), nn.MaxPool2d(2),  # 28 -> 14
        *block(conv(32, 64), 64), nn.MaxPool2d(2),                                 # 14 -> 7
        *block(conv(64, 128, stride=2), 128),                                      # 7 -> 4
        *block(conv(128, 128), 128),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, len(CLASSES)),
    )


def conv_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, FactorizedConv2d))]


def count(modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def describe_ranks(model: nn.Module) -> str:
    """The ranks of the factorized convolutions, as the layers report them."""
    ranks = [m.rank for m in conv_layers(model) if isinstance(m, FactorizedConv2d)]
    return " / ".join(str(r).replace(" ", "") for r in ranks) or "-"


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------
def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, args) -> tuple[float, float]:
    """Adam + cosine schedule; returns (seconds, mean loss of the last epoch)."""
    g = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    steps = args.epochs * math.ceil(len(x) / args.batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    t0 = time.perf_counter()
    for _ in range(args.epochs):
        order = torch.randperm(len(x), generator=g)
        total, seen = 0.0, 0
        for i in range(0, len(x), args.batch):
            idx = order[i:i + args.batch]
            loss = loss_fn(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            seen += len(idx)
    return time.perf_counter() - t0, total / seen


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = sum((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item()
                  for i in range(0, len(x), batch))
    return correct / len(x)


@torch.inference_mode()
def forward_ms(models: dict, run, rounds: int) -> dict:
    """Median milliseconds of ``run(model)`` for each model: one warm-up call
    each, then ``rounds`` rounds that time every model once, in turns (a
    slow spell of a shared machine then hits them all alike)."""
    for m in models.values():
        m.eval()
        run(m)
    times = {k: [] for k in models}
    for _ in range(rounds):
        for k, m in models.items():
            t0 = time.perf_counter()
            run(m)
            times[k].append(time.perf_counter() - t0)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def run(factorization: str, label: str, data, args) -> dict:
    x_tr, y_tr, x_te, y_te = data
    torch.manual_seed(args.seed)  # the same init stream for every variant
    model = make_cnn(factorization, args.compression)
    seconds, loss = train(model, x_tr, y_tr, args)
    t0 = time.perf_counter()
    acc = accuracy(model, x_te, y_te)
    return {
        "model": model,
        "variant": label,
        "ranks": describe_ranks(model),
        "conv_params": count(conv_layers(model)),
        "params": count([model]),
        "time_s": seconds,
        "test_s": time.perf_counter() - t0,
        "train_loss": loss,
        "test_acc": acc,
    }


# ----------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------
HEADER = ["convolutions", "ranks (conv 2 / 3 / 4)", "conv params", "total params",
          "train time", "test time", "last-epoch loss", "test acc"]


def table_rows(rows: list[dict]) -> list[list[str]]:
    dense_conv = next((r["conv_params"] for r in rows if r["variant"] == "nn.Conv2d"), None)
    out = []
    for r in rows:
        fewer = f" ({dense_conv / r['conv_params']:.1f}x fewer)" \
            if dense_conv and r["variant"] != "nn.Conv2d" else ""
        out.append([r["variant"], r["ranks"], f"{r['conv_params']:,}{fewer}", f"{r['params']:,}",
                    f"{r['time_s']:.1f} s", f"{r['test_s']:.1f} s", f"{r['train_loss']:.4f}",
                    f"{r['test_acc']:.2%}"])
    return out


def print_table(rows: list[list[str]], header: list[str] = HEADER, left: int = 2) -> None:
    """The rows under the header, the first `left` columns left-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) if i < left else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    print(line(header))
    print("-" * len(line(header)))
    for r in rows:
        print(line(r))


def write_markdown(path: str, command: str, setup: str, rows: list[list[str]],
                   title: str = "Fashion-MNIST CNN: dense vs CP vs Tucker convolutions",
                   header: list[str] = HEADER) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from harness import markdown_table, write_section  # the helper the benchmarks use

    if not Path(path).exists():
        Path(path).write_text("# Example results\n\nEach section says how it was produced.\n",
                              encoding="utf-8")
    body = f"Command: `{command}`\n\n{setup}\n\n" + markdown_table(header, rows)
    write_section(path, title, body)
    print(f"\nwrote its section of {path}")


# ----------------------------------------------------------------------------
# --compress: the trained dense CNN through factorch.compress
# ----------------------------------------------------------------------------
COMPRESS_HEADER = ["model", "ratio", "ranks (conv 2 / 3 / 4)", "conv params", "total params",
                   "compress time", "test acc", "ms / 256", "vs dense"]


def compress_section(dense: nn.Module, data, args) -> tuple[str, list[list[str]]]:
    """Compresses copies of the trained dense CNN; returns (setup, table rows)."""
    x_tr, _, x_te, y_te = data
    dense.eval()
    targets = [n for n, m in dense.named_modules()
               if isinstance(m, nn.Conv2d) and m.in_channels > 1]  # convs 2-4
    g = torch.Generator().manual_seed(args.seed + 1)
    pick = torch.randperm(len(x_tr), generator=g)[:args.calib_batches * args.batch]
    calib = [x_tr[pick[i:i + args.batch]] for i in range(0, len(pick), args.batch)]
    setup = (f"The dense CNN above after training, compressed without fine-tuning by "
             f"factorch.compress(targets={targets}: convs 2-4); SVD-LLM calibrated on {len(pick)} "
             f"training images; speed: forward of 256 test images, {args.rounds} interleaved "
             f"rounds, medians, {torch.get_num_threads()} CPU threads.")
    print("\n" + setup)
    results = [{"label": "dense (trained)", "ratio": "-", "model": dense, "seconds": None,
                "acc": accuracy(dense, x_te, y_te)}]
    for ratio in args.compress_ratios:
        for factorization, method, allocation in COMPRESSED:
            model = copy.deepcopy(dense)
            t0 = time.perf_counter()
            factorch.compress(model, ratio=ratio, method=method, factorization=factorization,
                              allocation=allocation, targets=targets,
                              calibration=calib if method != "svd" else None, progress=False)
            seconds = time.perf_counter() - t0
            label = f"{factorization} {method}" + (f" {allocation}" if method != "svd" else "")
            results.append({"label": label, "ratio": f"{ratio:g}", "model": model,
                            "seconds": seconds, "acc": accuracy(model, x_te, y_te)})
            print(f"  ratio {ratio:g} {label}: test accuracy {results[-1]['acc']:.2%} "
                  f"({seconds:.1f} s)", flush=True)
    x256 = x_te[:256]
    speed = forward_ms({i: r["model"] for i, r in enumerate(results)}, lambda m: m(x256),
                       args.rounds)
    base_ms, base_conv = speed[0], count(conv_layers(dense))
    rows = []
    for i, r in enumerate(results):
        m = r["model"]
        conv = count(conv_layers(m))
        ranks = "-" if i == 0 else " / ".join(
            "dense" if isinstance(m.get_submodule(t), nn.Conv2d)
            else str(m.get_submodule(t).rank).replace(" ", "") for t in targets)
        fewer = f" ({base_conv / conv:.1f}x fewer)" if i else ""
        rows.append([r["label"], r["ratio"], ranks, f"{conv:,}{fewer}", f"{count([m]):,}",
                     "-" if r["seconds"] is None else f"{r['seconds']:.1f} s", f"{r['acc']:.2%}",
                     f"{speed[i]:.1f}", f"{base_ms / speed[i]:.2f}x"])
    return setup, rows


def main(argv=None) -> int:
    args = parse_args(argv)
    raw = sys.argv[1:] if argv is None else argv
    command = shlex.join([".venv/bin/python", "examples/train_fashion_mnist.py", *raw])
    print(f"reproduce: {command}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"factorch {factorch.__version__}, torch {torch.__version__}; "
          f"{torch.get_num_threads()} torch CPU threads (factorch's kernels run in torch's pool)")

    t0 = time.perf_counter()
    x_tr, y_tr, x_te, y_te = load_fashion_mnist(args.data_dir)
    x_tr, y_tr = x_tr[:args.limit], y_tr[:args.limit]
    x_te, y_te = x_te[:args.test_limit], y_te[:args.test_limit]
    print(f"Fashion-MNIST: {len(x_tr)} train / {len(x_te)} test images, 10 classes "
          f"(loaded in {time.perf_counter() - t0:.1f} s)")
    setup = (f"CNN 1->32 (dense), 32->64, 64->128 /2, 128->128 3x3 convs + BN + ReLU, linear head; "
             f"convs 2-4 factorized with rank = 1/{args.compression:g} of their dense parameters. "
             f"{len(x_tr)} train / {len(x_te)} test images, {args.epochs} epoch(s), batch "
             f"{args.batch}, Adam lr {args.lr:g} cosine, seed {args.seed}; "
             f"{torch.get_num_threads()} CPU threads.")
    print(setup + "\n")

    wanted = args.only or [v for v, _ in VARIANTS]
    results = []
    for factorization, label in VARIANTS:
        if factorization in wanted:
            results.append(run(factorization, label, (x_tr, y_tr, x_te, y_te), args))
            r = results[-1]
            print(f"  {label}: test accuracy {r['test_acc']:.2%} after {r['time_s']:.1f} s",
                  flush=True)
    print()
    rows = table_rows(results)
    print_table(rows)
    if args.write:
        write_markdown(args.write, command, setup, rows)
    if args.compress:
        dense = next(r["model"] for r in results if r["variant"] == "nn.Conv2d")
        csetup, crows = compress_section(dense, (x_tr, y_tr, x_te, y_te), args)
        print()
        print_table(crows, COMPRESS_HEADER, left=3)
        if args.write:
            write_markdown(args.write, command, csetup, crows, header=COMPRESS_HEADER,
                           title="Fashion-MNIST CNN: the trained dense CNN compressed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
