"""The one adapter set a model's wrapped layers share, and the per-call routing they read.

Names -> slots, configs, the active adapter, which adapters are merged, whether adapters are
disabled: one ``AdapterSet`` per ``PeftModel``, referred to by every wrapped layer, so nothing is
copied into layers and re-synced by walking the model.

A *route* says what the current call applies, and is what a layer's ``forward`` reads:

- ``None``: the base model (adapters disabled, or ``"__base__"`` for the whole batch);
- a name: that adapter on every row (the fast path: ``base(x) + s * B(A(x))``);
- a ``LongTensor`` of slots, one per row: a mixed batch; each layer gathers every row's factors
  from its bank (slot 0 is the base: zero delta).

The per-call route lives in a ``contextvars.ContextVar``, not on the set: two threads (or asyncio
tasks) calling the same model at once with different adapters each see their own route. Only the
call entry (``PeftModel.applying``) sets it, through ``AdapterSet.routed``; outside a call the
route is the active adapter.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, Sequence

import torch

BASE_NAME = "__base__"

# id(adapter set) -> its route, for the calls running in this thread / task. One variable for all
# sets (a ContextVar per instance could not be pickled or deep-copied with the model); the mapping
# is replaced, never mutated, so a copied context keeps what it saw.
_ROUTES: ContextVar[dict | None] = ContextVar("deltatune_routes", default=None)
_COUNT_LOCK = threading.Lock()  # guards ``AdapterSet.routed_calls`` (module level: sets stay picklable)


class MixingError(ValueError):
    """A mixed-adapter batch cannot run as asked (unknown name, merged adapter, a method that
    cannot mix); the message says which and why."""


class AdapterSet:
    """Adapter names, their slots and configs, and the state every wrapped layer reads.

    Attributes:
        slots: adapter name -> slot (>= 1; slot 0 is the base). A freed slot is reused.
        configs: adapter name -> its config.
        active: the active adapter's name (None when there is none).
        merged: names folded into the base weights, in merge order.
        disabled: True inside ``PeftModel.disable_adapter()``: every layer is the base.
        version: bumped whenever slots change, so per-layer banks know to rebuild.
    """

    def __init__(self) -> None:
        self.slots: dict[str, int] = {}
        self.configs: dict[str, object] = {}
        self.active: str | None = None
        self.merged: list[str] = []
        self.disabled = False
        self.version = 0
        self.routed_calls = 0           # routed calls running now, in any thread (see ``route``)

    # -- membership ----------------------------------------------------------------------------
    def add(self, name: str, config) -> int:
        """Register ``name`` with ``config``; returns its slot (the lowest free one)."""
        if name == BASE_NAME:
            raise ValueError(f"{BASE_NAME!r} is reserved for 'no adapter'; choose another adapter name")
        used = set(self.slots.values())
        slot = next(s for s in range(1, len(used) + 2) if s not in used)
        self.slots[name] = slot
        self.configs[name] = config
        self.version += 1
        return slot

    def remove(self, name: str) -> None:
        """Forget ``name`` (its slot becomes free)."""
        self.slots.pop(name, None)
        self.configs.pop(name, None)
        self.merged = [n for n in self.merged if n != name]
        if self.active == name:
            self.active = None
        self.version += 1

    @property
    def num_slots(self) -> int:
        """Rows a bank needs: the highest slot in use + 1 (slot 0 = base)."""
        return max(self.slots.values(), default=0) + 1

    def __contains__(self, name: str) -> bool:
        return name in self.slots

    # -- routing -------------------------------------------------------------------------------
    def route(self):
        """What the current call applies: None (base), an adapter name, or per-row slots (N,).

        The route of this thread's / task's innermost ``routed`` call, else the active adapter.
        The context variable is read only while some routed call runs: ``torch.compile`` cannot
        trace ``ContextVar.get`` (a graph break in every layer), and a training step, compiled
        or not, routes nothing (it applies the active adapter).
        """
        if self.disabled:
            return None
        if not self.routed_calls:
            return self.active
        routes = _ROUTES.get()
        if routes is not None and id(self) in routes:
            return routes[id(self)]
        return self.active

    @contextmanager
    def routed(self, route) -> Iterator[None]:
        """Run the body with ``route`` (from ``resolve``) as this context's route; the previous
        route comes back on exit. Other threads and tasks never see it."""
        routes = dict(_ROUTES.get() or {})
        routes[id(self)] = route
        token = _ROUTES.set(routes)
        with _COUNT_LOCK:
            self.routed_calls += 1
        try:
            yield
        finally:
            with _COUNT_LOCK:
                self.routed_calls -= 1
            _ROUTES.reset(token)

    @contextmanager
    def routing(self, adapter_names: Sequence[str] | None, device=None) -> Iterator[None]:
        """Route this call's rows: ``adapter_names[i]`` for row ``i`` (``"__base__"`` = no adapter);
        ``None`` keeps the current route. ``resolve`` + ``routed``; ``PeftModel.applying`` is the
        entry calls use (it also checks mixability, puts trained biases live and prepares inputs).

        Raises:
            MixingError: see ``resolve``.
        """
        if adapter_names is None:
            yield
            return
        with self.routed(self.resolve(list(adapter_names), device)):
            yield

    def resolve(self, names: Sequence[str], device=None):
        """The route for rows named ``names``: one name for every row gives that name (the
        single-adapter path; ``None`` for the base or while disabled), different names a
        ``LongTensor`` of slots (N,). Layers repeat per-row slots to fit inputs whose leading
        dimension is a multiple of the rows (beams, ``num_return_sequences``).

        Raises:
            MixingError: no names, an unknown name, or an adapter is merged into the base weights.
        """
        names = list(names)
        if not names:
            raise MixingError("adapter_names is empty; give one adapter name per row")
        unknown = sorted({n for n in names if n != BASE_NAME and n not in self.slots})
        if unknown:
            raise MixingError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)} "
                              f"(adapter_names has unknown adapter(s) {unknown}; loaded: "
                              f"{sorted(self.slots)} or {BASE_NAME!r} for no adapter)")
        if self.merged:
            raise MixingError("Cannot pass `adapter_names` when there are merged adapters, please call "
                              f"`unmerge_adapter` first (adapter(s) {self.merged} are merged into the base weights)")
        if self.disabled:
            return None
        if len(set(names)) == 1:
            return None if names[0] == BASE_NAME else names[0]
        return torch.tensor([0 if n == BASE_NAME else self.slots[n] for n in names],
                            dtype=torch.long, device=device)


def length_error(names: int, rows: int) -> MixingError:
    """``adapter_names`` of ``names`` entries for a batch of ``rows`` rows (peft's words first)."""
    return MixingError(f"Length of `adapter_names` should be the same as the number of inputs, but got {names} "
                       f"and {rows} respectively (adapter_names has {names} entries but the batch has {rows} rows; "
                       "give one name per row)")


def rows_for(slots: torch.Tensor, n: int) -> torch.Tensor:
    """Per-row ``slots`` (R,) fitted to an input with ``n`` leading rows.

    ``n`` must be a multiple of R: generation with beams or several sequences per prompt repeats
    each prompt's row consecutively, and a layer that sees tokens flattened to (R*T, d) has each
    row's tokens consecutive too, so both are ``repeat_interleave``.
    """
    R = slots.shape[0]
    if n == R:
        return slots
    if n % R:
        raise length_error(R, n)
    return slots.repeat_interleave(n // R)


_RUNS: tuple | None = None   # (slots, n, runs) of the last call: every layer of a forward asks alike


def row_runs(slots: torch.Tensor, n: int) -> list[tuple[int, int, int]]:
    """Per-row ``slots`` (R,) fitted to ``n`` rows (``rows_for``) as runs ``(start, end, slot)``
    of consecutive rows with one slot, in order (a mixed training pass keeps each task's rows
    together: one run per task). Cached for the last ``slots`` tensor, so the host copy happens
    once per forward call, not once per layer."""
    global _RUNS
    if _RUNS is not None and _RUNS[0] is slots and _RUNS[1] == n:
        return _RUNS[2]
    rows = rows_for(slots, n).tolist()
    runs, start = [], 0
    for i in range(1, n + 1):
        if i == n or rows[i] != rows[start]:
            runs.append((start, i, rows[start]))
            start = i
    _RUNS = (slots, n, runs)
    return runs
