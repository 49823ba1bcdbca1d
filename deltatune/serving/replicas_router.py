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
is waited for too (the request queues in Serve's router) unless another replica is far less busy
(its queue below ``spill_below`` of its limit) and the adapter is hot (``HOT`` times the mean traffic
of late): then it gets a second copy there, which takes load off its first replica for good.
Spilling at once to any replica with room (the rule before) made the other replica load the adapter
as well whenever both ran full, which with 64 clients on 2 replicas of 32 was nearly always, and
spilling cold adapters only to a far less busy replica still doubled the loads (docs/replicas.md).
An adapter held nowhere goes to the replica it belongs to:
assigned when first seen to the replica whose adapters had the least traffic of late, among those
with fewer assigned than their LRU holds (ties: rendezvous hashing), and kept there: the split stays
within each replica's LRU, balances the load the hot adapters bring (with Zipf traffic the hottest
adapter alone is a quarter of it), and an adapter evicted everywhere comes back to the same replica.
Requests without an adapter (the base, or ``affine=False``) take Serve's power of two choices.
"""
from __future__ import annotations

import random
import zlib
from collections import OrderedDict

from ray.serve.request_router import FIFOMixin, MultiplexMixin, PendingRequest, RequestRouter, RunningReplica

DECAY_EVERY = 1000   # requests routed between halvings of the adapters' traffic counts
HOT = 2.0            # an adapter with this many times the mean traffic may spill to a second replica


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
        self.assigned: dict = {}  # adapter -> the replica id it belongs to (``_home``)
        self.traffic: dict = {}   # adapter -> requests routed for it (decayed: ``on_request_routed``)
        self.traffic_total = 0.0  # sum of ``traffic``
        self.routed = 0
        self.live: frozenset = frozenset()   # the replica ids of the last call

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

    def _hot(self, adapter: str) -> bool:
        """Whether ``adapter`` has at least ``HOT`` times the mean traffic of late: worth a second copy. A
        hot adapter spilled once stays on both replicas and takes load off its first one for good; a
        cold one spilled pays a load (and an eviction) for a request or two."""
        if not self.traffic:
            return True
        return self.traffic.get(adapter, 0.0) * len(self.traffic) >= HOT * self.traffic_total

    def _home(self, adapter: str, candidates: list[RunningReplica]) -> RunningReplica:
        """The replica ``adapter`` belongs to: assigned once (see the module text) and kept while that
        replica lives. The room rule matters once the LRUs are nearly full: 32 adapters on 2 replicas
        of 16 fit only as 16 + 16."""
        by_id = {r.replica_id: r for r in candidates}
        home = by_id.get(self.assigned.get(adapter))
        if home is None:
            counts, traffic = dict.fromkeys(by_id, 0), dict.fromkeys(by_id, 0.0)
            for name, rid in self.assigned.items():
                if rid in counts:
                    counts[rid] += 1
                    traffic[rid] += self.traffic.get(name, 0.0)
            room = [r for r in candidates if counts[r.replica_id] < self.max_adapters] or candidates
            home = min(room, key=lambda r: (traffic[r.replica_id], counts[r.replica_id], _home_rank(adapter, r)))
            self.assigned[adapter] = home.replica_id
        return home

    def on_request_routed(self, pending_request: PendingRequest, replica_id, result) -> None:
        """Serve's hook, once per request a replica accepted: count it for its adapter (halved every
        ``DECAY_EVERY`` requests, so the counts follow the traffic of late)."""
        adapter = pending_request.metadata.multiplexed_model_id
        if adapter and hasattr(self, "traffic"):
            self.traffic[adapter] = self.traffic.get(adapter, 0.0) + 1.0
            self.traffic_total += 1.0
            self.routed += 1
            if self.routed % DECAY_EVERY == 0:
                self.traffic = {name: n / 2 for name, n in self.traffic.items() if n >= 0.5}
                self.traffic_total = sum(self.traffic.values())

    def _forget_gone(self, candidates: list[RunningReplica]) -> None:
        """Drop what a replica that left held and which adapters belonged to it (when the set changed)."""
        live = frozenset(r.replica_id for r in candidates)
        if live == self.live:
            return
        self.live = live
        for gone in [rid for rid in self.homes if rid not in live]:
            del self.homes[gone]
        for adapter in [a for a, rid in self.assigned.items() if rid not in live]:
            del self.assigned[adapter]

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        """One routing attempt: the ranked replicas Serve probes in turn (rank 0 first)."""
        if not hasattr(self, "homes"):      # a router built without request_router_kwargs
            self.initialize_state()
        self._forget_gone(candidate_replicas)
        adapter = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if not adapter or not candidate_replicas:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        holders = [r for r in candidate_replicas if adapter in self._held(r) or adapter in r.multiplexed_model_ids]
        holders = holders or [self._home(adapter, candidate_replicas)]   # held nowhere: where it belongs
        # select_available_replicas counts a replica whose queue length is unknown as open: a holder that
        # is slow to answer its probe is waited for (Serve backs off and asks again).
        open_holders = self.select_available_replicas(holders)
        if not open_holders:   # every holder is full: queue there, unless another replica is far less busy
            light = [r for r in candidate_replicas if r not in holders and self._light(r)]
            if light and self._hot(adapter):
                pick = min(light, key=lambda r: (self._queue_len(r) or 0, _home_rank(adapter, r)))
                self._send(pick, adapter)
                return [[pick]]
            open_holders = holders
        for r in open_holders:
            self._send(r, adapter)
        return [open_holders]


def _home_rank(adapter: str, replica: RunningReplica) -> int:
    """Rendezvous hashing: among replicas with as many adapters assigned, each adapter has a fixed
    order of preference (the same adapter goes to the same replica in every run)."""
    return zlib.crc32(f"{adapter}\0{getattr(replica.replica_id, 'unique_id', replica.replica_id)}".encode())
