"""``deltatune serve --replicas N``: the same HTTP server, its requests served by N engines on Ray Serve.

The entry point is the single-process server's FastAPI app (``server.create_app``) unchanged: tenant
keys, limits, the OpenAI API and the playground apply there, before anything is forwarded. What it
is handed instead of an :class:`~deltatune.serving.Engine` is a :class:`ReplicaEngine`, which keeps
the adapter catalog (names, paths, versions) and sends each request to a Ray Serve deployment of
:class:`~deltatune.serving.replicas_worker.EngineReplica` (one engine each) through a deployment
handle, with the adapter's name as Serve's ``multiplexed_model_id``: the deployment's request router
(:class:`~deltatune.serving.replicas_router.AdapterAffinityRouter`) sends it to a replica that holds
it, and each replica keeps an LRU of ``max_loras + max_cpu_loras`` adapters (Serve's multiplexing
over the engine's ready and host-memory tiers).

Requests come back as the same :class:`~deltatune.serving.RequestHandle` the engine gives, fed by a
thread that reads the replica's stream. A replica that dies before sending a token is retried once on
another; after that its requests fail with :class:`ReplicaUnavailable` (HTTP 503, retry).

Ray is imported only here and in ``replicas_worker``, and only when replicas are asked for.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass

from deltatune.adapter_set import BASE_NAME
from deltatune.serving import errors
from deltatune.serving.adapters import AdapterInfo, adapter_rank, check_config, check_name, read_version_files
from deltatune.serving.errors import AdapterLoadError, QueueFull, ServingError, UnknownModel
from deltatune.serving.outputs import RequestHandle
from deltatune.serving.replicas_metrics import aggregate, render_replicas

FRESH_S = 3.0          # a replica whose last report is older is not counted as live
APP = "deltatune"


class ReplicaUnavailable(QueueFull):
    """The replica running a request stopped (its process died) and the request could not be moved.
    A QueueFull, so the HTTP layer answers 503: retry, new requests go to the living replicas."""


def unwire(error: tuple) -> ServingError:
    """The serving error a replica sent as ``(class name, message, param)`` (``replicas_worker.wire_error``)."""
    name, message, param = error
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, ServingError)):
        cls = ServingError
    exc = cls.__new__(cls)
    ServingError.__init__(exc, message, param)
    return exc


@dataclass(frozen=True)
class Entry:
    """One adapter of the catalog: where its files are, its rank, and the catalog's version of it."""

    path: str
    rank: int
    version: int


class ReplicaEngine:
    """Stands in for an Engine in ``server.create_app``: the catalog here, the engines on the replicas.

    Args:
        handle: the deployment handle of the ``EngineReplica`` deployment.
        board: the ``AdapterBoard`` actor handle.
        tokenizer: the base's tokenizer (chat templates are applied here, as in one process).
        info: ``EngineReplica.describe()`` of one replica.
        affine: route by adapter (Serve's multiplexing, the default); False sends each request to any
            replica (Serve's default power-of-two choices), for the benchmark's comparison.
        on_shutdown: called by ``shutdown()`` (the launcher deletes the Serve app, the cluster it started).
    """

    def __init__(self, handle, board, tokenizer, info: dict, *, affine: bool = True, on_shutdown=None) -> None:
        self.handle, self.board, self.tokenizer, self.affine = handle, board, tokenizer, affine
        self.base_name, self.max_model_len = info["base_name"], info["max_model_len"]
        self.max_num_seqs, self.max_lora_rank = info["max_num_seqs"], info["max_lora_rank"]
        self.max_queued = info.get("max_queued")
        self._catalog: dict[str, Entry] = {}
        self._versions: dict[str, int] = {}
        self._lock = threading.RLock()        # the catalog (held briefly)
        self._changes = threading.Lock()      # one adapter change at a time (held across a replica's load)
        self._on_shutdown = on_shutdown
        self._reports: tuple[float, list] = (0.0, [])   # (monotonic time, live reports): /v1/models reads it often

    # -- adapters ------------------------------------------------------------------------------
    def register(self, name: str, path) -> AdapterInfo:
        """Add ``name`` to the catalog after checking its files here (config, tensors, rank); it is
        loaded into a replica on first use. What ``--adapter`` and ``--adapters-dir`` do at start."""
        config = self._check(name, path)
        with self._lock:
            return self._commit(name, os.fspath(path), config)

    def _check(self, name: str, path):
        """``name`` and the adapter files at ``path`` checked here, as an engine checks them; their config.
        Raises AdapterLoadError."""
        check_name(name, (self.base_name, BASE_NAME))
        config, _ = read_version_files(path)
        check_config(config, path, self.max_lora_rank, self.max_model_len)
        return config

    def add_adapter(self, name: str, path, *, replace: bool = False) -> AdapterInfo:
        """Load (or, ``replace=True``, reload) ``name`` from ``path``: checked here, then loaded on a
        replica (the one holding ``name``, if any) before it enters the catalog, then pushed to every
        other replica holding it. A request already running keeps the version it started with.

        Raises AdapterLoadError (why it cannot be served) or what ``Engine.add_adapter`` raises."""
        config = self._check(name, path)
        with self._changes:
            with self._lock:
                if name in self._catalog and not replace:
                    raise AdapterLoadError(f"adapter {name!r} is already loaded; unload it first or reload it in "
                                           "place (load_inplace / replace=True)", "lora_name")
                version = self._versions.get(name, 0) + 1
            options = {"multiplexed_model_id": name} if self.affine else {}
            failed = self.handle.options(**options).prepare.remote((name, os.fspath(path), version)).result()
            if failed is not None:
                raise unwire(failed)
            with self._lock:
                info = self._commit(name, os.fspath(path), config)
            self._publish(name, os.fspath(path), info.version)
        return info

    def _commit(self, name: str, path: str, config) -> AdapterInfo:
        version = self._versions.get(name, 0) + 1
        self._versions[name] = version
        entry = self._catalog[name] = Entry(path, adapter_rank(config), version)
        return AdapterInfo(name, path, entry.rank, "disk", version)

    def remove_adapter(self, name: str) -> None:
        """Unload ``name`` everywhere; requests already running on it finish. Raises UnknownModel."""
        with self._changes:
            with self._lock:
                if name not in self._catalog:
                    raise UnknownModel(f"the model {name!r} does not exist (adapters: {sorted(self._catalog)})")
                del self._catalog[name]
            self._publish(name, None, None)

    def _publish(self, name: str, path: str | None, version: int | None, wait_s: float = 5.0) -> None:
        """Tell the board, then wait (at most ``wait_s``) until every live replica has applied it."""
        import ray

        seq = ray.get(self.board.publish.remote(name, path, version))
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if all(r["seen"] >= seq for r in self.replica_reports()):
                return
            time.sleep(0.05)

    def adapters(self) -> list[AdapterInfo]:
        """The catalog; ``state`` is "ready" where some replica holds the adapter, else "disk"."""
        resident = set()
        for report in self._cached_reports():
            resident.update(report["resident"])
        with self._lock:
            return [AdapterInfo(name, e.path, e.rank, "ready" if name in resident else "disk", e.version)
                    for name, e in self._catalog.items()]

    # -- requests ------------------------------------------------------------------------------
    def submit(self, prompt, adapter: str | None = None, sampling=None, request_id: str | None = None):
        """Send one request to a replica; return its handle once the replica accepted it (so bad
        requests raise here, as ``Engine.submit`` does). Blocks: call it off the event loop."""
        spec = None
        if adapter is not None and adapter not in (self.base_name, BASE_NAME):
            with self._lock:
                entry = self._catalog.get(adapter)
            if entry is None:
                raise UnknownModel(f"the model {adapter!r} does not exist")
            spec = (adapter, entry.path, entry.version)
        return RemoteRequest(self, prompt, spec, sampling, request_id).start()

    # -- figures -------------------------------------------------------------------------------
    def replica_reports(self) -> list[dict]:
        """The live replicas' last reports (``replicas_worker.Residency.report`` plus engine stats)."""
        import ray

        reports = ray.get(self.board.get_reports.remote(), timeout=10)
        now = time.time()
        live = [r for r in reports.values() if now - r["time"] < FRESH_S]
        self._reports = (time.monotonic(), live)
        return live

    def _cached_reports(self) -> list[dict]:
        when, live = self._reports
        return live if time.monotonic() - when < 0.5 else self.replica_reports()

    def stats(self) -> dict:
        """The engines' counters summed over the live replicas (the keys of ``Engine.stats()``)."""
        return aggregate(self.replica_reports())

    def metrics_lines(self) -> list[str]:
        """Per-replica lines for ``/metrics``: adapter residency, loads and the engines' counters."""
        return render_replicas(self._cached_reports())

    # -- the server's lifespan -----------------------------------------------------------------
    def start(self) -> None:
        """Nothing to start: the replicas run from launch on."""

    def shutdown(self) -> None:
        """Delete the Serve application (and the local cluster the launcher started)."""
        if self._on_shutdown is not None:
            self._on_shutdown()
            self._on_shutdown = None


class RemoteRequest:
    """One request on a replica, read back into a local ``RequestHandle`` by a thread."""

    def __init__(self, engine: ReplicaEngine, prompt, spec, sampling, request_id: str | None) -> None:
        self.engine, self.prompt, self.spec, self.sampling = engine, prompt, spec, sampling
        self.id = request_id or f"req-{uuid.uuid4().hex[:12]}"
        self.gen = None
        self.out: RequestHandle | None = None
        self.cancelled = False

    def _open(self):
        """Send the request (retried once on another replica if this one dies); the replica's first item."""
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError

        for attempt in (1, 2):
            options = {"stream": True}
            if self.spec is not None and self.engine.affine:
                options["multiplexed_model_id"] = self.spec[0]
            self.gen = self.engine.handle.options(**options).generate.remote(self.prompt, self.spec, self.sampling)
            try:
                return next(self.gen)
            except BackPressureError:
                raise QueueFull(f"every replica is busy and {self.engine.max_queued} requests wait already; "
                                "retry later") from None
            except RayActorError as exc:
                if attempt == 2:
                    raise ReplicaUnavailable(f"no replica could take request {self.id}: {_short(exc)}") from None
        raise AssertionError("unreachable")

    def start(self) -> RequestHandle:
        kind, value = self._open()
        if kind == "error":
            raise unwire(value)
        self.out = RequestHandle(self.id, value, self.abort)
        threading.Thread(target=self._pump, name=f"deltatune-{self.id}", daemon=True).start()
        return self.out

    def abort(self) -> None:
        """The client went away: cancel the replica's stream (it aborts the engine request)."""
        self.cancelled = True
        if self.gen is not None:
            self.gen.cancel()

    def _pump(self) -> None:
        from ray.exceptions import RayActorError

        delivered = retried = False
        while True:
            try:
                for kind, value in self.gen:
                    if kind == "delta":
                        self.out._push([value])
                        delivered = True
                    elif kind == "done":
                        self.out._push([], output=value)
                        return
                    elif kind == "error":
                        self.out._push([], error=unwire(value))
                        return
                self.out._push([], error=ServingError(f"request {self.id}: the replica ended its stream early"))
                return
            except RayActorError as exc:
                if self.cancelled:
                    return self.out._push([], error=ServingError(f"request {self.id} was aborted"))
                if delivered or retried:
                    return self.out._push([], error=ReplicaUnavailable(
                        f"the replica running request {self.id} stopped after it had sent part of the answer "
                        f"({_short(exc)}); retry the request: new requests go to the living replicas"))
                retried = True
                try:  # nothing was sent yet: run it again, on another replica
                    kind, value = self._open()
                except ServingError as again:
                    return self.out._push([], error=again)
                if kind == "error":
                    return self.out._push([], error=unwire(value))
            except Exception as exc:  # noqa: BLE001 — cancelled, or Ray failed: end the handle, say why
                message = "was aborted" if self.cancelled else f"failed in Ray: {_short(exc)}"
                return self.out._push([], error=ServingError(f"request {self.id} {message}"))


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


class _QueueingIsNormal(logging.Filter):
    """Drops Serve's "Failed to route request after N attempts" warnings: with routing by adapter a
    request waits for the replica holding its adapter while that one is full, by design (the router
    spills only hot adapters), and Serve logs each such wait every 50 attempts."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to route request after")


_QUIET = _QueueingIsNormal()   # one instance: addFilter adds it once however often launch runs


def check_counts(replicas: int | None, threads: int | None) -> None:
    """Raise ValueError naming the flag unless ``replicas`` and ``threads`` are None or integers >= 1."""
    for flag, value in (("--replicas", replicas), ("--threads-per-replica", threads)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{flag} must be an integer >= 1, got {value!r}")


def launch(base="default", *, replicas: int, threads: int | None = None, ray_address: str | None = None,
           engine_kwargs: dict | None = None, affine: bool = True, spill_below: float = 0.5,
           name: str = APP) -> ReplicaEngine:
    """Start ``replicas`` engines over ``base`` on Ray Serve and return the entry point's stand-in engine.

    Args:
        base: what ``Engine`` takes (``"default"``, a directory or a GGUF file; a relative path is made
            absolute: the replicas run in other working directories).
        replicas: Serve replicas, one engine each (>= 1).
        threads: torch threads (and Ray CPUs) per replica; default the machine's cores / ``replicas``.
        ray_address: a running cluster (``"auto"``, ``"ray://host:10001"``); None starts a local one
            (stopped with the server). On a cluster, deltatune and the base must be on every node.
        engine_kwargs: ``Engine`` keyword arguments; each replica's multiplexing LRU holds
            ``max_loras + max_cpu_loras`` adapters (``replicas_worker.adapters_per_replica``).
        affine: route by adapter (True) or to any replica (False).
        spill_below: a request whose adapter's holders are all full goes to another replica only if
            that one's queue is below this share of its limit (``AdapterAffinityRouter``; 1.0: any with room).
        name: the Serve application's name.

    Raises:
        ValueError: ``replicas`` or ``threads`` below 1.
    """
    check_counts(replicas, threads)
    import ray
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from deltatune import models
    from deltatune.serving.replicas_router import AdapterAffinityRouter
    from deltatune.serving.replicas_worker import AdapterBoard, EngineReplica, adapters_per_replica

    threads = threads or max(1, (os.cpu_count() or 1) // replicas)
    if base != models.DEFAULT and os.path.exists(base):
        base = os.path.abspath(base)
    owns = not ray.is_initialized()
    if owns and ray_address:
        ray.init(address=ray_address, log_to_driver=False)
    elif owns:  # logical CPUs: each replica asks for `threads`, and all of them must fit on this machine
        ray.init(num_cpus=max(os.cpu_count() or 1, replicas * threads), include_dashboard=False, log_to_driver=False)
    serve.start(proxy_location="Disabled")   # the entry point is deltatune's own server, not Serve's proxy
    logging.getLogger("ray.serve").addFilter(_QUIET)
    board = ray.remote(num_cpus=0)(AdapterBoard).remote()
    kwargs = dict(engine_kwargs or {})
    deployment = serve.deployment(EngineReplica, name="EngineReplica").options(
        num_replicas=replicas, ray_actor_options={"num_cpus": threads},
        # A replica takes as many requests as its engine batches; the rest wait in Serve's queue (bounded
        # like the engine's), where the router can still choose: a full holder of an adapter spills only to a
        # replica far less busy (spill_below), else its requests queue for it.
        max_ongoing_requests=kwargs.get("max_num_seqs", 32),
        max_queued_requests=replicas * kwargs.get("max_waiting", 256),
        health_check_period_s=1.0, health_check_timeout_s=10.0, graceful_shutdown_timeout_s=5.0,
        # Routing by adapter that knows where it sent each adapter at once (replicas_router.py).
        request_router_config=RequestRouterConfig(request_router_class=AdapterAffinityRouter,
                                                  request_router_kwargs={"max_adapters": adapters_per_replica(kwargs),
                                                                         "spill_below": spill_below}))
    handle = serve.run(deployment.bind(base, kwargs, threads, board), name=name, route_prefix=None)
    info = {**handle.describe.remote().result(), "max_queued": replicas * kwargs.get("max_waiting", 256)}

    return ReplicaEngine(handle, board, models.load_tokenizer(base), info, affine=affine,
                         on_shutdown=lambda: _stop(name, owns))


def _stop(name: str, owns: bool) -> None:
    """Delete the Serve app (and shut down the cluster ``launch`` started), bounded in time: a cluster
    already going down (Ctrl-C reaches its processes too) must not hang the server's exit."""
    import ray
    from ray import serve

    def down() -> None:
        try:
            serve.shutdown() if owns else serve.delete(name)
        except Exception:  # noqa: BLE001 — the cluster is gone already
            pass

    worker = threading.Thread(target=down, daemon=True)
    worker.start()
    worker.join(timeout=15)
    if owns:
        ray.shutdown()
