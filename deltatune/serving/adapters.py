"""The engine's adapters: named, versioned, in three tiers (ready in the model, host memory, disk).

- *ready*: injected into the ``PeftModel`` (at most ``max_loras``); each layer's bank stacks them
  and a mixed batch gathers every row's factors from it.
- *cpu*: the tensors read from the adapter's file, kept in host memory (at most ``max_cpu_loras``);
  made ready in milliseconds on first use, evicting the least recently used ready adapter that
  no running sequence uses.
- *disk*: only the path; read again on first use.

A virtual-token adapter (prompt tuning, P-tuning, prefix tuning) is ready with its cache prefix
computed (``prefixes``; ``virtual_rows``), and the layers route its rows as the base.

A client's name maps to its current *version*; each version lives in the model under an internal
name the pool makes (``a1``, ``a2``, ...: a client string never becomes a module key, so any
printable name works, dots included), so ``add_adapter(name, path, replace=True)`` (vLLM's ``load_inplace``)
makes a new version while requests already submitted finish on the one they pinned: a request
never sees a mix. A replaced or removed version stays (in memory, never re-read from a file that
may have changed) until its last request ends, and so does the tensors of a version a queued
request pins. A version is one read of its files, config and tensors together: when an adapter
dropped to disk is read again and its files changed since (another stamp or config), that read is
a new version of the name (both new), never the new tensors under the old config. Not thread-safe: the engine calls it under its
locks (and model changes only between forward passes).
"""
from __future__ import annotations

import dataclasses
import itertools
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from deltatune.adapter_set import BASE_NAME
from deltatune.serving.errors import AdapterLoadError, UnknownModel
from deltatune.serving.virtual_rows import build_prefix, config_problem, route_name, virtual_length


@dataclass(frozen=True)
class AdapterInfo:
    """What ``Engine.adapters()`` lists: ``state`` is "ready", "cpu" or "disk"."""

    name: str
    path: str
    rank: int
    state: str
    version: int


@dataclass(eq=False)
class Version:
    """One loaded version of a named adapter."""

    name: str
    version: int
    path: str
    config: object
    tensors: dict | None          # host copy; None in the "disk" tier
    rank: int
    internal: str                 # the module key in the model, made by the pool ("a17")
    stamp: tuple = ()             # the files' (name, size, mtime) when read: a change is a new version
    virtual: int = 0              # virtual tokens before each prompt (``virtual_rows.virtual_length``)
    refs: int = 0                 # requests (waiting or running) pinned to this version
    retired: bool = False         # replaced or removed: goes away with its last request
    last_used: int = 0


MAX_NAME_CHARS = 256
NAME_RULE = (f"an adapter name is 1 to {MAX_NAME_CHARS} printable characters (no control characters such as "
             "newlines or tabs), without leading or trailing spaces, and not the base model's name")


def check_name(name, base_names=(BASE_NAME,)) -> None:
    """Raise AdapterLoadError (a BadRequest, param ``lora_name``) quoting ``NAME_RULE`` unless
    ``name`` follows it. Any other string is fine: the model never sees it."""
    ok = (isinstance(name, str) and 0 < len(name) <= MAX_NAME_CHARS and name.isprintable()
          and name == name.strip() and name not in base_names)
    if not ok:
        shown = name if not isinstance(name, str) or len(name) <= 80 else name[:80] + "..."
        raise AdapterLoadError(f"invalid adapter name {shown!r}: {NAME_RULE} ({', '.join(map(repr, base_names))})",
                               "lora_name")


def file_stamp(path) -> tuple:
    """``(file name, size, mtime_ns)`` of each file in the adapter directory ``path`` (empty if it
    cannot be listed): two reads with equal stamps read the same files."""
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
        return tuple((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in entries if e.is_file())
    except OSError:
        return ()


def adapter_rank(config) -> int:
    """Largest rank an adapter config asks for (``r`` and ``rank_pattern``); 0 for rank-free methods."""
    ranks = [getattr(config, "r", 0) or 0, *(getattr(config, "rank_pattern", None) or {}).values()]
    return max(int(r) for r in ranks)


def check_config(config, path, max_lora_rank: int, max_model_len: int | None = None) -> None:
    """Refuse a config the engine cannot serve: its method (``check_servable``), a rank above
    ``max_lora_rank``, or a virtual-token config the engine cannot run (``virtual_rows.config_problem``).
    Raises AdapterLoadError."""
    check_servable(config, path)
    problem = config_problem(config, Path(path) / "adapter_config.json", max_model_len)
    if problem:
        raise AdapterLoadError(problem, "lora_path")
    rank = adapter_rank(config)
    if rank > max_lora_rank:
        raise AdapterLoadError(f"{Path(path) / 'adapter_config.json'}: rank r={rank} is above max_lora_rank="
                               f"{max_lora_rank}; start the server with a larger --max-lora-rank", "lora_path")


def check_servable(config, path) -> None:
    """Refuse, at load time, an adapter whose method the engine cannot run (its declared
    ``servable`` capability), saying why. Raises AdapterLoadError."""
    from deltatune import registry

    method = registry.method_of(config)
    if not method.servable:
        raise AdapterLoadError(
            f"{Path(path) / 'adapter_config.json'}: peft_type {method.peft_type} cannot be served by the engine; "
            "run this adapter with PeftModel.generate instead", "lora_path")
    if getattr(config, "alora_invocation_tokens", None):  # the engine's packed rows have no per-row invocation
        raise AdapterLoadError(f"{Path(path) / 'adapter_config.json'}: an aLoRA adapter (alora_invocation_tokens) "
                               "cannot be served by the engine yet; run it with PeftModel.generate", "lora_path")


def read_version_files(path) -> tuple[object, dict]:
    """``(config, tensors)`` of an adapter directory, every problem as an ``AdapterLoadError``
    naming the file (missing directory, bad JSON, unknown method, corrupt weights, PiSSA)."""
    from deltatune.checkpoint.convert import require_plain_lora
    from deltatune.checkpoint.peft_format import read_adapter

    try:
        config, tensors = read_adapter(path)
        require_plain_lora(config, path)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:   # ConfigError/CheckpointError are ValueErrors
        raise AdapterLoadError(f"cannot load adapter from {os.fspath(path)!r}: {exc}", "lora_path") from None
    return dataclasses.replace(config, inference_mode=True), tensors


class AdapterPool:
    """Named adapter versions over one base model (see the module doc)."""

    def __init__(self, model, max_loras: int, max_cpu_loras: int, max_lora_rank: int,
                 max_model_len: int | None = None) -> None:
        self.model = model                 # the transformers model; wrapped in place by PeftModel
        self.peft = None                   # PeftModel, made with the first adapter
        self.max_loras, self.max_cpu_loras, self.max_lora_rank = max_loras, max_cpu_loras, max_lora_rank
        self.max_model_len = max_model_len
        self.prefixes: dict = {}           # internal name -> VirtualPrefix of each ready virtual-token adapter
        self.current: dict[str, Version] = {}
        self.versions: dict[str, Version] = {}              # internal name -> every live version
        self.ready: OrderedDict[str, Version] = OrderedDict()
        self._clock = 0
        self._next_version: dict[str, int] = {}
        self._internal_ids = itertools.count(1)
        # Counters (read by the replicas' reports): reads of adapter files (a new version, or a version
        # dropped to disk read again) and promotions from host memory to ready (no file read).
        self.file_reads = 0
        self.ready_swaps = 0

    # -- lookups -------------------------------------------------------------------------------
    def resolve(self, name: str) -> Version:
        """The current version of ``name``. Raises UnknownModel."""
        if not isinstance(name, str) or name not in self.current:
            raise UnknownModel(f"the model {name!r} does not exist (adapters: {sorted(self.current)})")
        return self.current[name]

    def state(self, v: Version) -> str:
        if v.internal in self.ready:
            return "ready"
        return "cpu" if v.tensors is not None else "disk"

    def infos(self) -> list:
        return [AdapterInfo(v.name, v.path, v.rank, self.state(v), v.version) for v in self.current.values()]

    # -- adding and removing -------------------------------------------------------------------
    def add(self, name: str, path, config, tensors, replace: bool, busy: set, stamp: tuple | None = None) -> Version:
        """Register ``name`` -> a new version from ``(config, tensors)`` read from ``path`` (whose
        ``file_stamp`` was ``stamp`` before the read; None: take it now), checked by injecting it
        into the model now (shapes, targets, mixability). Raises AdapterLoadError (a bad name:
        ``NAME_RULE``); on error nothing changed."""
        check_name(name)
        if name in self.current and not replace:
            raise AdapterLoadError(f"adapter {name!r} is already loaded; unload it first or reload it in place "
                                   "(load_inplace / replace=True)", "lora_name")
        check_config(config, path, self.max_lora_rank, self.max_model_len)
        number = self._next_version.get(name, 0) + 1
        v = Version(name, number, os.fspath(path), config, tensors, adapter_rank(config),
                    f"a{next(self._internal_ids)}", stamp if stamp is not None else file_stamp(path),
                    virtual_length(config))
        self._inject(v)
        self.file_reads += 1
        self._next_version[name] = number
        old = self.current.get(name)
        self.current[name] = v
        self.versions[v.internal] = v
        self.touch(v)
        if old is not None:
            old.retired = True
        self.collect()
        self._fit(busy | {v.internal})
        return v

    def remove(self, name: str) -> None:
        """Forget ``name``: its version retires (requests pinned to it finish first). Raises UnknownModel."""
        v = self.resolve(name)
        del self.current[name]
        v.retired = True
        self.collect()

    def collect(self) -> None:
        """Drop retired versions no request uses any more (out of the model and memory)."""
        for internal, v in list(self.versions.items()):
            if v.retired and v.refs == 0:
                if internal in self.ready:
                    self._eject(v)
                del self.versions[internal]

    # -- tiers ---------------------------------------------------------------------------------
    def touch(self, v: Version) -> None:
        self._clock += 1
        v.last_used = self._clock

    def make_ready(self, v: Version, busy: set) -> bool:
        """Put ``v`` in the model, evicting the least recently used ready version not in ``busy``
        (internal names of versions running sequences use). False when every ready slot is busy.
        Raises AdapterLoadError when its file cannot be read or no longer fits."""
        self.touch(v)
        if v.internal in self.ready:
            self.ready.move_to_end(v.internal)
            return True
        if len(self.ready) >= self.max_loras and not self._evict_one(busy):
            return False
        from_disk = v.tensors is None
        if from_disk:
            self._reread(v)
        self._inject(v)
        if from_disk:
            self.file_reads += 1
        else:
            self.ready_swaps += 1
        self._fit(busy | {v.internal})
        return True

    def _reread(self, v: Version) -> None:
        """Read ``v``'s files again (it was dropped to disk: no request runs on it). Unchanged files
        give its tensors back; changed ones make ``v`` the name's next version, config and tensors
        both from this read, under a new internal name, so no layer or route of the old one is
        reused. Raises AdapterLoadError (the files are gone, broken or no longer fit)."""
        stamp = file_stamp(v.path)
        config, tensors = read_version_files(v.path)
        if stamp == v.stamp and config == v.config:
            v.tensors = tensors
            return
        check_config(config, v.path, self.max_lora_rank, self.max_model_len)
        del self.versions[v.internal]
        number = self._next_version[v.name] + 1
        self._next_version[v.name] = number
        v.version, v.config, v.tensors, v.rank, v.stamp = number, config, tensors, adapter_rank(config), stamp
        v.virtual = virtual_length(config)
        v.internal = f"a{next(self._internal_ids)}"
        self.versions[v.internal] = v

    def _evict_one(self, busy: set) -> bool:
        idle = [v for v in self.ready.values() if v.internal not in busy]
        if not idle:
            return False
        self._eject(min(idle, key=lambda v: v.last_used))
        return True

    def _fit(self, busy: set) -> None:
        """Keep the tiers within ``max_loras`` ready and ``max_cpu_loras`` in host memory."""
        while len(self.ready) > self.max_loras and self._evict_one(busy):
            pass
        # A version a queued request pins keeps its tensors: a file changed meanwhile must not reach it.
        held = [v for v in self.versions.values()
                if v.internal not in self.ready and v.tensors is not None and not v.retired and v.refs == 0]
        for v in sorted(held, key=lambda v: v.last_used)[:max(0, len(held) - self.max_cpu_loras)]:
            v.tensors = None

    # -- the model -----------------------------------------------------------------------------
    def _inject(self, v: Version) -> None:
        """Add ``v`` to the model and copy its tensors in; checks that the whole model can mix it.
        On error the model is as before and AdapterLoadError says why."""
        from deltatune.peft_model import PeftModel

        where = f"adapter {v.name!r} ({v.path})"
        try:
            if self.peft is None:
                self.peft = PeftModel(self.model, v.config, v.internal)
            else:
                self.peft.add_adapter(v.internal, v.config)
        except (ValueError, NotImplementedError, TypeError) as exc:
            raise AdapterLoadError(f"{where} cannot be applied to this model: {exc}", "lora_path") from None
        try:
            self.peft._load_weights(v.internal, v.tensors, v.path)
            prefix = build_prefix(self.peft, v.internal)
            if prefix is None:  # a virtual-token row is a base row to the layers (``virtual_rows``)
                self._check_mixable(v)
        except (ValueError, AdapterLoadError) as exc:
            self.peft.delete_adapter(v.internal)
            if isinstance(exc, AdapterLoadError):
                raise
            raise AdapterLoadError(f"{where} cannot be applied to this model: {exc}", "lora_path") from None
        self.peft.eval()
        if prefix is not None:
            self.prefixes[v.internal] = prefix
        self.ready[v.internal] = v

    def route_name(self, internal: str) -> str:
        """The name the layers route a row of adapter ``internal`` by (the base for virtual tokens)."""
        return route_name(internal, self.prefixes)

    def _check_mixable(self, v: Version) -> None:
        """The call entry's one mixing rule (``peft_model.mixing_problem``): every served adapter
        shares batches with the others."""
        from deltatune.peft_model import mixing_problem

        problem = mixing_problem(self.peft, v.internal)
        if problem is not None:
            raise AdapterLoadError(f"adapter {v.name!r} ({v.path}) cannot be served beside others: {problem}",
                                   "lora_path")

    def _eject(self, v: Version) -> None:
        self.prefixes.pop(v.internal, None)
        self.peft.delete_adapter(v.internal)
        del self.ready[v.internal]
