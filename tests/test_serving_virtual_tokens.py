"""Virtual-token adapters served (issue 25): prompt tuning, P-tuning and prefix tuning rows in the
engine's batches beside LoRA and base rows, each row equal to ``PeftModel.generate`` for its adapter
alone (greedy, token for token); the context accounts for the virtual tokens; what cannot be mixed
is refused at load, saying why; and one request through the HTTP server with the openai client."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import deltatune
from deltatune import LoraConfig, PeftModel
from deltatune.serving import AdapterLoadError, BadRequest, Engine, SamplingParams
from tests.serving_fixtures import KEY, SPECIAL, Server, ids_of, tiny_tokenizer

VIRTUAL = {
    "prompt": lambda: deltatune.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),   # random init
    "ptuning": lambda: deltatune.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                     encoder_hidden_size=16),
    "prefix": lambda: deltatune.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
}
PROMPTS = [[5, 6, 7], [9, 10], [11, 12, 13, 14, 15], [20], [30, 31, 32], [40, 41, 42, 43]]


def _save(base: Path, directory: Path, config, seed: int, scale: float = 1.0) -> Path:
    torch.manual_seed(seed)
    model = PeftModel(AutoModelForCausalLM.from_pretrained(base), config)
    if scale != 1.0:  # LoRA: large enough factors that its answers differ from the base's
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.mul_(scale)
    model.save_pretrained(directory)
    return directory


def _adapters(base: Path, root: Path, lora_targets: list[str]) -> dict[str, Path]:
    paths = {name: _save(base, root / name, make(), seed) for seed, (name, make) in enumerate(VIRTUAL.items())}
    paths["lora"] = _save(base, root / "lora", LoraConfig(r=4, target_modules=lora_targets, init_lora_weights=False),
                          7, scale=3.0)
    return paths


def _llama_base(directory: Path) -> Path:
    """The serving tests' tiny Llama with a wide init: with the default (0.02) its attention is
    almost uniform, so answers hardly depend on positions, which these tests must check."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.25, bos_token_id=1,
                      eos_token_id=2)
    LlamaForCausalLM(cfg).eval().save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("vtok")
    base = _llama_base(root / "base")
    return dict(base=base, paths=_adapters(base, root, ["q_proj", "v_proj"]))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("vtok-gpt2")
    torch.manual_seed(0)  # a wide init: the tiny default one repeats the last prompt token whatever comes before
    cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=128, initializer_range=0.3,
                     bos_token_id=1, eos_token_id=2)
    GPT2LMHeadModel(cfg).eval().save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    return dict(base=root / "base", paths=_adapters(root / "base", root, ["c_attn"]))


_references: dict = {}


def generate_alone(base: Path, adapter: Path | None, prompt: list[int], max_tokens: int) -> list[int]:
    """``PeftModel.generate`` (greedy) of one prompt by itself; eos does not stop it (as ``ignore_eos``)."""
    key = (str(base), str(adapter), tuple(prompt), max_tokens)
    if key not in _references:
        model = AutoModelForCausalLM.from_pretrained(base).eval()
        model.generation_config.eos_token_id = None
        if adapter is not None:
            model = PeftModel.from_pretrained(model, adapter).eval()
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False)
        _references[key] = out[0, len(prompt):].tolist()
    return _references[key]


def greedy(max_tokens: int, n: int = 1) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, n=n)


def _check_batch(world: dict, method: str) -> None:
    """One ``generate`` call: rows of ``method`` (two prompt lengths, so left padding), LoRA and the
    base, with different lengths so finished rows leave and the batch is compacted."""
    base, paths = world["base"], world["paths"]
    engine = Engine(str(base))
    for name in (method, "lora"):
        engine.add_adapter(name, paths[name])
    adapters = [method, None, "lora", method, "lora", None]
    lengths = [9, 4, 7, 12, 5, 10]
    outs = engine.generate(PROMPTS, adapter=adapters, sampling=[greedy(m) for m in lengths])
    for prompt, adapter, m, out in zip(PROMPTS, adapters, lengths, outs):
        want = generate_alone(base, paths[adapter] if adapter else None, prompt, m)
        assert out.outputs[0].token_ids == want, (method, adapter, prompt)
    # the adapter matters: its rows' answers are not the base's
    assert outs[0].outputs[0].token_ids != generate_alone(base, None, PROMPTS[0], 9)


@pytest.mark.parametrize("method", list(VIRTUAL))
def test_virtual_rows_equal_peft_generate_beside_lora_and_base_rows(llama, method):
    _check_batch(llama, method)


@pytest.mark.parametrize("method", list(VIRTUAL))
def test_virtual_rows_on_gpt2(gpt2, method):
    _check_batch(gpt2, method)


def test_all_methods_join_a_running_batch_with_evictions(llama):
    """Continuous batching: requests of all three methods, LoRA and the base arrive while others
    decode (prefills beside decodes, slots compacted), two completions of one prompt-tuning request
    share a prefix, and two ready slots for four adapters force evictions (the prefix is computed
    again when an adapter comes back)."""
    base, paths = llama["base"], llama["paths"]
    engine = Engine(str(base), max_loras=2, max_num_seqs=4)
    for name in ("prompt", "ptuning", "prefix", "lora"):
        engine.add_adapter(name, paths[name])
    plan = [("prompt", PROMPTS[0], 6, 2), (None, PROMPTS[1], 9, 1), ("prefix", PROMPTS[2], 5, 1),
            ("lora", PROMPTS[3], 8, 1), ("ptuning", PROMPTS[4], 7, 1), ("prompt", PROMPTS[5], 4, 1),
            ("prefix", PROMPTS[1], 6, 1)]
    with engine:
        handles = []
        for adapter, prompt, m, n in plan:
            handles.append(engine.submit(prompt, adapter, greedy(m, n)))
            time.sleep(0.02)
        outs = [h.result() for h in handles]
    for (adapter, prompt, m, _), out in zip(plan, outs):
        want = generate_alone(base, paths[adapter] if adapter else None, prompt, m)
        assert [c.token_ids for c in out.outputs] == [want] * len(out.outputs), (adapter, prompt)
    assert len(outs[0].outputs) == 2


def test_a_reload_in_place_brings_the_new_prefix_and_an_unload_drops_it(llama):
    base, paths = llama["base"], llama["paths"]
    engine = Engine(str(base))
    engine.add_adapter("v", paths["prompt"])
    first = engine.generate(PROMPTS[2], adapter="v", sampling=greedy(6))[0].outputs[0].token_ids
    assert first == generate_alone(base, paths["prompt"], PROMPTS[2], 6)
    engine.add_adapter("v", paths["prefix"], replace=True)          # another method under the same name
    again = engine.generate(PROMPTS[2], adapter="v", sampling=greedy(6))[0].outputs[0].token_ids
    assert again == generate_alone(base, paths["prefix"], PROMPTS[2], 6) != first
    assert len(engine.pool.prefixes) == 1                           # the old version's prefix went with it
    engine.remove_adapter("v")
    assert engine.pool.prefixes == {}


def test_the_context_counts_the_virtual_tokens(llama, tmp_path):
    base, paths = llama["base"], llama["paths"]
    engine = Engine(str(base), max_model_len=12)
    too_many = _save(base, tmp_path / "twelve", deltatune.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                              num_virtual_tokens=12), 3)
    with pytest.raises(AdapterLoadError, match=r"num_virtual_tokens=12 leaves no room.*max_model_len=12"):
        engine.add_adapter("twelve", too_many)
    engine.add_adapter("prefix", paths["prefix"])                                     # 5 virtual tokens
    with pytest.raises(BadRequest, match=r"7 tokens after the adapter's 5 virtual tokens.*12 tokens"):
        engine.generate(list(range(3, 10)), adapter="prefix", sampling=greedy(1))
    with pytest.raises(BadRequest, match=r"max_tokens=5 is too large.*5 virtual tokens.*at most 4 new"):
        engine.generate(PROMPTS[0], adapter="prefix", sampling=greedy(5))
    # no max_tokens: the row runs to the context's end, 12 - 5 - 3 = 4 tokens, as generate's
    to_the_end = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)
    out = engine.generate(PROMPTS[0], adapter="prefix", sampling=to_the_end)[0]
    assert out.outputs[0].finish_reason == "length"
    assert out.outputs[0].token_ids == generate_alone(base, paths["prefix"], PROMPTS[0], 4)
    # the base keeps its whole context
    base_out = engine.generate(PROMPTS[0], sampling=to_the_end)[0]
    assert len(base_out.outputs[0].token_ids) == 12 - 3


def test_a_virtual_adapter_that_also_saves_modules_is_refused_at_load(llama, tmp_path):
    """Its rows would need their own route in the saved module, which rows of other adapters cannot
    share: the one case of these methods the engine cannot mix, refused with the reason."""
    base, paths = llama["base"], llama["paths"]
    config = deltatune.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, modules_to_save=["lm_head"])
    saved = _save(base, tmp_path / "head", config, 4)
    engine = Engine(str(base))
    engine.add_adapter("lora", paths["lora"])
    refusal = r"head.adapter_config.json: a PROMPT_TUNING adapter with modules_to_save=\['lm_head'\] cannot share"
    with pytest.raises(AdapterLoadError, match=refusal):
        engine.add_adapter("head", saved)
    assert [a.name for a in engine.adapters()] == ["lora"]
    out = engine.generate(PROMPTS[0], adapter="lora", sampling=greedy(5))[0]   # the engine serves on
    assert out.outputs[0].token_ids == generate_alone(base, paths["lora"], PROMPTS[0], 5)


def test_a_prompt_tuning_adapter_over_http_with_the_openai_client(llama, tmp_path):
    openai = pytest.importorskip("openai")
    base, paths = llama["base"], llama["paths"]
    server = Server(base, "--adapter", f"tuned={paths['prompt']}", "--adapter", f"lora={paths['lora']}",
                    "--api-key", KEY, log=tmp_path / "server.log")
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY)
        assert {m.id for m in client.models.list().data} >= {"tuned", "lora"}
        reply = client.completions.create(model="tuned", prompt="w5 w6 w7", max_tokens=6, temperature=0,
                                          extra_body={"ignore_eos": True})
    finally:
        server.stop()
    want = generate_alone(base, paths["prompt"], PROMPTS[0], 6)
    assert ids_of(reply.choices[0].text) == [t for t in want if t not in SPECIAL]
