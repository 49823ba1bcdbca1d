"""The server under load: 64 concurrent clients across 8 adapters plus the base, streamed and not,
while adapters are loaded, reloaded and unloaded; then a client killed mid-stream.

Every greedy answer must equal the same request run alone through ``PeftModel`` (a first
difference is tolerated only where the alone run's two best logits were within 1e-4, which
``assert_same_greedy`` checks); a reloaded adapter's requests must equal the old version alone or
the new one alone, never a mix. Bounded: a fixed number of requests and a timeout on the whole.
"""
from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.serving_fixtures import KEY, SERVED, alone, assert_same_greedy, serving  # noqa: F401 (fixture)

openai = pytest.importorskip("openai")

ADAPTERS = SERVED  # a..h; "h" is reloaded in place (file h2) while the load runs
CLIENTS = 64
LOAD_TIMEOUT = 240.0


@pytest.fixture
def setup(serving):  # noqa: F811
    return serving


def requests_plan(seed: int = 0) -> list[dict]:
    """CLIENTS requests: model cycles through the 8 adapters and the base, every other one streamed,
    prompts of 3-10 random tokens, 6-16 new tokens."""
    rng = random.Random(seed)
    plan = []
    for i in range(CLIENTS):
        model = (ADAPTERS + [None])[i % 9]
        plan.append(dict(model=model, prompt=[rng.randrange(3, 128) for _ in range(rng.randint(3, 10))],
                         max_tokens=rng.randint(6, 16), stream=i % 2 == 1))
    return plan


async def ask(client, base_name: str, req: dict, delay: float = 0.0) -> str:
    """One client: the answer's text (streamed chunks joined, or the whole response)."""
    await asyncio.sleep(delay)
    kw = dict(model=req["model"] or base_name, prompt=req["prompt"], max_tokens=req["max_tokens"], temperature=0)
    if not req["stream"]:
        out = await client.completions.create(**kw)
        assert out.choices[0].finish_reason in ("stop", "length")
        return out.choices[0].text
    pieces, finish = [], None
    async for chunk in await client.completions.create(**kw, stream=True):
        for choice in chunk.choices:
            pieces.append(choice.text)
            finish = choice.finish_reason or finish
    assert finish in ("stop", "length")
    return "".join(pieces)


async def admin(url: str, path: str, body: dict, delay: float) -> httpx.Response:
    await asyncio.sleep(delay)
    async with httpx.AsyncClient(timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as http:
        return await http.post(f"{url}{path}", json=body)


def test_64_clients_8_adapters_with_adapter_churn(setup):
    url, paths, base = setup["url"], setup["paths"], setup["base"]
    plan = requests_plan()
    reload_plan = [dict(model="h", prompt=[7, 8, 9, 10], max_tokens=10, stream=i % 2 == 0) for i in range(6)]
    late = [dict(model="x", prompt=[11, 12, 13], max_tokens=8, stream=False)]
    gone = dict(model="gone", prompt=[20, 21, 22], max_tokens=12, stream=True)

    async def main():
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=LOAD_TIMEOUT,
                                    http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=200)))
        base_name = next(m.id for m in (await client.models.list()).data if m.parent is None)
        started = time.monotonic()
        # the "gone" request starts first; its adapter is unloaded while the load runs (it must finish on it)
        gone_task = asyncio.ensure_future(ask(client, base_name, gone))
        load = [ask(client, base_name, req, delay=0.002 * i) for i, req in enumerate(plan)]
        churn = [admin(url, "/v1/unload_lora_adapter", {"lora_name": "gone"}, 0.05),
                 admin(url, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(paths["x"])}, 0.05),
                 admin(url, "/v1/load_lora_adapter", {"lora_name": "h", "lora_path": str(paths["h2"]),
                                                      "load_inplace": True}, 0.1)]
        reloads = [ask(client, base_name, req, delay=0.03 * i) for i, req in enumerate(reload_plan)]
        results = await asyncio.gather(gone_task, asyncio.gather(*load), asyncio.gather(*churn),
                                       asyncio.gather(*reloads))
        late_answers = [await ask(client, base_name, req) for req in late + reload_plan[:1]]
        with pytest.raises(openai.NotFoundError, match="gone"):
            await client.completions.create(model="gone", prompt=[5], max_tokens=2)
        await client.close()
        return results, late_answers, time.monotonic() - started

    before = setup["server"].metrics()
    (gone_answer, answers, churn, reload_answers), late_answers, seconds = \
        asyncio.run(asyncio.wait_for(main(), LOAD_TIMEOUT))

    assert [r.status_code for r in churn] == [200, 200, 200], [r.text for r in churn]
    assert len(answers) == CLIENTS  # every request answered (gather raises on any failure)
    for req, text in zip(plan, answers):
        adapter = paths[req["model"]] if req["model"] else None
        if req["model"] == "h":  # sent around the reload: the old version or the new one, whole
            assert _matches_one(text, base, [paths["h"], paths["h2"]], req), (req, text)
        else:
            assert_same_greedy(text, alone(base, adapter, req["prompt"], req["max_tokens"]))
    for req, text in zip(reload_plan, reload_answers):
        assert _matches_one(text, base, [paths["h"], paths["h2"]], req), (req, text)
    assert_same_greedy(gone_answer, alone(base, paths["gone"], gone["prompt"], gone["max_tokens"]))
    assert_same_greedy(late_answers[0], alone(base, paths["x"], late[0]["prompt"], late[0]["max_tokens"]))
    # once the reload is done, requests get the new version (which answers this prompt differently)
    old, new = (alone(base, paths[v], reload_plan[0]["prompt"], 10) for v in ("h", "h2"))
    assert old[0] != new[0]
    assert_same_greedy(late_answers[1], new)

    metrics = setup["server"].metrics()
    assert metrics["deltatune:num_requests_running"] == 0 and metrics["deltatune:num_requests_waiting"] == 0
    ok = sum(v - before.get(k, 0) for k, v in metrics.items()
             if k.startswith('deltatune:http_requests_total{endpoint="/v1/completions"') and 'status="200"' in k)
    assert ok == CLIENTS + len(reload_plan) + len(late) + 2  # every request answered, none twice
    print(f"\n{CLIENTS + len(reload_plan) + 1} concurrent requests in {seconds:.1f} s")


def _matches_one(text: str, base, adapters, req) -> bool:
    for adapter in adapters:
        try:
            assert_same_greedy(text, alone(base, adapter, req["prompt"], req["max_tokens"]))
            return True
        except AssertionError:
            pass
    return False


CLIENT_SCRIPT = """
import sys, httpx
body = {"model": sys.argv[2], "prompt": [5, 6, 7], "max_tokens": 240, "ignore_eos": True, "temperature": 0,
        "stream": True}
headers = {"Authorization": "Bearer " + sys.argv[3]}
with httpx.stream("POST", sys.argv[1] + "/v1/completions", json=body, headers=headers, timeout=60) as r:
    for line in r.iter_lines():
        if line.startswith("data: "):
            print("chunk", flush=True)
"""


def test_killed_client_frees_its_slot_and_the_server_lives_on(setup):
    url = setup["url"]
    before = setup["server"].metrics()
    steady = subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, url, "b", KEY], stdout=subprocess.PIPE, text=True)
    victim = subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, url, "c", KEY], stdout=subprocess.PIPE, text=True)
    try:
        for proc in (steady, victim):
            assert proc.stdout.readline().strip() == "chunk"  # both streams are running
        running = setup["server"].metrics()["deltatune:num_requests_running"]
        assert running == 2
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        deadline = time.monotonic() + 20
        while setup["server"].metrics()["deltatune:num_requests_running"] != 1:  # the steady one is left
            assert time.monotonic() < deadline, "the killed client's sequence still runs"
            time.sleep(0.02)
        assert steady.poll() is None or steady.returncode == 0
    finally:
        steady.kill()
        steady.wait()
        victim.kill()
    deadline = time.monotonic() + 20
    while (m := setup["server"].metrics())["deltatune:num_requests_running"] != 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    aborted = 'deltatune:http_requests_total{endpoint="/v1/completions",model="c",status="aborted"}'
    assert m.get(aborted, 0) - before.get(aborted, 0) == 1
    assert m["deltatune:generation_tokens_total"] - before["deltatune:generation_tokens_total"] < 2 * 240
    out = httpx.post(f"{url}/v1/completions", json={"model": "d", "prompt": [5, 6], "max_tokens": 4}, timeout=60,
                     headers={"Authorization": f"Bearer {KEY}"})
    assert out.status_code == 200 and out.json()["choices"][0]["finish_reason"] in ("stop", "length")
