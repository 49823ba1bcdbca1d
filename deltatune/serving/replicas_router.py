"""Ray Serve's request router for ``deltatune serve --replicas``: an adapter goes where it was sent before.

Serve's default router learns which replica holds which model from the replicas' own reports, which
reach the entry point through Serve's controller some time later (a second or more on a loaded
machine), and it gives up on a holder whose queue-length probe misses its 0.1 s deadline. Either way
a request goes to a replica without its adapter, which loads it and evicts another: adapters thrash.

:class:`AdapterAffinityRouter` plugs into Serve's documented router interface
(``ray.serve.request_router``) and remembers where it sent each adapter the moment it sends it: an
LRU per replica as large as each replica's multiplexed LRU (``max_adapters``: the engine's ready
plus host-memory tiers), merged with what the replicas report. A request for an adapter goes to the
replicas holding it; a holder that is slow to answer is waited for, and a holder whose queue is full
is waited for too (the request queues in Serve's router) unless another replica is far less busy:
its queue below ``spill_below`` of its limit. Spilling at once to any replica with room (the rule
before) made the other replica load the adapter as well whenever both ran full, which with 64 clients
on 2 replicas of 32 was nearly always. An adapter held nowhere goes to the replica with room holding
the fewest, ties broken by rendezvous hashing so that it comes back to the same replica each time.
Requests without an adapter (the base, or ``affine=False``) take Serve's power of two choices.
"""
from __future__ import annotations

import random
import zlib
from collections import OrderedDict

from ray.serve.request_router import FIFOMixin, MultiplexMixin, PendingRequest, RequestRouter, RunningReplica


class AdapterAffinityRouter(FIFOMixin, MultiplexMixin, RequestRouter):
    """Routes each request to a replica that holds (or was last sent) its adapter; see the module text."""

    def initialize_state(self, max_adapters: int | None = None, spill_below: float = 0.5,
                         max_loras: int | None = None, **_: object) -> None:
        """Called by Serve with ``request_router_kwargs``.

        Args:
            max_adapters: each replica's multiplexed LRU size (``replicas_worker.adapters_per_replica``);
                ``max_loras`` is its older name. Default 8.
            spill_below: a request whose holders are all full goes to another replica only if that
                one's queue is below this share of its ``max_ongoing_requests`` (1.0: any with room).
        """
        size = max_adapters if max_adapters is not None else max_loras if max_loras is not None else 8
        self.max_adapters = max(1, int(size))
        self.spill_below = float(spill_below)
        self.homes: dict = {}   # replica id -> OrderedDict of the adapters sent there, least recent first

    def _held(self, replica: RunningReplica) -> OrderedDict:
        return self.homes.setdefault(replica.replica_id, OrderedDict())

    def _send(self, replica: RunningReplica, adapter: str) -> None:
        held = self._held(replica)
        held[adapter] = None
        held.move_to_end(adapter)
        while len(held) > self.max_adapters:
            held.popitem(last=False)

    def _queue_len(self, replica: RunningReplica) -> int | None:
        """Requests in flight on ``replica`` as Serve last learned (None: unknown)."""
        return self.replica_queue_len_cache.get(replica.replica_id)

    def _light(self, replica: RunningReplica) -> bool:
        """Busy enough below its limit that a spill there beats queueing at a full holder (unknown: yes,
        as Serve counts an unknown queue as open: its probe then tells)."""
        n = self._queue_len(replica)
        return n is None or n < self.spill_below * replica.max_ongoing_requests

    def _count(self, replica: RunningReplica) -> int:
        """Adapters ``replica`` holds, as far as this router knows (sent there, or reported)."""
        return len(set(self._held(replica)) | set(replica.multiplexed_model_ids))

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        """One routing attempt: the ranked replicas Serve probes in turn (rank 0 first)."""
        if not hasattr(self, "homes"):      # a router built without request_router_kwargs
            self.initialize_state()
        live = {r.replica_id for r in candidate_replicas}
        for gone in [rid for rid in self.homes if rid not in live]:
            del self.homes[gone]
        adapter = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if not adapter or not candidate_replicas:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        holders = [r for r in candidate_replicas if adapter in self._held(r) or adapter in r.multiplexed_model_ids]
        if not holders:   # held nowhere: whichever replica loads it, loads it once; prefer one with room
            room = self.select_available_replicas(candidate_replicas) or candidate_replicas
            pick = min(room, key=lambda r: (self._count(r), _home_rank(adapter, r)))
            self._send(pick, adapter)
            return [[pick]]
        # select_available_replicas counts a replica whose queue length is unknown as open: a holder that
        # is slow to answer its probe is waited for (Serve backs off and asks again).
        open_holders = self.select_available_replicas(holders)
        if not open_holders:   # every holder is full: queue there, unless another replica is far less busy
            light = [r for r in candidate_replicas if r not in holders and self._light(r)]
            if light:
                pick = min(light, key=lambda r: (self._count(r), _home_rank(adapter, r)))
                self._send(pick, adapter)
                return [[pick]]
            open_holders = holders
        for r in open_holders:
            self._send(r, adapter)
        return [open_holders]

def _home_rank(adapter: str, replica: RunningReplica) -> int:
    """Rendezvous hashing: among replicas holding as many adapters, each adapter has a fixed order of
    preference, so once every replica is full an adapter evicted everywhere comes back to the same one
    (each replica's LRU then sees about 1/N of the adapters, not a random share of all of them)."""
    return zlib.crc32(f"{adapter}\0{getattr(replica.replica_id, 'unique_id', replica.replica_id)}".encode())
