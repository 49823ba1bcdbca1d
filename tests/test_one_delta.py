"""One LoRA layer class per base layer type, one delta per layer, one scaling rule.

DoRA is LoRA plus a magnitude in the same layer class, so the order in which adapters wrap a
module never matters (a plain LoRA adapter first used to fix the class and refuse DoRA, which the
serving engine hit after an eviction unwrapped a module); the scaling ``alpha / r`` (rsLoRA:
``alpha / sqrt(r)``) is one function that every module computing it goes through.
"""
from __future__ import annotations

import inspect
import math

import pytest
import torch

from deltatune import LoraConfig, PeftModel, get_peft_model, merging, registry
from tests.conftest import logits_of, perturb_trainable, tiny_convnet, tiny_llama, token_batch

CONFIGS = {
    "plain": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "embed_tokens"]),
    "dora": LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["o_proj", "v_proj", "embed_tokens"]),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each adapter trained (perturbed) alone and saved: name -> directory."""
    root = tmp_path_factory.mktemp("one_delta")
    for i, (name, config) in enumerate(CONFIGS.items()):
        model = get_peft_model(tiny_llama(), config)
        perturb_trainable(model, seed=i + 1, scale=0.3)
        model.save_pretrained(root / name)
    return {name: root / name for name in CONFIGS}


@pytest.mark.parametrize("order", [("plain", "dora"), ("dora", "plain")], ids=["lora-first", "dora-first"])
def test_wrap_order_never_refuses_an_adapter(saved, order):
    ids = token_batch(batch=2)
    model = PeftModel.from_pretrained(tiny_llama(), saved[order[0]], adapter_name=order[0])
    model.load_adapter(saved[order[1]], adapter_name=order[1])      # refused for DoRA after LoRA before
    model.eval()
    layer = model.base_model.model.model.layers[0].self_attn.o_proj
    assert set(layer.held) == {"plain", "dora"} and list(layer.lora_magnitude_vector) == ["dora"]
    alone = {n: logits_of(PeftModel.from_pretrained(tiny_llama(), saved[n]).eval(), ids) for n in CONFIGS}
    assert not torch.allclose(alone["plain"], alone["dora"])
    with torch.no_grad():
        for name in CONFIGS:
            model.set_adapter(name)
            torch.testing.assert_close(logits_of(model, ids), alone[name], rtol=0, atol=1e-5)
        mixed = model(input_ids=ids, adapter_names=["dora", "plain"]).logits
    torch.testing.assert_close(mixed[0], alone["dora"][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[1], alone["plain"][1], rtol=0, atol=1e-5)
    with torch.enable_grad():                                        # the autograd path agrees too
        model.set_adapter("dora")
        torch.testing.assert_close(logits_of(model, ids), alone["dora"], rtol=0, atol=1e-5)


def test_saved_files_keep_peft_keys_for_both_kinds_in_one_layer(saved, tmp_path):
    from safetensors.torch import load_file

    model = PeftModel.from_pretrained(tiny_llama(), saved["plain"], adapter_name="plain")
    model.load_adapter(saved["dora"], adapter_name="dora")
    model.save_pretrained(tmp_path, selected_adapters=["dora"])
    got, want = load_file(tmp_path / "dora" / "adapter_model.safetensors"), load_file(
        saved["dora"] / "adapter_model.safetensors")
    assert sorted(got) == sorted(want)
    assert "base_model.model.model.layers.0.self_attn.o_proj.lora_magnitude_vector" in got
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in got
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)


def test_engine_serves_dora_after_an_eviction_rewrapped_its_modules_with_plain_lora(tmp_path):
    from transformers import AutoModelForCausalLM

    from deltatune.serving import Engine, SamplingParams
    from tests.test_cli import _tiny_tokenizer

    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    _tiny_tokenizer().save_pretrained(base)
    configs = {"dora": LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["k_proj", "o_proj"]),
               "a": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
               "c": LoraConfig(r=2, lora_alpha=8, target_modules=["gate_proj"]),
               "b": LoraConfig(r=8, lora_alpha=8, target_modules=["k_proj", "o_proj"])}
    for i, (name, config) in enumerate(configs.items()):
        model = PeftModel(AutoModelForCausalLM.from_pretrained(base), config)
        perturb_trainable(model, seed=i + 1, scale=0.3)
        model.save_pretrained(tmp_path / name)
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    prompt = [5, 6, 7]
    engine = Engine(str(base), max_loras=2, max_cpu_loras=4)
    # Two ready slots: adding "c" evicts "dora" and unwraps k/o; "b" (plain LoRA) wraps them again.
    for name in configs:
        engine.add_adapter(name, tmp_path / name)
    assert {i.name: i.state for i in engine.adapters()} == {"dora": "cpu", "a": "cpu", "c": "ready", "b": "ready"}
    got = engine.generate(prompt, adapter="dora", sampling=greedy)[0].outputs[0].token_ids   # joins "b" on k/o
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "dora").eval()
    with torch.no_grad():
        want = peft.generate(input_ids=torch.tensor([prompt]), max_new_tokens=10, do_sample=False)[0, 3:].tolist()
    assert got == want
    base_tokens = engine.generate(prompt, sampling=greedy)[0].outputs[0].token_ids
    assert got != base_tokens                                  # the adapter matters


def test_one_layer_class_per_base_type_and_dora_registers_none():
    from deltatune.methods import dora, lora, lora_conv, lora_mha
    from deltatune.methods.base import AdapterLayer

    method = registry.method_for("LORA")
    assert set(method.layers.values()) == {lora.LoraLinear, lora.LoraEmbedding, lora_conv.LoraConv,
                                           lora_mha.LoraMultiheadAttention}
    assert not hasattr(method, "variants")
    dora_layers = [c for _, c in inspect.getmembers(dora, inspect.isclass)
                   if issubclass(c, AdapterLayer) and c.__module__ == dora.__name__]
    assert dora_layers == []
    for use_dora in (False, True):
        assert method.layer_class_for(torch.nn.Linear(2, 2), LoraConfig(use_dora=use_dora)) is lora.LoraLinear
    # the LoRA product (in place or not, one adapter or a row each) is written in one function only
    for module in (lora, dora, lora_conv, lora_mha):
        source = inspect.getsource(module)
        assert "bmm" not in source and "addmm_" not in source and "F.linear" not in source, module.__name__


def test_lora_on_multihead_attention_refuses_a_mixed_batch_from_its_delta():
    from deltatune.adapter_set import AdapterSet, MixingError
    from deltatune.methods.lora_mha import LoraMultiheadAttention

    layer = LoraMultiheadAttention(torch.nn.MultiheadAttention(8, 2), AdapterSet())
    layer.adapter_set.add("x", LoraConfig(r=2))
    layer.add_adapter("x", LoraConfig(r=2), "mha")
    q = torch.randn(3, 2, 8)
    with layer.adapter_set.routed(torch.tensor([1, 0])):
        with pytest.raises(MixingError, match="MultiheadAttention.*separate calls"):
            layer(q, q, q)


def _quartic_root(r, use_rslora):
    return r ** 0.25


@pytest.mark.parametrize("rslora", [False, True])
def test_every_scaling_goes_through_merging_lora_scaling(monkeypatch, rslora):
    from deltatune import arithmetic, hotswap
    from deltatune.checkpoint import convert

    config = LoraConfig(r=8, lora_alpha=16, use_rslora=rslora, target_modules=["q_proj"])
    want = 16 / math.sqrt(8) if rslora else 16 / 8
    assert merging.lora_scaling(16, 8, rslora) == pytest.approx(want)
    for patched in (False, True):     # a changed rule reaches every user: none writes it out again
        if patched:
            monkeypatch.setattr(merging, "_rank_divisor", _quartic_root)
        s = merging.lora_scaling(16, 8, rslora)
        assert arithmetic.module_scaling(config, "q_proj", 8) == pytest.approx(s)
        layer = get_peft_model(tiny_llama(), config).base_model.model.model.layers[0].self_attn.q_proj
        assert layer.scaling["default"] == pytest.approx(s)
        hotswap._set_scaling(layer, "default", 0.75)
        assert merging.lora_scaling(layer.lora_alpha["default"], 8, rslora) == pytest.approx(0.75)
        converted, _ = convert.pissa_to_lora(config, {}, {})               # rank doubled, scaling kept
        assert merging.lora_scaling(converted.lora_alpha, converted.r, rslora) == pytest.approx(s)
        combined = arithmetic.lora_config_for(config, {"q_proj": (8, s)}, use_rslora=rslora)
        assert combined.lora_alpha == pytest.approx(16)



def test_safe_merge_with_modules_to_save():
    """Mergeability is the method's: a modules-to-save copy has nothing to fold in (its check used to
    call a merge it does not have)."""
    from tests.conftest import tiny_bert

    model = get_peft_model(tiny_bert(), LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    perturb_trainable(model)
    ids = token_batch()
    before = model(input_ids=ids).logits
    model.merge_adapter(safe_merge=True)
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=1e-5)


def test_unmergeable_methods_say_their_own_reason():
    """merge_and_unload on a method that cannot merge names that method's reason, declared once on
    the method (a bottleneck adapter is not a set of virtual tokens)."""
    from deltatune import AdapterConfig, PromptTuningConfig, get_peft_model

    cases = [(AdapterConfig(bottleneck_size=4), "non-linearity"),
             (PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2), "virtual tokens")]
    for config, reason in cases:
        peft = get_peft_model(tiny_llama(), config)
        with pytest.raises(NotImplementedError, match=reason) as info:
            peft.merge_and_unload()
        assert config.peft_type.value in str(info.value)
