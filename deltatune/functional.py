"""peft's functional API for integrations: adapters inside a model that is not a ``PeftModel``.

transformers' ``model.add_adapter`` / ``load_adapter``, diffusers' ``load_lora_weights`` and TRL
call these three functions from ``peft``; they have peft's signatures and meaning here:

- ``inject_adapter_in_model(config, model)`` puts adapter layers into ``model`` in place and
  returns it (no wrapper); ``model.peft_config`` maps adapter names to configs.
- ``get_peft_model_state_dict(model)`` gives one adapter's tensors under the keys peft writes to
  files: without the adapter name, relative to the module passed (``base_model.model.<path>...``
  for a ``PeftModel``, ``<path>...`` for a model from ``inject_adapter_in_model``).
- ``set_peft_model_state_dict(model, state_dict)`` copies such a dict into an adapter and
  returns ``(missing_keys, unexpected_keys)`` as peft does (``load_state_dict(strict=False)``'s
  answer: missing keys are the model's own state-dict names, so a caller filters them).

Built on what saving and loading already use: ``TunerModel.adapter_state`` (which tensors are the
adapter's) and ``checkpoint.peft_format`` (the key translation). A model given adapters by
``inject_adapter_in_model`` is driven by a ``PeftModel`` kept on it (not a submodule: its state
dict is the model's own), so adding, routing and trainability are the ``PeftModel``'s code.
"""
from __future__ import annotations

import warnings
from typing import Literal

import torch
from torch import nn

from deltatune import registry
from deltatune.checkpoint.peft_format import PREFIX, drop_peft_artefacts, to_file_keys
from deltatune.config import PeftConfig
from deltatune.generation import adapter_model
from deltatune.methods.base import AdapterLayer
from deltatune.peft_model import PeftModel
from deltatune.peft_model.model import warn_unhonoured
from deltatune.peft_model.files import LoadResult
from deltatune.tuner import TunerModel
from deltatune.tuner.embeddings import with_embedding_layers

_OWNER = "_deltatune_peft_model"  # attribute of an injected model holding its PeftModel


def inject_adapter_in_model(peft_config: PeftConfig, model: nn.Module, adapter_name: str = "default",
                            low_cpu_mem_usage: bool = False,
                            state_dict: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Add adapter layers for ``peft_config`` to ``model`` in place and return ``model`` (peft's API).

    The first adapter injected is the active one; only its parameters are trainable afterwards.
    ``state_dict`` (keys as ``get_peft_model_state_dict`` writes them, with or without peft's
    ``base_model.model.`` prefix): only its keys are used, to choose the modules to adapt, for
    checkpoints saved without their ``target_modules``. ``low_cpu_mem_usage=True`` warns: the
    adapter tensors are always created initialised where the base layers are.

    Raises:
        ValueError: a prompt-learning config (virtual tokens wrap no layer; use ``get_peft_model``),
            or a config invalid for this model (the message names the field or module).
    """
    warn_unhonoured("inject_adapter_in_model", low_cpu_mem_usage=low_cpu_mem_usage)
    method = registry.method_of(peft_config)
    if method.component is not None:
        raise ValueError(f"inject_adapter_in_model does not support {peft_config.peft_type.value}: its virtual "
                         "tokens are inputs, not layers; use get_peft_model")
    if state_dict is not None:
        peft_config = _targets_from_keys(peft_config, state_dict, method.container_names())
    inner = adapter_model(model)       # DDP / FSDP wrappers (their .module) around the model
    if inner is not model:
        return _tuner_and_prefix(inner)
    owner = model.__dict__.get(_OWNER)
    if owner is None:
        owner = PeftModel(model, peft_config, adapter_name)
        object.__setattr__(model, _OWNER, owner)  # plain attribute: no submodule, no cycle in state_dict
        model.peft_config = owner.peft_config      # the adapter set's live table, as peft sets it
    else:
        owner.add_adapter(adapter_name, peft_config)
    return model


def _targets_from_keys(config: PeftConfig, state_dict: dict, containers: set[str]) -> PeftConfig:
    """``config`` targeting exactly the modules ``state_dict``'s adapter keys name."""
    import dataclasses

    modules = []
    for key in state_dict:
        parts = key.removeprefix(PREFIX).split(".")
        cut = next((i for i, part in enumerate(parts) if part in containers), None)
        if cut and ".".join(parts[:cut]) not in modules:
            modules.append(".".join(parts[:cut]))
    if not modules:
        raise ValueError(f"state_dict has no {config.peft_type.value} adapter key (none names one of "
                         f"{sorted(containers)}); cannot tell which modules to adapt")
    return dataclasses.replace(config, target_modules=modules)


def _tuner_and_prefix(model: nn.Module) -> tuple[TunerModel, str]:
    """The ``TunerModel`` holding ``model``'s adapters and the key prefix from ``model`` to the user's model."""
    if isinstance(model, PeftModel):
        return model.base_model, PREFIX
    if isinstance(model, TunerModel):
        return model, "model."
    inner = adapter_model(model)       # DDP / FSDP wrappers (their .module) around the model
    if inner is not model:
        return _tuner_and_prefix(inner)
    owner = model.__dict__.get(_OWNER)
    if owner is None:
        raise ValueError(f"{type(model).__name__} holds no deltatune adapters; use get_peft_model or "
                         "inject_adapter_in_model first")
    return owner.base_model, ""


def _adapter_tensors(model: nn.Module, adapter_name: str) -> tuple[TunerModel, str, dict[str, torch.Tensor]]:
    tuner, prefix = _tuner_and_prefix(model)
    if adapter_name not in tuner.adapter_set:
        raise ValueError(f"adapter {adapter_name!r} not found; have {sorted(tuner.adapter_set.configs)}")
    return tuner, prefix, tuner.adapter_state(adapter_name)


def get_peft_model_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None,
                              adapter_name: str = "default", unwrap_compiled: bool = False,
                              save_embedding_layers: bool | Literal["auto"] = "auto") -> dict[str, torch.Tensor]:
    """Adapter ``adapter_name``'s tensors under peft's file keys (no adapter name), relative to ``model``.

    Args:
        model: a ``PeftModel``, its ``base_model``, or a model given adapters by ``inject_adapter_in_model``.
        state_dict: take the values from this dict (e.g. gathered by DeepSpeed / FSDP) under the
            model's own state-dict names; default: the live tensors.
        unwrap_compiled: look through ``torch.compile``'s wrapper (``_orig_mod``).
        save_embedding_layers: ``"auto"``, ``True`` or ``False``: which embedding base weights
            come along (``deltatune.tuner.embeddings``, the rule ``save_pretrained`` follows too).

    Returns:
        key -> detached tensor, the dict ``save_pretrained`` writes to ``adapter_model.safetensors``.
    """
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    tuner, prefix, tensors = _adapter_tensors(model, adapter_name)
    out = to_file_keys(with_embedding_layers(tuner.model, tensors, save_embedding_layers), prefix)
    if state_dict is not None:
        names = _state_names(model)
        out = {k: state_dict.get(names.get(id(v)), v) for k, v in out.items()}
    return {k: v.detach() for k, v in out.items()}


def _state_names(model: nn.Module) -> dict[int, str]:
    """``id(tensor)`` -> its name in ``model.state_dict()`` (first name of a tied tensor)."""
    names: dict[int, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names.setdefault(id(tensor), name)
    return names


def set_peft_model_state_dict(model: nn.Module, peft_model_state_dict: dict[str, torch.Tensor],
                              adapter_name: str = "default", ignore_mismatched_sizes: bool = False,
                              low_cpu_mem_usage: bool = False) -> LoadResult:
    """Copy ``peft_model_state_dict`` (keys as ``get_peft_model_state_dict`` gives them) into adapter
    ``adapter_name``, which must exist already (``inject_adapter_in_model`` or ``add_adapter``).

    Lenient, as peft is: keys the adapter lacks are reported, not refused. For a model from
    ``inject_adapter_in_model`` a ``base_model.model.`` prefix on the keys is dropped.
    ``low_cpu_mem_usage=True`` warns (not honoured: no tensor here is on the meta device).

    Returns:
        ``LoadResult(missing_keys, unexpected_keys)``: ``missing_keys`` are ``model.state_dict()``
        names left untouched (base weights included, as in peft), ``unexpected_keys`` the given
        keys that name no tensor of the adapter.

    Raises:
        RuntimeError: a tensor's shape differs from the adapter's (unless ``ignore_mismatched_sizes``,
            which skips it with a warning naming the key and both shapes).
    """
    warn_unhonoured("set_peft_model_state_dict", low_cpu_mem_usage=low_cpu_mem_usage)
    tuner, prefix, _ = _adapter_tensors(model, adapter_name)
    if adapter_name in tuner.components:  # a file holds the encoder's result, not the encoder
        tuner.components[adapter_name].resolve()
    live = to_file_keys(tuner.adapter_state(adapter_name), prefix)
    given = _relative(peft_model_state_dict, prefix, tuner)
    loaded, unexpected, mismatched = set(), [], []
    with torch.no_grad():
        for key, value in given.items():
            target = live.get(key)
            if target is None:
                unexpected.append(key)
            elif tuple(value.shape) != tuple(target.shape):
                mismatched.append((key, tuple(value.shape), tuple(target.shape)))
            else:
                target.copy_(value.to(device=target.device, dtype=target.dtype))
                loaded.add(id(target))
    if mismatched and not ignore_mismatched_sizes:
        raise RuntimeError("Error(s) in loading state_dict: " + "; ".join(
            f"size mismatch for {k}: copying a param with shape {a} from checkpoint, the shape in current model "
            f"is {b}" for k, a, b in mismatched))
    if mismatched:
        warnings.warn(f"Some weights of {type(model).__name__} were not initialized from the state dict and are "
                      "being ignored because you passed `ignore_mismatched_sizes=True`: " + "; ".join(
                          f"{k}: found shape {a}, the model has {b}" for k, a, b in mismatched), stacklevel=2)
    missing = [n for n, t in model.state_dict(keep_vars=True).items() if id(t) not in loaded]
    return LoadResult(missing, unexpected)


def _relative(state_dict: dict[str, torch.Tensor], prefix: str, tuner: TunerModel) -> dict[str, torch.Tensor]:
    """Given keys in the form ``get_peft_model_state_dict`` gives for this model, without peft's
    accidental duplicates around modules-to-save."""
    if prefix == "":  # peft drops a file's prefix when the model has no PeftModel around it
        state_dict = {k.removeprefix(PREFIX): v for k, v in state_dict.items()}
    cut = {k: k[len(prefix):] for k in state_dict if k.startswith(prefix)}
    kept = drop_peft_artefacts({cut[k]: state_dict[k] for k in cut}, tuner.saved_module_names())
    dropped = {k for k, rel in cut.items() if rel not in kept}
    return {k: v for k, v in state_dict.items() if k not in dropped}


def _base_key(root: nn.Module, key: str) -> str | None:
    """``key`` of ``root.state_dict()`` under the name the model had before adapters were added,
    or None when the tensor is an adapter's.

    Walks the key's parts through the live modules: inside an ``AdapterLayer`` only ``base_layer``
    (the wrapped module, skipped as a name part) leads to base tensors; its other children and
    tensors (factors, magnitudes, modules-to-save copies) are the adapters'.
    """
    parts, kept, module = key.split("."), [], root
    for part in parts:
        if isinstance(module, AdapterLayer):
            if part != "base_layer":
                return None
            module = module.base_layer
            continue
        child = module._modules.get(part) if module is not None else None
        kept.append(part)
        module = child
    return ".".join(kept)


def _base_names(model: nn.Module) -> tuple[nn.Module, dict[str, str]]:
    """The user's model inside ``model`` and its state-dict key -> original key, adapters' left out."""
    tuner, _ = _tuner_and_prefix(model)
    names = {}
    for key in tuner.model.state_dict(keep_vars=True):
        original = _base_key(tuner.model, key)
        if original is not None:
            names[key] = original
    return tuner.model, names


def get_base_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict under its original (pre-adapter) keys, without adapter tensors (peft's API).

    ``model``: a ``PeftModel``, its ``base_model``, or a model given adapters by
    ``inject_adapter_in_model``. A wrapped layer's ``q_proj.base_layer.weight`` is reported as
    ``q_proj.weight``; a modules-to-save wrapper's original as the module's own name. The values
    are the live tensors (detached, as ``state_dict()`` gives them), so with adapters merged they
    hold the merged weights.
    """
    inner, names = _base_names(model)
    state = inner.state_dict()
    return {original: state[key] for key, original in names.items()}


def set_base_model_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True):
    """Load ``state_dict``, keyed as the model was before adapters were added (``get_base_model_state_dict``'s
    keys), into the base tensors of ``model`` (peft's API); adapter tensors are untouched.

    Returns:
        ``LoadResult(missing_keys, unexpected_keys)`` in original key names.

    Raises:
        RuntimeError: with ``strict`` (default), when a base key is missing from ``state_dict`` or
            ``state_dict`` has a key that names no base tensor ("Missing key(s) in state_dict: ..." /
            "Unexpected key(s) in state_dict: ..."); nothing is loaded then.
    """
    inner, names = _base_names(model)
    current = {original: key for key, original in names.items()}
    missing = [k for k in current if k not in state_dict]
    unexpected = [k for k in state_dict if k not in current]
    if strict and (missing or unexpected):
        errors = ([f"Missing key(s) in state_dict: {missing}"] if missing else []) + \
                 ([f"Unexpected key(s) in state_dict: {unexpected}"] if unexpected else [])
        raise RuntimeError(f"Error(s) in loading the base state dict of {type(inner).__name__}:\n\t"
                           + "\n\t".join(errors))
    inner.load_state_dict({current[k]: v for k, v in state_dict.items() if k in current}, strict=False)
    return LoadResult(missing, unexpected)


def _get_submodules(model: nn.Module, key: str) -> tuple[nn.Module, nn.Module, str]:
    """``(parent, target, target_name)`` for the module at dotted path ``key`` of ``model`` (peft's
    ``peft.utils.other._get_submodules``, which integrations and peft's tests call). ``key=""``
    gives ``(model, model, "")``.

    Raises:
        AttributeError: no module at ``key`` (``nn.Module.get_submodule``'s message names the part).
    """
    parent_path, _, target_name = key.rpartition(".")
    return model.get_submodule(parent_path), model.get_submodule(key), target_name
