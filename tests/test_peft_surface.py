"""peft's surface beyond the basics (issue 24): dtype autocast, save/load options, the tuner and
model attributes peft users reach for, the task classes, LoraConfig options and four behaviour bugs.

Each test pins one behaviour to peft 0.21's; where it is cheap, peft itself runs beside us.
"""
from __future__ import annotations

import re

import peft
import pytest
import torch
import yaml
from torch import nn

import deltatune as dt
from deltatune.config import ConfigError
from tests.conftest import tiny_bert, tiny_llama, token_batch


def _lora(**kw):
    return dt.LoraConfig(**{"r": 2, "target_modules": ["q_proj", "v_proj"], **kw})


def _adapter_dtypes(model) -> set:
    return {p.dtype for n, p in model.named_parameters() if "lora_" in n}


# -- 1. autocast_adapter_dtype -------------------------------------------------------------------
@pytest.mark.parametrize("autocast, expected", [(True, torch.float32), (False, torch.bfloat16)])
def test_autocast_adapter_dtype_everywhere(tmp_path, autocast, expected):
    model = dt.get_peft_model(tiny_llama().to(torch.bfloat16), _lora(), autocast_adapter_dtype=autocast)
    model.add_adapter("other", _lora(), autocast_adapter_dtype=autocast)
    assert _adapter_dtypes(model) == {expected}
    model(token_batch())  # runs with either dtype
    model.save_pretrained(tmp_path)
    loaded = dt.PeftModel.from_pretrained(tiny_llama().to(torch.bfloat16), tmp_path, autocast_adapter_dtype=autocast)
    loaded.load_adapter(tmp_path / "other", "other", autocast_adapter_dtype=autocast)
    assert _adapter_dtypes(loaded) == {expected}
    reference = peft.get_peft_model(tiny_llama().to(torch.bfloat16),
                                    peft.LoraConfig(r=2, target_modules=["q_proj"]), autocast_adapter_dtype=autocast)
    assert {p.dtype for n, p in reference.named_parameters() if "lora_" in n} == {expected}


# -- 2. save and load options ----------------------------------------------------------------------
def test_save_writes_a_model_card_like_peft(tmp_path):
    base = tiny_llama()
    base.config._name_or_path = "org/tiny-llama"
    model = dt.get_peft_model(base, _lora(task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    meta = yaml.safe_load(re.search(r"---\n(.*?)\n---", text, re.DOTALL).group(1))
    assert meta["library_name"] == "peft" and meta["base_model"] == "org/tiny-llama"
    assert {"lora", "deltatune", "transformers", "base_model:adapter:org/tiny-llama"} <= set(meta["tags"])
    assert meta["pipeline_tag"] == "text-generation"
    assert f"deltatune {dt.__version__}" in text
    (tmp_path / "README.md").write_text(text + "\nmy notes\n")
    model.save_pretrained(tmp_path)  # an existing card is kept and updated, as peft does
    assert "my notes" in (tmp_path / "README.md").read_text()


def test_safe_serialization_false_writes_and_reads_bin(tmp_path):
    model = dt.get_peft_model(tiny_llama(), _lora(init_lora_weights=False)).eval()
    ids = token_batch()
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").exists() and not (tmp_path / "adapter_model.safetensors").exists()
    loaded = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)  # peft reads our .bin
    torch.testing.assert_close(theirs(ids).logits, model(ids).logits)
    model.save_pretrained(tmp_path)  # back to safetensors: the stale .bin goes
    assert (tmp_path / "adapter_model.safetensors").exists() and not (tmp_path / "adapter_model.bin").exists()


@pytest.mark.parametrize("option, saved", [(True, True), (False, False), ("auto", True)])
def test_save_embedding_layers(tmp_path, option, saved):
    from safetensors.torch import load_file

    config = dt.LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"])
    dt.get_peft_model(tiny_llama(), config).save_pretrained(tmp_path, save_embedding_layers=option)
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert any(k.endswith("embed_tokens.base_layer.weight") for k in keys) is saved


def test_save_embedding_layers_true_without_targeting_embeddings(tmp_path):
    from safetensors.torch import load_file

    dt.get_peft_model(tiny_llama(), _lora()).save_pretrained(tmp_path, save_embedding_layers=True)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.embed_tokens.weight" in keys and "base_model.model.lm_head.weight" in keys


def test_load_adapter_returns_the_load_result(tmp_path):
    model = dt.get_peft_model(tiny_llama(), _lora())
    model.save_pretrained(tmp_path)
    result = model.load_adapter(tmp_path, adapter_name="other")
    assert result.missing_keys == [] and result.unexpected_keys == []


# -- 3. tuner and model surface ------------------------------------------------------------------
def test_base_model_set_adapter_and_active_adapters():
    model = dt.get_peft_model(tiny_llama(), _lora())
    model.add_adapter("b", _lora())
    model.base_model.set_adapter(["b"])
    assert model.active_adapters == ["b"] and model.base_model.active_adapters == ["b"]
    assert model.active_adapter == "b"
    model.base_model.set_adapter("default")
    assert model.base_model.active_adapter == "default"
    with pytest.raises(NotImplementedError, match="several active adapters"):
        model.base_model.set_adapter(["default", "b"])
    with pytest.raises(ValueError, match="'nope'"):
        model.base_model.set_adapter("nope")


def test_attributes_forward_through_base_model():
    model = dt.get_peft_model(tiny_llama(), _lora())
    assert model.base_model.config is model.get_base_model().config  # LoraModel forwards to the model
    assert model.base_model.lm_head is model.get_base_model().lm_head
    assert model.prefix == "lora_" and model.base_model.prefix == "lora_"
    assert model.active_peft_config is model.peft_config["default"]
    with pytest.raises(AttributeError, match="no_such_thing"):
        model.no_such_thing


def test_prompt_encoder_and_modules_to_save_attributes():
    prompt = dt.get_peft_model(tiny_llama(), dt.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    assert isinstance(prompt.prompt_encoder, nn.ModuleDict) and "default" in prompt.prompt_encoder
    assert prompt.modules_to_save is None
    seq = dt.get_peft_model(tiny_bert(), dt.LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    assert seq.modules_to_save == {"classifier", "score"}  # as peft: the task's heads
    reference = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    assert seq.modules_to_save == reference.modules_to_save


def test_disable_and_enable_adapter_layers():
    model = dt.get_peft_model(tiny_llama(), _lora(init_lora_weights=False)).eval()
    ids = token_batch()
    base, adapted = tiny_llama()(ids).logits, model(ids).logits
    model.base_model.disable_adapter_layers()
    torch.testing.assert_close(model(ids).logits, base)
    model.base_model.enable_adapter_layers()
    torch.testing.assert_close(model(ids).logits, adapted)
    model.disable_adapter_layers()  # on the PeftModel too, as peft forwards it
    torch.testing.assert_close(model(ids).logits, base)
    model.enable_adapter_layers()


def test_prepare_model_for_gradient_checkpointing():
    base = tiny_llama()
    model = dt.get_peft_model(base, _lora())
    assert model.prepare_model_for_gradient_checkpointing(base) is base
    embeds = base.get_input_embeddings()(token_batch())
    assert embeds.requires_grad  # inputs require grad, so checkpointed layers see a graph


def test_push_to_hub_offline_is_a_clear_error():
    model = dt.get_peft_model(tiny_llama(), _lora())
    with pytest.raises(ConnectionError, match="push_to_hub.*offline.*save_pretrained"):
        model.push_to_hub("me/adapter")


# -- 4. task classes -------------------------------------------------------------------------------
@pytest.mark.parametrize("task, cls", [("CAUSAL_LM", "PeftModelForCausalLM"), ("SEQ_CLS", "PeftModelForSequenceClassification"),
                                       ("TOKEN_CLS", "PeftModelForTokenClassification"),
                                       ("QUESTION_ANS", "PeftModelForQuestionAnswering"),
                                       ("SEQ_2_SEQ_LM", "PeftModelForSeq2SeqLM"),
                                       ("FEATURE_EXTRACTION", "PeftModelForFeatureExtraction")])
def test_get_peft_model_picks_the_task_class(task, cls):
    model = dt.get_peft_model(tiny_llama(), _lora(task_type=task))
    assert type(model).__name__ == cls and isinstance(model, getattr(dt, cls)) and isinstance(model, dt.PeftModel)
    assert issubclass(getattr(peft, cls), peft.PeftModel)  # the names peft exposes


def test_task_class_from_pretrained_and_direct(tmp_path):
    dt.get_peft_model(tiny_llama(), _lora(task_type="CAUSAL_LM")).save_pretrained(tmp_path)
    assert isinstance(dt.PeftModel.from_pretrained(tiny_llama(), tmp_path), dt.PeftModelForCausalLM)
    assert type(dt.get_peft_model(tiny_llama(), _lora())) .__name__ == "PeftModel"
    direct = dt.PeftModelForCausalLM(tiny_llama(), _lora())
    assert isinstance(direct, dt.PeftModelForCausalLM) and direct.active_adapter == "default"


# -- 5. LoraConfig options ----------------------------------------------------------------------------
def test_orthogonal_init_starts_as_the_base():
    ids = token_batch()
    model = dt.get_peft_model(tiny_llama(), _lora(init_lora_weights="orthogonal", r=4)).eval()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert A.abs().sum() > 0 and B.abs().sum() > 0
    torch.testing.assert_close(B @ A, torch.zeros_like(B @ A), atol=1e-5, rtol=0)
    torch.testing.assert_close(model(ids).logits, tiny_llama()(ids).logits, atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="orthogonal.*even"):
        dt.LoraConfig(r=3, init_lora_weights="orthogonal")


def test_olora_init_keeps_the_output_and_reads_qr():
    ids = token_batch()
    base = tiny_llama()
    W = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    model = dt.get_peft_model(base, _lora(init_lora_weights="olora", r=4, lora_alpha=4)).eval()
    torch.testing.assert_close(model(ids).logits, tiny_llama()(ids).logits, atol=1e-4, rtol=0)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    Q, R = torch.linalg.qr(W)
    torch.testing.assert_close(layer.lora_B["default"].weight.abs(), Q[:, :4].abs(), atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.lora_A["default"].weight.abs(), R[:4].abs(), atol=1e-5, rtol=0)
    merged = model.merge_and_unload()  # the residual plus the delta: the original weight again
    torch.testing.assert_close(merged.model.layers[0].self_attn.q_proj.weight, W, atol=1e-5, rtol=0)


# -- 6. bugs ----------------------------------------------------------------------------------------
class _KwHead(nn.Module):
    """A head called with keywords only, returning a tuple (a transformers-style output)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 3)

    def forward(self, hidden=None, scale=1.0):
        out = self.proj(hidden) * scale
        return out, out.sum(-1)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(4, 4)
        self.head = _KwHead()

    def forward(self, x):
        return self.head(hidden=self.body(x), scale=2.0)


def test_modules_to_save_called_with_keywords_and_returning_a_tuple():
    model = dt.get_peft_model(_Net(), dt.LoraConfig(r=2, target_modules=["body"], modules_to_save=["head"]))
    model.add_adapter("b", dt.LoraConfig(r=2, target_modules=["body"], modules_to_save=["head"]))
    with torch.no_grad():
        model.base_model.model.head.modules_to_save["b"].proj.weight.add_(1.0)
    x = torch.randn(3, 4)
    logits, total = model(x)  # keywords only: worked before only with a positional input
    assert logits.shape == (3, 3) and total.shape == (3,)
    mixed = model(x, adapter_names=["default", "b", "__base__"])
    model.set_adapter("b")
    alone_b = model(x)
    torch.testing.assert_close(mixed[0][1], alone_b[0][1])
    torch.testing.assert_close(mixed[1][1], alone_b[1][1])
    torch.testing.assert_close(mixed[0][0], logits[0])


def test_add_weighted_adapter_with_modules_to_save():
    model = dt.get_peft_model(tiny_bert(), dt.LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    model.add_adapter("plain", dt.LoraConfig(r=2, target_modules=["query"]))
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].weight.add_(1.0)
    model.add_weighted_adapter(["default", "plain"], [0.5, 0.5], "mix", combination_type="cat")
    assert "classifier" in model.peft_config["mix"].modules_to_save
    saved = model.base_model.model.classifier.modules_to_save
    torch.testing.assert_close(saved["mix"].weight, saved["default"].weight)  # the one trained copy
    model.add_adapter("second", dt.LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match="classifier"):  # two copies of one module: as peft, refused
        model.add_weighted_adapter(["default", "second"], [0.5, 0.5], "bad", combination_type="cat")


@pytest.mark.parametrize("config", [dt.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
                                    dt.PromptEncoderConfig(num_virtual_tokens=3, task_type="CAUSAL_LM",
                                                           encoder_hidden_size=16)])
def test_virtual_token_logits_include_the_virtual_positions(config):
    ids = token_batch(batch=2, length=5)
    model = dt.get_peft_model(tiny_llama(), config).eval()
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    assert out.logits.shape[:2] == (2, 3 + 5)  # peft's shape: virtual positions first
    # the virtual rows are what the model predicts after each virtual token, the rest the real tokens'
    table = model.base_model.components["default"]().detach()              # (n, d)
    full = tiny_llama()(inputs_embeds=torch.cat([table[None].expand(2, -1, -1),
                                                 tiny_llama().get_input_embeddings()(ids)], 1)).logits
    torch.testing.assert_close(out.logits, full, atol=1e-4, rtol=0)
    # the loss is peft's: labels shifted over the joined sequence, the virtual positions ignored
    labels = torch.cat([torch.full((2, 3), -100), ids], 1)
    expected = nn.functional.cross_entropy(full[:, :-1].reshape(-1, full.shape[-1]), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected, atol=1e-4, rtol=0)
    model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=0)  # still generates


# -- config surface --------------------------------------------------------------------------------
def test_invalid_task_type_message_is_peft_s():
    with pytest.raises(ConfigError, match="Invalid task type: 'nope'. Must be one of the following task types: "
                                          "SEQ_CLS, SEQ_2_SEQ_LM, CAUSAL_LM, TOKEN_CLS, QUESTION_ANS, FEATURE_EXTRACTION."):
        dt.LoraConfig(task_type="nope")


def test_config_from_pretrained_subfolder_and_hub_id(tmp_path, monkeypatch):
    import huggingface_hub

    dt.LoraConfig(r=4).save_pretrained(tmp_path / "sub")
    assert dt.LoraConfig.from_pretrained(tmp_path, subfolder="sub").r == 4
    asked = {}

    def download(repo_id, filename, subfolder=None, revision=None, **_):
        asked.update(repo=repo_id, revision=revision, subfolder=subfolder)
        return str(tmp_path / "sub" / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert dt.PeftConfig.from_pretrained("org/adapter", revision="v1").r == 4
    assert asked == {"repo": "org/adapter", "revision": "v1", "subfolder": None}


def test_modules_to_save_attributes_come_from_the_applied_copy():
    model = dt.get_peft_model(_Net(), dt.LoraConfig(r=2, target_modules=["body"], modules_to_save=["head"]))
    model.add_adapter("b", dt.LoraConfig(r=2, target_modules=["body"], modules_to_save=["head"]))
    head = model.base_model.model.head
    assert head.proj is head.modules_to_save["default"].proj  # as peft: the active adapter's copy
    model.set_adapter("b")
    assert head.proj is head.modules_to_save["b"].proj
    with model.disable_adapter():
        assert head.proj is head.original_module.proj


def test_unknown_keys_warn_with_peft_s_message_and_a_file_without_peft_type_is_a_type_error(tmp_path):
    import json

    dt.LoraConfig(r=4).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**data, "foobar": "baz", "spam": 123}))
    with pytest.warns(UserWarning, match=r"^Unexpected keyword arguments \['foobar', 'spam'\] for class LoraConfig, "
                                         r"these are ignored\. \("):
        dt.LoraConfig.from_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"foo": "bar"}')
    with pytest.raises(TypeError, match=r"missing required keys: \{'peft_type'\}"):
        dt.LoraConfig.from_pretrained(tmp_path)
