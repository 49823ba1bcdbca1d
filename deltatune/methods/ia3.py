"""(IA)³ (Liu et al. 2022, arXiv:2205.05638): learned vectors that rescale activations.

On a feed-forward module the vector ``l`` scales the layer's input, ``y = W (l ⊙ x) + b``; on any
other targeted module (keys, values) it scales the output, ``y = l ⊙ (W x + b)``. Vectors start
at ones, so a new adapter leaves the model unchanged.

Merging is multiplicative: ``W' = W ⊙ l`` along the input columns (feed-forward) or the output
rows (others, whose bias is scaled too). Unmerging divides by ``l``, exactly (peft adds 1e-8 to
the divisor); a vector with zero entries cannot be unmerged.

Files are peft's: ``peft_type: "IA3"``, one tensor ``<module>.ia3_l`` per layer of shape
(1, in) for feed-forward and (out, 1) otherwise ((1, C, 1..) for Conv1d/2d/3d; peft has no IA3 on
``nn.Conv1d``, the same layout extends to it). A grouped convolution's input scaling merges into
each group's kernels.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, Optional, Union

import torch
from torch import nn

from deltatune import registry
from deltatune.adapter_set import AdapterSet
from deltatune.config import ConfigError, PeftConfig, PeftType, _normalise_targets
from deltatune.merging import ia3_merge, ia3_unmerge
from deltatune.methods.base import AdapterLayer
from deltatune.target_defaults import complete_targets


@dataclass
class IA3Config(PeftConfig):
    """(IA)³ on the targeted layers; peft's ``IA3Config`` fields and JSON.

    Attributes:
        target_modules: module-name suffixes, a regex for the full name, or ``"all-linear"``
            (same rules as ``LoraConfig``). Required.
        exclude_modules: same forms; matches are never wrapped.
        feedforward_modules: which targeted modules scale their input instead of their output:
            a list (a module is feed-forward when its full name ends with an entry, peft's
            rule) or a regex matched against the full name. With lists, it must be a subset of
            ``target_modules``. Default: none.
        fan_in_fan_out: kept for file compatibility (deltatune detects ``Conv1D`` by type).
        modules_to_save: modules trained in full and saved with the adapter.
        init_ia3_weights: ``True`` starts the vectors at ones (the base model); ``False`` leaves
            them random (tests only).

    Raises:
        ConfigError: a malformed target list, or ``feedforward_modules`` not within
            ``target_modules``.
    """

    peft_type: ClassVar[PeftType] = PeftType.IA3

    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    feedforward_modules: Optional[Union[list[str], str]] = None
    fan_in_fan_out: bool = False
    modules_to_save: Optional[list[str]] = None
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.target_modules = _normalise_targets("target_modules", self.target_modules)
        self.exclude_modules = _normalise_targets("exclude_modules", self.exclude_modules)
        self.feedforward_modules = _normalise_targets("feedforward_modules", self.feedforward_modules)
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)
        ff, targets = self.feedforward_modules, self.target_modules
        if isinstance(ff, list) and isinstance(targets, list) and not set(ff) <= set(targets):
            raise ConfigError(f"feedforward_modules {sorted(set(ff) - set(targets))} are not in "
                              f"target_modules={targets}; feedforward_modules must be a subset")

    def is_feedforward(self, module_name: str) -> bool:
        """peft's rule: a regex must match the full name; a list entry must end it."""
        ff = self.feedforward_modules
        if ff is None:
            return False
        if isinstance(ff, str):
            return re.fullmatch(ff, module_name) is not None
        return any(module_name.endswith(entry) for entry in ff)


CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def gather_ia3(bank: dict[str, torch.Tensor], rows: torch.Tensor):
    """Each row's input scale (N, in) and output scale (N, out)."""
    return bank["in"][rows], bank["out"][rows]


class IA3Layer(AdapterLayer):
    """(IA)³ on a linear-like layer or a 1-, 2- or 3-d convolution: one scaling vector per adapter."""

    adapter_containers = ("ia3_l",)

    def __init__(self, base_layer: nn.Module, adapter_set: AdapterSet | None = None) -> None:
        super().__init__(base_layer, adapter_set)
        self.is_conv = isinstance(base_layer, CONVS)
        self.nd = base_layer.weight.dim() - 2 if self.is_conv else 0     # spatial dimensions
        if self.is_conv:
            self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        else:
            self.in_features, self.out_features = registry.features(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.feedforward: dict[str, bool] = {}

    def per_adapter_tables(self) -> list[dict]:
        return [self.feedforward]

    def add_adapter(self, name: str, config: IA3Config, module_name: str) -> None:
        """Create adapter ``name``: input-side if ``module_name`` is a feed-forward module."""
        ff = config.is_feedforward(module_name)
        shape = self._shape(ff)
        device = next(self.base_layer.parameters()).device
        value = torch.ones(shape, device=device) if config.init_ia3_weights else torch.randn(shape, device=device)
        self.ia3_l[name] = nn.Parameter(value)
        self.feedforward[name] = ff
        self._register(name)

    def _shape(self, ff: bool) -> tuple[int, ...]:
        if self.is_conv:
            return (1, self.in_features if ff else self.out_features, *([1] * self.nd))
        return (1, self.in_features) if ff else (self.out_features, 1)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        route = self.route()
        if route is None:
            return self.base_layer(x, *args, **kwargs)
        if isinstance(route, str):
            l = self._broadcast(self.ia3_l[route])                 # (C,) or (1, C, 1, 1)
            in_scale, out_scale = (l, None) if self.feedforward[route] else (None, l)
        else:
            in_scale, out_scale = self.gathered(route, x.shape[0], gather_ia3)    # (n, in), (n, out)
            in_scale = self._per_row(in_scale, x)
        if in_scale is not None:
            x = (x.to(in_scale.dtype) * in_scale).to(x.dtype)
        result = self.base_layer(x, *args, **kwargs)
        if out_scale is not None:
            if not isinstance(route, str):
                out_scale = self._per_row(out_scale, result)
            result = (result * out_scale).to(result.dtype)
        return result

    def _per_row(self, scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """(n, C) row scales shaped to broadcast over ``like``: (n, C, 1..) for a convolution's
        channels, (n, 1.., C) for features last."""
        n = like.shape[0]
        return scale.view(n, -1, *([1] * self.nd)) if self.is_conv else scale.view(n, *([1] * (like.dim() - 2)), -1)

    def _broadcast(self, l: torch.Tensor) -> torch.Tensor:
        """(C, 1..) for a convolution's channels (batched input or not), (C,) for features last."""
        return l.reshape(-1, *([1] * self.nd))

    def build_bank(self) -> dict[str, torch.Tensor]:
        """``in (slots, in_features)`` and ``out (slots, out_features)`` scales, ones where an
        adapter does not scale that side (and for slot 0, the base)."""
        like = self.ia3_l[self.held[0]]
        S = self.adapter_set.num_slots
        bank = {"in": like.new_ones(S, self.in_features), "out": like.new_ones(S, self.out_features)}
        for name in self.held:
            side = "in" if self.feedforward[name] else "out"
            bank[side][self.adapter_set.slots[name]] = self.ia3_l[name].reshape(-1)
        return bank

    def hyper_key(self) -> tuple:
        return tuple((n, self.feedforward[n]) for n in self.held)

    # -- merging -------------------------------------------------------------------------------
    def _weight_scale(self, name: str) -> torch.Tensor:
        """``l`` shaped to multiply the weight in Linear layout (out, in[/groups, *kernel])."""
        l = self.ia3_l[name].detach().float().reshape(-1)
        ones = [1] * self.nd
        if not self.feedforward[name]:
            return l.view(-1, 1, *ones)                                      # (out, 1, 1..)
        if not self.is_conv:
            return l.view(1, -1)                                             # (1, in)
        g, out = self.base_layer.groups, self.out_features
        per_group = l.view(g, 1, -1).expand(g, out // g, -1)                 # (g, out/g, in/g): each group's inputs
        return per_group.reshape(out, -1, *ones)                             # (out, in/g, 1..)

    def merged_weight(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        return ia3_merge(weight, self._weight_scale(name))

    def unmerged_weight(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        return ia3_unmerge(weight, self._weight_scale(name))

    def merge(self, names: list[str], safe_merge: bool = False) -> None:
        """Scale the weight (``merged_weight``) and, for output-side vectors, the bias too."""
        todo = [n for n in names if n in self.held]
        super().merge(todo, safe_merge=safe_merge)
        for name in todo:
            self._scale_bias(name, inverse=False)

    def unmerge(self, names: list[str]) -> None:
        for name in reversed(names):
            if name in self.held:
                self._scale_bias(name, inverse=True)
        super().unmerge(names)

    def _scale_bias(self, name: str, inverse: bool) -> None:
        bias = getattr(self.base_layer, "bias", None)
        if bias is None or self.feedforward[name]:
            return
        l = self.ia3_l[name].detach().reshape(-1).to(bias)
        with torch.no_grad():
            bias.copy_(bias / l if inverse else bias * l)


def _register() -> None:
    from transformers.pytorch_utils import Conv1D

    key = PeftType.IA3.value
    # lr: IA3's scaling vectors start at one and move slowly; 1e-2 is the rate of the methods table
    # (45/50 on the demo task, README), LoRA's 2e-4 barely moves them (the paper used 3e-3).
    registry.register_method(key, IA3Config, cli_names=("ia3",), default_lr=1e-2, complete_config=complete_targets)
    for base_type in (nn.Linear, Conv1D, *CONVS):
        registry.register_layer(key, base_type, IA3Layer)


_register()
