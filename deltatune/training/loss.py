"""Causal-LM loss computed only where there is a label.

A causal LM's output head is a (vocab x hidden) matmul per position: for SmolLM2 (49k vocab) it
is ~20% of the forward FLOPs, and full-sequence fp32 logits are B*T*V*4 bytes (100+ MB for a
batch of 8x100). Prompt tokens carry no label, so we run the decoder body, gather the hidden
states at label positions, and push only those through the head, in chunks, computing the
gradient of the cross-entropy w.r.t. those hidden states in the same pass (the softmax is never
stored for backward: memory is one chunk of logits, whatever the batch size).

Models whose logits are post-processed (soft-capping, logit scaling) or whose head is not a
plain ``nn.Linear`` (e.g. an adapter-wrapped ``lm_head``) take the generic path: the head module
applied to the gathered hidden states, and a full forward if even that is not possible.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.training import cpu_linear
from deltatune.training.batching import Batch
from deltatune.training.data import IGNORE
from deltatune.training.wrappers import adapter_model, unwrap  # noqa: F401 - also imported from here

# Rows up to this long use eager attention under bf16 on the CPU (see ``cpu_bf16_attention``).
EAGER_MAX_LEN = 256
# Config attributes that change logits after the head: such models use the generic path.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class LinearCrossEntropy(torch.autograd.Function):
    """``sum_i w_i CE(h_i @ W^T + b, t_i)`` over rows of ``h``, chunked; grads computed in forward.

    Only ``chunk x V`` logits exist at any time. Returns an fp32 scalar (a sum, not a mean).
    ``token_weights`` (N,): each row's weight ``w_i`` (default 1); ``ce_out`` (N,): filled with
    each row's unweighted CE (no gradient), for callers that report parts of the sum.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int, token_weights=None, ce_out=None):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        h_all = hidden.to(weight.dtype)                                       # (N, d)
        grad_h = torch.empty_like(h_all) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        linear = cpu_linear.onednn_linear if cpu_linear.wants(h_all, weight) else F.linear
        for s in range(0, h_all.shape[0], chunk):
            h, t = h_all[s:s + chunk], targets[s:s + chunk]
            logits = linear(h, weight, bias).float()                          # (c, V)
            lse = torch.logsumexp(logits, dim=-1)                             # (c,)
            ce = lse - logits.gather(1, t[:, None]).squeeze(1)                # (c,)
            if ce_out is not None:
                ce_out[s:s + chunk] = ce
            w = None if token_weights is None else token_weights[s:s + chunk].float()  # (c,)
            total += (ce if w is None else ce * w).sum()
            if need_h or need_w or need_b:
                p = logits.sub_(lse[:, None]).exp_()                          # softmax, in place
                p[torch.arange(t.shape[0], device=t.device), t] -= 1.0        # dCE/dlogits
                if w is not None:
                    p.mul_(w[:, None])                                        # d(w CE)/dlogits
                if need_h:
                    grad_h[s:s + chunk] = linear(p.to(weight.dtype), weight.t())  # (c, V) x (V, d)
                if need_w:
                    grad_w += p.T @ h.float()
                if need_b:
                    grad_b += p.sum(0)
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in (grad_h, grad_w, grad_b)))
        ctx.flags = (need_h, need_w, need_b, hidden.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        gh, gw, gb = ctx.saved_tensors
        need_h, need_w, need_b, h_dtype, w_dtype = ctx.flags
        return ((gh * grad_out).to(h_dtype) if need_h else None,
                (gw * grad_out).to(w_dtype) if need_w else None,
                (gb * grad_out).to(w_dtype) if need_b else None, None, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor,
                         chunk: int | None = None, token_weights: torch.Tensor | None = None,
                         ce_out: torch.Tensor | None = None) -> torch.Tensor:
    """Summed CE of ``head(hidden)`` against ``targets`` (N,) without materialising all logits.

    ``token_weights`` (N,) weighs each target's CE; ``ce_out`` (N,) receives the unweighted CEs
    (``LinearCrossEntropy``). A head whose weight FSDP training split by rows (``vocab_shard``)
    computes its slice of the vocabulary for every process's rows instead (a collective; the
    weight is frozen there; no weights there)."""
    vocab = head.weight.shape[0]
    chunk = chunk or max(16, (1 << 24) // vocab)  # ~64 MB of fp32 logits per chunk
    if hasattr(head.weight, "to_local"):
        if token_weights is not None or ce_out is not None:
            raise ValueError("per-token loss weights are not supported with a vocabulary-sharded head")
        from deltatune.training.vocab_shard import sharded_linear_cross_entropy

        if head.bias is not None and head.bias.requires_grad:  # a trained bias: the head gathered for the call
            return F.cross_entropy(head(hidden).float(), targets, reduction="sum")
        return sharded_linear_cross_entropy(hidden, head, targets, chunk)
    return LinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, chunk, token_weights, ce_out)


def applying(model: nn.Module, adapter_names=None):
    """The adapter model's call entry (``PeftModel.applying``: what its ``forward`` does to a call),
    so the loss and evaluation, which call the decoder directly, apply adapters exactly as
    ``forward`` does. Yields the ``Call`` whose ``prepare`` gives the decoder's inputs; for a
    model without adapters, one that prepares nothing."""
    from deltatune.peft_model import NO_ADAPTERS, PeftModel

    inner = adapter_model(model)
    return inner.applying(adapter_names) if isinstance(inner, PeftModel) else nullcontext(NO_ADAPTERS)


def packable(model) -> bool:
    """Whether the active adapter's method can train on packed rows (its declared capability)."""
    from deltatune import registry

    inner = adapter_model(model)
    configs = getattr(inner, "peft_config", None)
    active = getattr(inner, "active_adapter", None)
    if not isinstance(configs, dict) or active not in configs:
        return True
    return registry.method_of(configs[active]).packable


def label_only_parts(model: nn.Module):
    """``(decoder, head, plain)`` of the model inside ``model`` where the loss calls its decoder
    on its own (the label-only head path), else None."""
    return _fast_parts(unwrap(model))


def _fast_parts(hf: nn.Module):
    """``(decoder, head, plain)`` if the label-only path applies, else None."""
    get_decoder = getattr(hf, "get_decoder", None)
    get_head = getattr(hf, "get_output_embeddings", None)
    if get_decoder is None or get_head is None:
        return None
    cfg = getattr(hf, "config", None)
    for attr in _LOGIT_POSTPROCESSING:
        value = getattr(cfg, attr, None)
        if value not in (None, 1, 1.0):
            return None
    try:
        decoder, head = get_decoder(), get_head()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or head is None or decoder is hf:
        return None
    return decoder, head, type(head) is nn.Linear


def lm_loss_sum(model: nn.Module, batch: Batch, weights: torch.Tensor | None = None,
                token_losses: torch.Tensor | None = None) -> torch.Tensor:
    """Sum (not mean) of token cross-entropies over ``batch``'s label positions; fp32 scalar.

    The decoder is called directly (label-only head), inside the adapter model's call entry
    (``applying``), whose call prepares the decoder's inputs (virtual tokens), so adapters act on
    the batch exactly as in ``PeftModel.forward``.

    Args:
        weights: (R, L) weight of each position's cross-entropy in the sum (default 1 each);
            ``train_many`` gives each task's tokens ``1 / its label count``.
        token_losses: (R, L) fp32 tensor that receives each label position's unweighted
            cross-entropy (other positions untouched; no gradient), to report parts of the sum.
    """
    with applying(model) as call:
        return _lm_loss_sum(model, batch, call, weights, token_losses)


def _lm_loss_sum(model: nn.Module, batch: Batch, call, weights=None, token_losses=None) -> torch.Tensor:
    hf = unwrap(model)
    sel = batch.targets != IGNORE                                               # (R, L)
    targets = batch.targets[sel]                                                # (N,)
    w = None if weights is None else weights[sel]                               # (N,)
    ce_out = None if token_losses is None else torch.empty(targets.shape, dtype=torch.float32,
                                                           device=targets.device)  # (N,)
    total = _label_loss(hf, batch, call, sel, targets, w, ce_out)
    if token_losses is not None:
        token_losses[sel] = ce_out
    return total


def _weighted_sum(ce: torch.Tensor, w: torch.Tensor | None, ce_out: torch.Tensor | None) -> torch.Tensor:
    """``sum(w * ce)`` of per-target cross-entropies (N,), ``ce`` copied to ``ce_out`` if given."""
    if ce_out is not None:
        ce_out.copy_(ce.detach())
    return (ce if w is None else ce * w).sum()


def _label_loss(hf, batch: Batch, call, sel, targets, w, ce_out) -> torch.Tensor:
    parts = _fast_parts(hf)
    kwargs = dict(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
    if parts is None and batch.prefix is not None:
        raise ValueError(f"{type(hf).__name__}: a batch with a shared prefix needs the decoder and head "
                         "called separately (see training.prefix.why_not)")
    if parts is None:  # the whole model, called as PeftModel.forward calls it, without peft's extra
        # forward of the virtual tokens alone (their logits would be sliced away here)
        logits = hf(**call.prepare(kwargs)).logits[:, -sel.shape[1]:]  # (R, L, V)
        return _weighted_sum(F.cross_entropy(logits[sel].float(), targets, reduction="none"), w, ce_out)
    decoder, head, plain = parts
    inputs = call.prepare(kwargs, callee=decoder)                       # the method's inputs (virtual tokens)
    with cpu_bf16_attention(hf, batch.input_ids):
        if batch.prefix is None:
            hidden = decoder(**inputs).last_hidden_state                        # (R, L, d)
        else:  # the rows continue a prefix they share (training.prefix), which runs once
            from deltatune.training.prefix import shared_hidden

            hidden = shared_hidden(decoder, call, batch)                        # (R, L, d)
    hidden = hidden[sel]                                                        # (N, d)
    if plain:
        return linear_cross_entropy(hidden, head, targets, token_weights=w, ce_out=ce_out)
    return _weighted_sum(F.cross_entropy(head(hidden).float(), targets, reduction="none"), w, ce_out)


@contextmanager
def cpu_bf16_attention(hf: nn.Module, input_ids: torch.Tensor):
    """Use eager attention for short rows when computing in bf16 on the CPU.

    Measured on SmolLM2-135M (rows of ~100 tokens, AVX512-BF16 CPU): a training step is ~15% faster
    with eager attention than with SDPA's CPU flash kernel in bf16 (no difference in fp32).
    Eager attention stores (rows, heads, L, L) probabilities, so only rows up to
    ``EAGER_MAX_LEN`` switch; models not on ``sdpa`` are left alone, and so are models with
    gradient checkpointing on: their backward recomputes the forward after this context has
    ended, and a recompute on another attention path is refused by ``torch.utils.checkpoint``.
    """
    cfg = getattr(hf, "config", None)
    bf16 = (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16) or \
        getattr(hf, "dtype", None) == torch.bfloat16
    if (cfg is None or getattr(cfg, "_attn_implementation", None) != "sdpa" or not bf16
            or input_ids.device.type != "cpu" or input_ids.shape[1] > EAGER_MAX_LEN
            or _checkpointing(hf)):
        yield
        return
    cfg._attn_implementation = "eager"
    try:
        yield
    finally:
        cfg._attn_implementation = "sdpa"


def _checkpointing(hf: nn.Module) -> bool:
    """True if transformers' gradient (activation) checkpointing is on in ``hf``."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in hf.modules())


class LossModule(nn.Module):
    """``forward(batch) -> summed loss``; the module DDP wraps, so its hooks see this forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> torch.Tensor:
        return lm_loss_sum(self.model, batch)
