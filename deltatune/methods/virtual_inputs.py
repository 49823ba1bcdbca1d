"""The input hook of the virtual-token methods: what a call looks like with the virtual tokens in.

Decoder models (those whose forward takes a KV cache) get the virtual tokens as a *cache prefix*,
for all three methods: prefix tuning's rows are keys and values already; prompt tuning's and
P-tuning's virtual embeddings are run through the model once per call, batch 1, at positions
0..n-1 (they see nothing but themselves under causal attention, so their keys and values are the
same for every row), and the resulting cache is repeated over the batch. The real tokens then run
on top of it:

- the attention mask gains n ones in front (a mask of ones is made when there was none);
- positions continue after the prefix; with a mask they are counted over real tokens only, so a
  left- or right-padded row gets exactly the positions it has alone;
- outputs (logits, hidden states, the loss with ``labels``) cover the real tokens only, so labels
  need no virtual positions and the loss cannot see them.

This is exact (causal attention of the concatenated sequence computes the same thing), works for
``forward``, the training loss (which calls the decoder body directly) and ``generate``, where
transformers continues from a given cache when the mask is longer than the ids.

Encoder models (BERT-style; no KV cache) get prompt/P-tuning's embeddings concatenated before the
input embeddings, as peft does: mask, ``token_type_ids`` (zeros), positions and token-level labels
(-100) are extended; a sequence classifier's output is per sequence and unchanged in shape.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from deltatune.config import ConfigError

_CACHE_NAMES = ("cache", "past_key_values")   # transformers >= 5.2x names it ``cache``


def cache_argument(model: nn.Module) -> str | None:
    """The keyword under which ``model.forward`` takes a KV cache, or None (encoder models)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    return next((name for name in _CACHE_NAMES if name in params), None)


def _batch_and_length(kwargs: dict) -> tuple[int, int, torch.device]:
    x = kwargs.get("input_ids")
    if x is None:
        x = kwargs.get("inputs_embeds")
    if x is None:
        raise ValueError("virtual tokens need input_ids or inputs_embeds")
    return x.shape[0], x.shape[1], x.device


def _existing_cache(kwargs: dict):
    for name in _CACHE_NAMES:
        if kwargs.get(name) is not None:
            return kwargs.pop(name)
    return None


def prefix_cache(component, model: nn.Module, batch: int, with_logits: bool = False):
    """A fresh ``DynamicCache`` holding ``component``'s prefix for ``batch`` rows (differentiable).

    ``with_logits`` (prompt tuning / P-tuning): the virtual embeddings run through the whole
    model, head included, instead of its decoder body, and the cache keeps their logits as
    ``cache.prefix_logits`` (1, n, V): ``PeftModel.forward`` returns them as peft does
    (``peft_model.virtual``) without a second forward of the virtual tokens."""
    from transformers import DynamicCache

    config = getattr(model, "config", None)
    cache = DynamicCache(config=config) if config is not None else DynamicCache()
    dtype = _input_dtype(model)
    if component.kind == "kv":
        for layer, (k, v) in enumerate(component.key_values()):
            cache.update(k.to(dtype).expand(batch, -1, -1, -1), v.to(dtype).expand(batch, -1, -1, -1), layer)
        return cache
    body = model if with_logits else getattr(model, "base_model", model)
    out = body(inputs_embeds=component().to(dtype)[None], **{cache_argument(body) or "cache": cache}, use_cache=True)
    if with_logits:
        cache.prefix_logits = out.logits                                    # (1, n, V)
    if batch > 1:
        cache.batch_repeat_interleave(batch)
    return cache


def prefix_key_values(component, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(keys, values)``, each (1, kv_heads, n, head_dim): what ``prefix_cache`` holds
    for one row. They depend on no input, so a server computes them once per adapter (for prompt
    tuning and P-tuning that is one forward of the virtual embeddings, under the caller's route)."""
    cache = prefix_cache(component, model, 1)
    return [(layer.keys, layer.values) for layer in cache.layers]


def _input_dtype(model: nn.Module) -> torch.dtype:
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embed, "weight", None)
    if weight is not None and weight.is_floating_point():
        if torch.is_autocast_enabled(weight.device.type):
            return torch.get_autocast_dtype(weight.device.type)
        return weight.dtype
    return torch.float32


def prepare(component, model: nn.Module, kwargs: dict, callee: nn.Module | None = None) -> dict:
    """The keyword arguments of a call to ``callee`` (default ``model``, the user's transformers
    model; the training loss calls its decoder body) with ``component``'s virtual tokens in."""
    callee = callee if callee is not None else model
    kwargs = dict(kwargs)
    key = cache_argument(callee)
    if key is None:
        return _prepare_concat(component, model, kwargs)
    if model.training and any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
        raise ConfigError("virtual-token adapters cannot train with gradient checkpointing: transformers drops the "
                          "KV cache inside checkpointed layers, and the virtual tokens live there; turn it off "
                          "(--no-grad-checkpointing, or model.gradient_checkpointing_disable())")
    n = component.num_virtual_tokens
    batch, length, device = _batch_and_length(kwargs)
    cache = _existing_cache(kwargs)
    fresh = cache is None or cache.get_seq_length() == 0
    if fresh:  # a cache given back by an earlier call already holds the prefix
        cache = prefix_cache(component, model, batch, with_logits=callee is model)  # the full model: logits
    mask = kwargs.get("attention_mask")
    if mask is not None:
        mask = torch.cat([mask.new_ones(batch, n), mask], dim=1)
        kwargs["attention_mask"] = mask
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = kwargs["position_ids"] + n if fresh else kwargs["position_ids"]
    elif mask is not None:  # positions over real tokens only: a padded row sees what it sees alone
        kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
    kwargs[key] = cache
    return kwargs


def _prepare_concat(component, model: nn.Module, kwargs: dict) -> dict:
    if component.kind == "kv":
        raise ConfigError(f"prefix tuning needs a KV cache; {type(model).__name__}.forward takes none")
    n = component.num_virtual_tokens
    embeds = kwargs.pop("inputs_embeds", None)
    ids = kwargs.pop("input_ids", None)
    if embeds is None:
        embeds = model.get_input_embeddings()(ids)                           # (B, T, d)
    batch, length = embeds.shape[:2]
    prompts = component().to(embeds.dtype)[None].expand(batch, -1, -1)      # (B, n, d)
    kwargs["inputs_embeds"] = torch.cat([prompts, embeds], dim=1)
    for name, fill in (("attention_mask", 1), ("token_type_ids", 0)):
        if kwargs.get(name) is not None:
            kwargs[name] = torch.cat([kwargs[name].new_full((batch, n), fill), kwargs[name]], dim=1)
    if kwargs.get("position_ids") is not None:
        pos = kwargs["position_ids"]
        kwargs["position_ids"] = torch.cat([torch.arange(n, device=pos.device).expand(pos.shape[0], n), pos + n], 1)
    labels = kwargs.get("labels")
    if labels is not None and labels.dim() == 2 and labels.shape == (batch, length):  # token-level labels
        kwargs["labels"] = torch.cat([labels.new_full((batch, n), -100), labels], dim=1)
    return kwargs


def generation_kwargs(component, model: nn.Module, kwargs: dict) -> dict:
    """``generate`` keyword arguments with ``component``'s prefix in the cache.

    The cache is built for every row ``generate`` will run (prompts x ``num_beams`` /
    ``num_return_sequences``), and the mask is one longer per virtual token than the ids, which
    makes transformers continue from the cache instead of recomputing it.

    Raises:
        ValueError: ``inputs_embeds`` or a cache given to ``generate`` (not supported with virtual
            tokens), or a model without a KV cache.
    """
    key = cache_argument(model)
    if key is None:
        raise ValueError(f"generate with virtual tokens needs a model with a KV cache; {type(model).__name__} has none")
    if kwargs.get("inputs_embeds") is not None or _existing_cache(dict(kwargs)) is not None:
        raise ValueError("generate with a virtual-token adapter takes input_ids (not inputs_embeds or a cache)")
    kwargs = dict(kwargs)
    ids = kwargs.get("input_ids")
    if ids is None:
        raise ValueError("generate with a virtual-token adapter needs input_ids=")
    gen = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    expand = max(int(kwargs.get("num_beams") or getattr(gen, "num_beams", 1) or 1),
                 int(kwargs.get("num_return_sequences") or getattr(gen, "num_return_sequences", 1) or 1))
    mask = kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    kwargs["attention_mask"] = torch.cat([mask.new_ones(ids.shape[0], component.num_virtual_tokens), mask], 1)
    kwargs["cache"] = prefix_cache(component, model, ids.shape[0] * expand)
    return kwargs
