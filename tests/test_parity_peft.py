"""Adapter files cross between HF peft and deltatune in both directions with the same logits."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import deltatune
from tests.conftest import (assert_file_crosses, logits_of, perturb_trainable, tiny_bert, tiny_convnet, tiny_gpt2,
                            tiny_llama, token_batch)

peft = pytest.importorskip("peft")

CASES = {
    "llama-qkvo": (tiny_llama, dict(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
    "llama-all-linear-rslora": (tiny_llama, dict(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear")),
    "llama-patterns": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                        rank_pattern={"down_proj": 2, "layers.1.self_attn.q_proj": 6},
                                        alpha_pattern={"v_proj": 3})),
    "llama-layers-regex": (tiny_llama, dict(r=4, target_modules=r".*\.mlp\.(gate|up)_proj")),
    "llama-layers-to-transform": (tiny_llama, dict(r=4, target_modules=["q_proj", "v_proj"],
                                                   layers_to_transform=[1], layers_pattern="layers")),
    "llama-embed-and-head": (tiny_llama, dict(r=4, target_modules=["embed_tokens", "q_proj"],
                                              modules_to_save=["lm_head"])),
    "gpt2-conv1d-bias-all": (tiny_gpt2, dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                                             fan_in_fan_out=True, bias="all")),
    "bert-seqcls": (tiny_bert, dict(task_type="SEQ_CLS", r=4, lora_alpha=4, target_modules=["query", "value"],
                                    bias="all")),
    "convnet": (tiny_convnet, dict(r=2, lora_alpha=4, target_modules=["embed", "conv", "point", "head"])),
}


def _peft_config(kwargs):
    return peft.LoraConfig(init_lora_weights=False, **kwargs)


def _our_config(kwargs):
    return deltatune.LoraConfig(init_lora_weights=False, **kwargs)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_file_loads_in_deltatune(case, tmp_path):
    build, kwargs = CASES[case]
    ids = token_batch(vocab=50 if case == "convnet" else 128)
    theirs = peft.get_peft_model(build(), _peft_config(kwargs))
    perturb_trainable(theirs)
    assert_file_crosses(theirs, tmp_path, deltatune.PeftModel.from_pretrained, build, ids)


@pytest.mark.parametrize("case", sorted(CASES))
def test_deltatune_file_loads_in_peft(case, tmp_path):
    build, kwargs = CASES[case]
    ids = token_batch(vocab=50 if case == "convnet" else 128)
    ours = deltatune.get_peft_model(build(), _our_config(kwargs))
    perturb_trainable(ours)
    assert_file_crosses(ours, tmp_path, peft.PeftModel.from_pretrained, build, ids)


@pytest.mark.parametrize("case", ["llama-qkvo", "gpt2-conv1d-bias-all", "bert-seqcls"])
def test_same_file_layout_as_peft(case, tmp_path):
    """Same tensor keys, shapes, dtypes, and every config key peft writes (bar its version stamp)."""
    from safetensors.torch import load_file

    build, kwargs = CASES[case]
    peft.get_peft_model(build(), _peft_config(kwargs)).save_pretrained(tmp_path / "peft")
    deltatune.get_peft_model(build(), _our_config(kwargs)).save_pretrained(tmp_path / "ours")
    a = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    # peft's accidental duplicates around modules_to_save with bias="all" (see drop_peft_artefacts)
    a = {k: v for k, v in a.items() if ".original_module." not in k and ".modules_to_save." not in k}
    b = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert {k: (v.shape, v.dtype) for k, v in a.items()} == {k: (v.shape, v.dtype) for k, v in b.items()}
    ca = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    cb = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert set(ca) - {"peft_version"} <= set(cb)
    for key in ("r", "lora_alpha", "peft_type", "task_type", "bias", "use_rslora", "inference_mode"):
        assert ca[key] == cb[key], key
    assert sorted(ca["modules_to_save"] or []) == sorted(cb["modules_to_save"] or [])


def test_named_adapters_go_to_subfolders_like_peft(tmp_path):
    ours = deltatune.get_peft_model(tiny_llama(), _our_config(dict(r=4, target_modules=["q_proj"])))
    ours.add_adapter("second", _our_config(dict(r=2, target_modules=["v_proj"])))
    ours.set_adapter("second")
    perturb_trainable(ours)
    ours.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    assert (tmp_path / "second" / "adapter_model.safetensors").exists()
    ids = token_batch()
    expected = logits_of(ours, ids)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "second", adapter_name="second")
    torch.testing.assert_close(logits_of(theirs.eval(), ids), expected, rtol=0, atol=1e-5)
