"""peft options deltatune does not honour warn, naming the option, instead of being dropped silently."""
from __future__ import annotations

import warnings

import pytest
from torch import nn

from deltatune import LoraConfig, PeftModel, get_peft_model
from deltatune.functional import inject_adapter_in_model, set_peft_model_state_dict


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


def _config() -> LoraConfig:
    return LoraConfig(r=16, target_modules=["0", "2"])


def test_low_cpu_mem_usage_true_warns_everywhere_peft_takes_it():
    with pytest.warns(UserWarning, match="low_cpu_mem_usage=True"):
        peft = get_peft_model(_mlp(), _config(), low_cpu_mem_usage=True)
    with pytest.warns(UserWarning, match=r"add_adapter\('b'\).*low_cpu_mem_usage"):
        peft.add_adapter("b", _config(), low_cpu_mem_usage=True)
    with pytest.warns(UserWarning, match="inject_adapter_in_model.*low_cpu_mem_usage"):
        model = inject_adapter_in_model(_config(), _mlp(), low_cpu_mem_usage=True)
    with pytest.warns(UserWarning, match="set_peft_model_state_dict.*low_cpu_mem_usage"):
        set_peft_model_state_dict(model, {}, low_cpu_mem_usage=True)


def test_default_options_stay_quiet_and_unknown_load_options_warn(tmp_path):
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*not supported by deltatune")
        peft = get_peft_model(_mlp(), _config(), low_cpu_mem_usage=False)
        peft.save_pretrained(tmp_path)
        PeftModel.from_pretrained(_mlp(), tmp_path, low_cpu_mem_usage=False, subfolder=None)
    with pytest.warns(UserWarning, match=r"from_pretrained: .*torch_device='cpu'"):
        loaded = PeftModel.from_pretrained(_mlp(), tmp_path, torch_device="cpu")
    with pytest.warns(UserWarning, match=r"load_adapter\('b'\): ephemeral_gpu_offload=True"):
        loaded.load_adapter(tmp_path, "b", ephemeral_gpu_offload=True)


def test_subfolder_is_honoured(tmp_path):
    get_peft_model(_mlp(), _config()).save_pretrained(tmp_path / "sub")
    peft = PeftModel.from_pretrained(_mlp(), tmp_path, subfolder="sub")
    peft.load_adapter(tmp_path, "b", subfolder="sub")
    assert set(peft.peft_config) == {"default", "b"}
