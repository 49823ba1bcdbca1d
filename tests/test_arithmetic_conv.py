"""add_weighted_adapter on LoRA convolutions of every dimensionality (Conv1d/2d/3d)."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from deltatune import LoraConfig, get_peft_model, merging


@pytest.mark.parametrize("conv", [nn.Conv1d, nn.Conv2d, nn.Conv3d])
@pytest.mark.parametrize("kind", ["svd", "cat", "linear"])
def test_weighted_conv_adapter_runs_and_svd_cat_are_exact(conv, kind):
    """The combined factors keep the kernel layout of the sources (svd used to restore it for
    Conv2d only, and Conv1d/3d failed to load); 'cat' and full-rank 'svd' give the weighted sum."""
    torch.manual_seed(0)
    peft = get_peft_model(nn.Sequential(conv(3, 4, 3)), LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    peft.add_adapter("b", LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # 'linear' warns that it is not exact
        peft.add_weighted_adapter(["default", "b"], [0.5, 0.25], "c", combination_type=kind, svd_rank=4)
    layer = peft.base_model.model[0]
    state = {name: peft.base_model.adapter_state(name) for name in ("default", "b", "c")}
    assert state["c"]["0.lora_A.weight"].shape[1:] == state["b"]["0.lora_A.weight"].shape[1:]
    x = torch.randn(2, 3, *[6] * (layer.get_base_layer().weight.dim() - 2))
    peft.set_adapter("c")
    assert peft(x).shape == peft.base_model.model[0].get_base_layer()(x).shape
    if kind != "linear":
        def delta(name, w):
            s = peft.peft_config[name].lora_alpha / peft.peft_config[name].r
            return merging.lora_delta(state[name]["0.lora_A.weight"], state[name]["0.lora_B.weight"], s * w)
        torch.testing.assert_close(delta("c", 1.0), delta("default", 0.5) + delta("b", 0.25), atol=1e-5, rtol=1e-4)
