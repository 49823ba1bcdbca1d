"""``TunerModel``: the user's model with adapter layers swapped in, and which tensors are whose.

It holds the wrapped model as ``.model`` (peft's ``LoraModel`` role, so parameter names match
peft's ``base_model.model.<path>``) and answers the structural questions: which modules an adapter
wraps, which tensors belong to adapter X (``adapter_state``: the one answer saving, loading and
counting use), and which biases an adapter trains.

Adapters live in *components* (``deltatune.tuner.components``): wrapped layers, modules-to-save copies and
prompt encoders (the virtual tokens of prompt, prefix and P-tuning, which wrap no layer), all
behind one protocol. The tuner keeps them in ``component_list``, current on every inject, remove
and unload: nothing walks the model to find them. Trained biases are per adapter
(``tuner.biases``).
"""
from __future__ import annotations

import re
from typing import Iterator

import torch
from torch import nn

from deltatune import registry, targeting
from deltatune.adapter_set import AdapterSet
from deltatune.config import ConfigError, PeftConfig
from deltatune.methods.base import AdapterLayer, ModulesToSaveWrapper
from deltatune.methods.lora_param import ParamWrapper, check_same_parameters, wrap_parameter
from deltatune.surgery import replace_module
from deltatune.tuner import inits as _inits  # noqa: F401  registers init_lora_weights="olora" / "orthogonal"
from deltatune.tuner import tying
from deltatune.tuner.biases import BiasBook
from deltatune.tuner.components import Component, PromptEncoder, SavedModule, WrappedLayer, wrapped
from deltatune.tuner.embeddings import EMBEDDING_NAMES  # peft saves these layers' base weights when targeted
from deltatune.tuner.trainable_tokens import TrainableTokensWrapper, token_targets

__all__ = ["EMBEDDING_NAMES", "Component", "TunerModel"]

# peft's ``prefix`` of each method's parameter names (``"lora_" in name`` finds LoRA's tensors).
PREFIXES = {"LORA": "lora_", "IA3": "ia3_", "PROMPT_TUNING": "prompt_", "P_TUNING": "prompt_",
            "PREFIX_TUNING": "prompt_", "DELTATUNE_BOTTLENECK": "adapter_"}


class TunerModel(nn.Module):
    """Holds the wrapped model as ``.model``; forward passes through.

    Attributes:
        model: the user's model, with adapter layers inside.
        adapter_set: the ``AdapterSet`` every adapter layer in ``model`` shares.
        components: adapter -> its prompt encoder module (peft's ``prompt_encoder``), for the
            methods that wrap no layer; registered here so their parameters are the model's.
        component_list: every component (``tuner.components``), in the order they were made.
        biases: each adapter's trained biases and which are live (``tuner.biases.BiasBook``).
    """

    def __init__(self, model: nn.Module, adapter_set: AdapterSet) -> None:
        super().__init__()
        self.model = model
        self.adapter_set = adapter_set
        self.components = nn.ModuleDict()
        self.component_list: list[Component] = []
        self.biases = BiasBook(model, adapter_set)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        """Attributes the tuner lacks come from the wrapped model, as peft's ``LoraModel`` does."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("model", "adapter_set", "_peft"):
                raise
            return getattr(self.model, name)

    # -- peft's tuner surface (``model.base_model.X``); the PeftModel owning this tuner acts ---
    @property
    def prefix(self) -> str:
        """peft's parameter-name prefix of the active adapter's method (``"lora_"``, ``"ia3_"``...)."""
        config = self.adapter_set.configs.get(self.adapter_set.active)
        return PREFIXES.get(config.peft_type.value, "lora_") if config is not None else "lora_"

    @property
    def active_adapter(self) -> str | None:
        """The active adapter's name."""
        return self.adapter_set.active

    @property
    def active_adapters(self) -> list[str]:
        """The active adapters (a list, as in peft; one adapter at a time here)."""
        return [self.adapter_set.active] if self.adapter_set.active is not None else []

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate ``adapter_name`` (a name, or peft's list of one).

        Raises:
            NotImplementedError: several names: several active adapters summed in one call are not
                supported (merge them with ``add_weighted_adapter(..., combination_type="cat")``).
            ValueError: an unknown name.
        """
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if len(names) != 1:
            raise NotImplementedError(f"set_adapter({names!r}): several active adapters at once are not supported; "
                                      "combine them into one with add_weighted_adapter(..., combination_type='cat')")
        self._peft.set_adapter(names[0])
        if inference_mode:
            for p in self.adapter_parameters(names[0]):
                p.requires_grad_(False)

    def disable_adapter_layers(self) -> None:
        """Run the base model until ``enable_adapter_layers`` (peft's; see ``PeftModel.disable_adapter``)."""
        self._peft.disable_adapter_layers()

    def enable_adapter_layers(self) -> None:
        """Apply the active adapter again after ``disable_adapter_layers``."""
        self._peft.enable_adapter_layers()

    def cast_adapter(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """peft's ``autocast_adapter_dtype``: adapter ``adapter_name``'s tensors in each wrapped layer
        take its base weight's floating dtype, upcast to float32 when ``autocast_adapter_dtype`` and
        that dtype is 16-bit (float16 / bfloat16). Modules-to-save copies keep their module's dtype."""
        for component in self.component_list:
            if not isinstance(component, WrappedLayer) or isinstance(component, SavedModule):
                continue
            layer = component.layer   # a ParamWrapper's factors follow the parameter they adapt
            weight = layer.get_param() if isinstance(layer, ParamWrapper) else \
                getattr(layer.get_base_layer(), "weight", None)
            if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
                continue  # a quantized base: the adapter keeps its own (float32) dtype
            dtype = weight.dtype
            if autocast_adapter_dtype and dtype in (torch.float16, torch.bfloat16):
                dtype = torch.float32
            for p in component.parameters_of(adapter_name):
                if p.is_floating_point() and p.dtype != dtype:
                    p.data = p.data.to(dtype)

    def adapter_layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        """``(module name, layer)`` for every adapter layer in the model (modules-to-save
        wrappers included), from the component list."""
        for component in self.component_list:
            if isinstance(component, WrappedLayer):
                yield component.name, component.layer

    def _get_module_names_tied_with_embedding(self) -> list[str]:
        """Modules tied to the input embedding (peft's method; ``tuner.tying.tied_names``), sorted."""
        return sorted(tying.tied_names(self.model))

    def component_for(self, adapter_name: str) -> Component | None:
        """The component that prepares adapter ``adapter_name``'s inputs (None: a layer method)."""
        if adapter_name not in self.components:  # prompt encoders, the components with inputs, are kept by name
            return None
        return next((c for c in self.component_list
                     if c.prepares_inputs and adapter_name in c.adapters()), None)

    # -- structure -----------------------------------------------------------------------------
    def inject(self, adapter_name: str, config: PeftConfig) -> None:
        """Add adapter ``adapter_name``: its method's prompt encoder, or its layers in every module
        ``config`` selects (wrapping plain ones); its modules-to-save copies; its biases.

        On error the caller removes the adapter again (``remove_adapter``), which unwraps layers
        left empty.
        """
        method = registry.method_for(config.peft_type.value)
        tie = tying.plan(self.model, config)  # before wrapping: which modules follow the input embedding
        if method.component is not None:
            self._add_encoder(adapter_name, method.component(config, self.model))
        else:
            check_same_parameters(config, self.adapter_set.configs, adapter_name)
            names, params = targeting.select_targets(
                self.model, config, is_supported=lambda m: method.layer_class_for(m, config) is not None)
            if tie is not None and tie[0] == "target":  # the embedding gets LoRA; tied modules read its factors
                names = [n for n in dict.fromkeys([tie[1], *names]) if n not in tie[2]]
            for name in names:
                layer = self._layer_at(name, lambda m: method.layer_class_for(m, config), config)
                layer.add_adapter(adapter_name, config, name)
                layer.train(layer.base_layer.training)  # new dropout follows the model's mode
            for name, parameter_name in params:  # peft's LoRA on bare parameters (MoE experts)
                layer = self._param_layer_at(name, parameter_name)
                layer.add_adapter(adapter_name, config, f"{name}.{parameter_name}")
                layer.train(layer.get_base_layer().training)
        saved = getattr(config, "modules_to_save", None)
        if tie is not None and tie[0] == "saved":
            saved = tying.saved_entries(saved or [], tie[1], tie[2])
        for name in targeting.select_saved(self.model, saved):
            self._layer_at(name, lambda m: ModulesToSaveWrapper, config).add_adapter(adapter_name)
        if tie is not None:
            self._tie(adapter_name, config, tie)
        self._add_tokens(adapter_name, config)
        trained = self.bias_names(adapter_name, getattr(config, "bias", "none"))
        self.biases.register(adapter_name, [re.sub(r"(\.base_layer)+\.", ".", n) for n in trained])

    def _tie(self, adapter_name: str, config: PeftConfig, tie: tuple[str, str, list[str]]) -> None:
        """``ensure_weight_tying``: wrap each module tied to the input embedding so that it uses the
        embedding's modules-to-save copy or LoRA factors (``tuner.tying``)."""
        kind, embedding, tied = tie
        source = dict(self.adapter_layers())[embedding]
        method = registry.method_for(config.peft_type.value)
        for name in tied:
            if kind == "saved":
                layer = self._layer_at(name, lambda m: ModulesToSaveWrapper, config)
                layer.add_adapter(adapter_name)
                tying.tie_copy(layer.modules_to_save[adapter_name], source.modules_to_save[adapter_name])
                continue
            layer = self._layer_at(name, lambda m: method.layer_class_for(m, config), config)
            layer.add_adapter(adapter_name, config, name)
            tying.tie_lora(layer, source, adapter_name)
            i = next(i for i, c in enumerate(self.component_list) if isinstance(c, WrappedLayer) and c.name == name)
            self.component_list[i] = tying.TiedLoraLayer(name, layer)

    def _add_tokens(self, adapter_name: str, config: PeftConfig) -> None:
        """``trainable_token_indices``: wrap each named embedding (``tuner.trainable_tokens``); an
        output head tied to the input embedding is wrapped too and uses the embedding's rows."""
        targets = token_targets(self.model, config)
        layers = dict(self.adapter_layers())
        for name, indices in targets.items():
            if name in layers and not isinstance(layers[name], TrainableTokensWrapper):
                raise ConfigError(f"trainable_token_indices: {name} already holds a {type(layers[name]).__name__} "
                                  "adapter (target_modules); its rows cannot be trained apart from it")
            self._layer_at(name, lambda m: TrainableTokensWrapper, config).add_adapter(
                adapter_name, config, name, indices=indices)
        get = getattr(self.model, "get_input_embeddings", None)
        embedding = get() if callable(get) else None
        if not isinstance(embedding, TrainableTokensWrapper) or adapter_name not in embedding.held:
            return
        for name in tying.tied_names(self.model):
            if name in targets or (name in layers and not isinstance(layers[name], TrainableTokensWrapper)):
                continue  # named explicitly (its own rows), or another method's layer (LoRA on the head)
            head = self._layer_at(name, lambda m: TrainableTokensWrapper, config)
            head.tie_to(embedding.token_adapter, name)
            head.add_adapter(adapter_name, config, name)

    def _add_encoder(self, adapter_name: str, module: nn.Module) -> None:
        param = next(self.model.parameters(), None)
        module = module.to(param.device) if param is not None else module
        self.components[adapter_name] = module
        self.component_list.append(PromptEncoder(adapter_name, module))

    def _layer_at(self, name: str, layer_class, config: PeftConfig) -> AdapterLayer:
        """The adapter layer at module ``name``, wrapping the plain module there first (and listing
        it) with ``layer_class(module)``; an existing layer must be of that class."""
        listed = next((c for c in self.component_list if isinstance(c, WrappedLayer) and c.name == name), None)
        if listed is not None:
            wanted = layer_class(listed.layer.get_base_layer())
            if not isinstance(listed.layer, wanted):
                raise ConfigError(f"{name} already holds a {type(listed.layer).__name__} adapter; "
                                  f"cannot add a {config.peft_type.value} adapter to the same layer")
            return listed.layer
        module = self.model.get_submodule(name)
        layer = layer_class(module)(module, self.adapter_set)
        replace_module(self.model, name, layer)
        self.component_list.append(wrapped(name, layer))
        return layer

    def _param_layer_at(self, name: str, parameter_name: str) -> ParamWrapper:
        """The ``ParamWrapper`` of parameter ``parameter_name`` of the module at ``name``; a new one
        goes on top of what is there (nesting onto the module's other wrapped parameters), and the
        component at ``name`` follows it."""
        listed = next((c for c in self.component_list if isinstance(c, WrappedLayer) and c.name == name), None)
        current = listed.layer if listed is not None else self.model.get_submodule(name)
        layer, new = wrap_parameter(current, parameter_name, self.adapter_set, name)
        if new:
            replace_module(self.model, name, layer)
            if listed is not None:
                listed.layer = layer
            else:
                self.component_list.append(wrapped(name, layer))
        return layer

    def remove_adapter(self, adapter_name: str) -> None:
        """Delete ``adapter_name`` from every component; components left empty leave the model
        (wrapped layers go back to plain modules)."""
        self.biases.forget(adapter_name)
        for component in list(self.component_list):
            component.delete(adapter_name)
            if not component.adapters():
                component.detach(self)
                self.component_list.remove(component)

    def unload(self, merged: list[str]) -> nn.Module:
        """Replace every adapter layer by a plain module; adapters ``merged`` (already folded into
        the weights) keep their trained biases and modules-to-save copies, the rest are dropped."""
        self.biases.unload(merged)
        for component in self.component_list:
            component.detach(self, merged)
        self.component_list = []
        return self.model

    # -- which tensors are adapter X's ---------------------------------------------------------
    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        """What adapter ``adapter_name`` trains: its tensors in every component and its live biases."""
        params = [p for c in self.component_list for p in c.parameters_of(adapter_name)] + \
            self.biases.live_parameters(adapter_name)
        return list({id(p): p for p in params}.values())  # tied modules share their embedding's Parameters

    def adapter_state(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Model-relative key -> tensor for everything adapter ``adapter_name`` saves, under the keys
        peft uses: its components' tensors, its trained biases (its own values, current), and
        the base weights of targeted embedding layers (peft's ``save_embedding_layers="auto"``).
        The tensors themselves, not copies: loading copies into them (then ``reload_biases``)."""
        out: dict[str, torch.Tensor] = {}
        for component in self.component_list:
            out.update(component.state(adapter_name))
        self.biases.write_back()
        for pname in self.biases.params.get(adapter_name, []):
            out[self.biases.live_name(pname)] = self.biases.tensor(adapter_name, pname)
        out.update(self._embedding_base_weights(adapter_name))
        return out

    def _embedding_base_weights(self, adapter_name: str) -> dict[str, torch.Tensor]:
        targets = getattr(self.adapter_set.configs.get(adapter_name), "target_modules", None)
        if not isinstance(targets, list) or not any(e in targets for e in EMBEDDING_NAMES):
            return {}
        out = {}
        for name, layer in self.adapter_layers():
            if isinstance(layer, (ModulesToSaveWrapper, TrainableTokensWrapper)) or adapter_name not in layer.held:
                continue  # a modules-to-save copy is saved whole already; trainable tokens save their rows
            if name.rsplit(".", 1)[-1] in EMBEDDING_NAMES and hasattr(layer.get_base_layer(), "weight"):
                out[f"{name}.base_layer.weight"] = layer.get_base_layer().weight
        return out

    def saved_module_names(self) -> list[str]:
        """Names of the modules-to-save wrappers (heads trained in full)."""
        return [c.name for c in self.component_list if isinstance(c, SavedModule)]

    # -- trained biases, per adapter -----------------------------------------------------------
    def bias_names(self, adapter_name: str, bias: str) -> list[str]:
        """Bias parameters adapter ``adapter_name`` trains: every bias of the base model proper
        (``"all"``) or the biases of the layers it wraps (``"lora_only"``), as peft names them."""
        if bias == "all":
            return [n for n, p in self.model.named_parameters()
                    if (n == "bias" or n.endswith(".bias")) and self._is_base_param(n)]
        if bias == "lora_only":
            out = []
            for name, layer in self.adapter_layers():
                b = getattr(layer.get_base_layer(), "bias", None)
                if not isinstance(layer, ModulesToSaveWrapper) and adapter_name in layer.held \
                        and isinstance(b, nn.Parameter):
                    out.append(self.biases.live_name(f"{name}.bias"))
            return out
        return []

    def _is_base_param(self, param_name: str) -> bool:
        """True for a parameter of the base model proper: not an adapter's own tensor, and not
        inside a modules-to-save wrapper (its trained copy is saved whole under the module's name)."""
        layers = dict(self.adapter_layers())
        parts = param_name.split(".")[:-1]
        for i in range(1, len(parts) + 1):
            layer = layers.get(".".join(parts[:i]))
            if layer is not None:
                return i < len(parts) and parts[i] == "base_layer" and not isinstance(layer, ModulesToSaveWrapper)
        return True

    def trains_biases(self, adapter_name: str) -> bool:
        """True if adapter ``adapter_name`` has trained biases of its own."""
        return self.biases.trains(adapter_name)

    def sync_biases(self, applied) -> None:
        """Make the live bias parameters hold the biases of adapters ``applied`` (the base's
        values plus each applied adapter's change), first writing back what changed the live
        values since the last change (``BiasBook.apply``)."""
        self.biases.apply(applied)

    def live_biases(self) -> tuple[str, ...]:
        """The adapters whose biases are live now."""
        return self.biases.live

    def reload_biases(self) -> None:
        """Recompute the live biases after tensors were copied into ``adapter_state``'s."""
        self.biases.apply(self.biases.live, force=True)

    def live_bias_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        """The live bias parameters adapter ``adapter_name`` trains (to unfreeze when it is active)."""
        return self.biases.live_parameters(adapter_name)
