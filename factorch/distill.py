"""Recovery after compression: knowledge distillation of a compressed
student from its dense teacher.

    history = factorch.distill(student, teacher, batches, steps=200, lr=1e-4,
                               trainable="factors")

The teacher runs in eval mode under ``torch.no_grad()``; the student learns
to match the teacher's next-token distributions (token-level KL between
temperature-softened logits, scaled by T², masked by ``attention_mask``),
optionally mixed with the plain next-token loss on the text itself and an
MSE between the hidden states of matching blocks. Only the chosen
parameters train (AdamW); every ``requires_grad`` flag and every module's
train/eval mode is put back afterwards.
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from .nn import FactorizedConv1d, FactorizedConv2d, FactorizedEmbedding, FactorizedLinear

TRAINABLE = ("factors", "lora", "all")
LOSSES = ("kl", "ce", "kl+ce")
SCHEDULES = ("cosine", "constant")
_FACTORCH_LAYERS = (FactorizedLinear, FactorizedConv1d, FactorizedConv2d, FactorizedEmbedding)


@dataclass
class DistillHistory:
    """What a :func:`distill` run did, one entry per optimizer step.

    ``loss`` is the objective minimised (the mean over the step's
    ``grad_accum`` micro-batches); ``kl``, ``ce`` and ``hidden`` are its
    parts (``kl`` is T²·KL(teacher ‖ student) per token; ``ce`` is the
    next-token cross-entropy, measured even when it is not trained on;
    ``hidden`` the mean over blocks of the hidden-state MSE, 0 when unused).
    ``grad_norm`` is the gradient norm before clipping."""

    trainable: str
    loss_kind: str
    n_trainable: int = 0
    tokens_per_step: int = 0
    loss: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    ce: list[float] = field(default_factory=list)
    hidden: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def steps(self) -> int:
        return len(self.loss)

    def summary(self) -> str:
        """A few lines on the loss curve: first, last, the means of the
        first and last tenth of the steps, the minimum."""
        n = self.steps
        if n == 0:
            return "no steps run"
        k = max(1, n // 10)

        def mean(v):
            return sum(v) / len(v)

        lines = [
            f"{n} steps, {self.n_trainable:,} trainable parameters ({self.trainable}), "
            f"{self.tokens_per_step:,} tokens per step, {self.seconds:.1f} s",
            f"loss ({self.loss_kind}): first {self.loss[0]:.4f}, last {self.loss[-1]:.4f}; "
            f"mean of the first {k} steps {mean(self.loss[:k]):.4f}, of the last {k} "
            f"{mean(self.loss[-k:]):.4f}; min {min(self.loss):.4f}",
        ]
        parts = []
        for name in ("kl", "ce", "hidden"):
            v = getattr(self, name)
            if not all(math.isnan(x) for x in v) and any(x != 0 for x in v):
                parts.append(f"{name} {mean(v[:k]):.4f} -> {mean(v[-k:]):.4f}")
        lines.append("parts (first tenth -> last tenth): " + ", ".join(parts))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"trainable": self.trainable, "loss_kind": self.loss_kind,
                "n_trainable": self.n_trainable, "tokens_per_step": self.tokens_per_step,
                "steps": self.steps, "seconds": self.seconds, "loss": self.loss, "kl": self.kl,
                "ce": self.ce, "hidden": self.hidden, "grad_norm": self.grad_norm, "lr": self.lr}


# --------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------
def _pos_int(name, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name}: expected a positive int, got {v!r}")
    return v


def _number(name, v, lo=0.0, open_lo=False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (
            v <= lo if open_lo else v < lo):
        rel = ">" if open_lo else ">="
        raise ValueError(f"{name}: expected a finite number {rel} {lo}, got {v!r}")
    return float(v)


def _choice(name, v, choices) -> str:
    if v not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {v!r}")
    return v


def _check_batches(batches) -> list[dict]:
    if isinstance(batches, (Tensor, dict)):
        batches = [batches]
    try:
        batches = list(batches)
    except TypeError:
        raise TypeError(f"batches: expected a list of dicts with 'input_ids' (what "
                        f"factorch.data.text_batches returns), got {type(batches).__name__}")
    if not batches:
        raise ValueError("batches: expected at least one batch, got none")
    out = []
    for i, b in enumerate(batches):
        if isinstance(b, Tensor):
            b = {"input_ids": b}
        if not isinstance(b, dict) or not isinstance(b.get("input_ids"), Tensor):
            raise TypeError(f"batches[{i}]: expected a dict with an 'input_ids' tensor "
                            f"[batch, seq] (or such a tensor), got {type(b).__name__}")
        ids = b["input_ids"]
        if ids.dim() != 2 or ids.shape[1] < 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"batches[{i}]: expected input_ids of shape [batch, seq >= 2] and "
                             f"an integer dtype, got {list(ids.shape)} {ids.dtype}")
        out.append(b)
    return out


def trainable_parameters(model: nn.Module, trainable: str) -> dict[str, nn.Parameter]:
    """The parameters ``distill(..., trainable=...)`` trains, by name:
    ``"factors"``: those of factorch layers (U, V, flat factors/cores, their
    biases; adapters inside them excluded); ``"lora"``: those whose name
    contains ``lora_``; ``"all"``: every floating-point parameter."""
    _choice("trainable", trainable, TRAINABLE)
    named = dict(model.named_parameters())  # tied parameters once
    if trainable == "all":
        chosen = {n: p for n, p in named.items() if p.is_floating_point()}
    elif trainable == "lora":
        chosen = {n: p for n, p in named.items() if "lora_" in n}
        if not chosen:
            raise ValueError("trainable='lora': the student has no LoRA adapter parameters "
                             "(no parameter name contains 'lora_'); call "
                             "factorch.lora.add_lora(student, r=...) first")
    else:
        ids = set()
        for m in model.modules():
            if isinstance(m, _FACTORCH_LAYERS):
                ids.update(id(p) for n, p in m.named_parameters() if "lora_" not in n)
        chosen = {n: p for n, p in named.items() if id(p) in ids}
        if not chosen:
            raise ValueError("trainable='factors': the student has no factorch layers "
                             "(FactorizedLinear, FactorizedConv1d/2d, FactorizedEmbedding); "
                             "compress it first (factorch.compress) or use trainable='all'")
    return chosen


# --------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------
def _logits(out) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"model output: expected logits (a Tensor, or an object with .logits), "
                    f"got {type(out).__name__}")


def kl_loss(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None,
            temperature: float = 1.0) -> Tensor:
    """``T² · KL(softmax(t/T) ‖ softmax(s/T))`` per token, summed over the
    vocabulary, averaged over the tokens where ``mask`` is true (all when
    None). Computed in float32 at least."""
    dt = torch.promote_types(student_logits.dtype, torch.float32)
    log_s = TF.log_softmax(student_logits.to(dt) / temperature, dim=-1)
    log_t = TF.log_softmax(teacher_logits.to(dt) / temperature, dim=-1)
    per_token = TF.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)
    return _masked_mean(per_token, mask) * temperature ** 2


def _masked_mean(v: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return v.mean()
    m = mask.to(v.dtype)
    return (v * m).sum() / m.sum().clamp_min(1)


def next_token_loss(logits: Tensor, labels: Tensor, mask: Tensor | None) -> Tensor:
    """Cross-entropy of the prediction at position i for the label at i+1
    (labels of -100 and positions where ``mask`` is 0 ignored)."""
    dt = torch.promote_types(logits.dtype, torch.float32)
    target = labels[:, 1:].clone()
    if mask is not None:
        target[mask[:, 1:] == 0] = -100
    return TF.cross_entropy(logits[:, :-1].to(dt).reshape(-1, logits.shape[-1]),
                            target.reshape(-1), ignore_index=-100)


def hidden_mse_loss(student_hidden, teacher_hidden, mask: Tensor | None) -> Tensor:
    """The mean over blocks of the MSE between the students' and the
    teacher's hidden states (the embedding output, index 0, left out)."""
    if student_hidden is None or teacher_hidden is None:
        raise ValueError("hidden_mse: the models returned no hidden_states (they must accept "
                         "output_hidden_states=True, as transformers models do)")
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(f"hidden_mse: the student has {len(student_hidden)} hidden states, "
                         f"the teacher {len(teacher_hidden)}; they must have matching blocks")
    terms = []
    for s, t in zip(student_hidden[1:], teacher_hidden[1:]):
        per_token = (s.float() - t.float()).pow(2).mean(-1)
        terms.append(_masked_mean(per_token, mask))
    return torch.stack(terms).mean()


# --------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------
def _accepts(model: nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _lr_factor(step: int, steps: int, schedule: str, warmup: int) -> float:
    """The learning rate's multiplier at `step`: a linear warmup over
    `warmup` steps, then constant or a cosine down to 0 at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / span))


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class _Objective:
    """The loss of one batch: KL to the teacher's logits, next-token CE, or
    their mix, plus the weighted hidden-state MSE."""

    def __init__(self, student, teacher, loss, temperature, hidden_mse, ce_weight):
        self.student, self.teacher = student, teacher
        self.loss, self.temperature = loss, temperature
        self.hidden_mse, self.ce_weight = hidden_mse, ce_weight
        self.need_teacher = loss != "ce" or hidden_mse > 0
        self.s_dev, self.t_dev = _device(student), _device(teacher)
        self.extra_s = {"use_cache": False} if _accepts(student, "use_cache") else {}
        self.extra_t = {"use_cache": False} if _accepts(teacher, "use_cache") else {}
        if hidden_mse > 0:
            self.extra_s["output_hidden_states"] = self.extra_t["output_hidden_states"] = True

    def __call__(self, batch: dict) -> tuple[Tensor, dict, int]:
        """(the loss to minimise, its parts as floats, the tokens counted)."""
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        labels = batch.get("labels", ids)
        inputs = {n: v for n, v in batch.items() if n != "labels"}
        tokens = int(mask.sum()) if mask is not None else ids.numel()
        t_out = None
        if self.need_teacher:
            with torch.no_grad():
                t_out = self.teacher(**{n: v.to(self.t_dev) for n, v in inputs.items()},
                                     **self.extra_t)
        s_out = self.student(**{n: v.to(self.s_dev) for n, v in inputs.items()}, **self.extra_s)
        s_logits = _logits(s_out)
        m = mask.to(self.s_dev) if mask is not None else None
        ce = next_token_loss(s_logits, labels.to(self.s_dev), m)
        kl = None
        if t_out is not None:
            t_logits = _logits(t_out).to(self.s_dev)
            if t_logits.shape != s_logits.shape:
                raise ValueError(f"teacher: its logits have shape {list(t_logits.shape)}, the "
                                 f"student's {list(s_logits.shape)}; they must share the "
                                 f"vocabulary")
            kl = kl_loss(s_logits, t_logits, m, self.temperature)
        if self.loss == "kl":
            total = kl
        elif self.loss == "ce":
            total = ce
        else:
            total = (1 - self.ce_weight) * kl + self.ce_weight * ce
        hid = None
        if self.hidden_mse > 0:
            t_hid = getattr(t_out, "hidden_states", None)
            hid = hidden_mse_loss(getattr(s_out, "hidden_states", None),
                                  None if t_hid is None else [h.to(self.s_dev) for h in t_hid],
                                  m)
            total = total + self.hidden_mse * hid
        parts = {"kl": float(kl.detach()) if kl is not None else float("nan"),
                 "ce": float(ce.detach()),
                 "hidden": float(hid.detach()) if hid is not None else 0.0}
        return total, parts, tokens


def distill(
    student: nn.Module,
    teacher: nn.Module,
    batches,
    steps: int = 100,
    lr: float = 1e-4,
    trainable: str = "factors",
    loss: str = "kl",
    temperature: float = 1.0,
    hidden_mse: float = 0.0,
    ce_weight: float = 0.5,
    grad_accum: int = 1,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    progress: bool = True,
    schedule: str = "cosine",
    warmup: int = 0,
) -> DistillHistory:
    """Trains ``student`` (a compressed model) to reproduce ``teacher``
    (the dense model it came from) on ``batches``.

    Args:
        student, teacher: models called as ``model(**batch)`` returning
            logits (``.logits``, as transformers' causal LMs) over the same
            vocabulary. The teacher runs in eval mode under no_grad.
        batches: dicts ``{"input_ids": [b, s], "attention_mask": [b, s]
            (optional), "labels": [b, s] (optional, for "ce"; default: the
            input_ids)}`` such as :func:`factorch.data.text_batches` makes,
            or input_ids tensors; cycled when ``steps * grad_accum`` exceeds
            their number.
        steps: optimizer steps; each takes ``grad_accum`` batches.
        lr: AdamW's peak learning rate.
        trainable: ``"factors"`` (the factorch layers' parameters),
            ``"lora"`` (parameters named ``lora_*``: call
            ``factorch.lora.add_lora`` first) or ``"all"``. Every other
            parameter is frozen for the run.
        loss: ``"kl"`` (distillation), ``"ce"`` (next-token loss on the
            labels, no teacher logits needed) or ``"kl+ce"``:
            ``(1 - ce_weight)·KL + ce_weight·CE``.
        temperature: T of the softened distributions; the KL is scaled by
            T² so its gradients keep their size.
        hidden_mse: weight of the MSE between the hidden states of matching
            blocks (``output_hidden_states=True``), added to the loss; 0: off.
        weight_decay, max_grad_norm: AdamW's decoupled weight decay; the
            global gradient norm clipped to (None or 0: no clipping).
        schedule, warmup: ``"cosine"`` (down to 0 at the last step) or
            ``"constant"``, after a linear warmup of ``warmup`` steps.
        progress: a tqdm bar showing the loss.

    Returns a :class:`DistillHistory` (per-step loss and its parts).
    """
    if not isinstance(student, nn.Module):
        raise TypeError(f"student: expected an nn.Module, got {type(student).__name__}")
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher: expected an nn.Module, got {type(teacher).__name__}")
    if student is teacher:
        raise ValueError("teacher: is the student itself; pass the dense model the student "
                         "was compressed from (a separate copy)")
    steps = _pos_int("steps", steps)
    lr = _number("lr", lr, open_lo=True)
    _choice("trainable", trainable, TRAINABLE)
    _choice("loss", loss, LOSSES)
    temperature = _number("temperature", temperature, open_lo=True)
    hidden_mse = _number("hidden_mse", hidden_mse)
    ce_weight = _number("ce_weight", ce_weight)
    if ce_weight > 1:
        raise ValueError(f"ce_weight: expected a fraction in [0, 1], got {ce_weight!r}")
    grad_accum = _pos_int("grad_accum", grad_accum)
    weight_decay = _number("weight_decay", weight_decay)
    if max_grad_norm is not None:
        max_grad_norm = _number("max_grad_norm", max_grad_norm)
    _choice("schedule", schedule, SCHEDULES)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or not 0 <= warmup <= steps:
        raise ValueError(f"warmup: expected an int in [0, steps = {steps}], got {warmup!r}")
    batches = _check_batches(batches)
    params = trainable_parameters(student, trainable)
    objective = _Objective(student, teacher, loss, temperature, hidden_mse, ce_weight)

    hist = DistillHistory(trainable=trainable, loss_kind=loss,
                          n_trainable=sum(p.numel() for p in params.values()))
    flags = {p: p.requires_grad for p in student.parameters()}
    modes = {m: m.training for m in (*student.modules(), *teacher.modules())}
    bar = None
    try:
        for p in student.parameters():
            p.requires_grad_(False)
        chosen = list(params.values())
        for p in chosen:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(chosen, lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: _lr_factor(s, steps, schedule, warmup))
        student.train()
        teacher.eval()
        if progress:
            try:
                from tqdm.auto import tqdm

                bar = tqdm(total=steps, desc=f"distill ({trainable})", leave=False)
            except ImportError:
                bar = None
        t0 = time.perf_counter()
        k = 0
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            sums = dict.fromkeys(("loss", "kl", "ce", "hidden"), 0.0)
            tokens = 0
            for _ in range(grad_accum):
                b = batches[k % len(batches)]
                k += 1
                total, parts, n_tok = objective(b)
                if not torch.isfinite(total):
                    raise FloatingPointError(
                        f"distill: the loss is {float(total.detach())} at step {step}; lower lr "
                        f"(now {lr:g}) or check the models")
                (total / grad_accum).backward()
                sums["loss"] += float(total.detach())
                for n, v in parts.items():
                    sums[n] += v
                tokens += n_tok
            if max_grad_norm:
                gn = torch.nn.utils.clip_grad_norm_(chosen, max_grad_norm)
            else:
                norms = [torch.linalg.vector_norm(p.grad) for p in chosen if p.grad is not None]
                gn = torch.linalg.vector_norm(torch.stack(norms)) if norms else 0.0
            hist.lr.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
            for n in ("loss", "kl", "ce", "hidden"):
                getattr(hist, n).append(sums[n] / grad_accum)
            hist.grad_norm.append(float(gn))
            hist.tokens_per_step = tokens
            if bar is not None:
                bar.set_postfix(loss=f"{hist.loss[-1]:.4f}")
                bar.update(1)
        hist.seconds = time.perf_counter() - t0
    finally:
        if bar is not None:
            bar.close()
        for p in params.values():
            p.grad = None
        for p, f in flags.items():
            p.requires_grad_(f)
        for mod, was in modes.items():
            mod.training = was
    return hist
