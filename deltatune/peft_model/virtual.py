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


def with_virtual_positions(model: nn.Module, kwargs: dict, prepared: dict, out):
    """``out`` of ``model(**prepared)`` with the virtual positions' logits in front, and peft's
    loss when ``kwargs`` (as the caller gave them) has ``labels``; ``out`` unchanged where peft has
    no virtual positions either. The virtual logits are those ``methods.virtual_inputs.prepare``
    kept from the prefix's own forward (``cache.prefix_logits``): the tokens are run once."""
    cache = prepared.get(cache_argument(model) or "cache")
    virtual = getattr(cache, "__dict__", {}).pop("prefix_logits", None)  # (1, n, V); not left on the user's cache
    logits = getattr(out, "logits", None)
    x = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
    if (virtual is None or x is None or not isinstance(logits, torch.Tensor) or logits.dim() != 3
            or logits.shape[1] != x.shape[1]):
        return out  # not a fresh prefix on a decoder (prefix tuning, an encoder, a decode step)
    batch = x.shape[0]
    out.logits = torch.cat([virtual.to(logits.dtype).expand(batch, -1, -1), logits], dim=1)  # (B, n+T, V)
    labels = kwargs.get("labels")
    if labels is not None and getattr(out, "loss", None) is not None:
        full = torch.cat([labels.new_full((batch, virtual.shape[1]), IGNORE_INDEX), labels], dim=1)  # (B, n+T)
        out.loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(),
                                   full[:, 1:].flatten().to(out.logits.device), ignore_index=IGNORE_INDEX)
    return out
