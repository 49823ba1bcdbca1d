"""Bookkeeping bugs of issue 15, each with the behaviour peft gives (or the truthful one)."""
from __future__ import annotations

import copy
import os

import peft
import pytest
import torch

import deltatune
from deltatune import LoraConfig, PeftModel, TaskType, get_peft_model
from deltatune.adapter_set import MixingError
from tests.conftest import logits_of, perturb_trainable, tiny_bert, tiny_llama, token_batch

TARGETS = ["q_proj", "v_proj", "o_proj"]


def _two_adapters(**extra):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False, **extra))
    model.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj", "k_proj"], init_lora_weights=False, **extra))
    return model.eval()


def _alone(model, name, ids):
    previous = model.active_adapter
    model.set_adapter(name)
    out = logits_of(model, ids)
    model.set_adapter(previous)
    return out


def _two_heads():
    """A classifier whose two adapters each train their own copy of the head (modules_to_save)."""
    model = get_peft_model(tiny_bert(), LoraConfig(task_type=TaskType.SEQ_CLS, r=2, target_modules=["query"]))
    model.add_adapter("b", LoraConfig(task_type=TaskType.SEQ_CLS, r=2, target_modules=["value"]))
    for name in ("default", "b"):
        model.set_adapter(name)
        perturb_trainable(model, seed=ord(name[0]))
    model.set_adapter("default")
    return model.eval()


@pytest.mark.parametrize("build", [_two_adapters, _two_heads], ids=["lora", "modules_to_save"])
def test_merge_and_unload_named_adapter_merges_only_that_one(build):
    ids = token_batch()
    model = build()
    expected = _alone(model, "b", ids)
    merged = model.merge_and_unload(adapter_names=["b"])
    torch.testing.assert_close(logits_of(merged, ids), expected, rtol=0, atol=1e-5)


def test_safe_merge_refuses_non_finite_and_leaves_every_layer_unmerged():
    ids = token_batch()
    model = _two_adapters()
    before = logits_of(model, ids)
    layer = model.base_model.model.model.layers[1].self_attn.k_proj
    with torch.no_grad():
        layer.lora_B["b"].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        model.merge_and_unload(adapter_names=["b"], safe_merge=True)
    assert model.adapter_set.merged == []
    torch.testing.assert_close(logits_of(model, ids), before, rtol=0, atol=0)


def test_set_adapter_after_merge_unmerges_first_with_a_warning():
    ids = token_batch()
    model = _two_adapters()
    expected_b = _alone(model, "b", ids)
    model.merge_adapter()
    with pytest.warns(UserWarning, match="unmerging adapter"):
        model.set_adapter("b")
    assert model.adapter_set.merged == []
    torch.testing.assert_close(logits_of(model, ids), expected_b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_biases_are_per_adapter_and_disabled_means_the_base(bias, tmp_path):
    from tests.conftest import tiny_gpt2

    ids = token_batch()
    base_logits = logits_of(tiny_gpt2(), ids)
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], bias=bias))
    model.add_adapter("plain", LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    perturb_trainable(model, scale=0.2)   # trains default's factors and biases
    model.eval()
    trained = logits_of(model, ids)
    assert (trained - base_logits).abs().max() > 1e-3
    with model.disable_adapter():
        torch.testing.assert_close(logits_of(model, ids), base_logits, rtol=0, atol=0)
    # The other adapter does not see default's biases ...
    plain = _alone(model, "plain", ids)
    fresh = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"]))
    fresh.add_adapter("plain", copy.deepcopy(model.peft_config["plain"]))
    fresh.base_model.load_state_dict({k: v for k, v in model.base_model.state_dict().items() if ".plain" in k},
                                     strict=False)
    fresh.set_adapter("plain")
    torch.testing.assert_close(plain, logits_of(fresh.eval(), ids), rtol=0, atol=0)
    # ... and switching back gives default's trained biases again; files carry them.
    torch.testing.assert_close(logits_of(model, ids), trained, rtol=0, atol=0)
    model.set_adapter("plain")
    model.save_pretrained(tmp_path, selected_adapters=["default"])
    loaded = PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    torch.testing.assert_close(logits_of(loaded, ids), trained, rtol=0, atol=1e-6)
    theirs = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path).eval()
    torch.testing.assert_close(logits_of(theirs, ids), trained, rtol=0, atol=1e-5)
    # unload() is the base exactly.
    model.set_adapter("default")
    torch.testing.assert_close(logits_of(model.unload(), ids), base_logits, rtol=0, atol=0)


def test_trained_biases_refuse_mixed_batches():
    from tests.conftest import tiny_gpt2

    model = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], bias="all"))
    model.add_adapter("b", LoraConfig(r=2, target_modules=["c_attn"]))
    with pytest.raises(MixingError, match="biases"):
        model(input_ids=token_batch(), adapter_names=["default", "b"])


def test_peft_seq_cls_adapter_with_head_and_lora_only_bias_loads(tmp_path):
    ids = token_batch()
    config = peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"],
                             modules_to_save=["classifier"], bias="lora_only")
    theirs = peft.get_peft_model(tiny_bert(), config)
    perturb_trainable(theirs)
    theirs.eval().save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    torch.testing.assert_close(logits_of(loaded, ids), logits_of(theirs, ids), rtol=0, atol=1e-5)
    # and ours writes no key peft would not (no classifier.base_layer.bias)
    out = tmp_path / "ours"
    loaded.save_pretrained(out)
    from safetensors import safe_open

    with safe_open(out / "adapter_model.safetensors", "pt") as fh, \
            safe_open(tmp_path / "adapter_model.safetensors", "pt") as ref:
        assert set(fh.keys()) == set(ref.keys())


def test_disable_adapter_on_a_merged_model_unmerges_once(monkeypatch):
    from deltatune import registry

    ids = token_batch()
    model = _two_adapters()
    unmerged = logits_of(model, ids)
    model.merge_adapter()
    writes = []
    real = registry.set_weight
    monkeypatch.setattr(registry, "set_weight", lambda m, w: (writes.append(m), real(m, w)))
    with pytest.warns(UserWarning, match="stay unmerged"):
        with model.disable_adapter():
            torch.testing.assert_close(logits_of(model, ids), logits_of(tiny_llama(), ids), rtol=0, atol=1e-5)
    assert len(writes) == 2 * len(TARGETS)   # one unmerge per wrapped layer, no re-merge
    assert model.adapter_set.merged == []
    torch.testing.assert_close(logits_of(model, ids), unmerged, rtol=0, atol=1e-5)


def test_save_writes_config_and_weights_together_or_not_at_all(tmp_path, monkeypatch):
    from deltatune.checkpoint import peft_format

    ids = token_batch()
    model = _two_adapters()
    model.save_pretrained(tmp_path)
    (tmp_path / "README.md").write_text("mine")
    first = logits_of(PeftModel.from_pretrained(tiny_llama(), tmp_path), ids)
    # A second save with another scaling that dies after the weights, before the config:
    model.peft_config["default"] = copy.deepcopy(model.peft_config["default"])
    for _, layer in model.base_model.adapter_layers():
        if "default" in layer.scaling:
            layer.scaling["default"] *= 3
    monkeypatch.setattr(peft_format, "write_config", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "b"]
    torch.testing.assert_close(logits_of(PeftModel.from_pretrained(tiny_llama(), tmp_path), ids), first,
                               rtol=0, atol=0)
    monkeypatch.undo()
    model.save_pretrained(tmp_path, selected_adapters=["b"])   # the root's default files are kept
    assert "mine" in (tmp_path / "README.md").read_text()  # kept; its header gains peft's card keys
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "b"]


def test_registry_resolves_methods_from_its_table_in_any_import_order():
    import subprocess
    import sys

    code = ("from deltatune import registry\n"
            "m = registry.method_for('LORA')\n"
            "from deltatune.config import LoraConfig\n"
            "import torch\n"
            "print(m.layer_class_for(torch.nn.Linear(2, 2), LoraConfig(use_dora=True)).__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "LoraLinear"      # one class holds LoRA and DoRA adapters


def test_config_module_imports_nothing_from_the_package_at_import_time():
    import ast
    import inspect

    import deltatune.config as config

    tree = ast.parse(inspect.getsource(config))
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not [n for n in top if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("deltatune")]
    assert deltatune.LoraConfig is config.LoraConfig


@pytest.mark.parametrize("rslora", [False, True])
def test_pissa_saved_as_plain_lora_loads_anywhere_on_the_original_base(tmp_path, rslora):
    from deltatune.checkpoint.convert import require_plain_lora
    from deltatune.checkpoint.io import CheckpointError
    from deltatune.checkpoint.peft_format import read_config

    ids = token_batch()
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, use_rslora=rslora, target_modules=TARGETS,
                                                    init_lora_weights="pissa"))
    model.peft_config["default"].init_lora_weights = True   # peft's recipe for the initial save
    model.save_pretrained(tmp_path / "init")
    model.peft_config["default"].init_lora_weights = "pissa"
    perturb_trainable(model, scale=0.05)                      # "training"
    model.eval()
    trained = logits_of(model, ids)
    model.save_pretrained(tmp_path / "pissa")
    with pytest.raises(CheckpointError, match="path_initial_model_for_weight_conversion"):
        require_plain_lora(read_config(tmp_path / "pissa"), tmp_path / "pissa")
    model.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=tmp_path / "init")
    config = read_config(tmp_path / "plain")
    assert config.r == 8 and config.init_lora_weights is True
    require_plain_lora(config, tmp_path / "plain")
    for load in (PeftModel.from_pretrained, peft.PeftModel.from_pretrained):
        loaded = load(tiny_llama(), tmp_path / "plain").eval()
        torch.testing.assert_close(logits_of(loaded, ids), trained, rtol=0, atol=1e-4)
    # The same file merged by plain arithmetic on the original weights (what vLLM does):
    merged = PeftModel.from_pretrained(tiny_llama(), tmp_path / "plain").merge_and_unload()
    torch.testing.assert_close(logits_of(merged, ids), trained, rtol=0, atol=1e-4)


def test_failed_pissa_add_gives_the_base_weights_back(monkeypatch):
    from deltatune.methods.lora import LoraLinear

    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    before = {k: v.clone() for k, v in model.base_model.model.state_dict().items()}
    real = LoraLinear.add_adapter

    def add(self, name, config, module_name):
        if module_name.endswith("layers.1.self_attn.v_proj"):
            raise RuntimeError("out of memory")     # after layer 0's v_proj took PiSSA's residual
        return real(self, name, config, module_name)

    monkeypatch.setattr(LoraLinear, "add_adapter", add)
    with pytest.raises(RuntimeError, match="out of memory"):
        model.add_adapter("p", LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights="pissa"))
    after = model.base_model.model.state_dict()
    assert set(after) == set(before) and "p" not in model.peft_config
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=1e-5)
