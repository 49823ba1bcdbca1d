"""A preallocated KV cache with one slot per running sequence, shared by a batch in which every
row is at its own position (continuous batching).

Per layer ``K, V (slots, kv_heads, max_model_len, head_dim)`` are allocated once; running
sequences occupy slots ``0 .. B-1`` (the engine keeps them compact by moving the last sequence
into a freed slot), so a decode step attends to the view ``K[:B, :, :L]`` with no copy, and a
4D mask hides each row's positions past its own length. Memory is therefore bounded by the
allocation and reused by every request: nothing grows over a long run. Positions are zeroed the
first time any row reads them (``ensure_clean``), so on CPU the pages of a long context are
touched only when some sequence gets that long.

Two modes, set by the engine before each forward:

- prefill of ``n`` new sequences, left-padded to one length ``T``: ``update`` writes each row's
  real positions into its slot and returns the new keys themselves (the prompt attends to itself);
- decode of the ``B`` running sequences, one token each at position ``pos[i]``: ``update`` writes
  that position and returns ``K[:B, :, :L]``.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache


class SlotKVCache(Cache):
    """``transformers`` cache whose rows are slots of a preallocated buffer (see the module doc)."""

    def __init__(self, num_layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(layers=[])
        shape = (slots, kv_heads, max_len, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.slots, self.max_len = slots, max_len
        self.clean = 0                       # positions [0, clean) of every slot hold finite values
        self._mode: tuple = ()

    @property
    def nbytes(self) -> int:
        """Bytes allocated (keys and values of every layer)."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def ensure_clean(self, length: int) -> None:
        """Zero positions up to ``length`` before any is written or read: a never-written position
        is masked, but a masked NaN would still poison the attention's weighted sum. Must run
        before writes there (it would wipe them)."""
        if length > self.clean:
            for t in self.keys + self.values:
                t[:, :, self.clean:length].zero_()
            self.clean = length

    def for_prefill(self, first_slot: int, lengths: list[int], padded: int, starts: list[int] | None = None,
                    prefix: list | None = None) -> None:
        """Next forward: rows are new sequences for slots ``first_slot ..``, each ``lengths[i]``
        tokens left-padded to ``padded``, written from slot position ``starts[i]`` (default 0; a
        virtual-token row's prefix is before it). ``prefix``: per layer the keys and values
        (n, kv, P, hd) the new tokens also attend to, before their own (``serving.virtual_rows``)."""
        K = self.keys[0]
        heads, device = K.shape[1], K.device
        n = torch.tensor(lengths, device=device)
        # every real (row, head, position): where it sits in the forward's keys and in the cache
        row = torch.repeat_interleave(torch.arange(len(lengths), device=device), n)            # (N,)
        t = torch.arange(int(n.sum()), device=device) - torch.repeat_interleave(n.cumsum(0) - n, n)
        h = torch.arange(heads, device=device)[:, None]                                         # (kv, 1)
        src = (row * heads + h) * padded + padded - n[row] + t                                  # (kv, N)
        if starts is not None:
            t = t + torch.tensor(starts, device=device)[row]
        dst = ((first_slot + row) * heads + h) * self.max_len + t
        self._mode = ("prefill", src.reshape(-1), dst.reshape(-1), prefix)

    def for_decode(self, positions: torch.Tensor, length: int) -> None:
        """Next forward: row ``i`` (slot ``i``) adds one token at ``positions[i]``; attend to ``length``."""
        heads = self.keys[0].shape[1]
        rows = torch.arange(positions.shape[0], device=positions.device)
        dst = (rows[:, None] * heads + torch.arange(heads, device=positions.device)) * self.max_len + positions[:, None]
        self._mode = ("decode", dst.reshape(-1), positions.shape[0], length)                    # (B * kv,)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        K, V = self.keys[layer_idx], self.values[layer_idx]
        head_dim = K.shape[-1]
        # one index_copy_ per tensor into the flat (slots * kv_heads * max_len, head_dim) view,
        # with the indices computed once per forward (for_prefill / for_decode), not per layer
        if self._mode[0] == "prefill":
            _, src, dst, prefix = self._mode
            K.view(-1, head_dim).index_copy_(0, dst, key_states.reshape(-1, head_dim).index_select(0, src))
            V.view(-1, head_dim).index_copy_(0, dst, value_states.reshape(-1, head_dim).index_select(0, src))
            if prefix is not None:
                pk, pv = prefix[layer_idx]
                return torch.cat([pk, key_states], dim=2), torch.cat([pv, value_states], dim=2)   # (n, kv, P+T, hd)
            return key_states, value_states
        _, dst, B, length = self._mode
        K.view(-1, head_dim).index_copy_(0, dst, key_states.reshape(-1, head_dim))          # (B * kv, head_dim)
        V.view(-1, head_dim).index_copy_(0, dst, value_states.reshape(-1, head_dim))
        return K[:B, :, :length], V[:B, :, :length]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot ``src``'s first ``length`` positions to slot ``dst`` (compaction)."""
        for t in self.keys + self.values:
            t[dst, :, :length] = t[src, :, :length]

    # -- what transformers may ask of a cache -----------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_len

    def __len__(self) -> int:
        return len(self.keys)


def prefill_mask(lengths: list[int], padded: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Additive mask (n, 1, T, T) for left-padded prompts: causal within each prompt; a padding
    query sees only itself, so no row is all-masked and padding stays finite."""
    t = torch.arange(padded, device=device)
    start = padded - torch.tensor(lengths, device=device)[:, None, None]           # (n, 1, 1)
    allowed = (t[None, None, :] <= t[None, :, None]) & ((t[None, None, :] >= start) | (t[None, None, :] == t[None, :, None]))
    return _additive(allowed[:, None], dtype)


def decode_mask(positions: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (B, 1, 1, L): row ``i`` sees positions ``0 .. positions[i]``."""
    t = torch.arange(length, device=positions.device)
    return _additive((t[None, :] <= positions[:, None])[:, None, None], dtype)


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)
