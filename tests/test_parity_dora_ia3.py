"""DoRA and (IA)³ files cross between HF peft and deltatune in both directions with the same logits."""
from __future__ import annotations

import pytest
import torch

import deltatune
from deltatune.methods.ia3 import IA3Config
from tests.conftest import (assert_file_crosses, logits_of, perturb_trainable, tiny_bert, tiny_convnet, tiny_gpt2,
                            tiny_llama, token_batch)

peft = pytest.importorskip("peft")

DORA = {
    "llama-qkvo": (tiny_llama, dict(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
    "llama-all-linear-rslora": (tiny_llama, dict(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear")),
    "llama-embed": (tiny_llama, dict(r=4, target_modules=["embed_tokens", "q_proj"])),
    "gpt2-conv1d-bias": (tiny_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    "convnet": (tiny_convnet, dict(r=2, lora_alpha=4, target_modules=["embed", "conv", "point", "head"])),
}

IA3 = {
    "llama-kv-ff": (tiny_llama, dict(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                                     feedforward_modules=["down_proj"])),
    "llama-regex": (tiny_llama, dict(target_modules=r".*\.(k_proj|v_proj|up_proj)",
                                     feedforward_modules=r".*\.up_proj")),
    "gpt2-conv1d": (tiny_gpt2, dict(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
                                    fan_in_fan_out=True)),
    "bert-seqcls": (tiny_bert, dict(task_type="SEQ_CLS", target_modules=["key", "value", "output.dense"],
                                    feedforward_modules=["output.dense"])),
    "convnet": (tiny_convnet, dict(target_modules=["conv", "point", "head"], feedforward_modules=["point"])),
}

CASES = {f"dora-{k}": ("dora", *v) for k, v in DORA.items()} | {f"ia3-{k}": ("ia3", *v) for k, v in IA3.items()}


def _configs(kind, kwargs):
    if kind == "dora":
        return (peft.LoraConfig(use_dora=True, init_lora_weights=False, **kwargs),
                deltatune.LoraConfig(use_dora=True, init_lora_weights=False, **kwargs))
    return peft.IA3Config(init_ia3_weights=False, **kwargs), IA3Config(init_ia3_weights=False, **kwargs)


def _ids(case):
    return token_batch(vocab=50 if "convnet" in case else 128)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_file_loads_in_deltatune(case, tmp_path):
    kind, build, kwargs = CASES[case]
    ids = _ids(case)
    theirs = peft.get_peft_model(build(), _configs(kind, kwargs)[0])
    perturb_trainable(theirs)
    ours = assert_file_crosses(theirs, tmp_path, deltatune.PeftModel.from_pretrained, build, ids)
    # merged, both libraries give the same plain model
    merged_theirs = logits_of(theirs.merge_and_unload(), ids)
    torch.testing.assert_close(logits_of(ours.merge_and_unload(), ids), merged_theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_deltatune_file_loads_in_peft(case, tmp_path):
    kind, build, kwargs = CASES[case]
    ids = _ids(case)
    ours = deltatune.get_peft_model(build(), _configs(kind, kwargs)[1])
    perturb_trainable(ours)
    assert_file_crosses(ours, tmp_path, peft.PeftModel.from_pretrained, build, ids)


@pytest.mark.parametrize("case", ["dora-llama-qkvo", "dora-convnet", "ia3-llama-kv-ff", "ia3-convnet"])
def test_same_file_layout_as_peft(case, tmp_path):
    """Same tensor keys, shapes, dtypes, and every config key peft writes (bar its version stamp)."""
    import json

    from safetensors.torch import load_file

    kind, build, kwargs = CASES[case]
    theirs_cfg, ours_cfg = _configs(kind, kwargs)
    peft.get_peft_model(build(), theirs_cfg).save_pretrained(tmp_path / "peft")
    deltatune.get_peft_model(build(), ours_cfg).save_pretrained(tmp_path / "ours")
    a = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    b = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert {k: (tuple(v.shape), v.dtype) for k, v in a.items()} == {k: (tuple(v.shape), v.dtype) for k, v in b.items()}
    ja = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    jb = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert set(ja) - {"peft_version"} <= set(jb)
    assert jb["peft_type"] == ja["peft_type"]


def test_dora_initial_magnitude_matches_peft():
    """A fresh DoRA adapter (B = 0) has m = ||W|| row-wise, exactly what peft starts from."""
    kwargs = dict(r=4, target_modules=["q_proj"])
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(use_dora=True, **kwargs))
    ours = deltatune.get_peft_model(tiny_llama(), deltatune.LoraConfig(use_dora=True, **kwargs))
    m_theirs = theirs.base_model.model.model.layers[0].self_attn.q_proj.lora_magnitude_vector["default"].weight
    m_ours = ours.base_model.model.model.layers[0].self_attn.q_proj.lora_magnitude_vector["default"].weight
    torch.testing.assert_close(m_ours, m_theirs, rtol=0, atol=1e-6)
