"""deltatune plan: parameter counts against real models, memory terms, recommendations, CLI."""
from __future__ import annotations

import json

import pytest
import torch

from deltatune.advisor import memory as M
from deltatune.advisor.plan import plan
from deltatune.advisor.shapes import KNOWN, ModelShape, from_config_dict, resolve

GB = M.GiB


def tiny_llama_config(tied: bool, kv_heads: int = 2):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=kv_heads, tie_word_embeddings=tied)


def tiny_model(cfg):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("tied", [True, False])
def test_shape_counts_every_parameter_of_a_real_model(tied):
    cfg = tiny_llama_config(tied)
    shape = from_config_dict(cfg.to_dict(), "tiny", "test")
    model = tiny_model(cfg)
    assert shape.params == sum(p.numel() for p in model.parameters())
    linears = sum(m.weight.numel() for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and n.startswith("model.layers."))
    assert shape.linear_params == linears


@pytest.mark.parametrize("method,target", [("lora", "all-linear"), ("lora", ["q_proj", "v_proj"]),
                                           ("dora", "all-linear"), ("ia3", None)])
def test_trainable_params_match_get_peft_model(method, target):
    from deltatune import IA3Config, LoraConfig, get_peft_model

    cfg = tiny_llama_config(tied=False)
    shape = from_config_dict(cfg.to_dict(), "tiny", "test")
    setup = M.Setup(rank=4, target=M.ALL_LINEAR if target == "all-linear" else tuple(target or ()))
    if method == "ia3":
        config = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    else:
        config = LoraConfig(r=4, lora_alpha=8, target_modules=target, use_dora=method == "dora")
    peft = get_peft_model(tiny_model(cfg), config)
    trainable = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    assert M.trainable_params(method, shape, setup) == trainable


def test_shape_read_from_a_config_directory(tmp_path):
    cfg = tiny_llama_config(tied=True)
    cfg.save_pretrained(tmp_path)
    shape = resolve(str(tmp_path))
    assert (shape.layers, shape.hidden, shape.heads, shape.kv_heads, shape.intermediate, shape.vocab, shape.tied) == \
        (2, 32, 4, 2, 48, 96, True)
    assert shape.source.endswith("config.json")


def test_known_sizes_have_their_published_parameter_counts():
    # Model cards: Llama-2-7B 6.74B, Llama-2-70B 68.98B, Llama-3.1-8B 8.03B, LLaMA-65B 65.2B, SmolLM2 134.5M.
    expect = {"llama-2-7b": 6.74e9, "llama-2-70b": 68.98e9, "llama-3.1-8b": 8.03e9, "llama-65b": 65.29e9,
              "smollm2-135m": 134.5e6}
    for name, n in expect.items():
        assert KNOWN[name].params == pytest.approx(n, rel=0.005), name
    with pytest.raises(ValueError, match="known:"):
        resolve("3b")


def test_qlora_weight_bytes_match_a_quantized_model():
    from deltatune.quant import quantization_footprint, quantize

    cfg = tiny_llama_config(tied=False)
    cfg.hidden_size, cfg.intermediate_size, cfg.head_dim = 128, 256, 32
    model = quantize(tiny_model(cfg))
    shape = from_config_dict(cfg.to_dict(), "tiny", "test")
    fp = quantization_footprint(model)
    assert fp["params"] == shape.linear_params
    planned = M.estimate("qlora", shape, M.Setup(dtype_bytes=4)).base_weights
    dense = sum(p.numel() * p.element_size() for p in model.parameters() if p.is_floating_point()
                and p.requires_grad is not None and p.dtype == torch.float32)
    assert planned == pytest.approx(fp["bytes"] + dense, rel=0.02)


def test_paper_figures_65b_and_70b():
    # QLoRA (Dettmers et al. 2023, arXiv:2305.14314): 65B fine-tunes on one 48 GB GPU with QLoRA;
    # 16-bit full fine-tuning needs more than 780 GB.
    for size in ("65b", "70b"):
        p48 = plan(size, "48GB")
        assert p48.fits("qlora") and p48.recommendation == "qlora"
        assert not p48.fits("lora")
        p24 = plan(size, "24GB")
        assert not p24.fits("qlora") and p24.recommendation is None
        assert any("4-bit weights alone" in s for s in p24.suggestions)
        assert p24.estimate("qlora").base_weights > 30 * GB  # ~35 GB of 4-bit weights alone
        assert p24.estimate("full-bf16").peak > 700 * GB


def test_nothing_fits_suggests_changes_that_do_fit():
    p = plan("13b", "8GB")
    assert p.recommendation is None
    text = " ".join(p.suggestions)
    assert "FSDP" in text and "smaller base" in text
    fsdp = plan("13b", "8GB", devices=2, sharding="fsdp")
    assert fsdp.fits("qlora")


def test_checkpointing_and_tokens_drive_activations():
    shape = KNOWN["llama-2-7b"]
    short, long = (M.estimate("lora", shape, M.Setup(seq_len=s, grad_checkpointing=False)) for s in (1024, 2048))
    assert long.activations > 1.9 * short.activations
    ck = M.estimate("lora", shape, M.Setup(seq_len=2048, grad_checkpointing=True))
    assert ck.activations < long.activations / 4
    assert ck.activations_without_checkpointing == long.activations
    q = M.estimate("qlora", shape, M.Setup())  # QLoRA: checkpointing on by default, as deltatune train
    assert q.grad_checkpointing


def test_optimizer_and_fsdp_change_the_right_terms():
    shape = KNOWN["llama-2-7b"]
    adam, sgd, a8 = (M.estimate("full-bf16", shape, M.Setup(optimizer=o)) for o in ("adamw", "sgd", "adamw8bit"))
    assert adam.optimizer == 12 * shape.params and sgd.optimizer == 4 * shape.params  # fp32 master (+ moments)
    assert sgd.optimizer < a8.optimizer < adam.optimizer
    ddp = M.estimate("full-bf16", shape, M.Setup(devices=8))
    fsdp = M.estimate("full-bf16", shape, M.Setup(devices=8, sharding="fsdp"))
    assert ddp.peak == adam.peak
    assert fsdp.optimizer == adam.optimizer // 8 and fsdp.peak < adam.peak / 3


@pytest.mark.parametrize("kwargs,expected,why", [
    (dict(model="135m", memory="80GB", goal="accuracy"), "full-bf16", "accuracy-critical"),
    (dict(model="7b", memory="80GB", goal="quality"), "dora", "DoRA"),
    # The overview's "tiny memory -> prompt tuning" loses to QLoRA: prompt tuning keeps a 16-bit base.
    (dict(model="7b", memory="24GB", goal="memory"), "qlora", "prompt tuning, the usual pick"),
    (dict(model="7b", memory="24GB", goal="memory", allow_4bit=False), "prompt", "least memory"),
    (dict(model="7b", memory="24GB", tasks=5), "lora", "serve them together"),
    (dict(model="70b", memory="80GB"), "qlora", "large base"),
    (dict(model="7b", memory="10GB"), "qlora", "does not fit"),
])
def test_recommendation_rules(kwargs, expected, why):
    p = plan(kwargs.pop("model"), kwargs.pop("memory"), **kwargs)
    assert p.recommendation == expected
    assert p.fits(expected)
    assert any(why in r for r in p.reasons), p.reasons


def test_accuracy_goal_falls_back_when_full_fine_tuning_does_not_fit():
    p = plan("7b", "24GB", goal="accuracy")
    assert p.recommendation == "lora"
    assert any("does not fit" in r for r in p.reasons)


def test_diffusion_models_get_lora_on_attention():
    p = plan("sdxl", "24GB", rank=64)
    assert p.recommendation == "lora"
    assert any("to_q" in r for r in p.reasons) and any("outside 4-32" in r for r in p.reasons)


def test_parse_memory():
    assert M.parse_memory("24GB") == 24 * GB == M.parse_memory("24 GiB") == M.parse_memory(24)
    assert M.parse_memory("512MB") == 512 * M.MiB
    for bad in ("lots", "-3GB", "0"):
        with pytest.raises(ValueError):
            M.parse_memory(bad)


def test_cli_plan_json_and_errors(capsys):
    from deltatune.cli import main

    assert main(["plan", "--model", "70b", "--memory", "48GB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["recommendation"] == "qlora"
    assert {m["method"] for m in out["methods"]} == set(M.METHODS)
    assert main(["plan", "--model", "70b", "--memory", "24GB"]) == 0
    text = capsys.readouterr().out
    assert "nothing fits" in text and "4-bit weights alone" in text
    assert main(["plan", "--model", "3b"]) == 2
    assert "known:" in capsys.readouterr().err
    assert main(["plan", "--model", "7b", "--target", "q_proj,nope"]) == 2
    assert "nope" in capsys.readouterr().err
