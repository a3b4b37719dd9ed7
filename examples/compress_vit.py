"""Compress a small vision transformer trained on Fashion-MNIST (the V of VLMs).

A ViT built from a transformers config (no weights to download) --
28x28x1 images cut into 4x4 patches (49 tokens + CLS), hidden 64, 4 blocks of
4-head attention and a 128-wide MLP, about 139k parameters -- is trained on
the CPU for a fixed budget (default: 700 steps of 64 images, 0.75 of an
epoch, about 80 s on one thread of a busy 2-core machine, about 80% test
accuracy), then compressed with one call per variant:

    factorch.compress(model, ratio=0.8, method="svd-llm",
                      calibration=[{"pixel_values": x} for x in a_few_training_batches],
                      targets=TARGETS, allocation="global")

TARGETS names the patch-embedding convolution
(``vit.embeddings.patch_embeddings.projection``, a 4x4 stride-4 nn.Conv2d
that becomes a low-rank FactorizedConv2d: a 4x4 conv to R channels, then a
1x1 to 64) and every linear of the encoder blocks (q/k/v/o projections,
fc1, fc2). It has to be passed: compress's default targets are the linears
inside repeated blocks only, which leaves the patch embedding out. The
classifier head (64 -> 10) is left dense. With ``allocation="global"`` a
layer can stay dense when that costs the least output error for the budget
(the patch conv, 1,024 weights, usually does).

For each ratio the table compares plain SVD, SVD-LLM with the same ratio in
every layer, and SVD-LLM with ranks allocated across layers: test accuracy,
parameters, compression time and forward speed (ms per batch of 256 test
images, every model timed once per round in turns, medians of the rounds).

Data: ``make fashion-mnist`` (the loader is examples/train_fashion_mnist.py's).

    .venv/bin/python examples/compress_vit.py                 # 2-3 minutes
    .venv/bin/python examples/compress_vit.py --quick         # smoke test, < 40 s
    .venv/bin/python examples/compress_vit.py --ratios 0.9 0.7 0.5 --steps 1500
"""

from __future__ import annotations

import argparse
import copy
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import factorch
from factorch.nn import FactorizedConv2d

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_fashion_mnist import forward_ms, load_fashion_mnist  # noqa: E402

#: The patch-embedding conv and every linear of the encoder blocks (a regex
#: over module names: ``vit.layers.N.`` in transformers 5,
#: ``vit.encoder.layer.N.`` before).
TARGETS = r"vit\.embeddings\.patch_embeddings\.projection|vit\.(layers|encoder\.layer)\.\d+\..+"
QUICK = {"steps": 120, "test_limit": 1000, "calib_batches": 2, "rounds": 3}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.8, 0.6],
                   help="fractions of the targeted weights kept (default 0.8 0.6)")
    p.add_argument("--steps", type=int, default=700,
                   help="training steps (the budget; default 700, 0.75 epoch)")
    p.add_argument("--batch", type=int, default=64, help="training batch (default 64)")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate")
    p.add_argument("--hidden", type=int, default=64, help="ViT hidden size (default 64)")
    p.add_argument("--layers", type=int, default=4, help="encoder blocks (default 4)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    p.add_argument("--mlp", type=int, default=128, help="MLP width (default 128)")
    p.add_argument("--calib-batches", type=int, default=4,
                   help="batches of 128 training images read by the calibration (default 4)")
    p.add_argument("--test-limit", type=int, default=None,
                   help="test on the first N test images (default: all 10000)")
    p.add_argument("--rounds", type=int, default=7, help="speed rounds (default 7)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a small shared machine one thread "
                        "trains a model this size faster than two and times it steadier)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", type=Path, default=None,
                   help="folder with the four *-ubyte.gz files")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: {QUICK['steps']} steps, {QUICK['test_limit']} test images, "
                        f"{QUICK['calib_batches']} calibration batches, {QUICK['rounds']} rounds")
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.calib_batches, a.rounds = QUICK["steps"], QUICK["calib_batches"], QUICK["rounds"]
        a.test_limit = a.test_limit or QUICK["test_limit"]
    for name in ("steps", "batch", "calib_batches", "rounds", "threads"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not all(0 < r <= 1 for r in a.ratios):
        p.error("--ratios must be in (0, 1]")
    return a


def make_vit(a) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=28, patch_size=4, num_channels=1, hidden_size=a.hidden,
                    num_hidden_layers=a.layers, num_attention_heads=a.heads,
                    intermediate_size=a.mlp, num_labels=10,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(a.seed)
    return ViTForImageClassification(cfg)


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=x).logits


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, a) -> tuple[float, float]:
    """AdamW, 5% linear warm-up then cosine; returns (seconds, mean loss of
    the last 50 steps)."""
    g = torch.Generator().manual_seed(a.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.05)
    warm = max(1, a.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, max(0, s - warm) / max(1, a.steps - warm)))))
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    order = torch.randperm(len(x), generator=g)
    losses = []
    t0 = time.perf_counter()
    for step in range(a.steps):
        i = (step * a.batch) % len(x)
        if i + a.batch > len(x):
            order, i = torch.randperm(len(x), generator=g), 0
        idx = order[i:i + a.batch]
        loss = loss_fn(logits(model, x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return time.perf_counter() - t0, statistics.fmean(losses[-50:])


@torch.inference_mode()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    model.eval()
    hits = sum((logits(model, x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item()
               for i in range(0, len(x), batch))
    return hits / len(x)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main(argv=None) -> int:
    a = parse_args(argv)
    raw = sys.argv[1:] if argv is None else argv
    print("reproduce:", shlex.join([".venv/bin/python", "examples/compress_vit.py", *raw]))
    torch.set_num_threads(a.threads)
    import transformers

    print(f"factorch {factorch.__version__}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}; {torch.get_num_threads()} torch CPU thread(s)")
    t = time.perf_counter()
    x_tr, y_tr, x_te, y_te = load_fashion_mnist(a.data_dir)
    x_te, y_te = x_te[:a.test_limit], y_te[:a.test_limit]
    print(f"Fashion-MNIST: {len(x_tr)} train / {len(x_te)} test images "
          f"(loaded in {time.perf_counter() - t:.1f} s)")

    dense = make_vit(a)
    print(f"ViT: 28x28x1, patch 4 (49 tokens + CLS), hidden {a.hidden}, {a.layers} blocks, "
          f"{a.heads} heads, MLP {a.mlp}: {n_params(dense):,} parameters")
    seconds, loss = train(dense, x_tr, y_tr, a)
    acc = accuracy(dense, x_te, y_te)
    print(f"training budget: {a.steps} steps x {a.batch} images "
          f"({a.steps * a.batch / len(x_tr):.2f} epoch), AdamW lr {a.lr:g} cosine: "
          f"{seconds:.0f} s, last loss {loss:.3f}, test accuracy {acc:.2%}")

    # Calibration: a few batches of training images, as the model's keyword inputs.
    g = torch.Generator().manual_seed(a.seed + 1)
    pick = torch.randperm(len(x_tr), generator=g)[:a.calib_batches * 128]
    calib = [{"pixel_values": x_tr[pick[i:i + 128]]} for i in range(0, len(pick), 128)]
    chosen = factorch.compression.select_targets(dense, TARGETS)
    print(f"targets ({len(chosen)} layers): {chosen[0][0]} (the patch conv, named explicitly) "
          f"and the {len(chosen) - 1} linears of the encoder blocks; calibration "
          f"{len(pick)} training images")

    rows = [{"name": "dense", "method": "-", "allocation": "-", "ratio": None, "acc": acc,
             "params": n_params(dense), "kept": 1.0, "seconds": 0.0, "model": dense}]
    shown = False
    for ratio in a.ratios:
        for method, allocation in (("svd", "uniform"), ("svd-llm", "uniform"),
                                   ("svd-llm", "global")):
            model = copy.deepcopy(dense)
            t = time.perf_counter()
            report = factorch.compress(model, ratio=ratio, method=method,
                                       calibration=calib if method != "svd" else None,
                                       targets=TARGETS, allocation=allocation, progress=False)
            took = time.perf_counter() - t
            conv = model.vit.embeddings.patch_embeddings.projection
            assert isinstance(conv, FactorizedConv2d) or allocation == "global", type(conv)
            if method == "svd-llm" and allocation == "global" and not shown:
                print(f"\nper-layer report, {method} {allocation} at ratio {ratio}:")
                print(report.table())
                shown = True
            rows.append({"name": f"{method} {allocation}", "method": method,
                         "allocation": allocation, "ratio": ratio,
                         "acc": accuracy(model, x_te, y_te), "params": n_params(model),
                         "kept": report.kept, "seconds": took, "model": model,
                         "patch_rank": getattr(conv, "rank", None)})
            print(f"  ratio {ratio} {method} {allocation}: test accuracy {rows[-1]['acc']:.2%} "
                  f"({took:.1f} s)", flush=True)

    x_speed = x_te[:256]
    speed = forward_ms({i: r["model"] for i, r in enumerate(rows)},
                       lambda m: logits(m, x_speed), a.rounds)
    print(f"\nViT on Fashion-MNIST, {len(x_te)} test images; speed: ms per forward of 256 "
          f"images, {a.rounds} interleaved rounds, medians ({torch.get_num_threads()} thread(s))")
    head = ["model", "ratio", "test acc", "params", "targets kept", "patch conv rank",
            "compress s", "ms / 256", "vs dense"]
    base = speed[0]
    table = []
    for i, r in enumerate(rows):
        rank = r.get("patch_rank")
        table.append([
            r["name"], "-" if r["ratio"] is None else f"{r['ratio']:g}", f"{r['acc']:.2%}",
            f"{r['params']:,}", f"{r['kept']:.3f}",
            "-" if r["ratio"] is None else ("dense" if rank is None else str(rank)),
            "-" if r["ratio"] is None else f"{r['seconds']:.1f}", f"{speed[i]:.1f}",
            f"{base / speed[i]:.2f}x"])
    widths = [max(len(h), *(len(t[j]) for t in table)) for j, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) if j == 0 else c.rjust(w)  # noqa: E731
                                  for j, (c, w) in enumerate(zip(cells, widths)))
    print(fmt(head))
    print("  ".join("-" * w for w in widths))
    for t in table:
        print(fmt(t))
    return 0


if __name__ == "__main__":
    sys.exit(main())
