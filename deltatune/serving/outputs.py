"""What the engine hands back: vLLM's ``RequestOutput``/``CompletionOutput``, the streamed
``StreamDelta`` and the ``RequestHandle`` a caller holds while a request runs.

The engine thread pushes deltas into a handle; an asyncio task iterating the handle is woken
through its own event loop (``call_soon_threadsafe``), and a synchronous caller blocks in
``result()``. Both can be used on the same handle.
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from deltatune.serving.errors import ServingError


@dataclass
class CompletionOutput:
    """One of a request's ``n`` completions (vLLM's fields)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None          # "stop", "length" or "abort"
    cumulative_logprob: float | None = None
    stop_reason: str | int | None = None      # the stop string or token that ended it, if any


@dataclass
class RequestOutput:
    """A finished request (vLLM's fields): ``outputs[i].text`` is completion ``i``."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True


@dataclass
class StreamDelta:
    """New output of completion ``index`` since its previous delta.

    ``text`` never contains (part of) a stop string; ``finish_reason`` is None while the
    completion runs and set on its last delta; the token counts are running totals.
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


@dataclass
class RequestHandle:
    """A submitted request: iterate it (``async for delta in handle``) for its deltas as they are
    produced, or ``result()`` to wait for the whole output; ``abort()`` stops it.

    Attributes:
        request_id: the id given to ``submit`` or generated.
        prompt_tokens: the prompt's length in tokens.
    """

    request_id: str
    prompt_tokens: int
    _abort: Callable[[], None] = field(repr=False)
    _deltas: list = field(default_factory=list, repr=False)
    _output: RequestOutput | None = field(default=None, repr=False)
    _error: BaseException | None = field(default=None, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _waiters: list = field(default_factory=list, repr=False)

    def abort(self) -> None:
        """Stop the request: its sequences leave the batch, freeing their slots, at the next engine
        step; the output ends with finish_reason ``"abort"``. A finished request is left as it is."""
        if not self._done.is_set():
            self._abort()

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> RequestOutput:
        """Block until the request finishes and return its output.

        Raises:
            TimeoutError: not finished within ``timeout`` seconds.
            ServingError: the engine failed the request (the message says why).
        """
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._output

    def __aiter__(self) -> AsyncIterator[StreamDelta]:
        return self._stream()

    async def _stream(self) -> AsyncIterator[StreamDelta]:
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        waiter = (loop, wake)
        with self._lock:
            self._waiters.append(waiter)
        seen = 0
        try:
            while True:
                with self._lock:
                    new = self._deltas[seen:]
                    seen += len(new)
                    done = self._done.is_set()
                    wake.clear()
                for delta in new:
                    yield delta
                if done:
                    with self._lock:
                        rest = self._deltas[seen:]
                    for delta in rest:
                        yield delta
                    if self._error is not None:
                        raise self._error
                    return
                await wake.wait()
        finally:
            with self._lock:
                self._waiters.remove(waiter)

    # -- the engine's side ---------------------------------------------------------------------
    def _push(self, deltas: list[StreamDelta], output: RequestOutput | None = None,
              error: BaseException | None = None) -> None:
        """Engine thread: add ``deltas``; with ``output`` or ``error`` the request is finished."""
        with self._lock:
            self._deltas.extend(deltas)
            if output is not None or error is not None:
                self._output, self._error = output, error
                self._done.set()
            waiters = list(self._waiters)
        for loop, wake in waiters:
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # that loop is closed: nobody is listening any more
                pass


def failed(request_id: str, message: str) -> ServingError:
    """The error a handle raises when the engine could not run its request."""
    return ServingError(f"request {request_id} failed: {message}")
