"""A streaming client that leaves before the first byte of the answer: its per-key concurrency slot
(``--max-concurrent-per-key``, 429 past it) is given back and its engine requests are aborted, as
for a client that leaves mid-stream. Before the fix the slot leaked (every later request of that
key got 429) and the engine decoded the whole answer for nobody."""
from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest

from deltatune.serving.limits import Limits
from tests.test_serving_tenants import launch, slow_forward, world  # noqa: F401 (fixtures)


def leave_before_first_byte(url: str, body: dict, key: str = "sk") -> None:
    """Send ``body`` to /v1/completions over a raw socket and close it before reading anything."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + key.encode() + b"\r\n"
                 b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    sock.close()


@pytest.mark.parametrize("submit_delay", [0.0, 0.5])
def test_stream_left_before_first_byte_frees_its_slot_and_aborts(launch, monkeypatch, submit_delay):
    live = launch(api_key="sk", limits=Limits(max_concurrent=1))
    engine = live.engine
    real = engine.submit

    def slow_submit(*args, **kw):  # the client is gone before the handler has queued its request
        time.sleep(submit_delay)
        return real(*args, **kw)
    monkeypatch.setattr(engine, "submit", slow_submit)
    slow_forward(engine, monkeypatch, 0.02)  # 200 tokens: ~4 s of decoding if nobody aborts them
    body = {"model": "a1", "prompt": [5, 9], "max_tokens": 200, "ignore_eos": True, "stream": True}
    leave_before_first_byte(live.url, body)
    deadline = time.monotonic() + 3
    auth = {"Authorization": "Bearer sk"}
    while True:
        r = httpx.post(f"{live.url}/v1/completions", headers=auth, timeout=30,
                       json={"model": "a1", "prompt": [5], "max_tokens": 1})
        if r.status_code != 429:
            break
        assert time.monotonic() < deadline, "the slot of a client that left before the first byte is never given back"
        time.sleep(0.1)
    assert r.status_code == 200, r.text
    while engine.stats()["running"] + engine.stats()["waiting"]:
        assert time.monotonic() < deadline, f"the engine still runs the abandoned request: {engine.stats()}"
        time.sleep(0.05)
    assert engine.stats()["requests_total"] == 2, engine.stats()  # the abandoned request did reach the engine
    assert engine.stats()["tokens_generated_total"] < 100, engine.stats()  # aborted, not decoded to the end


def test_event_stream_closes_its_run_when_the_body_is_never_read(world):
    """The stream's body iterator may never start: Starlette sends the headers first, and a send that
    fails there (ASGI 2.4 servers raise OSError once the client is gone) ends the response before it.
    Through the server's http middleware the iterator happens to start anyway (it buffers the answer),
    so this calls the app with that middleware taken out, as a pure-ASGI stack would be; before the
    fix the request stayed queued and its client's slot taken."""
    from starlette.middleware.base import BaseHTTPMiddleware

    from deltatune.serving import Engine
    from deltatune.serving.access import Grant
    from deltatune.serving.server import GRANT, create_app

    engine = Engine(str(world["base"]), served_name="tiny")  # not started: the request waits in the queue
    app = create_app(engine, limits=Limits(max_concurrent=1), manage_engine=False)
    app.user_middleware = [m for m in app.user_middleware if m.cls is not BaseHTTPMiddleware]
    body = json.dumps({"model": "tiny", "prompt": [5, 9], "max_tokens": 50, "stream": True}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             GRANT: Grant(frozenset({"*"}), "client-1")}
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):  # the client is gone: the very first byte fails
        raise OSError("connection reset by peer")

    async def call():
        with pytest.raises(Exception):
            await app(scope, receive, send)
    asyncio.run(call())
    assert engine.stats()["requests_total"] == 1  # it was queued...
    assert engine.stats()["waiting"] == 0 and engine.stats()["running"] == 0  # ...and aborted
    assert app.state.concurrency._count == {}  # the slot is free again
