"""Mixed-adapter batches: ``adapter_names=`` gives each row its own adapter, through one mechanism
(the shared adapter set, a bank per layer, gathered batched matmuls)."""
from __future__ import annotations

import inspect

import pytest
import torch

from deltatune import IA3Config, LoraConfig, PeftModel, get_peft_model
from deltatune.adapter_set import MixingError
from deltatune.methods.bottleneck import AdapterConfig
from tests.conftest import logits_of, perturb_trainable, tiny_convnet, tiny_llama, token_batch

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]

# Per method: adapters with different ranks, scalings and target sets (name -> config).
CASES = {
    "lora": {"a": LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
             "b": LoraConfig(r=8, lora_alpha=8, target_modules=ATTN + ["gate_proj", "embed_tokens"]),
             "c": LoraConfig(r=4, lora_alpha=16, target_modules=["v_proj", "down_proj"])},
    "rslora": {"a": LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj"]),
               "b": LoraConfig(r=16, lora_alpha=8, use_rslora=True, target_modules=ATTN),
               "c": LoraConfig(r=2, lora_alpha=2, target_modules=["k_proj", "up_proj"])},
    "dora": {"a": LoraConfig(r=4, use_dora=True, target_modules=["q_proj", "v_proj", "embed_tokens"]),
             "b": LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=ATTN + ["down_proj"]),
             "c": LoraConfig(r=8, target_modules=["v_proj", "o_proj"])},   # plain LoRA beside DoRA
    "ia3": {"a": IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
            "b": IA3Config(target_modules=["v_proj", "up_proj"], feedforward_modules=["up_proj"]),
            "c": IA3Config(target_modules=["k_proj"])},
    "bottleneck": {"a": AdapterConfig(bottleneck_size=4), "b": AdapterConfig(reduction_factor=4),
                   "c": AdapterConfig(adapter_type="pfeiffer", bottleneck_size=2)},
}
ROWS = ["a", "__base__", "c", "b", "a", "b"]


def _model(case: str) -> PeftModel:
    configs = CASES[case]
    model = None
    for name, config in configs.items():
        if model is None:
            model = get_peft_model(tiny_llama(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        model.set_adapter(name)
        perturb_trainable(model, seed=len(name) + ord(name), scale=0.1)
    return model.eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_row_of_a_mixed_batch_equals_that_row_alone(case):
    model = _model(case)
    ids = token_batch(batch=len(ROWS), length=7)
    mixed = logits_of_rows(model, ids, ROWS)
    base = logits_of(tiny_llama(), ids)
    for i, name in enumerate(ROWS):
        if name == "__base__":
            alone = base[i:i + 1]
        else:
            model.set_adapter(name)
            alone = logits_of(model, ids[i:i + 1])
            assert (alone - base[i:i + 1]).abs().max() > 1e-4  # the adapter does something
        torch.testing.assert_close(mixed[i:i + 1], alone, rtol=0, atol=1e-5)


def logits_of_rows(model, ids, names):
    return model(input_ids=ids, adapter_names=names).logits


def test_one_name_for_every_row_is_that_adapter_without_switching():
    model = _model("lora")
    ids = token_batch(batch=3)
    model.set_adapter("a")
    expected = None
    model.set_adapter("b")
    expected = logits_of(model, ids)
    model.set_adapter("a")
    torch.testing.assert_close(logits_of_rows(model, ids, ["b"] * 3), expected, rtol=0, atol=0)
    assert model.active_adapter == "a"
    torch.testing.assert_close(logits_of_rows(model, ids, ["__base__"] * 3), logits_of(tiny_llama(), ids),
                               rtol=0, atol=0)


def _greedy(model, ids, **kw):
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                          do_sample=False, pad_token_id=0, **kw)


@pytest.mark.parametrize("beams", [1, 3])
def test_generate_mixed_equals_each_prompt_alone(beams):
    model = _model("dora")
    ids = token_batch(batch=4, length=5, seed=3)
    names = ["b", "a", "__base__", "c"]
    mixed = _greedy(model, ids, adapter_names=names, num_beams=beams)
    for i, name in enumerate(names):
        with (model.disable_adapter() if name == "__base__" else _active(model, name)):
            alone = _greedy(model, ids[i:i + 1], num_beams=beams)
        assert torch.equal(mixed[i:i + 1], alone), name


class _active:
    def __init__(self, model, name):
        self.model, self.name = model, name

    def __enter__(self):
        self.previous = self.model.active_adapter
        self.model.set_adapter(self.name)

    def __exit__(self, *exc):
        self.model.set_adapter(self.previous)


def test_generate_with_sampling_and_several_sequences_per_prompt():
    model = _model("lora")
    ids = token_batch(batch=2, length=5)
    torch.manual_seed(0)
    first = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=True,
                           num_return_sequences=3, adapter_names=["a", "b"], pad_token_id=0)
    torch.manual_seed(0)
    again = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=True,
                           num_return_sequences=3, adapter_names=["a", "b"], pad_token_id=0)
    assert first.shape == (6, 10) and torch.equal(first, again)


def test_training_on_a_mixed_batch_gives_each_adapter_the_gradient_of_its_rows():
    model = _model("lora")
    model.set_adapter("b")
    model.train()
    ids = token_batch(batch=3, length=6)
    names = ["a", "b", "__base__"]
    model(input_ids=ids, labels=ids, adapter_names=names).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(".b." in n or n.endswith(".b") for n in grads)
    model.zero_grad()
    # The same loss as a sum of per-row losses: row 1 alone carries b's whole gradient (mean over
    # the batch's label tokens; every row has the same number of labels).
    out = model(input_ids=ids[1:2], labels=ids[1:2])
    (out.loss / 3).backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6)


def test_bank_follows_in_place_changes_and_new_adapters():
    model = _model("lora")
    ids = token_batch(batch=2)
    names = ["a", "b"]
    before = logits_of_rows(model, ids, names)
    with torch.no_grad():
        model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["a"].weight.add_(0.5)
    after = logits_of_rows(model, ids, names)
    assert (after[0] - before[0]).abs().max() > 1e-3
    torch.testing.assert_close(after[1], before[1], rtol=0, atol=1e-6)
    model.delete_adapter("c")
    model.add_adapter("d", LoraConfig(r=3, target_modules=["q_proj"], init_lora_weights=False))
    model.set_adapter("d")
    alone = logits_of(model, ids[1:])
    torch.testing.assert_close(logits_of_rows(model, ids, ["a", "d"])[1:], alone, rtol=0, atol=1e-5)


def test_forward_signature_names_adapter_names_for_trainer_columns():
    model = _model("lora")
    params = inspect.signature(model.forward).parameters
    assert "adapter_names" in params and "input_ids" in params and "labels" in params


class _Attention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x)[0]


def test_mixing_errors_name_the_problem():
    model = _model("lora")
    ids = token_batch(batch=2)
    with pytest.raises(MixingError, match=r"unknown adapter\(s\) \['zz'\]"):
        model(input_ids=ids, adapter_names=["a", "zz"])
    with pytest.raises(MixingError, match="3 entries but the batch has 2 rows"):
        model(input_ids=ids, adapter_names=["a", "b", "c"])
    model.merge_adapter()
    with pytest.raises(MixingError, match="merged"):
        model(input_ids=ids, adapter_names=["a", "b"])
    model.unmerge_adapter()
    mha = get_peft_model(_Attention(), LoraConfig(r=2, target_modules=["mha"]), adapter_name="x")
    mha.add_adapter("y", LoraConfig(r=2, target_modules=["mha"]))
    with pytest.raises(MixingError, match=r"module mha \(LoraMultiheadAttention\).*separate calls"):
        mha(torch.randn(2, 3, 8), adapter_names=["x", "y"])
    acts = get_peft_model(tiny_llama(), AdapterConfig(non_linearity="relu"), adapter_name="r")
    acts.add_adapter("g", AdapterConfig(non_linearity="gelu"))
    with pytest.raises(MixingError, match="non-linearities"):
        acts(input_ids=ids, adapter_names=["r", "g"])
    acts(input_ids=ids, adapter_names=["r", "__base__"])  # one non-linearity in the batch is fine


@pytest.mark.parametrize("cast", [False, True], ids=["cpu-rule", "accelerator-rule"])
def test_bf16_base_with_fp32_factors_in_inference_matches_the_autograd_path(cast, monkeypatch):
    """In inference, fp32 factors on a bf16 base run either in fp32 (the CPU rule) or through cached
    bf16 copies (the rule on accelerators, forced here); both stay within bf16 rounding of the
    plain autograd path, for one adapter and for a mixed batch."""
    from deltatune.methods import lora

    monkeypatch.setattr(lora, "cast_factors_on", lambda device: cast)
    model = _model("lora").to(torch.bfloat16)
    for _, layer in model.base_model.adapter_layers():        # factors back to fp32, as peft keeps them
        for name in layer.held:
            for _, p in layer.adapter_parameters(name):
                p.data = p.data.float()
    ids = token_batch(batch=4)
    names = ["a", "b", "__base__", "c"]
    with torch.no_grad():
        fast_one = logits_of(model, ids).float()
        fast_mixed = logits_of_rows(model, ids, names).float()
    with torch.enable_grad():                                  # the plain path: casts per call
        plain_one = logits_of(model, ids).float().detach()
        plain_mixed = logits_of_rows(model, ids, names).float().detach()
    effect = (plain_one - logits_of(tiny_llama().to(torch.bfloat16), ids).float()).abs().max()
    for fast, plain in ((fast_one, plain_one), (fast_mixed, plain_mixed)):
        assert (fast - plain).abs().max() < 0.1 * effect
