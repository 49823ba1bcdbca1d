"""``LoraConfig(ensure_weight_tying=True)``: adapters on tied embeddings stay tied.

When a model ties its output head (and, in encoder-decoders, the per-stack embeddings) to the
input embedding (``config.tie_word_embeddings`` and one shared weight), an adapter that trains the
embedding must change the head the same way, or merging and export break the tie. peft's rule,
followed here:

- the embedding (or a tied module) in ``modules_to_save``: the input embedding is saved, and
  every tied module's copy *is* the embedding's copy (one Parameter);
- the embedding (or a tied module) in ``target_modules``: the input embedding gets LoRA and each
  tied module's LoRA reads its factors (a tied ``Linear`` head: ``A = B_emb.T``, ``B = A_emb.T``,
  the same storage; a tied embedding: the same Parameters). Trained once, through the embedding;
  saved under every module's keys, as peft saves them.

Without ``ensure_weight_tying`` a tied layer in the adapter is only warned about (peft's warning);
with it and nothing tied in the model, or nothing tied in the adapter, a warning says so.
"""
from __future__ import annotations

import re
import warnings

import torch
from torch import nn

from deltatune.tuner.components import WrappedLayer
from deltatune.tuner.embeddings import EMBEDDING_NAMES

_UNTIED_WARNING = ("Model has `tie_word_embeddings=True` and a tied layer is part of the adapter, but "
                   "`ensure_weight_tying` is not set to True. This can lead to complications, for example when "
                   "merging the adapter or converting your model to formats other than safetensors.")


def model_ties(model: nn.Module) -> bool:
    """True when the model declares tied weights (``_tied_weights_keys``, as transformers models do)
    and its config does not turn tying off (``tie_word_embeddings``), peft's rule."""
    if not hasattr(model, "_tied_weights_keys"):
        return False
    cfg = getattr(model, "config", None)
    tie = getattr(cfg, "tie_word_embeddings", None)
    if tie is None and callable(getattr(cfg, "to_dict", None)):
        tie = cfg.to_dict().get("tie_word_embeddings")
    return bool(tie)


def input_embedding(model: nn.Module) -> tuple[str, nn.Module] | None:
    """``(name, module)`` of the input embedding (the wrapper when wrapped), or None."""
    get = getattr(model, "get_input_embeddings", None)
    layer = get() if callable(get) else None
    if layer is None:
        return None
    return next(((n, m) for n, m in model.named_modules() if m is layer), None)


def tied_names(model: nn.Module) -> list[str]:
    """Modules tied to the input embedding (peft's ``_get_module_names_tied_with_embedding``): those
    whose weight is the embedding's, when the config ties them; adapter layers count by their base."""
    found = input_embedding(model) if model_ties(model) else None
    if found is None:
        return []
    weight = getattr(_base(found[1]), "weight", None)
    out, inside = [], []
    for name, module in model.named_modules(remove_duplicate=False):
        if any(name.startswith(p + ".") for p in inside):
            continue
        if getattr(module, "is_adapter_layer", False):
            inside.append(name)
        base = _base(module)
        if name != found[0] and base is not found[1] and base is not _base(found[1]) \
                and isinstance(base, (nn.Linear, nn.Embedding)) and base.weight is weight:
            out.append(name)
    return out


def _get_module_names_tied_with_embedding(model: nn.Module) -> list[str]:
    """peft's helper of this name: ``tied_names`` of the user's model, sorted (a PeftModel or tuner
    is unwrapped first)."""
    if callable(getattr(model, "get_base_model", None)):
        model = model.get_base_model()
    return sorted(tied_names(getattr(model, "model", model) if hasattr(model, "adapter_set") else model))


def _base(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if getattr(module, "is_adapter_layer", False) else module


def plan(model: nn.Module, config) -> tuple[str, str, list[str]] | None:
    """What to tie for ``config``: ``(kind, embedding name, tied names)`` with kind ``"saved"`` or
    ``"target"``, or None; warns as peft does when tying is asked for but finds nothing, and when a
    tied layer is in the adapter without ``ensure_weight_tying``."""
    if not hasattr(config, "ensure_weight_tying"):
        return None
    saved = getattr(config, "modules_to_save", None) or []
    targets = getattr(config, "target_modules", None)
    in_saved = any(m.split(".")[-1] in EMBEDDING_NAMES for m in saved)
    if isinstance(targets, str):
        in_target = any(re.fullmatch(targets, n) for n in EMBEDDING_NAMES)
    else:
        in_target = any(m.split(".")[-1] in EMBEDDING_NAMES for m in targets or [])
    tied = tied_names(model)
    if not config.ensure_weight_tying:
        if (in_saved or in_target) and tied:
            warnings.warn(_UNTIED_WARNING, stacklevel=4)
        return None
    if not tied:
        warnings.warn("You have requested `ensure_weight_tying`, but no tied modules were found in the model",
                      stacklevel=4)
        return None
    if not (in_saved or in_target):
        warnings.warn("You have requested `ensure_weight_tying`, but no tied modules are added in either "
                      "`modules_to_save` or `target_modules`", stacklevel=4)
        return None
    return ("saved" if in_saved else "target"), input_embedding(model)[0], tied


def saved_entries(saved: list[str], embedding: str, tied: list[str]) -> list[str]:
    """``modules_to_save`` with the input embedding in and the tied modules out (they follow it)."""
    out = list(dict.fromkeys([*saved, embedding]))
    for key in tied:
        hit = next((m for m in out if m != embedding and re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", key)), None)
        if hit is not None:
            out.remove(hit)
    return out


def tie_copy(copy: nn.Module, source: nn.Module) -> None:
    """A tied module's modules-to-save copy uses the embedding copy's weight Parameter."""
    copy.weight = source.weight


class TiedFactor(nn.Module):
    """A tied ``Linear`` head's LoRA factor read from the embedding's LoRA (no tensor of its own):
    ``weight`` is the embedding factor transposed, the same storage, so gradients reach it."""

    def __init__(self, source: nn.Module, container: str, adapter: str) -> None:
        super().__init__()
        self._source = [source]  # a list: not a submodule (its tensors belong to the embedding)
        self.container, self.adapter = container, adapter

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self._source[0], self.container)[self.adapter].T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T


def tie_lora(layer: nn.Module, source: nn.Module, adapter: str) -> None:
    """Make LoRA layer ``layer`` (a tied module) use embedding LoRA ``source``'s factors."""
    if hasattr(layer, "lora_embedding_A"):  # a tied embedding: the same Parameters
        layer.lora_embedding_A[adapter] = source.lora_embedding_A[adapter]
        layer.lora_embedding_B[adapter] = source.lora_embedding_B[adapter]
        return
    # a Linear head: (r, dim) = B_emb (dim, r).T and (vocab, r) = A_emb (r, vocab).T
    layer.lora_A[adapter] = TiedFactor(source, "lora_embedding_B", adapter)
    layer.lora_B[adapter] = TiedFactor(source, "lora_embedding_A", adapter)


class TiedLoraLayer(WrappedLayer):
    """A tied head's LoRA layer: its factors' views are in the file under its keys (as peft saves
    them; loading one writes the embedding's factor), and it trains nothing of its own."""

    def state(self, adapter: str) -> dict[str, torch.Tensor]:
        out = super().state(adapter)
        for attr in ("lora_A", "lora_B"):
            container = getattr(self.layer, attr, None)
            factor = container[adapter] if container is not None and adapter in container else None
            if isinstance(factor, TiedFactor):
                out[f"{self.name}.{attr}.weight"] = factor.weight
        return out
