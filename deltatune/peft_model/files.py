"""Saving and loading a ``PeftModel``'s adapters: peft's directory layout and strict loads.

Files are read and written by ``checkpoint.peft_format``; this module decides which tensors go in
(``TunerModel.adapter_state``) and copies loaded ones back, every key checked, else nothing.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from collections import namedtuple

import torch

from deltatune.config import PeftConfig

# peft returns torch's ``load_state_dict`` result from loads; the same two fields.
LoadResult = namedtuple("LoadResult", ["missing_keys", "unexpected_keys"])


def save_pretrained(peft, save_directory, selected_adapters: list[str] | None = None,
                    path_initial_model_for_weight_conversion=None, safe_serialization: bool = True,
                    save_embedding_layers="auto") -> None:
    """``PeftModel.save_pretrained``: each adapter in peft's format and the model card, written atomically."""
    from deltatune.checkpoint.peft_format import write_adapters
    from deltatune.peft_model.card import model_card
    from deltatune.tuner.embeddings import with_embedding_layers

    if os.path.isfile(save_directory):
        raise ValueError(f"{save_directory}: is a file; save_pretrained writes a directory")
    adapters = {}
    for name in selected_adapters or list(peft.peft_config):
        if name not in peft.adapter_set:
            raise ValueError(f"cannot save unknown adapter {name!r}; have {sorted(peft.peft_config)}")
        config, tensors = peft.peft_config[name], peft.base_model.adapter_state(name)
        tensors = with_embedding_layers(peft.base_model.model, tensors, save_embedding_layers)
        if path_initial_model_for_weight_conversion is not None:
            config, tensors = _as_plain_lora(config, tensors, path_initial_model_for_weight_conversion)
        adapters["" if name == "default" else name] = (config, tensors)
    write_adapters(save_directory, adapters, safe_serialization=safe_serialization,
                   files={"README.md": model_card(peft, save_directory)})


def from_pretrained(cls, model, model_id, adapter_name: str, is_trainable: bool, config: PeftConfig | None,
                    autocast_adapter_dtype: bool = True):
    """``PeftModel.from_pretrained``: wrap ``model`` with the adapter saved in ``model_id``.

    A ``config`` given is the one the model keeps (``peft_config[adapter_name] is config``, as in
    peft), with the fields loading sets (``inference_mode``...) written into it. Called on
    any class, the result is the class of the config's ``task_type`` when it has one (as in peft).
    """
    from deltatune.checkpoint.peft_format import loftq_of, read_adapter

    given = config
    config, tensors = read_adapter(model_id, config)
    loftq = loftq_of(model_id, config)
    cls = cls.task_classes.get(getattr(config.task_type, "value", config.task_type) or "", cls)  # as peft
    peft = cls(model, _for_loading(config, is_trainable, loftq), adapter_name,
               autocast_adapter_dtype=autocast_adapter_dtype)
    try:
        load_weights(peft, adapter_name, tensors, model_id)
    except BaseException:
        peft._discard(adapter_name)
        raise
    if loftq:
        _loaded_loftq(peft, adapter_name, loftq, model_id)
    if given is not None:  # as peft: the caller's object is the model's config, updated in place
        vars(given).update(vars(peft.adapter_set.configs[adapter_name]))
        peft.adapter_set.configs[adapter_name] = given
    if not is_trainable:
        peft.eval()
    return peft


def load_adapter(peft, model_id, adapter_name: str, is_trainable: bool,
                 autocast_adapter_dtype: bool = True) -> LoadResult:
    """``PeftModel.load_adapter``: another saved adapter under ``adapter_name`` (not activated);
    returns peft's load result, empty (a load that does not match exactly raises)."""
    from deltatune.checkpoint.peft_format import loftq_of, read_adapter

    config, tensors = read_adapter(model_id)
    loftq = loftq_of(model_id, config)
    peft.add_adapter(adapter_name, _for_loading(config, is_trainable, loftq),
                     autocast_adapter_dtype=autocast_adapter_dtype)
    try:
        load_weights(peft, adapter_name, tensors, model_id)
    except BaseException:
        peft._discard(adapter_name)
        peft._refresh()
        raise
    if loftq:
        _loaded_loftq(peft, adapter_name, loftq, model_id)
    peft._refresh()
    return LoadResult([], [])


def load_weights(peft, adapter_name: str, tensors: dict, source) -> None:
    """Copy ``tensors`` (model-relative keys) into adapter ``adapter_name``, strictly: every key
    present with its shape and every key used, else nothing is copied."""
    from deltatune.checkpoint.peft_format import check_tensors, drop_peft_artefacts

    tuner = peft.base_model
    if adapter_name in tuner.components:  # a file holds the encoder's result, not the encoder
        tuner.components[adapter_name].resolve()
    expected = tuner.adapter_state(adapter_name)
    tensors = drop_peft_artefacts(tensors, tuner.saved_module_names())
    check_tensors({k: tuple(v.shape) for k, v in expected.items()}, tensors, source)
    with torch.no_grad():
        for key, live in expected.items():
            live.copy_(tensors[key].to(device=live.device, dtype=live.dtype))
    tuner.reload_biases()  # biases stored (not live) just changed: live values follow


def _loaded_loftq(peft, adapter_name: str, loftq: dict, source) -> None:
    """A LoftQ adapter was loaded as plain LoRA (no LoftQ redone): record its init again, so
    saving keeps the mark, and warn when its layers sit on full-precision weights."""
    from deltatune.quant import is_4bit

    config = peft.adapter_set.configs[adapter_name]
    peft.adapter_set.configs[adapter_name] = dataclasses.replace(config, init_lora_weights="loftq",
                                                                 loftq_config=loftq)
    dense = [n for n, layer in peft.base_model.adapter_layers()
             if adapter_name in layer.held and not is_4bit(layer.get_base_layer())]
    if dense:
        warnings.warn(
            f"{source}: adapter {adapter_name!r} was initialised by LoftQ for a 4-bit NF4 base, but {len(dense)} "
            f"of its layers (e.g. {dense[0]}) are full precision here: its factors start from the NF4 rounding "
            "error, so on the original weights they change the model. Load it onto the 4-bit base it was made "
            "for (with loftq_iter=1 that is deltatune.quantize(base)).", stacklevel=4)


def _as_plain_lora(config: PeftConfig, tensors: dict, initial_dir) -> tuple[PeftConfig, dict]:
    """A PiSSA adapter's tensors as plain LoRA on the original base, from its initial save."""
    from deltatune.checkpoint.convert import pissa_to_lora
    from deltatune.checkpoint.peft_format import read_adapter

    if getattr(config, "peft_type", None) is None or config.peft_type.value != "LORA" or config.use_dora:
        raise ValueError("path_initial_model_for_weight_conversion converts LoRA adapters (PiSSA) only, "
                         f"not {config.peft_type.value}{' with DoRA' if getattr(config, 'use_dora', False) else ''}")
    _, initial = read_adapter(initial_dir)
    return pissa_to_lora(config, {k: v.detach() for k, v in tensors.items()}, initial, source=initial_dir)


def _for_loading(config: PeftConfig, is_trainable: bool, loftq: dict | None) -> PeftConfig:
    """A saved adapter's config as it is added before its tensors are copied in: inference mode
    unless trainable, and a LoftQ adapter as plain LoRA (its factors go onto the base as it is)."""
    plain = {"init_lora_weights": True, "loftq_config": {}} if loftq else {}
    return dataclasses.replace(config, inference_mode=not is_trainable, **plain)
