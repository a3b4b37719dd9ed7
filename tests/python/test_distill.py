"""factorch.distill: a compressed tiny random LlamaForCausalLM (built from a
config, no downloads) distilled from its dense self gets closer to it on
held-out windows; only the chosen parameters move; flags and modes come back;
the losses are what they say (float64 references); bad arguments are errors
naming the argument. And `factorch finetune` end to end."""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import math

import pytest
import torch
from torch import nn

import factorch
from factorch.distill import DistillHistory, kl_loss, next_token_loss, trainable_parameters

from compress_models import make_text, save_tiny_llama, tiny_llama, token_batches

pytest.importorskip("transformers")

HAVE_LORA = importlib.util.find_spec("factorch.lora") is not None


@functools.lru_cache(maxsize=None)
def _compressed_pair(seed, ratio):
    teacher = tiny_llama(seed=seed)
    student = copy.deepcopy(teacher)
    calib = token_batches(16, 32, teacher.config.vocab_size, seed=0)
    factorch.compress(student, ratio=ratio, method="svd-llm", calibration=calib, progress=False)
    return teacher, student, calib


def _pair(seed=1, ratio=0.4):
    """A tiny random Llama (the teacher) and its SVD-LLM compressed copy (the
    student), fresh copies for each test; and the calibration batches."""
    return copy.deepcopy(_compressed_pair(seed, ratio))


def mean_kl(student, teacher, batches) -> float:
    with torch.no_grad():
        kls = [float(kl_loss(student(**b).logits, teacher(**b).logits, None)) for b in batches]
    return sum(kls) / len(kls)


def held_out_kl(student, teacher) -> float:
    """On windows of the same kind as the training ones, not among them."""
    return mean_kl(student, teacher, token_batches(8, 32, teacher.config.vocab_size, seed=5))


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("trainable", ["factors", "all"])
def test_distillation_lowers_the_kl_to_the_teacher(trainable):
    teacher, student, _ = _pair()
    train = token_batches(64, 32, teacher.config.vocab_size, seed=0, batch=8)
    before_train, before_held = mean_kl(student, teacher, train), held_out_kl(student, teacher)
    s0, t0 = snapshot(student), snapshot(teacher)
    hist = factorch.distill(student, teacher, train, steps=40, lr=3e-3, trainable=trainable,
                            progress=False, warmup=2)
    assert isinstance(hist, DistillHistory) and hist.steps == 40
    assert len(hist.kl) == len(hist.ce) == len(hist.lr) == len(hist.grad_norm) == 40
    after_train, after_held = mean_kl(student, teacher, train), held_out_kl(student, teacher)
    assert after_train < 0.5 * before_train, (before_train, after_train)
    assert after_held < 0.8 * before_held, (before_held, after_held)
    assert sum(hist.loss[-5:]) < sum(hist.loss[:5])
    # the teacher is untouched; only the chosen parameters of the student moved
    for n, p in teacher.named_parameters():
        assert torch.equal(p, t0[n]) and p.grad is None, n
    chosen = set(trainable_parameters(student, trainable))
    assert hist.n_trainable == sum(p.numel() for n, p in student.named_parameters() if n in chosen)
    for n, p in student.named_parameters():
        assert (not torch.equal(p, s0[n])) == (n in chosen), n
        assert p.grad is None and p.requires_grad, n
    if trainable == "factors":
        assert all(".layers." in n for n in chosen) and "model.embed_tokens.weight" not in chosen
    # the schedule: cosine after the warmup, down towards 0
    assert hist.lr[0] == pytest.approx(3e-3 / 2) and hist.lr[1] == pytest.approx(3e-3)
    assert hist.lr[-1] < 0.01 * 3e-3


def test_flags_and_modes_are_restored():
    teacher, student, calib = _pair()
    student.model.norm.weight.requires_grad_(False)
    student.eval()
    teacher.train()
    seen = []
    teacher.register_forward_pre_hook(lambda m, a, k: seen.append(
        (m.training, torch.is_grad_enabled())), with_kwargs=True)
    factorch.distill(student, teacher, calib, steps=3, lr=1e-3, trainable="all", progress=False)
    assert seen and all(s == (False, False) for s in seen)  # eval mode, no grad
    assert not student.model.norm.weight.requires_grad
    assert all(p.requires_grad for n, p in student.named_parameters() if n != "model.norm.weight")
    assert not any(m.training for m in student.modules())
    assert all(m.training for m in teacher.modules())


def test_flags_are_restored_after_an_error_in_the_loop():
    teacher = tiny_llama(seed=1, vocab=40)  # another vocabulary than the student's
    _, student, calib = _pair()
    with pytest.raises(ValueError, match="teacher: its logits have shape"):
        factorch.distill(student, teacher, [{"input_ids": b["input_ids"] % 40} for b in calib],
                         steps=2, progress=False)
    assert all(p.requires_grad and p.grad is None for p in student.parameters())


def test_batches_are_cycled_and_accumulated():
    teacher, student, calib = _pair()
    two = calib[:2]  # 2 batches of [4, 32]
    hist = factorch.distill(student, teacher, two, steps=5, grad_accum=3, lr=1e-3,
                            schedule="constant", progress=False)
    assert hist.steps == 5 and hist.tokens_per_step == 3 * 4 * 32
    assert hist.lr == [1e-3] * 5
    # input_ids tensors work as batches too
    hist = factorch.distill(student, teacher, [b["input_ids"] for b in two], steps=2,
                            progress=False)
    assert hist.steps == 2


def _kl_reference(s, t, mask, T):
    ls = torch.log_softmax(s.double() / T, -1)
    lt = torch.log_softmax(t.double() / T, -1)
    per = (lt.exp() * (lt - ls)).sum(-1)
    m = mask.double()
    return float((per * m).sum() / m.sum()) * T * T


@pytest.mark.parametrize("T", [1.0, 2.5])
def test_kl_is_the_masked_token_mean_scaled_by_t_squared(T):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 7, 11, generator=g), torch.randn(3, 7, 11, generator=g) * 3
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, :2] = 0
    got = float(kl_loss(s, t, mask, T))
    assert got == pytest.approx(_kl_reference(s, t, mask, T), rel=1e-5)
    s2 = s.clone()
    s2[mask == 0] = 1e3 * torch.randn(int((mask == 0).sum()), 11, generator=g)  # masked out
    assert float(kl_loss(s2, t, mask, T)) == pytest.approx(got, rel=1e-6)
    assert float(kl_loss(t, t, mask, T)) == pytest.approx(0.0, abs=1e-6)


def test_next_token_loss_ignores_masked_and_minus_100_labels():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 9, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 9, (2, 6), generator=g)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, 4:] = 0
    labels[1, 2] = -100
    ref, n = 0.0, 0
    for b in range(2):
        for i in range(5):
            if mask[b, i + 1] and labels[b, i + 1] != -100:
                ref -= float(torch.log_softmax(logits[b, i], -1)[labels[b, i + 1]])
                n += 1
    assert float(next_token_loss(logits, labels, mask)) == pytest.approx(ref / n, rel=1e-12)


def test_ce_mix_and_hidden_mse_losses():
    teacher, student, calib = _pair()
    with torch.no_grad():
        ce_first = float(next_token_loss(student(**calib[0]).logits, calib[0]["input_ids"], None))
    h = factorch.distill(copy.deepcopy(student), teacher, calib[:1], steps=15, lr=3e-3,
                         loss="ce", progress=False)
    assert h.ce[0] == pytest.approx(ce_first, rel=1e-5) and h.ce[-1] < h.ce[0]
    assert all(math.isnan(k) for k in h.kl)  # no teacher run for plain CE
    h = factorch.distill(copy.deepcopy(student), teacher, calib, steps=4, lr=1e-3,
                         loss="kl+ce", ce_weight=0.25, hidden_mse=0.5, progress=False)
    for loss, kl, ce, hid in zip(h.loss, h.kl, h.ce, h.hidden):
        assert hid > 0
        assert loss == pytest.approx(0.75 * kl + 0.25 * ce + 0.5 * hid, rel=1e-5)
    assert "hidden" in h.summary() and "4 steps" in h.summary()
    h = factorch.distill(copy.deepcopy(student), teacher, calib, steps=30, lr=3e-3,
                         hidden_mse=1.0, progress=False)
    assert sum(h.hidden[-5:]) < sum(h.hidden[:5])
    json.dumps(h.to_dict())


def test_attention_mask_is_passed_and_masks_the_losses():
    teacher, student, calib = _pair()
    b = dict(calib[0])
    mask = torch.ones_like(b["input_ids"])
    mask[:, 20:] = 0
    b["attention_mask"] = mask
    h = factorch.distill(student, teacher, [b], steps=2, lr=1e-3, progress=False)
    assert h.tokens_per_step == int(mask.sum())


class _Adapter(nn.Module):
    """A stand-in for a LoRA wrapper: base(x) + x·Aᵀ·Bᵀ with PEFT's names."""

    def __init__(self, base, r=2):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features) * 0.1)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))

    def forward(self, x):
        return self.base_layer(x) + x @ self.lora_A.T @ self.lora_B.T


def test_trainable_lora_trains_only_the_adapters():
    teacher, student, calib = _pair()
    with pytest.raises(ValueError, match="factorch.lora.add_lora"):
        factorch.distill(student, teacher, calib, steps=1, trainable="lora", progress=False)
    for layer in student.model.layers:
        layer.self_attn.o_proj = _Adapter(layer.self_attn.o_proj)
        layer.mlp.down_proj = _Adapter(layer.mlp.down_proj)
    s0 = snapshot(student)
    before = held_out_kl(student, teacher)
    h = factorch.distill(student, teacher, calib, steps=30, lr=3e-3, trainable="lora",
                         progress=False)
    assert held_out_kl(student, teacher) < before
    assert h.n_trainable == sum(p.numel() for n, p in student.named_parameters() if "lora_" in n)
    for n, p in student.named_parameters():
        assert (not torch.equal(p, s0[n])) == ("lora_" in n), n


@pytest.mark.skipif(not HAVE_LORA, reason="factorch.lora is not in this build")
def test_trainable_lora_with_add_lora():
    from factorch import lora

    teacher, student, calib = _pair()
    lora.add_lora(student, r=4, alpha=8)
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    before = held_out_kl(student, teacher)
    factorch.distill(student, teacher, calib, steps=30, lr=3e-3, trainable="lora",
                     progress=False)
    assert held_out_kl(student, teacher) < before
    assert flags == {n: p.requires_grad for n, p in student.named_parameters()}


@pytest.mark.parametrize("kw, match", [
    ({"steps": 0}, "steps: expected a positive int"),
    ({"steps": 2.5}, "steps: expected a positive int"),
    ({"lr": 0}, "lr: expected a finite number > 0"),
    ({"lr": float("nan")}, "lr: expected a finite number"),
    ({"trainable": "heads"}, "trainable: expected one of"),
    ({"loss": "mse"}, "loss: expected one of"),
    ({"temperature": 0.0}, "temperature: expected a finite number > 0"),
    ({"hidden_mse": -1.0}, "hidden_mse: expected a finite number >= 0"),
    ({"ce_weight": 1.5}, "ce_weight: expected a fraction"),
    ({"grad_accum": 0}, "grad_accum: expected a positive int"),
    ({"weight_decay": -0.1}, "weight_decay: expected a finite number >= 0"),
    ({"max_grad_norm": -1.0}, "max_grad_norm: expected a finite number >= 0"),
    ({"schedule": "linear"}, "schedule: expected one of"),
    ({"warmup": 9, "steps": 4}, r"warmup: expected an int in \[0, steps = 4\]"),
])
def test_bad_arguments_are_errors_naming_them(kw, match):
    teacher, student, calib = _pair()
    s0 = snapshot(student)
    with pytest.raises(ValueError, match=match):
        factorch.distill(student, teacher, calib, progress=False, **kw)
    assert all(torch.equal(p, s0[n]) for n, p in student.named_parameters())


def test_bad_models_and_batches_are_errors():
    teacher, student, calib = _pair()
    with pytest.raises(ValueError, match="teacher: is the student itself"):
        factorch.distill(student, student, calib, progress=False)
    with pytest.raises(TypeError, match="teacher: expected an nn.Module"):
        factorch.distill(student, "dense", calib, progress=False)
    with pytest.raises(ValueError, match="batches: expected at least one batch"):
        factorch.distill(student, teacher, [], progress=False)
    with pytest.raises(TypeError, match=r"batches\[1\]: expected a dict with an 'input_ids'"):
        factorch.distill(student, teacher, [calib[0], {"ids": 1}], progress=False)
    with pytest.raises(ValueError, match=r"batches\[0\]: expected input_ids of shape"):
        factorch.distill(student, teacher, [{"input_ids": torch.zeros(4, dtype=torch.long)}],
                         progress=False)
    with pytest.raises(ValueError, match="trainable='factors': the student has no factorch"):
        factorch.distill(tiny_llama(seed=3), teacher, calib, progress=False)


def test_a_non_finite_loss_stops_the_run_with_a_clear_error():
    teacher, student, calib = _pair()
    with torch.no_grad():
        teacher.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="distill: the loss is nan at step 0"):
        factorch.distill(student, teacher, calib, steps=2, progress=False)
    assert all(p.requires_grad and p.grad is None for p in student.parameters())


# --------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------
def test_finetune_command_line_end_to_end(tmp_path, capsys):
    from factorch import cli

    save_tiny_llama(tmp_path / "tiny", seed=2)
    (tmp_path / "calib.txt").write_text(make_text(3000, seed=1))
    (tmp_path / "more.txt").write_text(make_text(1000, seed=3))
    comp = tmp_path / "comp"
    rc = cli.main(["compress", str(tmp_path / "tiny"), "--ratio", "0.5", "--method", "svd-llm",
                   "--calib", str(tmp_path / "calib.txt"), "--windows", "8", "--seq-len", "32",
                   "--out", str(comp), "--no-progress"])
    assert rc == 0
    capsys.readouterr()
    out = tmp_path / "tuned"
    rc = cli.main(["finetune", str(tmp_path / "tiny"), "--compressed", str(comp), "--calib",
                   str(tmp_path / "calib.txt"), str(tmp_path / "more.txt"), "--steps", "12",
                   "--lr", "3e-3", "--batch", "2", "--window", "16", "--out", str(out),
                   "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "12 steps" in printed and "loss (kl): first" in printed and "saved to" in printed
    for f in ("model.safetensors", "factorch.json", "distill.json", "report.json"):
        assert (out / f).is_file(), f
    hist = json.loads((out / "distill.json").read_text())
    assert hist["steps"] == 12 and hist["trainable"] == "factors"
    # the saved model loads into a fresh dense model; its factors moved, the rest did not
    before = factorch.load_compressed(tiny_llama(seed=9), comp)
    after = factorch.load_compressed(tiny_llama(seed=9), out)
    a, b = before.state_dict(), after.state_dict()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(".layers." in k for k in changed)
    assert "model.embed_tokens.weight" not in changed

    # errors are messages with exit code 2
    rc = cli.main(["finetune", str(tmp_path / "tiny"), "--compressed", str(comp), "--calib",
                   str(tmp_path / "nope.txt"), "--steps", "2", "--out", str(tmp_path / "x")])
    assert rc == 2 and "calib: no such file" in capsys.readouterr().err
    rc = cli.main(["finetune", str(tmp_path / "tiny"), "--compressed", str(comp), "--steps", "0",
                   "--out", str(tmp_path / "x")])
    assert rc == 2 and "steps: expected a positive int" in capsys.readouterr().err
    if not HAVE_LORA:
        rc = cli.main(["finetune", str(tmp_path / "tiny"), "--compressed", str(comp), "--calib",
                       str(tmp_path / "calib.txt"), "--steps", "2", "--trainable", "lora",
                       "--out", str(tmp_path / "x")])
        assert rc == 2 and "needs factorch.lora" in capsys.readouterr().err


@pytest.mark.skipif(not HAVE_LORA, reason="factorch.lora is not in this build")
def test_finetune_command_line_with_lora(tmp_path, capsys):
    from factorch import cli

    save_tiny_llama(tmp_path / "tiny", seed=2)
    (tmp_path / "calib.txt").write_text(make_text(3000, seed=1))
    comp = tmp_path / "comp"
    assert cli.main(["compress", str(tmp_path / "tiny"), "--ratio", "0.5", "--calib",
                     str(tmp_path / "calib.txt"), "--windows", "8", "--seq-len", "32",
                     "--out", str(comp), "--no-progress"]) == 0
    out = tmp_path / "tuned"
    rc = cli.main(["finetune", str(tmp_path / "tiny"), "--compressed", str(comp), "--calib",
                   str(tmp_path / "calib.txt"), "--steps", "6", "--trainable", "lora",
                   "--lora-r", "2", "--batch", "2", "--window", "16", "--out", str(out),
                   "--no-progress"])
    assert rc == 0
    assert "lora" in capsys.readouterr().out
    factorch.load_compressed(tiny_llama(seed=9), out)  # adapters merged into the factors

