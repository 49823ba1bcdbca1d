"""Small lookup tables: method name -> config class and layer classes; module type -> weight access.

``METHOD_MODULES`` says which modules define each method; they are imported on first use (in the
order listed) and register their config and layers, so
nothing depends on what happened to be imported first, and adding a method means one line here
plus its own file. A method has one layer class per base module type (LoRA's holds plain LoRA and
DoRA adapters alike), so the layer a module gets never depends on which adapter wrapped it first.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from deltatune.config import ConfigError


@dataclass
class Method:
    """One adapter method.

    Attributes:
        peft_type: the ``peft_type`` string in ``adapter_config.json``.
        config_cls: its config dataclass.
        layers: base module type -> the adapter layer class wrapping it (one per type: it holds
            every adapter of the method, whatever the config's flags, e.g. LoRA and DoRA).
        mergeable, mixable, packable: what the method can do, consulted by merging
            (``merge_adapter``), mixed-adapter batches (``adapter_names=``) and training
            (packing several sequences into one row) instead of tests on ``peft_type``.
        component: for methods that wrap no layer (virtual tokens): ``(config, model) -> nn.Module``
            building the adapter's component, held by the ``TunerModel`` beside the wrapped layers.
        complete_config: ``(config, model) -> config`` filling fields that depend on the base
            (peft writes them to the file), applied when the adapter is added.
        default_lr: the peak learning rate ``deltatune train`` uses when none is given.
        why_not_mergeable: for a method that cannot merge, why (ends the error ``merge_adapter``
            and ``merge_and_unload`` raise).
    """

    peft_type: str
    config_cls: type
    layers: dict[type, type] = field(default_factory=dict)
    mergeable: bool = True
    mixable: bool = True
    packable: bool = True
    servable: bool = True  # the serving engine can run it (checked at load: serving.adapters.check_servable)
    component: Callable | None = None
    complete_config: Callable | None = None
    default_lr: float = 2e-4
    why_not_mergeable: str = ""

    def layer_class_for(self, module: nn.Module, config=None) -> type | None:
        """The adapter layer class for ``module``'s type (most specific registered base type), or
        None. ``config`` does not change it: one class holds all of the method's adapters."""
        table = self.layers
        for klass in type(module).__mro__:
            if klass in table:
                return table[klass]
        if is_linear(module):  # registered linear-likes (e.g. 4-bit layers) take nn.Linear's layer
            return table.get(nn.Linear)
        return None

    def container_names(self) -> set[str]:
        """Attribute names that hold adapter tensors in this method's layers (``lora_A``, ...)."""
        return {name for cls in self.layers.values() for name in cls.adapter_containers}


_METHODS: dict[str, Method] = {}
# CLI/method name -> (peft_type, fixed config overrides), e.g. "dora" -> ("LORA", {"use_dora": True}).
_ALIASES: dict[str, tuple[str, dict]] = {}
# peft_type -> the modules that define it, imported in this order by ``method_for``.
METHOD_MODULES: dict[str, tuple[str, ...]] = {
    "LORA": ("deltatune.methods.lora", "deltatune.methods.lora_conv", "deltatune.methods.lora_mha"),
    "IA3": ("deltatune.methods.ia3",),
    "DELTATUNE_BOTTLENECK": ("deltatune.methods.bottleneck",),
    "PROMPT_TUNING": ("deltatune.methods.prompt",),
    "PREFIX_TUNING": ("deltatune.methods.prompt",),
    "P_TUNING": ("deltatune.methods.prompt",),
}


def _load(peft_type: str | None = None) -> None:
    """Import the modules of ``peft_type`` (all methods when None); each registers itself."""
    for key, modules in METHOD_MODULES.items():
        if peft_type is None or key == peft_type:
            for module in modules:
                importlib.import_module(module)


def register_method(peft_type: str, config_cls: type, cli_names: tuple[str, ...] = (),
                    overrides: dict | None = None, **capabilities) -> Method:
    """Register (or fetch) a method; ``cli_names`` are the names ``--method`` accepts.

    ``capabilities`` set ``Method`` fields (``mergeable=False``, ``component=...``, ``default_lr=...``).
    """
    method = _METHODS.setdefault(peft_type, Method(peft_type, config_cls))
    for key, value in capabilities.items():
        if not hasattr(method, key) or key in ("peft_type", "config_cls", "layers"):
            raise TypeError(f"register_method: unknown capability {key!r}")
        setattr(method, key, value)
    for name in cli_names:
        _ALIASES[name] = (peft_type, dict(overrides or {}))
    return method


# init_lora_weights values implemented outside ``methods/`` (they change the base layer's type),
# imported on first use: value -> module that calls ``register_init``.
INIT_MODULES: dict[str, str] = {"loftq": "deltatune.quant.loftq"}
_INITS: dict[str, Callable] = {}


def register_init(value: str, fn: Callable) -> None:
    """Declare ``fn(layer, adapter_name, config, module_name)`` as the initialisation for
    ``init_lora_weights=value``; it sets the layer's factors (and may replace its base layer)."""
    _INITS[value] = fn


def init_for(value) -> Callable | None:
    """The registered initialisation for ``init_lora_weights=value``, or None (the layer's own)."""
    if isinstance(value, str) and value in INIT_MODULES and value not in _INITS:
        importlib.import_module(INIT_MODULES[value])
    return _INITS.get(value) if isinstance(value, str) else None


def register_layer(peft_type: str, base_type: type, layer_cls: type) -> None:
    """Declare that ``layer_cls`` wraps modules of ``base_type`` for method ``peft_type`` (all of
    the method's adapters on such a module live in that one class)."""
    _METHODS[peft_type].layers[base_type] = layer_cls


def method_for(peft_type: str) -> Method:
    """The registered method for ``peft_type``; ConfigError naming it if unknown."""
    _load(peft_type)
    if peft_type not in _METHODS:
        raise ConfigError(f"peft_type {peft_type!r} is not supported; known: {sorted(_METHODS)}")
    return _METHODS[peft_type]


def method_of(config) -> Method:
    """The registered method of an adapter config (its capabilities: mergeable, packable, ...)."""
    return method_for(config.peft_type.value)


def default_lr(method: str) -> float:
    """The peak learning rate ``deltatune train`` uses for CLI method name ``method``."""
    _load()
    if method not in _ALIASES:
        raise ConfigError(f"method={method!r} is not one of {method_names()}")
    return _METHODS[_ALIASES[method][0]].default_lr


def config_class_for(peft_type: str, source: str = "config") -> type:
    """The config class for ``peft_type`` (as read from ``source``)."""
    try:
        return method_for(peft_type).config_cls
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def method_names() -> list[str]:
    """Names accepted by ``--method`` (e.g. ``lora``, ``dora``)."""
    _load()
    return sorted(_ALIASES)


def make_config(method: str, **kwargs):
    """Build a config from a method name as given on the command line, e.g. ``make_config("dora", r=8)``."""
    _load()
    if method not in _ALIASES:
        raise ConfigError(f"method={method!r} is not one of {method_names()}")
    peft_type, overrides = _ALIASES[method]
    return _METHODS[peft_type].config_cls(**{**kwargs, **overrides})


# ---------------------------------------------------------------------------------------------
# Weight access: adapter layers read and write a base layer's dense weight through these, so a
# quantized base (or a transposed Conv1D) needs one registration here, not code in every method.

def _conv1d_type():
    from transformers.pytorch_utils import Conv1D

    return Conv1D


@dataclass(frozen=True)
class WeightAccess:
    get: Callable[[nn.Module], torch.Tensor]           # dense float weight, Linear layout (out, in, ...)
    set: Callable[[nn.Module, torch.Tensor], None]     # write it back (may round, e.g. 4-bit)
    features: Callable[[nn.Module], tuple[int, int]]   # (in_features, out_features)


_WEIGHTS: dict[type, WeightAccess] = {}
LINEAR_TYPES: set[type] = set()


def register_weight_access(module_type: type, get, set, features=None, linear: bool = False) -> None:
    """Teach deltatune how to read/write ``module_type``'s weight.

    Args:
        get: ``module -> Tensor`` dense weight in ``nn.Linear`` layout (out, in) (conv: (out, in, kh, kw)).
        set: ``(module, Tensor) -> None`` store a new dense weight.
        features: ``module -> (in_features, out_features)``; defaults to those attributes.
        linear: count the type as a linear layer (``"all-linear"`` targets it; LoRA wraps it).
    """
    _WEIGHTS[module_type] = WeightAccess(get, set, features or (lambda m: (m.in_features, m.out_features)))
    if linear:
        LINEAR_TYPES.add(module_type)


def _access(module: nn.Module) -> WeightAccess:
    for klass in type(module).__mro__:
        if klass in _WEIGHTS:
            return _WEIGHTS[klass]
    raise TypeError(f"no weight access registered for {type(module).__name__}")


def get_weight(module: nn.Module) -> torch.Tensor:
    """Dense weight of ``module`` in Linear layout (see ``register_weight_access``)."""
    return _access(module).get(module)


def set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Store ``weight`` (Linear layout) into ``module``."""
    _access(module).set(module, weight)


def features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear-like module."""
    return _access(module).features(module)


def is_linear(module: nn.Module) -> bool:
    """True for nn.Linear, transformers' Conv1D and registered linear-like types (e.g. 4-bit)."""
    return any(isinstance(module, t) for t in LINEAR_TYPES)


def _set_param(module: nn.Module, weight: torch.Tensor) -> None:
    with torch.no_grad():
        module.weight.copy_(weight.to(module.weight.dtype))


def _register_builtin() -> None:
    register_weight_access(nn.Linear, lambda m: m.weight, _set_param, linear=True)
    conv1d = _conv1d_type()
    register_weight_access(
        conv1d, lambda m: m.weight.T,
        lambda m, w: _set_param(m, w.T),
        features=lambda m: (m.weight.shape[0], m.weight.shape[1]), linear=True)
    register_weight_access(nn.Embedding, lambda m: m.weight, _set_param,
                           features=lambda m: (m.num_embeddings, m.embedding_dim))
    for conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):   # weight (out, in/groups, *kernel)
        register_weight_access(conv, lambda m: m.weight, _set_param,
                               features=lambda m: (m.in_channels, m.out_channels))


_register_builtin()
