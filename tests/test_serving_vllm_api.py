"""vLLM's offline API from ``deltatune.serving``: the PEFT overview's snippet with local names."""
from __future__ import annotations

import pytest

from deltatune.serving import LLM, LoRARequest, RequestOutput, SamplingParams
from tests.test_serving_engine import dirs  # noqa: F401  (fixture: tiny base + adapters a..d)


def test_the_overview_snippet_runs_with_deltatune_serving(dirs):  # noqa: F811
    # From the PEFT overview, import changed and hub names replaced by local directories:
    #   from vllm import LLM, SamplingParams; from vllm.lora.request import LoRARequest
    prompts = ["w5 w6 w7", "w3 w4"]
    sampling_params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm = LLM(model=str(dirs["base"]), enable_lora=True, max_loras=8)
    out = llm.generate(prompts, sampling_params,
                       lora_request=LoRARequest("customer-42", 1, str(dirs["a"])))
    assert len(out) == 2 and all(isinstance(o, RequestOutput) for o in out)
    first = out[0].outputs[0]
    assert first.finish_reason == "length" and len(first.token_ids) == 8
    assert first.text == llm.get_tokenizer().decode(first.token_ids, skip_special_tokens=True)
    # the same through the engine's own API, and different from the base
    engine_out = llm.engine.generate(prompts, adapter="customer-42", sampling=sampling_params)
    assert [o.outputs[0].token_ids for o in engine_out] == [o.outputs[0].token_ids for o in out]
    base = llm.generate(prompts, sampling_params)
    assert [o.outputs[0].token_ids for o in base] != [o.outputs[0].token_ids for o in out]
    # one request per prompt (None: the base), and a request naming a new path reloads the adapter
    mixed = llm.generate(prompts, sampling_params, lora_request=[None, LoRARequest("customer-42", 1, str(dirs["a"]))])
    assert mixed[0].outputs[0].token_ids == base[0].outputs[0].token_ids
    assert mixed[1].outputs[0].token_ids == out[1].outputs[0].token_ids
    moved = llm.generate(prompts[:1], sampling_params, lora_request=LoRARequest("customer-42", 2, str(dirs["b"])))
    assert moved[0].outputs[0].token_ids != out[0].outputs[0].token_ids
    assert [(i.name, i.version) for i in llm.engine.adapters()] == [("customer-42", 2)]
    prompt_ids = llm.generate([{"prompt_token_ids": out[0].prompt_token_ids}], sampling_params)
    assert prompt_ids[0].outputs[0].token_ids == base[0].outputs[0].token_ids


def test_lora_request_needs_enable_lora(dirs):  # noqa: F811
    llm = LLM(model=str(dirs["base"]))
    with pytest.raises(ValueError, match="enable_lora=True"):
        llm.generate(["w5"], SamplingParams(max_tokens=2), lora_request=LoRARequest("x", 1, str(dirs["a"])))
    assert llm.engine.max_model_len == 64   # the model's context (below the default cap)
