"""Whole-model compression: one call replaces a model's layers by factorch
layers, choosing ranks from calibration activations.

    report = factorch.compress(model, ratio=0.8, method="svd-llm",
                               calibration=batches, allocation="global")
    print(report.table())

Methods (``method=``):
    "svd"      truncated SVD of the weight alone (no calibration needed).
    "asvd"     input channels scaled by ``mean|x|^alpha`` before the SVD (ASVD).
    "svd-llm"  truncation-aware whitening (SVD-LLM): SVD of ``W·L`` with
               ``L Lᵀ = XᵀX / N`` accumulated in float64, so that truncating
               it minimises the layer's output error on the calibration data.

Allocation (``allocation=``):
    "uniform"  every targeted layer keeps ``ratio`` of its parameters.
    "global"   ranks chosen across all targeted layers under the same total
               parameter budget, greedily from the singular value spectra
               already computed (no search by repeated evaluation), to
               minimise the sum of the layers' (whitened) truncation errors,
               each weighted by the layer's loss sensitivity (the mean squared
               gradient of the loss with respect to its output, from one
               backward pass over a few calibration batches:
               :func:`layer_sensitivities`); without calibration, the sum of
               relative errors. A layer that would not save parameters stays
               dense.

Only low-rank layers can be built activation-aware (``factorization=
"lowrank"``); "cp", "tucker" and "tt" are built from the weight alone
(``method="svd"``, ``allocation="uniform"``) by the layers' ``from_*``.
"""

from __future__ import annotations

import heapq
import inspect
import math
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Iterable

import torch
from torch import Tensor, nn

from . import _activation as A
from . import factorizations as FZ
from ._rank import lowrank_rank_for_ratio
from .nn import FactorizedConv1d, FactorizedConv2d, FactorizedEmbedding, FactorizedLinear

METHODS = ("svd", "asvd", "svd-llm")
ALLOCATIONS = ("uniform", "global")
FACTORIZATIONS = tuple(FZ.REGISTRY)
_COMPRESSIBLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------
@dataclass
class LayerReport:
    """One targeted layer: what it became and what it cost."""

    name: str
    kind: str  # "Linear", "Conv2d", ...
    shape: tuple  # the weight's shape
    factorization: str  # "lowrank", ..., or "dense" (kept)
    method: str  # the method actually applied
    rank: object  # int, a tuple for tensorized layers, or None when kept dense
    params_before: int  # the weight's parameters (bias excluded: it is kept)
    params_after: int
    weight_error: float  # ‖W − Ŵ‖ / ‖W‖
    output_error: float | None  # ‖(W − Ŵ)X‖ / ‖WX‖ on the calibration data
    seconds: float  # decomposition and layer construction
    note: str = ""


@dataclass
class CompressionReport:
    """What :func:`compress` did, per layer and in total."""

    method: str
    allocation: str
    factorization: str
    ratio: float
    layers: list = field(default_factory=list)
    model_params_before: int = 0
    model_params_after: int = 0
    calibration_seconds: float = 0.0
    decomposition_seconds: float = 0.0
    peak_statistics_bytes: int = 0  # the largest amount of statistics held at once
    #: What weighted the layers' errors in a global allocation: "loss" (the
    #: model's loss gradient), "output" (its output's Jacobian), "relative".
    sensitivity: str = ""
    sensitivity_seconds: float = 0.0

    @property
    def params_before(self) -> int:
        """Parameters of the targeted weights before."""
        return sum(lr.params_before for lr in self.layers)

    @property
    def params_after(self) -> int:
        return sum(lr.params_after for lr in self.layers)

    @property
    def kept(self) -> float:
        """Fraction of the targeted weights' parameters kept."""
        return self.params_after / self.params_before if self.params_before else 1.0

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "layers"}
        d.update(params_before=self.params_before, params_after=self.params_after,
                 kept=self.kept, layers=[asdict(lr) for lr in self.layers])
        for lr in d["layers"]:
            lr["shape"] = list(lr["shape"])
        return d

    def table(self, max_rows: int | None = None) -> str:
        """The per-layer report as a text table, with totals."""
        head = ("layer", "shape", "rank", "params", "kept", "w.err", "out.err", "s")
        rows = []
        for lr in self.layers[: max_rows or len(self.layers)]:
            rows.append((
                lr.name, "x".join(map(str, lr.shape)),
                "dense" if lr.rank is None else str(lr.rank),
                f"{lr.params_before:,}", f"{lr.params_after / lr.params_before:.2f}",
                f"{lr.weight_error:.3f}",
                "-" if lr.output_error is None else f"{lr.output_error:.3f}",
                f"{lr.seconds:.2f}",
            ))
        if max_rows and len(self.layers) > max_rows:
            rows.append((f"... {len(self.layers) - max_rows} more", *[""] * 7))
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(r, widths)))
        lines = [fmt(head), "  ".join("-" * w for w in widths), *map(fmt, rows)]
        lines.append(
            f"{len(self.layers)} layers, method={self.method}, allocation={self.allocation}: "
            f"{self.params_before:,} -> {self.params_after:,} weight parameters "
            f"({self.kept:.3f} kept); model {self.model_params_before:,} -> "
            f"{self.model_params_after:,}; calibration {self.calibration_seconds:.1f} s, "
            f"decomposition {self.decomposition_seconds:.1f} s"
            + (f", sensitivities ({self.sensitivity}) {self.sensitivity_seconds:.1f} s"
               if self.sensitivity else "")
        )
        notes = [f"  {lr.name}: {lr.note}" for lr in self.layers if lr.note]
        if notes:
            lines += ["notes:", *notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def to_json(self, path) -> None:
        import json
        from pathlib import Path

        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    def to_csv(self, path) -> None:
        import csv

        cols = [f for f in LayerReport.__dataclass_fields__]
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            for lr in self.layers:
                row = asdict(lr)
                row["shape"] = "x".join(map(str, lr.shape))
                w.writerow(row)

    @classmethod
    def from_dict(cls, d: dict) -> "CompressionReport":
        layers = [LayerReport(**{**lr, "shape": tuple(lr["shape"])}) for lr in d["layers"]]
        keep = {k: v for k, v in d.items() if k in cls.__dataclass_fields__ and k != "layers"}
        return cls(**keep, layers=layers)

    def plot(self, path) -> None:
        """A PNG of per-layer kept fraction and errors (needs matplotlib)."""
        from ._plot import plot_report

        plot_report(self, path)


# --------------------------------------------------------------------------
# Which modules
# --------------------------------------------------------------------------
def _repeated_blocks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Containers of repeated blocks (the transformer layers): ModuleLists and
    Sequentials with at least two children, all of one class."""
    found = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) >= 2:
            kinds = {type(c) for c in m}
            if len(kinds) == 1 and not issubclass(next(iter(kinds)), _COMPRESSIBLE):
                found.append((name, m))
    return found


def _matches(name: str, patterns) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _check_patterns(arg: str, patterns) -> None:
    if patterns is None or isinstance(patterns, str):
        if isinstance(patterns, str):
            try:
                re.compile(patterns)
            except re.error as e:
                raise ValueError(f"{arg}: not a valid regular expression: {e}") from None
        return
    if not isinstance(patterns, (list, tuple, set)) or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{arg}: expected a regex string or a list of name suffixes, "
                        f"got {patterns!r}")


def select_targets(model: nn.Module, targets=None, exclude=None) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs :func:`compress` would replace.

    ``targets``: a regex matched against the whole module name (as PEFT's
    ``target_modules`` string), or a list of name suffixes (``["q_proj",
    "mlp.down_proj"]``). Default: every nn.Linear, nn.Conv1d and nn.Conv2d
    inside the model's repeated blocks (the transformer layers); a model
    without repeated blocks: every nn.Linear and nn.Conv. Embeddings and the
    LM head are only taken when ``targets`` names them. ``exclude``: same
    forms, removes matches."""
    _check_patterns("targets", targets)
    _check_patterns("exclude", exclude)
    out = []
    if targets is None:
        blocks = _repeated_blocks(model)
        kinds = (nn.Linear, nn.Conv1d, nn.Conv2d)
        for name, m in model.named_modules():
            if not isinstance(m, kinds) or isinstance(m, _FACTORCH_LAYERS):
                continue
            inside = any(name.startswith(b + ".") for b, _ in blocks) if blocks else True
            if inside:
                out.append((name, m))
    else:
        for name, m in model.named_modules():
            if isinstance(m, _COMPRESSIBLE) and _matches(name, targets):
                out.append((name, m))
    if exclude is not None:
        out = [(n, m) for n, m in out if not _matches(n, exclude)]
    return out


_FACTORCH_LAYERS = (FactorizedLinear, FactorizedConv1d, FactorizedConv2d, FactorizedEmbedding)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _weight_params(m: nn.Module) -> int:
    return m.weight.numel()


# --------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------
def _run(model: nn.Module, batch, **extra):
    """model(**batch), model(*batch) or model(batch); `extra` keywords go
    with a dict batch only."""
    if isinstance(batch, dict):
        return model(**batch, **extra)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _to_device(batch, device):
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


class _StopForward(Exception):
    """Raised by a hook to end a calibration forward early."""


class _Collector:
    """Forward pre-hooks that accumulate each target's input statistics.

    Layers fed the very same tensor one after the other (q/k/v projections,
    gate/up) share one statistics object: the first batch decides which do,
    and later batches must agree."""

    def __init__(self, modules: dict[str, nn.Module], second_moment: bool):
        self.stats: dict[str, A.InputStats] = {}
        self.shared_with: dict[str, str] = {}
        self._second = second_moment
        self._last = (None, None)  # (name, input tensor) of the last hooked call
        self._first_batch = True
        self._handles = [m.register_forward_pre_hook(self._hook(n, m)) for n, m in modules.items()]

    def _hook(self, name, module):
        def hook(mod, args):
            x = args[0]
            last_name, last_x = self._last
            self._last = (name, x)
            if self._first_batch and name not in self.stats and name not in self.shared_with:
                if last_x is x and last_name is not None:
                    self.shared_with[name] = self.shared_with.get(last_name, last_name)
                    return
            if name in self.shared_with:
                if x is not last_x:
                    raise RuntimeError(
                        f"calibration: {name} read the same input as "
                        f"{self.shared_with[name]} in the first batch but not later")
                return
            rows = A.layer_rows(mod, x)
            st = self.stats.get(name)
            if st is None:
                st = self.stats[name] = A.InputStats(rows.shape[1], self._second, rows.device)
            st.add(rows)
        return hook

    def end_batch(self) -> None:
        self._first_batch = False
        self._last = (None, None)

    def of(self, name: str) -> A.InputStats | None:
        return self.stats.get(self.shared_with.get(name, name))

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.stats.values())

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._last = (None, None)


def _progress(it, progress: bool, desc: str, total=None):
    """`it` behind a tqdm bar when asked for and tqdm is installed."""
    if not progress:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return it
    return tqdm(it, desc=desc, total=total, leave=False)


def _last_block_needed(model, modules) -> nn.Module | None:
    """The last repeated block holding one of `modules`, when all of them
    are inside the blocks: the forward can stop after it (an LM head over a
    49k vocabulary costs a fifth of a small LLM's forward)."""
    for bname, blocks in _repeated_blocks(model):
        idx = []
        for n in modules:
            if not n.startswith(bname + "."):
                break
            head = n[len(bname) + 1:].split(".", 1)[0]
            if not head.isdigit():
                break
            idx.append(int(head))
        else:
            if idx:
                return blocks[max(idx)]
    return None


def _collect(model, modules, batches, second_moment, progress, desc="calibration"):
    device = next(model.parameters()).device
    col = _Collector(modules, second_moment)
    last = _last_block_needed(model, modules)

    def stop(mod, args, out):
        raise _StopForward

    handle = last.register_forward_hook(stop) if last is not None else None
    try:
        with torch.no_grad():
            for batch in _progress(batches, progress, desc, total=_len(batches)):
                try:
                    _run(model, _to_device(batch, device))
                except _StopForward:
                    pass
                col.end_batch()
    finally:
        col.remove()
        if handle is not None:
            handle.remove()
    return col


def _len(x):
    try:
        return len(x)
    except TypeError:
        return None


# --------------------------------------------------------------------------
# Rank allocation
# --------------------------------------------------------------------------
@dataclass
class _Candidate:
    name: str
    module: nn.Module
    out: int  # rows of the weight matrix
    features: int  # columns
    spectrum: A.Spectrum | None = None
    stats: A.InputStats | None = None
    rank: int | None = None  # None: keep dense

    @property
    def dense(self) -> int:
        return self.out * self.features

    @property
    def per_rank(self) -> int:
        return self.out + self.features

    @property
    def cap(self) -> int:
        """The largest rank that still saves parameters."""
        r = (self.dense - 1) // self.per_rank
        return max(0, min(r, self.out, self.features))


def allocate_global(cands: list[_Candidate], budget: int,
                    weights: dict[str, float] | None = None) -> None:
    """Sets each candidate's rank (None: dense) so that the parameters stay
    within ``budget`` and ``Σ_l w_l · tail_l(r_l)`` is greedily minimised,
    where ``tail_l(r)`` is the squared (whitened) truncation error of layer
    l at rank r: repeatedly grant the step (one more rank, or the switch to
    dense once the cap is reached) that removes the most weighted error per
    parameter and still fits.

    ``weights`` (name -> w_l): each layer's loss sensitivity (see
    :func:`layer_sensitivities`); None: ``w_l = 1 / tail_l(0)``, the sum of
    relative errors. A layer missing from ``weights`` (no statistics) counts
    its relative error at the median scale of the others."""
    heap = []
    used = 0
    for i, c in enumerate(cands):
        if c.cap < 1:
            c.rank = None
            used += c.dense
            continue
        c.rank = 1
        used += c.per_rank
    if used > budget:
        raise ValueError(
            f"ratio: too small for these layers: rank 1 everywhere already needs {used:,} "
            f"parameters, the budget is {budget:,}")
    tails = {}

    def push(i):
        c = cands[i]
        t = tails[i]
        if weights is None:
            total = float(t[0]) or 1.0
        else:
            w = weights.get(c.name, 0.0)
            total = 1.0 / w if w > 0 else math.inf
        if c.rank < c.cap:
            gain, cost = float(t[c.rank] - t[c.rank + 1]) / total, c.per_rank
        else:
            gain, cost = float(t[c.cap]) / total, c.dense - c.cap * c.per_rank
        heapq.heappush(heap, (-gain / cost, i, cost))

    for i, c in enumerate(cands):
        if c.rank is not None:
            tails[i] = c.spectrum.tail()
    if weights is not None:
        scaled = sorted(weights[c.name] * float(tails[i][0]) for i, c in enumerate(cands)
                        if i in tails and c.name in weights)
        typical = scaled[len(scaled) // 2] if scaled else 1.0
        weights = dict(weights)
        for i, c in enumerate(cands):
            if i in tails and c.name not in weights:
                weights[c.name] = typical / (float(tails[i][0]) or 1.0)
    for i in tails:
        push(i)
    while heap:
        _, i, cost = heapq.heappop(heap)
        if used + cost > budget:
            continue  # this layer's next steps cost as much or more: it is done
        c = cands[i]
        used += cost
        if c.rank < c.cap:
            c.rank += 1
            push(i)
        else:
            c.rank = None


def _loss_of(model, batch, seed: int):
    """(loss, what) for the sensitivity pass: the model's own loss when it
    computes one from ``labels`` (a Hugging Face causal LM given its input
    ids), otherwise a random projection ``uᵀ y`` of its output y (u standard
    normal, so that E‖∂(uᵀy)/∂h‖² is the squared Frobenius norm of the
    output's Jacobian in h: Hutchinson's estimator)."""
    if isinstance(batch, dict) and "input_ids" in batch and "labels" not in batch and \
            "labels" in inspect.signature(model.forward).parameters:
        out = model(**batch, labels=batch["input_ids"])
        loss = getattr(out, "loss", None)
        if isinstance(loss, Tensor) and loss.requires_grad:
            return loss, "loss"
    else:
        out = _run(model, batch)
    y = out
    if not isinstance(y, Tensor):
        y = getattr(out, "logits", None)
        if y is None:
            y = getattr(out, "last_hidden_state", None)
        if y is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
            y = out[0]
    if not isinstance(y, Tensor) or not y.is_floating_point():
        raise ValueError("allocation='global': cannot find the model's output tensor to "
                         "measure layer sensitivities (give a model whose forward returns a "
                         "tensor, or .logits / .last_hidden_state)")
    g = torch.Generator(device="cpu").manual_seed(seed)
    u = torch.randn(y.shape, generator=g, dtype=torch.float32).to(y.device, y.dtype)
    return (y * u).sum(), "output"


def layer_sensitivities(model: nn.Module, modules: dict[str, nn.Module], batches,
                        n_batches: int = 2) -> tuple[dict[str, float], str]:
    """Each layer's loss sensitivity ``w_l = E_t ‖∂L/∂y_t‖² / out_l``: the
    mean squared gradient of the loss with respect to the layer's output per
    token and output unit, from one backward pass over ``n_batches``
    calibration batches (no weight gradients). Under an isotropic Fisher
    approximation, truncating layer l so that its outputs change by
    ``Δy_t`` raises the loss by about ``½ w_l Σ_t ‖Δy_t‖²``, which makes
    whitened truncation errors of different layers comparable.

    The loss is the model's own (``labels=input_ids``) when it has one,
    otherwise a random projection of its output. Returns (weights, which)."""
    device = next(model.parameters()).device
    sums = {n: 0.0 for n in modules}
    rows = {n: 0 for n in modules}
    outs: dict[str, Tensor] = {}
    flags = [(p, p.requires_grad) for p in model.parameters()]

    def pre(mod, args):  # a leaf where no gradient flows yet: no weight gradients needed
        x = args[0]
        if isinstance(x, Tensor) and x.is_floating_point() and not x.requires_grad:
            return (x.detach().requires_grad_(True), *args[1:])
        return None

    def post(name):
        def hook(mod, args, out):
            outs[name] = out
        return hook

    handles = []
    for n, m in modules.items():
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post(n)))
    which = "output"
    was_training = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        with torch.enable_grad():
            for k, batch in enumerate(batches):
                if k >= n_batches:
                    break
                outs.clear()
                loss, which = _loss_of(model, _to_device(batch, device), seed=k)
                names = [n for n in modules if n in outs and outs[n].requires_grad]
                grads = torch.autograd.grad(loss, [outs[n] for n in names], allow_unused=True)
                for n, g in zip(names, grads):
                    if g is None:
                        continue
                    sums[n] += float(g.detach().double().square().sum())
                    rows[n] += g.numel() // g.shape[-1 if isinstance(modules[n], nn.Linear)
                                                      else 1]
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
        outs.clear()
    weights = {}
    for n, m in modules.items():
        out_units = m.weight.shape[0]
        weights[n] = sums[n] / rows[n] / out_units if rows[n] else 0.0
    return weights, which


# --------------------------------------------------------------------------
# Building the layers
# --------------------------------------------------------------------------
def _lowrank_layer(module: nn.Module, U: Tensor, V: Tensor) -> nn.Module:
    """A low-rank factorch layer replacing `module` (a linear or a
    convolution, groups=1) with the factors U [out, r], V [r, features]."""
    W = module.weight
    kw = dict(device=W.device, dtype=W.dtype)
    r = U.shape[1]
    if isinstance(module, nn.Linear):
        layer = FactorizedLinear(module.in_features, module.out_features, "lowrank", rank=r,
                                 bias=module.bias is not None, **kw)
    else:
        cls = FactorizedConv1d if isinstance(module, nn.Conv1d) else FactorizedConv2d
        layer = cls(module.in_channels, module.out_channels, module.kernel_size, "lowrank",
                    rank=r, stride=module.stride, padding=module.padding,
                    dilation=module.dilation, groups=module.groups,
                    bias=module.bias is not None, padding_mode=module.padding_mode, **kw)
    with torch.no_grad():  # U and V are views of the layer's one flat parameter
        layer.U.copy_(U)
        layer.V.copy_(V)
        if module.bias is not None:
            layer.bias.copy_(module.bias)
    return layer


def _plain_layer(module: nn.Module, factorization: str, ratio: float) -> nn.Module:
    if isinstance(module, nn.Linear):
        return FactorizedLinear.from_linear(module, factorization, ratio=ratio)
    if isinstance(module, nn.Conv1d):
        return FactorizedConv1d.from_conv(module, factorization, ratio=ratio)
    if isinstance(module, nn.Conv2d):
        return FactorizedConv2d.from_conv(module, factorization, ratio=ratio)
    if factorization not in ("lowrank", "tt"):
        raise ValueError(f"factorization: {factorization!r} is not defined for embeddings "
                         "(lowrank or tt); exclude them or pick another factorization")
    return FactorizedEmbedding.from_embedding(module, factorization, ratio=ratio)


def _layer_weight_params(layer: nn.Module) -> int:
    return sum(p.numel() for n, p in layer.named_parameters() if n != "bias")


def _kind(m: nn.Module) -> str:
    return type(m).__name__


def _activation_aware(module: nn.Module, method: str) -> bool:
    """Whether `module` gets `method`'s statistics: linears, and convolutions
    whose patches F.unfold can form (groups=1, zero padding given as ints);
    the others are factorized from the weight alone, and the report says so."""
    if method == "svd":
        return False
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return (module.groups == 1 and module.padding_mode == "zeros"
                and not isinstance(module.padding, str))
    return False


def _whitening(c: _Candidate, method: str, alpha: float) -> A.Whitening:
    if c.stats is None:
        return A.Whitening(None, lambda Qh: Qh)
    if method == "svd-llm":
        return A.cholesky_whitening(c.stats.second_moment())
    return A.asvd_scaling(c.stats.mean_abs(), alpha)


def _finish(c: _Candidate, method: str, report: CompressionReport, model: nn.Module,
            t0: float, note: str = "") -> None:
    """Builds c's layer at c.rank, replaces the module, records it."""
    W = A.matrix_of(c.module)
    C = c.stats.second_moment() if (c.stats is not None and c.stats.xtx is not None) else None
    kind = _kind(c.module)
    note = "; ".join(n for n in (note, c.spectrum.whitening.note if c.spectrum else "") if n)
    if c.rank is None:
        report.layers.append(LayerReport(
            c.name, kind, tuple(c.module.weight.shape), "dense", method, None, c.dense, c.dense,
            0.0, 0.0 if C is not None else None, time.perf_counter() - t0,
            note))
        return
    U, V = c.spectrum.factors(c.rank)
    layer = _lowrank_layer(c.module, U, V)
    W_hat = U @ V
    werr = float(torch.linalg.matrix_norm(W - W_hat) / torch.linalg.matrix_norm(W).clamp_min(1e-300))
    layer.reconstruction_error = werr
    _set_module(model, c.name, layer)
    report.layers.append(LayerReport(
        c.name, kind, tuple(c.module.weight.shape), "lowrank", method, c.rank, c.dense,
        _layer_weight_params(layer), werr, A.output_error(W, W_hat, C) if C is not None else None,
        time.perf_counter() - t0, note))


def _check_args(model, ratio, method, calibration, factorization, allocation, alpha):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"ratio: expected a fraction in (0, 1], got {ratio!r}")
    if method not in METHODS:
        raise ValueError(f"method: expected one of {list(METHODS)}, got {method!r}")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation: expected one of {list(ALLOCATIONS)}, got {allocation!r}")
    if not FZ.get(factorization).activation_aware and (method != "svd"
                                                       or allocation != "uniform"):
        raise ValueError(
            f"factorization={factorization!r}: only method='svd' with allocation='uniform' "
            "(activation-aware methods and global allocation build low-rank layers)")
    if method != "svd" and calibration is None:
        raise ValueError(f"calibration: method={method!r} needs calibration batches "
                         "(see factorch.data.text_batches), or use method='svd'")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 2:
        raise ValueError(f"alpha: expected a number in [0, 2], got {alpha!r}")


def compress(
    model: nn.Module,
    ratio: float = 0.8,
    method: str = "svd-llm",
    calibration: Iterable | None = None,
    targets=None,
    exclude=None,
    factorization: str = "lowrank",
    allocation: str = "uniform",
    sequential: bool = False,
    progress: bool = True,
    alpha: float = 0.5,
    sensitivity_batches: int = 2,
) -> CompressionReport:
    """Replaces the targeted layers of ``model`` in place by factorch layers
    keeping ``ratio`` of their parameters, and returns a
    :class:`CompressionReport`.

    Args:
        model: any nn.Module (a transformers model, a CNN, ...), on any device.
        ratio: the fraction of the targeted weights' parameters kept, in
            (0, 1] (0.8: 20% fewer).
        method: "svd", "asvd" or "svd-llm" (module docstring).
        calibration: an iterable of model inputs: tensors (``model(x)``),
            tuples (``model(*t)``) or dicts (``model(**d)``), e.g. from
            :func:`factorch.data.text_batches`. Read once (twice with
            ``sequential`` and global allocation).
        targets, exclude: see :func:`select_targets`.
        factorization: "lowrank" (any method), or "cp" / "tucker" / "tt"
            (method "svd", uniform).
        allocation: "uniform" or "global" (module docstring).
        sequential: calibrate block by block: each repeated block's
            statistics are collected on the outputs of the blocks before it
            as already compressed (their error propagates into what the next
            is fitted to), holding one block's statistics at a time.
        progress: tqdm progress bars (when tqdm is installed).
        alpha: ASVD's exponent.
        sensitivity_batches: global allocation with calibration: how many
            calibration batches the sensitivity pass reads
            (:func:`layer_sensitivities`: one backward pass, no weight
            gradients); 0 weighs every layer's relative error alike instead.
    """
    _check_args(model, ratio, method, calibration, factorization, allocation, alpha)
    if isinstance(sensitivity_batches, bool) or not isinstance(sensitivity_batches, int) or \
            sensitivity_batches < 0:
        raise ValueError(f"sensitivity_batches: expected an int >= 0, got {sensitivity_batches!r}")
    chosen = select_targets(model, targets, exclude)
    if not chosen:
        raise ValueError("targets: no module of the model matched (nothing to compress)")
    report = CompressionReport(method, allocation, factorization, float(ratio))
    report.model_params_before = sum(p.numel() for p in model.parameters())
    aware = {n: m for n, m in chosen if _activation_aware(m, method)}
    # The calibration forwards see the model as inference does: in eval mode
    # no BatchNorm running statistics are updated (a CNN handed over in
    # training mode was changed by them) and dropout adds no noise. Every
    # module's mode is put back after, a replacing layer taking the mode of
    # the module it replaces.
    modes = {n: m.training for n, m in model.named_modules()}
    model.eval()
    try:
        weights = None
        if allocation == "global":
            report.sensitivity = "relative"
            if aware and sensitivity_batches > 0:
                t = time.perf_counter()
                if not isinstance(calibration, (list, tuple)):
                    calibration = list(calibration)  # read more than once
                weights, report.sensitivity = layer_sensitivities(model, aware, calibration,
                                                                  sensitivity_batches)
                report.sensitivity_seconds = time.perf_counter() - t
        if sequential and aware:
            _compress_sequential(model, chosen, aware, report, ratio, method, calibration,
                                 allocation, progress, alpha, weights)
        else:
            stats = None
            if aware:
                t = time.perf_counter()
                col = _collect(model, aware, calibration, method == "svd-llm", progress)
                report.calibration_seconds = time.perf_counter() - t
                report.peak_statistics_bytes = col.nbytes
                stats = col
            _compress_layers(model, chosen, stats, report, ratio, method, factorization,
                             allocation, progress, alpha, weights=weights)
    finally:
        for n, m in model.named_modules():
            if n in modes:
                m.training = modes[n]
    report.model_params_after = sum(p.numel() for p in model.parameters())
    return report


def _candidates(chosen, stats, method):
    cands = []
    for name, m in chosen:
        if isinstance(m, nn.Embedding):
            continue
        W = m.weight
        c = _Candidate(name, m, W.shape[0], W[0].numel())
        if stats is not None and _activation_aware(m, method):
            c.stats = stats.of(name)
            if c.stats is None:
                raise RuntimeError(f"calibration: {name} saw no input (is it used in the "
                                   "model's forward?)")
        cands.append(c)
    return cands


def _each_on_all_cores(fn, items, progress, desc) -> None:
    """fn(item) for every item, one item per core at a time: the
    decompositions of a model's many small layers are single-threaded LAPACK
    calls (OpenBLAS's threads only join the long ones), so they run side by
    side in threads (ctypes and torch release the GIL), with torch's own
    pool at one thread meanwhile so that the cores are not oversubscribed."""
    workers = max(1, min(torch.get_num_threads(), len(items)))
    if workers == 1:
        for it in _progress(items, progress, desc):
            fn(it)
        return
    from concurrent.futures import ThreadPoolExecutor

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as ex:
            for _ in _progress(ex.map(fn, items), progress, desc, total=len(items)):
                pass
    finally:
        torch.set_num_threads(before)


def _compress_layers(model, chosen, stats, report, ratio, method, factorization, allocation,
                     progress, alpha, ranks=None, spectra=None, weights=None):
    """Decomposes and replaces `chosen` (statistics in `stats`). `ranks`
    (name -> rank or None) overrides the allocation; `spectra` (name ->
    Spectrum), when given, is read and filled instead of decomposing again
    (the benchmark compares allocations on one set of decompositions)."""
    t_all = time.perf_counter()
    if not FZ.get(factorization).activation_aware:  # the weight alone, through from_*
        for name, m in _progress(chosen, progress, "decomposition"):
            t0 = time.perf_counter()
            layer = _plain_layer(m, factorization, ratio)
            _set_module(model, name, layer)
            err = float(layer.reconstruction_error)
            report.layers.append(LayerReport(
                name, _kind(m), tuple(m.weight.shape), factorization, "svd",
                getattr(layer, "rank", None), _weight_params(m), _layer_weight_params(layer),
                err, None, time.perf_counter() - t0))
        report.decomposition_seconds += time.perf_counter() - t_all
        return
    cands = _candidates(chosen, stats, method)
    spent = {}
    # One whitening per statistics object: q/k/v (gate/up) share theirs.
    whitenings = {}
    for c in cands:
        if id(c.stats) not in whitenings and not (spectra is not None and c.name in spectra):
            whitenings[id(c.stats)] = _whitening(c, method, alpha)

    def decompose(c):
        t0 = time.perf_counter()
        if spectra is not None and c.name in spectra:
            c.spectrum = spectra[c.name]
        else:
            c.spectrum = A.spectrum(A.matrix_of(c.module), whitenings[id(c.stats)])
        spent[c.name] = time.perf_counter() - t0

    _each_on_all_cores(decompose, cands, progress, "decomposition")
    if spectra is not None:
        spectra.update((c.name, c.spectrum) for c in cands)
    if ranks is not None:
        for c in cands:
            c.rank = ranks[c.name]
    elif allocation == "global":
        budget = math.floor(ratio * sum(c.dense for c in cands))
        allocate_global(cands, budget, weights)
    else:
        for c in cands:
            r = lowrank_rank_for_ratio(c.features, c.out, ratio)
            c.rank = r if r <= c.cap else None
    for c in cands:
        plain = method != "svd" and c.stats is None
        _finish(c, "svd" if plain else method, report, model,
                time.perf_counter() - spent[c.name],
                "weight-only SVD: no patch statistics for this convolution" if plain else "")
        c.spectrum = None  # free the SVD as soon as the layer is built
    for name, m in chosen:  # embeddings: weight-only, uniform
        if isinstance(m, nn.Embedding):
            t0 = time.perf_counter()
            layer = _plain_layer(m, "lowrank", ratio)
            _set_module(model, name, layer)
            report.layers.append(LayerReport(
                name, "Embedding", tuple(m.weight.shape), "lowrank", "svd", layer.rank,
                _weight_params(m), _layer_weight_params(layer), float(layer.reconstruction_error),
                None, time.perf_counter() - t0, "embedding: weight-only SVD at the uniform ratio"))
    report.decomposition_seconds += time.perf_counter() - t_all


# --------------------------------------------------------------------------
# Sequential (block by block) calibration
# --------------------------------------------------------------------------
def _blocks_of(model, aware) -> tuple[str, nn.Module]:
    for name, blocks in _repeated_blocks(model):
        if any(n.startswith(name + ".") for n in aware):
            return name, blocks
    raise ValueError("sequential: the targeted layers are not inside repeated blocks "
                     "(a ModuleList of transformer layers); use sequential=False")


def _capture_block_inputs(model, first_block, batches, progress):
    """Runs the model up to its first block on every batch and keeps that
    block's (args, kwargs)."""
    captured = []

    def hook(mod, args, kwargs):
        captured.append((args, kwargs))
        raise _StopForward

    h = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    extra = {}
    if "use_cache" in inspect.signature(model.forward).parameters:
        extra["use_cache"] = False
    try:
        with torch.no_grad():
            for batch in _progress(batches, progress, "block inputs", total=_len(batches)):
                batch = _to_device(batch, device)
                try:
                    _run(model, batch, **extra)
                except _StopForward:
                    pass
    finally:
        h.remove()
    if not captured:
        raise ValueError("calibration: no batch reached the model's first block")
    return captured


def _with_hidden(args, kwargs, hidden):
    """A block's (args, kwargs) with its hidden-state input replaced: the
    first positional argument, or `hidden_states` when passed by name."""
    if args:
        return (hidden, *args[1:]), kwargs
    if "hidden_states" in kwargs:
        return (), {**kwargs, "hidden_states": hidden}
    raise ValueError("sequential: cannot tell which argument of the block is its hidden state "
                     "(neither a positional argument nor `hidden_states`)")


def _block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _compress_sequential(model, chosen, aware, report, ratio, method, calibration, allocation,
                         progress, alpha, weights=None):
    batches = list(calibration)
    ranks = None
    if allocation == "global":  # the budget is shared: spectra of the whole model first
        probe = _collect(model, aware, batches, method == "svd-llm", progress, "allocation")
        cands = _candidates([(n, m) for n, m in chosen if n in aware], probe, method)
        def decompose(c):
            c.spectrum = A.spectrum(A.matrix_of(c.module), _whitening(c, method, alpha))

        _each_on_all_cores(decompose, cands, progress, "spectra")
        budget = math.floor(ratio * sum(c.dense for c in cands))
        allocate_global(cands, budget, weights)
        ranks = {c.name: c.rank for c in cands}
        report.peak_statistics_bytes = probe.nbytes
        del probe, cands
    t = time.perf_counter()
    bname, blocks = _blocks_of(model, aware)
    inputs = _capture_block_inputs(model, blocks[0], batches, progress)
    report.calibration_seconds += time.perf_counter() - t
    done = set()
    for i, block in enumerate(_progress(list(blocks), progress, "blocks")):
        prefix = f"{bname}.{i}."
        mine = {n: m for n, m in aware.items() if n.startswith(prefix)}
        t = time.perf_counter()
        col = _Collector(mine, method == "svd-llm") if mine else None
        try:
            with torch.no_grad():
                for args, kwargs in inputs:
                    block(*args, **kwargs)
                    if col:
                        col.end_batch()
        finally:
            if col:
                col.remove()
        report.calibration_seconds += time.perf_counter() - t
        if col:
            report.peak_statistics_bytes = max(report.peak_statistics_bytes, col.nbytes)
            sub = [(n, m) for n, m in chosen if n in mine]
            _compress_layers(model, sub, col, report, ratio, method, "lowrank", allocation,
                             False, alpha, ranks)
            done.update(mine)
            del col
        t = time.perf_counter()
        with torch.no_grad():  # the next block reads this one's compressed outputs
            inputs = [_with_hidden(args, kwargs, _block_output(block(*args, **kwargs)))
                      for args, kwargs in inputs]
        report.calibration_seconds += time.perf_counter() - t
    rest = [(n, m) for n, m in chosen if n not in done]
    if rest:  # outside the blocks: on the compressed model's activations, one pass
        aware_rest = {n: m for n, m in rest if n in aware}
        stats = _collect(model, aware_rest, batches, method == "svd-llm", progress) \
            if aware_rest else None
        _compress_layers(model, rest, stats, report, ratio, method, "lowrank", allocation,
                         progress, alpha, ranks)
