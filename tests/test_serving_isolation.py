"""Tenants sharing one engine (issue 25, items 1-3): one request's failure fails only that request,
any client string is a valid adapter name or a BadRequest naming the rule, and an adapter re-read
from a changed file is a new version (its config and tensors together), never a mix of two."""
from __future__ import annotations

import json
import shutil

import httpx
import pytest
from deltatune import LoraConfig, PeftModel
from deltatune.serving import BadRequest, SamplingParams, ServingError
from tests.conftest import perturb_trainable
from tests.serving_fixtures import KEY, serving  # noqa: F401 (serving: the HTTP server fixture)
from tests.test_serving_engine import GREEDY, assert_same_greedy, dirs, engine_for, reference  # noqa: F401

# -- 1. isolation ------------------------------------------------------------------------------------


def test_tiny_temperature_is_greedy_and_leaves_its_neighbours_alone(dirs):
    """temperature=1e-45 passes validation; it used to make NaN probabilities that failed the whole batch."""
    engine = engine_for(dirs, names=("a",))
    tiny = SamplingParams(temperature=1e-45, max_tokens=12, ignore_eos=True)
    assert tiny.greedy and SamplingParams(temperature=9e-6).greedy and not SamplingParams(temperature=1e-5).greedy
    outs = engine.generate([[5, 6], [5, 6], [7]], adapter=["a", "a", None], sampling=[GREEDY, tiny, GREEDY])
    want, gaps = reference(dirs, "a", [5, 6], GREEDY.max_tokens)
    for out in outs[:2]:
        assert_same_greedy(out.outputs[0].token_ids, want, gaps)
    want, gaps = reference(dirs, None, [7], GREEDY.max_tokens)
    assert_same_greedy(outs[2].outputs[0].token_ids, want, gaps)


def test_a_row_with_non_finite_logits_fails_only_its_request(dirs, monkeypatch):
    """NaN logits in one row (a broken adapter, say) end that request with a clear error; the other
    rows of the same steps finish with their normal tokens, and serving goes on."""
    engine = engine_for(dirs, names=("a", "b"))
    real = engine.runner._forward

    def nan_for_b(ids, positions, mask, names):
        logits = real(ids, positions, mask, names)
        for row, name in enumerate(names):
            if name == engine.pool.resolve("b").internal:
                logits[row] = float("nan")
        return logits
    monkeypatch.setattr(engine.runner, "_forward", nan_for_b)
    sampled = SamplingParams(temperature=0.8, seed=3, max_tokens=12, ignore_eos=True)
    handles = [engine.submit([5, 6], "a", GREEDY), engine.submit([9, 12], "b", GREEDY),
               engine.submit([9, 12], "b", sampled), engine.submit([7], None, GREEDY)]
    while not all(h.finished for h in handles):
        engine._guarded_step()
    for h in handles[1:3]:
        with pytest.raises(ServingError, match="non-finite"):
            h.result()
    want, gaps = reference(dirs, "a", [5, 6], GREEDY.max_tokens)
    assert_same_greedy(handles[0].result().outputs[0].token_ids, want, gaps)
    want, gaps = reference(dirs, None, [7], GREEDY.max_tokens)
    assert_same_greedy(handles[3].result().outputs[0].token_ids, want, gaps)
    stats = engine.stats()
    assert stats["running"] == 0 and engine.pool.resolve("b").refs == 0


# -- 2. names ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sql-lora-v1.2", "tenant/model.v2", "a@b", "ünï cödé"])
def test_any_printable_name_loads_and_serves(dirs, name):
    engine = engine_for(dirs, names=())
    info = engine.add_adapter(name, dirs["a"])
    assert info.name == name and [a.name for a in engine.adapters()] == [name]
    out = engine.generate([5, 6], adapter=name, sampling=GREEDY)[0]
    want, gaps = reference(dirs, "a", [5, 6], GREEDY.max_tokens)
    assert_same_greedy(out.outputs[0].token_ids, want, gaps)
    engine.remove_adapter(name)
    assert engine.adapters() == []


@pytest.mark.parametrize("name", ["", "bad\nname", "tab\there", " padded", "x" * 300, 17, None])
def test_a_name_breaking_the_rule_is_a_bad_request_naming_it(dirs, name):
    engine = engine_for(dirs, names=())
    with pytest.raises(BadRequest, match="printable characters") as info:
        engine.add_adapter(name, dirs["a"])
    assert info.value.param == "lora_name"


def test_dotted_name_over_http_loads_and_a_bad_name_is_400(serving):  # noqa: F811
    url, paths = serving["url"], serving["paths"]
    headers = {"Authorization": f"Bearer {KEY}"}

    def post(path, body):
        return httpx.post(f"{url}{path}", json=body, headers=headers, timeout=60)

    response = post("/v1/load_lora_adapter", {"lora_name": "sql-lora-v1.2", "lora_path": str(paths["x"])})
    assert response.status_code == 200, response.text
    try:
        done = post("/v1/completions", {"model": "sql-lora-v1.2", "prompt": "w5 w6", "max_tokens": 3,
                                        "temperature": 0})
        assert done.status_code == 200, done.text
    finally:
        assert post("/v1/unload_lora_adapter", {"lora_name": "sql-lora-v1.2"}).status_code == 200
    bad = post("/v1/load_lora_adapter", {"lora_name": "bad\nname", "lora_path": str(paths["x"])})
    assert bad.status_code == 400, bad.text
    error = bad.json()["error"]
    assert error["param"] == "lora_name" and "printable characters" in error["message"], error


# -- 3. versions -------------------------------------------------------------------------------------


def _rewrite(directory, base, alpha: int, seed: int) -> None:
    """Overwrite the adapter ``directory`` with other factors and another lora_alpha (same shapes)."""
    from transformers import AutoModelForCausalLM

    config = LoraConfig(r=4, lora_alpha=alpha, target_modules=["q_proj", "v_proj"])
    model = PeftModel(AutoModelForCausalLM.from_pretrained(base), config)
    perturb_trainable(model, seed=seed, scale=0.3)
    model.save_pretrained(directory)


def test_a_changed_file_reread_from_disk_is_a_new_version_never_a_mix(dirs, tmp_path):
    """max_loras=1, max_cpu_loras=0: serving "b" evicts "a" to disk. Then a's file changes (factors
    and lora_alpha). The re-read is a new version with both the new factors and the new scaling
    (the design: a version is one read of the files; a changed file is a new version), so the answer
    equals the new adapter alone. It used to run the new factors with the old, cached scaling."""
    a = tmp_path / "a"
    shutil.copytree(dirs["a"], a)
    engine = engine_with(dirs, {"a": a, "b": dirs["b"]}, max_loras=1, max_cpu_loras=0)
    first = engine.generate([5, 6], adapter="a", sampling=GREEDY)[0].outputs[0].token_ids
    want, gaps = reference(dirs, "a", [5, 6], GREEDY.max_tokens)
    assert_same_greedy(first, want, gaps)
    engine.generate([5, 6], adapter="b", sampling=GREEDY)
    assert {i.name: i.state for i in engine.adapters()} == {"a": "disk", "b": "ready"}

    _rewrite(a, dirs["base"], alpha=32, seed=77)
    assert json.loads((a / "adapter_config.json").read_text())["lora_alpha"] == 32
    again = engine.generate([5, 6], adapter="a", sampling=GREEDY)[0].outputs[0].token_ids
    want, gaps = reference({**dirs, "a2": a}, "a2", [5, 6], GREEDY.max_tokens)
    assert_same_greedy(again, want, gaps)
    assert again != first
    info = {i.name: i for i in engine.adapters()}["a"]
    assert info.version == 2
    assert engine.pool.resolve("a").config.lora_alpha == 32


def engine_with(dirs, adapters: dict, **kw):
    from deltatune.serving import Engine

    engine = Engine(str(dirs["base"]), **kw)
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    return engine


def test_pinned_waiting_request_is_not_dropped_to_disk(dirs, tmp_path):
    """A request queued while its version is in memory keeps that version: the pool keeps a pinned
    version's tensors in memory (even beyond max_cpu_loras) instead of dropping them to disk, so a
    file changed meanwhile does not reach the request."""
    a = tmp_path / "a"
    shutil.copytree(dirs["a"], a)
    engine = engine_with(dirs, {"b": dirs["b"], "a": a}, max_loras=1, max_cpu_loras=0)
    # a is ready (added last); a request for it waits, pinned, while another adapter takes the slot.
    handle = engine.submit([5, 6], "a", GREEDY)
    assert engine.pool.resolve("a").tensors is not None
    engine.add_adapter("c", dirs["c"])
    assert engine.pool.resolve("a").tensors is not None, "a pinned version was dropped to disk"
    _rewrite(a, dirs["base"], alpha=32, seed=79)
    while not handle.finished:
        engine._guarded_step()
    want, gaps = reference(dirs, "a", [5, 6], GREEDY.max_tokens)
    assert_same_greedy(handle.result().outputs[0].token_ids, want, gaps)
