"""peft's ``lora_bias=True``: LoRA's ``B`` gets a trained bias ``b`` (out,), so the delta is
``s·(B A x + b)``: the bias is scaled with the rest of the delta (peft applies ``lora_B`` with its
bias, then the scaling). Merging adds ``s·b`` to the base layer's bias; a base layer without one
runs such an adapter but cannot merge it (a warning when the adapter is added, peft's
RuntimeError on merge). Files hold it at peft's key ``<module>.lora_B.bias``.

``LoraBiasMixin`` is what the LoRA layer classes (``methods/lora.py``, ``methods/lora_conv.py``)
use: the bias parameter, the refusals, and the merge/unmerge of the bias around
``AdapterLayer.merge``. Each layer type adds the bias to its own delta (single adapter and per
row, ``lora_kernel.add_bias`` / ``add_row_bias``). Layer types whose ``takes_lora_bias`` is False
(Embedding, MultiheadAttention, as in peft for Embedding) refuse a ``lora_bias`` adapter by name.
"""
from __future__ import annotations

import math
import warnings
from typing import ClassVar

import torch
from torch import nn

from deltatune.config import ConfigError


class PeftWarning(UserWarning):
    """peft's warning category for a setup that works but limits what can be done later (e.g. a
    ``lora_bias`` adapter on a layer without a bias: it runs, but cannot be merged)."""


class LoraBiasMixin:
    """The bias on ``B`` of ``lora_bias`` adapters (see the module doc). The host layer has
    ``lora_B`` (a ModuleDict of modules with ``.weight``), ``scaling``, ``held`` and a
    ``lora_bias`` table (adapter -> bool)."""

    # B may carry a bias: the layer adds ``s·b`` to its delta. Layer types that cannot apply it
    # refuse such an adapter by name.
    takes_lora_bias: ClassVar[bool] = False

    def _check_lora_bias(self, module_name: str) -> None:
        """Refuse ``lora_bias`` where it cannot be applied; warn (peft's words) where the base has
        no bias to merge it into."""
        kind = type(self.base_layer).__name__
        if not self.takes_lora_bias:
            raise ConfigError(f"lora_bias=True is not supported for {kind} ({module_name}): B has no bias in "
                              "this layer type (as in peft); leave this module out of target_modules")
        if getattr(self.base_layer, "bias", None) is None:
            warnings.warn(f"`lora_bias=True` was passed but the targeted layer of type {kind} has no bias. This "
                          f"means that merging LoRA weights won't be possible ({module_name}).", PeftWarning,
                          stacklevel=4)

    def _add_B_bias(self, name: str, zero: bool) -> None:
        """Give adapter ``name``'s ``B`` a bias (out,) (``lora_B.<name>.bias``, peft's key), zero
        unless ``init_lora_weights=False`` (then the module's own random start, as in peft)."""
        B = self.lora_B[name]
        B.bias = nn.Parameter(B.weight.new_empty(B.weight.shape[0]))
        if zero:
            nn.init.zeros_(B.bias)
        else:
            bound = 1 / math.sqrt(B.weight[0].numel())      # torch's default bias start for the layer
            nn.init.uniform_(B.bias, -bound, bound)

    def B_bias(self, name: str) -> torch.Tensor | None:
        """Adapter ``name``'s bias on B (out,), unscaled; None without ``lora_bias``."""
        return self.lora_B[name].bias if self.lora_bias.get(name) else None

    # -- lora_bias: s·b merges into the base layer's bias ---------------------------------------
    def merge(self, names: list[str], safe_merge: bool = False) -> None:
        """As ``AdapterLayer.merge``, and each ``lora_bias`` adapter's ``s·b`` added to the base bias.

        Raises:
            RuntimeError: a ``lora_bias`` adapter and a base layer without a bias (checked first:
                nothing is merged).
        """
        for name in names:
            if name in self.held:
                self._check_bias_merge(name, safe_merge)
        super().merge(names, safe_merge)
        for name in names:
            self._shift_base_bias(name, 1.0)

    def check_merge(self, name: str) -> None:
        """As ``AdapterLayer.check_merge``, the bias included (``safe_merge``)."""
        self._check_bias_merge(name, True)
        super().check_merge(name)

    def unmerge(self, names: list[str]) -> None:
        """As ``AdapterLayer.unmerge``, and each ``lora_bias`` adapter's ``s·b`` taken out of the base bias."""
        super().unmerge(names)
        for name in reversed(names):
            self._shift_base_bias(name, -1.0)

    def _check_bias_merge(self, name: str, finite: bool) -> None:
        b = self.B_bias(name) if name in self.held else None
        if b is None:
            return
        base_bias = getattr(self.base_layer, "bias", None)
        if base_bias is None:
            raise RuntimeError(f"Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias "
                               f"(adapter {name!r}, {type(self.base_layer).__name__})")
        if finite and not torch.isfinite(base_bias.float() + self.scaling[name] * b.float()).all():
            raise ValueError(f"merging adapter {name!r} gives a non-finite bias; not merged")

    def _shift_base_bias(self, name: str, sign: float) -> None:
        """base bias += sign·s·b (fp32 sum, stored in the bias's dtype)."""
        b = self.B_bias(name) if name in self.held else None
        if b is None:
            return
        with torch.no_grad():
            base_bias = self.base_layer.bias                                  # (out,)
            new = base_bias.float() + sign * self.scaling[name] * b.detach().float().to(base_bias.device)
            base_bias.copy_(new.to(base_bias.dtype))
