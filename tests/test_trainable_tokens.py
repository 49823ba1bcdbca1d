"""LoRA's ``trainable_token_indices``: a few embedding rows trained in full beside LoRA.

Against peft 0.21 (installed as a yardstick): the same rows give the same logits, files cross in
both directions with the same keys, on an untied model (Llama) and a tied one (GPT-2, whose head
follows the embedding's rows). Within deltatune: training moves only the named rows, merging
equals the unmerged output and unmerging restores the base, disable gives the base, errors name
the module.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import deltatune
from deltatune.adapter_set import MixingError
from deltatune.config import ConfigError
from deltatune.peft_model.call import mixing_problem
from deltatune.tuner.trainable_tokens import TrainableTokensWrapper
from tests.conftest import logits_of, tiny_gpt2, tiny_llama, train_steps

peft = pytest.importorskip("peft")

ROWS = [1, 5, 7]
IDS = torch.tensor([[1, 2, 5, 7, 9, 1], [7, 7, 3, 5, 1, 0]])
BUILDS = {"llama": tiny_llama, "gpt2-tied": tiny_gpt2}
TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2-tied": ["c_attn"]}


def config(lib, model: str, indices=None):
    return lib.LoraConfig(target_modules=TARGETS[model], init_lora_weights=False,
                          trainable_token_indices=ROWS if indices is None else indices)


def set_rows(peft_model, seed: int = 3) -> torch.Tensor:
    """Stand-in for training: new values for the adapter's rows (same values in either library)."""
    delta = peft_model.get_input_embeddings().token_adapter.trainable_tokens_delta["default"]
    values = torch.randn(delta.shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        delta.copy_(values)
    return values


def close(a, b, atol=1e-5):
    torch.testing.assert_close(a, b, rtol=0, atol=atol)


@pytest.mark.parametrize("model", BUILDS)
def test_same_rows_give_peft_logits_and_files_cross_both_ways(model, tmp_path):
    build = BUILDS[model]
    torch.manual_seed(11)
    ours = deltatune.get_peft_model(build(), config(deltatune, model)).eval()
    torch.manual_seed(11)
    theirs = peft.get_peft_model(build(), config(peft, model)).eval()
    set_rows(ours), set_rows(theirs)
    theirs.load_state_dict(ours.state_dict(), strict=False)  # the same LoRA factors (same parameter names)
    close(logits_of(ours, IDS), logits_of(theirs, IDS))
    assert not torch.allclose(logits_of(ours, IDS), logits_of(build(), IDS))
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    mine, reference = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "theirs"))
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in reference.items()}
    assert any(k.endswith("token_adapter.trainable_tokens_delta") for k in mine)
    loaded_peft = peft.PeftModel.from_pretrained(build(), tmp_path / "ours").eval()
    close(logits_of(loaded_peft, IDS), logits_of(ours, IDS))
    loaded_ours = deltatune.PeftModel.from_pretrained(build(), tmp_path / "theirs").eval()
    close(logits_of(loaded_ours, IDS), logits_of(theirs, IDS))


def test_training_changes_only_the_named_rows_and_the_tied_head_follows():
    model = deltatune.get_peft_model(tiny_gpt2(), config(deltatune, "gpt2-tied"))
    wrapper = model.get_input_embeddings()
    assert isinstance(wrapper, TrainableTokensWrapper)
    head = model.base_model.model.lm_head
    assert isinstance(head, TrainableTokensWrapper) and head.token_adapter.tied_adapter is wrapper.token_adapter
    base_weight = wrapper.base_layer.weight.detach().clone()
    losses = train_steps(model, IDS, steps=4)
    assert losses[-1] < losses[0]
    assert torch.equal(wrapper.base_layer.weight, base_weight)            # the base stays frozen
    delta = wrapper.token_adapter.trainable_tokens_delta["default"]
    assert not torch.allclose(delta, base_weight[ROWS])                   # the named rows trained
    seen = wrapper.weight.detach()                                         # the weight the model sees
    others = [i for i in range(seen.shape[0]) if i not in ROWS]
    assert torch.equal(seen[others], base_weight[others])
    # one set of rows saved once, under the embedding (the head reads the same Parameter)
    keys = [k for k in model.base_model.adapter_state("default") if "trainable_tokens" in k]
    assert keys == ["transformer.wte.token_adapter.trainable_tokens_delta"]


@pytest.mark.parametrize("model", BUILDS)
def test_merge_equals_unmerged_and_unmerge_restores_the_base(model):
    build = BUILDS[model]
    peft_model = deltatune.get_peft_model(build(), config(deltatune, model)).eval()
    set_rows(peft_model)
    base_weight = peft_model.get_input_embeddings().base_layer.weight.detach().clone()
    expected = logits_of(peft_model, IDS)
    with peft_model.disable_adapter():
        close(logits_of(peft_model, IDS), logits_of(build(), IDS))
    peft_model.merge_adapter()
    close(logits_of(peft_model, IDS), expected, atol=1e-4)
    peft_model.unmerge_adapter()
    assert torch.equal(peft_model.get_input_embeddings().base_layer.weight, base_weight)
    merged = peft_model.merge_and_unload()
    assert isinstance(merged.get_input_embeddings(), nn.Embedding)
    close(logits_of(merged, IDS), expected, atol=1e-4)


def test_dict_form_names_modules_and_errors_name_them():
    model = deltatune.get_peft_model(tiny_llama(), config(deltatune, "llama", {"embed_tokens": [0, 2]}))
    assert model.base_model.model.model.embed_tokens.token_adapter.token_indices == {"default": [0, 2]}
    with pytest.raises(ValueError, match="nope"):
        deltatune.get_peft_model(tiny_llama(), config(deltatune, "llama", {"nope": [0]}))
    with pytest.raises(ValueError, match="modules_to_save"):
        deltatune.get_peft_model(tiny_llama(), deltatune.LoraConfig(
            target_modules=["q_proj"], modules_to_save=["embed_tokens"], trainable_token_indices={"embed_tokens": [0]}))
    with pytest.raises(ConfigError, match="out of range"):
        deltatune.get_peft_model(tiny_llama(), config(deltatune, "llama", [1000]))


def test_delete_adapter_unwraps_and_mixed_batches_are_refused_by_name():
    model = deltatune.get_peft_model(tiny_gpt2(), config(deltatune, "gpt2-tied"))
    model.add_adapter("other", config(deltatune, "gpt2-tied", [2, 3]))
    wrapper = model.get_input_embeddings()
    assert set(wrapper.token_adapter.trainable_tokens_delta) == {"default", "other"}
    with pytest.raises(MixingError, match="trainable tokens"):
        model(input_ids=IDS, adapter_names=["default", "other"])
    assert "trainable tokens" in mixing_problem(model, "other")  # the rule the server refuses an adapter by
    model.delete_adapter("other")
    assert set(wrapper.token_adapter.trainable_tokens_original) == {"default"}
    model.delete_adapter("default")
    assert isinstance(model.base_model.model.transformer.wte, nn.Embedding)
    assert isinstance(model.base_model.model.lm_head, nn.Linear)


# -- ensure_weight_tying (deltatune.tuner.tying) ------------------------------------------------------
class _Config:
    def __init__(self, tie: bool) -> None:
        self.tie_word_embeddings = tie

    def to_dict(self) -> dict:
        return {"tie_word_embeddings": self.tie_word_embeddings}


class TiedLM(nn.Module):
    """An LM whose head is the input embedding's weight (tie_word_embeddings, as transformers ties)."""

    _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, tie: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Module()
        self.model.embed_tokens, self.model.linear = nn.Embedding(50, 16), nn.Linear(16, 16)
        self.lm_head = nn.Linear(16, 50, bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight
        self.config = _Config(tie)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def forward(self, x):
        return self.lm_head(self.model.linear(self.model.embed_tokens(x)))


TYING = {"saved": dict(target_modules=["linear"], modules_to_save=["embed_tokens"]),
         "target": dict(target_modules=["linear", "lm_head"])}


def _move_embedding_adapter(model, seed: int = 5) -> None:
    """Stand-in for training, on the embedding's side only (the tied head must follow)."""
    g = torch.Generator().manual_seed(seed)
    emb = model.base_model.model.model.embed_tokens
    tensors = [emb.modules_to_save["default"].weight] if hasattr(emb, "modules_to_save") else \
        [emb.lora_embedding_A["default"], emb.lora_embedding_B["default"]]
    with torch.no_grad():
        for t in tensors:
            t.add_(torch.randn(t.shape, generator=g))


@pytest.mark.parametrize("kind", TYING)
def test_tied_head_follows_the_embedding_like_peft_and_files_cross(kind, tmp_path):
    x = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    ours = deltatune.get_peft_model(TiedLM(), deltatune.LoraConfig(ensure_weight_tying=True, **TYING[kind]))
    theirs = peft.get_peft_model(TiedLM(), peft.LoraConfig(ensure_weight_tying=True, **TYING[kind]))
    theirs.load_state_dict(ours.state_dict(), strict=False)  # the same linear LoRA factors
    _move_embedding_adapter(ours), _move_embedding_adapter(theirs)
    close(ours(x), theirs(x), atol=1e-4)
    assert not torch.allclose(ours(x), TiedLM()(x))
    head = ours.base_model.model.lm_head
    if kind == "target":  # the head's factors are the embedding's, transposed: one storage, trained once
        emb = ours.base_model.model.model.embed_tokens
        assert head.lora_A["default"].weight.data_ptr() == emb.lora_embedding_B["default"].data_ptr()
        assert not any("lm_head" in n for n, p in ours.named_parameters() if p.requires_grad)
    ours.save_pretrained(tmp_path / "ours", save_embedding_layers=False)  # peft's "auto" reads the base's
    theirs.save_pretrained(tmp_path / "theirs", save_embedding_layers=False)  # config.json; none here
    mine, reference = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "theirs"))
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in reference.items()}
    close(peft.PeftModel.from_pretrained(TiedLM(), tmp_path / "ours")(x), ours(x), atol=1e-4)
    close(deltatune.PeftModel.from_pretrained(TiedLM(), tmp_path / "theirs")(x), theirs(x), atol=1e-4)


def test_tying_warnings_name_what_is_missing():
    with pytest.warns(UserWarning, match="no tied modules were found"):
        deltatune.get_peft_model(TiedLM(tie=False), deltatune.LoraConfig(ensure_weight_tying=True, **TYING["saved"]))
    with pytest.warns(UserWarning, match="no tied modules are added"):
        deltatune.get_peft_model(TiedLM(), deltatune.LoraConfig(ensure_weight_tying=True, target_modules=["linear"]))
    with pytest.warns(UserWarning, match="`ensure_weight_tying` is not set to True"):
        model = deltatune.get_peft_model(TiedLM(), deltatune.LoraConfig(**TYING["saved"]))
    assert isinstance(model.base_model.model.lm_head, nn.Linear)  # not asked: not tied


def test_tied_module_names_match_peft_and_follow_the_config_flag():
    from peft.utils.other import _get_module_names_tied_with_embedding as theirs

    from deltatune.tuner.tying import _get_module_names_tied_with_embedding as ours

    for build in (tiny_gpt2, TiedLM, tiny_llama):
        assert ours(build()) == theirs(build())
    assert ours(TiedLM()) == ["lm_head"]
    assert ours(TiedLM(tie=False)) == []
    wrapped = deltatune.get_peft_model(TiedLM(), deltatune.LoraConfig(target_modules=["linear"]))
    assert wrapped._get_module_names_tied_with_embedding() == ["lm_head"] == ours(wrapped)


def test_rows_of_an_embedding_lora_already_wraps_are_refused_by_name():
    with pytest.raises(ConfigError, match="embed_tokens already holds a LoraEmbedding"):
        deltatune.get_peft_model(tiny_llama(), deltatune.LoraConfig(target_modules=["embed_tokens"],
                                                                    trainable_token_indices=[0, 1]))
