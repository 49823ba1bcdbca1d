"""Trained biases, per adapter.

peft shares one set of biases among all adapters (so a disabled or switched adapter still carries
another's trained biases). Here each adapter that trains biases (``bias="all"`` / ``"lora_only"``)
keeps its own values, and the live bias parameters (the tensors peft's keys name, which the
optimizer updates) hold the values of the adapters applied now: the base's values plus each
applied adapter's change (the active one and any merged ones; the base's own when disabled).

What happens to the live values between two changes of the applied set (an optimizer step, a
load) is written back on every change, and before the values are read for saving: the change
of each bias is the active adapter's when it trains that bias (the one being trained), else
the last applied adapter's that does, else the base's. So a step taken while another adapter is
merged is kept in the active adapter's own biases.

Biases are model state, not per-call state: threads calling with different adapters that train
biases would overwrite each other's (mixed batches refuse such adapters for that reason).
"""
from __future__ import annotations

import torch
from torch import nn

from deltatune.adapter_set import AdapterSet
from deltatune.methods.base import AdapterLayer


class BiasBook:
    """Each adapter's own bias values, and which adapters' values are live.

    Bias parameters are named canonically (their module's path + ``.bias``, as if unwrapped),
    since another adapter may wrap the module later; ``live_name`` gives the current name.
    """

    def __init__(self, model: nn.Module, adapter_set: AdapterSet) -> None:
        self.model, self.adapter_set = model, adapter_set
        self.original: dict[str, torch.Tensor] = {}        # param -> the base's values
        self.params: dict[str, list[str]] = {}             # adapter -> params it trains
        self.store: dict[str, dict[str, torch.Tensor]] = {}  # adapter -> its own values
        self.live: tuple[str, ...] = ()                    # adapters whose values are live
        self.written: dict[str, torch.Tensor] = {}         # param -> the values last put live

    # -- names ---------------------------------------------------------------------------------
    def live_name(self, canonical: str) -> str:
        """The current name of the bias ``canonical``: under ``base_layer`` while an adapter layer
        wraps its module (the saved key follows the current structure, as peft's does)."""
        module_path, _, leaf = canonical.rpartition(".")
        module = self.model.get_submodule(module_path) if module_path else self.model
        while isinstance(module, AdapterLayer):  # one level per wrapper (nested ParamWrappers: several)
            module_path, module = f"{module_path}.base_layer", module.base_layer
        return f"{module_path}.{leaf}" if module_path else leaf

    def param(self, canonical: str) -> nn.Parameter:
        return self.model.get_parameter(self.live_name(canonical))

    # -- membership ----------------------------------------------------------------------------
    def register(self, adapter: str, canonical: list[str]) -> None:
        """Adapter ``adapter`` trains biases ``canonical``, starting from the base's values."""
        if not canonical:
            return
        for pname in canonical:
            if pname not in self.original:
                value = self.param(pname).detach().clone()
                self.original[pname], self.written[pname] = value, value.clone()
        self.params[adapter] = list(canonical)
        self.store[adapter] = {p: self.original[p].clone() for p in canonical}

    def forget(self, adapter: str) -> None:
        """Take ``adapter``'s biases out of the live values and drop them."""
        if adapter in self.live:
            self.apply(tuple(n for n in self.live if n != adapter))
        self.params.pop(adapter, None)
        self.store.pop(adapter, None)
        still = {p for names in self.params.values() for p in names}
        self.original = {p: v for p, v in self.original.items() if p in still}
        self.written = {p: v for p, v in self.written.items() if p in still}

    def trains(self, adapter: str) -> bool:
        return bool(self.params.get(adapter))

    def live_parameters(self, adapter: str) -> list[nn.Parameter]:
        """The live bias parameters adapter ``adapter`` trains (to unfreeze when it is active)."""
        return [self.param(p) for p in self.params.get(adapter, [])]

    # -- live values ---------------------------------------------------------------------------
    def apply(self, applied, force: bool = False) -> None:
        """Make the live values those of adapters ``applied`` (in order; those without biases are
        skipped), after writing back what changed them since the last change. ``force``: recompute
        even if the set is the same (after a load into the stored values)."""
        owners = tuple(n for n in dict.fromkeys(applied) if self.params.get(n))
        if owners == self.live and not force:
            return
        self.write_back()
        with torch.no_grad():
            for pname, original in self.original.items():
                value = original.clone()
                for n in owners:
                    if pname in self.store[n]:
                        value += self.store[n][pname] - original
                self.param(pname).copy_(value)
                self.written[pname] = value
        self.live = owners

    def write_back(self) -> None:
        """Give each live bias's change since it was last set to the adapter training it (see the
        module doc); afterwards the stored values are current."""
        with torch.no_grad():
            for pname, before in self.written.items():
                now = self.param(pname).detach()
                if hasattr(now, "to_local"):  # sharded by FSDP: frozen (trained tensors stay whole)
                    continue
                now = now.to(device=before.device, dtype=before.dtype)
                if torch.equal(now, before):
                    continue
                owner = self._owner(pname)
                target = self.store[owner][pname] if owner is not None else self.original[pname]
                target += now.to(target.dtype) - before
                self.written[pname] = now.clone()

    def _owner(self, pname: str) -> str | None:
        owners = [n for n in self.live if pname in self.store[n]]
        if self.adapter_set.active in owners:
            return self.adapter_set.active
        return owners[-1] if owners else None

    def tensor(self, adapter: str, pname: str) -> torch.Tensor:
        """Adapter ``adapter``'s value of bias ``pname``, current after ``write_back``: the live
        parameter itself when only its values are live (loading then copies into it), else its
        stored values."""
        if self.live == (adapter,):
            return self.param(pname)
        return self.store[adapter][pname]

    def unload(self, merged: list[str]) -> None:
        """Leave the values of adapters ``merged`` live for good and stop keeping books."""
        self.apply(merged)
        self.original, self.written, self.live = {}, {}, ()
