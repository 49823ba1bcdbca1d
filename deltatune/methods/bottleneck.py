"""Bottleneck adapters (Houlsby et al. 2019, arXiv:1902.00751; Pfeiffer et al. 2020, arXiv:2005.00247).

A small residual MLP on the output of a sublayer's last projection:

    y = base(x);   y + up(act(down(y)))        down: (d -> b), up: (b -> d), b = d // reduction_factor

Houlsby places one after the attention output projection and one after the feed-forward output
projection of every block; Pfeiffer only after the feed-forward output. ``up`` starts at zero,
so a new adapter is the identity and training starts from the base model's behaviour.

The non-linearity sits between two linear maps, so the adapter cannot be folded into the base
weight: ``merge_and_unload`` raises and points to ``unload()``. peft has no such method; the
file layout (``peft_type: "DELTATUNE_BOTTLENECK"``) is documented in docs/bottleneck-format.md.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from deltatune import registry
from deltatune.adapter_set import AdapterSet, MixingError
from deltatune.config import ConfigError, PeftConfig, PeftType, _normalise_targets
from deltatune.methods.base import AdapterLayer

ADAPTER_TYPES = ("houlsby", "pfeiffer")
DEFAULT_REDUCTION_FACTOR = 16
# name -> activation; the names are the ones adapter libraries use in configs.
NON_LINEARITIES = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda t: F.gelu(t, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


@dataclass
class AdapterConfig(PeftConfig):
    """Bottleneck adapters after attention and/or feed-forward outputs (alias ``BottleneckConfig``).

    Attributes:
        adapter_type: ``"houlsby"`` (after the attention output and the feed-forward output) or
            ``"pfeiffer"`` (after the feed-forward output only). Default ``"houlsby"``.
        attn_output_modules: the attention output projections, in ``target_modules`` form (a list
            of name suffixes or a full-name regex). Default ``["o_proj"]`` (Llama, Mistral, Qwen2,
            SmolLM); GPT-2: ``["attn.c_proj"]``; BERT: ``["attention.output.dense"]``.
        ffn_output_modules: the feed-forward output projections, same forms. Default
            ``["down_proj"]``; GPT-2: ``["mlp.c_proj"]``; BERT: ``r".*layer\\.\\d+\\.output\\.dense"``.
        reduction_factor: bottleneck size = wrapped layer's output width // reduction_factor.
        bottleneck_size: the bottleneck size directly (give this or ``reduction_factor``, not both;
            with neither, ``reduction_factor=16``).
        non_linearity: one of ``relu`` (default), ``gelu``, ``gelu_new``, ``silu``/``swish``, ``tanh``.
        init_weights: ``True`` zero-initialises the up-projection (the adapter starts as the
            identity); ``False`` leaves it random (tests only).
        modules_to_save: modules trained in full and saved with the adapter.
        layers_to_transform / layers_pattern: restrict to these layer indices (list-form names only).

    Raises:
        ConfigError: an unknown ``adapter_type`` or ``non_linearity``, both or invalid sizes.
    """

    peft_type: ClassVar[PeftType] = PeftType.BOTTLENECK

    adapter_type: str = "houlsby"
    attn_output_modules: Optional[Union[list[str], str]] = field(default_factory=lambda: ["o_proj"])
    ffn_output_modules: Optional[Union[list[str], str]] = field(default_factory=lambda: ["down_proj"])
    reduction_factor: Optional[int] = None
    bottleneck_size: Optional[int] = None
    non_linearity: str = "relu"
    init_weights: bool = True
    modules_to_save: Optional[list[str]] = None
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.adapter_type not in ADAPTER_TYPES:
            raise ConfigError(f"adapter_type={self.adapter_type!r} must be one of {list(ADAPTER_TYPES)}")
        if self.non_linearity not in NON_LINEARITIES:
            raise ConfigError(f"non_linearity={self.non_linearity!r} must be one of {sorted(NON_LINEARITIES)}")
        if self.reduction_factor is not None and self.bottleneck_size is not None:
            raise ConfigError(f"give reduction_factor ({self.reduction_factor}) or bottleneck_size "
                              f"({self.bottleneck_size}), not both")
        for name in ("reduction_factor", "bottleneck_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        self.attn_output_modules = _normalise_targets("attn_output_modules", self.attn_output_modules)
        self.ffn_output_modules = _normalise_targets("ffn_output_modules", self.ffn_output_modules)
        if not self.ffn_output_modules:
            raise ConfigError("ffn_output_modules is empty; name the feed-forward output projections")
        if self.adapter_type == "houlsby" and not self.attn_output_modules:
            raise ConfigError("adapter_type='houlsby' needs attn_output_modules (or use 'pfeiffer')")
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)
        if isinstance(self.layers_to_transform, int) and not isinstance(self.layers_to_transform, bool):
            self.layers_to_transform = [self.layers_to_transform]

    @property
    def target_modules(self) -> Union[list[str], str]:
        """The modules wrapped: feed-forward outputs, plus attention outputs for Houlsby."""
        groups = [self.ffn_output_modules]
        if self.adapter_type == "houlsby":
            groups.insert(0, self.attn_output_modules)
        if all(isinstance(g, list) for g in groups):
            return [name for g in groups for name in g]
        # a regex in either group: one regex for both (list entries become suffix patterns)
        parts = [g if isinstance(g, str) else "|".join(rf"(?:.*\.)?{re.escape(n)}" for n in g) for g in groups]
        return "|".join(f"(?:{p})" for p in parts)

    def size_for(self, width: int) -> int:
        """Bottleneck size for a layer whose output has ``width`` features."""
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        return max(1, width // (self.reduction_factor or DEFAULT_REDUCTION_FACTOR))


BottleneckConfig = AdapterConfig


def gather_bottleneck(bank: dict[str, torch.Tensor], rows: torch.Tensor):
    """Each row's down (N, d, b), down bias (N, 1, b), up (N, b, d), up bias (N, 1, d)."""
    return (bank["down"][rows].transpose(1, 2), bank["down_bias"][rows][:, None],
            bank["up"][rows].transpose(1, 2), bank["up_bias"][rows][:, None])


def bottleneck_mlp(h: torch.Tensor, down, down_bias, up, up_bias, act) -> torch.Tensor:
    """``act(h·down + down_bias)·up + up_bias``: one adapter's (``h`` (..., d), ``down`` (d, b),
    ``up`` (b, d), biases (b,), (d,)) or each row's own (``h`` (N, T, d), ``down`` (N, d, b),
    ``up`` (N, b, d), biases (N, 1, b), (N, 1, d)), in one expression."""
    return act(h @ down + down_bias) @ up + up_bias                         # (..., d)


class BottleneckLayer(AdapterLayer):
    """A linear-like layer followed by residual bottleneck MLPs, one per adapter."""

    adapter_containers = ("adapter_down", "adapter_up")

    def __init__(self, base_layer: nn.Module, adapter_set: AdapterSet | None = None) -> None:
        super().__init__(base_layer, adapter_set)
        _, self.out_features = registry.features(base_layer)
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.non_linearity: dict[str, str] = {}

    def per_adapter_tables(self) -> list[dict]:
        return [self.non_linearity]

    def add_adapter(self, name: str, config: AdapterConfig, module_name: str) -> None:
        """Create adapter ``name``: down (d -> b), up (b -> d, zero unless ``init_weights=False``)."""
        d, b = self.out_features, config.size_for(self.out_features)
        device = next(self.base_layer.parameters()).device
        down = nn.Linear(d, b, device=device)
        up = nn.Linear(b, d, device=device)
        with torch.no_grad():
            nn.init.zeros_(down.bias)
            if config.init_weights:
                nn.init.zeros_(up.weight)
                nn.init.zeros_(up.bias)
        self.adapter_down[name], self.adapter_up[name] = down, up
        self.non_linearity[name] = config.non_linearity
        self._register(name)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)              # (..., d)
        route = self.route()
        if route is None:
            return result
        return result + self.delta(result, route).to(result.dtype)

    def delta(self, y: torch.Tensor, route) -> torch.Tensor:
        """``up(act(down(y)))`` for ``route``: one adapter's (a name), or each row's own (per-row
        slots, gathered from the bank; the rows' adapters must share their non-linearity)."""
        if isinstance(route, str):
            down, up = self.adapter_down[route], self.adapter_up[route]
            act = NON_LINEARITIES[self.non_linearity[route]]
            h = y.to(down.weight.dtype)                                       # (..., d)
            return bottleneck_mlp(h, down.weight.T, down.bias, up.weight.T, up.bias, act)
        act = self._shared_act(route)
        n = y.shape[0]
        down, down_bias, up, up_bias = self.gathered(route, n, gather_bottleneck)
        h = y.reshape(n, -1, y.shape[-1]).to(down.dtype)                     # (n, T, d)
        return bottleneck_mlp(h, down, down_bias, up, up_bias, act).reshape(y.shape)

    def _shared_act(self, route: torch.Tensor):
        slots = set(route.tolist())
        acts = {self.non_linearity[n] for n in self.held if self.adapter_set.slots[n] in slots}
        if len(acts) > 1:
            raise MixingError(f"bottleneck adapters with different non-linearities {sorted(acts)} cannot share "
                              "a mixed batch; run them in separate calls")
        return NON_LINEARITIES[acts.pop() if acts else "relu"]

    def build_bank(self) -> dict[str, torch.Tensor]:
        """Down ``(slots, b_max, d)`` + bias, up ``(slots, d, b_max)`` + bias; zeros for slot 0 and
        padding (every supported non-linearity maps 0 to 0, so padded units add nothing)."""
        S, d = self.adapter_set.num_slots, self.out_features
        b_max = max(self.adapter_down[n].out_features for n in self.held)
        like = self.adapter_down[self.held[0]].weight
        bank = {"down": like.new_zeros(S, b_max, d), "down_bias": like.new_zeros(S, b_max),
                "up": like.new_zeros(S, d, b_max), "up_bias": like.new_zeros(S, d)}
        for name in self.held:
            slot, down, up = self.adapter_set.slots[name], self.adapter_down[name], self.adapter_up[name]
            b = down.out_features
            bank["down"][slot, :b], bank["down_bias"][slot, :b] = down.weight, down.bias
            bank["up"][slot, :, :b], bank["up_bias"][slot] = up.weight, up.bias
        return bank

    def hyper_key(self) -> tuple:
        return tuple((n, self.non_linearity[n]) for n in self.held)

    def merge(self, names: list[str], safe_merge: bool = False) -> None:
        """Bottleneck adapters cannot be merged (nothing to do when ``names`` holds none of ours)."""
        if any(n in self.held for n in names):
            raise NotImplementedError(
                "bottleneck adapters (AdapterConfig) cannot be merged into the base weights: their "
                "non-linearity sits between two projections. Use unload() to get the base model back "
                "without the adapter, or keep the PeftModel for inference.")

    def unmerge(self, names: list[str]) -> None:
        """Nothing is ever merged."""


def _register() -> None:
    from transformers.pytorch_utils import Conv1D

    key = PeftType.BOTTLENECK.value
    # not mergeable: the non-linearity sits between the two projections
    registry.register_method(key, AdapterConfig, cli_names=("adapter", "bottleneck"), mergeable=False)
    registry.register_method(key, AdapterConfig, cli_names=("houlsby",), overrides={"adapter_type": "houlsby"})
    registry.register_method(key, AdapterConfig, cli_names=("pfeiffer",), overrides={"adapter_type": "pfeiffer"})
    for base_type in (nn.Linear, Conv1D):
        registry.register_layer(key, base_type, BottleneckLayer)


_register()
