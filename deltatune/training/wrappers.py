"""The models inside the wrappers training puts around them (DDP's ``.module``, the PeftModel).

A leaf of ``deltatune.training`` (it imports only the bottom-layer ``generation``), so the loss,
the vocabulary sharding, FSDP and the FLOP counter can all use it without importing each other.
"""
from __future__ import annotations

from torch import nn

from deltatune.generation import adapter_model  # noqa: F401 - one rule for DDP wrappers, shared with generation


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel / DDP wrapper (adapter layers are in place)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif isinstance(getattr(model, "base_model", None), nn.Module) and \
                isinstance(getattr(model.base_model, "model", None), nn.Module):
            model = model.base_model.model
        else:
            return model
