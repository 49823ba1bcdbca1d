"""Default target modules by ``model_type``: the same modules peft picks, written to the file."""
from __future__ import annotations

import json

import pytest
import torch

import deltatune
from deltatune.config import ConfigError
from deltatune.target_defaults import IA3_TARGETS, LORA_TARGETS, complete_targets
from tests.conftest import tiny_bert, tiny_convnet, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")


def _wrapped(model) -> set[str]:
    """Names of the modules holding an adapter layer (deltatune's or peft's)."""
    out = set()
    for name, module in model.named_modules():
        if hasattr(module, "base_layer") and ".base_layer" not in name and not name.endswith("base_layer"):
            out.add(name.removeprefix("base_model.model."))
    return out


def test_table_covers_peft_families():
    from peft.utils import constants as c

    assert set(c.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING) <= set(LORA_TARGETS)
    assert set(c.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING) <= set(IA3_TARGETS)
    for model_type, targets in c.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.items():
        ours = LORA_TARGETS[model_type]
        assert (ours == targets) if isinstance(targets, str) else set(ours) == set(targets), model_type
    for model_type, targets in c.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING.items():
        ours, ff = IA3_TARGETS[model_type]
        assert set(ours) == set(targets), model_type
        assert set(ff) == set(c.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING[model_type]), model_type


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2, tiny_bert], ids=["llama", "gpt2", "bert"])
def test_lora_without_targets_wraps_what_peft_wraps(build, tmp_path):
    task = None if build is tiny_bert else "CAUSAL_LM"
    ours = deltatune.get_peft_model(build(), deltatune.LoraConfig(task_type=task, r=4))
    theirs = peft.get_peft_model(build(), peft.LoraConfig(task_type=task, r=4))
    assert _wrapped(ours) == _wrapped(theirs) and _wrapped(ours)
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert sorted(saved) == sorted(theirs.peft_config["default"].target_modules)
    assert deltatune.PeftModel.from_pretrained(build(), tmp_path) is not None


def test_llama_lora_defaults_are_q_and_v():
    model = deltatune.get_peft_model(tiny_llama(), deltatune.LoraConfig(task_type="CAUSAL_LM"))
    assert model.peft_config["default"].target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2, tiny_bert], ids=["llama", "gpt2", "bert"])
def test_ia3_without_targets_matches_peft(build, tmp_path):
    """Same modules, same feed-forward split (the vector shapes tell input from output scaling)."""
    ours = deltatune.get_peft_model(build(), deltatune.IA3Config())
    theirs = peft.get_peft_model(build(), peft.IA3Config())
    assert _wrapped(ours) == _wrapped(theirs)
    mine = {k: v.shape for k, v in ours.base_model.adapter_state("default").items()}
    assert mine == {k.removeprefix("base_model.model."): v.shape
                    for k, v in peft.get_peft_model_state_dict(theirs).items()}
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    config = theirs.peft_config["default"]
    assert sorted(saved["target_modules"]) == sorted(config.target_modules)
    assert sorted(saved["feedforward_modules"]) == sorted(config.feedforward_modules)
    ids = torch.randint(0, 128, (2, 5))
    loaded = peft.PeftModel.from_pretrained(build(), tmp_path)  # peft reads the resolved file
    torch.testing.assert_close(loaded(input_ids=ids).logits, ours(input_ids=ids).logits)


def test_ia3_given_targets_take_the_family_feedforward_defaults():
    """peft fills feedforward_modules from the table even when target_modules is given; a table
    entry outside the given list becomes the equivalent regex (the subset rule still holds)."""
    ours = deltatune.get_peft_model(tiny_llama(), deltatune.IA3Config(target_modules=["v_proj", "down_proj"]))
    assert ours.peft_config["default"].feedforward_modules == ["down_proj"]
    ours = deltatune.get_peft_model(tiny_llama(), deltatune.IA3Config(target_modules=["v_proj", "mlp.down_proj"]))
    theirs = peft.get_peft_model(tiny_llama(), peft.IA3Config(target_modules=["v_proj", "mlp.down_proj"]))
    mine = {k: v.shape for k, v in ours.base_model.adapter_state("default").items()}
    assert mine == {k.removeprefix("base_model.model."): v.shape
                    for k, v in peft.get_peft_model_state_dict(theirs).items()}


def test_unknown_model_lists_leaf_names():
    with pytest.raises(ConfigError, match=r"no config.model_type.*\['embed', 'conv', 'point', 'head'\]"):
        deltatune.get_peft_model(tiny_convnet(), deltatune.IA3Config())
    model = tiny_llama()
    model.config.model_type = "brand_new"
    with pytest.raises(ConfigError, match=r"'brand_new' has no default.*'q_proj'.*'down_proj'"):
        deltatune.get_peft_model(model, deltatune.LoraConfig())


def test_complete_targets_leaves_given_configs_alone():
    config = deltatune.LoraConfig(target_modules=["o_proj"])
    assert complete_targets(config, tiny_llama()) is config
    prompt = deltatune.PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM")
    assert complete_targets(prompt, tiny_llama()) is prompt


def test_dry_run_and_select_use_the_defaults():
    """``deltatune targets`` and LoftQ's pre-quantization ask targeting directly: same defaults."""
    from deltatune import targeting

    lines = targeting.dry_run(tiny_llama(), deltatune.LoraConfig()).splitlines()
    assert [line.split()[0].rsplit(".", 1)[-1] for line in lines] == ["q_proj", "v_proj"] * 2
    assert targeting.select(tiny_llama(), deltatune.IA3Config())[:3] == [
        "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj", "model.layers.0.mlp.down_proj"]
