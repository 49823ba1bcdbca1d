"""`deltatune serve` for many tenants: opt-in runtime loading confined to --lora-root, an event loop
that never waits on the engine, request limits (413 / 400 / 429), and per-key access to adapters
where another tenant's adapter is indistinguishable from one that does not exist.

Each server here is the real app under uvicorn on a loopback port, run in a thread of this process
(so a test can slow the tiny model's forward down); the CLI checks go through ``deltatune.cli.main``.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time

import httpx
import pytest

from tests.serving_fixtures import make_adapter, make_base

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from deltatune.serving import Engine  # noqa: E402
from deltatune.serving.access import Access, load_api_keys  # noqa: E402
from deltatune.serving.limits import Limits  # noqa: E402
from deltatune.serving.server import create_app  # noqa: E402

TENANTS = {"k-one": ["a1", "a2"], "k-two": ["b1", "b2", "tiny"], "k-op": ["*"]}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("tenants")
    base = make_base(root / "base")
    paths = {name: make_adapter(base, root / "loras" / name, seed) for seed, name in enumerate(["a1", "a2", "b1", "b2"])}
    outside = make_adapter(base, root / "outside", 7)
    (root / "loras" / "link").symlink_to(outside)
    keys = root / "keys.json"
    keys.write_text(json.dumps(TENANTS))
    return dict(root=root, base=base, paths=paths, loras=root / "loras", outside=outside, keys=keys)


class Live:
    """The app under uvicorn on a free loopback port, in a thread."""

    def __init__(self, app) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@pytest.fixture
def launch(world):
    started = []

    def start(*, adapters=("a1", "a2", "b1", "b2"), **kw):
        engine = Engine(str(world["base"]), max_lora_rank=16, served_name="tiny", max_num_seqs=32)
        for name in adapters:
            engine.add_adapter(name, world["paths"][name])
        live = Live(create_app(engine, **kw))
        live.engine = engine
        started.append(live)
        return live

    yield start
    for live in started:
        live.stop()


def post(live, path, key=None, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{live.url}{path}", headers=headers, timeout=30, **kw)


def slow_forward(engine, monkeypatch, seconds: float) -> None:
    """Each prefill and decode step of the tiny model takes ``seconds`` more."""
    for name in ("prefill", "decode"):
        real = getattr(engine.runner, name)

        def slow(*args, _real=real, **kw):
            time.sleep(seconds)
            return _real(*args, **kw)
        monkeypatch.setattr(engine.runner, name, slow)


# -- 1. runtime loading is opt-in and confined --------------------------------------------------------

def test_load_endpoints_are_off_unless_enabled(launch, world):
    live = launch()
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        response = post(live, path, json={"lora_name": "x", "lora_path": str(world["paths"]["a1"])})
        assert response.status_code == 404
        assert "--enable-lora-loading" in response.json()["error"]["message"]
    assert "x" not in {a.name for a in live.engine.adapters()}


def test_lora_paths_are_confined_to_the_root_with_one_answer(launch, world):
    live = launch(lora_root=str(world["loras"]))
    refusals = {"escape": "../outside", "absolute": str(world["outside"]), "symlink": "link",
                "missing": "no-such", "missing-abs": str(world["root"] / "no-such"), "root": "."}
    bodies = set()
    for name, path in refusals.items():
        response = post(live, "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
        assert response.status_code == 400, response.text
        bodies.add(response.text.replace(repr(path), "PATH"))
    assert len(bodies) == 1, bodies  # outside and missing read the same: no probing of the disk
    assert "not found" in bodies.pop()
    ok = post(live, "/v1/load_lora_adapter", json={"lora_name": "new", "lora_path": "a1"})
    assert ok.status_code == 200, ok.text
    assert {a.name for a in live.engine.adapters()} == {"a1", "a2", "b1", "b2", "new"}


# -- 2. the event loop never blocks ----------------------------------------------------------------------

def test_health_answers_fast_while_steps_are_long(launch, world, monkeypatch):
    live = launch(lora_root=str(world["loras"]))
    slow_forward(live.engine, monkeypatch, 0.4)
    results = {}

    def call(tag, path, body):
        results[tag] = post(live, path, json=body)
    work = [threading.Thread(target=call, args=("gen", "/v1/completions",
                                                {"model": "a1", "prompt": [5, 9], "max_tokens": 5, "ignore_eos": True}))]
    work[0].start()
    time.sleep(0.6)  # a step is running now
    work += [threading.Thread(target=call, args=("unload", "/v1/unload_lora_adapter", {"lora_name": "b2"})),
             threading.Thread(target=call, args=("load", "/v1/load_lora_adapter",
                                                 {"lora_name": "n", "lora_path": "b1"})),
             threading.Thread(target=call, args=("gen2", "/v1/completions",
                                                 {"model": "a2", "prompt": "w5 w6", "max_tokens": 2}))]
    for t in work[1:]:
        t.start()
    worst = 0.0
    with httpx.Client(timeout=10) as client:
        while any(t.is_alive() for t in work):
            t0 = time.perf_counter()
            assert client.get(f"{live.url}/health").status_code == 200
            worst = max(worst, time.perf_counter() - t0)
            time.sleep(0.02)
    assert {k: r.status_code for k, r in results.items()} == {"gen": 200, "unload": 200, "load": 200, "gen2": 200}
    # A blocked loop waits out a 0.4 s step; the bound leaves room for a loaded machine (0.1 s was flaky there).
    assert worst < 0.25, f"/health took {worst * 1000:.0f} ms while the engine stepped"


# -- 3. limits ---------------------------------------------------------------------------------------------

def test_oversized_body_is_413_before_it_is_read(launch):
    live = launch(limits=Limits(max_request_bytes=1000))
    body = {"model": "a1", "prompt": "w5 " * 400, "max_tokens": 1}
    response = post(live, "/v1/completions", json=body)
    assert response.status_code == 413 and "--max-request-bytes" in response.json()["error"]["message"]

    def chunks():  # no Content-Length: counted as it streams in
        for _ in range(100):
            yield b"w5 " * 100
    response = post(live, "/v1/completions", content=chunks())
    assert response.status_code == 413, response.text
    assert post(live, "/v1/completions", json={"model": "a1", "prompt": "w5", "max_tokens": 1}).status_code == 200


@pytest.mark.parametrize("extra, param", [
    ({"n": 17}, "n"),
    ({"stop": [f"w{i}" for i in range(9)]}, "stop"),
    ({"stop": "x" * 257}, "stop"),
    ({"max_tokens": 10_000}, "max_tokens"),
])
def test_field_limits_are_400_naming_the_field(launch, extra, param):
    live = launch()
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="any", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="a1", prompt="w5", **{"max_tokens": 2, **extra})
    assert info.value.body["param"] == param


def test_concurrent_requests_per_key_are_429(launch, world, monkeypatch):
    live = launch(access=Access(load_api_keys(world["keys"])), limits=Limits(max_concurrent=2))
    slow_forward(live.engine, monkeypatch, 0.2)
    body = {"model": "a1", "prompt": [5], "max_tokens": 20, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=live.url, timeout=30) as http:
        auth = {"Authorization": "Bearer k-one"}
        streams = [http.send(http.build_request("POST", "/v1/completions", json=body, headers=auth), stream=True)
                   for _ in range(2)]
        assert [s.status_code for s in streams] == [200, 200]
        third = http.post("/v1/completions", json=body, headers=auth)
        assert third.status_code == 429 and third.json()["error"]["type"] == "RateLimitError"
        other = http.post("/v1/completions", json={**body, "model": "b1", "stream": False, "max_tokens": 1},
                          headers={"Authorization": "Bearer k-two"})
        assert other.status_code == 200  # the bound is per key
        for s in streams:
            s.close()
        deadline = time.monotonic() + 10
        while (r := http.post("/v1/completions", json={**body, "stream": False, "max_tokens": 1},
                              headers=auth)).status_code == 429:
            assert time.monotonic() < deadline, "closed streams still count"
            time.sleep(0.1)
        assert r.status_code == 200


# -- 4. access per adapter ---------------------------------------------------------------------------------

def test_tenants_see_and_use_only_their_adapters(launch, world):
    live = launch(access=Access(load_api_keys(world["keys"])), lora_root=str(world["loras"]))
    one = openai.OpenAI(base_url=f"{live.url}/v1", api_key="k-one", max_retries=0)
    two = openai.OpenAI(base_url=f"{live.url}/v1", api_key="k-two", max_retries=0)
    assert sorted(m.id for m in one.models.list().data) == ["a1", "a2"]  # the base only if listed
    assert sorted(m.id for m in two.models.list().data) == ["b1", "b2", "tiny"]
    op = sorted(m["id"] for m in httpx.get(f"{live.url}/v1/models", headers={"Authorization": "Bearer k-op"})
                .json()["data"])
    assert op == ["a1", "a2", "b1", "b2", "tiny"]
    assert one.completions.create(model="a1", prompt="w5", max_tokens=2).choices

    def missing_like(key, model, path, body):
        got = post(live, path, key, json={**body, "model": model})
        ghost = post(live, path, key, json={**body, "model": "ghost"})
        assert got.status_code == ghost.status_code == 404
        assert got.text.replace(model, "NAME") == ghost.text.replace("ghost", "NAME")
        assert not any(name in got.text for name in ("a1", "a2", "b1", "b2") if name != model)

    for key, theirs in (("k-one", ["b1", "b2", "tiny"]), ("k-two", ["a1", "a2"])):
        for model in theirs:
            missing_like(key, model, "/v1/completions", {"prompt": "w5", "max_tokens": 2})
            missing_like(key, model, "/v1/chat/completions", {"messages": [{"role": "user", "content": "w5"}]})
            missing_like(key, model, "/v1/completions", {"prompt": [5] * 400, "max_tokens": 2})  # too long too
        unknown_route = post(live, "/v1/no-such-endpoint", key, json={})
        for path, body in (("/v1/load_lora_adapter", {"lora_name": "z", "lora_path": "a1"}),
                           ("/v1/unload_lora_adapter", {"lora_name": theirs[0]})):
            refused = post(live, path, key, json=body)
            assert (refused.status_code, refused.text) == (unknown_route.status_code, unknown_route.text)
    assert {a.name for a in live.engine.adapters()} == {"a1", "a2", "b1", "b2"}
    assert post(live, "/v1/load_lora_adapter", "k-op", json={"lora_name": "z", "lora_path": "a1"}).status_code == 200


def test_single_api_key_is_an_operator_key_next_to_the_file(launch, world):
    live = launch(api_key="solo", access=Access(load_api_keys(world["keys"])))
    models = httpx.get(f"{live.url}/v1/models", headers={"Authorization": "Bearer solo"}).json()["data"]
    assert len(models) == 5
    assert httpx.get(f"{live.url}/v1/models", headers={"Authorization": "Bearer k-on"}).status_code == 401


@pytest.mark.parametrize("text, fragment", [
    ('{\n  "k": ["a"],\n  "j": ["b"\n}', "line 4"),
    ('{"k": "a"}', "key 'k'"),
    ('{"k": []}', "key 'k'"),
    ('["k"]', "JSON object"),
])
def test_a_bad_keys_file_stops_the_start_naming_the_problem(tmp_path, capsys, text, fragment):
    from deltatune.cli import main

    keys = tmp_path / "keys.json"
    keys.write_text(text)
    assert main(["serve", "--model", str(tmp_path / "never-loaded"), "--api-keys", str(keys), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert str(keys) in err and fragment in err, err


def test_enable_lora_loading_needs_a_root(tmp_path, capsys):
    from deltatune.cli import main

    assert main(["serve", "--model", str(tmp_path), "--enable-lora-loading", "--port", "0"]) == 2
    assert "--lora-root" in capsys.readouterr().err
