"""``deltatune serve --replicas 2``: the same server over two engines on a local Ray Serve instance.

One replicated server (its own local Ray cluster, 2 replicas x 1 thread, ``--max-loras 1
--max-cpu-loras 1``: each engine 1 adapter ready and 1 in host memory, each replica's LRU 2) and one
single-process server on the same tiny base and adapters, both real subprocesses on loopback ports,
started once for the module. The tests run in file order: routing first (its load counts are read from
a fresh cluster), the replica kill last.
"""
from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.serving_fixtures import KEY, Server, make_adapter, make_base

openai = pytest.importorskip("openai")
pytest.importorskip("ray.serve", reason="Ray Serve is an optional extra: pip install 'deltatune[ray]'")

ADAPTERS = list("abcd")
TENANT = "sk-tenant-ab"     # may use the base, a and b only
BASE = "tiny"
PROMPTS = [[5, 9, 17, 33], [40, 41], [7] * 12]


def _start_both(root: Path) -> dict:
    base = make_base(root / "base")
    paths = {name: make_adapter(base, root / "adapters" / name, seed) for seed, name in enumerate(ADAPTERS)}
    for seed, name in ((11, "v1"), (12, "v2")):   # two versions of one name for the reload tests
        paths[name] = make_adapter(base, root / "versions" / name, seed)
    keys = root / "keys.json"
    keys.write_text(json.dumps({KEY: ["*"], TENANT: [BASE, "a", "b"]}))
    common = ["--served-model-name", BASE, "--api-keys", str(keys), "--max-num-seqs", "8", "--max-lora-rank", "16"]
    servers: dict = {}

    def start(label: str, *args: str) -> None:
        try:
            servers[label] = Server(base, *common, *args, log=root / f"{label}.log", timeout=300)
        except Exception as exc:  # noqa: BLE001 — reported below
            servers[label] = exc

    named = [arg for n in ADAPTERS for arg in ("--adapter", f"{n}={paths[n]}")]
    threads = [threading.Thread(target=start, args=("one", *named)),
               threading.Thread(target=start, args=("ray", "--replicas", "2", "--threads-per-replica", "1",
                                                    "--max-loras", "1", "--max-cpu-loras", "1",
                                                    "--adapters-dir", str(root / "adapters"),
                                                    "--enable-lora-loading", "--lora-root", str(root)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = [s for s in servers.values() if isinstance(s, Exception)]
    if failed:
        for s in servers.values():
            if isinstance(s, Server):
                s.stop()
        raise failed[0]
    return dict(base=base, paths=paths, root=root, **servers)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    world = _start_both(tmp_path_factory.mktemp("replicas"))
    yield world
    world["ray"].stop()
    world["one"].stop()


def client(server: Server, key: str = KEY):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=120)


def complete(server: Server, model: str, prompt, max_tokens: int = 12, key: str = KEY) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {key}"}, timeout=120,
                      json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})


def replicas(server: Server) -> dict:
    """From /metrics: replica id -> {"pid", "resident": {adapter: version}, "loads": {adapter: n}, "reloads": ...,
    "file_reads": n, "ready_swaps": n}."""
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    out = {rid: {"pid": int(pid), "resident": {}, "loads": {}, "reloads": {}}
           for rid, pid in re.findall(r'replica_info\{replica="(\w+)",pid="(\d+)"', text)}
    for rid, name, version in re.findall(r'replica_adapter_resident\{replica="(\w+)",adapter="(\w+)",version="(\d+)"',
                                         text):
        out[rid]["resident"][name] = int(version)
    for kind in ("loads", "reloads"):
        for rid, name, n in re.findall(rf'replica_adapter_{kind}_total\{{replica="(\w+)",adapter="(\w+)"\}} (\S+)', text):
            out[rid][kind][name] = float(n)
    for kind in ("file_reads", "ready_swaps"):
        for rid, n in re.findall(rf'replica_adapter_{kind}_total\{{replica="(\w+)"\}} (\S+)', text):
            out[rid][kind] = float(n)
    return out


def settled(server: Server) -> dict:
    time.sleep(0.6)  # replicas report every 0.2 s
    return replicas(server)


# -- without replicas, nothing changes and Ray is not imported -----------------------------------------

def test_ray_is_not_imported_without_replicas():
    code = ("import sys; from deltatune.cli import build_parser; import deltatune.serving.server, deltatune.cli.serve; "
            "build_parser().parse_args(['serve', '--model', 'm', '--adapters-dir', 'd']); "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith(('ray.', 'deltatune.serving.replicas'))))")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("argv, message", [
    (["--replicas", "0"], "--replicas must be an integer >= 1, got 0"),
    (["--replicas", "2", "--threads-per-replica", "0"], "--threads-per-replica must be an integer >= 1, got 0"),
    (["--threads-per-replica", "2"], "--threads-per-replica is used only with --replicas N or --ray-address ADDR"),
    (["--replicas", "2", "--adapters-dir", "/nonexistent-dir"], "--adapters-dir /nonexistent-dir: not a directory"),
])
def test_bad_replica_flags_are_refused_before_anything_starts(argv, message, capsys):
    from deltatune.cli import main

    assert main(["serve", *argv]) == 2
    assert message in capsys.readouterr().err


def test_adapters_dir_serves_each_adapter_directory_under_its_name(tmp_path):
    from deltatune.cli.serve import adapters_in

    for name in ("sql", "chat"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text("{}")
    (tmp_path / "notes").mkdir()
    assert adapters_in(tmp_path) == {"chat": str(tmp_path / "chat"), "sql": str(tmp_path / "sql")}
    with pytest.raises(ValueError, match="no subdirectory holds an adapter_config.json"):
        adapters_in(tmp_path / "notes")


class FakeEngine:
    """Records what a replica's Residency asks of its engine."""

    def __init__(self) -> None:
        self.calls: list = []

    def add_adapter(self, name, path, *, replace=False):
        if "broken" in str(path):
            from deltatune.serving.errors import AdapterLoadError
            raise AdapterLoadError(f"cannot load adapter from {path!r}", "lora_path")
        self.calls.append(("add", name, path, replace))

    def remove_adapter(self, name):
        self.calls.append(("remove", name))

    def submit(self, prompt, adapter=None, sampling=None):
        return ("handle", adapter)


def test_a_replica_reloads_an_older_version_in_place_and_unloads_on_eviction():
    from deltatune.serving.replicas_worker import Residency

    engine = FakeEngine()
    res = Residency(engine)
    res.want("a", "/v1", 1)
    token = res.on_miss("a")                          # Serve's LRU missed: a first load
    assert res.submit("a", [5], None) == ("handle", "a")
    res.want("a", "/v2", 2)                           # a request carrying the catalog's next version
    res.submit("a", [5], None)
    res.want("a", "/v1", 1)                           # an older version never goes back
    res.submit("a", [5], None)
    assert engine.calls == [("add", "a", "/v1", False), ("add", "a", "/v2", True)]
    assert res.report()["resident"] == {"a": 2} and res.report()["loads"] == {"a": 1}
    res.want("a", "/broken", 3)                       # a version that cannot load: the held one stays
    with pytest.raises(Exception, match="cannot load adapter"):
        res.submit("a", [5], None)
    assert res.report()["resident"] == {"a": 2} and res.submit("a", [5], None) == ("handle", "a")
    token.__del__()                                   # Serve evicts: the engine unloads it, once
    token.__del__()                                   # (the garbage collector calls it again)
    assert engine.calls[-1] == ("remove", "a") and engine.calls.count(("remove", "a")) == 1
    assert res.submit("a", [5], None) is None         # evicted meanwhile: the caller asks Serve again


def test_board_changes_reach_only_the_replicas_holding_the_adapter():
    from deltatune.serving.replicas_worker import AdapterBoard, Residency

    board, engine = AdapterBoard(), FakeEngine()
    res = Residency(engine)
    res.want("a", "/v1", 1)
    res.on_miss("a")
    board.publish("a", "/v2", 2)
    board.publish("b", "/b1", 1)                      # not held here: left for first use
    board.publish("a", None, None)                    # unloaded
    for _, name, path, version in board.sync({"replica": "r1", "seen": 0}, 0):
        res.apply(name, path, version)
    assert engine.calls == [("add", "a", "/v1", False), ("add", "a", "/v2", True), ("remove", "a")]
    assert res.report()["resident"] == {} and board.get_reports()["r1"]["seen"] == 0
    assert board.sync({"replica": "r1", "seen": 3}, 3) == []


# -- routing -------------------------------------------------------------------------------------------

class _Replica:
    """What the router reads of a replica: its id, what it reported holding, its request limit."""

    def __init__(self, rid: str) -> None:
        self.replica_id, self.multiplexed_model_ids, self.max_ongoing_requests = rid, set(), 4


def _router(queue: dict):
    """The router without a Serve cluster: queue lengths come from ``queue`` (absent = unknown)."""
    import types

    from deltatune.serving.replicas_router import AdapterAffinityRouter

    router = AdapterAffinityRouter.__new__(AdapterAffinityRouter)
    router.initialize_state(max_loras=2)
    router.select_available_replicas = lambda rs: [r for r in rs if queue.get(r.replica_id, 0) < r.max_ongoing_requests]
    router._queue_len = lambda r: queue.get(r.replica_id)
    route = lambda replicas, adapter: asyncio.run(router.choose_replicas(  # noqa: E731
        replicas, types.SimpleNamespace(metadata=types.SimpleNamespace(multiplexed_model_id=adapter))))
    return router, route


def test_the_router_keeps_each_adapter_where_it_sent_it_before_any_report():
    """Serve's replicas report what they hold late (here: never); the router still keeps 4 adapters on
    2 replicas of 2 each, waits for a holder that is slow to answer, spills only from a full one, and
    forgets a replica that is gone."""
    r1, r2 = _Replica("r1"), _Replica("r2")
    queue: dict = {}
    _, route = _router(queue)
    home = {}
    for name in "abcd":
        (chosen,) = route([r1, r2], name)
        assert len(chosen) == 1
        home[name] = chosen[0]
    assert sorted(len([n for n in home if home[n] is r]) for r in (r1, r2)) == [2, 2]
    for name in "dcbaabcd" * 3:                      # every later request: the same replica, nothing reloads
        assert route([r1, r2], name) == [[home[name]]]
    queue[home["a"].replica_id] = 4                   # a's replica is full, the other idle: a spills there
    other = r2 if home["a"] is r1 else r1
    assert route([r1, r2], "a") == [[other]]
    queue.clear()
    assert route([other], "c") == [[other]]            # c's replica is gone: c goes to the living one
    assert route([r1, r2], "x")[0][0] in (r1, r2) and route([r1, r2], "") != []   # base: any replica




def test_a_full_holder_keeps_its_adapter_unless_another_replica_is_far_less_busy():
    """Both replicas full (64 clients on 2 x 32): the request queues at its adapter's holder, so the
    other replica does not load it too; it spills only to a replica below spill_below of its limit."""
    r1, r2 = _Replica("r1"), _Replica("r2")
    queue: dict = {"r1": 0, "r2": 0}
    router, route = _router(queue)
    assert router.spill_below == 0.5
    (first,) = route([r1, r2], "a")
    holder = first[0]
    other = r2 if holder is r1 else r1
    queue[holder.replica_id], queue[other.replica_id] = 4, 4      # both full: wait for the holder
    assert route([r1, r2], "a") == [[holder]]
    queue[other.replica_id] = 2                                   # half busy: still not worth a second load
    assert route([r1, r2], "a") == [[holder]]
    assert "a" not in router.homes.get(other.replica_id, {})
    queue[other.replica_id] = 1                                   # far less busy: spill, and remember it
    assert route([r1, r2], "a") == [[other]]
    assert "a" in router.homes[other.replica_id]
    router.spill_below = 1.0                                      # the rule before: any replica with room
    queue[other.replica_id] = 3
    assert route([r1, r2], "b") in ([[r1]], [[r2]])
    queue[r1.replica_id] = queue[r2.replica_id] = 4               # an adapter held nowhere, all full: its home
    homes = {route([r1, r2], "new")[0][0] for _ in range(5)}
    assert len(homes) == 1



def test_new_adapters_go_where_the_traffic_is_lighter_within_each_replicas_room():
    """A hot adapter's replica gets no new adapter while the other has room in its LRU (2 here)."""
    import types

    r1, r2 = _Replica("r1"), _Replica("r2")
    router, route = _router({})
    (hot,) = route([r1, r2], "hot")
    other = r2 if hot[0] is r1 else r1
    for _ in range(10):
        router.on_request_routed(types.SimpleNamespace(metadata=types.SimpleNamespace(multiplexed_model_id="hot")),
                                 hot[0].replica_id, None)
    assert route([r1, r2], "x") == [[other]] and route([r1, r2], "y") == [[other]]
    assert route([r1, r2], "z") == [[hot[0]]]           # the other replica's 2 slots are taken
    for name in "xyz":
        router.on_request_routed(types.SimpleNamespace(metadata=types.SimpleNamespace(multiplexed_model_id=name)),
                                 None, None)
    router.select_available_replicas = lambda rs: [r for r in rs if r is not hot[0]]   # hot's replica is full
    assert route([r1, r2], "z") == [[hot[0]]]           # a cold adapter waits for its holder: no second load
    assert route([r1, r2], "hot") == [[other]]          # the hot one spills: a second copy takes load off

def test_requests_go_to_the_replica_holding_their_adapter(world):
    """2 replicas, 4 adapters, 1 ready + 1 in host memory each: each adapter's files are read at most twice
    (once per replica), not once per request; switching the ready adapter comes from host memory. A
    replica LRU sized by max_loras alone (1) could not keep 4 adapters on 2 replicas and reads them again."""
    server = world["ray"]
    before = settled(server)   # the loads counters run from the replicas' start: earlier tests loaded too
    assert len(before) == 2
    order = [ADAPTERS[i % 4] for i in range(8)] + [ADAPTERS[(i * 7) % 4] for i in range(40)]
    for name in order[:8]:  # one client first, then four at once
        assert complete(server, name, [5, 6], 4).status_code == 200
    with ThreadPoolExecutor(4) as pool:
        assert {r.status_code for r in pool.map(lambda n: complete(server, n, [5, 6], 4), order[8:])} == {200}
    state = settled(server)
    loads = {name: sum(r["loads"].get(name, 0) - before.get(rid, {"loads": {}})["loads"].get(name, 0)
                       for rid, r in state.items()) for name in ADAPTERS}
    assert all(n <= 2 for n in loads.values()), (loads, before, state)
    assert all(len(r["resident"]) <= 2 for r in state.values()), state  # each LRU: max_loras + max_cpu_loras
    delta = {k: sum(r[k] - before.get(rid, {}).get(k, 0) for rid, r in state.items()) for k in ("file_reads",
                                                                                             "ready_swaps")}
    assert delta["file_reads"] == sum(loads.values()), (delta, loads)  # no read from disk beyond the loads
    assert delta["ready_swaps"] >= 4, delta     # the engines swapped their one ready slot from host memory


# -- the same server -----------------------------------------------------------------------------------

def test_every_endpoint_answers_as_the_single_process_server(world):
    one, many = client(world["one"]), client(world["ray"])
    assert [(m.id, m.root, getattr(m, "parent", None)) for m in one.models.list().data] == \
           [(m.id, m.root, getattr(m, "parent", None)) for m in many.models.list().data]
    for model in [BASE, *ADAPTERS]:
        for prompt in PROMPTS:
            got = [c.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0) for c in (one, many)]
            assert [(x.choices[0].text, x.choices[0].finish_reason, x.usage.total_tokens) for x in got[:1]] == \
                   [(x.choices[0].text, x.choices[0].finish_reason, x.usage.total_tokens) for x in got[1:]], model
        messages = [{"role": "user", "content": "w20 w21 w22"}]
        chats = [c.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0)
                 for c in (one, many)]
        assert chats[0].choices[0].message.content == chats[1].choices[0].message.content
        assert chats[0].usage.prompt_tokens == chats[1].usage.prompt_tokens
        streams = ["".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model=model, messages=messages, max_tokens=10, temperature=0, stream=True) if ch.choices)
            for c in (one, many)]
        assert streams[0] == streams[1] == chats[0].choices[0].message.content


def test_tenant_keys_and_limits_apply_at_the_entry_point(world):
    server = world["ray"]
    tenant = client(server, TENANT)
    assert sorted(m.id for m in tenant.models.list().data) == sorted([BASE, "a", "b"])
    hidden, missing = complete(server, "c", [5], key=TENANT), complete(server, "nope", [5], key=TENANT)
    assert hidden.status_code == missing.status_code == 404
    assert hidden.json()["error"]["message"].replace("'c'", "X") == missing.json()["error"]["message"].replace(
        "'nope'", "X")
    assert complete(server, "a", [5], key="sk-wrong").status_code == 401
    too_long = complete(server, "a", [5] * 300)  # the context is 256: refused by the replica's engine, as in one
    assert too_long.status_code == 400 and "maximum context length" in too_long.json()["error"]["message"]
    assert httpx.get(f"{server.url}/", timeout=30).status_code == 200  # the playground


# -- adapters at runtime -------------------------------------------------------------------------------

def _load(server: Server, name: str, path: Path, inplace: bool = False) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/load_lora_adapter", headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                      json={"lora_name": name, "lora_path": str(path), "load_inplace": inplace})


def test_load_reload_and_unload_reach_the_replicas(world):
    server, paths = world["ray"], world["paths"]
    assert _load(server, "x", paths["v1"]).status_code == 200
    first = complete(server, "x", [8, 9], 10).json()["choices"][0]["text"]
    state = settled(server)
    assert [r["resident"].get("x") for r in state.values() if "x" in r["resident"]] == [1]
    reloaded = _load(server, "x", paths["v2"], inplace=True)
    assert reloaded.status_code == 200 and "version 2" in reloaded.text
    second = complete(server, "x", [8, 9], 10).json()["choices"][0]["text"]
    assert second != first
    state = settled(server)
    holders = [r for r in state.values() if "x" in r["resident"]]
    assert holders and all(r["resident"]["x"] == 2 for r in holders), state
    bad = _load(server, "y", world["root"] / "versions")  # not an adapter directory
    assert bad.status_code == 400
    gone = httpx.post(f"{server.url}/v1/unload_lora_adapter", headers={"Authorization": f"Bearer {KEY}"},
                      json={"lora_name": "x"}, timeout=60)
    assert gone.status_code == 200
    assert complete(server, "x", [8, 9]).status_code == 404
    assert all("x" not in r["resident"] for r in replicas(server).values())  # unload waited for every replica


def test_a_reload_under_load_gives_no_mixed_answers(world):
    server, paths = world["ray"], world["paths"]
    assert _load(server, "z", paths["v1"]).status_code == 200
    prompt = [30, 31, 32]
    old = complete(server, "z", prompt, 24).json()["choices"][0]["text"]
    stop = threading.Event()

    def hammer() -> list:
        seen = []
        while not stop.is_set():
            r = complete(server, "z", prompt, 24)
            seen.append((r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else r.text))
        return seen

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(hammer) for _ in range(4)]
        time.sleep(1.0)
        assert _load(server, "z", paths["v2"], inplace=True).status_code == 200
        new = complete(server, "z", prompt, 24).json()["choices"][0]["text"]  # after the reload: the new version
        time.sleep(1.0)
        stop.set()
        answers = [a for f in futures for a in f.result()]
    assert new != old
    assert {a for a in answers} <= {(200, old), (200, new)}, [a for a in answers if a not in {(200, old), (200, new)}]
    assert (200, old) in answers and (200, new) in answers


# -- a replica dies ------------------------------------------------------------------------------------

def _stream(server: Server, model: str, prompt, max_tokens: int, out: queue.Queue) -> None:
    """A streamed greedy completion; each event's text (or ``("error", message)``) into ``out``, then None."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    try:
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120,
                          headers={"Authorization": f"Bearer {KEY}"}) as r:
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    out.put(("error", event["error"]["message"]))
                elif event["choices"]:
                    out.put(("text", event["choices"][0]["text"] or ""))
    finally:
        out.put(None)


def _frozen_mid_request(server: Server, pid: int, tries: int = 3) -> tuple[queue.Queue, list]:
    """Start a long streamed request for ``k`` (held by the replica ``pid`` only), freeze that replica
    (SIGSTOP) once the request has streamed its first text, and return the stream with what it sent,
    proven unfinished: the frozen replica sends nothing more, and the stream has not ended. A request
    that ended before the freeze (a fast machine) is tried again with the replica thawed."""
    for _ in range(tries):
        events: queue.Queue = queue.Queue()
        threading.Thread(target=_stream, args=(server, "k", [5, 9], 200, events), daemon=True).start()
        first = events.get(timeout=60)
        assert first is not None and first[0] == "text", first
        os.kill(pid, signal.SIGSTOP)
        seen = [first]
        while True:           # drain what was on its way; the frozen replica adds nothing: quiet, then decide
            try:
                seen.append(events.get(timeout=1.5))
            except queue.Empty:
                break
        if None not in seen:
            return events, seen
        os.kill(pid, signal.SIGCONT)   # it finished before the freeze: nothing was in flight, try again
    pytest.fail(f"a 200-token request for 'k' finished before its replica could be frozen, {tries} times")


def test_a_killed_replica_fails_its_requests_clearly_and_is_replaced(world):
    """A request streaming on one replica when that replica is killed ends with a clear 503 error; the
    requests sent while it was frozen are retried on the survivor and answered; new requests go to the
    survivor; Ray brings up a replacement; nothing else fails."""
    server, paths = world["ray"], world["paths"]
    assert _load(server, "k", paths["v1"]).status_code == 200     # loaded on one replica only
    full = httpx.post(f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                      json={"model": "k", "prompt": [5, 9], "max_tokens": 200, "temperature": 0, "ignore_eos": True})
    assert full.status_code == 200
    deadline = time.monotonic() + 20
    while len(holders := [rid for rid, r in replicas(server).items() if "k" in r["resident"]]) != 1:
        assert time.monotonic() < deadline, f"'k' should be resident on one replica: {replicas(server)}"
        time.sleep(0.2)
    (victim,) = holders
    pid = replicas(server)[victim]["pid"]
    want = {n: complete(world["one"], n, [5, 9], 20).json()["choices"][0]["text"] for n in ADAPTERS}
    want["k"] = complete(server, "k", [5, 9], 20).json()["choices"][0]["text"]
    events, seen = _frozen_mid_request(server, pid)
    with ThreadPoolExecutor(8) as pool:   # sent while the victim is frozen: some reach it, none may fail
        names = ["k", *ADAPTERS, "k", *ADAPTERS]
        futures = [pool.submit(complete, server, n, [5, 9], 20) for n in names]
        os.kill(pid, signal.SIGKILL)
        results = [f.result() for f in futures]
    while (item := events.get(timeout=60)) is not None:
        seen.append(item)
    errors = [e for kind, e in seen if kind == "error"]
    assert len(errors) == 1 and "stopped after it had sent part of the answer" in errors[0], seen
    text = "".join(t for kind, t in seen if kind == "text")
    assert text and full.json()["choices"][0]["text"].startswith(text), (text, full.text)  # a true prefix, cut
    assert [(r.status_code, r.json()["choices"][0]["text"]) for r in results] == [(200, want[n]) for n in names]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        now = replicas(server)
        if len(now) == 2 and victim not in now:
            break
        time.sleep(1.0)
    else:
        pytest.fail(f"Ray did not bring up a replacement for replica {victim} in 120 s: {replicas(server)}")
    assert [complete(server, n, [5, 9], 20).json()["choices"][0]["text"] for n in ("k", "c")] == [want["k"], want["c"]]
