"""``config.py`` reads and writes ``adapter_config.json`` itself; ``checkpoint/`` calls it."""
from __future__ import annotations

import json

import pytest

import deltatune
from deltatune import config as config_module
from deltatune import registry
from deltatune.checkpoint import peft_format
from deltatune.config import ConfigError, LoraConfig, PeftConfig


def _one_of_each():
    return [LoraConfig(r=4, target_modules=["q_proj"]), deltatune.IA3Config(target_modules=["k_proj"]),
            deltatune.AdapterConfig(bottleneck_size=4), deltatune.PromptTuningConfig(num_virtual_tokens=3),
            deltatune.PrefixTuningConfig(num_virtual_tokens=3), deltatune.PromptEncoderConfig(num_virtual_tokens=3)]


def test_every_registered_method_has_its_config_class_in_the_config_table():
    """PeftConfig.from_pretrained picks the class from config.py's own table (it may not import the
    registry): a method the registry knows but the table lacks could not be read back."""
    for peft_type in registry.METHOD_MODULES:
        assert config_module.config_class(peft_type) is registry.config_class_for(peft_type)


@pytest.mark.parametrize("config", _one_of_each(), ids=lambda c: c.peft_type.value)
def test_save_then_from_pretrained_on_the_base_class_gives_the_same_config(tmp_path, config):
    config.save_pretrained(tmp_path / "a")
    back = PeftConfig.from_pretrained(tmp_path / "a")
    assert type(back) is type(config) and back == config
    assert peft_format.read_config(tmp_path / "a") == config


def test_the_file_decides_the_class_as_in_peft(tmp_path):
    deltatune.IA3Config(target_modules=["k_proj"]).save_pretrained(tmp_path)
    assert isinstance(LoraConfig.from_pretrained(tmp_path), deltatune.IA3Config)


def test_save_pretrained_overrides_and_atomic_write(tmp_path):
    config = LoraConfig(r=4, target_modules=["q_proj"])
    config.save_pretrained(tmp_path, inference_mode=True)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["inference_mode"] is True and config.inference_mode is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json"]  # no temp file left


def test_errors_name_the_file_and_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        PeftConfig.from_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "NOPE"}')
    with pytest.raises(ConfigError, match=r"adapter_config.json: peft_type 'NOPE' is not supported; known: .*LORA"):
        PeftConfig.from_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"r": 4}')
    with pytest.raises(ConfigError, match="missing required keys: {'peft_type'}"):
        PeftConfig.from_pretrained(tmp_path)
