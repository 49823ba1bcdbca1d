"""The model side of a step: the base on its device with its CPU fast paths, the slot KV cache, the
forward inputs of a prefill or a decode, the forward pass routed per row through the adapters, and
the sampling call.

- prefill: the new sequences' prompts, left-padded into one forward that writes their cache slots;
- decode: every running sequence's last token at its own position over the slots ``0 .. B-1``;
- each row is routed to its own adapter (the core's per-row route: layers gather each row's
  factors from their banks, and keep the gathered factors while the batch's rows keep their adapters);
- a virtual-token adapter's row (prompt tuning, P-tuning, prefix tuning) has its cache prefix in
  its slot before its prompt, and is a base row to the layers (``serving.virtual_rows``).
"""
from __future__ import annotations

import inspect

import torch

from deltatune import devices
from deltatune.serving import norms, packed
from deltatune.serving.adapters import AdapterPool
from deltatune.serving.kv_cache import SlotKVCache, decode_mask, prefill_mask
from deltatune.serving.requests import Seq
from deltatune.serving.sampling import SamplingParams, sample
from deltatune.serving.virtual_rows import PrefillPrefix

DEFAULT_MAX_MODEL_LEN = 2048   # when the model allows more: bounds the KV cache's allocation
CLEAN_CHUNK = 64               # KV positions are zeroed this many at a time on first use


def engine_dtype(dtype, device: torch.device) -> torch.dtype:
    """The engine's compute dtype: ``devices.resolve_dtype`` with any floating dtype allowed, and
    ``auto`` fp32 on every CPU (the packed-GEMM and fused-norm fast paths are fp32; bf16 serving on
    AMX CPUs has not been measured), bf16 on CUDA GPUs that support it."""
    return devices.resolve_dtype(dtype, device, allowed=None, cpu_bf16=False)


class ModelRunner:
    """Runs the forward passes of the engine's steps (see the module doc).

    Args:
        model: the base, in eval mode on ``device``, in its compute ``dtype``.
        max_num_seqs: KV cache slots (the most rows of a decode step).
        max_model_len: requested context length (None: the model's, at most 2048).
        pack_weights: see ``Engine``.
        max_loras, max_cpu_loras, max_lora_rank: the adapter pool's limits (``AdapterPool``).
    """

    def __init__(self, model, device: torch.device, dtype: torch.dtype, *, max_num_seqs: int, max_model_len: int | None, pack_weights: bool | None,
                 max_loras: int, max_cpu_loras: int, max_lora_rank: int) -> None:
        self.model, self.device, self.dtype = model, device, dtype
        self.packed_linears = self._pack(pack_weights, max_num_seqs)
        self.fused_norms = norms.fuse_rms_norms(model) if self.dtype == torch.float32 else 0
        cfg = model.config
        self.vocab = model.get_input_embeddings().num_embeddings   # before adapters wrap the embedding
        limit = getattr(cfg, "max_position_embeddings", None) or DEFAULT_MAX_MODEL_LEN
        self.max_model_len = min(limit, max_model_len or DEFAULT_MAX_MODEL_LEN)
        self.cache = make_cache(cfg, max_num_seqs, self.max_model_len, self.dtype, self.device)
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.pool = AdapterPool(model, max_loras, max_cpu_loras, max_lora_rank, self.max_model_len)
        self._last_call = None                  # the previous forward's Call: its route tensor is reused

    def _pack(self, pack_weights: bool | None, rows: int) -> int:
        """Pack the bare base's linear weights for ``rows``-row GEMMs where that applies; how many."""
        fits = self.device.type == "cpu" and self.dtype == torch.float32 and packed.available()
        if pack_weights and not fits:
            raise ValueError(f"pack_weights=True needs a CPU float32 engine and a PyTorch with oneDNN or MKL "
                             f"(here: device {self.device}, dtype {self.dtype}, packed GEMM "
                             f"{'available' if packed.available() else 'missing'})")
        return packed.pack_linears(self.model, rows) if fits and pack_weights is not False else 0

    # -- forward inputs ------------------------------------------------------------------------
    def prefill(self, seqs: list[Seq], pad: int) -> torch.Tensor:
        """Logits (n, V) of the new sequences' last prompt tokens; their slots of the cache written
        and each ``pos`` set to where its next token goes (its virtual tokens, if any, plus its
        prompt's length). Rows are left-padded with ``pad``."""
        lengths = [len(s.req.prompt_ids) for s in seqs]
        T = max(lengths)
        ids = torch.full((len(seqs), T), pad, dtype=torch.long)                   # (n, T)
        for i, s in enumerate(seqs):
            ids[i, T - lengths[i]:] = torch.tensor(s.req.prompt_ids)
        virtual = PrefillPrefix([self.pool.prefixes.get(s.adapter) for s in seqs])
        offsets = torch.tensor([T - n for n in lengths])[:, None]
        starts = torch.tensor(virtual.starts)[:, None]                          # (n, 1): after the prefix
        positions = (torch.arange(T)[None, :] - offsets).clamp_min(0) + starts    # (n, T)
        self._clean(max(a + n for a, n in zip(virtual.starts, lengths)))
        mask = prefill_mask(lengths, T, self.dtype, self.device)
        if virtual.width:
            virtual.write_slots(self.cache, seqs[0].row)
            self.cache.for_prefill(seqs[0].row, lengths, T, virtual.starts, virtual.blocks(self.cache.keys[0]))
            mask = virtual.mask(mask)                                             # (n, 1, T, P + T)
        else:
            self.cache.for_prefill(seqs[0].row, lengths, T)
        logits = self._forward(ids.to(self.device), positions.to(self.device), mask, [s.adapter for s in seqs])
        for s, a, n in zip(seqs, virtual.starts, lengths):
            s.pos = a + n
        return logits

    def decode(self, seqs: list[Seq]) -> torch.Tensor:
        """Logits (B, V) of every running sequence's next token (rows = slots ``0 .. B-1``); ``pos`` advanced."""
        ids = torch.tensor([[s.tokens[-1]] for s in seqs], device=self.device)    # (B, 1)
        pos = torch.tensor([s.pos for s in seqs], device=self.device)              # (B,)
        length = max(s.pos for s in seqs) + 1
        self._clean(length)
        self.cache.for_decode(pos, length)
        logits = self._forward(ids, pos[:, None], decode_mask(pos, length, self.dtype), [s.adapter for s in seqs])
        for s in seqs:
            s.pos += 1
        return logits

    def _clean(self, length: int) -> None:
        """Zero cache positions before anything is written or read there (in chunks, so not every step)."""
        self.cache.ensure_clean(min(-(-length // CLEAN_CHUNK) * CLEAN_CHUNK, self.cache.max_len))

    # -- the forward pass, through the model's one call entry ---------------------------------
    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, names: list[str]):
        kwargs = {"input_ids": ids, "position_ids": positions, "attention_mask": mask, "use_cache": True,
                  "logits_to_keep": 1, self._cache_kw: self.cache}
        with torch.no_grad():
            if self.pool.peft is None:
                out = self.model(**kwargs)
            else:
                if self.pool.prefixes:  # virtual-token rows: the base's layers (none ready: nothing to map)
                    names = [self.pool.route_name(n) for n in names]
                # reuse=: when the rows' adapters are the previous step's (and no adapter came or
                # went), the call routes with the previous route tensor, so layers reuse their
                # gathered factors at once (``AdapterLayer.gathered``'s identity check, as on each
                # decode step of ``generate``). Safe here: a version's tensors never change while a
                # request runs on it (a reload is a new version).
                with self.pool.peft.applying(names, reuse=self._last_call) as call:
                    self._last_call = call
                    out = self.model(**call.prepare(kwargs))
        return out.logits[:, -1].float()                                   # (B, V)

    # -- sampling ------------------------------------------------------------------------------
    def sample(self, seqs: list[Seq], logits: torch.Tensor, eos: set[int]) -> tuple[list[int | None], dict[int, str]]:
        """Each row's next token, and why for each row that has none (row -> message). A row whose
        logits are not finite (NaN or inf: a broken adapter, an overflow) or whose sampling
        distribution is not, fails alone: the batch's other rows get their tokens as usual. Tokens
        that would end a completion are masked before its ``min_tokens``."""
        bad = (~torch.isfinite(logits).all(-1)).nonzero().flatten().tolist()        # rows, from the model
        errors = {row: f"non-finite logits (NaN or inf) for this request at token {len(seqs[row].tokens)} "
                       f"(adapter {seqs[row].req.version.name if seqs[row].req.version else 'base'!r}); "
                       "the other requests went on" for row in bad}
        if bad:
            logits[bad] = 0.0              # (len(bad), V): keeps the batched sampler's rows finite
        for row, s in enumerate(seqs):
            if len(s.tokens) < s.req.params.min_tokens:
                logits[row, _banned(s.req.params, eos)] = float("-inf")
        tokens = sample(logits, [s.req.params for s in seqs], [s.generator for s in seqs])
        for row, token in enumerate(tokens):
            if token is None and row not in errors:
                errors[row] = (f"sampling failed at token {len(seqs[row].tokens)}: the distribution after "
                               "temperature, top_k and top_p is non-finite; the other requests went on")
        return tokens, errors


def _banned(params: SamplingParams, eos: set[int]) -> list[int]:
    """Tokens that would end a completion (masked before ``min_tokens``)."""
    return sorted(set(params.stop_token_ids) | eos)


def make_cache(cfg, slots: int, max_len: int, dtype, device) -> SlotKVCache:
    """A ``SlotKVCache`` shaped for the model config ``cfg``: ``slots`` rows of ``max_len`` positions."""
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return SlotKVCache(cfg.num_hidden_layers, slots, kv_heads, max_len, head_dim, dtype, device)
