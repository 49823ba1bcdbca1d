"""LoRA on ``nn.MultiheadAttention``: on its packed q/k/v projection and on its output projection.

torch's attention reads ``in_proj_weight`` and ``out_proj.weight`` as tensors and never calls a
projection's ``forward``, so LoRA cannot add an activation-space delta here: a call runs the
attention with ``W + s·B A`` for both weights (``torch.func.functional_call``, the module itself is
not touched, so gradients reach the factors and nothing needs restoring). That is what peft does by
merging around each call. Rows of one batch would need different weights, so a mixed-adapter batch
is refused (``MixingError``); merging folds both deltas in.

peft's layout, so files interchange: ``<mha>.lora_A.weight`` (r, E) and ``<mha>.lora_B.weight``
(3E, r) for the packed projection; the output projection is a ``LoraLinear`` at
``<mha>.base_layer.out_proj`` (``...out_proj.lora_A.weight`` (r, E), ``lora_B.weight`` (E, r)).
Only ``_qkv_same_embed_dim`` attention (one packed weight), and no DoRA, as in peft.
"""
from __future__ import annotations

import torch
from torch import nn

from deltatune import registry
from deltatune.adapter_set import AdapterSet, MixingError
from deltatune.config import ConfigError, LoraConfig, PeftType
from deltatune.merging import lora_delta
from deltatune.methods.lora import BaseWeightPassThrough, LoraLayer, LoraLinear, init_pair

IN_PROJ, OUT_PROJ = "in_proj_weight", "out_proj.base_layer.weight"


class OutProjLora(BaseWeightPassThrough, LoraLinear):
    """LoRA on the attention's ``out_proj``, held where peft holds it (``base_layer.out_proj``).

    The attention reads ``out_proj.weight`` and ``out_proj.bias`` directly, so they pass through
    to the wrapped projection; its adapters are applied by ``LoraMultiheadAttention``.
    """


class LoraMultiheadAttention(LoraLayer):
    """LoRA on ``nn.MultiheadAttention``: ``in_proj_weight + s·B A`` and ``out_proj`` through its
    own ``OutProjLora``, applied to the weights of each call (see the module docstring)."""

    adapter_containers = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.MultiheadAttention, adapter_set: AdapterSet | None = None) -> None:
        super().__init__(base_layer, adapter_set)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.in_features, self.out_features = base_layer.embed_dim, 3 * base_layer.embed_dim

    # torch's attention attributes, read through (containers such as nn.TransformerEncoderLayer read them)
    embed_dim = property(lambda self: self.base_layer.embed_dim)
    num_heads = property(lambda self: self.base_layer.num_heads)
    head_dim = property(lambda self: self.base_layer.head_dim)
    batch_first = property(lambda self: self.base_layer.batch_first)
    dropout = property(lambda self: self.base_layer.dropout)
    kdim = property(lambda self: self.base_layer.kdim)
    vdim = property(lambda self: self.base_layer.vdim)
    bias_k = property(lambda self: self.base_layer.bias_k)
    bias_v = property(lambda self: self.base_layer.bias_v)
    add_zero_attn = property(lambda self: self.base_layer.add_zero_attn)
    in_proj_weight = property(lambda self: self.base_layer.in_proj_weight)
    in_proj_bias = property(lambda self: self.base_layer.in_proj_bias)

    @property
    def out_proj(self) -> nn.Module:
        """The plain output projection (peft's ``out_proj`` of its layer too)."""
        out = self.out_proj_layer
        return out.base_layer if out is not None else self.base_layer.out_proj

    @property
    def _qkv_same_embed_dim(self) -> bool:
        """False while an adapter applies: ``nn.TransformerEncoderLayer``'s fused path reads
        ``in_proj_weight`` itself when this is True, which would skip the adapter; with it False
        the container calls this layer. True (the base's) when the call runs the base weights."""
        return self.base_layer._qkv_same_embed_dim and self.route() is None

    def merge_masks(self, *args, **kwargs):
        return self.base_layer.merge_masks(*args, **kwargs)

    @property
    def out_proj_layer(self) -> OutProjLora | None:
        """The ``OutProjLora`` inside the attention, while an adapter is held."""
        out = self.base_layer.out_proj
        return out if isinstance(out, OutProjLora) else None

    def add_adapter(self, name: str, config: LoraConfig, module_name: str) -> None:
        """Adapter ``name`` on both projections (same rank and alpha, as in peft).

        Raises:
            ConfigError: DoRA, or attention with separate q/k/v weights (peft refuses both).
        """
        base = self.base_layer
        if not base._qkv_same_embed_dim:
            raise ConfigError(f"LoRA on {module_name} (MultiheadAttention with kdim/vdim != embed_dim): only "
                              "attention with one packed in_proj_weight is supported, as in peft")
        if config.use_dora:
            raise ConfigError(f"DoRA on {module_name} (MultiheadAttention) is not supported (nor in peft); "
                              "set use_dora=False or leave this module out of target_modules")
        if self.out_proj_layer is None:
            base.out_proj = OutProjLora(base.out_proj, self.adapter_set)
        self.out_proj_layer.add_adapter(name, config, module_name)
        super().add_adapter(name, config, module_name)

    def init_factors(self, name: str, init, module_name: str) -> None:
        if isinstance(init, str) and init.startswith("pissa"):
            raise ConfigError(f"init_lora_weights={init!r} is only for linear layers, not {module_name} "
                              "(MultiheadAttention)")
        init_pair(self.lora_A[name].weight, self.lora_B[name].weight, init, self.r[name])

    def delta_weight(self, name: str) -> torch.Tensor:
        """The packed projection's ``s·B A`` (3E, E), fp32."""
        return lora_delta(self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name])

    def adapter_parameters(self, name: str):
        """Own factors, then the output projection's under peft's ``base_layer.out_proj.`` keys."""
        yield from super().adapter_parameters(name)
        if self.out_proj_layer is not None:
            for key, p in self.out_proj_layer.adapter_parameters(name):
                yield f"base_layer.out_proj.{key}", p

    def delete_adapter(self, name: str) -> None:
        """Drop ``name`` from both projections; the plain ``out_proj`` returns with the last one."""
        super().delete_adapter(name)
        out = self.out_proj_layer
        if out is not None:
            out.delete_adapter(name)
            if not self.held:
                self.base_layer.out_proj = out.base_layer

    def unloaded(self, merged: list[str]) -> nn.Module:
        """The attention with its plain ``out_proj`` back (merged deltas stay in the weights)."""
        out = self.out_proj_layer
        if out is not None:
            self.base_layer.out_proj = out.base_layer
        return self.base_layer

    # -- forward -------------------------------------------------------------------------------
    def cannot_mix_reason(self) -> str:
        return ("lora.MultiheadAttention does not support mixed adapter batches: torch's attention reads its "
                "weights directly, so LoRA changes the weights of a whole call; run rows for different "
                "adapters in separate calls")

    def delta(self, x: torch.Tensor, route, out: torch.Tensor | None = None, dropout: bool = True):
        """Not defined: this layer's LoRA acts on the weights of a call (``weights_for``)."""
        raise TypeError("LoraMultiheadAttention has no activation-space delta; it applies weights_for(name)")

    def weights_for(self, name: str) -> dict[str, torch.Tensor]:
        """The two weights adapter ``name`` runs the attention with: ``W + s·B A`` (differentiable
        in the factors), keyed by parameter path in the attention."""
        base, out = self.base_layer, self.out_proj_layer
        w_in, w_out = base.in_proj_weight, out.base_layer.weight
        return {IN_PROJ: w_in + self.delta_weight(name).to(w_in.dtype),
                OUT_PROJ: w_out + out.delta_weight(name).to(w_out.dtype)}

    def forward(self, query: torch.Tensor, *args, **kwargs):
        """The attention with this call's adapter in its weights; ``(output, weights)`` as torch's.

        Raises:
            MixingError: per-row adapters (see ``cannot_mix_reason``).
        """
        route = self.route()
        if route is None:
            return self.base_layer(query, *args, **kwargs)
        if not isinstance(route, str):
            raise MixingError(self.cannot_mix_reason())
        return torch.func.functional_call(self.base_layer, self.weights_for(route), (query, *args), kwargs)

    # -- merging: both projections -------------------------------------------------------------
    def check_merge(self, name: str) -> None:
        """Raise if merging ``name`` would give non-finite weights in either projection."""
        if name in self.held:
            with torch.no_grad():
                merged = self.base_layer.in_proj_weight.float() + self.delta_weight(name)
                if not torch.isfinite(merged).all():
                    raise ValueError(f"merging adapter {name!r} gives non-finite weights; not merged")
            self.out_proj_layer.check_merge(name)

    def merge(self, names: list[str], safe_merge: bool = False) -> None:
        """Fold ``names`` into ``in_proj_weight`` and ``out_proj.weight`` (checked first with
        ``safe_merge``)."""
        for name in names:
            if name not in self.held:
                continue
            if safe_merge:
                self.check_merge(name)
            with torch.no_grad():
                w = self.base_layer.in_proj_weight
                w.copy_((w.float() + self.delta_weight(name)).to(w.dtype))
            self.out_proj_layer.merge([name])

    def unmerge(self, names: list[str]) -> None:
        """Undo the merges of ``names`` (merge order given), last merged first."""
        for name in reversed(names):
            if name not in self.held:
                continue
            self.out_proj_layer.unmerge([name])
            with torch.no_grad():
                w = self.base_layer.in_proj_weight
                w.copy_((w.float() - self.delta_weight(name)).to(w.dtype))


def _register() -> None:
    registry.register_layer(PeftType.LORA.value, nn.MultiheadAttention, LoraMultiheadAttention)


_register()
