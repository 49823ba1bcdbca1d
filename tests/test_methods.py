"""Shared behaviour of every registered adapter method, on a tiny Llama.

The method list comes from the registry, so a newly registered method is tested without edits
here: save -> load gives the same logits, merge == unmerged (or a clear refusal for methods that
cannot merge), disabled == base exactly, a few AdamW steps lower the loss and leave the base
weights bit-identical. Method-specific checks for DoRA, (IA)³ and bottleneck adapters follow.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import deltatune
from deltatune import registry
from deltatune.checkpoint.peft_format import read_config as load_config
from deltatune.config import ConfigError
from deltatune.methods.base import AdapterLayer
from deltatune.methods.bottleneck import AdapterConfig, BottleneckConfig, BottleneckLayer
from deltatune.checkpoint.peft_format import adapter_summary
from deltatune.methods.dora import row_norms
from deltatune.methods.lora import LoraLinear
from deltatune.methods.ia3 import IA3Config
from tests.conftest import logits_of as _all_logits
from tests.conftest import (perturb_trainable, tiny_bert, tiny_gpt2, tiny_llama, token_batch,
                            train_steps)

# Arguments for methods whose defaults do not fit the tiny Llama; any other method gets
# target_modules=["q_proj", "v_proj"] if its config has that field, else no arguments.
TINY_LLAMA_KWARGS = {
    "lora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "dora": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "ia3": dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "adapter": dict(reduction_factor=4),
    "pfeiffer": dict(bottleneck_size=6, non_linearity="gelu"),
    "prompt": dict(num_virtual_tokens=4),
    "prefix": dict(num_virtual_tokens=4),
    "ptuning": dict(num_virtual_tokens=4, encoder_hidden_size=16),
}


def _kwargs(name: str) -> dict:
    if name in TINY_LLAMA_KWARGS:
        return TINY_LLAMA_KWARGS[name]
    cls = registry.config_class_for(registry._ALIASES[name][0])
    has_targets = any(f.name == "target_modules" for f in dataclasses.fields(cls))
    return dict(target_modules=["q_proj", "v_proj"]) if has_targets else {}


def _distinct_methods() -> list[str]:
    """One CLI name per distinct configuration (aliases such as ``houlsby`` = ``bottleneck`` once).

    A method whose config cannot be built from ``_kwargs`` stays in the list, so its tests fail
    with the reason instead of the method silently going untested.
    """
    seen, names = set(), []
    for name in registry.method_names():
        try:
            key = json.dumps(registry.make_config(name, **_kwargs(name)).to_dict(), sort_keys=True, default=str)
        except Exception as exc:  # noqa: BLE001  (reported by the tests themselves)
            key = f"{name}: {exc}"
        if key not in seen:
            seen.add(key)
            names.append(name)
    return names


METHODS = _distinct_methods()


def _config(name: str):
    try:
        return registry.make_config(name, **_kwargs(name))
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"cannot build a tiny-Llama config for method {name!r} ({exc}); "
                    "add its arguments to TINY_LLAMA_KWARGS in tests/test_methods.py")


def _wrapped(name: str, seed: int = 123):
    model = deltatune.get_peft_model(tiny_llama(), _config(name))
    perturb_trainable(model, seed=seed)   # a trained-looking adapter, not the identity
    return model


def _mergeable(model) -> bool:
    """The method's declared capability (declared once, on the method)."""
    return registry.method_of(model.peft_config["default"]).mergeable


def logits_of(model, ids):
    """The real tokens' logits (prompt and P-tuning put their virtual positions first, as peft)."""
    out = _all_logits(model, ids)
    return out[:, -ids.shape[1]:] if out.dim() == 3 else out


def _virtual_tokens(model) -> bool:
    """Adapters that are components (virtual tokens) rather than wrapped layers."""
    return len(model.base_model.components) > 0


def test_registry_has_the_issue_methods():
    assert {"lora", "dora", "ia3", "adapter", "bottleneck", "pfeiffer", "houlsby", "prompt", "prefix",
            "ptuning"} <= set(registry.method_names())
    assert registry.make_config("dora").use_dora is True
    assert registry.make_config("pfeiffer").adapter_type == "pfeiffer"


@pytest.mark.parametrize("name", METHODS)
def test_config_json_round_trip(name, tmp_path):
    config = _config(name)
    config.save(tmp_path)
    assert load_config(tmp_path) == config


@pytest.mark.parametrize("name", METHODS)
def test_fresh_adapter_is_the_base(name):
    ids = token_batch()
    model = deltatune.get_peft_model(tiny_llama(), _config(name))
    if _virtual_tokens(model):  # extra inputs change the output from the start; the real positions keep the shape
        full, base = _all_logits(model, ids), _all_logits(tiny_llama(), ids)
        n = model.peft_config["default"].num_virtual_tokens if model.peft_config["default"].peft_type.value in (
            "PROMPT_TUNING", "P_TUNING") else 0
        assert full.shape == (base.shape[0], base.shape[1] + n, base.shape[2])
        return
    torch.testing.assert_close(logits_of(model, ids), logits_of(tiny_llama(), ids), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", METHODS)
def test_save_load_same_logits(name, tmp_path):
    ids = token_batch()
    model = _wrapped(name)
    model.save_pretrained(tmp_path)
    expected = logits_of(model, ids)
    assert not torch.allclose(expected, logits_of(tiny_llama(), ids), atol=1e-4), "adapter had no effect"
    loaded = deltatune.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits_of(loaded, ids), expected, rtol=0, atol=1e-6)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == model.peft_config["default"].peft_type.value
    summary = adapter_summary(tmp_path)
    assert summary["modules"] == len(list(model.base_model.adapter_layers()))
    saved = sum(t.numel() for t in model.base_model.adapter_state("default").values())
    assert summary["parameters"] == saved
    if not any(getattr(c, "reparameterized", False) for c in model.base_model.components.values()):
        assert saved == model.get_nb_trainable_parameters()[0]   # (P-tuning saves its encoder's output)


@pytest.mark.parametrize("name", METHODS)
def test_merge_equals_unmerged(name):
    ids = token_batch()
    model = _wrapped(name)
    expected = logits_of(model, ids)
    if not _mergeable(model):
        with pytest.raises(NotImplementedError, match="cannot be merged.*unload"):
            model.merge_and_unload()
        torch.testing.assert_close(logits_of(model, ids), expected, rtol=0, atol=0)  # nothing changed
        return
    model.merge_adapter()
    torch.testing.assert_close(logits_of(model, ids), expected, rtol=0, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(logits_of(model, ids), expected, rtol=0, atol=1e-5)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    torch.testing.assert_close(logits_of(plain, ids), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", METHODS)
def test_disabled_is_base_exactly(name):
    ids = token_batch()
    model = _wrapped(name)
    adapted = logits_of(model, ids)
    with model.disable_adapter():
        assert torch.equal(logits_of(model, ids), logits_of(tiny_llama(), ids))
    assert torch.equal(logits_of(model, ids), adapted)


@pytest.mark.parametrize("name", METHODS)
def test_unload_gives_base_back(name):
    ids = token_batch()
    plain = _wrapped(name).unload()
    assert torch.equal(logits_of(plain, ids), logits_of(tiny_llama(), ids))


@pytest.mark.parametrize("name", METHODS)
def test_training_lowers_loss_and_keeps_base(name):
    torch.manual_seed(0)
    ids = token_batch(batch=4, length=12, seed=3)
    model = deltatune.get_peft_model(tiny_llama(), _config(name))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and any(p.requires_grad for p in model.parameters())
    losses = train_steps(model, ids, steps=6, lr=1e-2)
    assert losses[-1] < losses[0] - 1e-3, losses
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"base parameter {n} changed"


# -- DoRA ----------------------------------------------------------------------------------------

def test_dora_norm_without_dense_copy_matches_dense():
    g = torch.Generator().manual_seed(0)
    W, A, B = torch.randn(40, 24, generator=g), torch.randn(4, 24, generator=g), torch.randn(40, 4, generator=g)
    dense = torch.linalg.vector_norm(W + 0.7 * B @ A, dim=1)
    torch.testing.assert_close(row_norms(W, A, B, 0.7), dense, rtol=1e-5, atol=1e-5)


def test_dora_eval_cache_follows_weight_changes():
    """Cached norms in eval mode are dropped when the factors or the base weight change in place."""
    ids = token_batch()
    model = deltatune.get_peft_model(tiny_llama(), deltatune.LoraConfig(use_dora=True, r=4, target_modules=["q_proj"]))
    model.eval()
    logits_of(model, ids)                       # fills the caches
    perturb_trainable(model)                    # in-place change of A, B, m
    cached = logits_of(model, ids)
    for _, layer in model.base_model.adapter_layers():
        layer._norm_cache.clear()
        layer._base_sq = None
    torch.testing.assert_close(cached, logits_of(model, ids), rtol=0, atol=0)


def test_dora_eval_cache_dropped_after_fused_optimizer_training():
    """Fused optimizers write parameters without bumping version counters; train() clears the cache."""
    ids = token_batch()
    model = deltatune.get_peft_model(tiny_llama(), deltatune.LoraConfig(use_dora=True, r=4, target_modules=["q_proj"]))
    model.eval()
    before = logits_of(model, ids)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, fused=True)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    model.eval()
    after = logits_of(model, ids)
    assert not torch.allclose(before, after)
    for _, layer in model.base_model.adapter_layers():
        layer._norm_cache.clear()
    torch.testing.assert_close(after, logits_of(model, ids), rtol=0, atol=0)


def test_dora_layer_also_holds_plain_lora():
    ids = token_batch()
    model = deltatune.get_peft_model(tiny_llama(), deltatune.LoraConfig(use_dora=True, r=4, target_modules=["q_proj"]))
    model.add_adapter("plain", deltatune.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraLinear) and "plain" not in layer.lora_magnitude_vector
    model.set_adapter("plain")
    out = logits_of(model, ids)
    model.merge_adapter()
    torch.testing.assert_close(logits_of(model, ids), out, rtol=0, atol=1e-5)


def test_dora_joins_a_plain_lora_layer_but_another_method_is_refused():
    model = deltatune.get_peft_model(tiny_llama(), deltatune.LoraConfig(r=4, target_modules=["q_proj"]))
    model.add_adapter("d", deltatune.LoraConfig(use_dora=True, r=4, target_modules=["q_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraLinear) and list(layer.lora_magnitude_vector) == ["d"]
    with pytest.raises(ConfigError, match="already holds a LoraLinear"):
        model.add_adapter("i", IA3Config(target_modules=["q_proj"]))


def test_dora_dropout_training_runs_and_merges():
    ids = token_batch()
    cfg = deltatune.LoraConfig(use_dora=True, r=4, lora_dropout=0.1, target_modules=["c_attn", "c_proj"])
    model = deltatune.get_peft_model(tiny_gpt2(), cfg)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    perturb_trainable(model)
    out = logits_of(model, ids)
    torch.testing.assert_close(logits_of(model.merge_and_unload(), ids), out, rtol=0, atol=1e-5)


# -- (IA)³ --------------------------------------------------------------------------------------

def test_ia3_feedforward_must_be_targeted():
    with pytest.raises(ConfigError, match="subset"):
        IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])


def test_ia3_vector_sides():
    model = deltatune.get_peft_model(tiny_llama(), IA3Config(target_modules=["k_proj", "down_proj"],
                                                             feedforward_modules=["down_proj"]))
    block = model.base_model.model.model.layers[0]
    assert tuple(block.self_attn.k_proj.ia3_l["default"].shape) == (16, 1)   # output side
    assert tuple(block.mlp.down_proj.ia3_l["default"].shape) == (1, 64)      # input side


# -- bottleneck adapters ------------------------------------------------------------------------

def _wrapped_names(model):
    return [n for n, layer in model.base_model.adapter_layers() if isinstance(layer, BottleneckLayer)]


def test_houlsby_and_pfeiffer_placement():
    houlsby = deltatune.get_peft_model(tiny_llama(), AdapterConfig())
    assert _wrapped_names(houlsby) == [f"model.layers.{i}.{m}" for i in (0, 1)
                                       for m in ("self_attn.o_proj", "mlp.down_proj")]
    pfeiffer = deltatune.get_peft_model(tiny_llama(), AdapterConfig(adapter_type="pfeiffer"))
    assert _wrapped_names(pfeiffer) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def test_bottleneck_sizes_and_zero_init():
    layer = deltatune.get_peft_model(tiny_llama(), AdapterConfig(reduction_factor=8)) \
        .base_model.model.model.layers[0].mlp.down_proj
    assert tuple(layer.adapter_down["default"].weight.shape) == (4, 32)
    assert torch.count_nonzero(layer.adapter_up["default"].weight) == 0
    layer = deltatune.get_peft_model(tiny_llama(), BottleneckConfig(bottleneck_size=5)) \
        .base_model.model.model.layers[0].self_attn.o_proj
    assert tuple(layer.adapter_up["default"].weight.shape) == (32, 5)
    default = AdapterConfig()
    assert default.size_for(576) == 36          # reduction_factor 16 when neither is given


@pytest.mark.parametrize("kwargs, match", [
    (dict(reduction_factor=4, bottleneck_size=8), "not both"),
    (dict(bottleneck_size=0), "positive"),
    (dict(adapter_type="parallel"), "adapter_type"),
    (dict(non_linearity="softmax"), "non_linearity"),
    (dict(attn_output_modules=None), "houlsby"),
])
def test_bottleneck_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        AdapterConfig(**kwargs)


def test_bottleneck_file_layout(tmp_path):
    from safetensors.torch import load_file

    deltatune.get_peft_model(tiny_llama(), AdapterConfig(bottleneck_size=4)).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "DELTATUNE_BOTTLENECK"
    assert {"adapter_type", "attn_output_modules", "ffn_output_modules", "reduction_factor",
            "bottleneck_size", "non_linearity"} <= set(data)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.0.self_attn.o_proj."
    assert {k[len(prefix):]: tuple(v.shape) for k, v in tensors.items() if k.startswith(prefix)} == {
        "adapter_down.weight": (4, 32), "adapter_down.bias": (4,),
        "adapter_up.weight": (32, 4), "adapter_up.bias": (32,)}
    assert len(tensors) == 16


@pytest.mark.parametrize("build, kwargs", [
    (tiny_gpt2, dict(attn_output_modules=["attn.c_proj"], ffn_output_modules=["mlp.c_proj"])),
    (tiny_bert, dict(task_type="SEQ_CLS", attn_output_modules=["attention.output.dense"],
                     ffn_output_modules=r".*layer\.\d+\.output\.dense")),
])
def test_bottleneck_other_architectures(build, kwargs, tmp_path):
    ids = token_batch()
    model = deltatune.get_peft_model(build(), AdapterConfig(**kwargs))
    assert len(_wrapped_names(model)) == 4
    perturb_trainable(model)
    model.save_pretrained(tmp_path)
    loaded = deltatune.PeftModel.from_pretrained(build(), tmp_path)
    torch.testing.assert_close(logits_of(loaded, ids), logits_of(model, ids), rtol=0, atol=1e-6)
