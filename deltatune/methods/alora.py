"""Activated LoRA (aLoRA; Greenewald et al. 2025, arXiv:2504.12397): a LoRA adapter that acts only
from the last occurrence of its *invocation sequence* on.

``LoraConfig(alora_invocation_tokens=[...])`` makes a LoRA adapter activated: on each row, the
delta ``s·B A x`` is added only at the positions from the start of the last occurrence of those
token ids to the end of the row; earlier positions get exactly the base model's output. The base
model's KV cache of everything before the invocation can therefore be reused as it is: a serving
stack switches to the adapter mid-conversation without recomputing the prefix. A row without the
invocation sequence gets no delta anywhere (not even in tokens generated after it).

How it runs here (one delta per layer; nothing per adapter type in ``forward``):

- The call entry (``PeftModel.applying``) opens an ``Activation`` when the call routes an aLoRA
  adapter (one name, or one of a mixed batch's rows), and the ``Call`` fills it from the input
  ids while preparing the inputs (``forward``, ``generate`` and the training loss all prepare).
  It keeps, per row, how many trailing positions the delta reaches (``keep``): the distance from
  the invocation's start to the row's end, 0 where it is absent, and "all" for rows of plain LoRA
  adapters in a mixed batch. Counting from the end makes left padding and the KV cache work: a
  decoding step (one new position per row) is past the invocation in every row that has one.
- ``LoraLayer.forward`` asks ``activation_mask`` for a (N, T, 1) mask and adds ``mask * delta``.
  Plain LoRA adapters get None (no cost beyond a dictionary lookup per layer call).

An aLoRA adapter called without input ids (only ``inputs_embeds``), or through the bare base
model, is not activated anywhere, as in peft. Merging it into the weights is refused (it would act
on every position). The positions are counted in the layer's input, so aLoRA is for layers that
see (rows, positions, features): linear layers (peft's rule; other layer types refuse it).
"""
from __future__ import annotations

import sys
import threading
import warnings
import weakref
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, Sequence

import torch

ALL_POSITIONS = sys.maxsize  # ``keep`` of a row whose adapter is plain LoRA: every position

# id(adapter set) -> its ``Activation``, for the calls running in this thread / task (replaced,
# never mutated, as ``adapter_set._ROUTES``). Read only while some activated call runs (``_running``).
_ACTIVATIONS: ContextVar[dict | None] = ContextVar("deltatune_alora", default=None)
_LOCK = threading.Lock()
_running = 0
# adapter set -> [activation, used]: the activation of the last call run with gradients under
# gradient checkpointing, which the layers' recomputation in backward (outside the call) applies.
_RECOMPUTE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def invocation_tokens(config) -> list[int] | None:
    """An adapter config's aLoRA invocation token ids, or None (not an aLoRA adapter)."""
    return getattr(config, "alora_invocation_tokens", None) or None


def last_invocations(input_ids: torch.Tensor, tokens: Sequence[int]) -> list[int | None]:
    """Per row of ``input_ids`` (N, T): the number of positions from the start of the last
    occurrence of ``tokens`` to the row's end (>= len(tokens)), or None where it does not occur."""
    L, T = len(tokens), input_ids.shape[-1]
    if T < L:
        return [None] * input_ids.shape[0]
    pattern = torch.as_tensor(list(tokens), dtype=input_ids.dtype, device=input_ids.device)   # (L,)
    hits = (input_ids.unfold(-1, L, 1) == pattern).all(-1)                     # (N, T-L+1): a match starts here
    last = hits.shape[-1] - 1 - hits.flip(-1).int().argmax(-1)                 # (N,): last start (if any)
    found = hits.any(-1)
    return [T - s if f else None for s, f in zip(last.tolist(), found.tolist())]


def calculate_alora_offsets(peft_config: dict, active_adapter: str, input_ids: torch.Tensor | None,
                            adapter_names: Sequence[str] | None = None) -> list[int | None]:
    """peft's helper, same answers: per row of ``input_ids``, the positions from the last start of
    that row's adapter's invocation sequence to the end, None where the row's adapter is not aLoRA
    (or ``"__base__"``, or unknown: warned) or its sequence is absent. A row's adapter is
    ``adapter_names[i]`` if given, else ``active_adapter``."""
    if input_ids is None:
        return []
    rows = input_ids.shape[0]
    names = [adapter_names[i] if adapter_names and i < len(adapter_names) else active_adapter for i in range(rows)]
    offsets: list[int | None] = [None] * rows
    for name in dict.fromkeys(names):
        if name != "__base__" and name not in peft_config:
            warnings.warn(f"Adapter '{name}' not found in peft_config. Using base model for its rows.", stacklevel=2)
        tokens = invocation_tokens(peft_config.get(name))
        if tokens is None:
            continue
        idx = [i for i, n in enumerate(names) if n == name]
        for i, found in zip(idx, last_invocations(input_ids[idx], tokens)):
            offsets[i] = found
    return offsets


def _routes_alora(model, adapter_names) -> bool:
    names = [model.active_adapter] if not adapter_names else list(adapter_names)
    return any(invocation_tokens(model.peft_config.get(n)) for n in names)


def get_alora_offsets_for_forward(model, input_ids: torch.Tensor | None = None,
                                  inputs_embeds: torch.Tensor | None = None, **kwargs) -> dict:
    """peft's helper: ``kwargs`` with ``alora_offsets`` (``calculate_alora_offsets``) added when
    the call routes an aLoRA adapter (the active one, or one of ``kwargs["adapter_names"]``) and
    none were given; None, with a warning, when only ``inputs_embeds`` are given."""
    if not _routes_alora(model, kwargs.get("adapter_names")) or kwargs.get("alora_offsets") is not None:
        return kwargs
    if input_ids is None and inputs_embeds is not None:
        warnings.warn("Cannot calculate aLoRA offsets when only inputs_embeds are provided. Disabling aLoRA for "
                      "this forward pass.", stacklevel=2)
    kwargs["alora_offsets"] = None if input_ids is None else calculate_alora_offsets(
        model.peft_config, model.active_adapter, input_ids, kwargs.get("adapter_names"))
    return kwargs


def get_alora_offsets_for_generate(model, *args, **kwargs) -> dict:
    """peft's helper for ``generate``: as ``get_alora_offsets_for_forward``, the ids taken from
    ``input_ids=`` or the first positional tensor (a 1-d one is one row)."""
    if not _routes_alora(model, kwargs.get("adapter_names")) or kwargs.get("alora_offsets") is not None:
        return kwargs
    ids = kwargs.get("input_ids")
    if ids is None and args and isinstance(args[0], torch.Tensor):
        ids = args[0]
    if ids is None:
        warnings.warn("Cannot calculate aLoRA offsets during generate as input_ids are not available. "
                      "Disabling aLoRA.", stacklevel=2)
        kwargs["alora_offsets"] = None
        return kwargs
    kwargs["alora_offsets"] = calculate_alora_offsets(model.peft_config, model.active_adapter,
                                                      ids[None] if ids.dim() == 1 else ids, kwargs.get("adapter_names"))
    return kwargs


class Activation:
    """Where one call's aLoRA adapters act, opened by the call entry and filled by its ``Call``.

    Attributes:
        rows: the adapter of every row (a name), or each row's adapter name (a mixed batch).
        keep: per row, how many trailing positions get the delta (``ALL_POSITIONS`` for a plain
            LoRA row, 0 where the invocation is absent); None until the inputs are read: then no
            aLoRA row is activated anywhere (as peft does without offsets).
    """

    def __init__(self, configs: dict, rows: str | list[str]) -> None:
        self.configs, self.rows = configs, rows
        self.keep: list[int] | None = None
        self._masks: dict[tuple, torch.Tensor] = {}   # (device, dtype, N, T) -> mask: one per step, all layers

    def read(self, kwargs: dict, offsets=None) -> None:
        """Fill ``keep`` from peft-style ``offsets`` (one int or None per row; None: computed) or
        else from ``kwargs``' ``input_ids`` (first tensor argument of ``generate``: 1-d is one row).
        Without ids (only embeddings) nothing is activated, with peft's warning."""
        self._masks = {}
        if offsets is None:
            ids = kwargs.get("input_ids")
            if ids is None:
                warnings.warn("aLoRA: this call has no input_ids (only inputs_embeds?), so the invocation "
                              "sequence cannot be found; the aLoRA adapter is not activated for it", stacklevel=4)
                self.keep = None
                return
            ids = ids[None] if ids.dim() == 1 else ids
            names = self.rows if isinstance(self.rows, list) else None
            offsets = calculate_alora_offsets(self.configs, self.rows if names is None else None, ids, names)
        names = self.rows if isinstance(self.rows, list) else [self.rows] * len(offsets)
        self.keep = [(found or 0) if invocation_tokens(self.configs.get(name)) else ALL_POSITIONS
                     for name, found in zip(names, offsets)]

    def mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """For a layer input ``x`` (N, T, in) or (N, in): a (N, T, 1) / (N, 1) mask in ``x``'s dtype,
        1 where the delta acts; None where it acts everywhere. N may be a multiple of the rows
        (beams, several sequences per prompt: each prompt's rows are consecutive).

        Raises:
            ValueError: an input of another shape, or N not a multiple of the rows.
        """
        if x.dim() not in (2, 3):
            raise ValueError(f"aLoRA needs a layer input of shape (rows, positions, features), got {tuple(x.shape)}")
        n, T = x.shape[0], x.shape[1] if x.dim() == 3 else 1
        if self.keep is None:
            return x.new_zeros(())
        if min(self.keep) >= T:
            return None
        key = (x.device, x.dtype, n, T)
        if key not in self._masks:
            rows = len(self.keep)
            if n % rows:
                raise ValueError(f"aLoRA: the layer input has {n} rows, not a multiple of the call's {rows} rows")
            keep = torch.tensor([min(k, T) for k in self.keep], device=x.device).repeat_interleave(n // rows)  # (N,)
            on = torch.arange(T, device=x.device)[None, :] >= (T - keep)[:, None]                            # (N, T)
            self._masks[key] = on.to(x.dtype).view(n, T, 1) if x.dim() == 3 else on.to(x.dtype)             # (N, T, 1)
        return self._masks[key]


def _current(adapter_set) -> Activation | None:
    if not _running:
        return None
    found = _ACTIVATIONS.get()
    return None if found is None else found.get(id(adapter_set))


def _row_names(adapter_set, names: list[str] | None, route) -> str | list[str]:
    if isinstance(route, str):
        return route
    if names is not None:
        return list(names)
    by_slot = {slot: name for name, slot in adapter_set.slots.items()}
    return [by_slot.get(s, "__base__") for s in route.tolist()]


@contextmanager
def activating(adapter_set, names: list[str] | None, route, checkpointed=lambda: False) -> Iterator[Activation | None]:
    """The call entry's aLoRA part: an ``Activation`` for the body when ``route`` (with rows
    ``names``; None: the current route) reaches an aLoRA adapter, else None. A call that keeps the
    current route inside an activated one shares its activation.

    ``checkpointed()``: True when the model trains with gradient checkpointing; the activation
    of a call with gradients is then kept for the layers' recomputation in backward.

    Raises:
        ValueError: under gradient checkpointing, a second call with gradients before the first
            one's backward (its recomputation would not know which call's positions to use).
    """
    global _running
    enclosing = _current(adapter_set) if names is None else None
    if route is None or enclosing is not None:
        yield enclosing
        return
    rows = _row_names(adapter_set, names, route)
    if not any(invocation_tokens(adapter_set.configs.get(n)) for n in ([rows] if isinstance(rows, str) else set(rows))):
        yield None
        return
    activation = Activation(adapter_set.configs, rows)
    if torch.is_grad_enabled() and checkpointed():
        _keep_for_recompute(adapter_set, activation)
    token = _ACTIVATIONS.set({**(_ACTIVATIONS.get() or {}), id(adapter_set): activation})
    with _LOCK:
        _running += 1
    try:
        yield activation
    finally:
        with _LOCK:
            _running -= 1
        _ACTIVATIONS.reset(token)


def _keep_for_recompute(adapter_set, activation: Activation) -> None:
    pending = _RECOMPUTE.get(adapter_set)
    if pending is not None and not pending[1]:
        del _RECOMPUTE[adapter_set]   # the next call starts afresh
        raise ValueError("Multiple invocations of PEFT forward hooks before .backward() with enabled gradient "
                         "checkpointing: an aLoRA adapter's recomputation in backward needs its own call's "
                         "invocation positions. Disable gradient checkpointing or call backward after each forward.")
    _RECOMPUTE[adapter_set] = [activation, False]


def _recomputing(adapter_set) -> Activation | None:
    """The activation a checkpointed layer recomputed in backward applies, or None."""
    pending = _RECOMPUTE.get(adapter_set)
    if pending is None or torch._C._current_graph_task_id() == -1:   # -1: not inside a backward pass
        return None
    pending[1] = True
    return pending[0]


def _any_activated(adapter_set) -> bool:
    """Whether any adapter of ``adapter_set`` is an aLoRA adapter: read per layer call of a mixed
    batch, so cached per ``adapter_set.version`` (adapters come and go only through add/remove, and a
    config replaced in place keeps its invocation tokens: hot-swap checks them)."""
    hit = getattr(adapter_set, "_alora_any", None)
    if hit is None or hit[0] != adapter_set.version:
        hit = adapter_set._alora_any = (adapter_set.version,
                                        any(invocation_tokens(c) for c in adapter_set.configs.values()))
    return hit[1]


def activation_mask(layer, route, x: torch.Tensor) -> torch.Tensor | None:
    """For a LoRA layer's call on ``x`` under ``route``: None when the delta acts on every position
    (no aLoRA adapter routed: the common case, one dictionary lookup), else the mask to multiply
    the delta by (``Activation.mask``; a scalar 0 for an aLoRA adapter run outside a call that read
    its inputs, as peft does without offsets).

    Raises:
        NotImplementedError: a mixed batch with aLoRA rows on a layer holding DoRA adapters.
    """
    configs = layer.adapter_set.configs
    if isinstance(route, str):
        if invocation_tokens(configs.get(route)) is None:
            return None
    elif not _any_activated(layer.adapter_set):
        return None
    activation = _current(layer.adapter_set) or _recomputing(layer.adapter_set)
    if activation is None:
        return x.new_zeros(()) if isinstance(route, str) else None
    if not isinstance(route, str) and layer.uses_dora(route):
        raise NotImplementedError("a batch mixing aLoRA rows with DoRA adapters is not supported; run the DoRA "
                                  "adapter's rows in a separate call")
    return activation.mask(x)


def check_layer(layer, config, module_name: str) -> None:
    """Refuse an aLoRA adapter on a layer type whose input has no position axis to mask (peft's
    rule: linear layers only). Raises ConfigError naming the module."""
    from deltatune.config import ConfigError

    if invocation_tokens(config) is not None and not getattr(layer, "activatable", False):
        raise ConfigError(f"alora_invocation_tokens: aLoRA applies to linear layers only, not {module_name} "
                          f"({type(layer).__name__}); narrow target_modules")
