"""`deltatune serve`: the real server in a subprocess, spoken to with the official `openai` client and
with plain HTTP (httpx): every endpoint, streamed and not, and every error the issue lists.

The server and its tiny world (see tests/serving_fixtures.py): a random Llama with a word-level
tokenizer (``w3`` .. ``w127``, id = number) and a chat template, adapters ``a``..``h`` written by
deltatune. Greedy answers are checked against the same prompt run alone through ``PeftModel``
(:func:`alone`), so a server that routed a request to the wrong adapter, or mixed two, fails here.
"""
from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.serving_fixtures import (BASE_NAME, CONTEXT, KEY, MAX_WAITING, alone, assert_same_greedy, ids_of,
                                    serving, sse_events)  # noqa: F401 (serving: the server fixture)

openai = pytest.importorskip("openai")


@pytest.fixture
def setup(serving):
    return serving


@pytest.fixture(scope="session")
def client(serving):
    return openai.OpenAI(base_url=f"{serving['url']}/v1", api_key=KEY, max_retries=0, timeout=60)


def http(setup, method: str, path: str, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEY}", **kw.pop("headers", {})}
    return httpx.request(method, f"{setup['url']}{path}", headers=headers, timeout=60, **kw)


def chat_ids(*words: str) -> list[int]:
    """Prompt ids of one user turn through CHAT_TEMPLATE, ready for the reply."""
    return ids_of(f"w10 {' '.join(words)} w11 w12")


def assert_error(response: httpx.Response, status: int, param, *fragments: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status and error["param"] == param, error
    for fragment in fragments:
        assert fragment in error["message"], error
    return error


# -- endpoints ---------------------------------------------------------------------------------------

def test_models_lists_the_base_and_adapters_with_their_parent(setup, client):
    cards = {m.id: m for m in client.models.list().data}
    base = next(m for m in cards.values() if getattr(m, "parent", None) is None)
    assert {"a", "b"} <= set(cards) and len(cards) >= 3
    for name in ("a", "b"):
        assert cards[name].parent == base.id
        assert cards[name].root == str(setup["paths"][name])
    assert base.id == BASE_NAME and base.root == str(setup["base"])  # --served-model-name
    raw = http(setup, "GET", "/v1/models").json()
    assert raw["object"] == "list" and all(c["object"] == "model" for c in raw["data"])


def test_completion_equals_the_adapter_alone(setup, client):
    prompt = [5, 9, 17, 33]
    for name in ("a", "b", None):
        model = name or base_name(client)
        out = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
        assert out.object == "text_completion" and out.model == model and out.id.startswith("cmpl-")
        choice = out.choices[0]
        expected = alone(setup["base"], setup["paths"].get(name), prompt, 12)
        assert_same_greedy(choice.text, expected)
        assert choice.finish_reason == ("length" if len(expected[0]) == 12 else "stop")
        assert out.usage.prompt_tokens == 4
        assert out.usage.completion_tokens == len(expected[0]) + (choice.finish_reason == "stop")
        assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_adapters_answer_differently(setup, client):
    """The check above means something only if the adapters change the answer."""
    texts = {m: client.completions.create(model=m, prompt=[5, 9, 17, 33], max_tokens=12, temperature=0)
             .choices[0].text for m in ("a", "b", base_name(client))}
    assert len(set(texts.values())) == 3, texts


def test_completion_stream_in_openai_chunks(setup, client):
    body = {"model": "a", "prompt": "w5 w9 w17 w33", "max_tokens": 10, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{setup['url']}/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks, usage_chunk = events[:-2], events[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] >= 1
    ids = {c["id"] for c in events[:-1]}
    assert len(ids) == 1 and ids.pop().startswith("cmpl-")
    for chunk in chunks:
        assert chunk["object"] == "text_completion" and chunk["model"] == "a" and chunk["usage"] is None
        assert [c["index"] for c in chunk["choices"]] == [0]
    assert len(chunks) >= 2, "the answer came in one piece: not streamed"
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    streamed = "".join(c["choices"][0]["text"] for c in chunks)
    whole = client.completions.create(model="a", prompt="w5 w9 w17 w33", max_tokens=10, temperature=0)
    assert streamed == whole.choices[0].text
    assert usage_chunk["usage"] == whole.usage.model_dump(exclude_none=True)


def test_chat_uses_the_base_chat_template(setup, client):
    messages = [{"role": "user", "content": "w5 w9"}]
    out = client.chat.completions.create(model="b", messages=messages, max_tokens=8, temperature=0)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    message = out.choices[0].message
    assert message.role == "assistant"
    assert_same_greedy(message.content, alone(setup["base"], setup["paths"]["b"], chat_ids("w5", "w9"), 8))
    assert out.usage.prompt_tokens == len(chat_ids("w5", "w9"))

    stream = client.chat.completions.create(model="b", messages=messages, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == message.content
    finishing = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishing == [out.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == out.usage.total_tokens


def test_system_message_and_content_parts(setup, client):
    out = client.chat.completions.create(
        model="a", max_tokens=6, temperature=0,
        messages=[{"role": "system", "content": "w20"}, {"role": "user", "content": [{"type": "text", "text": "w5"}]}])
    prompt = ids_of("w10 w20 w11 w10 w5 w11 w12")
    assert_same_greedy(out.choices[0].message.content, alone(setup["base"], setup["paths"]["a"], prompt, 6))


def test_several_prompts_and_n_samples(setup, client):
    out = client.completions.create(model="a", prompt=["w5 w6", "w7 w8 w9"], n=2, max_tokens=5,
                                    temperature=1.0, seed=3)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.usage.prompt_tokens == 2 + 3
    assert out.usage.completion_tokens == sum(len(ids_of(c.text)) + (c.finish_reason == "stop") for c in out.choices)
    again = client.completions.create(model="a", prompt=["w5 w6", "w7 w8 w9"], n=2, max_tokens=5,
                                      temperature=1.0, seed=3)
    assert [c.text for c in again.choices] == [c.text for c in out.choices]  # same seed, same text


def test_stop_string_ends_the_answer_without_it(setup, client):
    full = client.completions.create(model="a", prompt=[5, 9], max_tokens=10, temperature=0).choices[0].text
    words = full.split()
    assert len(words) >= 3, full
    stop = words[2]
    out = client.completions.create(model="a", prompt=[5, 9], max_tokens=10, temperature=0, stop=[stop])
    assert out.choices[0].finish_reason == "stop"
    assert stop not in out.choices[0].text.split() and out.choices[0].text.split() == words[:words.index(stop)]


def test_health_and_metrics(setup, client):
    assert httpx.get(f"{setup['url']}/health").status_code == 200  # open without the key, as in vLLM
    client.completions.create(model="a", prompt=[5], max_tokens=4, temperature=0)
    response = httpx.get(f"{setup['url']}/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    assert "# TYPE deltatune:time_to_first_token_seconds histogram" in response.text
    values = setup["server"].metrics()
    assert values["deltatune:num_requests_running"] == 0
    assert values["deltatune:num_requests_waiting"] == 0
    assert values["deltatune:lora_adapters_ready"] >= 1
    assert values["deltatune:generation_tokens_total"] >= 4
    assert values['deltatune:http_requests_total{endpoint="/v1/completions",model="a",status="200"}'] >= 1
    assert values["deltatune:time_to_first_token_seconds_count"] >= 1
    assert values["deltatune:inter_token_latency_seconds_count"] >= 3
    assert values['deltatune:time_to_first_token_seconds_bucket{le="+Inf"}'] == \
        values["deltatune:time_to_first_token_seconds_count"]


def test_playground_page_is_served(setup):
    response = httpx.get(f"{setup['url']}/")
    assert response.status_code == 200 and "text/html" in response.headers["content-type"]
    assert "deltatune playground" in response.text and "/v1/chat/completions" in response.text


# -- runtime adapters ----------------------------------------------------------------------------------

def test_load_reload_unload_adapter_at_runtime(setup, client):
    paths = setup["paths"]
    prompt = [5, 9, 17]
    response = http(setup, "POST", "/v1/load_lora_adapter", json={"lora_name": "new", "lora_path": str(paths["x"])})
    assert response.status_code == 200 and "Success" in response.text
    assert "new" in {m.id for m in client.models.list().data}
    first = client.completions.create(model="new", prompt=prompt, max_tokens=8, temperature=0).choices[0].text
    assert_same_greedy(first, alone(setup["base"], paths["x"], prompt, 8))

    again = http(setup, "POST", "/v1/load_lora_adapter", json={"lora_name": "new", "lora_path": str(paths["h2"])})
    assert_error(again, 400, "lora_name", "already loaded", "load_inplace")

    response = http(setup, "POST", "/v1/load_lora_adapter",
                    json={"lora_name": "new", "lora_path": str(paths["h2"]), "load_inplace": True})
    assert response.status_code == 200, response.text
    card = next(m for m in http(setup, "GET", "/v1/models").json()["data"] if m["id"] == "new")
    assert card["root"] == str(paths["h2"]) and card["lora"]["version"] >= 2
    second = client.completions.create(model="new", prompt=prompt, max_tokens=8, temperature=0).choices[0].text
    assert_same_greedy(second, alone(setup["base"], paths["h2"], prompt, 8))
    assert second != first

    response = http(setup, "POST", "/v1/unload_lora_adapter", json={"lora_name": "new"})
    assert response.status_code == 200, response.text
    assert "new" not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError, match="new"):
        client.completions.create(model="new", prompt=prompt, max_tokens=2)
    assert_error(http(setup, "POST", "/v1/unload_lora_adapter", json={"lora_name": "new"}), 404, "lora_name", "new")


@pytest.mark.parametrize("which, reason", [
    ("missing", "not found"),
    ("corrupt", "safetensors"),
    ("foreign", "shape"),
    ("big", "16"),
])
def test_bad_adapter_is_refused_with_its_reason_and_serving_goes_on(setup, client, which, reason):
    path = setup["paths"].get(which, setup["base"].parent / "no-such-adapter")
    response = http(setup, "POST", "/v1/load_lora_adapter", json={"lora_name": f"bad-{which}", "lora_path": str(path)})
    error = assert_error(response, 400, "lora_path")
    assert reason.lower() in error["message"].lower(), error
    assert f"bad-{which}" not in {m.id for m in client.models.list().data}
    out = client.completions.create(model="a", prompt=[5, 9, 17, 33], max_tokens=4, temperature=0)
    assert_same_greedy(out.choices[0].text, alone(setup["base"], setup["paths"]["a"], [5, 9, 17, 33], 4))


# -- errors ----------------------------------------------------------------------------------------------

def test_unknown_model_is_404_naming_it(setup, client):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="nope", prompt="w5", max_tokens=2)
    assert "nope" in str(info.value)
    assert_error(http(setup, "POST", "/v1/chat/completions",
                      json={"model": "nope", "messages": [{"role": "user", "content": "w5"}]}), 404, "model", "nope")
    metrics = setup["server"].metrics()  # counted, but not under a label the client chose
    assert metrics['deltatune:http_requests_total{endpoint="/v1/completions",model="(other)",status="404"}'] >= 1
    assert not any("nope" in key for key in metrics)


@pytest.mark.parametrize("body, param, fragment", [
    ({"model": "a", "prompt": "w5", "max_tokens": -1}, "max_tokens", "max_tokens"),
    ({"model": "a", "prompt": "w5", "temperature": "hot"}, "temperature", "hot"),
    ({"model": "a", "prompt": "w5", "top_p": 1.5}, "top_p", "top_p"),
    ({"model": "a", "prompt": "w5", "n": 0}, "n", "n"),
    ({"model": "a"}, "prompt", "prompt"),
    ({"prompt": "w5"}, "model", "model"),
    ({"model": "a", "prompt": "w5", "stream": "yes"}, "stream", "stream"),
    ({"model": "a", "prompt": "w5", "logprobs": 3}, "logprobs", "not supported"),
])
def test_bad_field_is_400_naming_it(setup, body, param, fragment):
    assert_error(http(setup, "POST", "/v1/completions", json=body), 400, param, fragment)


def test_bad_chat_messages_are_400(setup):
    assert_error(http(setup, "POST", "/v1/chat/completions", json={"model": "a", "messages": []}), 400, "messages")
    bad_role = {"model": "a", "messages": [{"role": "robot", "content": "w5"}]}
    assert_error(http(setup, "POST", "/v1/chat/completions", json=bad_role), 400, "messages.0.role", "robot")


def test_malformed_json_is_400(setup, client):
    response = http(setup, "POST", "/v1/completions", content=b'{"model": "a", "prompt": ',
                    headers={"Content-Type": "application/json"})
    assert_error(response, 400, None, "malformed JSON")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="a", prompt="w5", max_tokens=-1)


def test_prompt_longer_than_the_context_is_400_with_both_lengths(setup, client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="a", prompt=[5] * 300, max_tokens=2)
    assert "300" in str(info.value) and str(CONTEXT) in str(info.value)


def test_api_key_is_required_on_v1(setup):
    url = setup["url"]
    assert_error(httpx.get(f"{url}/v1/models"), 401, None, "API key")
    assert_error(httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"}), 401, None)
    no_key = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        no_key.completions.create(model="a", prompt="w5", max_tokens=2)


def test_unknown_route_is_404_in_the_error_shape(setup):
    assert_error(http(setup, "GET", "/v1/nothing-here"), 404, None)


def test_full_queue_is_503_and_aborted_streams_free_their_slots(setup):
    """32 running + 48 waiting fill the server (--max-num-seqs 32 --max-waiting 48): the next request
    is refused with 503 instead of queueing without bound; closing the streams frees every slot."""
    body = {"model": "a", "prompt": [5, 9], "max_tokens": CONTEXT - 3, "ignore_eos": True, "temperature": 0,
            "stream": True}
    before = setup["server"].metrics()
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
    with httpx.Client(base_url=setup["url"], headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                      limits=limits) as http_client:
        streams, refused = [], None
        try:
            for _ in range(32 + MAX_WAITING + 8):
                response = http_client.send(http_client.build_request("POST", "/v1/completions", json=body),
                                            stream=True)
                if response.status_code == 503:
                    refused = response
                    response.read()
                    break
                assert response.status_code == 200
                streams.append(response)
            assert refused is not None, f"{len(streams)} long requests and no 503"
            assert_error(refused, 503, None, "max_waiting")
            assert len(streams) == 32 + MAX_WAITING
        finally:
            for response in streams:
                response.close()
    deadline = time.monotonic() + 30
    while (m := setup["server"].metrics())["deltatune:num_requests_running"] + \
            m["deltatune:num_requests_waiting"] > 0:
        assert time.monotonic() < deadline, f"aborted streams still hold slots: {m}"
        time.sleep(0.1)
    aborted = 'deltatune:http_requests_total{endpoint="/v1/completions",model="a",status="aborted"}'
    assert m[aborted] - before.get(aborted, 0) == len(streams)
    generated = m["deltatune:generation_tokens_total"] - before["deltatune:generation_tokens_total"]
    assert generated < len(streams) * (CONTEXT - 3) / 2  # they stopped early


def test_serve_refuses_a_bad_startup_adapter(setup, tmp_path, capsys):
    from deltatune.cli import main

    missing = tmp_path / "missing"
    assert main(["serve", "--model", str(setup["base"]), "--adapter", f"x={missing}", "--port", "0"]) == 2
    captured = capsys.readouterr()
    assert f"--adapter x={missing}" in captured.err and "not found" in captured.err
    assert "listening" not in captured.out


def base_name(client) -> str:
    return next(m.id for m in client.models.list().data if getattr(m, "parent", None) is None)
