"""Request limits of ``deltatune serve``: body size (an ASGI middleware that refuses before reading the
body whole), per-request field bounds, and concurrent requests per client (429).

Defaults are generous for real clients and small enough that one request cannot tie the server up:
1 MiB bodies, ``n`` <= 16, 8 stop strings of <= 256 characters, 128 concurrent requests per client.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

from starlette.responses import JSONResponse

from deltatune.serving.protocol import ApiError, error_body

MIB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """Bounds on one request and one client (``None`` for ``max_concurrent`` = unbounded)."""

    max_request_bytes: int = MIB
    max_n: int = 16
    max_stop: int = 8
    max_stop_length: int = 256
    max_concurrent: int | None = 128

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_n", "max_stop", "max_stop_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ValueError(f"--max-concurrent-per-key: must be >= 1, got {self.max_concurrent}")

    def check(self, body) -> None:
        """Refuse (400 naming the field) what no client needs: before any tokenization or queueing.
        (``max_tokens`` against the context is the engine's one check, ``Engine.submit``.)"""
        if body.n > self.max_n:
            raise ApiError(400, f"n: at most {self.max_n} completions per request, got {body.n}", "n")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > self.max_stop:
            raise ApiError(400, f"stop: at most {self.max_stop} stop strings, got {len(stops)}", "stop")
        for stop in stops:
            if len(stop) > self.max_stop_length:
                raise ApiError(400, f"stop: a stop string is {len(stop)} characters, at most "
                                    f"{self.max_stop_length} are allowed", "stop")


class Concurrency:
    """Requests in flight per client; :meth:`enter` refuses with 429 past ``limit``."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self._count: dict[str, int] = {}
        self._lock = threading.Lock()

    def enter(self, client: str):
        """Count one request of ``client``; returns the (idempotent) function that ends it."""
        with self._lock:
            now = self._count.get(client, 0)
            if self.limit is not None and now >= self.limit:
                raise ApiError(429, f"too many concurrent requests from this client (at most {self.limit}; "
                                    "the server's --max-concurrent-per-key); retry when one finishes")
            self._count[client] = now + 1
        done = []

        def leave() -> None:
            with self._lock:
                if done:
                    return
                done.append(True)
                left = self._count[client] - 1
                if left:
                    self._count[client] = left
                else:
                    del self._count[client]
        return leave


class BodyLimit:
    """ASGI middleware: 413 for a body over ``max_bytes``, decided from Content-Length before reading it,
    and counted while it streams in (chunked uploads, read here up to the bound), so an oversized body
    is never read whole."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _message(self) -> str:
        return (f"request body is larger than {self.max_bytes} bytes (the server's --max-request-bytes)")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:  # h11 stops a body at its declared length, so the header is enough
            if not length.isdigit():
                return await self._refuse(400, "malformed Content-Length header", scope, receive, send)
            if int(length) > self.max_bytes:
                return await self._refuse(413, self._message(), scope, receive, send)
            return await self.app(scope, receive, send)
        # Chunked upload: read it here, chunk by chunk, never past max_bytes, then hand it on.
        messages, seen = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                return await self._refuse(413, self._message(), scope, receive, send)
            if not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()
        await self.app(scope, replay, send)

    async def _refuse(self, status: int, message: str, scope, receive, send) -> None:
        response = JSONResponse(error_body(status, message), status_code=status, headers={"Connection": "close"})
        await response(scope, receive, send)
