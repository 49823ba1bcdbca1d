"""Virtual-token positions in a forward's output, as peft returns them (prompt tuning, P-tuning).

On a decoder, deltatune runs prompt tuning's and P-tuning's virtual tokens as a cache prefix
(``methods.virtual_inputs``), so the model's own output covers the real tokens only. peft
concatenates the virtual embeddings before the real ones, and its logits have the virtual
positions first: code written for peft slices ``logits[:, num_virtual_tokens:]``. ``PeftModel.forward``
therefore returns peft's shape: the logits after each virtual token (the same for every row:
under causal attention the virtual tokens see only themselves, at positions 0..n-1) before the
real tokens' logits, and with ``labels`` peft's loss (the labels shifted over the joined sequence,
the virtual positions ignored, so the last virtual token predicts the first label).
Prefix tuning (keys and values, no positions) and encoder models (already concatenated) are
left as they are, as in peft.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.methods.virtual_inputs import cache_argument

IGNORE_INDEX = -100


def with_virtual_positions(prompt: nn.Module, model: nn.Module, kwargs: dict, out):
    """``out`` of ``model(**prepared kwargs)`` with the virtual positions of ``prompt`` (a prompt
    module of kind ``"inputs"``) in its logits, and peft's loss when ``kwargs`` (as the caller
    gave them) has ``labels``; ``out`` unchanged where peft has no virtual positions either."""
    logits = getattr(out, "logits", None)
    x = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
    if (getattr(prompt, "kind", None) != "inputs" or cache_argument(model) is None or x is None
            or not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[1] != x.shape[1]
            or any(kwargs.get(k) is not None for k in ("cache", "past_key_values"))):  # a decode step
        return out
    batch = x.shape[0]
    dtype = model.get_input_embeddings().weight.dtype
    virtual = model(inputs_embeds=prompt().to(dtype)[None], use_cache=False).logits   # (1, n, V)
    out.logits = torch.cat([virtual.to(logits.dtype).expand(batch, -1, -1), logits], dim=1)  # (B, n+T, V)
    labels = kwargs.get("labels")
    if labels is not None and getattr(out, "loss", None) is not None:
        full = torch.cat([labels.new_full((batch, virtual.shape[1]), IGNORE_INDEX), labels], dim=1)  # (B, n+T)
        out.loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(),
                                   full[:, 1:].flatten().to(out.logits.device), ignore_index=IGNORE_INDEX)
    return out
