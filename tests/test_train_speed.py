"""Training speed work (issue 13): fused AdamW, no casts of LoRA's input under autocast, compiled
decoder layers for the training steps (switched on only there, with an eager fallback)."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from deltatune import LoraConfig, get_peft_model
from deltatune.training import TrainConfig, Trainer, load_dataset
from deltatune.training import compiling
from deltatune.training.loop import make_optimizer
from test_training_helpers import one_thread  # noqa: F401  (autouse fixture)
from test_training_helpers import chat_rows, make_tokenizer, tiny_causal_lm, write_jsonl


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def train_set(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("data")
    return load_dataset(write_jsonl(d / "train.jsonl", chat_rows(16, seed=0)), tok)


def wrapped(tok, seed=0):
    torch.manual_seed(seed)
    return get_peft_model(tiny_causal_lm(len(tok)), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))


def config(tmp_path, **kw):
    return TrainConfig(**{**dict(out=str(tmp_path / "run"), batch_size=4, lr=5e-3, max_steps=3, dtype="float32",
                                 progress=False, eval_exact_match=False, seed=0), **kw})


def test_optimizer_is_fused_adamw_and_steps_like_the_default(tmp_path):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8, 5)), torch.nn.Parameter(torch.randn(5, 8))]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    cfg = config(tmp_path, weight_decay=0.01)
    fused = make_optimizer(params, cfg, torch.device("cpu"))
    assert fused.param_groups[0]["fused"] is True
    plain = torch.optim.AdamW(twins, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=0.01)
    for step in range(3):
        for p, q in zip(params, twins):
            p.grad = torch.full_like(p, 0.1 * (step + 1)) + p.detach()
            q.grad = p.grad.clone()
        fused.step()
        plain.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


class _Conversions(TorchDispatchMode):
    """Records the shapes of fp32 tensors produced by dtype conversions."""

    def __init__(self):
        super().__init__()
        self.fp32_shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten._to_copy.default,) and out.dtype == torch.float32:
            self.fp32_shapes.append(tuple(out.shape))
        return out


def test_lora_input_is_not_cast_to_fp32_under_bf16_autocast():
    base = torch.nn.Sequential(torch.nn.Linear(32, 48)).to(torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    model.train()
    x = torch.randn(3, 7, 32, dtype=torch.bfloat16, requires_grad=True)
    with _Conversions() as seen, torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert (3, 7, 32) not in seen.fp32_shapes  # the activation stays bf16 on its way into the factors
    y.float().sum().backward()
    lora_A = next(p for n, p in model.named_parameters() if "lora_A" in n)
    assert lora_A.grad is not None and lora_A.grad.dtype == torch.float32  # factors (and grads) stay fp32


def test_compiled_layers_run_only_in_training_steps_and_match_eager(tmp_path, tok, train_set):
    eager = Trainer(wrapped(tok), tok, config(tmp_path / "e"), train_set).fit()
    model = wrapped(tok)
    trainer = Trainer(model, tok, config(tmp_path / "c", compile=True), train_set)
    assert trainer.compiler is not None and len(trainer.compiler.layers) == len(compiling.decoder_layers(model)) > 0
    calls = {"n": 0}

    def counting(call):
        def run(*a, **k):
            calls["n"] += 1
            return call(*a, **k)
        return run

    # The real torch.compile, with the "eager" backend (dynamo traces our LoRA layers; no C++ build).
    trainer.compiler.calls = [counting(torch.compile(layer._call_impl, dynamic=True, backend="eager"))
                              for layer in trainer.compiler.layers]
    result = trainer.fit()
    assert calls["n"] == 3 * len(trainer.compiler.layers)  # every layer, every step (one pass each)
    assert all(layer._compiled_call_impl is None for layer in trainer.compiler.layers)  # off outside steps
    assert result["compiled"] is True and result["compile_s"] >= 0
    assert result["final_loss"] == pytest.approx(eager["final_loss"], rel=1e-4)


def test_failed_compilation_reruns_the_step_eagerly(tmp_path, tok, train_set, capsys):
    eager = Trainer(wrapped(tok), tok, config(tmp_path / "e"), train_set).fit()
    trainer = Trainer(wrapped(tok), tok, config(tmp_path / "c", compile=True), train_set)

    def broken(*a, **k):
        raise RuntimeError("C++ compile failed: no such header")

    trainer.compiler.calls = [broken] * len(trainer.compiler.layers)
    result = trainer.fit()
    assert "compile: failed (RuntimeError: C++ compile failed" in capsys.readouterr().out
    assert result["compiled"] is False
    assert result["final_loss"] == pytest.approx(eager["final_loss"], rel=1e-5)  # same steps, same seeds


def test_compile_is_off_with_a_reason_where_it_cannot_work(tmp_path, tok, train_set, monkeypatch, capsys):
    monkeypatch.setattr(compiling.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    trainer = Trainer(wrapped(tok), tok, config(tmp_path, compile=True), train_set)
    assert trainer.compiler is None
    assert "compile: off (no C++ compiler on PATH" in capsys.readouterr().out
    monkeypatch.undo()
    trainer = Trainer(wrapped(tok), tok, config(tmp_path, compile=True, grad_checkpointing=True), train_set)
    assert trainer.compiler is None
    assert "not used with gradient checkpointing" in capsys.readouterr().out
