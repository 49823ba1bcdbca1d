"""Ray Serve's request router for ``deltatune serve --replicas``: an adapter goes where it was sent before.

Serve's default router learns which replica holds which model from the replicas' own reports, which
reach the entry point through Serve's controller some time later (a second or more on a loaded
machine), and it gives up on a holder whose queue-length probe misses its 0.1 s deadline. Either way
a request goes to a replica without its adapter, which loads it and evicts another: adapters thrash.

:class:`AdapterAffinityRouter` plugs into Serve's documented router interface
(``ray.serve.request_router``) and remembers where it sent each adapter the moment it sends it: an
LRU of ``max_loras`` adapters per replica, the same size as each replica's multiplexed LRU, merged with
what the replicas report. A request for an adapter goes to the replicas holding it; a holder that is
slow to answer is waited for, and only a holder whose queue is full makes the request spill to
another replica. An adapter held nowhere goes to the replica holding the fewest, ties broken by
rendezvous hashing so that it comes back to the same replica each time. Requests without an
adapter (the base, or ``affine=False``) take Serve's power of two choices among all replicas.
"""
from __future__ import annotations

import random
import zlib
from collections import OrderedDict

from ray.serve.request_router import FIFOMixin, MultiplexMixin, PendingRequest, RequestRouter, RunningReplica


class AdapterAffinityRouter(FIFOMixin, MultiplexMixin, RequestRouter):
    """Routes each request to a replica that holds (or was last sent) its adapter; see the module text."""

    def initialize_state(self, max_loras: int = 8, **_: object) -> None:
        """Called by Serve with ``request_router_kwargs``: ``max_loras`` is each replica's LRU size."""
        self.max_loras = max(1, int(max_loras))
        self.homes: dict = {}   # replica id -> OrderedDict of the adapters sent there, least recent first

    def _held(self, replica: RunningReplica) -> OrderedDict:
        return self.homes.setdefault(replica.replica_id, OrderedDict())

    def _send(self, replica: RunningReplica, adapter: str) -> None:
        held = self._held(replica)
        held[adapter] = None
        held.move_to_end(adapter)
        while len(held) > self.max_loras:
            held.popitem(last=False)

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
        # select_available_replicas counts a replica whose queue length is unknown as open: a holder that
        # is slow to answer its probe is waited for (Serve backs off and asks again), a full one is not.
        open_holders = self.select_available_replicas(holders)
        if open_holders:
            for r in open_holders:
                self._send(r, adapter)
            return [open_holders]
        others = self.select_available_replicas([r for r in candidate_replicas if r not in holders])
        if not others:                     # every replica is full: Serve probes them all and backs off
            return [list(candidate_replicas)]
        pick = min(others, key=lambda r: (len(set(self._held(r)) | set(r.multiplexed_model_ids)),
                                          _home_rank(adapter, r)))
        self._send(pick, adapter)
        return [[pick]]


def _home_rank(adapter: str, replica: RunningReplica) -> int:
    """Rendezvous hashing: among replicas holding as many adapters, each adapter has a fixed order of
    preference, so once every replica is full an adapter evicted everywhere comes back to the same one
    (each replica's LRU then sees about 1/N of the adapters, not a random share of all of them)."""
    return zlib.crc32(f"{adapter}\0{getattr(replica.replica_id, 'unique_id', replica.replica_id)}".encode())
