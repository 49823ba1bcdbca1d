"""The places adapters live in a tuner model, behind one small protocol.

A ``TunerModel`` keeps a list of components, kept current as adapters are injected and removed,
so nothing walks the model to find them:

- ``WrappedLayer``: an adapter layer (LoRA, DoRA, IA3, bottleneck) swapped in at a module path;
- ``SavedModule``: a modules-to-save wrapper (each adapter's full copy of a head);
- ``PromptEncoder``: one adapter's virtual tokens (prompt, prefix and P-tuning wrap no layer).

Each answers the same questions: which adapters it holds, adapter X's tensors under the keys the
file uses, how to delete X, what to put back in the model when it is empty or unloaded, and
(the input hook) what a call's arguments look like with X applied.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from deltatune.methods.base import AdapterLayer, ModulesToSaveWrapper
from deltatune.surgery import replace_module


class Component:
    """The protocol; the defaults suit components with no input hook."""

    name: str
    prepares_inputs: ClassVar[bool] = False

    def adapters(self) -> list[str]:  # pragma: no cover - every component says
        """Names of the adapters this component holds."""
        raise NotImplementedError

    def state(self, adapter: str) -> dict[str, torch.Tensor]:  # pragma: no cover
        """Model-relative key -> tensor for adapter ``adapter`` (the tensors themselves: loading
        copies into them); empty when it does not hold the adapter."""
        raise NotImplementedError

    def parameters_of(self, adapter: str) -> list[nn.Parameter]:  # pragma: no cover
        """The parameters adapter ``adapter`` trains here."""
        raise NotImplementedError

    def delete(self, adapter: str) -> None:  # pragma: no cover
        """Drop adapter ``adapter``'s tensors (the caller unmerges it first)."""
        raise NotImplementedError

    def detach(self, tuner, merged: list[str] | None = None) -> None:  # pragma: no cover
        """Leave ``tuner``: put the plain module back (keeping adapters ``merged``, already folded in,
        when unloading)."""
        raise NotImplementedError

    def prepare(self, model: nn.Module, kwargs: dict, callee: nn.Module | None = None) -> dict:
        """A call's keyword arguments with this component's inputs in (unchanged by default)."""
        return kwargs

    def generation_kwargs(self, model: nn.Module, kwargs: dict) -> dict:
        """``generate``'s keyword arguments with this component's inputs in (unchanged by default)."""
        return kwargs


class WrappedLayer(Component):
    """An adapter layer at module path ``name`` of the user's model."""

    def __init__(self, name: str, layer: AdapterLayer) -> None:
        self.name, self.layer = name, layer

    def adapters(self) -> list[str]:
        return list(self.layer.held)

    def state(self, adapter: str) -> dict[str, torch.Tensor]:
        return {f"{self.name}.{suffix}": p for suffix, p in self.layer.adapter_parameters(adapter)}

    def parameters_of(self, adapter: str) -> list[nn.Parameter]:
        return [p for _, p in self.layer.adapter_parameters(adapter)]

    def delete(self, adapter: str) -> None:
        self.layer.delete_adapter(adapter)

    def detach(self, tuner, merged: list[str] | None = None) -> None:
        plain = self.layer.unloaded(merged) if merged is not None else self.layer.get_base_layer()
        replace_module(tuner.model, self.name, plain)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {type(self.layer).__name__}, adapters={self.layer.held})"


class SavedModule(WrappedLayer):
    """A modules-to-save wrapper: each adapter trains its own full copy of the module."""


def wrapped(name: str, layer: AdapterLayer) -> WrappedLayer:
    """The component for adapter layer ``layer`` at ``name``."""
    return SavedModule(name, layer) if isinstance(layer, ModulesToSaveWrapper) else WrappedLayer(name, layer)


class PromptEncoder(Component):
    """One adapter's virtual tokens; the module lives in ``TunerModel.components[adapter]`` (so its
    parameters are the tuner's, as peft's ``prompt_encoder`` is)."""

    prepares_inputs = True

    def __init__(self, adapter: str, module: nn.Module) -> None:
        self.name, self.module, self._held = f"components.{adapter}", module, [adapter]

    def adapters(self) -> list[str]:
        return list(self._held)

    def state(self, adapter: str) -> dict[str, torch.Tensor]:
        return self.module.state() if adapter in self._held else {}

    def parameters_of(self, adapter: str) -> list[nn.Parameter]:
        return list(self.module.parameters()) if adapter in self._held else []

    def delete(self, adapter: str) -> None:
        self._held = [n for n in self._held if n != adapter]

    def detach(self, tuner, merged: list[str] | None = None) -> None:
        for adapter in list(tuner.components):
            if tuner.components[adapter] is self.module:
                del tuner.components[adapter]

    def prepare(self, model: nn.Module, kwargs: dict, callee: nn.Module | None = None) -> dict:
        return self.module.prepare(model, kwargs, callee)

    def generation_kwargs(self, model: nn.Module, kwargs: dict) -> dict:
        return self.module.generation_kwargs(model, kwargs)

    def __repr__(self) -> str:
        return f"PromptEncoder({self._held}, {type(self.module).__name__})"
