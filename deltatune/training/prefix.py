"""Shared-prompt-prefix training: a prefix common to every example of a forward pass runs once.

Chat data repeats the same opening in every example: the chat template's system turn and the
user turn's header (SmolLM2's default template: 24 tokens of the demo task's 88 on average).
Under causal attention the hidden states of those positions depend only on those tokens, so
they are the same in every example; computing them once per forward pass and letting every
example's remaining tokens attend to that one copy gives the same loss and the same gradients
(fp32 rounding aside), with fewer tokens through every linear layer.

How (``batching.shared_collate`` + ``shared_hidden``): the longest common prefix of a forward pass's
examples, cut so that it carries no label (none of its positions predicts a label token), runs
through the decoder once as a (1, P) row with a KV cache; the cache is repeated over the rows and
each example's suffix runs as its own row after it (positions from P on, padding at the row end,
so causal attention keeps real tokens from ever seeing it). Autograd carries the suffixes'
gradients back through the cached keys and values into the prefix's single computation.

The result equals unshared training only where the forward is a deterministic function of each
position's tokens: no active dropout (a shared position would draw one mask for all examples
instead of one each), and a plain decoder call (no virtual tokens, gradient checkpointing,
compiled layers or sharding). ``why_not`` says which condition turns it off.
"""
from __future__ import annotations

import inspect
import os

import torch
from torch import nn

from deltatune.training.data import IGNORE, Example

# Shortest common prefix worth a separate pass (a (1, P) row costs a pass's per-call overheads).
MIN_PREFIX = 8
# ``DELTATUNE_SHARE_PREFIX=0`` turns sharing off whatever the config says (A/B runs, bugs).
ENV = "DELTATUNE_SHARE_PREFIX"


def enabled_by_env() -> bool:
    """False where ``ENV`` is set to 0."""
    return os.environ.get(ENV, "1") != "0"


def common_prefix(examples: list[Example]) -> int:
    """Length P of the longest prefix shared by every example that carries no label target.

    Position t predicts ``labels[t + 1]``: P stops before the first label of any example, and
    leaves every example at least one token of its own. 0 for fewer than two examples.
    """
    if len(examples) < 2:
        return 0
    first = examples[0].input_ids
    n = min(len(e) for e in examples) - 1
    p = 0
    while p < n and all(e.input_ids[p] == first[p] for e in examples):
        p += 1
    for e in examples:
        labelled = next((t for t in range(1, p + 1) if e.labels[t] != IGNORE), None)
        if labelled is not None:
            p = labelled - 1
    return p


def dropout_active(model: nn.Module) -> bool:
    """True if a dropout of ``model`` would draw a random mask in training mode."""
    for m in model.modules():
        p = getattr(m, "p", None)
        if isinstance(m, nn.modules.dropout._DropoutNd) and p:
            return True
    cfg = getattr(getattr(model, "config", None), "attention_dropout", None)
    return bool(cfg)


def cache_kwarg(decoder: nn.Module) -> str | None:
    """The keyword a decoder takes its KV cache by (``cache`` in transformers >= 5.2x, else
    ``past_key_values``), or None if it takes neither."""
    params = inspect.signature(decoder.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return None


def why_not(model: nn.Module, decoder: nn.Module | None, packing: bool, world: int, sharded: bool,
            compiled: bool, checkpointing: bool) -> str | None:
    """Why a run does not share prompt prefixes, or None where it does (see the module doc).
    ``decoder``: the model's decoder where the loss calls it on its own (``loss.label_only_parts``)."""
    if not enabled_by_env():
        return f"{ENV}=0"
    if not packing:
        return "only with packing (a method that can pack sequences, packing on)"
    if world > 1 or sharded or compiled or checkpointing:
        return "not with several processes, FSDP, compiled layers or gradient checkpointing"
    if dropout_active(model):
        return "dropout is on (shared positions would share one dropout mask)"
    if decoder is None or cache_kwarg(decoder) is None:
        return "the model's decoder cannot be called on its own with a KV cache"
    return None


def status(reason: str | None) -> str:
    """What a run's summary says of prefix sharing: ``on``, or ``off: <why_not's reason>``."""
    return "on" if reason is None else f"off: {reason}"


def shared_hidden(decoder: nn.Module, call, batch) -> torch.Tensor:
    """The decoder's last hidden states (R, Ls, d) of ``batch``'s rows after its shared prefix.

    The prefix runs once as a (1, P) row whose KV cache, repeated over the R rows, the rows
    attend to; gradients reach the prefix's computation through the cached keys and values.
    """
    key = cache_kwarg(decoder)
    p = batch.prefix.shape[0]
    head = dict(input_ids=batch.prefix[None], position_ids=torch.arange(p, device=batch.prefix.device)[None],
                use_cache=True)                                                    # (1, P)
    out = decoder(**call.prepare(head, callee=decoder))
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    if cache is None:
        raise RuntimeError(f"{type(decoder).__name__} returned no KV cache for the shared prefix "
                           f"(set {ENV}=0 to train without prefix sharing)")
    cache.batch_repeat_interleave(batch.input_ids.shape[0])                        # (R, kv, P, hd)
    rows = dict(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=True, **{key: cache})
    return decoder(**call.prepare(rows, callee=decoder)).last_hidden_state       # (R, Ls, d)

