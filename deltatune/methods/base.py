"""What every adapter layer shares: a base layer, named adapters, activation and merging.

A method subclasses ``AdapterLayer`` and declares in ``adapter_containers`` which of its
``ModuleDict``/``ParameterDict`` attributes hold per-adapter tensors. Everything else (saving,
deleting, marking trainable, counting) finds adapter parameters through that declaration, never
by looking for substrings in parameter names.
"""
from __future__ import annotations

import copy
from typing import ClassVar, Iterator

import torch
from torch import nn

from deltatune import registry


class AdapterLayer(nn.Module):
    """A frozen ``base_layer`` plus any number of named adapters of one method.

    Subclasses implement ``add_adapter(name, config, module_name)`` and ``forward``; additive or
    multiplicative methods implement ``merged_weight``/``unmerged_weight`` to be mergeable.
    """

    adapter_containers: ClassVar[tuple[str, ...]] = ()
    mergeable: ClassVar[bool] = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter_names: list[str] = []
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    def get_base_layer(self) -> nn.Module:
        """The wrapped module."""
        return self.base_layer

    @property
    def merged(self) -> bool:
        """True while at least one adapter is merged into the base weight."""
        return bool(self.merged_adapters)

    # -- bookkeeping ---------------------------------------------------------------------------
    def add_adapter(self, name: str, config, module_name: str) -> None:  # pragma: no cover
        raise NotImplementedError

    def _register(self, name: str) -> None:
        if name not in self.adapter_names:
            self.adapter_names.append(name)

    def adapter_parameters(self, name: str) -> Iterator[tuple[str, nn.Parameter]]:
        """``(key suffix, parameter)`` pairs of adapter ``name``, in peft's saved-key form.

        ``lora_A.default.weight`` is reported as ``lora_A.weight``; a ParameterDict entry
        ``lora_embedding_A.default`` as ``lora_embedding_A``.
        """
        for attr in self.adapter_containers:
            container = getattr(self, attr)
            if name not in container:
                continue
            item = container[name]
            if isinstance(item, nn.Module):
                for pname, p in item.named_parameters():
                    yield f"{attr}.{pname}", p
            else:
                yield attr, item

    def set_active(self, names: list[str]) -> None:
        """Make ``names`` (those this layer holds) the active adapters."""
        self.active_adapters = [n for n in names if n in self.adapter_names]

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (unmerging first if it is merged)."""
        if name in self.merged_adapters:
            self.unmerge()
        for attr in self.adapter_containers:
            container = getattr(self, attr)
            if name in container:
                del container[name]
        for table in self.per_adapter_tables():
            table.pop(name, None)
        self.adapter_names = [n for n in self.adapter_names if n != name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def per_adapter_tables(self) -> list[dict]:
        """Plain dicts keyed by adapter name (hyper-parameters) to clean on delete."""
        return []

    # -- merging -------------------------------------------------------------------------------
    def merged_weight(self, weight: torch.Tensor, name: str) -> torch.Tensor:  # pragma: no cover
        """Base ``weight`` with adapter ``name`` folded in (pure: no state changes)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into the base weight")

    def unmerged_weight(self, weight: torch.Tensor, name: str) -> torch.Tensor:  # pragma: no cover
        """Inverse of ``merged_weight``."""
        raise NotImplementedError

    def merge(self, names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters ``names`` (default: the active ones) into the base weight."""
        for name in names if names is not None else self.active_adapters:
            if name not in self.adapter_names or name in self.merged_adapters:
                continue
            if not self.mergeable:
                raise NotImplementedError(f"{type(self).__name__} cannot be merged into the base weight")
            with torch.no_grad():
                base = registry.get_weight(self.base_layer)
                new = self.merged_weight(base.float(), name)
                if safe_merge and not torch.isfinite(new).all():
                    raise ValueError(f"merging adapter {name!r} gives non-finite weights; not merged")
                registry.set_weight(self.base_layer, new)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Undo every merge, last merged first."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with torch.no_grad():
                base = registry.get_weight(self.base_layer)
                registry.set_weight(self.base_layer, self.unmerged_weight(base.float(), name))

    def unloaded(self, merge: bool) -> nn.Module:
        """The plain module to put back in the model (after merging active adapters if ``merge``)."""
        if merge:
            self.merge()
        return self.base_layer

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, active={self.active_adapters}"


class ModulesToSaveWrapper(AdapterLayer):
    """A module trained in full: each adapter holds its own copy; the original stays intact.

    peft's name for the wrapped module is ``original_module``; files store the copy's weights
    under the module's own name (``...score.weight``).
    """

    adapter_containers = ("modules_to_save",)

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        self.modules_to_save = nn.ModuleDict()

    @property
    def original_module(self) -> nn.Module:
        return self.base_layer

    def add_adapter(self, name: str, config=None, module_name: str = "") -> None:
        self.modules_to_save[name] = copy.deepcopy(self.base_layer)
        self._register(name)

    def adapter_parameters(self, name: str):
        if name in self.modules_to_save:
            yield from self.modules_to_save[name].named_parameters()

    def forward(self, *args, **kwargs):
        if self.disabled or not self.active_adapters:
            return self.base_layer(*args, **kwargs)
        return self.modules_to_save[self.active_adapters[0]](*args, **kwargs)

    def unloaded(self, merge: bool) -> nn.Module:
        if merge and self.active_adapters:
            return self.modules_to_save[self.active_adapters[0]]
        return self.base_layer

    def merge(self, names=None, safe_merge: bool = False) -> None:
        """A full copy has nothing to fold in; it replaces the original when unloading."""

    def unmerge(self) -> None:
        """Nothing was folded in."""
