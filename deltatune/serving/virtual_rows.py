"""Virtual-token adapters in the engine: prompt tuning, P-tuning and prefix tuning rows beside base
and LoRA rows in one batch.

What ``PeftModel.generate`` does for one such adapter (``methods.virtual_inputs``): its ``n``
virtual tokens become a KV cache prefix at positions ``0 .. n-1`` (prefix tuning's keys and values
as they are; prompt tuning's and P-tuning's are the keys and values of the virtual embeddings run
through the base, which see nothing but themselves and so depend on no input), and the real tokens
follow at positions ``n, n+1, ...``, every one of them seeing the whole prefix. The engine does the
same for each row:

- when the adapter is made ready, ``build_prefix`` computes its prefix once, with the same
  function ``generate`` uses (``virtual_inputs.prefix_key_values``), under the base route
  (P-tuning's encoder ran when the file was saved: the file holds its output embeddings);
- at prefill, ``PrefillPrefix`` writes each new row's prefix into positions ``0 .. n-1`` of its
  cache slot; the row's prompt goes to slot positions (and position ids) ``n ..``; the prefill's
  attention sees, before the left-padded prompts, a block of the rows' prefixes (each row's own,
  right-aligned in the block, the rest masked);
- a decode step needs nothing more: the slot holds the prefix and the row's position counts it.

The layers see a virtual-token row as a base row (``route_name``): these methods change no weight.
So base and LoRA rows of the same batch compute exactly what they would without it (their masks
hide the prefix block). A virtual-token adapter that also wraps layers (``modules_to_save``)
would need its own route in the layers, which cannot be mixed: it is refused at load, saying so.
A row's prefix takes ``n`` positions of its slot, so ``n`` + prompt + completion must fit
``max_model_len``; an adapter with ``n >= max_model_len`` is refused at load.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from deltatune.adapter_set import BASE_NAME


@dataclass(frozen=True)
class VirtualPrefix:
    """One adapter's cache prefix: per layer ``keys[l]``, ``values[l]``, each (kv_heads, n, head_dim)."""

    keys: list
    values: list

    @property
    def length(self) -> int:
        """``n``: the positions the prefix takes before a row's prompt."""
        return self.keys[0].shape[1]


def virtual_length(config) -> int:
    """Virtual tokens an adapter config puts before each prompt (0 for methods that add none)."""
    from deltatune import registry

    if registry.method_of(config).component is None:
        return 0
    return int(getattr(config, "num_virtual_tokens", 0) or 0)


def config_problem(config, path, max_model_len: int | None) -> str | None:
    """Why the engine cannot serve a virtual-token adapter's config ``path`` (its
    ``modules_to_save``, or virtual tokens that leave no room in ``max_model_len``), or None."""
    n = virtual_length(config)
    if n and getattr(config, "modules_to_save", None):
        return (f"{path}: a {config.peft_type.value} adapter with modules_to_save={list(config.modules_to_save)} "
                f"{_SAVED_MODULES}")
    if max_model_len is None or n < max_model_len:
        return None
    return (f"{path}: num_virtual_tokens={n} leaves no room for a prompt in this engine's context of "
            f"max_model_len={max_model_len} tokens (the virtual tokens take positions of each row's cache slot)")


_SAVED_MODULES = ("cannot share a batch with other adapters: its rows would need their own route in the saved "
                  "modules; save it without modules_to_save, or run it with PeftModel.generate")


def build_prefix(peft, adapter: str) -> VirtualPrefix | None:
    """The cache prefix of adapter ``adapter`` of PeftModel ``peft`` (None: a method without virtual
    tokens), computed now under the base route, detached.

    Raises:
        ValueError: the adapter also wraps layers (``modules_to_save``): its rows would need their
            own route in those layers, which rows of other adapters cannot share.
    """
    from deltatune.methods.virtual_inputs import prefix_key_values

    tuner = peft.base_model
    component = tuner.component_for(adapter)
    if component is None:
        return None
    wrapped = [name for name, layer in tuner.adapter_layers() if adapter in layer.held]
    if wrapped:  # config_problem refuses modules_to_save first; this guards any other wrapped layer
        raise ValueError(f"a virtual-token adapter that also changes modules ({', '.join(wrapped[:3])}) "
                         f"{_SAVED_MODULES}")
    with torch.no_grad(), peft.applying(BASE_NAME):
        pairs = prefix_key_values(component.module, tuner.model)          # [(1, kv, n, hd)] * layers
    return VirtualPrefix([k[0].detach().clone() for k, _ in pairs], [v[0].detach().clone() for _, v in pairs])


def route_name(adapter: str, prefixes: dict) -> str:
    """The name the layers route row ``adapter`` by: the base for a virtual-token adapter."""
    return BASE_NAME if adapter in prefixes else adapter


class PrefillPrefix:
    """The virtual prefixes of one prefill's rows (see the module doc).

    Args:
        prefixes: per new row, its adapter's ``VirtualPrefix`` or None.
    """

    def __init__(self, prefixes: list) -> None:
        self.prefixes = prefixes
        self.starts = [p.length if p is not None else 0 for p in prefixes]   # slot position of each prompt
        self.width = max(self.starts)                                         # P: the block's positions

    def write_slots(self, cache, first_slot: int) -> None:
        """Write each row's prefix into positions ``0 .. n-1`` of its slot (``first_slot + row``).
        Run after the cache cleaned those positions (``ensure_clean`` wipes)."""
        for row, p in enumerate(self.prefixes):
            if p is None:
                continue
            for layer, (k, v) in enumerate(zip(p.keys, p.values)):
                cache.keys[layer][first_slot + row, :, :p.length] = k                # (kv, n, hd)
                cache.values[layer][first_slot + row, :, :p.length] = v

    def blocks(self, like: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer the keys and values (rows, kv, P, hd) the prefill attends to before the new
        tokens: each row's prefix right-aligned, zeros elsewhere (masked). ``like``: a cache tensor."""
        rows, kv, _, hd = len(self.prefixes), like.shape[1], like.shape[2], like.shape[3]
        layers = len(next(p for p in self.prefixes if p is not None).keys)
        out = []
        for layer in range(layers):
            K = like.new_zeros(rows, kv, self.width, hd)                             # (rows, kv, P, hd)
            V = like.new_zeros(rows, kv, self.width, hd)
            for row, p in enumerate(self.prefixes):
                if p is not None:
                    K[row, :, self.width - p.length:] = p.keys[layer]
                    V[row, :, self.width - p.length:] = p.values[layer]
            out.append((K, V))
        return out

    def mask(self, prompt_mask: torch.Tensor) -> torch.Tensor:
        """The prefill's additive mask (rows, 1, T, P + T): ``prompt_mask`` (rows, 1, T, T) after a
        part in which every query of a row sees that row's prefix and nothing else of the block."""
        rows, _, T, _ = prompt_mask.shape
        cols = torch.arange(self.width, device=prompt_mask.device)
        first = self.width - torch.tensor(self.starts, device=prompt_mask.device)            # (rows,)
        allowed = (cols[None, :] >= first[:, None])[:, None, None, :].expand(rows, 1, T, self.width)
        part = torch.zeros(allowed.shape, dtype=prompt_mask.dtype, device=prompt_mask.device)
        part.masked_fill_(~allowed, torch.finfo(prompt_mask.dtype).min)
        return torch.cat([part, prompt_mask], dim=-1)
