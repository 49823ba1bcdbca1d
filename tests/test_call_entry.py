"""The one call entry (``PeftModel.applying``): routes per thread, trained biases per adapter,
virtual-token inputs prepared in one place, a component list instead of model walks, and the
serving engine serving the virtual-token adapters it refused in issue 23 (issue 25)."""
from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from safetensors.torch import load_file

import deltatune
from deltatune import LoraConfig, PeftModel, get_peft_model
from deltatune.adapter_set import MixingError
from tests.conftest import tiny_gpt2, tiny_llama, token_batch

TARGETS = ["q_proj", "v_proj"]


def _two_loras():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    model.add_adapter("b", LoraConfig(r=2, target_modules=TARGETS, init_lora_weights=False))
    return model.eval()


def _alone(model, name, ids):
    with torch.no_grad():
        return model(input_ids=ids, adapter_names=[name] * ids.shape[0]).logits


def test_threads_calling_at_once_get_their_own_adapters():
    """Both threads are inside their routed call when either reads its route (a barrier in a
    pre-hook of the embedding, which runs before any adapter layer): with a route shared by the
    whole model, one of them would read the other's adapter every time."""
    model = _two_loras()
    ids = token_batch()
    expected = {name: _alone(model, name, ids) for name in ("default", "b")}
    assert not torch.allclose(expected["default"], expected["b"])
    barrier = threading.Barrier(2, timeout=30)

    def both_inside(*_):
        barrier.wait()                                      # returns None: the inputs stay as they are

    hook = model.base_model.model.model.embed_tokens.register_forward_pre_hook(both_inside)
    results, errors = {}, []

    def call(name):
        try:
            for step in range(3):
                with torch.no_grad():
                    results[name, step] = model(input_ids=ids, adapter_names=[name] * ids.shape[0]).logits
        except BaseException as exc:  # noqa: BLE001 - reported below
            barrier.abort()
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(name,)) for name in ("default", "b")]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        hook.remove()
    assert not errors, errors
    for (name, _), logits in results.items():
        torch.testing.assert_close(logits, expected[name], rtol=0, atol=0)


def test_asyncio_tasks_see_only_their_own_route():
    model = _two_loras()
    ids = token_batch()

    async def routed(name, started, other_started):
        with model.applying([name] * 2) as call:
            started.set()
            await other_started.wait()      # the other task is inside its own routed call now
            assert call.route == name
            assert model.adapter_set.route() == name
            return model(input_ids=ids).logits

    async def both():
        a, b = asyncio.Event(), asyncio.Event()
        return await asyncio.gather(routed("default", a, b), routed("b", b, a))

    with torch.no_grad():
        got = asyncio.run(both())
    torch.testing.assert_close(got[0], _alone(model, "default", ids), rtol=0, atol=0)
    torch.testing.assert_close(got[1], _alone(model, "b", ids), rtol=0, atol=0)


def _bias_key(model) -> str:
    return next(k for k in model.base_model.adapter_state("b") if k.endswith("c_attn.base_layer.bias"))


def test_trained_bias_step_kept_while_another_adapter_is_merged(tmp_path):
    """b is active and trains its biases while a is merged: the step is b's, in its saved bias and
    in the live bias once a is unmerged (issue 23: it was lost when two adapters were live)."""
    config = dict(r=2, target_modules=["c_attn"], bias="lora_only", init_lora_weights=False)
    model = get_peft_model(tiny_gpt2(), LoraConfig(**config), adapter_name="a")
    model.add_adapter("b", LoraConfig(**config))
    with torch.no_grad():                                   # a's trained biases differ from the base's
        for p in model.base_model.live_bias_parameters("a"):
            p.add_(0.5)
    model.set_adapter("b")
    model.merge_adapter(["a"])
    key = _bias_key(model)
    own_before = model.base_model.adapter_state("b")[key].detach().clone()
    live = model.base_model.model.get_parameter(key)
    live_before = live.detach().clone()

    ids = token_batch(length=8)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    step = live.detach() - live_before
    assert step.abs().max() > 1e-4                          # the step moved the live bias

    torch.testing.assert_close(model.base_model.adapter_state("b")[key], own_before + step)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "b" / "adapter_model.safetensors")
    peft_key = "base_model.model." + key                  # peft keeps base_layer in the bias key
    torch.testing.assert_close(saved[peft_key], own_before + step)
    model.unmerge_adapter()
    torch.testing.assert_close(live.detach(), own_before + step)


def test_the_call_prepares_virtual_tokens_for_any_callee():
    """``call.prepare`` is what ``forward`` does to its inputs: the user's model called with the
    prepared keywords gives ``forward``'s logits; the decoder body gives its hidden states."""
    model = get_peft_model(tiny_llama(), deltatune.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    model.add_adapter("lora", LoraConfig(r=2, target_modules=TARGETS, init_lora_weights=False))
    ids = token_batch()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with model.applying(["default"] * 2) as call:
            got = model.get_base_model()(**call.prepare({"input_ids": ids})).logits
        with model.applying(["lora"] * 2) as call:          # a layer method: inputs unchanged
            assert call.prepare({"input_ids": ids}) == {"input_ids": ids}
    # forward puts the 3 virtual positions first, as peft does; the callee sees the real tokens only
    assert expected.shape == (2, 3 + ids.shape[1], 128)
    torch.testing.assert_close(got, expected[:, 3:], rtol=0, atol=0)
    assert got.shape == (2, ids.shape[1], 128)


def test_training_loss_equals_forward_loss_for_prompt_tuning():
    from deltatune.training.batching import Batch
    from deltatune.training.loss import lm_loss_sum

    model = get_peft_model(tiny_llama(), deltatune.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    ids = token_batch(length=8)
    positions = torch.arange(8).expand(2, 8)
    targets = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], 1)
    batch = Batch(ids, positions, targets, tokens=16, label_tokens=14)
    logits = model(input_ids=ids, position_ids=positions).logits[:, 3:]    # the real tokens' (virtual first)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1),
                                                 reduction="sum")
    torch.testing.assert_close(lm_loss_sum(model, batch), expected, rtol=1e-5, atol=1e-5)


def test_one_mixing_rule_names_the_adapter_and_why():
    from deltatune.peft_model import mixing_problem

    model = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], bias="all"))
    model.add_adapter("plain", LoraConfig(r=2, target_modules=["c_attn"]))
    model.add_adapter("prompt", deltatune.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    assert "biases" in mixing_problem(model, "default")
    assert "PROMPT_TUNING" in mixing_problem(model, "prompt")
    assert mixing_problem(model, "plain") is None
    ids = token_batch()
    with pytest.raises(MixingError, match="PROMPT_TUNING"):
        model(input_ids=ids, adapter_names=["plain", "prompt"])


def test_a_call_can_reuse_the_previous_calls_route_tensor():
    """The engine's decode steps: the same rows' adapters give the very same slot tensor, so
    layers find their gathered factors by identity; a change of the slots gives a new one."""
    model = _two_loras()
    with model.applying(["default", "b"]) as first:
        pass
    with model.applying(["default", "b"], reuse=first) as same:
        assert same.route is first.route
    with model.applying(["b", "default"], reuse=first) as other:
        assert other.route is not first.route and other.route.tolist() == [2, 1]
    model.add_adapter("c", LoraConfig(r=2, target_modules=TARGETS))
    with model.applying(["default", "b"], reuse=first) as after_add:
        assert after_add.route is not first.route


def test_adapter_layers_come_from_the_component_list(monkeypatch):
    from deltatune import targeting

    model = _two_loras()
    model.add_adapter("prompt", deltatune.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    expected = sorted(n for n, m in model.base_model.model.named_modules() if hasattr(m, "lora_A"))

    def no_walk(*_a, **_k):
        raise AssertionError("adapter_layers() walked the model")

    monkeypatch.setattr(targeting, "iter_candidates", no_walk)
    assert sorted(n for n, _ in model.base_model.adapter_layers()) == expected
    model.delete_adapter("b")
    model.delete_adapter("default")                         # layers left empty are unwrapped
    assert list(model.base_model.adapter_layers()) == []
    assert not any(hasattr(m, "lora_A") for m in model.base_model.model.modules())
    assert [c.adapters() for c in model.base_model.component_list] == [["prompt"]]


def test_engine_serves_a_prompt_tuning_adapter_it_refused_before(tmp_path):
    """Issue 23 refused virtual-token adapters at load; issue 25 serves them (the row-by-row checks
    against ``PeftModel.generate`` are in test_serving_virtual_tokens.py)."""
    from deltatune.serving import Engine, SamplingParams
    from tests.test_cli import _tiny_tokenizer

    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    _tiny_tokenizer().save_pretrained(base)
    from transformers import AutoModelForCausalLM

    model = PeftModel(AutoModelForCausalLM.from_pretrained(base),
                      deltatune.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    model.save_pretrained(tmp_path / "prompt")
    engine = Engine(str(base))
    engine.add_adapter("p", tmp_path / "prompt")
    assert [(a.name, a.state) for a in engine.adapters()] == [("p", "ready")]
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    got = engine.generate([5, 6, 7], adapter="p", sampling=greedy)[0].outputs[0].token_ids
    model.eval()
    model.base_model.model.generation_config.eos_token_id = None
    with torch.no_grad():
        want = model.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)[0, 3:].tolist()
    assert got == want
