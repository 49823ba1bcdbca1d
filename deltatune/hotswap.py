"""Hot-swapping: replace a loaded adapter's weights and scalings in place with another saved adapter's.

``hotswap_adapter(model, path, adapter_name)`` copies the new adapter's tensors into the *same*
parameter tensors (same storage; no module is created or replaced), so a ``torch.compile``d model
does not recompile and an optimizer or a server keeps its references. The new adapter may target
the same layers or a subset (the others become zero: B = A = 0, DoRA magnitude = ``||W||``); a
smaller rank is zero-padded (``s·B A`` is unchanged by zero rows/columns); a larger rank is an error
unless ``prepare_model_for_compiled_hotswap(model, target_rank=...)`` padded the model first.

Compiled models: a scaling stored as a Python float is a constant to ``torch.compile`` (a new value
recompiles), so ``prepare_model_for_compiled_hotswap`` turns every LoRA scaling into a 0-d tensor
(updated in place by a swap) and pads every adapter to ``target_rank``, before compiling.

Checks as peft's (``peft.utils.hotswap``): same method, same ``use_rslora``, ``lora_dropout`` and
``use_dora``; no new layers; not merged. Everything is checked before anything is written, and a
failure while writing puts the old values back, so a refused or failed swap leaves the old adapter.
The model's stored config becomes the new adapter's (with the loaded adapter's target modules and
the padded ranks), so ``save_pretrained`` after a swap writes a file that loads to the same model.
"""
from __future__ import annotations

import dataclasses
import os
import warnings

import torch
from torch import nn

from deltatune import merging
from deltatune.arithmetic import LORA_KEYS, lora_config_for, module_scaling
from deltatune.config import PeftType
from deltatune.methods.dora import MAGNITUDE

# Fields a swap must keep (alora_invocation_tokens: which positions the delta acts on; methods/alora.py
# caches per adapter-set version whether any adapter has them).
CHECKED_FIELDS = {PeftType.LORA: ("use_rslora", "lora_dropout", "use_dora", "alora_invocation_tokens"),
                  PeftType.IA3: ()}


class HotswapError(ValueError):
    """A hot-swap was refused; the message names the file, key or field. The model is unchanged."""


def _peft_model(model):
    """The ``PeftModel`` behind ``model`` (a ``torch.compile`` wrapper keeps it as ``_orig_mod``)."""
    from deltatune.peft_model import PeftModel

    inner = getattr(model, "_orig_mod", model)
    if not isinstance(inner, PeftModel):
        raise TypeError(f"expected a deltatune PeftModel (or a torch.compile of one), got {type(inner).__name__}")
    return inner


def hotswap_adapter(model, model_name_or_path: str | os.PathLike, adapter_name: str = "default",
                    torch_device: str | None = None, **_ignored) -> None:
    """Replace adapter ``adapter_name``'s weights and scalings with those saved in ``model_name_or_path``.

    Args:
        model: a ``PeftModel``, or ``torch.compile(peft_model)``.
        model_name_or_path: an adapter directory (peft's format).
        adapter_name: the loaded adapter to overwrite; it keeps its name.
        torch_device: accepted for peft compatibility; tensors go where the live ones are.

    Raises:
        HotswapError: another method, an incompatible config field, a key the loaded adapter does
            not have (new layers), a larger rank than the model holds, another shape (another
            base), or a merged adapter. Nothing is changed then.
        FileNotFoundError, ConfigError, CheckpointError: an unreadable directory (named).
    """
    from deltatune.checkpoint.peft_format import read_adapter

    config, tensors = read_adapter(model_name_or_path)
    hotswap_adapter_from_state_dict(model, tensors, adapter_name, config, source=model_name_or_path)


def hotswap_adapter_from_state_dict(model, state_dict: dict[str, torch.Tensor], adapter_name: str, config,
                                    source="state_dict") -> None:
    """``hotswap_adapter`` from tensors already read (model-relative keys, peft's saved suffixes)."""
    from deltatune.checkpoint.peft_format import drop_peft_artefacts

    peft_model = _peft_model(model)
    old = _check_target(peft_model, adapter_name)
    _check_configs(old, config, source)
    live = peft_model.base_model.adapter_state(adapter_name)
    new = drop_peft_artefacts(state_dict, peft_model.base_model.saved_module_names())
    layers = dict(peft_model.base_model.adapter_layers())
    plan = _plan(live, new, layers, adapter_name, config, source)
    stored = _stored_config(old, config, plan)
    snapshot = {k: v.detach().clone() for k, v in live.items()}
    hypers = {m: (float(layers[m].scaling[adapter_name]), layers[m].lora_alpha[adapter_name])
              for m in plan["scalings"]}
    try:
        with torch.no_grad():
            _apply(plan, live, new, layers, adapter_name)
    except BaseException:
        with torch.no_grad():
            for key, value in snapshot.items():
                live[key].copy_(value)
            for m, (scaling, alpha) in hypers.items():
                _set_scaling(layers[m], adapter_name, scaling)
                layers[m].lora_alpha[adapter_name] = alpha
            peft_model.base_model.reload_biases()
        raise
    peft_model.base_model.reload_biases()  # trained biases stored (not live) may have changed: live follows
    peft_model.adapter_set.configs[adapter_name] = stored


def _check_target(peft_model, adapter_name: str):
    if adapter_name not in peft_model.adapter_set:
        raise HotswapError(f"no adapter {adapter_name!r} to swap; loaded: {sorted(peft_model.peft_config)}")
    if adapter_name in peft_model.adapter_set.merged:
        raise HotswapError(f"adapter {adapter_name!r} is merged into the base weights; unmerge_adapter() first "
                           "(swapping merged weights would corrupt the base when it is unmerged)")
    return peft_model.peft_config[adapter_name]


def _check_configs(old, new, source) -> None:
    if old.peft_type != new.peft_type:
        raise HotswapError(f"{source}: a {new.peft_type.value} adapter cannot replace a {old.peft_type.value} one")
    if old.peft_type not in CHECKED_FIELDS:
        raise HotswapError(f"{source}: hot-swapping supports {[t.value for t in CHECKED_FIELDS]}, "
                           f"not {old.peft_type.value}")
    if getattr(old, "use_bdlora", None) is not None or getattr(new, "use_bdlora", None) is not None:
        raise HotswapError(f"{source}: BD-LoRA adapters (use_bdlora) cannot be hot-swapped: their block-diagonal "
                           "factors are stored compactly, with no rank to pad; use load_adapter")
    if getattr(old, "target_parameters", None) or getattr(new, "target_parameters", None):  # nested per parameter
        raise HotswapError(f"{source}: hot-swapping adapters with target_parameters is not supported; load_adapter it")
    for field in CHECKED_FIELDS[old.peft_type]:
        if getattr(old, field) != getattr(new, field):
            raise HotswapError(f"{source}: {field}={getattr(new, field)!r}, the loaded adapter has "
                               f"{getattr(old, field)!r}; configs must agree on {field} to hot-swap")
    if old.peft_type == PeftType.IA3 and repr(old.feedforward_modules) != repr(new.feedforward_modules):
        raise HotswapError(f"{source}: feedforward_modules={new.feedforward_modules!r}, the loaded adapter has "
                           f"{old.feedforward_modules!r}; (IA)³ vectors must scale the same sides to hot-swap")


def _module_of(key: str) -> tuple[str, str | None]:
    """``(module, LoRA suffix)`` of a key; suffix None for other tensors."""
    for suffix in LORA_KEYS:
        if key.endswith("." + suffix):
            return key[:-len(suffix) - 1], suffix
    return key.rsplit(".", 1)[0], None


def _plan(live: dict, new: dict, layers: dict, adapter_name: str, config, source) -> dict:
    """Check every key and shape; returns ``{"ranks": module -> new rank, "zero": modules to zero}``."""
    unexpected = sorted(set(new) - set(live))
    if unexpected:
        raise HotswapError(f"{source}: key {unexpected[0]!r} has no counterpart in the loaded adapter "
                           f"{adapter_name!r}" + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
                           + ": hot-swapping cannot add layers (the file targets other modules or another base); "
                           "use load_adapter")
    ranks, zero = {}, set()
    for key, target in live.items():
        module, suffix = _module_of(key)
        if key not in new:
            if suffix is None and not key.endswith("." + MAGNITUDE) and not key.endswith(".ia3_l"):
                raise HotswapError(f"{source}: missing key {key!r} (trained biases or modules_to_save differ)")
            zero.add(module)
            continue
        value = new[key]
        if suffix is None or value.dim() != target.dim():
            if tuple(value.shape) != tuple(target.shape):
                raise HotswapError(f"{source}: key {key!r} has shape {tuple(value.shape)}, the model has "
                                   f"{tuple(target.shape)}: the adapter was made for another base")
            continue
        dim = LORA_KEYS[suffix][1]
        rest = [n for i, n in enumerate(value.shape) if i != dim]
        if rest != [n for i, n in enumerate(target.shape) if i != dim]:
            raise HotswapError(f"{source}: key {key!r} has shape {tuple(value.shape)}, the model has "
                               f"{tuple(target.shape)}: the adapter was made for another base")
        if value.shape[dim] > target.shape[dim]:
            raise HotswapError(f"{source}: key {key!r} has rank {value.shape[dim]}, the model holds rank "
                               f"{target.shape[dim]}; call prepare_model_for_compiled_hotswap(model, "
                               f"target_rank={value.shape[dim]}) after loading the first adapter, before "
                               "compiling")
        if ranks.setdefault(module, value.shape[dim]) != value.shape[dim]:
            raise HotswapError(f"{source}: {module}'s factors have different ranks")
    partial = sorted(set(ranks) & zero)
    if partial:
        raise HotswapError(f"{source}: {partial[0]} has only some of its tensors (a LoRA factor or a DoRA "
                           "magnitude is missing)")
    scalings = {m: module_scaling(config, m, r) for m, r in ranks.items()} if config.peft_type == PeftType.LORA \
        else {}
    return {"ranks": ranks, "zero": zero, "scalings": scalings,
            "live_ranks": {m: getattr(layers[m], "r", {}).get(adapter_name) for m in set(ranks) | zero}}


def _apply(plan: dict, live: dict, new: dict, layers: dict, adapter_name: str) -> None:
    for key, target in live.items():
        module, suffix = _module_of(key)
        if module in plan["zero"]:
            if key.endswith(".ia3_l"):
                target.fill_(1.0)
            elif suffix is not None:
                target.zero_()
            continue
        value = new[key].to(device=target.device, dtype=target.dtype)
        if value.shape == target.shape:
            target.copy_(value)
            continue
        dim = LORA_KEYS[suffix][1]                 # a smaller rank: zero-padded
        target.zero_()
        target.narrow(dim, 0, value.shape[dim]).copy_(value)
    for module, s in plan["scalings"].items():
        _set_scaling(layers[module], adapter_name, s)
    for module in plan["zero"]:                     # DoRA: m = ||W|| keeps a zeroed layer the base
        layer = layers[module]
        if adapter_name in getattr(layer, MAGNITUDE, {}):
            norm = layer.weight_norm(adapter_name, cached=False)
            m = layer.lora_magnitude_vector[adapter_name].weight
            m.copy_(norm.reshape(m.shape).to(m.dtype))


def _set_scaling(layer, adapter_name: str, value: float) -> None:
    """A float scaling is replaced; a tensor one (compiled hot-swap) is filled in place."""
    current = layer.scaling[adapter_name]
    if isinstance(current, torch.Tensor):
        current.fill_(value)
    else:
        layer.scaling[adapter_name] = value
    layer.lora_alpha[adapter_name] = merging.lora_alpha_for(value, layer.r[adapter_name], _rslora(layer, adapter_name))


def _rslora(layer, adapter_name: str) -> bool:
    return bool(getattr(layer.adapter_set.configs.get(adapter_name), "use_rslora", False))


def _stored_config(old, new, plan: dict):
    """The new adapter's config as the model now holds it: the loaded adapter's targets (zeroed
    layers included), each module's live (padded) rank with the new scaling."""
    keep = {f: getattr(old, f) for f in ("target_modules", "exclude_modules", "modules_to_save", "layers_to_transform",
                                         "layers_pattern", "bias", "inference_mode", "feedforward_modules")
            if hasattr(old, f)}
    config = dataclasses.replace(new, **keep)
    if new.peft_type != PeftType.LORA:
        return config
    modules = {m: (plan["live_ranks"][m], plan["scalings"].get(m)) for m in plan["live_ranks"]}
    return lora_config_for(config, modules, use_rslora=new.use_rslora)


# -- preparing a model for compiled hot-swaps ----------------------------------------------------
def prepare_model_for_compiled_hotswap(model, *, target_rank: int | None = None, config=None,
                                       check_compiled: str = "error") -> None:
    """Pad every LoRA adapter of ``model`` to ``target_rank`` and make its scalings 0-d tensors,
    so that later ``hotswap_adapter`` calls (other ranks up to ``target_rank``, other alphas) do not
    recompile a ``torch.compile``d model. Call it after loading the first adapter, before compiling.

    The model's outputs are unchanged (zero padding); its stored configs are updated to the padded
    ranks (``save_pretrained`` writes what the model holds). ``config`` is accepted for peft
    compatibility and not needed.

    Raises:
        ValueError: the model is already compiled (``check_compiled="error"``; ``"warn"`` warns,
            ``"ignore"`` goes on), it has no LoRA adapter, an adapter's rank exceeds
            ``target_rank``, or an adapter uses DoRA (its norm takes the scaling as a number).
    """
    from deltatune.methods.lora import LoraLayer

    if check_compiled not in ("error", "warn", "ignore"):
        raise ValueError(f"check_compiled={check_compiled!r} must be 'error', 'warn' or 'ignore'")
    if hasattr(model, "_orig_mod"):
        message = "prepare_model_for_compiled_hotswap: call it before torch.compile (the compiled graph keeps " \
                  "the old shapes and constants)"
        if check_compiled == "error":
            raise ValueError(message)
        if check_compiled == "warn":
            warnings.warn(message, stacklevel=2)
    peft_model = _peft_model(model)
    layers = {m: l for m, l in peft_model.base_model.adapter_layers() if isinstance(l, LoraLayer)}
    if not layers:
        raise ValueError("prepare_model_for_compiled_hotswap: the model has no LoRA adapter; load the first "
                         "adapter before preparing")
    bd = sorted(n for n, c in peft_model.peft_config.items() if getattr(c, "use_bdlora", None) is not None)
    if bd:
        raise ValueError(f"prepare_model_for_compiled_hotswap: adapter(s) {bd} use BD-LoRA, whose block-diagonal "
                         "factors cannot be padded to another rank")
    for module, layer in layers.items():
        if getattr(layer, MAGNITUDE, None):
            raise ValueError(f"{module}: DoRA adapters cannot be prepared for compiled hot-swap (the DoRA norm "
                             "uses the scaling as a Python number); hot-swap them without compiling")
        for name, r in layer.r.items():
            if target_rank is not None and r > target_rank:
                raise ValueError(f"{module}: adapter {name!r} has rank {r} > target_rank={target_rank}")
    modules: dict[str, dict[str, tuple[int, float]]] = {}
    with torch.no_grad():
        for module, layer in layers.items():
            for name in list(layer.held):
                if target_rank is not None and layer.r[name] < target_rank:
                    _pad(layer, name, target_rank)
                s = layer.scaling[name]
                if not isinstance(s, torch.Tensor):
                    layer.scaling[name] = torch.tensor(float(s), device=layer._factor_device())
                modules.setdefault(name, {})[module] = (layer.r[name], float(layer.scaling[name]))
    for name, table in modules.items():
        old = peft_model.adapter_set.configs[name]
        peft_model.adapter_set.configs[name] = lora_config_for(old, table, use_rslora=old.use_rslora)


def _pad(layer, name: str, rank: int) -> None:
    """Replace adapter ``name``'s factors by zero-padded rank-``rank`` ones (same device, dtype and
    ``requires_grad``): the delta ``s·B A`` is unchanged; the scaling is kept as it is."""
    if hasattr(layer, "lora_embedding_A"):
        for attr, dim in (("lora_embedding_A", 0), ("lora_embedding_B", 1)):
            old = getattr(layer, attr)[name]
            getattr(layer, attr)[name] = nn.Parameter(_padded(old, dim, rank), requires_grad=old.requires_grad)
    else:
        if getattr(layer.lora_B[name], "groups", 1) > 1:   # B is one block per group: a rank is not one dim
            raise ValueError(f"adapter {name!r} is on a {type(layer.base_layer).__name__} with groups="
                             f"{layer.lora_B[name].groups}: its factors cannot be padded for a compiled hot-swap")
        for attr, dim in (("lora_A", 0), ("lora_B", 1)):
            old = getattr(layer, attr)[name]
            new = _resized(old, dim, rank)
            new.weight = nn.Parameter(_padded(old.weight, dim, rank), requires_grad=old.weight.requires_grad)
            new.bias = old.bias      # lora_bias: B's bias (out,) does not depend on the rank; None otherwise
            getattr(layer, attr)[name] = new
    rslora, old_rank = _rslora(layer, name), layer.r[name]
    layer.r[name] = rank
    scaling = merging.lora_scaling(layer.lora_alpha[name], old_rank, rslora)     # unchanged by the padding
    layer.lora_alpha[name] = merging.lora_alpha_for(scaling, rank, rslora)
    layer._register(name)      # the adapter's tensors changed: drop cached lists and banks


def _padded(t: torch.Tensor, dim: int, rank: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] = rank
    out = t.new_zeros(shape)
    out.narrow(dim, 0, t.shape[dim]).copy_(t.detach())
    return out


def _resized(module: nn.Module, dim: int, rank: int) -> nn.Module:
    """An empty factor module like ``module`` (Linear or Conv1d/2d/3d, its kernel, stride and padding
    kept) with ``rank`` outputs (dim 0) or inputs (dim 1)."""
    w = module.weight
    if isinstance(module, nn.modules.conv._ConvNd):
        ins, outs = (module.in_channels, rank) if dim == 0 else (rank, module.out_channels)
        return type(module)(ins, outs, module.kernel_size, module.stride, module.padding, module.dilation,
                            bias=False, padding_mode=module.padding_mode, device="meta",
                            dtype=w.dtype)
    ins, outs = (module.in_features, rank) if dim == 0 else (rank, module.out_features)
    return nn.Linear(ins, outs, bias=False, device="meta", dtype=w.dtype)
