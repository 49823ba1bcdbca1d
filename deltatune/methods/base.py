"""What every adapter layer shares: a base layer, the adapters it holds, routing and merging.

A layer refers to its model's one ``AdapterSet`` (names, slots, active / merged / disabled state,
the per-call route) and keeps only what is its own: which adapters target it, their tensors and
per-module hyper-parameters. A method subclasses ``AdapterLayer`` and declares in
``adapter_containers`` which of its ``ModuleDict``/``ParameterDict`` attributes hold per-adapter
tensors. Everything else (saving, deleting, marking trainable, counting, the bank) finds adapter
parameters through that declaration, never by looking for substrings in parameter names.

Mixed-adapter batches: a mixable method builds a *bank* per layer, its adapters' tensors stacked
by slot (``build_bank``), and the layer's delta gathers each row's slot from it (``gathered``);
slot 0 is the base.
The bank is derived from the ordinary modules (which stay what training, FSDP and
``torch.compile`` see): rebuilt differentiably when the adapter is being trained, cached otherwise
until a tensor, the slots or the mode change.
"""
from __future__ import annotations

import copy
from typing import ClassVar, Iterator

import torch
from torch import nn

from deltatune import registry
from deltatune.adapter_set import AdapterSet, rows_for


def _not_finite(name: str) -> ValueError:
    """The error of a safe merge that would write NaN or inf (peft's words first)."""
    return ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken "
                      f"(merging adapter {name!r} gives non-finite weights; not merged)")


def tensor_versions(tensors) -> tuple:
    """``(address, version counter)`` of each tensor: any in-place write bumps the counter."""
    return tuple((t.data_ptr(), t._version) for t in tensors)


class AdapterLayer(nn.Module):
    """A frozen ``base_layer`` plus the named adapters of one method that target it.

    Subclasses implement ``add_adapter(name, config, module_name)`` and ``forward``; additive or
    multiplicative methods implement ``merged_weight``/``unmerged_weight`` to be mergeable, and
    ``build_bank`` (read through ``gathered``) for mixed batches. What a method can do (mergeable,
    mixable, packable) is declared once, on its ``registry.Method``; a layer type that lacks a
    path its method has (LoRA on Conv2d: no per-row path) says why in ``cannot_mix_reason``.

    Attributes:
        base_layer: the wrapped module.
        adapter_set: the model's shared ``AdapterSet`` (not a submodule; not in the state dict).
        held: names of the adapters this layer holds, in the order they were added.
    """

    adapter_containers: ClassVar[tuple[str, ...]] = ()
    is_adapter_layer: ClassVar[bool] = True   # how ``targeting`` recognises wrappers without importing us

    def __init__(self, base_layer: nn.Module, adapter_set: AdapterSet | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter_set = adapter_set if adapter_set is not None else AdapterSet()
        self.held: list[str] = []
        self._bank: tuple | None = None          # (key, bank dict)
        self._gathered: dict = {}                # gather fn -> (route tensor, rows, result, bank)
        self._tensors: list | None = None        # held adapters' tensors (``_adapter_tensors``)

    def get_base_layer(self) -> nn.Module:
        """The wrapped module."""
        return self.base_layer

    @property
    def adapter_layer_names(self) -> tuple[str, ...]:
        """peft's name for ``adapter_containers``: the attributes holding per-adapter tensors."""
        return tuple(self.adapter_containers)

    @property
    def other_param_names(self) -> tuple[str, ...]:
        """peft's name for the other per-adapter attributes: the tables of ``per_adapter_tables``
        and child ``ModuleDict``s keyed by adapter (LoRA's ``r``, ``scaling``, ``lora_dropout``)."""
        tables = {id(t) for t in self.per_adapter_tables()}
        names = [n for n, v in vars(self).items() if id(v) in tables]
        return tuple(names + [n for n, m in self._modules.items()
                              if isinstance(m, nn.ModuleDict) and n not in self.adapter_containers])

    # -- views of the shared state (read-only) -------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        """Adapters held by this layer."""
        return list(self.held)

    @property
    def active_adapters(self) -> list[str]:
        """The model's active adapter, if this layer holds it."""
        active = self.adapter_set.active
        return [active] if active in self.held else []

    @property
    def merged_adapters(self) -> list[str]:
        """Adapters of this layer folded into its base weight, in merge order."""
        return [n for n in self.adapter_set.merged if n in self.held]

    @property
    def merged(self) -> bool:
        """True while at least one adapter is merged into the base weight."""
        return bool(self.merged_adapters)

    @property
    def disabled(self) -> bool:
        """True while the model runs with adapters disabled."""
        return self.adapter_set.disabled

    # -- routing -------------------------------------------------------------------------------
    def route(self):
        """This call's route restricted to this layer: None (base), a held unmerged adapter's
        name, or per-row slots (a ``LongTensor``)."""
        route = self.adapter_set.route()
        if isinstance(route, str) and (route not in self.held or route in self.adapter_set.merged):
            return None
        return route

    def cannot_mix_reason(self) -> str | None:
        """Why this layer type cannot run rows with different adapters (its delta raises
        MixingError saying so), or None when it can."""
        return None

    @property
    def mixable(self) -> bool:
        """False for a layer type without a per-row path: a server refuses such an adapter when it
        loads it rather than at its first mixed batch."""
        return self.cannot_mix_reason() is None

    # -- bookkeeping ---------------------------------------------------------------------------
    def add_adapter(self, name: str, config, module_name: str) -> None:  # pragma: no cover
        raise NotImplementedError

    def _register(self, name: str) -> None:
        if name not in self.held:
            self.held.append(name)
        self._bank = self._tensors = None
        self._gathered = {}

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

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name``'s tensors from this layer (the caller unmerges it first)."""
        for attr in self.adapter_containers:
            container = getattr(self, attr)
            if name in container:
                del container[name]
        for table in self.per_adapter_tables():
            table.pop(name, None)
        self.held = [n for n in self.held if n != name]
        self._bank = self._tensors = None
        self._gathered = {}

    def per_adapter_tables(self) -> list[dict]:
        """Plain dicts keyed by adapter name (hyper-parameters) to clean on delete."""
        return []

    def train(self, mode: bool = True):
        """Changing mode drops cached banks: fused optimizers update tensors in place without
        always bumping their version counters, so a cache from before training is not trusted."""
        self._bank = None
        self._gathered = {}
        return super().train(mode)

    # -- merging -------------------------------------------------------------------------------
    def merged_weight(self, weight: torch.Tensor, name: str) -> torch.Tensor:  # pragma: no cover
        """Base ``weight`` with adapter ``name`` folded in (pure: no state changes)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into the base weight")

    def unmerged_weight(self, weight: torch.Tensor, name: str) -> torch.Tensor:  # pragma: no cover
        """Inverse of ``merged_weight``."""
        raise NotImplementedError

    def merge(self, names: list[str], safe_merge: bool = False) -> None:
        """Fold adapters ``names`` (those this layer holds) into the base weight, in order.

        The shared set records what is merged; the caller (``PeftModel``) updates it once every
        layer has merged. With ``safe_merge`` a non-finite result raises before anything is written.
        """
        for name in names:
            if name not in self.held:
                continue
            with torch.no_grad():
                base = registry.get_weight(self.base_layer)
                new = self.merged_weight(base.float(), name)
                if safe_merge and not torch.isfinite(new).all():
                    raise _not_finite(name)
                registry.set_weight(self.base_layer, new)

    def check_merge(self, name: str) -> None:
        """Raise if merging ``name`` would give non-finite weights (``safe_merge``); writes nothing."""
        if name in self.held:
            with torch.no_grad():
                if not torch.isfinite(self.merged_weight(registry.get_weight(self.base_layer).float(), name)).all():
                    raise _not_finite(name)

    def unmerge(self, names: list[str]) -> None:
        """Undo the merges of ``names`` (merge order given), last merged first."""
        for name in reversed(names):
            if name not in self.held:
                continue
            with torch.no_grad():
                base = registry.get_weight(self.base_layer)
                registry.set_weight(self.base_layer, self.unmerged_weight(base.float(), name))

    def unloaded(self, merged: list[str]) -> nn.Module:
        """The plain module to put back in the model once adapters ``merged`` are folded in."""
        return self.base_layer

    # -- banks (mixed batches) -----------------------------------------------------------------
    def build_bank(self) -> dict[str, torch.Tensor]:  # pragma: no cover
        """This layer's adapters stacked by slot (slot 0 and absent adapters: the identity)."""
        raise NotImplementedError

    def bank(self) -> dict[str, torch.Tensor]:
        """``build_bank()``, cached unless an adapter tensor needs gradients now.

        The cache key holds the slots' version, every adapter and base tensor's version counter
        and the hyper-parameters, so a load, an optimizer step outside autograd, a merge or a
        scaling change rebuilds it.
        """
        params = self._adapter_tensors()
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            self._gathered = {}
            return self.build_bank()
        key = self.bank_key(params)
        if self._bank is None or self._bank[0] != key:
            with torch.no_grad():
                self._bank = (key, self.build_bank())
        return self._bank[1]

    def _adapter_tensors(self) -> list[torch.Tensor]:
        """Every held adapter's tensors, listed once per change of the held set (the bank's
        staleness check runs per call and must not walk ``named_parameters`` each time)."""
        if self._tensors is None:
            self._tensors = [p for name in self.held for _, p in self.adapter_parameters(name)]
        return self._tensors

    def bank_key(self, params: list[torch.Tensor]) -> tuple:
        """What the bank depends on: slots, held adapters, hyper-parameters, and the version
        counter of every adapter and base tensor (bumped by any in-place write: a load, an
        optimizer step, a merge); the first tensor's address and dtype catch a ``.to()``."""
        base = self.base_layer
        base_tensors = [t for t in (*base._parameters.values(), *base._buffers.values()) if t is not None]
        first = params[0] if params else None
        return (self.adapter_set.version, tuple(self.held), self.hyper_key(),
                tuple(t._version for t in params), tensor_versions(base_tensors),
                None if first is None else (first.data_ptr(), first.dtype))

    def hyper_key(self) -> tuple:
        """Per-adapter hyper-parameters that enter the bank (e.g. scalings); hashable values."""
        return ()

    def gathered(self, route: torch.Tensor, n: int, gather) -> tuple:
        """``gather(bank, rows)`` for this call's route fitted to ``n`` rows.

        Cached: the same route object (every decode step of one ``generate``) returns at once; a
        new route with the same slots in the same order (the next call of a server decoding the
        same batch) reuses the gathered tensors once the bank is found current. Not cached while
        adapter tensors need gradients.
        """
        hit = self._gathered.get(gather)
        if hit is not None and hit[0] is route and hit[1] == n:
            return hit[2]
        bank = self.bank()
        if hit is not None and hit[1] == n and hit[3] is bank and torch.equal(hit[0], route):
            self._gathered[gather] = (route, n, hit[2], bank)
            return hit[2]
        out = gather(bank, rows_for(route, n).to(_device_of(bank)))
        if not any(t.requires_grad for t in bank.values()):
            self._gathered[gather] = (route, n, out, bank)
        return out

    def extra_repr(self) -> str:
        return f"adapters={self.held}"


def _batched(value, n: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n


def _joined(outs: list, picks: list[torch.Tensor], n: int):
    """The outputs of row groups ``picks`` (of a batch of ``n``) as one output: tensors with a row
    per input row are scattered back; tuples, lists and dicts (model outputs) element by element;
    anything else (None, a per-call scalar) is the first group's."""
    first = outs[0]
    if isinstance(first, torch.Tensor) and first.dim() and first.shape[0] == len(picks[0]):
        result = first.new_empty((n, *first.shape[1:]))
        for out, pick in zip(outs, picks):
            result[pick] = out
        return result
    if isinstance(first, dict):
        joined = {k: _joined([o[k] for o in outs], picks, n) for k in first}
        return type(first)(**joined) if type(first) is not dict else joined
    if isinstance(first, (tuple, list)):
        joined = [_joined([o[i] for o in outs], picks, n) for i in range(len(first))]
        return type(first)(joined) if not hasattr(first, "_fields") else type(first)(*joined)
    return first


def _device_of(bank: dict[str, torch.Tensor]) -> torch.device:
    return next(iter(bank.values())).device


class ModulesToSaveWrapper(AdapterLayer):
    """A module trained in full: each adapter holds its own copy; the original stays intact.

    peft's name for the wrapped module is ``original_module``; files store the copy's weights
    under the module's own name (``...score.weight``). In a mixed batch each adapter's copy runs
    on its own rows (a full module has no stacked form; this is a head, once per model).
    """

    adapter_containers = ("modules_to_save",)

    def __init__(self, module: nn.Module, adapter_set: AdapterSet | None = None) -> None:
        super().__init__(module, adapter_set)
        self.modules_to_save = nn.ModuleDict()

    @property
    def original_module(self) -> nn.Module:
        return self.base_layer

    def __getattr__(self, name: str):
        """Attributes the wrapper lacks (``weight``, ``config``...) come from the copy the current
        route applies (the original when disabled or not held), as peft's wrapper does."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "modules_to_save", "adapter_set", "held") or "held" not in self.__dict__:
                raise
            route = self.adapter_set.route()
            return getattr(self._module_for(route if isinstance(route, str) and route in self.held else None), name)

    def add_adapter(self, name: str, config=None, module_name: str = "") -> None:
        self.modules_to_save[name] = copy.deepcopy(self.base_layer)
        self._register(name)

    def adapter_parameters(self, name: str):
        if name in self.modules_to_save:
            yield from self.modules_to_save[name].named_parameters()

    def _module_for(self, route) -> nn.Module:
        return self.modules_to_save[route] if isinstance(route, str) else self.base_layer

    def forward(self, *args, **kwargs):
        route = self.adapter_set.route()
        if route is None or isinstance(route, str):
            return self._module_for(route if route in self.held else None)(*args, **kwargs)
        # A mixed batch: each adapter's copy runs on its rows. The batch is the first tensor given
        # (positional or keyword); every argument with that many rows is split with it.
        x = next(v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.dim())
        n = x.shape[0]
        rows = rows_for(route, n).to(x.device)
        picks, outs = [], []
        for slot in rows.unique().tolist():
            name = next((k for k in self.held if self.adapter_set.slots[k] == slot), None)
            pick = (rows == slot).nonzero().squeeze(1)
            cut = [a[pick] if _batched(a, n) else a for a in args]
            outs.append(self._module_for(name)(*cut, **{k: v[pick] if _batched(v, n) else v for k, v in kwargs.items()}))
            picks.append(pick)
        return _joined(outs, picks, n)

    def unloaded(self, merged: list[str]) -> nn.Module:
        """The copy of the first merged adapter this module holds, else the original."""
        name = next((n for n in merged if n in self.held), None)
        return self.modules_to_save[name] if name is not None else self.base_layer

    def merge(self, names, safe_merge: bool = False) -> None:
        """A full copy has nothing to fold in; it replaces the original when unloading."""

    def check_merge(self, name: str) -> None:
        """Nothing is folded in, so nothing can turn non-finite."""

    def unmerge(self, names) -> None:
        """Nothing was folded in."""
