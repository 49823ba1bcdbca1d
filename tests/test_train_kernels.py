"""fp32 training kernels (issue 26): frozen linears and the head's logits through oneDNN
(``training.cpu_linear``), with the same values and gradients as PyTorch's default kernels."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deltatune import LoraConfig, get_peft_model
from deltatune.training import TrainConfig, Trainer, cpu_linear, load_dataset
from deltatune.training.loss import linear_cross_entropy
from test_training_helpers import one_thread  # noqa: F401  (autouse fixture)
from test_training_helpers import chat_rows, make_tokenizer, tiny_causal_lm, write_jsonl

needs_onednn = pytest.mark.skipif(not cpu_linear.available(), reason="no oneDNN linear kernel in this torch")


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def train_set(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("data")
    return load_dataset(write_jsonl(d / "train.jsonl", chat_rows(16, seed=0)), tok)


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
def test_frozen_linear_matches_f_linear_and_its_input_gradient(bias):
    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 40, bias=bias).requires_grad_(False)
    x = torch.randn(3, 7, 24, requires_grad=True)                                   # (B, T, in)
    g = torch.randn(3, 7, 40)
    ours = cpu_linear.frozen_linear(x, lin.weight, lin.bias)
    (ours * g).sum().backward()
    got = x.grad.clone()
    x.grad = None
    ref = F.linear(x, lin.weight, lin.bias)
    (ref * g).sum().backward()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, x.grad, rtol=1e-5, atol=1e-5)
    assert lin.weight.grad is None


@needs_onednn
def test_fast_linears_switch_only_frozen_layers_and_only_inside_active(tok):
    torch.manual_seed(0)
    model = get_peft_model(tiny_causal_lm(len(tok)), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    fast = cpu_linear.FastLinears(model)
    assert fast.layers and all(not m.weight.requires_grad for m in fast.layers)
    trainable = [m for m in model.modules() if type(m) is torch.nn.Linear and m.weight.requires_grad]
    assert not any(m in fast.layers for m in trainable)
    calls = {"n": 0}
    real = cpu_linear.onednn_linear

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    ids = torch.randint(3, len(tok), (2, 9))
    cpu_linear.onednn_linear = counting
    try:
        with torch.no_grad():
            plain = model(input_ids=ids).logits
            assert calls["n"] == 0
            with fast.active():
                fused = model(input_ids=ids).logits
    finally:
        cpu_linear.onednn_linear = real
    assert calls["n"] >= len(fast.layers)
    assert all("forward" not in m.__dict__ for m in fast.layers)                    # restored
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)


@needs_onednn
def test_head_loss_and_gradients_are_the_same_through_either_kernel(monkeypatch):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=False)
    h = torch.randn(37, 16, requires_grad=True)
    t = torch.randint(0, 300, (37,))
    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv(cpu_linear.ENV, flag)
        assert cpu_linear.wants(h, head.weight) is (flag == "1")
        loss = linear_cross_entropy(h, head, t, chunk=8)
        loss.backward()
        results.append((loss.detach(), h.grad.clone(), head.weight.grad.clone()))
        h.grad, head.weight.grad = None, None
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_trainer_uses_fast_linears_only_for_eager_fp32_cpu_runs(tmp_path, tok, train_set, monkeypatch):
    def cfg(name, **kw):
        return TrainConfig(**{**dict(out=str(tmp_path / name), batch_size=4, lr=5e-3, max_steps=3, dtype="float32",
                                     progress=False, eval_exact_match=False, seed=0), **kw})

    def wrapped():
        torch.manual_seed(0)
        return get_peft_model(tiny_causal_lm(len(tok)), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))

    trainer = Trainer(wrapped(), tok, cfg("on"), train_set)
    assert (trainer.fast_linears is not None) is cpu_linear.available()
    on = trainer.fit()
    monkeypatch.setenv(cpu_linear.ENV, "0")
    off_trainer = Trainer(wrapped(), tok, cfg("off"), train_set)
    assert off_trainer.fast_linears is None
    off = off_trainer.fit()
    assert on["final_loss"] == pytest.approx(off["final_loss"], rel=1e-4)
    monkeypatch.delenv(cpu_linear.ENV)
    assert Trainer(wrapped(), tok, cfg("ckpt", grad_checkpointing=True), train_set).fast_linears is None


def test_swiglu_matches_eager_forward_and_gradients():
    from deltatune.training.fused import SwiGLU

    torch.manual_seed(0)
    gate = torch.randn(3, 5, 40, dtype=torch.float64, requires_grad=True)          # (B, T, I)
    up = torch.randn(3, 5, 40, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 5, 40, dtype=torch.float64)
    (SwiGLU.apply(gate, up) * g).sum().backward()
    ours = gate.grad.clone(), up.grad.clone()
    gate.grad = up.grad = None
    (F.silu(gate) * up * g).sum().backward()
    torch.testing.assert_close(ours[0], gate.grad)
    torch.testing.assert_close(ours[1], up.grad)
    assert torch.autograd.gradcheck(SwiGLU.apply, (gate[:1, :2, :6].detach().requires_grad_(),
                                                   up[:1, :2, :6].detach().requires_grad_()))


def test_fused_mlps_keep_the_model_and_its_gradients_the_same(tok):
    from deltatune.training.fused import FusedMLPs

    torch.manual_seed(0)
    model = get_peft_model(tiny_causal_lm(len(tok)), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    fused = FusedMLPs(model)
    assert len(fused.mlps) == 2                                                     # one per layer
    ids = torch.randint(3, len(tok), (2, 9))
    results = []
    for on in (True, False):
        model.zero_grad(set_to_none=True)
        with fused.active() if on else torch.enable_grad():
            logits = model(input_ids=ids).logits
        logits.square().mean().backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    assert all("forward" not in m.__dict__ for m in fused.mlps)                     # restored
    torch.testing.assert_close(results[0][0], results[1][0])
    for name, grad in results[1][1].items():
        torch.testing.assert_close(results[0][1][name], grad, msg=name)


def test_trainer_fuses_mlps_except_under_gradient_checkpointing(tmp_path, tok, train_set):
    def trainer(name, **kw):
        cfg = TrainConfig(out=str(tmp_path / name), batch_size=4, lr=5e-3, max_steps=2, dtype="float32",
                          progress=False, eval_exact_match=False, seed=0, **kw)
        torch.manual_seed(0)
        model = get_peft_model(tiny_causal_lm(len(tok)), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        return Trainer(model, tok, cfg, train_set)

    assert len(trainer("on").fused_mlps.mlps) == 2
    assert trainer("ckpt", grad_checkpointing=True).fused_mlps is None
