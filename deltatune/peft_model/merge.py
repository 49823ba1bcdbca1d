"""Folding adapters into the base weights and back, for a ``PeftModel``: all layers or none.

The maths is each layer's pure ``merged_weight`` / ``unmerged_weight``; this module decides the
order, checks capabilities (declared on the method) and keeps the adapter set's record.
"""
from __future__ import annotations

import warnings

from torch import nn

from deltatune import registry


def check_mergeable(peft, names: list[str]) -> None:
    """Raise NotImplementedError naming the method of an adapter whose method cannot merge."""
    for name in names:
        config = peft.peft_config.get(name)
        method = registry.method_of(config) if config is not None else None
        if config is not None and getattr(config, "alora_invocation_tokens", None):
            raise NotImplementedError(f"adapter {name!r} is an aLoRA adapter (alora_invocation_tokens): merged, it "
                                      "would act on every position, not only from its invocation on; keep it unmerged")
        if method is not None and not method.mergeable:
            why = f": {method.why_not_mergeable}" if method.why_not_mergeable else ""
            raise NotImplementedError(
                f"adapter {name!r} ({config.peft_type.value}) cannot be merged into the base weights{why}. "
                "Use unload() to get the base model back without the adapter, or keep the PeftModel for inference.")


def merge_adapter(peft, names: list[str], safe_merge: bool) -> None:
    """Merge adapters ``names`` (those not merged yet), each into every layer or none; the caller
    puts the applied adapters' biases live."""
    unknown = [n for n in names if n not in peft.adapter_set]
    if unknown:
        raise ValueError(f"cannot merge unknown adapter(s) {unknown}; have {sorted(peft.peft_config)}")
    check_mergeable(peft, names)
    again = [n for n in dict.fromkeys(names) if n in peft.adapter_set.merged]
    if again:  # peft warns too; nothing is merged twice
        lead = "All adapters are already merged, nothing to do" if len(again) == len(set(names)) else \
            "Some adapters are already merged"   # peft's sentence first: code written for peft matches it
        warnings.warn(f"{lead}: adapter(s) {again} are already merged into the base weights; not merging them "
                      "again", stacklevel=3)
    layers = [layer for _, layer in peft.base_model.adapter_layers()]
    for name in [n for n in names if n not in peft.adapter_set.merged]:
        if safe_merge:  # check every layer before writing any
            for layer in layers:
                layer.check_merge(name)
        done = []
        try:
            for layer in layers:
                layer.merge([name], safe_merge=safe_merge)
                done.append(layer)
        except BaseException:
            for layer in reversed(done):
                layer.unmerge([name])
            raise
        peft.adapter_set.merged.append(name)


def unmerge_adapter(peft) -> None:
    """Unmerge every merged adapter, last merged first; the caller puts the biases live."""
    merged = list(peft.adapter_set.merged)
    for _, layer in peft.base_model.adapter_layers():
        layer.unmerge(merged)
    peft.adapter_set.merged = []


def merge_and_unload(peft, adapter_names: list[str] | None, safe_merge: bool, requantize: bool) -> nn.Module:
    """``PeftModel.merge_and_unload``: dequantize a 4-bit base, merge, unwrap, requantize if asked."""
    from deltatune import quant

    check_mergeable(peft, list(adapter_names) if adapter_names is not None else peft.active_adapters)
    quantized = any(quant.is_4bit(m) for m in peft.base_model.model.modules())
    if quantized:
        quant.dequantize_model(peft.base_model.model)
    peft.merge_adapter(adapter_names, safe_merge=safe_merge)
    model = peft.base_model.unload(merged=list(peft.adapter_set.merged))
    if quantized and requantize:
        quant.requantize(model)
    return model
