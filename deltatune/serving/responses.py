"""One HTTP generation request's answer: engine handles -> OpenAI's JSON or server-sent events, with
TTFT / inter-token latency recorded and the engine requests aborted when the client goes away; and the
mapping of engine errors to HTTP statuses."""
from __future__ import annotations

import asyncio
import json
import time
from typing import AsyncIterator

from starlette.responses import StreamingResponse

from deltatune.serving import QueueFull, ServingError, UnknownModel, protocol
from deltatune.serving.metrics import Metrics
from deltatune.serving.protocol import ApiError

DONE = "data: [DONE]\n\n"
DISCONNECT_POLL_S = 0.2  # how often a non-streaming request checks that its client is still there


def as_api_error(exc: Exception, default_param: str | None = None) -> ApiError:
    """Engine errors -> HTTP: unknown model 404, full queue 503, every other refusal 400."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, UnknownModel):
        return ApiError(404, exc.message, exc.param or "model")
    if isinstance(exc, QueueFull):
        return ApiError(503, exc.message, exc.param)
    if isinstance(exc, ServingError):
        return ApiError(400, exc.message, exc.param or default_param)
    if isinstance(exc, (ValueError, FileNotFoundError)):
        return ApiError(400, str(exc), default_param)
    raise exc


class Run:
    """One HTTP request's engine requests (one per prompt, each with ``n`` outputs), as an SSE
    stream or one JSON body; records TTFT and inter-token latency; aborts whatever is left when the
    client goes away."""

    def __init__(self, handles: list, body, chat: bool, arrived: float, metrics: Metrics, endpoint: str,
                 label: str, leave=lambda: None) -> None:
        self.leave = leave
        self.handles, self.body, self.chat, self.arrived = handles, body, chat, arrived
        self.metrics, self.endpoint, self.label = metrics, endpoint, label
        self.n = body.n
        self.id = protocol.new_id("chatcmpl" if chat else "cmpl")
        self.object = "chat.completion" if chat else "text_completion"
        self.created = protocol.now()
        self.completion_tokens: dict[int, int] = {}
        self.finished: set[int] = set()
        self._last: dict[int, float] = {}
        self._closed = False

    async def _deltas(self) -> AsyncIterator[tuple[int, object]]:
        """(choice index, StreamDelta) from every handle, as they come; timing recorded here."""
        if len(self.handles) == 1:
            async for delta in self.handles[0]:
                yield self._observe(delta.index, delta), delta
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(p: int, handle) -> None:
            try:
                async for delta in handle:
                    await queue.put((p * self.n + delta.index, delta))
            except Exception as exc:  # noqa: BLE001 — handed to the consumer, raised there
                await queue.put((None, exc))
            finally:
                await queue.put((None, None))

        tasks = [asyncio.ensure_future(pump(p, h)) for p, h in enumerate(self.handles)]
        try:
            live = len(tasks)
            while live:
                index, item = await queue.get()
                if index is None:
                    if item is None:
                        live -= 1
                        continue
                    raise item
                yield self._observe(index, item), item
        finally:
            for task in tasks:
                task.cancel()

    def _observe(self, index: int, delta) -> int:
        now = time.perf_counter()
        new = len(delta.token_ids)
        if new:
            if not self._last:
                self.metrics.observe_ttft(now - self.arrived)
            elif index in self._last:
                self.metrics.observe_itl(now - self._last[index], new)
            self._last[index] = now
        self.completion_tokens[index] = delta.completion_tokens
        if delta.finish_reason is not None:
            self.finished.add(index)
        return index

    @property
    def prompt_tokens(self) -> int:
        return sum(h.prompt_tokens for h in self.handles)

    def _usage(self) -> dict:
        return protocol.usage(self.prompt_tokens, sum(self.completion_tokens.values()))

    def close(self, status: int | str) -> None:
        """End the run once (later calls do nothing): abort what has not finished, give the client's
        concurrency slot back, count the request with ``status``."""
        if self._closed:
            return
        self._closed = True
        self._abort_unfinished()
        self.leave()
        self.metrics.count_request(self.endpoint, self.label, status)

    def _abort_unfinished(self) -> bool:
        """Abort the engine requests that have not finished; True if any had not."""
        if len(self.finished) >= len(self.handles) * self.n:
            return False
        for handle in self.handles:
            handle.abort()
        return True

    async def collect(self, request) -> dict | None:
        """The non-streaming answer; None (engine requests aborted) if the client disconnects first."""
        texts: dict[int, list[str]] = {}
        reasons: dict[int, str | None] = {}

        async def gather() -> None:
            async for index, delta in self._deltas():
                texts.setdefault(index, []).append(delta.text)
                if delta.finish_reason is not None:
                    reasons[index] = delta.finish_reason

        task = asyncio.ensure_future(gather())
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if not task.done() and await request.is_disconnected():
                    task.cancel()
                    self._abort_unfinished()
                    self.metrics.count_request(self.endpoint, self.label, "aborted")
                    return None
            task.result()
        except asyncio.CancelledError:
            self._abort_unfinished()
            raise
        except Exception as exc:  # noqa: BLE001
            self._abort_unfinished()
            err = as_api_error(exc)
            self.metrics.count_request(self.endpoint, self.label, err.status)
            raise err from None
        make = protocol.chat_choice if self.chat else protocol.completion_choice
        choices = [make(i, "".join(texts.get(i, [])), reasons.get(i)) for i in range(len(self.handles) * self.n)]
        self.metrics.count_request(self.endpoint, self.label, 200)
        return protocol.envelope(self.id, self.object, self.body.model, self.created, choices, usage=self._usage())

    def _chunk(self, choices: list, usage: dict | None = None) -> str:
        """One server-sent event; ``usage`` is sent (null until the last chunk) when the client asked."""
        extra = {"usage": usage} if self.body.include_usage else {}
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        payload = protocol.envelope(self.id, obj, self.body.model, self.created, choices, **extra)
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    async def events(self) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's shapes: role first (chat), text deltas, one chunk per choice
        with its ``finish_reason``, a ``usage`` chunk when asked, then ``data: [DONE]``."""
        status: int | str = 200
        try:
            if self.chat:
                yield self._chunk([protocol.chat_chunk_choice(i, {"role": "assistant", "content": ""}, None)
                                   for i in range(len(self.handles) * self.n)])
            async for index, delta in self._deltas():
                if delta.text:
                    yield self._chunk([self._choice(index, delta.text, None)])
                if delta.finish_reason is not None:
                    yield self._chunk([self._choice(index, None, delta.finish_reason)])
            if self.body.include_usage:
                yield self._chunk([], self._usage())
            yield DONE
        except (asyncio.CancelledError, GeneratorExit):
            status = "aborted"  # the client went away: Starlette cancels the response
            raise
        except Exception as exc:  # noqa: BLE001 — headers are sent: report in the stream, as vLLM does
            err = as_api_error(exc)
            status = err.status
            yield f"data: {json.dumps(protocol.error_body(err.status, err.message, err.param))}\n\n"
            yield DONE
        finally:
            self.close(status)

    def _choice(self, index: int, text: str | None, finish_reason: str | None) -> dict:
        if self.chat:
            return protocol.chat_chunk_choice(index, {} if text is None else {"content": text}, finish_reason)
        return protocol.completion_choice(index, text or "", finish_reason)


class EventStream(StreamingResponse):
    """The server-sent event answer of a :class:`Run`. The run is closed when the response ends however
    it ends: sent in full, the client gone mid-stream, or gone before the first byte, when the
    server may never start the body iterator (so its ``finally`` would never run, the engine would
    decode for nobody and the client's concurrency slot would stay taken)."""

    def __init__(self, run: Run) -> None:
        super().__init__(run.events(), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.run = run

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.run.close("aborted")  # a no-op when the stream ran to its end
