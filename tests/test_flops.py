"""MFU accounting: the model-FLOPs formula against torch's own FLOP counter, the cached peak, and
the figures a training run reports."""
from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from deltatune import LoraConfig, get_peft_model
from deltatune.training import TrainConfig, Trainer, load_dataset
from deltatune.training import flops as F
from deltatune.training.batching import collate
from deltatune.training.loss import LossModule
from test_training_helpers import chat_rows, make_tokenizer, read_metrics, tiny_causal_lm, write_jsonl


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _lora(tok, **kw):
    torch.manual_seed(0)
    return get_peft_model(tiny_causal_lm(len(tok)), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **kw))


def test_formula_matches_torch_flop_counter_on_the_matmuls(tmp_path, tok, monkeypatch):
    """Frozen + adapter + head FLOPs of one step = what torch counts for every matmul outside
    attention (input gradients enabled everywhere, as the formula assumes). torch's counter knows
    aten's matmuls, not oneDNN's prepacked linear that training uses for the head on CPU
    (``training.cpu_linear``): that path is switched off here so every matmul is counted."""
    monkeypatch.setenv("DELTATUNE_ONEDNN_LINEAR", "0")
    model = _lora(tok).train()
    model.base_model.model.enable_input_require_grads()
    data = load_dataset(write_jsonl(tmp_path / "d.jsonl", chat_rows(3, seed=0)), tok)
    examples = [data[i] for i in range(3)]
    batch = collate(examples, packing=False, pad_id=tok.pad_token_id)
    labels = int((batch.targets != -100).sum())
    with FlopCounterMode(display=False) as counter:
        LossModule(model)(batch).backward()
    measured = sum(v for op, v in counter.get_flop_counts()["Global"].items()
                   if "scaled_dot_product" not in str(op))
    # Padding rows up to the longest example costs FLOPs the formula (which counts real tokens)
    # does not need; count the padded tokens the way torch ran them.
    rows = batch.input_ids.shape[0] * batch.input_ids.shape[1]
    step = F.FlopCounter(model).step([batch.input_ids.shape[1]] * batch.input_ids.shape[0], labels)
    assert sum(len(e) for e in examples) < rows  # the padding adjustment above is real
    assert step.frozen + step.adapter + step.head == pytest.approx(measured, rel=1e-9)
    assert step.attention > 0


def test_counts_follow_the_architecture(tok):
    model = _lora(tok)
    hf = model.base_model.model
    cfg = hf.config
    counter = F.FlopCounter(model)
    body = sum(m.in_features * m.out_features for n, m in hf.named_modules()
               if isinstance(m, torch.nn.Linear) and "lm_head" not in n and "lora_" not in n)
    adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counter.frozen_per_token == 4 * body
    assert counter.adapter_per_token == 6 * adapter
    assert counter.head_per_label == 4 * cfg.vocab_size * cfg.hidden_size
    d_attn = cfg.num_attention_heads * cfg.head_dim
    step = counter.step([3, 5], label_tokens=4)
    assert step.attention == 12 * d_attn * cfg.num_hidden_layers * (6 + 15)  # 3*4/2 + 5*6/2 pairs
    assert step.total == pytest.approx(8 * (4 * body + 6 * adapter) + 4 * 4 * cfg.vocab_size * cfg.hidden_size
                                       + step.attention)


def test_peak_is_measured_once_then_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path))
    monkeypatch.delenv("DELTATUNE_PEAK_GFLOPS", raising=False)
    monkeypatch.setattr(F, "machine_busy", lambda: False)
    calls = []
    real = F.measure_peak_flops
    monkeypatch.setattr(F, "measure_peak_flops", lambda d, t: calls.append(t) or real(d, t, seconds=0.05))
    first = F.peak_flops("cpu", torch.float32)
    assert first > 1e9 and calls == [torch.float32]  # > 1 GFLOP/s on any CPU this runs on
    assert F.peak_flops("cpu", torch.float32) == first and len(calls) == 1
    cached = json.loads((tmp_path / "peak_flops.json").read_text())
    assert list(cached.values()) == [first] and "float32" in next(iter(cached))
    F.peak_flops("cpu", torch.float32, refresh=True)
    assert len(calls) == 2
    monkeypatch.setenv("DELTATUNE_PEAK_GFLOPS", "123")
    assert F.peak_flops("cpu", torch.float32) == 123e9
    # measured on a busy machine: used for the run, not cached (the next quiet run measures again)
    monkeypatch.delenv("DELTATUNE_PEAK_GFLOPS")
    monkeypatch.setattr(F, "machine_busy", lambda: True)
    F.peak_flops("cpu", torch.bfloat16)
    assert len(calls) == 3 and "bfloat16" not in (tmp_path / "peak_flops.json").read_text()


def test_training_reports_mfu(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("DELTATUNE_PEAK_GFLOPS", "0.5")
    data = load_dataset(write_jsonl(tmp_path / "d.jsonl", chat_rows(16, seed=0)), tok)
    cfg = TrainConfig(out=str(tmp_path / "run"), batch_size=4, max_steps=3, dtype="float32", progress=False,
                      eval_exact_match=False, seed=0, log_every=1)
    model = _lora(tok)
    result = Trainer(model, tok, cfg, data).fit()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    expected = result["model_flops_per_token"] * result["tokens_per_s"] / 0.5e9
    assert summary["mfu"] == result["mfu"] and 0 < result["mfu"] == pytest.approx(expected, rel=0.02)
    assert summary["peak_gflops"] == 0.5
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(rows) == 3 and all(r["mfu"] > 0 for r in rows)
