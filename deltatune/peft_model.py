"""``PeftModel``: one base model, any number of named adapters.

Structure mirrors peft's so parameter names match theirs (``base_model.model.<path>...``):
``PeftModel.base_model`` is a ``TunerModel`` whose ``.model`` is the user's model with some
modules replaced by adapter layers. Saving and loading live in ``checkpoint.peft_format``;
merging is each layer's pure ``merged_weight``.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from deltatune import registry, targeting
from deltatune.config import TASK_HEADS, ConfigError, PeftConfig
from deltatune.methods.base import AdapterLayer, ModulesToSaveWrapper
from deltatune.surgery import replace_module


class TunerModel(nn.Module):
    """Holds the wrapped model as ``.model`` (peft's ``LoraModel`` role); forward passes through."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def adapter_layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        """``(module name, layer)`` for every adapter layer in the model."""
        for name, module in targeting.iter_candidates(self.model):
            if isinstance(module, AdapterLayer):
                yield name, module

    def inject(self, adapter_name: str, config: PeftConfig) -> list[str]:
        """Add adapter ``adapter_name`` to every module ``config`` selects.

        Returns the names of modules that were plain before (wrapped now), for rollback.
        """
        method = registry.method_for(config.peft_type.value)
        names = targeting.select(self.model, config,
                                 is_supported=lambda m: method.layer_class_for(m, config) is not None)
        saved = targeting.select_saved(self.model, getattr(config, "modules_to_save", None))
        wrapped = []
        for name in names:
            module = self.model.get_submodule(name)
            if isinstance(module, AdapterLayer):
                if not isinstance(module, method.layer_class_for(module.get_base_layer(), config)):
                    raise ConfigError(f"{name} already holds a {type(module).__name__} adapter; "
                                      f"cannot add a {config.peft_type.value} adapter to the same layer")
            else:
                module = method.layer_class_for(module, config)(module)
                replace_module(self.model, name, module)
                wrapped.append(name)
            module.add_adapter(adapter_name, config, name)
            module.train(module.base_layer.training)  # new dropout follows the model's mode
        for name in saved:
            module = self.model.get_submodule(name)
            if not isinstance(module, ModulesToSaveWrapper):
                module = ModulesToSaveWrapper(module)
                replace_module(self.model, name, module)
                wrapped.append(name)
            module.add_adapter(adapter_name)
        return wrapped

    def remove_adapter(self, adapter_name: str) -> None:
        """Delete ``adapter_name`` from every layer; layers left empty go back to plain modules."""
        for name, layer in list(self.adapter_layers()):
            layer.delete_adapter(adapter_name)
            if not layer.adapter_names:
                replace_module(self.model, name, layer.get_base_layer())

    def unload(self, merge: bool, adapter_names: list[str] | None = None, safe_merge: bool = False) -> nn.Module:
        """Replace every adapter layer by a plain module (merging first if ``merge``)."""
        for name, layer in list(self.adapter_layers()):
            if merge and adapter_names is not None:
                layer.merge(adapter_names, safe_merge=safe_merge)
            elif merge:
                layer.merge(safe_merge=safe_merge)
            replace_module(self.model, name, layer.unloaded(merge=merge))
        return self.model


def _signed_class(cls: type, base_type: type) -> type:
    """``cls`` with a ``forward`` that shows ``base_type.forward``'s parameters to ``inspect``.

    Tools that read a model's forward signature (transformers' ``Trainer`` drops dataset
    columns the forward does not name and finds label columns there) then see ``input_ids``,
    ``labels``, ... instead of ``*args, **kwargs``. One subclass per (class, base type), cached;
    it keeps ``cls``'s name, and ``isinstance(model, cls)`` holds.
    """
    key = (cls, base_type)
    if key not in _SIGNED:
        unsigned_forward = cls.forward

        def forward(self, *args, **kwargs):
            return unsigned_forward(self, *args, **kwargs)

        forward.__doc__ = unsigned_forward.__doc__
        try:
            forward.__signature__ = inspect.signature(base_type.forward)
        except (TypeError, ValueError):  # a builtin or odd callable: keep *args, **kwargs
            pass
        _SIGNED[key] = type(cls.__name__, (cls,), {
            "forward": forward, "__module__": cls.__module__, "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__, "_deltatune_signed": (cls, base_type)})
    return _SIGNED[key]


_SIGNED: dict[tuple[type, type], type] = {}


def _new_signed(cls: type, base_type: type):
    """Unpickling helper: an empty instance of ``_signed_class(cls, base_type)``."""
    return object.__new__(_signed_class(cls, base_type))


class PeftModel(nn.Module):
    """A base model with named adapters. Use ``get_peft_model`` or ``PeftModel.from_pretrained``.

    Attributes:
        base_model: the ``TunerModel``; ``base_model.model`` is the wrapped user model.
        peft_config: adapter name -> config.
    """

    def __new__(cls, model: nn.Module | None = None, *args, **kwargs):
        if model is not None and "_deltatune_signed" not in cls.__dict__:
            cls = _signed_class(cls, type(model))
        return super().__new__(cls)

    def __reduce_ex__(self, protocol):
        """Pickle as ``cls`` + base type (the signed subclass is not importable by name)."""
        reduced = super().__reduce_ex__(protocol)
        signed = type(self).__dict__.get("_deltatune_signed")
        if signed is None or not isinstance(reduced, tuple) or len(reduced) < 2:
            return reduced
        return (_new_signed, signed) + tuple(reduced[2:])

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default") -> None:
        from deltatune.quant import prepare_4bit_layers

        super().__init__()
        prepare_4bit_layers(model)  # registers weight access for bitsandbytes 4-bit layers, if any
        self.peft_config: dict[str, PeftConfig] = {}
        self.base_model = TunerModel(model)
        self._active = adapter_name
        self.add_adapter(adapter_name, peft_config)
        self.set_adapter(adapter_name)

    # -- attribute pass-through ----------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        """Attributes the wrapper lacks (``config``, ``device``, ...) come from the wrapped model."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "peft_config"):
                raise
            return getattr(self.base_model.model, name)

    def get_base_model(self) -> nn.Module:
        """The user's model (with adapter layers inside, unless unloaded)."""
        return self.base_model.model

    def forward(self, *args, **kwargs):
        """Calls the wrapped model with the active adapters applied."""
        return self.base_model.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        """``generate`` of the wrapped transformers model, with the active adapters applied."""
        return self.base_model.model.generate(*args, **kwargs)

    # -- adapters ------------------------------------------------------------------------------
    @property
    def active_adapter(self) -> str:
        """Name of the active adapter."""
        return self._active

    @property
    def active_adapters(self) -> list[str]:
        """Active adapter names (a list, as in peft)."""
        return [self._active]

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig) -> None:
        """Add a new adapter (inactive unless it is the first). On error the model is unchanged.

        Raises:
            ValueError: ``adapter_name`` exists already, or the config is invalid for this model.
        """
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; delete_adapter() it first")
        peft_config = _for_task(peft_config)
        if peft_config.base_model_name_or_path is None:
            source = getattr(getattr(self.base_model.model, "config", None), "_name_or_path", None) or None
            peft_config = dataclasses.replace(peft_config, base_model_name_or_path=source)
        try:
            self.base_model.inject(adapter_name, peft_config)
        except BaseException:
            self.base_model.remove_adapter(adapter_name)
            raise
        self.peft_config[adapter_name] = peft_config
        self._refresh()

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the active adapter (and the trainable one unless inference mode)."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} not found; have {sorted(self.peft_config)}")
        self._active = adapter_name
        self._refresh()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name`` from the model."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} not found; have {sorted(self.peft_config)}")
        self.base_model.remove_adapter(adapter_name)
        del self.peft_config[adapter_name]
        if self._active == adapter_name:
            self._active = next(iter(self.peft_config), None)
        self._refresh()

    def _refresh(self) -> None:
        """Point every layer at the active adapter and set ``requires_grad`` to match."""
        for _, layer in self.base_model.adapter_layers():
            layer.set_active([self._active] if self._active else [])
        mark_trainable(self.base_model, self._active,
                       self.peft_config.get(self._active) if self._active else None)

    @contextmanager
    def disable_adapter(self):
        """Context manager running the bare base model (merged adapters are unmerged meanwhile)."""
        layers = [layer for _, layer in self.base_model.adapter_layers()]
        merged = {id(layer): list(layer.merged_adapters) for layer in layers}
        for layer in layers:
            layer.unmerge()
            layer.disabled = True
        try:
            yield
        finally:
            for layer in layers:
                layer.disabled = False
                layer.merge(merged[id(layer)])

    # -- merging -------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold the active (or given) adapters into the base weights; ``unmerge_adapter`` undoes it."""
        for _, layer in self.base_model.adapter_layers():
            layer.merge(adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        """Undo ``merge_adapter``."""
        for _, layer in self.base_model.adapter_layers():
            layer.unmerge()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None, requantize: bool = False) -> nn.Module:
        """Merge the active (or given) adapters and return the plain base model (no deltatune inside).

        A 4-bit base is dequantized first, so the result is a full-precision model with the delta
        added to the dequantized weights. ``requantize=True`` rounds the merged weights back to
        4-bit NF4 and warns with the error that introduces.

        Raises:
            NotImplementedError: an adapter method that cannot merge (the message names it).
        """
        from deltatune import quant

        quantized = any(quant.is_4bit(m) for m in self.base_model.model.modules())
        if quantized:
            quant.dequantize_model(self.base_model.model)
        model = self.base_model.unload(merge=True, adapter_names=adapter_names, safe_merge=safe_merge)
        if quantized and requantize:
            quant.requantize(model)
        return model

    def unload(self) -> nn.Module:
        """Return the base model with every adapter removed and nothing merged."""
        return self.base_model.unload(merge=False)

    # -- parameters ----------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts (tied weights counted once)."""
        trainable = total = 0
        for _, p in self.named_parameters():
            n = p.numel() * getattr(p, "deltatune_params_per_element", 1)
            total += n
            trainable += n if p.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print ``trainable params: N || all params: M || trainable%: P`` (peft's line)."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    # -- files ---------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, selected_adapters: list[str] | None = None,
                        is_main_process: bool = True, **_ignored) -> None:
        """Write each adapter in peft's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

        The adapter named ``default`` goes in ``save_directory``, others in a subfolder of that
        name (peft's layout). Files are written atomically.
        """
        from deltatune.checkpoint.peft_format import save_adapter

        if not is_main_process:
            return
        for name in selected_adapters or list(self.peft_config):
            target = save_directory if name == "default" else os.path.join(save_directory, name)
            save_adapter(self, name, target)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: PeftConfig | None = None, **_ignored) -> "PeftModel":
        """Wrap ``model`` with the adapter saved in directory ``model_id``.

        Raises:
            FileNotFoundError, ConfigError, CheckpointError: the message names the file and key;
                ``model`` is left as it was.
        """
        from deltatune.checkpoint.peft_format import read_adapter

        config, tensors = read_adapter(model_id, config)
        config = dataclasses.replace(config, inference_mode=not is_trainable)
        peft_model = cls(model, config, adapter_name)
        try:
            peft_model._load_weights(adapter_name, tensors, model_id)
        except BaseException:
            peft_model.base_model.remove_adapter(adapter_name)
            raise
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     **_ignored) -> None:
        """Load another saved adapter under ``adapter_name`` (not activated; see ``set_adapter``)."""
        from deltatune.checkpoint.peft_format import read_adapter

        config, tensors = read_adapter(model_id)
        self.add_adapter(adapter_name, dataclasses.replace(config, inference_mode=not is_trainable))
        try:
            self._load_weights(adapter_name, tensors, model_id)
        except BaseException:
            self.delete_adapter(adapter_name)
            raise
        self._refresh()

    def _load_weights(self, adapter_name: str, tensors: dict, source) -> None:
        from deltatune.checkpoint.peft_format import load_adapter_weights

        load_adapter_weights(self.base_model, adapter_name, self.peft_config[adapter_name], tensors, source)


def _for_task(config: PeftConfig) -> PeftConfig:
    """Add the task's new head (e.g. ``score`` for SEQ_CLS) to ``modules_to_save``, as peft does."""
    heads = TASK_HEADS.get(config.task_type or "", [])
    if not heads or not hasattr(config, "modules_to_save"):
        return config
    current = list(config.modules_to_save or [])
    return dataclasses.replace(config, modules_to_save=current + [h for h in heads if h not in current])


def mark_trainable(tuner: TunerModel, adapter_name: str | None, config: PeftConfig | None) -> None:
    """Freeze everything, then unfreeze adapter ``adapter_name``'s parameters and biases per ``config.bias``."""
    for p in tuner.parameters():
        p.requires_grad_(False)
    if adapter_name is None or config is None or config.inference_mode:
        return
    for _, layer in tuner.adapter_layers():
        for _, p in layer.adapter_parameters(adapter_name):
            p.requires_grad_(True)
    bias = getattr(config, "bias", "none")
    for name, p in bias_parameters(tuner, adapter_name, bias).items():
        p.requires_grad_(True)


def bias_parameters(tuner: TunerModel, adapter_name: str, bias: str) -> dict[str, nn.Parameter]:
    """Biases that train with the adapter: every bias (``"all"``) or wrapped layers' (``"lora_only"``).

    Keys are parameter names relative to ``tuner.model``.
    """
    if bias == "all":
        return {n: p for n, p in tuner.model.named_parameters() if n.endswith("bias") and _is_base_param(tuner, n)}
    if bias == "lora_only":
        out = {}
        for name, layer in tuner.adapter_layers():
            b = getattr(layer.get_base_layer(), "bias", None)
            if adapter_name in layer.adapter_names and isinstance(b, nn.Parameter):
                out[f"{name}.base_layer.bias"] = b
        return out
    return {}


def _is_base_param(tuner: TunerModel, param_name: str) -> bool:
    """True for a parameter of the base model proper: not an adapter's own tensor, and not inside a
    ``modules_to_save`` wrapper (its trained copy is saved whole under the module's name)."""
    module_name = param_name.rpartition(".")[0]
    for layer_name, layer in tuner.adapter_layers():
        if module_name.startswith(layer_name + "."):
            rest = module_name[len(layer_name) + 1:]
            return rest.split(".")[0] == "base_layer" and not isinstance(layer, ModulesToSaveWrapper)
    return True


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default",
                   **_ignored) -> PeftModel:
    """Wrap ``model`` with a new adapter described by ``peft_config`` (peft's entry point).

    Only the adapter's parameters (and the biases/modules its config names) are trainable
    afterwards. Raises ConfigError naming the field or module for invalid configs.
    """
    return PeftModel(model, peft_config, adapter_name)
