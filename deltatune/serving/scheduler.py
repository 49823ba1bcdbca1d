"""Who runs: the waiting queue, the running batch and its KV cache slots, admission and reaping.

A request (``Request``) holds ``n`` sequences (``Seq``), which join the running batch together when
slots are free (first come, first served) and leave it one by one as they finish. The running rows
stay ``0 .. B-1``: a finished sequence's slot takes the last row's sequence (``compact``), so the
cache's decode view needs no gather. The scheduler keeps no lock of its own: the engine calls it
under its ``_lock`` (and, where the model or cache changes, its ``_model_lock``).
"""
from __future__ import annotations

from collections import deque

from deltatune.serving.adapters import AdapterPool
from deltatune.serving.detokenize import final_output
from deltatune.serving.errors import QueueFull, ServingError
from deltatune.serving.kv_cache import SlotKVCache
from deltatune.serving.outputs import StreamDelta
from deltatune.serving.requests import Request, Seq


class Scheduler:
    """The engine's queues and tables (see the module doc); every method runs under the engine's lock.

    Args:
        pool: the adapter pool (an adapter is made ready before its request joins).
        cache: the KV cache whose slots the running rows occupy.
        max_num_seqs, max_waiting, max_prefill_tokens: the engine's limits.
        stats: the engine's counters, updated in place.
    """

    def __init__(self, pool: AdapterPool, cache: SlotKVCache, max_num_seqs: int, max_waiting: int,
                 max_prefill_tokens: int, stats: dict) -> None:
        self.pool, self.cache, self.stats = pool, cache, stats
        self.max_num_seqs, self.max_waiting, self.max_prefill_tokens = max_num_seqs, max_waiting, max_prefill_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Seq] = []
        self.requests: dict[str, Request] = {}

    def check_room(self) -> None:
        """QueueFull when ``max_waiting`` requests wait beyond the slots free at the next step."""
        # Requests that free slots take at the next step are not "waiting": the bound must not
        # depend on whether the loop has admitted a burst yet.
        free = max(0, self.max_num_seqs - len(self.running))
        if len(self.waiting) >= self.max_waiting + free:
            raise QueueFull(f"{len(self.waiting)} requests are waiting (max_waiting={self.max_waiting}); retry later")

    def enqueue(self, req: Request) -> None:
        """Queue ``req`` (it pins its adapter version until it completes)."""
        if req.version is not None:
            req.version.refs += 1
        self.requests[req.id] = req
        self.waiting.append(req)
        self.stats["requests_total"] += 1
        self.stats["prompt_tokens_total"] += len(req.prompt_ids)

    def busy(self) -> set:
        """The adapters the running rows use (the pool must not evict them)."""
        return {s.adapter for s in self.running}

    def admit(self) -> list[Seq]:
        """Move waiting requests into the batch while slots and the prefill budget allow; the new rows."""
        joined: list[Seq] = []
        longest = 0
        while self.waiting:
            req = self.waiting[0]
            n = len(req.seqs)
            if len(self.running) + n > self.max_num_seqs:
                break
            width = len(req.prompt_ids) + (req.version.virtual if req.version is not None else 0)
            if joined and max(longest, width) * (len(joined) + n) > self.max_prefill_tokens:
                break   # the rest join at the next step
            if req.version is not None:
                try:
                    ok = self.pool.make_ready(req.version, self.busy())
                except ServingError as exc:
                    self.waiting.popleft()
                    self.fail(req, exc)
                    continue
                if not ok:
                    break   # every ready adapter is in use: wait for one to finish
            self.waiting.popleft()
            for s in req.seqs:
                s.row = len(self.running)
                self.running.append(s)
                joined.append(s)
            longest = max(longest, width)
        return joined

    def reap(self) -> None:
        """Aborted requests leave the batch (their slots are free for this step's admissions), and
        adapter versions no request uses any more leave the model."""
        for req in {s.req for s in self.running if s.req.aborted}:
            self.complete(req)
        self.compact()
        self.pool.collect()

    def abort(self, request_id: str) -> None:
        """Mark a request aborted; a waiting one completes at once, a running one at the next reap."""
        req = self.requests.get(request_id)
        if req is None:
            return
        req.aborted = True
        if req in self.waiting:
            self.waiting.remove(req)
            self.complete(req)

    def abort_all(self) -> None:
        """End every request with finish_reason "abort": running ones leave the batch, waiting ones go."""
        for req in list(self.requests.values()):
            req.aborted = True
        self.reap()
        for req in list(self.waiting):
            self.complete(req)
        self.waiting.clear()

    @property
    def idle(self) -> bool:
        """Nothing waits and nothing runs."""
        return not self.waiting and not self.running

    def deliver(self, seqs: list[Seq], deltas: list[StreamDelta]) -> None:
        """Hand each request its new deltas (the whole output once all its sequences finished), then
        let finished sequences leave the batch."""
        outbox: dict[Request, list[StreamDelta]] = {}
        for s, delta in zip(seqs, deltas):
            outbox.setdefault(s.req, []).append(delta)
        self.stats["tokens_generated_total"] += len(seqs)
        for req, mine in outbox.items():
            if all(s.finish_reason is not None for s in req.seqs):
                self.complete(req, mine)
            else:
                req.handle._push(mine)
        self.compact()

    def compact(self) -> None:
        """Finished sequences leave the batch; the last row moves into each freed slot, so the
        running rows stay ``0 .. B-1`` (the cache's decode view needs no gather)."""
        for row in range(len(self.running) - 1, -1, -1):
            s = self.running[row]
            if s.finish_reason is None:
                continue
            last = self.running[-1]
            if last is not s:
                self.cache.move(last.row, s.row, last.pos)
                last.row, self.running[row] = s.row, last
            self.running.pop()
            s.row = -1

    def complete(self, req: Request, deltas: list[StreamDelta] = ()) -> None:
        """Hand ``req``'s last deltas and its output to its handle; unpin its adapter version."""
        if req.done:
            return
        req.done = True
        deltas, output = final_output(req, deltas)
        self.release(req)
        self.stats["requests_finished"] += 1
        req.handle._push(deltas, output=output)

    def fail(self, req: Request, error: Exception) -> None:
        """End ``req`` with ``error`` (its handle raises it)."""
        req.done = True
        self.release(req)
        req.handle._push([], error=error)

    def fail_rows(self, failed: dict[Request, Exception]) -> None:
        """End each request of ``failed`` with its error (its handle raises it); its sequences leave
        the batch at the next ``compact`` while the other rows run on."""
        for req, error in failed.items():
            for s in req.seqs:
                s.finish_reason = s.finish_reason or "error"
            if not req.done:
                self.fail(req, error)

    def fail_running(self, error: Exception) -> None:
        """End every request in the batch with ``error`` and empty the batch."""
        for req in {s.req for s in self.running}:
            self.fail(req, error)
        self.running = []

    def release(self, req: Request) -> None:
        """Forget ``req``; its adapter version may retire (dropped from the model at the next step)."""
        self.requests.pop(req.id, None)
        if req.version is not None:
            req.version.refs -= 1
