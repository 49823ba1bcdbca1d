"""Local stand-ins for the tiny random hub models peft's tests load, for a machine without the hub.

peft's test files load small random models by hub id (``peft-internal-testing/tiny-random-OPTForCausalLM``
and others). Here the network reaches only the package registries, so those loads fail for peft and
deltatune alike and the tests measure nothing. This module writes, into a Hugging Face cache
directory, a model of the same architecture under each id: random weights from a small config of
that ``model_type``, and the default model's tokenizer (SmolLM2's BPE; its ids fit every stand-in's
vocabulary). A stand-in is not the hub's file: absolute numbers a test compares against a stored
value would differ, but both runs (real peft and deltatune) see the same stand-ins, so the
comparison stays fair. Ids whose architecture needs more than a config (multimodal models, adapter
repositories, diffusion pipelines) are left out and their tests fail in both runs.

Usage::

    python benchmarks/hub_standins.py /tmp/hf-standins      # then HF_HOME=/tmp/hf-standins HF_HUB_OFFLINE=1
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

VOCAB = 49152  # SmolLM2's tokenizer: every stand-in's vocabulary holds its ids
SMALL = dict(vocab_size=VOCAB)
# hub id -> (transformers config class, model class, small config kwargs)
STANDINS = {
    "peft-internal-testing/tiny-random-OPTForCausalLM": ("OPTConfig", "OPTForCausalLM", dict(
        hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=16)),
    "peft-internal-testing/opt-125m": ("OPTConfig", "OPTForCausalLM", dict(
        hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32)),
    "trl-internal-testing/tiny-random-LlamaForCausalLM": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)),
    "hf-internal-testing/tiny-random-MistralForCausalLM": ("MistralConfig", "MistralForCausalLM", dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)),
    "peft-internal-testing/tiny-dummy-qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)),
    "trl-internal-testing/tiny-Qwen3ForCausalLM": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8)),
    "hf-internal-testing/tiny-random-Gemma3ForCausalLM": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, sliding_window=64)),
    "peft-internal-testing/tiny-random-GPT2LMHeadModel": ("GPT2Config", "GPT2LMHeadModel", dict(
        n_embd=16, n_layer=2, n_head=4)),
    "hf-internal-testing/tiny-random-gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=16, n_layer=2, n_head=4)),
    "peft-internal-testing/tiny-random-gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=16, n_layer=2, n_head=4)),
    "peft-internal-testing/tiny-random-GPTJForCausalLM": ("GPTJConfig", "GPTJForCausalLM", dict(
        n_embd=16, n_layer=2, n_head=4, rotary_dim=4)),
    "peft-internal-testing/tiny-random-BertModel": ("BertConfig", "BertModel", dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4)),
    "peft-internal-testing/tiny-random-RobertaForSequenceClassification": (
        "RobertaConfig", "RobertaForSequenceClassification", dict(
            hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4)),
    "peft-internal-testing/tiny-random-BartForConditionalGeneration": (
        "BartConfig", "BartForConditionalGeneration", dict(
            d_model=16, encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=4, decoder_attention_heads=4)),
    "peft-internal-testing/tiny-random-t5": ("T5Config", "T5ForConditionalGeneration", dict(
        d_model=16, d_ff=32, d_kv=4, num_layers=2, num_heads=4, decoder_start_token_id=0)),
}
SNAPSHOT = "0" * 40  # the commit name the cache layout needs; nothing is fetched


def write_standin(hub: Path, repo_id: str, spec, tokenizer_dir: Path) -> Path:
    """One id's cache entry (``models--org--name/{refs/main, snapshots/<commit>/...}``); returns its
    snapshot directory."""
    import torch
    import transformers

    config_cls, model_cls, kwargs = spec
    root = hub / ("models--" + repo_id.replace("/", "--"))
    snapshot = root / "snapshots" / SNAPSHOT
    snapshot.mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(SNAPSHOT)
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**SMALL, **kwargs)
    getattr(transformers, model_cls)(config).save_pretrained(snapshot)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, snapshot / name)
    return snapshot


def build(home: Path) -> list[str]:
    """Write every stand-in under ``home/hub`` (``HF_HOME=home``); returns the ids written."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from deltatune import models

    tokenizer_dir = home / "tokenizer"
    models.load_tokenizer().save_pretrained(tokenizer_dir)
    hub = home / "hub"
    written = []
    for repo_id, spec in STANDINS.items():
        write_standin(hub, repo_id, spec, tokenizer_dir)
        written.append(repo_id)
    (home / "standins.json").write_text(json.dumps(written, indent=1) + "\n")
    return written


def main(argv: list[str] | None = None) -> int:
    """Write the stand-ins into the directory given (a Hugging Face home)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("home", type=Path, help="the HF_HOME to fill (its hub/ cache)")
    args = parser.parse_args(argv)
    for repo_id in build(args.home):
        print("stand-in:", repo_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
