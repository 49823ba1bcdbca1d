"""Schemathesis fuzzing of `deltatune serve`, driven by the server's own OpenAPI schema (a bounded run:
~150 requests; ``make fuzz`` runs 1,200 and writes benchmarks/results/fuzz.json).

The real server in a subprocess (its own: the fuzzer loads, reloads and unloads adapters), tiny model,
8 adapters, an operator key and runtime loading on. Every operation of ``/openapi.json`` gets requests;
none may answer 5xx (nor a 5xx error event inside a 200 stream), the server must answer afterwards, and
its resident memory must stay within ``RSS_BOUND`` of its value after the warm-up.
"""
from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest

pytest.importorskip("schemathesis")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import fuzz  # noqa: E402

REQUESTS = 150


def test_openapi_schema_describes_every_request_body(tmp_path):
    from deltatune.serving.server import create_app

    paths = create_app(object()).openapi()["paths"]
    for path, required in {"/v1/completions": {"model", "prompt"}, "/v1/chat/completions": {"model", "messages"},
                           "/v1/load_lora_adapter": {"lora_name", "lora_path"},
                           "/v1/unload_lora_adapter": {"lora_name"}}.items():
        schema = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert set(schema["required"]) == required, path
        assert "$ref" not in str(schema), path  # inlined: a fuzzer resolves nothing
    assert {"/", "/health", "/metrics", "/v1/models"} <= set(paths)


def test_fuzzed_requests_get_no_5xx_and_the_server_still_answers(tmp_path):
    server, _ = fuzz.start_world(tmp_path)
    try:
        rss = {}
        tally = fuzz.fuzz(server.url, REQUESTS, seed=1,
                          on_sent=lambda n: rss.setdefault("before", fuzz.rss_bytes(server.proc.pid))
                          if n == fuzz.WARMUP else None)
        after = fuzz.rss_bytes(server.proc.pid)
        assert tally.failures == [], tally.failures[:5]
        assert tally.sent >= REQUESTS - 5
        operations = set(tally.statuses)
        assert len(operations) == 8, operations  # every operation of the schema
        for label in ("POST /v1/completions", "POST /v1/chat/completions"):
            assert tally.statuses[label]["200"] > 0, tally.statuses[label]  # the steer reaches the engine
        assert tally.streamed > 0  # stream: true answered as server-sent events
        assert fuzz.still_answers(server.url)["ok"]
        assert after <= fuzz.RSS_BOUND * rss["before"], (rss["before"], after)
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    finally:
        server.stop()
