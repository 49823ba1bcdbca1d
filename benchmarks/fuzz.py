"""Fuzz `deltatune serve`'s HTTP API with Schemathesis, driven by the server's own OpenAPI schema.

The real server (uvicorn, in a subprocess on a loopback port) serves the tiny random Llama of the
serving tests (``tests/serving_fixtures.py``) with 8 LoRA adapters ``a``..``h``, an operator key, and
runtime loading on (``--enable-lora-loading --lora-root``). Schemathesis reads ``/openapi.json``
and generates requests for every operation it lists (completions and chat completions, streamed or
not, models, load/unload, health, metrics, the playground page): schema-valid bodies (positive) and
schema-violating ones (negative). A seeded steer puts a served model name (or, for load/unload, a
real adapter directory under the root) into part of the bodies, so generated requests also get past
the name check and reach the engine instead of all ending in 404.

Each answer is checked: no 5xx status, and no error event with a 5xx code inside a 200 event stream.
At the end the server must still answer ``/health`` and a greedy completion, and its resident
memory (VmRSS) after the run must be within ``RSS_BOUND`` of its value after a warm-up.

Writes benchmarks/results/fuzz.json (requests, statuses per operation, RSS before/after, failures).

    .venv/bin/python benchmarks/fuzz.py [--requests 1200] [--seed 0] [--out benchmarks/results/fuzz.json]
"""
from __future__ import annotations

import argparse
import collections
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.serving_fixtures import KEY, Server, make_adapter, make_base  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
BASE_NAME = "tiny-base"
SERVED = list("abcdefgh")
SPARE = ["x", "y"]          # adapter directories under the root that are not served at start
STEER = 0.6                 # share of bodies whose model / lora fields are set to real ones
RSS_BOUND = 1.10            # RSS after the run <= 1.10 x RSS after the warm-up
WARMUP = 40                 # requests before the "before" RSS reading (caches, first batches)
UNSUPPORTED = ("presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "best_of", "echo", "suffix")
# Share of the requests per operation (the rest of the schema's operations split what is left).
WEIGHTS = {"POST /v1/completions": 0.34, "POST /v1/chat/completions": 0.30,
           "POST /v1/load_lora_adapter": 0.08, "POST /v1/unload_lora_adapter": 0.08}


def start_world(root: Path, log_level: str = "warning") -> tuple[Server, dict]:
    """Base, adapters a..h (served) and x, y (loadable) under ``root``; the server over them."""
    base = make_base(root / "base")
    paths = {name: make_adapter(base, root / name, seed) for seed, name in enumerate(SERVED + SPARE)}
    adapters = [arg for name in SERVED for arg in ("--adapter", f"{name}={paths[name]}")]
    server = Server(base, *adapters, "--api-key", KEY, "--served-model-name", BASE_NAME, "--max-lora-rank", "16",
                    "--max-num-seqs", "32", "--max-loras", "8", "--enable-lora-loading", "--lora-root", str(root),
                    log=root / "server.log")
    return server, paths


def rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid`` (VmRSS from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def steer(case, rng: random.Random) -> None:
    """Put real names into part of the generated bodies (in place); the rest stay as generated."""
    body = case.body
    if not isinstance(body, dict) or rng.random() >= STEER:
        return
    path = case.operation.path
    if path in ("/v1/completions", "/v1/chat/completions") and "model" in body:
        _tame(body, rng)
    elif path == "/v1/load_lora_adapter":
        body["lora_name"] = rng.choice(["fz0", "fz1", "fz2", "fz.v1.2", *SERVED])
        body["lora_path"] = rng.choice(SPARE + ["a", "../a", "/etc", "x/../y"])
    elif path == "/v1/unload_lora_adapter":
        body["lora_name"] = rng.choice(["fz0", "fz1", "fz2", "fz.v1.2"])


def _tame(body: dict, rng: random.Random) -> None:
    """A generation body made likely to reach the engine: a served model, no refused-unless-off fields,
    streamed half the time, small ``n`` and ``max_tokens``, token ids inside the tiny vocabulary."""
    body["model"] = rng.choice(SERVED + [BASE_NAME])
    for name in UNSUPPORTED:
        body.pop(name, None)
    body["stream"] = rng.random() < 0.5
    if not body["stream"]:
        body.pop("stream_options", None)
    if isinstance(body.get("n"), int):
        body["n"] = 1 + abs(body["n"]) % 4
    body["max_tokens"] = rng.randint(1, 24)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(i, int) for i in prompt):
        body["prompt"] = [3 + abs(i) % 125 for i in prompt]


def is_event_stream(response) -> bool:
    """A server-sent event answer (Schemathesis' responses keep each header as a list of values)."""
    value = response.headers.get("content-type") or response.headers.get("Content-Type") or ""
    return "text/event-stream" in (" ".join(value) if isinstance(value, list) else value)


def server_errors(response) -> list[str]:
    """What in one answer says the server failed: a 5xx status, or an error event with a 5xx code in a
    server-sent event stream (a failure after the 200 headers went out)."""
    found = [f"status {response.status_code}"] if response.status_code >= 500 else []
    if is_event_stream(response):
        for line in response.text.splitlines():
            if line.startswith("data: {") and '"error"' in line:
                code = json.loads(line[6:]).get("error", {}).get("code")
                if isinstance(code, int) and code >= 500:
                    found.append(f"event-stream error {code}")
    return found


class Tally:
    """Requests sent, statuses per operation, and every server failure (with the request that caused it)."""

    def __init__(self) -> None:
        self.sent = 0
        self.statuses: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.failures: list[dict] = []
        self.refusals: collections.Counter = collections.Counter()  # 4xx answers by the field they named
        self.streamed = 0  # 200 answers that were server-sent event streams (stream: true)
        self.seconds = 0.0

    def send(self, case, url: str, on_sent=None) -> None:
        label = f"{case.operation.method.upper()} {case.operation.path}"
        start = time.perf_counter()
        try:
            response = case.call(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        except Exception as exc:  # noqa: BLE001 — a dropped connection or a hang is a failure too
            status, problems = "transport error", [f"{type(exc).__name__}: {exc}"]
        else:
            status, problems = response.status_code, server_errors(response)
            if 400 <= status < 500:
                self.refusals[f"{status} {_param(response)}"] += 1
            self.streamed += status == 200 and is_event_stream(response)
        self.seconds += time.perf_counter() - start
        self.sent += 1
        self.statuses[label][str(status)] += 1
        if problems:
            self.failures.append({"operation": label, "problems": problems, "body": _shown(case.body),
                                  "query": case.query, "headers": case.headers})
        if on_sent is not None:
            on_sent(self.sent)


def _param(response) -> str:
    try:
        return str(response.json()["error"]["param"])
    except Exception:  # noqa: BLE001 — not the error shape
        return "?"


def _shown(body) -> object:
    text = json.dumps(body, default=repr)
    return body if len(text) <= 2000 else text[:2000] + "..."


def plan(operations: list, total: int) -> dict:
    """Requests per operation: ``WEIGHTS`` for the generation and adapter endpoints, the rest split evenly."""
    labels = [f"{op.method.upper()} {op.path}" for op in operations]
    rest = [label for label in labels if label not in WEIGHTS]
    left = max(0.0, 1.0 - sum(WEIGHTS[label] for label in labels if label in WEIGHTS))
    share = {label: WEIGHTS.get(label, left / max(1, len(rest))) for label in labels}
    return {label: max(3, round(total * share[label])) for label in labels}


def fuzz_operation(op, count: int, url: str, tally: Tally, rng: random.Random, on_sent=None) -> None:
    """``count`` generated requests for one operation: positive and (where it has inputs) negative cases."""
    from hypothesis import HealthCheck, Phase, given, settings, strategies as st
    from schemathesis import GenerationMode

    strategies = [op.as_strategy(generation_mode=GenerationMode.POSITIVE)]
    if op.body or op.query or op.path_parameters or op.headers:
        strategies.append(op.as_strategy(generation_mode=GenerationMode.NEGATIVE))
    strategy = st.one_of(strategies)
    goal = tally.sent + count
    while tally.sent < goal:  # Hypothesis stops early on a small input space (GET /health): run again
        @settings(max_examples=goal - tally.sent, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck), derandomize=False)
        @given(case=strategy)
        def run(case):
            if tally.sent >= goal:
                return
            steer(case, rng)
            tally.send(case, url, on_sent)
        run()


def fuzz(url: str, total: int, seed: int = 0, on_sent=None) -> Tally:
    """Send about ``total`` Schemathesis-generated requests to the server at ``url``, every operation of
    its OpenAPI schema; returns the tally (nothing raised on a 5xx: it is recorded)."""
    import schemathesis

    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", timeout=30)
    operations = [result.ok() for result in schema.get_all_operations()]
    counts = plan(operations, total)
    rng, tally = random.Random(seed), Tally()
    order = sorted(operations, key=lambda op: op.path.startswith("/v1/unload"))  # unload last: fewer misses
    for op in order:
        fuzz_operation(op, counts[f"{op.method.upper()} {op.path}"], url, tally, rng, on_sent)
    return tally


def still_answers(url: str) -> dict:
    """After the run: ``/health`` and one greedy completion on adapter ``a`` both answer 200."""
    import httpx

    health = httpx.get(f"{url}/health", timeout=30).status_code
    done = httpx.post(f"{url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                      json={"model": "a", "prompt": [5, 9, 17], "max_tokens": 4, "temperature": 0})
    return {"health": health, "completion": done.status_code, "ok": health == 200 and done.status_code == 200}


def run(total: int, seed: int, root: Path) -> dict:
    """Start the world, warm up, fuzz, check the server afterwards; the figures as a dict."""
    server, _ = start_world(root)
    readings = {}

    def on_sent(n: int) -> None:
        if n == WARMUP:
            readings["before"] = rss_bytes(server.proc.pid)
    try:
        readings["start"] = rss_bytes(server.proc.pid)
        start = time.perf_counter()
        tally = fuzz(server.url, total, seed, on_sent)
        wall = time.perf_counter() - start
        readings["after"] = rss_bytes(server.proc.pid)
        alive = still_answers(server.url)
    finally:
        server.stop()
    before = readings.get("before", readings["start"])
    return {"requests": tally.sent, "wall_s": round(wall, 1), "requests_per_s": round(tally.sent / wall, 1),
            "streamed_200": tally.streamed,
            "refusals_by_field": dict(tally.refusals.most_common()),
            "statuses": {k: dict(sorted(v.items())) for k, v in sorted(tally.statuses.items())},
            "server_errors": len(tally.failures), "failures": tally.failures[:50],
            "rss_mib": {"at_start": round(readings["start"] / 2**20, 1), "after_warmup": round(before / 2**20, 1),
                        "after_run": round(readings["after"] / 2**20, 1)},
            "rss_growth": round(readings["after"] / before - 1, 4), "rss_bound": RSS_BOUND,
            "rss_within_bound": readings["after"] <= RSS_BOUND * before, "after_run": alive,
            "seed": seed, "warmup_requests": WARMUP}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=1200, help="generated requests in all (default 1200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the steer (Hypothesis draws its own)")
    p.add_argument("--out", default=str(RESULTS / "fuzz.json"))
    args = p.parse_args()
    import schemathesis

    with tempfile.TemporaryDirectory(prefix="deltatune-fuzz-") as tmp:
        figures = run(args.requests, args.seed, Path(tmp))
    figures.update(command=f"python benchmarks/fuzz.py --requests {args.requests} --seed {args.seed}",
                   schemathesis=schemathesis.__version__, python=platform.python_version(),
                   machine=f"{platform.machine()}, {__import__('os').cpu_count()} cores")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps({k: figures[k] for k in ("requests", "wall_s", "server_errors", "rss_mib", "rss_growth",
                                              "after_run")}, indent=2))
    print(f"wrote {out}")
    ok = figures["server_errors"] == 0 and figures["after_run"]["ok"] and figures["rss_within_bound"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
