"""What runs inside the Ray cluster for ``deltatune serve --replicas N``: one :class:`EngineReplica` per
Serve replica (one :class:`~deltatune.serving.Engine` each) and the :class:`AdapterBoard`, a small
actor through which the entry point's adapter changes reach every replica and the replicas report
what they hold.

Routing by adapter is Ray Serve's model multiplexing: the entry point sends a request for adapter
``x`` with ``multiplexed_model_id="x"``; Serve's router prefers a replica that reported ``x`` loaded.
Inside a replica, ``serve.multiplexed(max_num_models_per_replica=adapters_per_replica(...))`` keeps
the LRU of adapter *tokens*: a miss reads the adapter's files into the engine (``Engine.add_adapter``),
an eviction unloads it (``Engine.remove_adapter``; requests already running on it finish on their
version). The LRU is as large as what the engine keeps in memory, its two tiers together: ``max_loras``
ready (injected, what a batch can use) plus ``max_cpu_loras`` in host memory (made ready in
milliseconds, no file read). Sizing it by ``max_loras`` alone would unload, and later read again from
disk, adapters the engine could have kept. The :class:`Residency` is this replica's truth about which
version of which adapter its engine holds.

Versions: each request carries ``(name, path, version)`` from the entry point's catalog; a replica
holding an older version reloads in place first (``replace=True``: requests already submitted keep
theirs). The board also pushes every load, reload and unload to the replicas that hold the name
within a poll period (``POLL_S``), so an unloaded adapter leaves every replica's memory.

Nothing here is imported unless replicas are asked for (Ray is an optional extra).
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import Counter

from deltatune.serving.errors import ServingError

log = logging.getLogger(__name__)
POLL_S = 0.2          # how often a replica syncs with the board (adapter changes in, its report out)


def adapters_per_replica(engine_kwargs: dict) -> int:
    """Adapters one replica keeps loaded: its engine's ready tier plus its host-memory tier
    (``max_loras + max_cpu_loras``, with ``Engine``'s defaults 8 and 64)."""
    return int(engine_kwargs.get("max_loras", 8)) + int(engine_kwargs.get("max_cpu_loras", 64))


class AdapterBoard:
    """The adapter changes the entry point made (a numbered log) and each replica's last report.

    A plain Ray actor (``ray.remote(num_cpus=0)``) owned by the entry point's process."""

    def __init__(self) -> None:
        self.changes: list[tuple[int, str, str | None, int | None]] = []  # (seq, name, path, version | None)
        self.reports: dict[str, dict] = {}

    def publish(self, name: str, path: str | None, version: int | None) -> int:
        """Record that ``name`` is now ``version`` at ``path`` (None, None: unloaded); its sequence number."""
        seq = len(self.changes) + 1
        self.changes.append((seq, name, path, version))
        return seq

    def sync(self, report: dict, seen: int) -> list:
        """A replica's heartbeat: store its ``report`` (time-stamped) and hand it the changes after ``seen``."""
        self.reports[report["replica"]] = {**report, "time": time.time()}
        return self.changes[seen:]

    def get_reports(self) -> dict:
        """Every replica's last report (``time``: when it arrived; dead replicas stop reporting)."""
        return dict(self.reports)


class _Token:
    """What Serve's multiplexed LRU holds for one adapter: its eviction (``__del__``, which Serve calls
    when it drops the entry, and the garbage collector calls again later) unloads it from the engine."""

    def __init__(self, residency: "Residency", name: str) -> None:
        self.residency, self.name = residency, name

    def __del__(self) -> None:
        try:
            self.residency.evict(self)
        except Exception:  # noqa: BLE001 — called from Serve's executor or the GC: log, never raise
            log.exception("unloading adapter %r failed", self.name)


class Residency:
    """Which version of which adapter this replica's engine holds, and how many loads that took.

    ``held``: name -> ``(path, catalog version)`` in the engine; ``tokens``: name -> the token Serve's LRU holds;
    ``specs``: name -> the newest ``(path, version)`` a request or the board asked for. Every change
    to the engine's adapters happens under ``lock`` (in worker threads, never on the event loop)."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.lock = threading.RLock()
        self.held: dict[str, tuple[str, int]] = {}
        self.tokens: dict[str, _Token] = {}
        self.specs: dict[str, tuple[str, int]] = {}
        self.loads: Counter = Counter()      # file reads into the engine: a first load or one after eviction
        self.reloads: Counter = Counter()    # new versions of an adapter already held
        self.load_seconds = 0.0              # wall time of all loads and reloads (the benchmark's load cost)

    def want(self, name: str, path: str, version: int) -> None:
        """Remember the newest version a request asked for (loaded by ``on_miss`` or ``submit``)."""
        with self.lock:
            if name not in self.specs or self.specs[name][1] <= version:
                self.specs[name] = (path, version)

    def on_miss(self, name: str) -> _Token:
        """Serve's multiplexed loader: load ``name`` into the engine; the token Serve will keep."""
        with self.lock:
            self._sync(name)
            token = self.tokens[name] = _Token(self, name)
            return token

    def ready(self, name: str) -> bool:
        """Bring ``name`` to its wanted version (reloaded in place if older); False when Serve's LRU
        evicted it meanwhile (the caller asks Serve for it again)."""
        with self.lock:
            if name not in self.tokens:
                return False
            self._sync(name)
            return True

    def submit(self, name: str, prompt, sampling):
        """``ready(name)``, then submit a request for it under the same lock (so no eviction comes
        between); None when it was not ready."""
        with self.lock:
            return self.engine.submit(prompt, adapter=name, sampling=sampling) if self.ready(name) else None

    def evict(self, token: _Token) -> None:
        """Serve dropped ``token`` from its LRU: unload its adapter (a stale token does nothing)."""
        with self.lock:
            if self.tokens.get(token.name) is not token:
                return
            del self.tokens[token.name]
            self._drop(token.name)

    def apply(self, name: str, path: str | None, version: int | None) -> None:
        """A change from the board: unload ``name`` (version None), or reload it if this replica
        holds an older version. Adapters this replica does not hold are left for first use."""
        with self.lock:
            if version is None:
                self.specs.pop(name, None)
                self._drop(name)
                return
            self.want(name, path, version)
            if name in self.held and self.held[name][1] < version:
                self._sync(name)

    def _sync(self, name: str) -> None:
        if name not in self.specs:
            raise ServingError(f"adapter {name!r} was unloaded while this request waited for it", "model")
        path, version = self.specs[name]
        have = self.held.get(name)
        if have is not None and have[1] >= version:
            return
        started = time.perf_counter()
        try:
            self.engine.add_adapter(name, path, replace=have is not None)
        except ServingError:  # this version cannot be served: forget it, keep what is held
            if have is not None:
                self.specs[name] = have
            else:
                self.specs.pop(name, None)
            raise
        self.load_seconds += time.perf_counter() - started
        self.held[name] = (path, version)
        (self.loads if have is None else self.reloads)[name] += 1

    def _drop(self, name: str) -> None:
        if self.held.pop(name, None) is not None:
            self.engine.remove_adapter(name)

    def report(self) -> dict:
        pool = getattr(self.engine, "pool", None)
        with self.lock:
            return {"resident": {name: v for name, (_, v) in self.held.items()}, "loads": dict(self.loads),
                    "reloads": dict(self.reloads), "load_seconds": self.load_seconds,
                    # the engine's own tiers: every read of an adapter's files, and host -> ready promotions
                    "file_reads": getattr(pool, "file_reads", 0), "ready_swaps": getattr(pool, "ready_swaps", 0)}


def wire_error(exc: ServingError) -> tuple[str, str, str | None]:
    """A serving error as plain data (class name, message, param): the classes' own constructors
    (``PromptTooLong(tokens, max_len)``) do not survive pickling through Ray."""
    return type(exc).__name__, exc.message, exc.param


class EngineReplica:
    """One Serve replica: an Engine over ``base`` with ``engine_kwargs``, ``threads`` torch threads.

    ``generate`` is a streaming method: it yields ``("accepted", prompt_tokens)``, then
    ``("delta", StreamDelta)`` items, then ``("done", RequestOutput)``; or ``("error", wire_error)``.
    """

    def __init__(self, base, engine_kwargs: dict, threads: int, board) -> None:
        import torch
        from ray import serve

        from deltatune.serving.engine import Engine

        torch.set_num_threads(threads)
        self.engine = Engine(base, **engine_kwargs)
        self.engine.start()
        self.residency = Residency(self.engine)
        self.threads, self.board = threads, board
        self.replica_id = serve.get_replica_context().replica_id.unique_id

        async def load(name: str) -> _Token:
            return await asyncio.to_thread(self.residency.on_miss, name)

        # Applied here, not on the class: the LRU holds what the engine's two tiers hold (module text).
        self._adapter = serve.multiplexed(max_num_models_per_replica=adapters_per_replica(engine_kwargs))(load)
        self._seen = 0
        threading.Thread(target=self._heartbeat, name="deltatune-board", daemon=True).start()

    def describe(self) -> dict:
        """What the entry point needs to stand in for an engine."""
        e = self.engine
        return {"base_name": e.base_name, "max_model_len": e.max_model_len, "max_num_seqs": e.max_num_seqs,
                "max_lora_rank": e.pool.max_lora_rank}

    async def prepare(self, spec: tuple[str, str, int]) -> tuple | None:
        """Load ``spec`` = (name, path, version) here (the entry point's check of a new adapter or
        version on a real engine); None, or ``wire_error`` of why it cannot be served."""
        try:
            handle = await self._submit_when_held(spec, None, None)
        except ServingError as exc:
            return wire_error(exc)
        assert handle is None
        return None

    async def generate(self, prompt, spec: tuple[str, str, int] | None, sampling):
        """Run one request (``spec``: the adapter, None for the base) and stream its items."""
        handle = None
        try:
            try:
                handle = await self._submit_when_held(spec, prompt, sampling)
            except ServingError as exc:
                yield "error", wire_error(exc)
                return
            yield "accepted", handle.prompt_tokens
            try:
                async for delta in handle:
                    yield "delta", delta
                yield "done", handle.result(timeout=0)
            except ServingError as exc:
                yield "error", wire_error(exc)
        finally:  # the entry point cancelled (its client went away) or the stream ended: free the slot
            if handle is not None and not handle.finished:
                handle.abort()

    async def _submit_when_held(self, spec, prompt, sampling):
        """Make ``spec``'s adapter resident (through Serve's LRU), then submit ``prompt`` if given."""
        if spec is None:
            return await asyncio.to_thread(self.engine.submit, prompt, None, sampling)
        name, path, version = spec
        for _ in range(4):
            self.residency.want(name, path, version)
            await self._adapter(name)       # Serve's LRU: a miss loads (Residency.on_miss), evicting its oldest
            if prompt is None:
                if await asyncio.to_thread(self.residency.ready, name):
                    return None
                continue
            handle = await asyncio.to_thread(self.residency.submit, name, prompt, sampling)
            if handle is not None:
                return handle
        raise ServingError(f"adapter {name!r} was evicted from replica {self.replica_id} before its request "
                           "could start, four times: more adapters are in use at once than "
                           "--max-loras + --max-cpu-loras hold")

    def _heartbeat(self) -> None:
        """Sync with the board every ``POLL_S``: report, then apply the adapter changes since the last sync."""
        import ray

        while True:
            try:
                report = {"replica": self.replica_id, "pid": os.getpid(), "threads": self.threads,
                          "seen": self._seen, "stats": self.engine.stats(), **self.residency.report()}
                for seq, name, path, version in ray.get(self.board.sync.remote(report, self._seen), timeout=10):
                    try:
                        self.residency.apply(name, path, version)
                    except ServingError as exc:  # a reload whose files broke: drop it; next use reports why
                        log.warning("replica %s: adapter %r change failed: %s", self.replica_id, name, exc.message)
                        self.residency.apply(name, None, None)
                    self._seen = seq
            except Exception:  # noqa: BLE001 — the board is gone (the entry point stopped) or slow: retry
                log.exception("replica %s: board sync failed", self.replica_id)
            time.sleep(POLL_S)
