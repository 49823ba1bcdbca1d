"""peft's ``save_embedding_layers``: which embedding base weights an adapter file carries.

One rule for ``PeftModel.save_pretrained`` and ``get_peft_model_state_dict``:

- ``"auto"`` (default): the base weights of targeted embedding layers (``embed_tokens``,
  ``lm_head``), for resized vocabularies; that is what ``TunerModel.adapter_state`` includes.
  (peft's ``"auto"`` also compares the vocabulary with the base's ``config.json``, on disk or on
  the Hub; here nothing is read: pass ``True`` after resizing untargeted embeddings.)
- ``True``: the input and output embeddings' weights; when an embedding layer is targeted, only
  the wrapped ones (peft's rule).
- ``False``: none.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from deltatune.targeting import base_of, iter_candidates

EMBEDDING_NAMES = ("embed_tokens", "lm_head")


def is_embedding_base(key: str) -> bool:
    """True for the key of a wrapped embedding layer's base weight (``...embed_tokens.base_layer.weight``)."""
    module, _, leaf = key.rpartition(".base_layer.")
    return leaf == "weight" and module.rsplit(".", 1)[-1] in EMBEDDING_NAMES


def with_embedding_layers(model: nn.Module, tensors: dict[str, torch.Tensor],
                          option: bool | Literal["auto"] = "auto") -> dict[str, torch.Tensor]:
    """``tensors`` (an adapter's state, model-relative keys, as ``adapter_state`` gives it) with the
    embedding weights ``option`` asks for (see the module doc); ``model`` is the user's model."""
    if option == "auto":
        return tensors
    if option is False:
        return {k: v for k, v in tensors.items() if not is_embedding_base(k)}
    if option is not True:
        raise ValueError(f"save_embedding_layers={option!r} must be True, False or 'auto'")
    targeted = any(is_embedding_base(k) for k in tensors)
    return {**tensors, **_embedding_weights(model, wrapped_only=targeted)}


def _embedding_weights(model: nn.Module, wrapped_only: bool) -> dict[str, torch.Tensor]:
    """The input and output embedding weights under their current names (``base_layer`` when wrapped)."""
    layers = [getattr(model, f, lambda: None)() for f in ("get_input_embeddings", "get_output_embeddings")]
    layers = [base_of(layer) for layer in layers if layer is not None]
    out = {}
    for name, module in iter_candidates(model):
        for layer in layers:
            if module is layer and not wrapped_only:
                out[f"{name}.weight"] = layer.weight
            elif module is not layer and base_of(module) is layer:
                out[f"{name}.base_layer.weight"] = layer.weight
    return out
