"""Behaviour gaps between deltatune and peft 0.21 (issue 24, "A real drop-in for peft").

Each test pins one behaviour to peft's; where it is cheap the test runs peft itself beside us.
"""
from __future__ import annotations

import json
import re
import warnings

import peft
import pytest
import torch

import deltatune as dt
from deltatune.config import ConfigError, PeftConfig
from tests.conftest import tiny_llama, token_batch


def _write_config(tmp_path, **extra) -> str:
    data = {**dt.LoraConfig(r=4, target_modules=["q_proj"]).to_dict(), **extra}
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    return str(tmp_path)


def _two_adapters():
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("b", dt.LoraConfig(r=2, target_modules=["q_proj"]))
    return model.eval()


# -- 1. files from a newer peft ---------------------------------------------------------------
def test_unknown_key_from_newer_peft_loads_with_a_warning_naming_it(tmp_path):
    directory = _write_config(tmp_path, shiny_new_option=7, another_one=[1])
    with pytest.warns(UserWarning, match="another_one.*shiny_new_option"):
        config = dt.LoraConfig.from_pretrained(directory)
    assert config.r == 4 and config.target_modules == ["q_proj"]
    with pytest.warns(UserWarning, match="shiny_new_option"):  # peft too: warns and loads
        assert peft.LoraConfig.from_pretrained(directory).r == 4


def test_known_peft_feature_we_cannot_honour_is_still_refused(tmp_path):
    directory = _write_config(tmp_path, use_qalora=True)
    with pytest.raises(ConfigError, match="use_qalora"):
        dt.LoraConfig.from_pretrained(directory)


# -- 2. config API ------------------------------------------------------------------------------
def test_from_json_file_returns_the_dict(tmp_path):
    directory = _write_config(tmp_path)
    path = f"{directory}/adapter_config.json"
    assert PeftConfig.from_json_file(path) == peft.PeftConfig.from_json_file(path)
    assert dt.LoraConfig.from_json_file(path)["r"] == 4


def test_is_prompt_learning():
    assert not dt.LoraConfig().is_prompt_learning
    assert not dt.IA3Config().is_prompt_learning
    assert dt.PromptTuningConfig(num_virtual_tokens=2).is_prompt_learning
    assert dt.PrefixTuningConfig(num_virtual_tokens=2).is_prompt_learning
    assert dt.PromptEncoderConfig(num_virtual_tokens=2).is_prompt_learning
    assert peft.PromptTuningConfig(num_virtual_tokens=2).is_prompt_learning


def test_peft_type_keyword():
    assert dt.LoraConfig(peft_type="LORA", r=4).r == 4
    assert dt.LoraConfig(peft_type=dt.PeftType.LORA).peft_type is dt.PeftType.LORA
    with pytest.raises(ConfigError, match="peft_type.*IA3"):
        dt.LoraConfig(peft_type="IA3")


def test_peft_version_written_as_peft_does(tmp_path):
    dt.LoraConfig(r=4).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_version"] == dt.__version__
    assert "peft_version" in peft.LoraConfig().to_dict()
    loaded = dt.LoraConfig.from_pretrained(tmp_path)
    assert loaded.peft_version == dt.__version__
    assert dt.LoraConfig(peft_version="0.21.2").to_dict()["peft_version"] == "0.21.2"  # kept, as peft


# -- 3. wrong number of adapter_names ----------------------------------------------------------
@pytest.mark.parametrize("rows", [1, 3, 4])
def test_wrong_number_of_adapter_names_raises(rows):
    model = _two_adapters()
    with pytest.raises(ValueError, match=f"2.*{rows}"):
        model(token_batch(batch=rows), adapter_names=["default", "b"])


def test_generate_with_beams_still_mixes():
    model = _two_adapters()
    ids = token_batch(batch=2, length=4)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=["default", "b"],
                         max_new_tokens=2, num_beams=2, num_return_sequences=2, do_sample=False,
                         pad_token_id=0)
    assert out.shape[0] == 4
    with pytest.raises(ValueError, match="3.*2"):
        model.generate(input_ids=ids, adapter_names=["default", "b", "b"], max_new_tokens=1, pad_token_id=0)


# -- 4. disable_adapter and requires_grad --------------------------------------------------------
def test_disable_adapter_freezes_adapter_parameters_and_restores():
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    assert any(before.values())
    with model.disable_adapter():
        assert not any(p.requires_grad for n, p in model.named_parameters() if "lora" in n)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


# -- 5. deleting a merged adapter ----------------------------------------------------------------
def test_delete_merged_adapter_is_refused():
    model = _two_adapters()
    model.merge_adapter(["default"])
    with pytest.raises(ValueError, match="'default'.*unmerge"):
        model.delete_adapter("default")
    assert "default" in model.peft_config and model.adapter_set.merged == ["default"]
    model.unmerge_adapter()
    model.delete_adapter("default")
    assert list(model.peft_config) == ["b"]


# -- 6. from_pretrained(config=c) stores c ----------------------------------------------------------
def test_from_pretrained_stores_the_given_config(tmp_path):
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    config = dt.LoraConfig.from_pretrained(tmp_path)
    loaded = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path, config=config)
    assert loaded.peft_config["default"] is config
    assert config.inference_mode is True  # peft sets it on the given object too


# -- 7. merging a merged adapter warns ------------------------------------------------------------
def test_merging_a_merged_adapter_warns():
    model = _two_adapters()
    model.merge_adapter()
    with pytest.warns(UserWarning, match="already merged"):
        model.merge_adapter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.merge_adapter(["b"])  # a new one: no warning


def test_delete_and_merge_messages_begin_with_peft_s_sentence():
    """Code and tests written for peft match its error and warning text (pytest.raises(match=...))."""
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="Adapter unknown-adapter does not exist"):
        model.delete_adapter("unknown-adapter")
    model.merge_adapter()
    with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do"):
        model.merge_adapter()
    with pytest.raises(ValueError, match=re.escape("Cannot delete adapter(s) ['default'] while they are merged. "
                                                   "Please unmerge them first.")):
        model.delete_adapter("default")
    assert "default" in model.peft_config
