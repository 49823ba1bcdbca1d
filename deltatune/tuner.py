"""``TunerModel``: the user's model with adapter layers swapped in, and which tensors are whose.

It holds the wrapped model as ``.model`` (peft's ``LoraModel`` role, so parameter names match
peft's ``base_model.model.<path>``) and answers the structural questions: which modules an adapter
wraps, which tensors belong to adapter X (``adapter_state``: the one answer saving, loading and
counting use), and which biases an adapter trains.

Adapters of methods that wrap no layer (virtual tokens) are *components*: one module per adapter
in ``components`` (peft's ``prompt_encoder``), with the same duties as a wrapped layer (their
tensors in ``adapter_state``, deleted with the adapter, trained when active, off when disabled)
and an input hook: ``prepare_call`` gives a call's arguments with the routed adapter's virtual
tokens in.

Trained biases are per adapter. peft shares one set of biases among all adapters (so a disabled
or switched adapter still carries another's trained biases); here each adapter that trains
biases (``bias="all"`` / ``"lora_only"``) keeps its own values, and the live bias parameters (the
tensors peft's keys name, which the optimizer updates) hold the values of the adapters applied
now: the active one plus any merged ones; the base's originals when adapters are disabled.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from deltatune import registry, targeting
from deltatune.adapter_set import AdapterSet
from deltatune.config import ConfigError, PeftConfig
from deltatune.methods.base import AdapterLayer, ModulesToSaveWrapper
from deltatune.surgery import replace_module

# Embedding layer names for which peft also saves the base weight when they are targeted
# (its ``save_embedding_layers="auto"``), so resized vocabularies travel with the adapter.
EMBEDDING_NAMES = ("embed_tokens", "lm_head")


class TunerModel(nn.Module):
    """Holds the wrapped model as ``.model``; forward passes through.

    Attributes:
        model: the user's model, with adapter layers inside.
        adapter_set: the ``AdapterSet`` every adapter layer in ``model`` shares.
    """

    def __init__(self, model: nn.Module, adapter_set: AdapterSet) -> None:
        super().__init__()
        self.model = model
        self.adapter_set = adapter_set
        self.components = nn.ModuleDict()                       # adapter -> component (no wrapped layer)
        self._bias_original: dict[str, torch.Tensor] = {}      # param name -> the base's values
        self._bias_params: dict[str, list[str]] = {}           # adapter -> bias params it trains
        self._bias_store: dict[str, dict[str, torch.Tensor]] = {}  # adapter -> its values when not live
        self._bias_live: tuple[str, ...] = ()                  # adapters whose biases are live now

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def adapter_layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        """``(module name, layer)`` for every adapter layer in the model."""
        for name, module in targeting.iter_candidates(self.model):
            if isinstance(module, AdapterLayer):
                yield name, module

    # -- structure -----------------------------------------------------------------------------
    def inject(self, adapter_name: str, config: PeftConfig) -> None:
        """Add adapter ``adapter_name`` to every module ``config`` selects (wrapping plain ones).

        On error the caller removes the adapter again (``remove_adapter``), which unwraps layers
        left empty.
        """
        method = registry.method_for(config.peft_type.value)
        if method.component is not None:
            component = method.component(config, self.model)
            param = next(self.model.parameters(), None)
            self.components[adapter_name] = component.to(param.device) if param is not None else component
            names = []
        else:
            names = targeting.select(self.model, config,
                                     is_supported=lambda m: method.layer_class_for(m, config) is not None)
        saved = targeting.select_saved(self.model, getattr(config, "modules_to_save", None))
        for name in names:
            module = self.model.get_submodule(name)
            if isinstance(module, AdapterLayer):
                if not isinstance(module, method.layer_class_for(module.get_base_layer(), config)):
                    raise ConfigError(f"{name} already holds a {type(module).__name__} adapter; "
                                      f"cannot add a {config.peft_type.value} adapter to the same layer")
            else:
                module = method.layer_class_for(module, config)(module, self.adapter_set)
                replace_module(self.model, name, module)
            module.add_adapter(adapter_name, config, name)
            module.train(module.base_layer.training)  # new dropout follows the model's mode
        for name in saved:
            module = self.model.get_submodule(name)
            if not isinstance(module, ModulesToSaveWrapper):
                module = ModulesToSaveWrapper(module, self.adapter_set)
                replace_module(self.model, name, module)
            module.add_adapter(adapter_name)
        self._register_biases(adapter_name, getattr(config, "bias", "none"))

    def remove_adapter(self, adapter_name: str) -> None:
        """Delete ``adapter_name`` from every layer; layers left empty go back to plain modules."""
        if adapter_name in self._bias_live:
            self.sync_biases(())
        if adapter_name in self.components:
            del self.components[adapter_name]
        for name, layer in list(self.adapter_layers()):
            layer.delete_adapter(adapter_name)
            if not layer.held:
                replace_module(self.model, name, layer.get_base_layer())
        self._bias_params.pop(adapter_name, None)
        self._bias_store.pop(adapter_name, None)
        still = {p for names in self._bias_params.values() for p in names}
        self._bias_original = {p: v for p, v in self._bias_original.items() if p in still}

    def unload(self, merged: list[str]) -> nn.Module:
        """Replace every adapter layer by a plain module; adapters ``merged`` (already folded into
        the weights) keep their trained biases and modules-to-save copies, the rest are dropped."""
        self.sync_biases(merged)
        self._bias_original, self._bias_live = {}, ()
        for name, layer in list(self.adapter_layers()):
            replace_module(self.model, name, layer.unloaded(merged))
        return self.model

    # -- components: adapters that wrap no layer -------------------------------------------------
    def routed_component(self) -> nn.Module | None:
        """The component of the adapter this call applies (None: the base, or a layer method)."""
        route = self.adapter_set.route()
        return self.components[route] if isinstance(route, str) and route in self.components else None

    def prepare_call(self, kwargs: dict, callee: nn.Module | None = None) -> dict:
        """``kwargs`` of a call to ``callee`` (default: the user's model) with the routed adapter's
        inputs prepared by its method (virtual tokens); unchanged when no component applies."""
        component = self.routed_component()
        return kwargs if component is None else component.prepare(self.model, kwargs, callee)

    def component_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        """Parameters of adapter ``adapter_name``'s component (none for layer methods)."""
        component = self.components[adapter_name] if adapter_name in self.components else None
        return list(component.parameters()) if component is not None else []

    def saved_module_names(self) -> list[str]:
        """Names of the modules-to-save wrappers (heads trained in full)."""
        return [name for name, layer in self.adapter_layers() if isinstance(layer, ModulesToSaveWrapper)]

    # -- which tensors are adapter X's ---------------------------------------------------------
    def adapter_state(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Model-relative key -> tensor for everything adapter ``adapter_name`` saves, under the keys
        peft uses: its layers' tensors, its trained biases (its own values, live or stored), and
        the base weights of targeted embedding layers (peft's ``save_embedding_layers="auto"``).
        The tensors themselves, not copies: loading copies into them."""
        out: dict[str, torch.Tensor] = {}
        for name, layer in self.adapter_layers():
            for suffix, p in layer.adapter_parameters(adapter_name):
                out[f"{name}.{suffix}"] = p
        for pname in self._bias_params.get(adapter_name, []):
            out[self._live(pname)] = self._bias_tensor(adapter_name, pname)
        if adapter_name in self.components:
            out.update(self.components[adapter_name].state())
        out.update(self._embedding_base_weights(adapter_name))
        return out

    def _embedding_base_weights(self, adapter_name: str) -> dict[str, torch.Tensor]:
        targets = getattr(self.adapter_set.configs.get(adapter_name), "target_modules", None)
        if not isinstance(targets, list) or not any(e in targets for e in EMBEDDING_NAMES):
            return {}
        out = {}
        for name, layer in self.adapter_layers():
            if isinstance(layer, ModulesToSaveWrapper) or adapter_name not in layer.held:
                continue  # a modules-to-save copy is saved whole already
            if name.rsplit(".", 1)[-1] in EMBEDDING_NAMES and hasattr(layer.get_base_layer(), "weight"):
                out[f"{name}.base_layer.weight"] = layer.get_base_layer().weight
        return out

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
                    out.append(f"{name}.base_layer.bias")
            return out
        return []

    def _is_base_param(self, param_name: str) -> bool:
        """True for a parameter of the base model proper: not an adapter's own tensor, and not
        inside a modules-to-save wrapper (its trained copy is saved whole under the module's name)."""
        module_name = param_name.rpartition(".")[0]
        for layer_name, layer in self.adapter_layers():
            if module_name.startswith(layer_name + ".") or module_name == layer_name:
                rest = module_name[len(layer_name) + 1:]
                return rest.split(".")[0] == "base_layer" and not isinstance(layer, ModulesToSaveWrapper)
        return True

    def _live(self, canonical: str) -> str:
        """The current name of the bias ``canonical`` (its module's path + ``.bias``): under
        ``base_layer`` while an adapter layer wraps the module. Kept by canonical name because
        another adapter may wrap the module later; the saved key follows the current structure,
        as peft's does."""
        module_path, _, leaf = canonical.rpartition(".")
        module = self.model.get_submodule(module_path) if module_path else self.model
        return f"{module_path}.base_layer.{leaf}" if isinstance(module, AdapterLayer) else canonical

    def _param(self, canonical: str) -> nn.Parameter:
        return self.model.get_parameter(self._live(canonical))

    def _register_biases(self, adapter_name: str, bias: str) -> None:
        names = [n.replace(".base_layer.", ".") for n in self.bias_names(adapter_name, bias)]
        if not names:
            return
        for pname in names:
            if pname not in self._bias_original:
                self._bias_original[pname] = self._param(pname).detach().clone()
        self._bias_params[adapter_name] = names
        self._bias_store[adapter_name] = {p: self._bias_original[p].clone() for p in names}

    def trains_biases(self, adapter_name: str) -> bool:
        """True if adapter ``adapter_name`` has trained biases of its own."""
        return bool(self._bias_params.get(adapter_name))

    def _bias_tensor(self, adapter_name: str, pname: str) -> torch.Tensor:
        if self._bias_live == (adapter_name,):
            return self._param(pname)
        return self._bias_store[adapter_name][pname]

    def sync_biases(self, applied) -> None:
        """Make the live bias parameters hold the biases of adapters ``applied``: the base's values
        plus each applied adapter's change (just its values when one adapter is applied)."""
        owners = tuple(n for n in dict.fromkeys(applied) if self._bias_params.get(n))
        if owners == self._bias_live:
            return
        with torch.no_grad():
            if len(self._bias_live) == 1:  # keep what training did to the live values
                (owner,) = self._bias_live
                for pname in self._bias_params[owner]:
                    self._bias_store[owner][pname].copy_(self._param(pname))
            for pname, original in self._bias_original.items():
                value = original.clone()
                for n in owners:
                    if pname in self._bias_store[n]:
                        value += self._bias_store[n][pname] - original
                self._param(pname).copy_(value)
        self._bias_live = owners

    def live_bias_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        """The live bias parameters adapter ``adapter_name`` trains (to unfreeze when it is active)."""
        return [self._param(p) for p in self._bias_params.get(adapter_name, [])]
