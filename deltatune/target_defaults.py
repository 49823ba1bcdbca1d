"""Default ``target_modules`` per model family, so ``LoraConfig(task_type="CAUSAL_LM")`` needs no list.

peft fills an unset ``target_modules`` from the base's ``config.model_type`` (its tables in
``peft.utils.constants``); the same families get the same defaults here, so a config written for
peft selects the same modules and the saved ``adapter_config.json`` lists the same targets.

- LoRA (and DoRA, a LoRA variant): the attention query and value projections in most families.
- (IA)³: keys, values and one feed-forward projection; ``feedforward_modules`` names the
  feed-forward ones (they scale their input, the others their output).

A model whose ``model_type`` is not in the table (or a plain ``nn.Module`` without a config) gets
an error listing the leaf module names it could target. This module is data plus one pure
function (config and model in, completed config out); it imports nothing from deltatune but
``config``.
"""
from __future__ import annotations

import dataclasses
import re

from torch import nn

from deltatune.config import ConfigError

_QV = ("q_proj", "v_proj")
_QV_BERT = ("query", "value")
_FUSED_QKV = ("query_key_value",)

# model_type -> LoRA targets (a tuple of name suffixes, or a regex string for the full name).
LORA_TARGETS: dict[str, tuple[str, ...] | str] = {
    "t5": ("q", "v"), "mt5": ("q", "v"),
    "bart": _QV, "opt": _QV, "gptj": _QV, "gpt_neo": _QV,
    "llama": _QV, "llama4": _QV, "mistral": _QV, "mixtral": _QV, "stablelm": _QV,
    "gemma": _QV, "gemma2": _QV, "gemma3_text": _QV, "qwen2": _QV, "qwen3": _QV,
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",  # a multimodal model: its text tower only
    "gpt2": ("c_attn",), "gpt_bigcode": ("c_attn",),
    "bloom": _FUSED_QKV, "gpt_neox": _FUSED_QKV, "chatglm": _FUSED_QKV, "falcon": _FUSED_QKV,
    "RefinedWeb": _FUSED_QKV, "RefinedWebModel": _FUSED_QKV,
    "blip-2": ("q", "v", "q_proj", "v_proj"),
    "bert": _QV_BERT, "roberta": _QV_BERT, "xlm-roberta": _QV_BERT, "electra": _QV_BERT,
    "layoutlm": _QV_BERT,
    "deberta-v2": ("query_proj", "value_proj"), "deberta": ("in_proj",),
    "mpt": ("Wqkv",), "btlm": ("c_proj", "c_attn"), "codegen": ("qkv_proj",),
    "phi": ("q_proj", "v_proj", "fc1", "fc2"),
    "nemotron_h": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "rwkv": ("key", "value", "receptance", "output"),
    "rwkv7": ("r_proj", "k_proj", "v_proj", "o_proj", "key", "value"),
}

# model_type -> (IA3 targets, the feed-forward ones among them).
IA3_TARGETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "t5": (("k", "v", "wo"), ("wo",)),
    "mt5": (("k", "v", "wi_1"), ()),
    "gpt2": (("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),
    "gpt_bigcode": (("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),
    "bloom": (("query_key_value", "mlp.dense_4h_to_h"), ("mlp.dense_4h_to_h",)),
    "bert": (("key", "value", "output.dense"), ("output.dense",)),
    "roberta": (("key", "value", "output.dense"), ("output.dense",)),
    "deberta-v2": (("key_proj", "value_proj", "output.dense"), ("output.dense",)),
    "deberta": (("in_proj", "output.dense"), ("output.dense",)),
    "opt": (("q_proj", "k_proj", "fc2"), ("fc2",)),
    "bart": (("q_proj", "v_proj", "fc2"), ("fc2",)),
    "phi": (("q_proj", "v_proj", "fc2"), ("fc2",)),
    "gptj": (("q_proj", "v_proj", "fc_out"), ("fc_out",)),
    "gpt_neo": (("q_proj", "v_proj", "c_proj"), ("c_proj",)),
    "gpt_neox": (("query_key_value", "dense_4h_to_h"), ("dense_4h_to_h",)),
    "falcon": (("query_key_value", "dense_4h_to_h"), ("dense_4h_to_h",)),
    "RefinedWeb": (("query_key_value", "dense_4h_to_h"), ("dense_4h_to_h",)),
    "RefinedWebModel": (("query_key_value", "dense_4h_to_h"), ("dense_4h_to_h",)),
    "llama": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "mistral": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "mixtral": (("k_proj", "v_proj", "w2"), ("w2",)),
    **{t: (("q_proj", "v_proj", "down_proj"), ("down_proj",))
       for t in ("llama4", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3")},
}


def model_type_of(model: nn.Module) -> str | None:
    """``model.config.model_type`` (a transformers model), else None."""
    config = getattr(model, "config", None)
    value = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    return value if isinstance(value, str) and value else None


def leaf_names(model: nn.Module, limit: int = 20) -> list[str]:
    """Distinct last-name parts of the modules that hold a weight matrix (what one can target)."""
    names: list[str] = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not name or next(module.children(), None) is not None or not isinstance(weight, nn.Parameter):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if weight.dim() >= 2 and not leaf.isdigit() and leaf not in names:
            names.append(leaf)
    return names[:limit]


def missing_targets_error(model: nn.Module, method: str) -> ConfigError:
    """The error for a config without ``target_modules`` on a model the table does not know."""
    model_type = model_type_of(model)
    known = f"model_type {model_type!r} has no default targets for {method}" if model_type else \
        f"the model has no config.model_type, so {method} has no default targets"
    return ConfigError(f"target_modules is not set and {known}; give a list of module names, a regex, or "
                       f"'all-linear'. Leaf module names in this model: {leaf_names(model)}")


def complete_targets(config, model: nn.Module):
    """``config`` with ``target_modules`` (and IA3's ``feedforward_modules``) filled from the
    family table when unset; the same config when nothing is missing. Pure: returns a new config.

    IA3 with ``target_modules`` given and ``feedforward_modules`` unset takes the family's
    feed-forward defaults, as peft does; when they are not a subset of the given list they are
    written as the equivalent regex (peft writes the list, a file its own ``IA3Config`` refuses).

    Raises:
        ConfigError: ``target_modules`` is unset and the model type is not in the table; the
            message lists the model's leaf module names.
    """
    method = config.peft_type.value
    if method not in ("LORA", "IA3"):
        return config
    model_type = model_type_of(model)
    if method == "LORA":
        if config.target_modules is not None:
            return config
        if model_type not in LORA_TARGETS:
            if getattr(config, "target_parameters", None):  # peft: parameters alone are a target
                return config
            raise missing_targets_error(model, "LoRA")
        return dataclasses.replace(config, target_modules=_as_field(LORA_TARGETS[model_type]))
    targets, feedforward = IA3_TARGETS.get(model_type, (None, None))
    if config.target_modules is None:
        if targets is None:
            raise missing_targets_error(model, "IA3")
        ff = feedforward if config.feedforward_modules is None else config.feedforward_modules
        return dataclasses.replace(config, target_modules=list(targets), feedforward_modules=_as_field(ff))
    if config.feedforward_modules is not None or feedforward is None:
        return config
    given = config.target_modules
    if isinstance(given, list) and not set(feedforward) <= set(given):
        # peft's list rule is "the name ends with an entry"; as a regex it needs no subset of the targets
        feedforward = ".*(?:" + "|".join(re.escape(f) for f in feedforward) + ")" if feedforward else []
    return dataclasses.replace(config, feedforward_modules=_as_field(feedforward))


def _as_field(value):
    """A table entry as a config field: a regex string stays a string, a tuple becomes a list."""
    return value if isinstance(value, str) else list(value)
