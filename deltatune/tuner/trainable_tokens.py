"""Trainable tokens: LoRA's ``trainable_token_indices``, a few embedding rows trained in full.

New special tokens need their own embedding rows trained, but training the whole embedding
(``modules_to_save``) saves vocabulary x dim values. Here each adapter holds only its rows:
``trainable_tokens_delta`` (n_rows, dim), starting as a copy of the base rows, and the forward
pass uses the base weight with those rows *replaced* (not added to), so an embedding resized
with random new rows behaves the same wherever the adapter is loaded (peft's semantics).

Layout, as peft's (so files and attribute paths match): the embedding at ``emb`` becomes a
``TrainableTokensWrapper`` whose ``token_adapter`` holds the base module (``base_layer``), the
per-adapter rows and the original rows (for unmerging). The file key is
``<module>.token_adapter.trainable_tokens_delta``.

Tied embeddings: when the output head shares its weight with the input embedding, the head is
wrapped too, with a ``token_adapter`` that reads the embedding's rows (``tied``): one set of
trained rows, used on both sides, saved once (under the embedding).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.adapter_set import MixingError
from deltatune.config import ConfigError
from deltatune.methods.base import AdapterLayer


class _Rows(nn.Module):
    """Per-adapter buffers (the original rows), a dict-like module as peft's ``BufferDict``."""

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        self.register_buffer(name, value, persistent=False)  # as peft: not in the model's state dict

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._buffers[name]

    def __delitem__(self, name: str) -> None:
        del self._buffers[name]

    def __contains__(self, name: str) -> bool:
        return name in self._buffers

    def __iter__(self):
        return iter(self._buffers)

    def __len__(self) -> int:
        return len(self._buffers)


class TokenRows(nn.Module):
    """The base module and each adapter's replacement rows (peft's ``token_adapter``).

    Attributes:
        base_layer: the embedding (or, tied, the output head) whose rows are replaced.
        trainable_tokens_delta: adapter -> Parameter (n_rows, dim), the rows' trained values.
        trainable_tokens_original: adapter -> buffer (n_rows, dim), the base rows (for unmerging).
        token_indices: adapter -> list of row indices.
        tied_adapter: the embedding's ``TokenRows`` whose rows this one uses, or None.
    """

    def __init__(self, base_layer: nn.Module, tied: "TokenRows | None" = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._tied = [tied] if tied is not None else []  # a list: not a submodule, not saved twice
        if tied is None:
            self.trainable_tokens_delta = nn.ParameterDict()
            self.trainable_tokens_original = _Rows()
            self.token_indices: dict[str, list[int]] = {}

    @property
    def tied_adapter(self) -> "TokenRows | None":
        return self._tied[0] if self._tied else None

    def __getattr__(self, name: str):
        """A tied head reads the embedding's rows (same objects: one copy, trained once)."""
        if name in ("trainable_tokens_delta", "trainable_tokens_original", "token_indices") and self._tied:
            return getattr(self._tied[0], name)
        return super().__getattr__(name)

    def add(self, adapter: str, indices: list[int]) -> None:
        """Start adapter ``adapter``'s rows ``indices`` as copies of the base rows."""
        weight = self.base_layer.weight  # (vocab, dim) for Embedding and for a Linear head alike
        bad = [i for i in indices if not 0 <= i < weight.shape[0]]
        if bad:
            raise ConfigError(f"trainable_token_indices: {bad} out of range for a vocabulary of {weight.shape[0]}")
        values = weight.detach()[torch.tensor(indices, device=weight.device)].clone()  # (n_rows, dim)
        self.token_indices[adapter] = list(indices)
        self.trainable_tokens_delta[adapter] = nn.Parameter(values.clone())
        self.trainable_tokens_original[adapter] = values

    def remove(self, adapter: str) -> None:
        """Drop adapter ``adapter``'s rows (a tied head owns none)."""
        if self._tied:
            return
        for table in (self.trainable_tokens_delta, self.trainable_tokens_original):
            if adapter in table:
                del table[adapter]
        self.token_indices.pop(adapter, None)

    def weight_with(self, weight: torch.Tensor, adapter: str, rows: str = "delta") -> torch.Tensor:
        """``weight`` (vocab, dim) with adapter ``adapter``'s rows replaced by its trained values
        (``rows="delta"``) or by the originals (``rows="original"``); differentiable, not in place."""
        table = self.trainable_tokens_delta if rows == "delta" else self.trainable_tokens_original
        index = torch.tensor(self.token_indices[adapter], device=weight.device)
        return weight.index_copy(0, index, table[adapter].to(weight))

    def forward(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        """The base module's output with adapter ``adapter``'s rows in its weight."""
        base = self.base_layer
        weight = self.weight_with(base.weight, adapter)
        if isinstance(base, nn.Embedding):
            out = F.embedding(x, weight, base.padding_idx, base.max_norm, base.norm_type,
                              base.scale_grad_by_freq, base.sparse)  # (..., dim)
            scale = getattr(base, "embed_scale", None)  # scaled embeddings (Gemma) scale in forward
            return out * scale.to(out.dtype) if isinstance(scale, torch.Tensor) else out
        if isinstance(base, nn.Linear):  # a head tied to the embedding: (..., dim) -> (..., vocab)
            return F.linear(x, weight, base.bias)
        raise ConfigError(f"trainable tokens wrap an embedding or a tied linear head, not {type(base).__name__}")


class TrainableTokensWrapper(AdapterLayer):
    """An embedding whose adapters each replace a few of its rows (peft's class of this name).

    The base module lives in ``token_adapter.base_layer`` (peft's state-dict path);
    ``base_layer`` is a view of it. Merging writes the rows into the base weight; unmerging
    writes the originals back. Rows of different adapters in one batch are not supported.
    """

    def __init__(self, base_layer: nn.Module, adapter_set=None, tied: TokenRows | None = None) -> None:
        super().__init__(base_layer, adapter_set)
        del self._modules["base_layer"]  # kept once, under token_adapter (the ``base_layer`` property)
        self.token_adapter = TokenRows(base_layer, tied)

    @property
    def base_layer(self) -> nn.Module:
        return self.token_adapter.base_layer

    @property
    def original_module(self) -> nn.Module:
        return self.token_adapter.base_layer

    @property
    def weight(self) -> torch.Tensor:
        """The weight the current route sees (models read ``embed.weight.dtype`` and the like)."""
        route = self.route()
        base = self.base_layer.weight
        return self.token_adapter.weight_with(base, route) if isinstance(route, str) else base

    def __getattr__(self, name: str):
        """Attributes the wrapper lacks (``num_embeddings``, ``padding_idx``...) come from the base."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "token_adapter" or "token_adapter" not in self._modules:
                raise
            return getattr(self._modules["token_adapter"].base_layer, name)

    def tie_to(self, source: TokenRows, module_name: str) -> None:
        """Use ``source``'s rows (the input embedding's) from now on: this is a tied output head."""
        if self.token_adapter.tied_adapter is source:
            return
        if self.held:
            raise ConfigError(f"{module_name}: holds trainable tokens of its own ({self.held}) but its weight is "
                              "tied to the input embedding; name both in trainable_token_indices, or neither")
        self.token_adapter = TokenRows(self.base_layer, source)

    def add_adapter(self, name: str, config=None, module_name: str = "", indices: list[int] | None = None) -> None:
        """Hold adapter ``name`` with rows ``indices`` (a tied head: the embedding's rows)."""
        if not self.token_adapter._tied:
            if indices is None:
                raise ConfigError(f"{module_name}: trainable tokens need their token indices")
            self.token_adapter.add(name, indices)
        self._register(name)

    def adapter_parameters(self, name: str):
        if not self.token_adapter._tied and name in self.token_adapter.trainable_tokens_delta:
            yield "token_adapter.trainable_tokens_delta", self.token_adapter.trainable_tokens_delta[name]

    def delete_adapter(self, name: str) -> None:
        self.token_adapter.remove(name)
        super().delete_adapter(name)

    def cannot_mix_reason(self) -> str | None:
        return "trainable tokens replace embedding rows per adapter; this layer has no per-row path"

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        route = self.route()
        if route is None:
            return self.base_layer(x, *args, **kwargs)
        if not isinstance(route, str):
            raise MixingError(self.cannot_mix_reason())
        return self.token_adapter(x, route)

    # -- merging: rows written into the base weight, originals written back -------------------
    def merged_weight(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        return self.token_adapter.weight_with(weight, name, "delta")

    def unmerged_weight(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        return self.token_adapter.weight_with(weight, name, "original")

    def merge(self, names: list[str], safe_merge: bool = False) -> None:
        """Fold adapters ``names`` in; ValueError if two of them (or one already merged) share rows:
        the rows are replaced, not added, so the result would depend on the order."""
        names = [n for n in names if n in self.held]
        seen: set[int] = set()
        for name in dict.fromkeys([*self.merged_adapters, *names]):
            rows = set(self.token_adapter.token_indices[name])
            if seen & rows:
                raise ValueError(f"Token indices of adapter {name} are already defined and would result in undefined "
                                 "merging behavior. Only disjunct token indices are currently supported.")
            seen |= rows
        super().merge(names, safe_merge)


def token_targets(model: nn.Module, config) -> dict[str, list[int]]:
    """Module name -> token indices for ``config.trainable_token_indices``: a list means the input
    embedding (``model.get_input_embeddings()``, else a module named ``embed_tokens``); a dict
    maps module-name suffixes to indices.

    Raises:
        ConfigError: indices that are not lists of non-negative integers.
        ValueError: a named module is not in the model, or is also in ``modules_to_save``.
    """
    spec = getattr(config, "trainable_token_indices", None)
    if not spec:
        return {}
    names = [n for n, _ in model.named_modules()]
    entries = dict(spec) if isinstance(spec, dict) else {_input_embedding_name(model): spec}
    for entry, indices in entries.items():
        if isinstance(indices, (str, bytes, int)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices):
            raise ConfigError(f"trainable_token_indices[{entry!r}]={indices!r}: expected a list of token ids")
    saved = getattr(config, "modules_to_save", None) or []
    out = {}
    for entry, indices in entries.items():
        if entry in saved:
            raise ValueError("The embedding layer is already marked to be trained fully, either specify "
                             f'`modules_to_save=[..., "{entry}", ...]` or `trainable_tokens={{\'{entry}\': x}}` '
                             "but not both.")
        hits = [n for n in names if n == entry or n.endswith("." + entry)]
        if not hits:
            raise ValueError(f"Target modules {{{entry!r}}} not found in the base model. Please check the target "
                             "modules and try again. (trainable_token_indices)")
        out.update({h: list(indices) for h in hits})
    return out


def _input_embedding_name(model: nn.Module) -> str:
    get = getattr(model, "get_input_embeddings", None)
    layer = get() if callable(get) else None
    if layer is not None:
        return next((n for n, m in model.named_modules() if m is layer), "embed_tokens")
    return "embed_tokens"
