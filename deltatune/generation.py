"""Completions of token-id prompts through a model's ``generate``, and the tokens that end a completion.

One implementation shared by evaluation's exact match (``deltatune.training.evaluate``), ``deltatune
generate`` / ``chat`` and, for its end-of-sequence set, the serving engine. Prompts are left-padded
into one batch (every row's last prompt token aligned), run with the KV cache, and each completion is
cut at its first stop token and decoded without special tokens.

This module imports nothing from ``deltatune``: training, serving and the CLI may all use it.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

# Chat end-of-turn tokens of the common templates (ChatML, Llama 3, Phi, GPT-2, Llama 2, Gemma).
STOP_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "</s>", "<end_of_turn>")


def adapter_model(model: nn.Module) -> nn.Module:
    """``model`` without DDP-style ``.module`` wrappers: the PeftModel (or plain model) itself, whose
    ``generate`` applies the adapters as its ``forward`` does. Training uses it too."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """eos, the chat end-of-turn tokens this vocabulary has, and the model's generation eos ids; sorted."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in STOP_TOKENS if t in vocab)
    config = getattr(adapter_model(model), "generation_config", None) if model is not None else None
    gen_eos = getattr(config, "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif isinstance(gen_eos, (list, tuple)):
        ids.update(gen_eos)
    return sorted(ids)


def pad_id(tokenizer, stops: list[int]) -> int:
    """The padding token: the tokenizer's, else the first stop token, else 0."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return stops[0] if stops else 0


def left_pad(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both (B, T) long with T the longest prompt: each row right-aligned."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)                   # (B, T)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)                      # (B, T)
    for r, prompt in enumerate(prompts):
        ids[r, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[r, width - len(prompt):] = 1
    return ids, mask


def decoding_kwargs(temperature: float = 0.0, top_p: float | None = None) -> dict:
    """``generate`` keywords: greedy for ``temperature`` 0, else sampling at it with nucleus ``top_p``
    (None: off) and no top-k cut."""
    if temperature > 0:
        return dict(do_sample=True, temperature=temperature, top_p=1.0 if top_p is None else top_p, top_k=0)
    return dict(do_sample=False, temperature=None, top_p=None, top_k=None)


@torch.no_grad()
def complete(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, *, batch_size: int | None = None,
             device="cpu", autocast=nullcontext, temperature: float = 0.0, top_p: float | None = None,
             seed: int | None = None, **generate_kwargs) -> list[str]:
    """The completion of each token-id prompt (decoded, special tokens dropped), in input order.

    Args:
        model: a transformers model or a ``PeftModel`` (also under DDP); put in eval mode meanwhile.
        batch_size: None runs the prompts as one batch in their order; otherwise batches of this
            size, longest prompts first (little padding).
        autocast: a zero-argument context-manager factory wrapped around each ``generate`` call.
        temperature, top_p: see ``decoding_kwargs``; ``seed`` seeds torch's RNG before sampling.
        generate_kwargs: passed on to every ``generate`` call (per-row ones such as ``adapter_names``
            for a mixed batch need ``batch_size=None``).
    """
    generator = adapter_model(model)
    was_training = model.training
    model.eval()
    stops = stop_token_ids(tokenizer, model)
    pad = pad_id(tokenizer, stops)
    kwargs = dict(max_new_tokens=max_new_tokens, num_beams=1, use_cache=True, eos_token_id=stops or None,
                  pad_token_id=pad, **decoding_kwargs(temperature, top_p), **generate_kwargs)
    if temperature > 0 and seed is not None:
        torch.manual_seed(seed)
    if batch_size is None:
        order, size = list(range(len(prompts))), max(len(prompts), 1)
    else:
        order, size = sorted(range(len(prompts)), key=lambda i: -len(prompts[i])), batch_size
    out: list[str] = [""] * len(prompts)
    for s in range(0, len(order), size):
        idx = order[s:s + size]
        ids, mask = left_pad([prompts[i] for i in idx], pad)
        with autocast():
            gen = generator.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        for r, i in enumerate(idx):
            new = gen[r, ids.shape[1]:].tolist()
            out[i] = tokenizer.decode(cut_at_stop(new, stops), skip_special_tokens=True)
    model.train(was_training)
    return out


def cut_at_stop(tokens: list[int], stops) -> list[int]:
    """``tokens`` up to (without) the first stop token."""
    cut = next((k for k, t in enumerate(tokens) if t in stops), len(tokens))
    return tokens[:cut]
