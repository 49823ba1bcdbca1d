"""The training loop in-process on a tiny Llama: loss goes down, only adapters change, accumulation,
schedules, checkpoints, config files, method-agnostic training."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from deltatune import get_peft_model
from deltatune.registry import make_config as make_method_config
from deltatune.training import TrainConfig, Trainer, load_dataset
from deltatune.training.checkpoints import find_checkpoint, load_checkpoint
from deltatune.training.config import TrainConfigError
from deltatune.training.loop import lr_factor
from test_training_helpers import one_thread  # noqa: F401  (autouse fixture)
from test_training_helpers import chat_rows, make_tokenizer, read_metrics, tiny_causal_lm, write_jsonl


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def data(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("data")
    train = load_dataset(write_jsonl(d / "train.jsonl", chat_rows(48, seed=0)), tok)
    held = load_dataset(write_jsonl(d / "eval.jsonl", chat_rows(12, seed=1)), tok)
    return train, held


def wrapped(tok, method="lora", seed=0, **kw):
    torch.manual_seed(seed)
    base = tiny_causal_lm(len(tok))
    kw = {"target_modules": "all-linear", **kw}
    if method in ("lora", "dora"):
        kw = {"r": 4, "lora_alpha": 8, **kw}
    return get_peft_model(base, make_method_config(method, **kw))


def config(tmp_path, **kw):
    base = dict(out=str(tmp_path / "run"), batch_size=4, lr=5e-3, max_steps=12, dtype="float32",
                progress=False, eval_exact_match=False, seed=0, warmup_steps=2)
    return TrainConfig(**{**base, **kw})


def test_training_lowers_loss_and_changes_only_adapters(tmp_path, tok, data):
    train, held = data
    model = wrapped(tok, r=8, lora_alpha=32)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = Trainer(model, tok, config(tmp_path, max_steps=30, lr=1e-2), train, held)
    before = trainer.evaluate()["eval_loss"]
    result = trainer.fit()
    assert result["eval_loss"] < before - 0.15  # a random tiny model learns slowly; ~0.25 here
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p.cpu(), frozen[n].cpu()), f"frozen {n} changed"
    assert any(not torch.equal(p.cpu(), adapters[n].cpu()) for n, p in model.named_parameters() if p.requires_grad)
    run = tmp_path / "run"
    for name in ("metrics.jsonl", "metrics.csv", "loss_curve.png", "summary.json",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        assert (run / name).is_file(), name
    records = read_metrics(run)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 31))
    assert (run / "metrics.csv").read_text().splitlines()[0].startswith("step,epoch,loss,eval_loss,lr")


def test_grad_accumulation_and_packing_do_not_change_the_math(tmp_path, tok, data):
    train, _ = data
    curves = []
    setups = [(4, 1, True, 0), (2, 2, True, 0), (1, 4, False, 0), (4, 1, True, 40)]  # 40 tokens: ~1 per pass
    for i, (bs, accum, packing, budget) in enumerate(setups):
        cfg = config(tmp_path / str(i), batch_size=bs, grad_accum=accum, packing=packing, max_steps=5,
                     max_batch_tokens=budget)
        Trainer(wrapped(tok), tok, cfg, train).fit()
        curves.append([r["loss"] for r in read_metrics(tmp_path / str(i) / "run") if "loss" in r])
    for other in curves[1:]:
        assert other == pytest.approx(curves[0], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gradient_checkpointing_gives_the_same_steps(tmp_path, tok, data, dtype):
    # bf16 on the CPU switches short rows to eager attention; the recompute in backward must
    # take the same path as the forward or checkpointing refuses the mismatched tensors.
    train, _ = data
    curves = []
    for flag in (False, True):
        out = tmp_path / str(flag)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bf16 on a CPU without native bf16 warns
            trainer = Trainer(wrapped(tok), tok, config(out, max_steps=4, grad_checkpointing=flag, dtype=dtype), train)
        trainer.fit()
        curves.append([r["loss"] for r in read_metrics(out / "run") if "loss" in r])
    assert curves[1] == pytest.approx(curves[0], rel=1e-5 if dtype == "float32" else 2e-2)
    assert any(getattr(m, "gradient_checkpointing", False) for m in trainer.model.modules())


def test_lr_schedules():
    assert lr_factor(0, 10, 2, "cosine") == pytest.approx(1 / 3)
    assert lr_factor(2, 10, 2, "cosine") == pytest.approx(1.0)
    assert lr_factor(10, 10, 2, "cosine") == pytest.approx(0.0, abs=1e-9)
    assert lr_factor(6, 10, 2, "linear") == pytest.approx(0.5)
    assert lr_factor(9, 10, 0, "constant") == 1.0
    assert lr_factor(10, 10, 0, "cosine", min_ratio=0.1) == pytest.approx(0.1)


def test_checkpoint_roundtrip_restores_weights_optimizer_and_position(tmp_path, tok, data):
    train, _ = data
    model = wrapped(tok)
    cfg = config(tmp_path, max_steps=6, save_every=2, keep_checkpoints=2)
    Trainer(model, tok, cfg, train).fit()
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert ckpts == ["step-00000002", "step-00000004"]  # pruned to the newest two
    path = find_checkpoint(tmp_path / "run")
    assert path.name == "step-00000004"
    fresh = wrapped(tok, seed=5)
    trainer = Trainer(fresh, tok, cfg, train)
    state, saved_cfg = load_checkpoint(path, fresh, trainer.optimizer)
    assert (state.step, saved_cfg["lr"]) == (4, cfg.lr)
    assert len(trainer.optimizer.state) == len(trainer.params)
    from safetensors.torch import load_file
    saved = load_file(str(path / "trainable.safetensors"))
    for n, p in fresh.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.cpu(), saved[n])
    assert (path / "adapter" / "adapter_model.safetensors").is_file()


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.001\nmax-steps: 7\nr: 4\n")
    cfg = TrainConfig.from_file(path, r=8, lr=None)
    assert (cfg.lr, cfg.max_steps, cfg.r) == (0.001, 7, 8)
    (tmp_path / "c.json").write_text(json.dumps({"batch_size": 3}))
    assert TrainConfig.from_file(tmp_path / "c.json").batch_size == 3
    (tmp_path / "bad.yaml").write_text("learning_rate: 1\n")
    with pytest.raises(TrainConfigError, match="bad.yaml: unknown option 'learning_rate'"):
        TrainConfig.from_file(tmp_path / "bad.yaml")
    with pytest.raises(TrainConfigError, match="schedule"):
        TrainConfig(schedule="step")


def test_bf16_training_runs_with_fp32_adapters(tmp_path, tok, data):
    train, held = data
    model = wrapped(tok)
    model.base_model.model.to(torch.bfloat16)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(model, tok, config(tmp_path, dtype="bfloat16", max_steps=4), train, held)
    result = trainer.fit()
    assert torch.isfinite(torch.tensor(result["eval_loss"]))
    assert all(p.dtype == torch.float32 for p in trainer.params)


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_trainer_is_method_agnostic(tmp_path, tok, data, method):
    train, held = data
    model = wrapped(tok, method)
    trainer = Trainer(model, tok, config(tmp_path, max_steps=15, lr=2e-2), train, held)
    before = trainer.evaluate()["eval_loss"]
    assert trainer.fit()["eval_loss"] < before


def test_exact_match_generation(tmp_path, tok, data):
    train, held = data
    trainer = Trainer(wrapped(tok), tok, config(tmp_path, max_steps=1), train, held)
    result = trainer.evaluate(exact=True, samples=2, limit=5)
    assert result["total"] == 5 and 0 <= result["exact_match"] <= 1
    assert {"prompt", "reference", "prediction", "correct"} <= set(result["samples"][0])
