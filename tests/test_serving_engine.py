"""The serving engine on a tiny random Llama: continuous batching against each request alone and
against a plain forward-per-token reference, sampling, streaming, aborts, the bounded KV cache,
adapter tiers and versions, and the errors of bad requests and bad adapters."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time

import pytest
import torch

from deltatune import LoraConfig, PeftModel
from deltatune.serving import (AdapterLoadError, BadRequest, Engine, PromptTooLong, QueueFull, SamplingParams,
                               UnknownModel)
from tests.conftest import perturb_trainable, tiny_llama
from tests.test_cli import _tiny_tokenizer

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
# Adapters of different ranks and target sets (name -> config), all served side by side.
CONFIGS = {
    "a": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "b": LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"]),
    "c": LoraConfig(r=2, lora_alpha=8, target_modules=["down_proj", "up_proj"]),
    "d": LoraConfig(r=16, lora_alpha=16, target_modules="all-linear"),
    "dora": LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["k_proj", "o_proj"]),
}
PROMPTS = [[5, 6, 7], [9, 12], [3], [20, 21, 22, 23, 24], [40, 41], [50, 51, 52], [60], [70, 71, 72, 73]]
ROUTE = ["a", None, "b", "a", "c", "d", None, "b"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tiny Llama + word-level tokenizer directory and adapters for it (name -> directory)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("serving")
    base = root / "base"
    tiny_llama().save_pretrained(base)
    _tiny_tokenizer().save_pretrained(base)
    out = {"base": base}
    for i, (name, config) in enumerate(CONFIGS.items()):
        model = PeftModel(AutoModelForCausalLM.from_pretrained(base), config)
        perturb_trainable(model, seed=i + 1, scale=0.3)
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


def engine_for(dirs, names=("a", "b", "c", "d"), **kw) -> Engine:
    engine = Engine(str(dirs["base"]), **kw)
    for name in names:
        engine.add_adapter(name, dirs[name])
    return engine


def reference(dirs, adapter, prompt, steps):
    """Greedy tokens by a full forward per token (no cache, no batching) and, per step, the gap
    between the top two logits (a tie-break there may legitimately go either way)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dirs["base"]).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, dirs[adapter]).eval()
    ids, gaps = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            top = model(input_ids=torch.tensor([ids])).logits[0, -1].topk(2)
            gaps.append(float(top.values[0] - top.values[1]))
            ids.append(int(top.indices[0]))
    return ids[len(prompt):], gaps


def assert_same_greedy(got, want, gaps):
    """Equal tokens, except from a step where the reference's top two logits were within 1e-4."""
    for k, (g, w) in enumerate(zip(got, want)):
        if g != w:
            assert gaps[k] < 1e-4, f"token {k}: {g} != {w} (reference top-2 gap {gaps[k]:.2e})"
            return
    assert len(got) == len(want)


def test_continuous_batching_gives_each_request_its_tokens_alone(dirs):
    # 3 slots for 8 requests: later requests join the batch while earlier ones decode.
    engine = engine_for(dirs, max_num_seqs=3)
    batched = engine.generate(PROMPTS, adapter=ROUTE, sampling=GREEDY)
    assert engine.stats()["prefill_steps_total"] > 1 and engine.stats()["running"] == 0
    for prompt, name, out in zip(PROMPTS, ROUTE, batched):
        alone = engine.generate(prompt, adapter=name, sampling=GREEDY)[0]
        want, gaps = reference(dirs, name, prompt, GREEDY.max_tokens)
        assert_same_greedy(out.outputs[0].token_ids, want, gaps)
        assert_same_greedy(alone.outputs[0].token_ids, want, gaps)
        assert out.outputs[0].finish_reason == "length" and out.prompt_token_ids == prompt
    # the adapters matter: each changes its prompt's tokens against the base
    base = engine.generate(PROMPTS, sampling=GREEDY)
    assert sum(b.outputs[0].token_ids != o.outputs[0].token_ids for b, o in zip(base, batched)) >= 5


def test_seed_gives_the_same_text_and_n_completions(dirs):
    engine = engine_for(dirs, names=("a",))
    sampled = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=10, seed=7, ignore_eos=True)
    first = engine.generate([[5, 6]] * 1, adapter="a", sampling=sampled)[0].outputs[0]
    # the same seed, now among other requests
    crowd = engine.generate([[5, 6], [9, 9, 9], [5, 6]], adapter=["a", None, "a"],
                            sampling=[sampled, SamplingParams(temperature=0.7, max_tokens=10), sampled])
    assert crowd[0].outputs[0].token_ids == first.token_ids == crowd[2].outputs[0].token_ids
    other = engine.generate([[5, 6]], adapter="a", sampling=SamplingParams(temperature=1.0, max_tokens=10, seed=8,
                                                                         ignore_eos=True))[0]
    assert other.outputs[0].token_ids != first.token_ids
    n = engine.generate([[5, 6]], adapter="a", sampling=dataclasses.replace(sampled, n=3))[0]
    assert [o.index for o in n.outputs] == [0, 1, 2]
    assert n.outputs[0].token_ids == first.token_ids   # completion i uses seed + i
    assert len({tuple(o.token_ids) for o in n.outputs}) == 3
    greedy_n = engine.generate([[5, 6]], sampling=SamplingParams(n=2, temperature=0, max_tokens=6))[0]
    assert greedy_n.outputs[0].token_ids == greedy_n.outputs[1].token_ids


def test_top_k_one_is_greedy(dirs):
    engine = engine_for(dirs, names=())
    greedy = engine.generate([[5, 6]], sampling=GREEDY)[0].outputs[0].token_ids
    top1 = engine.generate([[5, 6]], sampling=SamplingParams(temperature=2.0, top_k=1, max_tokens=12,
                                                              ignore_eos=True))[0].outputs[0].token_ids
    tiny_p = engine.generate([[5, 6]], sampling=SamplingParams(temperature=2.0, top_p=1e-6, max_tokens=12,
                                                                ignore_eos=True))[0].outputs[0].token_ids
    assert top1 == greedy == tiny_p


def test_stop_strings_max_tokens_and_streamed_text(dirs):
    engine = engine_for(dirs, names=("b",))
    full = engine.generate([[5, 6, 7]], adapter="b", sampling=GREEDY)[0].outputs[0]
    words = full.text.split()
    assert len(words) == 12
    stop = " ".join(words[4:6])                      # two words from the middle
    cut = full.text.index(stop)
    with engine:
        handle = engine.submit([5, 6, 7], "b", SamplingParams(temperature=0, max_tokens=12, stop=[stop, "zzz"],
                                                              ignore_eos=True))
        deltas = asyncio.run(_collect(handle))
    out = handle.result(timeout=30).outputs[0]
    assert out.text == full.text[:cut] and out.finish_reason == "stop" and out.stop_reason == stop
    assert "".join(d.text for d in deltas) == out.text          # the stop string never leaks into the stream
    assert deltas[-1].finish_reason == "stop" and all(d.finish_reason is None for d in deltas[:-1])
    assert sum(len(d.token_ids) for d in deltas) == len(out.token_ids) == deltas[-1].completion_tokens
    short = engine.generate([[5, 6, 7]], adapter="b", sampling=SamplingParams(temperature=0, max_tokens=3,
                                                                              ignore_eos=True))[0].outputs[0]
    assert short.token_ids == full.token_ids[:3] and short.finish_reason == "length"
    # eos ends a completion unless ignore_eos; stop_token_ids too
    eos = engine.generate([[5, 6, 7]], adapter="b", sampling=SamplingParams(
        temperature=0, max_tokens=12, stop_token_ids=[full.token_ids[2]]))[0].outputs[0]
    assert eos.token_ids == full.token_ids[:3] and eos.finish_reason == "stop" and eos.stop_reason == full.token_ids[2]
    # min_tokens masks the stop tokens until then (HF's min_new_tokens)
    late = engine.generate([[5, 6, 7]], adapter="b", sampling=SamplingParams(
        temperature=0, max_tokens=12, min_tokens=12, stop_token_ids=[full.token_ids[2]]))[0].outputs[0]
    assert len(late.token_ids) == 12 and late.token_ids[:2] == full.token_ids[:2]
    assert full.token_ids[2] not in late.token_ids and late.finish_reason == "length"


async def _collect(handle):
    return [d async for d in handle]


def test_abort_frees_the_slot_and_ends_the_stream(dirs):
    engine = engine_for(dirs, names=("a",), max_num_seqs=1)
    with engine:
        long = engine.submit([5, 6], "a", SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))
        queued = engine.submit([9, 9], None, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))

        async def first_then_abort():
            async for delta in long:
                if delta.finish_reason is None and delta.completion_tokens == 2:
                    long.abort()
                last = delta
            return last
        last = asyncio.run(first_then_abort())
        assert last.finish_reason == "abort"
        assert queued.result(timeout=30).outputs[0].finish_reason == "length"   # it got the freed slot
        out = long.result(timeout=30).outputs[0]
        assert out.finish_reason == "abort" and len(out.token_ids) < 60
        assert engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0
        waiting = engine.submit([5], None, SamplingParams(max_tokens=60, ignore_eos=True))
        waiting.abort()
        assert waiting.result(timeout=30).outputs[0].finish_reason == "abort"


def test_kv_cache_is_allocated_once_and_reused(dirs):
    engine = engine_for(dirs, names=("a", "b"), max_num_seqs=4)
    pointers = [t.data_ptr() for t in engine.cache.keys + engine.cache.values]
    nbytes = engine.stats()["kv_cache_bytes"]
    for round_ in range(5):
        engine.generate([[i % 100 + 3, 7] for i in range(12)], adapter=["a", "b", None] * 4,
                        sampling=SamplingParams(temperature=0.8, max_tokens=8 + round_, seed=round_))
    assert [t.data_ptr() for t in engine.cache.keys + engine.cache.values] == pointers
    assert engine.stats()["kv_cache_bytes"] == nbytes
    assert engine.cache.clean <= engine.max_model_len       # positions touched: at most the context
    assert engine.stats()["requests_finished"] == 60 and engine.stats()["running"] == 0


def test_lru_tiers_load_on_first_use(dirs):
    engine = engine_for(dirs, max_loras=2, max_cpu_loras=1)
    states = {i.name: i.state for i in engine.adapters()}
    assert sorted(states.values()) == ["cpu", "disk", "ready", "ready"]
    assert states["d"] == "ready" and states["a"] == "disk"       # least recently added went furthest
    assert len(engine.pool.ready) == 2
    ours = engine.generate(PROMPTS[:4], adapter=["a", "b", "c", "d"], sampling=GREEDY)  # 4 adapters, 2 ready slots
    assert len(engine.pool.ready) <= 2
    for prompt, name, out in zip(PROMPTS, "abcd", ours):
        want, gaps = reference(dirs, name, prompt, GREEDY.max_tokens)
        assert_same_greedy(out.outputs[0].token_ids, want, gaps)
    assert {i.rank for i in engine.adapters()} == {2, 4, 8, 16}


def test_reload_and_remove_while_running_keep_each_request_on_one_version(dirs):
    engine = engine_for(dirs, names=("a",))
    long = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    with engine:
        old = engine.submit([5, 6], "a", long)
        _wait_for_tokens(old, 2)
        info = engine.add_adapter("a", dirs["b"], replace=True)         # new version under the same name
        assert info.version == 2
        new = engine.submit([5, 6], "a", long)
        kept = old.result(timeout=60).outputs[0].token_ids
        replaced = new.result(timeout=60).outputs[0].token_ids
        running = engine.submit([5, 6], "a", long)
        _wait_for_tokens(running, 2)
        engine.remove_adapter("a")
        with pytest.raises(UnknownModel, match="'a'"):
            engine.submit([5, 6], "a", long)
        removed = running.result(timeout=60).outputs[0].token_ids
    assert kept == reference(dirs, "a", [5, 6], 40)[0]
    assert replaced == reference(dirs, "b", [5, 6], 40)[0] == removed
    engine._step()   # the removed version leaves the model once its last request is done
    assert engine.adapters() == [] and engine.pool.versions == {} and len(engine.pool.ready) == 0


def _wait_for_tokens(handle, n, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with handle._lock:
            if sum(len(d.token_ids) for d in handle._deltas) >= n:
                return
        time.sleep(0.005)
    raise AssertionError(f"{handle.request_id} produced no {n} tokens in {timeout} s")


def _corrupt(src, dst):
    import shutil

    shutil.copytree(src, dst)
    (dst / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    return dst


def _other_base(tmp_path):
    """An adapter trained for a Llama with hidden size 48: same module names, other shapes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = PeftModel(LlamaForCausalLM(cfg), LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "other")
    return tmp_path / "other"


def _with_config(src, dst, **changes):
    import shutil

    shutil.copytree(src, dst)
    path = dst / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return dst


def test_bad_adapters_are_refused_and_serving_goes_on(dirs, tmp_path):
    engine = engine_for(dirs, names=("a",), max_lora_rank=8)
    before = engine.generate(PROMPTS[:2], adapter=["a", None], sampling=GREEDY)
    cases = {
        "missing": (tmp_path / "nowhere", "not found"),
        "corrupt": (_corrupt(dirs["a"], tmp_path / "corrupt"), "adapter_model.safetensors"),
        "other base": (_other_base(tmp_path), "made for another base"),
        "rank": (dirs["d"], "r=16 is above max_lora_rank=8"),
        "targets": (_with_config(dirs["a"], tmp_path / "targets", target_modules=["nope_proj"]), "nope_proj"),
        "pissa": (_with_config(dirs["a"], tmp_path / "pissa", init_lora_weights="pissa"), "init_lora_weights"),
        "bad json": (_with_config(dirs["a"], tmp_path / "json"), None),
    }
    (tmp_path / "json" / "adapter_config.json").write_text("{not json")
    cases["bad json"] = (tmp_path / "json", "invalid JSON")
    for label, (path, message) in cases.items():
        with pytest.raises(AdapterLoadError, match=message) as err:
            engine.add_adapter("x", path)
        assert err.value.param == "lora_path", label
        assert [i.name for i in engine.adapters()] == ["a"], label
    with pytest.raises(AdapterLoadError, match="already loaded"):
        engine.add_adapter("a", dirs["b"])
    after = engine.generate(PROMPTS[:2], adapter=["a", None], sampling=GREEDY)
    assert [o.outputs[0].token_ids for o in after] == [o.outputs[0].token_ids for o in before]


def test_bad_requests_name_the_field(dirs):
    engine = engine_for(dirs, names=("a",), max_waiting=2, max_num_seqs=2)
    with pytest.raises(UnknownModel, match="'zzz'"):
        engine.submit([5], "zzz")
    with pytest.raises(PromptTooLong) as err:
        engine.submit(list(range(3, 3 + engine.max_model_len)))
    assert err.value.prompt_tokens == 64 and str(engine.max_model_len) in err.value.message
    with pytest.raises(BadRequest) as err:
        engine.submit([5, 6], sampling=SamplingParams(max_tokens=63))
    assert err.value.param == "max_tokens" and "62" in err.value.message
    for field, value in [("max_tokens", -1), ("temperature", "hot"), ("top_p", 0), ("n", 0), ("stop", [""]),
                         ("top_k", 1.5), ("seed", "x"), ("min_tokens", 99)]:
        with pytest.raises(BadRequest) as err:
            SamplingParams(**{field: value})
        assert err.value.param == field and field in err.value.message
    with pytest.raises(BadRequest, match="max_num_seqs") as err:
        engine.submit([5], sampling=SamplingParams(n=64))
    assert err.value.param == "n"
    for prompt in ("", [], [999]):
        with pytest.raises(BadRequest) as err:
            engine.submit(prompt)
        assert err.value.param == "prompt"
    # no loop running: all wait; 2 free slots + max_waiting=2 bound them (admitted or not yet)
    engine.submit([5]), engine.submit([6]), engine.submit([7]), engine.submit([8])
    with pytest.raises(QueueFull):
        engine.submit([9])
    assert engine.stats()["waiting"] == 4


def test_many_threads_submitting_while_the_loop_runs(dirs):
    engine = engine_for(dirs, max_num_seqs=4)
    results = {}

    def client(i):
        name = ROUTE[i % len(ROUTE)]
        results[i] = engine.submit(PROMPTS[i % len(PROMPTS)], name, GREEDY).result(timeout=60)

    with engine:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    alone = {}
    for i in range(len(PROMPTS)):
        alone[i] = engine.generate(PROMPTS[i], adapter=ROUTE[i], sampling=GREEDY)[0].outputs[0].token_ids
    for i, out in results.items():
        assert out.outputs[0].token_ids == alone[i % len(PROMPTS)]


def test_dora_beside_lora_and_the_core_rule_on_shared_modules(dirs):
    engine = engine_for(dirs, names=("a", "dora"))          # LoRA on q/v, DoRA on k/o: side by side
    outs = engine.generate(PROMPTS[:3], adapter=["dora", "a", "dora"], sampling=GREEDY)
    for prompt, name, out in zip(PROMPTS, ["dora", "a", "dora"], outs):
        want, gaps = reference(dirs, name, prompt, GREEDY.max_tokens)
        assert_same_greedy(out.outputs[0].token_ids, want, gaps)
    engine.add_adapter("b", dirs["b"])       # plain LoRA joins the DoRA layers on k/o
    out = engine.generate(PROMPTS[0], adapter="b", sampling=GREEDY)[0]
    assert_same_greedy(out.outputs[0].token_ids, *reference(dirs, "b", PROMPTS[0], GREEDY.max_tokens))
    # the other way round too: one layer class holds both kinds, whichever adapter wrapped it first
    plain_first = engine_for(dirs, names=("b", "dora"))
    out = plain_first.generate(PROMPTS[0], adapter="dora", sampling=GREEDY)[0]
    assert_same_greedy(out.outputs[0].token_ids, *reference(dirs, "dora", PROMPTS[0], GREEDY.max_tokens))


def test_a_failing_step_fails_its_requests_and_serving_goes_on(dirs, monkeypatch):
    engine = engine_for(dirs, names=("a",))
    real, calls = engine.runner._forward, []

    def broken_once(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated kernel failure")
        return real(*args)
    monkeypatch.setattr(engine.runner, "_forward", broken_once)
    with pytest.raises(Exception, match="simulated kernel failure"):
        engine.generate([[5, 6], [7]], adapter=["a", None], sampling=GREEDY)
    assert engine.stats()["running"] == 0 and engine.pool.resolve("a").refs == 0
    out = engine.generate([[5, 6]], adapter="a", sampling=GREEDY)[0]
    assert out.outputs[0].token_ids == reference(dirs, "a", [5, 6], GREEDY.max_tokens)[0]
