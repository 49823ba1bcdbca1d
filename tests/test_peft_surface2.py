"""peft surface, second part: the base model's state dict under its original keys, ``_get_submodules``
and the per-adapter attribute names peft's tests read.

Checked against peft 0.21 (installed as a yardstick) side by side: the same keys and values from
``get_base_model_state_dict`` on the same model and config, the same strict-load errors, and the
same ``(parent, target, name)`` triples.
"""
from __future__ import annotations

import copy
from operator import attrgetter

import pytest
import torch
from torch import nn

import deltatune

peft = pytest.importorskip("peft")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.lin0 = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.lin1 = nn.Linear(8, 4)
        self.register_buffer("steps", torch.zeros(()))

    def forward(self, x):
        return self.lin1(self.norm(self.lin0(self.emb(x))))


CONFIGS = {
    "lora": dict(target_modules=["lin0", "emb"]),
    "dora-saved": dict(target_modules=["lin0"], use_dora=True, modules_to_save=["lin1"]),
    "all-linear": dict(target_modules=["lin0", "lin1"], bias="all"),
}


def _pair(config: dict):
    torch.manual_seed(0)
    base = Net()
    ours = deltatune.get_peft_model(copy.deepcopy(base), deltatune.LoraConfig(**config))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    return base, ours, theirs


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_base_state_dict_matches_peft_and_the_base(name):
    base, ours, theirs = _pair(CONFIGS[name])
    got, want = deltatune.get_base_model_state_dict(ours), peft.get_base_model_state_dict(theirs)
    assert set(got) == set(want) == set(base.state_dict())
    for key, value in base.state_dict().items():
        assert torch.equal(got[key], value), key


def test_base_state_dict_leaves_out_every_adapter():
    _, ours, _ = _pair(CONFIGS["dora-saved"])
    ours.add_adapter("other", deltatune.LoraConfig(target_modules=["emb", "lin0"], r=2))
    got = deltatune.get_base_model_state_dict(ours)
    assert set(got) == set(Net().state_dict())
    adapter_storage = {t.data_ptr() for name in ("default", "other")
                       for t in deltatune.get_peft_model_state_dict(ours, adapter_name=name).values()
                       if t.data_ptr() not in {p.data_ptr() for p in Net().parameters()}}
    saved_copy = ours.base_model.model.lin1.modules_to_save["default"].weight.data_ptr()
    assert saved_copy in adapter_storage
    assert not adapter_storage & {v.data_ptr() for v in got.values()}


def test_set_base_state_dict_round_trip():
    base, ours, _ = _pair(CONFIGS["dora-saved"])
    factors = {k: v.clone() for k, v in deltatune.get_peft_model_state_dict(ours).items()}
    with torch.no_grad():
        for p in ours.get_base_model().parameters():
            p.add_(1.0)
    result = deltatune.set_base_model_state_dict(ours, base.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    for key, value in deltatune.get_base_model_state_dict(ours).items():
        assert torch.equal(value, base.state_dict()[key]), key
    # adapter tensors were perturbed above and are not touched by the load
    for key, value in deltatune.get_peft_model_state_dict(ours).items():
        assert torch.equal(value, factors[key] + 1.0), key


@pytest.mark.parametrize("problem", ["missing", "unexpected"])
def test_set_base_state_dict_strict_errors_like_peft(problem):
    _, ours, theirs = _pair(CONFIGS["lora"])
    state = deltatune.get_base_model_state_dict(ours)
    if problem == "missing":
        del state["lin0.weight"]
    else:
        state["nowhere.weight"] = torch.zeros(2)
    words = "Missing key" if problem == "missing" else "Unexpected key"
    for module, model in ((deltatune, ours), (peft, theirs)):
        with pytest.raises(RuntimeError, match=words):
            module.set_base_model_state_dict(model, dict(state), strict=True)
    ours_result = deltatune.set_base_model_state_dict(ours, dict(state), strict=False)
    theirs_result = peft.set_base_model_state_dict(theirs, dict(state), strict=False)
    assert ours_result.missing_keys == theirs_result.missing_keys
    assert ours_result.unexpected_keys == theirs_result.unexpected_keys


def test_base_state_dict_of_injected_model():
    torch.manual_seed(0)
    model = Net()
    want = {k: v.clone() for k, v in model.state_dict().items()}
    deltatune.inject_adapter_in_model(deltatune.LoraConfig(target_modules=["lin0"]), model)
    got = deltatune.get_base_model_state_dict(model)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_get_submodules_matches_peft():
    from peft.utils import _get_submodules as theirs_get

    _, ours, theirs = _pair(CONFIGS["dora-saved"])
    ours_names = [n for n, _ in ours.named_modules()]
    for key in ["", "base_model", "base_model.model.lin0", "base_model.model.lin0.base_layer", "base_model.model.norm"]:
        parent, target, name = deltatune._get_submodules(ours, key)
        assert key in ours_names
        assert target is ours.get_submodule(key) and name == key.rpartition(".")[2]
        assert getattr(parent, name) is target if name else parent is ours
        t_parent, t_target, t_name = theirs_get(theirs, key)
        assert t_name == name and type(t_target).__name__ == type(target).__name__ or "lora" in type(t_target).__module__
    with pytest.raises(AttributeError):
        deltatune._get_submodules(ours, "base_model.model.nowhere")


def test_adapter_attribute_names_hold_every_adapter_and_forget_deleted():
    _, ours, _ = _pair(CONFIGS["dora-saved"])
    ours.add_adapter("gone", deltatune.LoraConfig(target_modules=["lin0"], use_dora=True, modules_to_save=["lin1"]))
    layer, saved = ours.base_model.model.lin0, ours.base_model.model.lin1
    assert set(layer.adapter_layer_names) == {"lora_A", "lora_B", "lora_magnitude_vector"}
    assert {"r", "lora_alpha", "scaling", "lora_dropout"} <= set(layer.other_param_names)
    assert saved.adapter_layer_names == ("modules_to_save",)
    for target in (layer, saved):
        for attr in target.adapter_layer_names + target.other_param_names:
            assert "gone" in attrgetter(attr)(target) or attr.startswith("_"), attr
    ours.delete_adapter("gone")
    for target in (layer, saved):
        for attr in target.adapter_layer_names + target.other_param_names:
            assert "gone" not in attrgetter(attr)(target), attr
            assert "default" in attrgetter(attr)(target) or attr.startswith("_"), attr


class Tower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 5)
        self.fc1 = nn.Linear(5, 10)
        self.fc2 = nn.Linear(10, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(self.emb(x))))


def _trainable(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_mica_init_matches_peft_and_trains_only_a(tmp_path):
    torch.manual_seed(0)
    base, x = Tower(), torch.arange(7).unsqueeze(0)
    config = dict(target_modules=["emb", "fc1"], init_lora_weights="mica", r=3)
    ours = deltatune.get_peft_model(copy.deepcopy(base), deltatune.LoraConfig(**config))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    assert _trainable(ours) == _trainable(theirs) == ["base_model.model.emb.lora_embedding_A.default",
                                                      "base_model.model.fc1.lora_A.default.weight"]
    got, want = deltatune.get_peft_model_state_dict(ours), peft.get_peft_model_state_dict(theirs)
    assert sorted(got) == sorted(want)
    for key in got:
        if ".lora_A" in key or "lora_embedding_A" in key:
            assert not got[key].any(), key
        else:  # B: the same minor subspace (singular vectors are defined up to sign)
            assert torch.allclose(got[key] @ got[key].T, want[key] @ want[key].T, atol=1e-5), key
    assert torch.allclose(ours(x), base(x))
    # a training step moves A only; B stays the minor components
    b_before = ours.base_model.model.fc1.lora_B["default"].weight.clone()
    optimizer = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
    ours(x).pow(2).sum().backward()
    optimizer.step()
    assert torch.equal(ours.base_model.model.fc1.lora_B["default"].weight, b_before)
    assert ours.base_model.model.fc1.lora_A["default"].weight.any()
    # the file loads in peft with the same outputs and B frozen there too
    ours.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    assert torch.allclose(loaded(x), ours(x), atol=1e-6)
    assert _trainable(loaded) == _trainable(ours)


def test_mica_keeps_b_frozen_across_adapters_and_refuses_a_large_rank():
    ours = deltatune.get_peft_model(Tower(), deltatune.LoraConfig(target_modules=["fc1"], init_lora_weights="mica",
                                                                  r=4))
    ours.add_adapter("other", deltatune.LoraConfig(target_modules=["fc1", "fc2"], init_lora_weights="mica", r=4))
    ours.set_adapter("other")
    assert _trainable(ours) == ["base_model.model.fc1.lora_A.other.weight", "base_model.model.fc2.lora_A.other.weight"]
    ours.set_adapter("default")
    assert _trainable(ours) == ["base_model.model.fc1.lora_A.default.weight"]
    with pytest.raises(ValueError, match=r"MiCA requires `r` <= min.*fc1"):
        deltatune.get_peft_model(Tower(), deltatune.LoraConfig(target_modules=["fc1"], init_lora_weights="mica", r=6))
