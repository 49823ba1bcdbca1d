"""Which modules a config selects: names in, names out.

The matching rules are peft's, so a config written for peft selects the same modules here:
- a list of names matches a module whose full name equals an entry or ends with ``"." + entry``;
- a string is a regex that must match the full module name (``re.fullmatch``);
- ``"all-linear"`` selects every linear layer except the model's output head;
- ``exclude_modules`` uses the same forms and wins over ``target_modules``;
- modules inside a ``modules_to_save`` entry are never targeted;
- ``layers_to_transform`` keeps only modules under a numbered layer with one of those indices;
- ``target_parameters`` (LoRA) names bare parameters: ``"<module>.<param>"`` matched as a list of
  module names is (``select_parameters``); ``select_targets`` answers for modules and parameters.
"""
from __future__ import annotations

import re
import warnings
from typing import Iterable, Iterator

from torch import nn

from deltatune.config import ConfigError
from deltatune.target_defaults import complete_targets, missing_targets_error


def iter_candidates(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(name, module)`` for every module, without descending into adapter layers.

    An adapter layer stands for the module it wraps: its name is the original module's name,
    and its internals (``base_layer``, ``lora_A.default``, ...) are never targets themselves.
    Adapter layers are recognised by ``is_adapter_layer`` (they declare it), so this module needs
    nothing from the methods above it.
    """
    for name, child in model.named_children():
        full = f"{prefix}.{name}" if prefix else name
        yield full, child
        if not is_adapter_layer(child):
            yield from iter_candidates(child, full)


def is_adapter_layer(module: nn.Module) -> bool:
    """True for a deltatune adapter layer (``AdapterLayer`` sets ``is_adapter_layer = True``)."""
    return getattr(type(module), "is_adapter_layer", False) is True


def _matches(spec, name: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def _layer_index(name: str, layers_pattern) -> int | None:
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else (layers_pattern or [])
    if not patterns:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        m = None
        for p in patterns:
            m = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name)
            if m:
                break
    return int(m.group("idx")) if m else None


def _under_saved(name: str, modules_to_save) -> bool:
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in modules_to_save or [])


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head (``get_output_embeddings``), excluded from ``"all-linear"``."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set()
    for name, module in iter_candidates(model):
        base = getattr(module, "base_layer", None) or getattr(module, "original_module", None)
        if head is not None and (module is head or base is head):
            names.add(name)
    return names


def base_of(module: nn.Module) -> nn.Module:
    """The original module behind an adapter wrapper (or ``module`` itself)."""
    while is_adapter_layer(module):
        module = module.get_base_layer()
    return module


def select(model: nn.Module, config, is_supported=None) -> list[str]:
    """Names of the modules ``config`` targets in ``model``, in model order.

    Args:
        model: the base model (possibly already holding other adapters).
        config: a method config with ``target_modules`` and friends.
        is_supported: ``module -> bool``; a selected module failing it is an error.

    An unset ``target_modules`` takes the model family's default (``target_defaults``).

    Raises:
        ConfigError: ``target_modules`` is unset for a model family without defaults (the message
            lists the model's leaf module names), an entry matches no module, or a selected
            module has a type the method cannot wrap (the message names the module and type).
    """
    from deltatune.registry import is_linear

    if config.target_modules is None:  # peft's per-family defaults (add_adapter stores them in the config)
        config = complete_targets(config, model)
    spec = config.target_modules
    if spec is None:
        raise missing_targets_error(model, config.peft_type.value)
    candidates = list(iter_candidates(model))
    if spec == "all-linear":
        heads = output_head_names(model)
        spec = [n for n, m in candidates if is_linear(base_of(m)) and n not in heads]
        if not spec:
            raise ConfigError("target_modules='all-linear' found no linear layers in the model")
    saved = getattr(config, "modules_to_save", None)
    exclude = getattr(config, "exclude_modules", None)
    layers = getattr(config, "layers_to_transform", None)
    chosen = []
    for name, module in candidates:
        if not _matches(spec, name) or _under_saved(name, saved):
            continue
        if exclude and _matches(exclude, name):
            continue
        if layers and not isinstance(spec, str) and _layer_index(name, getattr(config, "layers_pattern", None)) not in layers:
            continue
        chosen.append(name)
    _check_all_matched(spec, [n for n, _ in candidates], config.target_modules)
    if not chosen:
        raise ConfigError(f"target_modules={config.target_modules!r} selected no module "
                          "(after exclude_modules / layers_to_transform)")
    modules = dict(candidates)
    for name in chosen:
        if is_supported is not None and not is_supported(base_of(modules[name])):
            raise ConfigError(
                f"target_modules selects {name!r}, a {type(base_of(modules[name])).__name__}, which "
                f"{config.peft_type.value} cannot wrap; target its Linear/Conv/Embedding children instead")
    return chosen


NO_TARGETS = ("No `target_modules` passed but also no `target_parameters` found. Please check the values for "
              "these arguments.")


def select_parameters(model: nn.Module, config) -> list[tuple[str, str]]:
    """``(module name, parameter name)`` of every parameter ``config.target_parameters`` names, in
    model order and, within a module, in its registration order (the order peft nests their
    wrappers). A parameter is a module's own (not a child's); a wrapped module's are those of the
    module it wraps; adapter internals and modules under ``modules_to_save`` are never candidates.

    Raises:
        ConfigError: an entry names a parameter of the top-level model itself (peft's refusal:
            the model would have to be replaced inside itself).
    """
    targets = list(getattr(config, "target_parameters", None) or [])
    if not targets:
        return []

    def named(key: str) -> bool:
        return any(key == t or key.endswith("." + t) for t in targets)

    top = [n for n, _ in model.named_parameters(recurse=False) if named(n)]
    if top:
        raise ConfigError("Targeting an nn.Parameter on the top-level module is not supported "
                          f"(parameter '{top[0]}').")
    saved = getattr(config, "modules_to_save", None)
    return [(name, pname) for name, module in iter_candidates(model) if not _under_saved(name, saved)
            for pname, _ in base_of(module).named_parameters(recurse=False) if named(f"{name}.{pname}")]


def select_targets(model: nn.Module, config, is_supported=None) -> tuple[list[str], list[tuple[str, str]]]:
    """What ``config`` targets: ``(select(...), select_parameters(...))``.

    With ``target_parameters``, ``target_modules`` may be None (the family default, or nothing
    for a model without one), ``[]`` or ``""`` (no module), and one that matches no module name
    warns instead of raising when a parameter matched, as peft does; nothing matched at all raises.

    Raises:
        ConfigError: as ``select``; ``NO_TARGETS`` when neither modules nor parameters are named.
    """
    params = select_parameters(model, config)
    if not getattr(config, "target_parameters", None):
        return select(model, config, is_supported), params
    spec = config.target_modules
    if spec is None:  # a known family's defaults, as peft fills them; else no module
        config = complete_targets(config, model)
        spec = config.target_modules
    if not spec:
        if not params:
            raise ConfigError(NO_TARGETS)
        return [], params
    names = [n for n, _ in iter_candidates(model)]
    if params and spec != "all-linear" and not any(_matches(spec, n) for n in names):
        shown = spec if isinstance(spec, str) else set(spec)
        warnings.warn(f"target_modules={shown!r} were set but no module was matched.", RuntimeWarning, stacklevel=3)
        return [], params
    modules = select(model, config, is_supported)
    if not params:
        warnings.warn(f"target_parameters={config.target_parameters!r} were set but no parameter was matched.",
                      RuntimeWarning, stacklevel=3)
    return modules, params


def _check_all_matched(spec, names: list[str], original) -> None:
    if isinstance(spec, str):
        if not any(re.fullmatch(spec, n) for n in names):
            raise ConfigError(f"target_modules regex {spec!r} matches no module name; "
                              f"examples of names: {_examples(names)}")
        return
    missing = [t for t in spec if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ConfigError(f"target_modules entries {missing} match no module in the model; "
                          f"available leaf names include: {_examples(names)}")


def _examples(names: Iterable[str], limit: int = 12) -> list[str]:
    leaves = []
    for n in names:
        leaf = n.rsplit(".", 1)[-1]
        if not leaf.isdigit() and leaf not in leaves:
            leaves.append(leaf)
    return leaves[:limit]


def select_saved(model: nn.Module, modules_to_save) -> list[str]:
    """Names of the modules ``modules_to_save`` picks (outermost matches only).

    Raises:
        ConfigError: an entry matches no module.
    """
    if not modules_to_save:
        return []
    names = [n for n, _ in iter_candidates(model)]
    chosen = []
    for entry in modules_to_save:
        hits = [n for n in names if n == entry or n.endswith("." + entry)]
        hits = [n for n in hits if not any(n.startswith(h + ".") for h in hits)]
        chosen.extend(h for h in hits if h not in chosen)
    return chosen


def dry_run(model: nn.Module, config) -> str:
    """A printable list of the modules ``config`` would wrap, with their types, then the parameters
    it would adapt (``target_parameters``), with their shapes."""
    modules = dict(iter_candidates(model))
    names, params = select_targets(model, config)
    lines = [f"{name}  ({type(base_of(modules[name])).__name__})" for name in names]
    for name, pname in params:
        module = base_of(modules[name])
        shape = tuple(getattr(module, pname).shape)
        lines.append(f"{name}.{pname}  (parameter {shape} of {type(module).__name__})")
    return "\n".join(lines)


def parse_target_arg(text: str):
    """A command-line target spec: ``all-linear``, ``q_proj,v_proj`` (a list), or a regex.

    Text with regex characters (``*.[(|\\``) and no comma is a regex; anything else is split on commas.
    """
    text = text.strip()
    if text == "all-linear":
        return text
    if "," not in text and any(c in text for c in "*.[(|\\"):
        return text
    return [t.strip() for t in text.split(",") if t.strip()]
