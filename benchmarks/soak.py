"""Soak `deltatune serve`: minutes of mixed load on 8 adapters plus the base, with adapters loaded,
reloaded in place and unloaded, clients killed mid-stream and hostile requests in between.

The real server (uvicorn in a subprocess, loopback port), ``--max-loras 4 --max-cpu-loras 2`` so the
8 adapters keep moving between the ready bank, host memory and disk. Adapters: ``a0``..``a4``,
``sql-lora-v1.2`` (a dotted name), ``flip`` (its tensor file is rewritten between two versions, then
reloaded in place, or left for the engine to find when it re-reads it from disk) and ``blink``
(unloaded and loaded again). Tasks, all at once for ``--seconds``:

- ``--clients`` load clients: greedy requests (temperature 0 or 1e-45), streamed or not, completions
  or chat, on a random model and prompt, plus sampled ones (seeded) and long ones (96 tokens);
- a killer: opens streams and drops the connection after the first chunk (or before any byte);
- churn: rewrites ``flip``'s file (atomically) and reloads it in place, or not; unloads ``blink``,
  loads it again; loads and unloads a dotted ``tmp.v1.2`` while long requests run;
- hostile requests, each with the statuses it may get: ``temperature=1e-45``, bad adapter names,
  a 2 MiB body, 1,000 stop strings and a 10,000-character one, ``lora_path`` probes outside the
  root, a missing key;
- a /health probe every 50 ms (its own thread and connection) and the server's RSS every second.

Every greedy answer is compared with the same prompt decoded alone by ``PeftModel`` (references
per (adapter version, prompt), made before the run): ``flip`` may answer with either version, never
a mix. Must hold: 0 requests lost (every request gets a complete answer or an expected refusal), 0
mixed answers, no 5xx, RSS growth after warm-up < 5 %, p99 /health latency < 100 ms.

Writes benchmarks/results/soak.json and soak.png (RSS and /health latency over time).

    .venv/bin/python benchmarks/soak.py [--seconds 600] [--model tiny|default] [--clients 12]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for extra in (ROOT, ROOT / "benchmarks"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

import httpx  # noqa: E402

from fuzz import rss_bytes  # noqa: E402
from serve_http import percentile  # noqa: E402  (the throughput and latency benchmarks' percentile)
from tests.serving_fixtures import KEY, Server, make_adapter, make_base  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
STABLE = ["a0", "a1", "a2", "a3", "a4", "sql-lora-v1.2"]
ADAPTERS = STABLE + ["flip", "blink"]            # the 8 adapters served from the start
BASE_NAME = "soak-base"
PROMPTS = [[5, 9, 17, 33], [40, 41, 42], [7, 100, 3, 64, 12], "w88 w21 w9", "w60 w61"]  # ids, or chat text
GREEDY_TOKENS = 12
SPEC = dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"])  # flip's two versions share it
BOUNDS = {"rss_growth": 0.05, "health_p99_s": 0.100}


# -- the world: base, adapters, references ----------------------------------------------------------

def build_world(root: Path, model: str) -> dict:
    """The base (``tiny``: the tests' random Llama; ``default``: SmolLM2-135M-Instruct) and the
    adapters under ``root/loras``; ``flip``'s second version kept aside in ``root/flip-v2``."""
    base = make_base(root / "base") if model == "tiny" else "default"
    loras = root / "loras"
    dirs = {name: make_adapter(base, loras / name, seed, **SPEC if name == "flip" else {})
            for seed, name in enumerate(ADAPTERS)}
    dirs["tmp.v1.2"] = make_adapter(base, loras / "tmp", 11)
    versions = {"v1": root / "flip-v1", "v2": make_adapter(base, root / "flip-v2", 21, **SPEC)}
    shutil.copytree(dirs["flip"], versions["v1"])
    return {"base": base, "loras": loras, "dirs": dirs, "flip_versions": versions, "model": model}


def prompt_ids(tokenizer, prompt) -> list[int]:
    """A prompt's token ids as the server makes them: ids as given, chat text through the template."""
    if isinstance(prompt, list):
        return prompt
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def references(world: dict) -> dict:
    """``(model name, prompt index) -> [(token ids, top-2 logit gaps), ...]``: each prompt decoded
    greedily alone by ``PeftModel`` (HF ``generate``), one entry per version the name may answer
    with (two for ``flip``)."""
    from deltatune import PeftModel, models

    tokenizer = models.load_tokenizer(world["base"])
    sources = {name: [world["dirs"][name]] for name in ADAPTERS if name != "flip"}
    sources["flip"] = list(world["flip_versions"].values())
    sources[BASE_NAME] = [None]
    refs = {}
    for name, dirs in sources.items():
        for directory in dirs:
            model = models.load(world["base"]).eval()
            model = PeftModel.from_pretrained(model, directory).eval() if directory else model
            for p, prompt in enumerate(PROMPTS):
                refs.setdefault((name, p), []).append(greedy_alone(model, prompt_ids(tokenizer, prompt)))
    return {"refs": refs, "tokenizer": tokenizer}


def greedy_alone(model, ids: list[int]) -> tuple[list[int], list[float]]:
    """``GREEDY_TOKENS`` argmax tokens after ``ids``, eos included and not stopping there (the
    requests send ``ignore_eos``), each step a full forward of the whole sequence (no cache, no
    batch); and at each step the gap between the two highest logits."""
    import torch

    ids, new, gaps = list(ids), [], []
    with torch.no_grad():
        for _ in range(GREEDY_TOKENS):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]          # (V,)
            top = logits.topk(2).values
            gaps.append(float(top[0] - top[1]))
            new.append(int(logits.argmax()))
            ids.append(new[-1])
    return new, gaps


def matches(text: str, candidates: list, tokenizer, tol: float = 1e-4) -> bool:
    """The server's greedy ``text`` equals one candidate's decoded tokens; a first difference is
    allowed only where that candidate's two best logits were within ``tol`` (a near tie that another
    order of float sums may flip)."""
    for ids, gaps in candidates:
        if " ".join(text.split()) == " ".join(tokenizer.decode(ids, skip_special_tokens=True).split()):
            return True
        got = tokenizer(text, add_special_tokens=False)["input_ids"]
        kept = [i for i, t in enumerate(ids) if t not in tokenizer.all_special_ids]
        for k, (a, step) in enumerate(zip(got + [None] * len(kept), kept)):
            if a != ids[step]:
                if gaps[step] < tol and got[:k] == [ids[i] for i in kept[:k]]:
                    return True
                break
    return False


def start_server(world: dict, root: Path) -> Server:
    adapters = [arg for name in ADAPTERS for arg in ("--adapter", f"{name}={world['dirs'][name]}")]
    return Server(Path(str(world["base"])), *adapters, "--api-key", KEY, "--served-model-name", BASE_NAME,
                  "--max-loras", "4", "--max-cpu-loras", "2", "--max-lora-rank", "16", "--max-num-seqs", "32",
                  "--max-waiting", "512", "--enable-lora-loading", "--lora-root", str(world["loras"]),
                  log=root / "server.log", timeout=300)


def flip_to(world: dict, version: str) -> None:
    """Rewrite ``flip``'s tensor file with ``version``'s (one atomic replace; the config is shared)."""
    name = "adapter_model.safetensors"
    target = world["dirs"]["flip"] / name
    tmp = target.with_suffix(".tmp")
    shutil.copyfile(world["flip_versions"][version] / name, tmp)
    os.replace(tmp, target)


# -- the load ------------------------------------------------------------------------------------------

class Soak:
    """The run's state: what was sent, what came back, and what went wrong."""

    def __init__(self, url: str, world: dict, refs: dict, seconds: float, seed: int) -> None:
        self.url, self.world, self.refs = url, world, refs
        self.start = time.monotonic()
        self.end = self.start + seconds
        self.rng = random.Random(seed)
        self.counts: dict[str, dict] = {}          # kind -> {status: n}
        self.lost: list[dict] = []                 # no complete answer nor an expected refusal
        self.mixed: list[dict] = []                # a greedy answer equal to no reference
        self.unexpected: list[dict] = []           # a status outside the kind's expected set
        self.checked = 0                           # greedy answers compared with a reference
        self.killed = 0
        self.health: list[tuple[float, float, int]] = []   # (t, seconds, status)
        self.rss: list[tuple[float, int]] = []              # (t, bytes)
        self.headers = {"Authorization": f"Bearer {KEY}"}

    def now(self) -> float:
        return time.monotonic() - self.start

    def note(self, kind: str, status, expected: set, detail: dict | None = None) -> None:
        per = self.counts.setdefault(kind, {})
        per[str(status)] = per.get(str(status), 0) + 1
        if status not in expected:
            (self.lost if status == "lost" else self.unexpected).append(
                {"t": round(self.now(), 2), "kind": kind, "status": status, **(detail or {})})


async def ask(http: httpx.AsyncClient, path: str, body: dict, headers: dict, stream: bool):
    """One generation request: ``(status, text, finish_reason)``; text is None for a refusal. A stream
    must end with ``[DONE]`` after a finish reason, else it counts as lost (status "lost")."""
    if not stream:
        r = await http.post(path, json=body, headers=headers)
        if r.status_code != 200:
            return r.status_code, None, None
        choice = r.json()["choices"][0]
        text = choice["text"] if "text" in choice else choice["message"]["content"]
        return 200, text, choice["finish_reason"]
    parts, reason, done = [], None, False
    async with http.stream("POST", path, json={**body, "stream": True}, headers=headers) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, None, None
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                if "error" in event:
                    return event["error"]["code"], None, None
                for choice in event["choices"]:
                    parts.append(choice.get("text") or choice.get("delta", {}).get("content") or "")
                    reason = choice["finish_reason"] or reason
    return (200, "".join(parts), reason) if done and reason else ("lost", None, None)


async def client(soak: Soak, http: httpx.AsyncClient, rng: random.Random) -> None:
    """Greedy (checked against the references), sampled and long requests, one after another."""
    while time.monotonic() < soak.end:
        model = rng.choice(ADAPTERS + [BASE_NAME])
        p = rng.randrange(len(PROMPTS))
        prompt = PROMPTS[p]
        path = "/v1/completions" if isinstance(prompt, list) else "/v1/chat/completions"
        body = {"model": model, "max_tokens": GREEDY_TOKENS, "ignore_eos": True,
                **({"prompt": prompt} if isinstance(prompt, list)
                   else {"messages": [{"role": "user", "content": prompt}]})}
        roll = rng.random()
        kind = "greedy" if roll < 0.7 else "sampled" if roll < 0.9 else "long"
        if kind == "greedy":
            body["temperature"] = rng.choice([0, 0, 1e-45])  # 1e-45: greedy, never NaN for the batch
        elif kind == "sampled":
            body.update(temperature=0.8, top_p=0.9, seed=rng.randrange(1000))
        else:
            body.update(max_tokens=96, temperature=0)
        expected = {200, 404} if model == "blink" else {200}  # blink is unloaded now and then
        try:
            status, text, reason = await ask(http, path, body, soak.headers, stream=rng.random() < 0.5)
        except Exception as exc:  # noqa: BLE001 — no answer at all
            status, text, reason = "lost", None, repr(exc)
        soak.note(kind, status, expected, {"model": model, "why": reason} if status == "lost" else {"model": model})
        if kind == "greedy" and status == 200:
            soak.checked += 1
            if not matches(text, soak.refs["refs"][(model, p)], soak.refs["tokenizer"]):
                soak.mixed.append({"t": round(soak.now(), 2), "model": model, "prompt": p, "text": text})


async def killer(soak: Soak, http: httpx.AsyncClient, rng: random.Random) -> None:
    """Clients that go away: after the first chunk of a long stream, or before the first byte."""
    host, port = soak.url.removeprefix("http://").rsplit(":", 1)
    while time.monotonic() < soak.end:
        body = {"model": rng.choice(ADAPTERS[:6] + [BASE_NAME]), "prompt": PROMPTS[0], "max_tokens": 96,
                "ignore_eos": True, "stream": True}
        if rng.random() < 0.5:
            async with http.stream("POST", "/v1/completions", json=body, headers=soak.headers) as r:
                async for _ in r.aiter_bytes():
                    break
        else:
            _, writer = await asyncio.open_connection(host, int(port))
            data = json.dumps(body).encode()
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
            await writer.drain()
            writer.close()
        soak.killed += 1
        await asyncio.sleep(rng.uniform(0.1, 0.5))


async def churn(soak: Soak, http: httpx.AsyncClient, rng: random.Random) -> None:
    """Adapters change under the load: flip rewritten (reloaded in place, or left for a re-read from
    disk), blink unloaded and loaded again, a dotted adapter unloaded while a long request uses it."""
    version, step = "v1", 0
    while time.monotonic() < soak.end:
        await asyncio.sleep(rng.uniform(1.0, 2.0))
        step += 1
        if step % 3 == 1:
            version = "v2" if version == "v1" else "v1"
            flip_to(soak.world, version)
            if rng.random() < 0.5:  # else the engine finds the change when it reads flip from disk again
                await load(soak, http, "flip", "flip", inplace=True)
        elif step % 3 == 2:
            await unload(soak, http, "blink")
            await asyncio.sleep(rng.uniform(0.1, 1.0))
            await load(soak, http, "blink", "blink")
        else:
            await load(soak, http, "tmp.v1.2", "tmp")
            body = {"model": "tmp.v1.2", "prompt": PROMPTS[1], "max_tokens": 96, "ignore_eos": True}
            long = asyncio.ensure_future(ask(http, "/v1/completions", body, soak.headers, stream=rng.random() < 0.5))
            await asyncio.sleep(0.3)
            await unload(soak, http, "tmp.v1.2")  # the running request keeps the version it pinned
            try:
                status = (await long)[0]
            except Exception:  # noqa: BLE001
                status = "lost"
            soak.note("unload-while-running", status, {200})


async def load(soak: Soak, http, name: str, path: str, inplace: bool = False) -> None:
    r = await http.post("/v1/load_lora_adapter", headers=soak.headers,
                        json={"lora_name": name, "lora_path": path, "load_inplace": inplace})
    soak.note("load", r.status_code, {200}, {"text": r.text[:200]})


async def unload(soak: Soak, http, name: str) -> None:
    r = await http.post("/v1/unload_lora_adapter", headers=soak.headers, json={"lora_name": name})
    soak.note("unload", r.status_code, {200}, {"text": r.text[:200]})


def hostile_requests() -> list[tuple[str, str, dict | bytes, set]]:
    """``(label, path, body, expected statuses)``: every failure case of issue 25 as a client sends it,
    and the bodies that answered 500 before this soak's fixes (raw bytes: a lone surrogate, deep nesting)."""
    gen = {"model": "a0", "prompt": PROMPTS[0], "max_tokens": 4}
    return [
        ("tiny-temperature", "/v1/completions", {**gen, "temperature": 1e-45, "n": 3}, {200}),
        ("dotted-name-use", "/v1/completions", {**gen, "model": "sql-lora-v1.2"}, {200}),
        ("bad-name-load", "/v1/load_lora_adapter", {"lora_name": "tab\tname", "lora_path": "a0"}, {400}),
        ("padded-name-load", "/v1/load_lora_adapter", {"lora_name": " a0 ", "lora_path": "a0"}, {400}),
        ("long-name-load", "/v1/load_lora_adapter", {"lora_name": "n" * 500, "lora_path": "a0"}, {400}),
        ("unknown-model", "/v1/completions", {**gen, "model": "a0.v2/../b"}, {404}),
        ("huge-stop-list", "/v1/completions", {**gen, "stop": [f"s{i}" for i in range(1000)]}, {400}),
        ("long-stop", "/v1/completions", {**gen, "stop": "x" * 10_000}, {400}),
        ("oversized-body", "/v1/completions", {**gen, "prompt": "w5 " * 700_000}, {413}),
        ("huge-n", "/v1/completions", {**gen, "n": 10_000}, {400}),
        ("huge-max-tokens", "/v1/completions", {**gen, "max_tokens": 10**12}, {400}),
        ("bad-token-ids", "/v1/completions", {**gen, "prompt": [10**12, -1]}, {400}),
        ("huge-seed", "/v1/completions", {**gen, "temperature": 1, "seed": 2**80}, {200, 400}),
        ("probe-etc", "/v1/load_lora_adapter", {"lora_name": "p", "lora_path": "/etc"}, {400}),
        ("probe-dotdot", "/v1/load_lora_adapter", {"lora_name": "p", "lora_path": "../../../../etc"}, {400}),
        ("probe-missing", "/v1/load_lora_adapter", {"lora_name": "p", "lora_path": "no-such-dir"}, {400}),
        ("probe-unload-base", "/v1/unload_lora_adapter", {"lora_name": BASE_NAME}, {400, 404}),
        ("lone-surrogate", "/v1/completions", b'{"model": "a0", "prompt": "\\ud800", "max_tokens": 2}', {400}),
        ("deep-nesting", "/v1/completions", b'{"model": "a0", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", {400}),
    ]


async def hostile(soak: Soak, http: httpx.AsyncClient, rng: random.Random) -> None:
    """One hostile request every ~0.4 s; the probes' refusals must all read the same."""
    cases = hostile_requests()
    probe_texts = set()
    while time.monotonic() < soak.end:
        label, path, body, expected = rng.choice(cases)
        headers = soak.headers if rng.random() < 0.9 else {}
        try:
            raw = {"content": body, "headers": {**headers, "Content-Type": "application/json"}}
            r = await http.post(path, **(raw if isinstance(body, bytes) else {"json": body, "headers": headers}))
            status = r.status_code
        except httpx.TransportError:
            # The 413 goes out before the body is read, with "Connection: close": a client still
            # sending may see the connection closed instead of the answer. A refusal, not a loss.
            status, r = ("closed-early" if label == "oversized-body" else "lost"), None
        if not headers:
            expected = {401, 413, "closed-early"} if label == "oversized-body" else {401}
        elif label == "oversized-body":
            expected = expected | {"closed-early"}
        soak.note(f"hostile:{label}", status, expected, {"text": r.text[:200] if r else ""})
        if label.startswith("probe-") and label != "probe-unload-base" and headers and r is not None:
            probe_texts.add(r.json()["error"]["message"].replace(repr(body["lora_path"]), "PATH"))
        await asyncio.sleep(rng.uniform(0.2, 0.6))
    soak.probe_answers = len(probe_texts)


HEALTH_PROBE = """
import sys, time, httpx
url, period = sys.argv[1], float(sys.argv[2])
with httpx.Client(timeout=10) as http:
    while True:
        t0 = time.perf_counter()
        try:
            status = http.get(url).status_code
        except Exception:
            status = 0
        print(time.time(), time.perf_counter() - t0, status, flush=True)
        time.sleep(period)
"""


def watch(soak: Soak, pid: int, stop: threading.Event) -> list:
    """/health every 50 ms from a process of its own (so the load's client work does not delay the
    probe), and the server's RSS every second; returns what :func:`unwatch` ends."""
    probe = subprocess.Popen([sys.executable, "-c", HEALTH_PROBE, f"{soak.url}/health", "0.05"],
                             stdout=subprocess.PIPE, text=True)
    offset = time.time() - soak.now()  # wall clock -> seconds since the start of the run

    def health() -> None:
        for line in probe.stdout:
            wall, seconds, status = line.split()
            soak.health.append((float(wall) - offset, float(seconds), int(status)))

    def rss() -> None:
        while not stop.is_set():
            soak.rss.append((soak.now(), rss_bytes(pid)))
            stop.wait(1.0)
    threads = [threading.Thread(target=health, daemon=True), threading.Thread(target=rss, daemon=True)]
    for t in threads:
        t.start()
    return [probe, *threads]


def unwatch(watchers: list, stop: threading.Event) -> None:
    probe, *threads = watchers
    stop.set()
    probe.terminate()
    probe.wait(10)
    for t in threads:
        t.join(5)


async def drive(soak: Soak, clients: int) -> None:
    limits = httpx.Limits(max_connections=clients + 16)
    async with httpx.AsyncClient(base_url=soak.url, timeout=120, limits=limits) as http:
        rngs = [random.Random(soak.rng.random()) for _ in range(clients + 3)]
        tasks = [client(soak, http, rngs[i]) for i in range(clients)]
        tasks += [killer(soak, http, rngs[-3]), churn(soak, http, rngs[-2]), hostile(soak, http, rngs[-1])]
        await asyncio.gather(*tasks)


def after_run(soak: Soak) -> dict:
    """The server once the load stopped: nothing left running or waiting, /health and a request answer."""
    from deltatune.serving.metrics import parse_text

    deadline = time.monotonic() + 30
    while True:
        metrics = parse_text(httpx.get(f"{soak.url}/metrics", timeout=10).text)
        busy = {k: v for k, v in metrics.items() if ("running" in k or "waiting" in k) and v}
        if not busy or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    r = httpx.post(f"{soak.url}/v1/completions", headers=soak.headers, timeout=60,
                   json={"model": "a0", "prompt": PROMPTS[0], "max_tokens": 2})
    return {"engine_busy_after": busy, "health": httpx.get(f"{soak.url}/health", timeout=10).status_code,
            "completion": r.status_code}


def gaps(health: list, longer_than: float = 1.0) -> list[tuple[float, float]]:
    """Stretches of more than ``longer_than`` seconds in which no /health probe came back: ``(start, seconds)``
    (a probe in flight the whole time, or the probing process not scheduled at all)."""
    done = sorted(t for t, _, _ in health)
    return [(round(a, 2), round(b - a, 2)) for a, b in zip(done, done[1:]) if b - a > longer_than]


def summary(soak: Soak, warmup: float, wall: float, after: dict) -> dict:
    """The figures and the verdict of each bound."""
    lat = [s for t, s, _ in soak.health]
    base = [b for t, b in soak.rss if warmup <= t < warmup + 5] or [soak.rss[0][1]]
    tail = [b for t, b in soak.rss if t >= soak.rss[-1][0] - 5]
    rss0, rss1 = sum(base) / len(base), sum(tail) / len(tail)
    peak = max(b for t, b in soak.rss if t >= warmup) if soak.rss else rss1
    fivexx = sum(n for per in soak.counts.values() for s, n in per.items() if s.isdigit() and int(s) >= 500)
    figures = {
        "seconds": round(wall, 1), "requests": sum(sum(per.values()) for per in soak.counts.values()),
        "statuses": soak.counts, "greedy_checked": soak.checked, "killed_clients": soak.killed,
        "lost": len(soak.lost), "mixed": len(soak.mixed), "server_errors_5xx": fivexx,
        "unexpected_statuses": len(soak.unexpected), "probe_answers_distinct": getattr(soak, "probe_answers", None),
        "health": {"probes": len(lat), "p50_ms": round(1000 * percentile(lat, 50), 2),
                   "p99_ms": round(1000 * percentile(lat, 99), 2), "max_ms": round(1000 * max(lat), 2),
                   "not_200": sum(1 for *_, s in soak.health if s != 200)},
        "rss_mib": {"after_warmup": round(rss0 / 2**20, 1), "end": round(rss1 / 2**20, 1),
                    "peak_after_warmup": round(peak / 2**20, 1)},
        "rss_growth": round(rss1 / rss0 - 1, 4), "warmup_s": warmup, "after_run": after,
        "health_slow": [(round(t, 2), round(1000 * d, 1), st) for t, d, st in soak.health if d > 0.1 or st != 200],
        "health_gaps": gaps(soak.health),
        "examples": {"lost": soak.lost[:10], "mixed": soak.mixed[:10], "unexpected": soak.unexpected[:10]}}
    figures["pass"] = {"no_lost": not soak.lost, "no_mixed": not soak.mixed, "no_5xx": fivexx == 0,
                       "rss_growth_under_5pct": figures["rss_growth"] < BOUNDS["rss_growth"],
                       "health_p99_under_100ms": percentile(lat, 99) < BOUNDS["health_p99_s"],
                       "answers_after": (after["health"] == 200 and after["completion"] == 200
                                         and not after["engine_busy_after"])}
    return figures


def plot(soak: Soak, warmup: float, path: Path) -> None:
    """RSS (MiB) and /health latency (ms) against time, the warm-up shaded."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.plot([t for t, _ in soak.rss], [b / 2**20 for _, b in soak.rss], color="tab:blue")
    top.set_ylabel("server RSS (MiB)")
    bottom.scatter([t for t, _, _ in soak.health], [1000 * s for _, s, _ in soak.health], s=2, color="tab:orange")
    bottom.axhline(1000 * BOUNDS["health_p99_s"], color="red", linestyle="--", linewidth=1, label="100 ms (p99 bound)")
    bottom.set_ylabel("/health latency (ms)")
    bottom.set_yscale("log")
    bottom.set_xlabel("seconds")
    bottom.legend(loc="upper right")
    for ax in (top, bottom):
        ax.axvspan(0, warmup, color="grey", alpha=0.15)
    top.set_title("deltatune serve soak: 8 adapters + base, churn, killed clients, hostile requests")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(seconds: float, model: str = "tiny", clients: int = 12, seed: int = 0, root: Path | None = None,
        png: Path | None = None) -> dict:
    """Build the world, start the server, soak it for ``seconds``; the figures (``pass`` holds the verdicts)."""
    with tempfile.TemporaryDirectory(prefix="deltatune-soak-") as tmp:
        root = root or Path(tmp)
        world = build_world(root, model)
        refs = references(world)
        server = start_server(world, root)
        try:
            soak = Soak(server.url, world, refs, seconds, seed)
            warmup = min(60.0, seconds / 5)
            stop = threading.Event()
            watchers = watch(soak, server.proc.pid, stop)
            try:
                asyncio.run(drive(soak, clients))
                wall = soak.now()
                after = after_run(soak)
            finally:
                unwatch(watchers, stop)
        finally:
            server.stop()
        figures = summary(soak, warmup, wall, after)
        if png is not None:
            plot(soak, warmup, png)
        return figures


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=600)
    p.add_argument("--model", default="tiny", choices=["tiny", "default"],
                   help="tiny: the tests' random 2-layer Llama (fast); default: SmolLM2-135M-Instruct")
    p.add_argument("--clients", type=int, default=12, help="concurrent load clients (besides killer/churn/hostile)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / "soak.json"))
    args = p.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figures = run(args.seconds, args.model, args.clients, args.seed, png=out.with_suffix(".png"))
    figures.update(command=f"python benchmarks/soak.py --seconds {args.seconds:g} --model {args.model} "
                           f"--clients {args.clients} --seed {args.seed}", model=args.model,
                   python=platform.python_version(), machine=f"{platform.machine()}, {os.cpu_count()} cores")
    out.write_text(json.dumps(figures, indent=2) + "\n")
    shown = ("seconds", "requests", "greedy_checked", "killed_clients", "lost", "mixed", "server_errors_5xx",
             "unexpected_statuses", "health", "rss_mib", "rss_growth", "pass")
    print(json.dumps({k: figures[k] for k in shown}, indent=2))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0 if all(figures["pass"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
