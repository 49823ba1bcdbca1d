"""peft's ``prepare_model_for_kbit_training``: a 4-bit model made ready for adapter training."""
from __future__ import annotations

import inspect
import warnings

import torch
from torch import nn

from deltatune.quant.layers import prepare_4bit_layers
from deltatune.quant.memory import _leave_checkpoint_mapping, check_dense_copies
from deltatune.quant.nf4 import Linear4bit


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: dict | None = None) -> nn.Module:
    """Get a 4-bit model ready for adapter training, as peft's function of the same name does.

    Freezes every parameter; casts fp16/bf16 parameters that are not 4-bit (norms, embeddings,
    head) to fp32 for stable training; for a model holding 4-bit layers (ours, or loaded by
    transformers with ``BitsAndBytesConfig(load_in_4bit=True)``) with ``use_gradient_checkpointing``,
    makes the input embeddings' output require grad (needed by reentrant checkpointing) and turns
    on gradient checkpointing with ``gradient_checkpointing_kwargs``. bitsandbytes layers on CPU
    are switched to the fast compute dtype (see ``resolve_compute_dtype``), and dense tensors still
    in a memory-mapped checkpoint are copied out so its pages can go (as in ``quantize``). Warns
    about dense copies of 4-bit weights (``check_dense_copies``). ``gradient_checkpointing_kwargs``
    None keeps transformers' default (non-reentrant). Returns ``model``.
    """
    kbit = (prepare_4bit_layers(model) > 0 or any(isinstance(m, Linear4bit) for m in model.modules())
            or getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.parameters():
        if p.dtype in (torch.float16, torch.bfloat16) and type(p).__name__ != "Params4bit":
            p.data = p.data.float()
    if kbit:
        _leave_checkpoint_mapping(model)
    if kbit and use_gradient_checkpointing:
        kwargs = gradient_checkpointing_kwargs
        if (kwargs or {}).get("use_reentrant", True):
            _enable_input_require_grads(model)
        _enable_checkpointing(model, kwargs)
    check_dense_copies(model)
    return model


def _enable_checkpointing(model: nn.Module, kwargs: dict | None) -> None:
    """transformers >= 5 names it ``activation_checkpointing_enable``; older, ``gradient_...``."""
    for attr, key in (("activation_checkpointing_enable", "activation_checkpointing_kwargs"),
                      ("gradient_checkpointing_enable", "gradient_checkpointing_kwargs")):
        enable = getattr(model, attr, None)
        if enable is not None:
            accepts = key in inspect.signature(enable).parameters
            enable(**({key: kwargs} if accepts and kwargs is not None else {}))
            return
    warnings.warn(f"{type(model).__name__} has no gradient_checkpointing_enable(); training without "
                  "gradient checkpointing", stacklevel=3)


def _enable_input_require_grads(model: nn.Module) -> None:
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    elif hasattr(model, "get_input_embeddings"):
        model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
