"""LoRA behaviour on tiny models: exactness of merge/disable, round trips, training, errors."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from torch import nn

import deltatune
from deltatune import LoraConfig, PeftModel, get_peft_model
from deltatune.checkpoint.io import CheckpointError
from deltatune.config import ConfigError
from tests.conftest import logits_of, perturb_trainable, tiny_convnet, tiny_gpt2, tiny_llama, token_batch, train_steps

BUILDERS = {
    "llama": (tiny_llama, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"], 128),
    "gpt2": (tiny_gpt2, ["c_attn", "c_fc"], 128),
    "convnet": (tiny_convnet, ["embed", "conv", "point", "head"], 50),
}


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_merge_equals_unmerged_and_disable_equals_base(arch):
    build, targets, vocab = BUILDERS[arch]
    ids = token_batch(vocab=vocab)
    base_logits = logits_of(build(), ids)
    model = get_peft_model(build(), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    # A fresh adapter is the identity (B = 0) ...
    assert torch.equal(logits_of(model, ids), base_logits)
    perturb_trainable(model)
    unmerged = logits_of(model, ids)
    assert (unmerged - base_logits).abs().max() > 1e-3
    # ... disabled is the base exactly ...
    with model.disable_adapter():
        assert torch.equal(logits_of(model, ids), base_logits)
    # ... merged equals unmerged, unmerge restores, merge_and_unload leaves plain modules.
    model.merge_adapter()
    torch.testing.assert_close(logits_of(model, ids), unmerged, rtol=0, atol=1e-5)
    with model.disable_adapter():
        torch.testing.assert_close(logits_of(model, ids), base_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits_of(model, ids), unmerged, rtol=0, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(logits_of(model, ids), unmerged, rtol=0, atol=1e-6)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, deltatune.methods.base.AdapterLayer) for m in merged.modules())
    torch.testing.assert_close(logits_of(merged, ids), unmerged, rtol=0, atol=1e-5)


def test_unload_returns_the_untouched_base():
    ids = token_batch()
    base_logits = logits_of(tiny_llama(), ids)
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear"))
    perturb_trainable(model)
    plain = model.unload()
    assert torch.equal(logits_of(plain, ids), base_logits)
    assert set(plain.state_dict()) == set(tiny_llama().state_dict())


def test_save_load_round_trip(tmp_path):
    ids = token_batch()
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1,
                                                    target_modules=["q_proj", "v_proj"]))
    perturb_trainable(model)
    model.eval()
    expected = logits_of(model, ids)
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.equal(logits_of(loaded.eval(), ids), expected)
    assert loaded.get_nb_trainable_parameters()[0] == 0  # inference by default
    trainable = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == model.get_nb_trainable_parameters()[0]


def test_training_lowers_loss_and_touches_only_the_adapter():
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    base_params = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapter_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert adapter_before and all(".lora_" in n for n in adapter_before)
    losses = train_steps(model, steps=20, lr=1e-2)
    assert losses[-1] < losses[0] - 0.3
    for n, p in model.named_parameters():
        if n in base_params:
            assert torch.equal(p, base_params[n]), n
    assert any(not torch.equal(p, adapter_before[n]) for n, p in model.named_parameters() if n in adapter_before)


def test_print_trainable_parameters_counts_like_peft(capsys):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.print_trainable_parameters()
    out = capsys.readouterr().out
    # q: 4*(32+32), v: 4*(32+16) per layer, 2 layers
    assert out.startswith("trainable params: 896 || all params: ")
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 896 and total == sum(p.numel() for p in tiny_llama().parameters()) + 896


def test_several_named_adapters_switch_and_delete(tmp_path):
    ids = token_batch()
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    perturb_trainable(model, seed=1)
    first = logits_of(model, ids)
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert model.active_adapter == "default"
    assert torch.equal(logits_of(model, ids), first)  # adding does not activate
    model.set_adapter("other")
    assert model.active_adapters == ["other"]
    perturb_trainable(model, seed=2)
    assert all("other" in n for n, p in model.named_parameters() if p.requires_grad)
    second = logits_of(model, ids)
    assert not torch.allclose(first, second)
    model.save_pretrained(tmp_path)
    model.set_adapter("default")
    assert torch.equal(logits_of(model, ids), first)
    model.delete_adapter("other")
    assert "other" not in model.peft_config
    assert not any("other" in n for n, _ in model.named_parameters())
    model.load_adapter(tmp_path / "other", adapter_name="other")
    model.set_adapter("other")
    assert torch.equal(logits_of(model, ids), second)


def test_pissa_and_gaussian_inits_keep_the_model_and_differ():
    ids = token_batch()
    base_logits = logits_of(tiny_llama(), ids)
    pissa = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "up_proj"], init_lora_weights="pissa"))
    torch.testing.assert_close(logits_of(pissa, ids), base_logits, rtol=0, atol=1e-5)
    layer = pissa.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_B["default"].weight.abs().sum() > 0  # not a zero init
    W = tiny_llama().model.layers[0].self_attn.q_proj.weight
    # the residual has the top singular directions removed
    assert torch.linalg.svdvals(layer.base_layer.weight)[0] < torch.linalg.svdvals(W)[0]
    gauss = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="gaussian"))
    A = gauss.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert abs(A.std().item() - 0.25) < 0.1
    rand = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    assert not torch.equal(logits_of(rand, ids), base_logits)


def test_rslora_and_patterns_set_scaling():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"],
                                                    rank_pattern={"v_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 2}))
    layers = model.base_model.model.model.layers
    assert layers[0].self_attn.q_proj.scaling["default"] == pytest.approx(8 / 2)
    assert layers[1].self_attn.q_proj.scaling["default"] == pytest.approx(2 / 2)
    assert layers[0].self_attn.v_proj.r["default"] == 2
    assert layers[0].self_attn.v_proj.scaling["default"] == pytest.approx(8 / 2 ** 0.5)


def test_bias_and_modules_to_save_train_and_save(tmp_path):
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], bias="lora_only",
                                                   modules_to_save=["ln_f"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.endswith("c_attn.base_layer.bias") for n in trainable)
    assert not any(n.endswith("c_fc.bias") for n in trainable)
    assert any("ln_f.modules_to_save.default" in n for n in trainable)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.transformer.ln_f.weight" in keys
    assert "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias" in keys


def test_exclude_modules_and_layers_to_transform_select_like_peft():
    from deltatune import targeting
    model = tiny_llama()
    names = targeting.select(model, LoraConfig(target_modules="all-linear", exclude_modules=["down_proj"]))
    assert "lm_head" not in names and not any(n.endswith("down_proj") for n in names)
    assert len(names) == 2 * 6
    names = targeting.select(model, LoraConfig(target_modules=["q_proj"], layers_to_transform=1))
    assert names == ["model.layers.1.self_attn.q_proj"]


# -- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field", [
    (dict(r=0), "r="), (dict(r=-3), "r="), (dict(lora_dropout=1.5), "lora_dropout"),
    (dict(bias="some"), "bias"), (dict(init_lora_weights="svd"), "init_lora_weights"),
    (dict(rank_pattern={"q_proj": 0}), "rank_pattern"), (dict(task_type="CAUSAL"), "task_type"),
])
def test_invalid_config_values_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        LoraConfig(target_modules=["q_proj"], **kwargs)


def test_bad_targets_name_the_problem():
    with pytest.raises(ConfigError, match=r"\['qproj'\] match no module"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "qproj"]))
    with pytest.raises(ConfigError, match="regex"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=r".*\.attention\.q"))
    with pytest.raises(ConfigError, match=r"model.layers.0.mlp.*LlamaMLP"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["mlp"]))
    with pytest.raises(ConfigError, match=r"input_layernorm.*LlamaRMSNorm"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["input_layernorm"]))
    # a Llama gets peft's default targets (tests/test_target_defaults.py); a model of no known family
    # gets an error listing its leaf module names
    with pytest.raises(ConfigError, match=r"target_modules is not set.*\['embed', 'conv', 'point', 'head'\]"):
        get_peft_model(tiny_convnet(), LoraConfig())


def test_failed_wrap_leaves_model_unchanged():
    model = tiny_llama()
    before = _snapshot(model)
    types = [type(m) for m in model.modules()]
    with pytest.raises(ConfigError):
        get_peft_model(model, LoraConfig(target_modules=["q_proj", "input_layernorm"]))
    assert [type(m) for m in model.modules()] == types
    assert set(model.state_dict()) == set(before)


def _saved(tmp_path, **kwargs):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **kwargs))
    perturb_trainable(model)
    model.save_pretrained(tmp_path)
    return tmp_path


def _assert_untouched(model, before, types):
    assert [type(m) for m in model.modules()] == types
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("corruption, message", [
    ("missing", "missing key 'base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight'"),
    ("unexpected", "unexpected key 'base_model.model.model.layers.0.mlp.up_proj.lora_A.weight'"),
    ("shape", r"lora_A.weight' has shape \(4, 31\)"),
    ("truncated", "not a readable safetensors file"),
    # LoRA's keys are unknown to IA3 (ignored with a warning, as peft does); the tensors then do not match
    ("other-method", "peft_type is 'IA3', expected 'LORA'|missing key .*ia3_l"),
    ("bad-json", "invalid JSON at line"),
    ("unsupported-field", "field 'use_qalora'"),
])
def test_bad_adapter_files_are_named_errors_and_leave_model_as_it_was(tmp_path, corruption, message):
    from safetensors.torch import load_file, save_file

    directory = _saved(tmp_path)
    weights = directory / "adapter_model.safetensors"
    cfg_path = directory / "adapter_config.json"
    tensors = load_file(weights)
    cfg = json.loads(cfg_path.read_text())
    if corruption == "missing":
        del tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
        save_file(tensors, weights)
    elif corruption == "unexpected":
        tensors["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 32)
        save_file(tensors, weights)
    elif corruption == "shape":
        key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        tensors[key] = torch.zeros(4, 31)
        save_file(tensors, weights)
    elif corruption == "truncated":
        weights.write_bytes(weights.read_bytes()[:200])
    elif corruption == "other-method":
        cfg["peft_type"] = "IA3"
        cfg_path.write_text(json.dumps(cfg))
    elif corruption == "bad-json":
        cfg_path.write_text('{"peft_type": "LORA",\n "r": }')
    elif corruption == "unsupported-field":
        cfg["use_qalora"] = True
        cfg_path.write_text(json.dumps(cfg))

    model = tiny_llama()
    before, types = _snapshot(model), [type(m) for m in model.modules()]
    with pytest.raises((CheckpointError, ConfigError, ValueError), match=message):
        PeftModel.from_pretrained(model, directory)
    _assert_untouched(model, before, types)

    # load_adapter onto an existing PeftModel also leaves it as it was
    host = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["k_proj"]))
    before, types = _snapshot(host), [type(m) for m in host.modules()]
    with pytest.raises((CheckpointError, ConfigError, ValueError), match=message):
        host.load_adapter(directory, adapter_name="broken")
    _assert_untouched(host, before, types)
    assert list(host.peft_config) == ["default"]


def test_adapter_for_another_base_is_refused(tmp_path):
    directory = _saved(tmp_path)
    with pytest.raises((CheckpointError, ConfigError), match="missing key|shape|match no module"):
        PeftModel.from_pretrained(tiny_gpt2(), directory)
    from transformers import LlamaConfig, LlamaForCausalLM
    wider = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(CheckpointError, match="has shape"):
        PeftModel.from_pretrained(wider, directory)


def test_save_is_atomic(tmp_path, monkeypatch):
    directory = _saved(tmp_path)
    good = (directory / "adapter_model.safetensors").read_bytes()
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    import safetensors.torch

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(directory)
    assert (directory / "adapter_model.safetensors").read_bytes() == good
    assert sorted(os.listdir(directory)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def test_generate_passes_through_with_adapter():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    out = model.generate(input_ids=token_batch(batch=1), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 9)
    assert model.config.vocab_size == 128  # attribute pass-through


def test_saved_files_get_the_umask_mode_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        directory = _saved(tmp_path)
    finally:
        os.umask(old)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (directory / name).stat().st_mode & 0o777 == 0o644, name
