"""Activated LoRA (aLoRA): the delta acts only from each row's last invocation sequence on.

Against peft 0.21 (installed as a yardstick) on a tiny Llama: the same logits and the same greedy
tokens (left padding, a row without the invocation), the same offsets, gradients and mixed-batch
rows; files written by one load in the other with the same keys and outputs. Within deltatune:
positions before the invocation are exactly the base model's, and what cannot work is refused by
name (merging, non-linear layers, DoRA, the serving engine).
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

import deltatune
from deltatune.config import ConfigError
from deltatune.methods.alora import calculate_alora_offsets
from tests.conftest import tiny_llama

peft = pytest.importorskip("peft")

INVOKE = [3, 4]
# Row 0: invocation at 4 (and an earlier partial); row 1: at 2 (the later match counts: 6);
# row 2: none (no delta anywhere); row 3: left padding (pad 0) before an invocation at 5.
IDS = torch.tensor([[5, 3, 9, 11, 3, 4, 20, 21],
                    [1, 3, 4, 4, 5, 6, 3, 4],
                    [1, 2, 4, 3, 5, 6, 7, 8],
                    [0, 0, 0, 9, 10, 3, 4, 30]])
MASK = torch.tensor([[1] * 8, [1] * 8, [1] * 8, [0, 0, 0, 1, 1, 1, 1, 1]])
STARTS = [4, 6, None, 5]        # where each row's last invocation begins


def config_kwargs(**extra) -> dict:
    return dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                init_lora_weights=False, alora_invocation_tokens=INVOKE, **extra)


@pytest.fixture(scope="module")
def pair():
    """(base, peft model, deltatune model) with the same random factors."""
    base = tiny_llama()
    torch.manual_seed(0)
    p = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config_kwargs())).eval()
    d = deltatune.get_peft_model(copy.deepcopy(base), deltatune.LoraConfig(**config_kwargs())).eval()
    _copy_factors(p, d)
    return base, p, d


def _copy_factors(src, dst) -> None:
    theirs = {k: v for k, v in src.state_dict().items() if "lora_" in k}
    ours = dst.state_dict()
    assert set(theirs) <= set(ours)
    with torch.no_grad():
        for k, v in theirs.items():
            ours[k].copy_(v)


def test_offsets_match_peft():
    cfg = {"a": deltatune.LoraConfig(alora_invocation_tokens=INVOKE), "plain": deltatune.LoraConfig()}
    theirs_cfg = {"a": peft.LoraConfig(alora_invocation_tokens=INVOKE), "plain": peft.LoraConfig()}
    from peft.tuners.lora.variants import calculate_alora_offsets as peft_offsets

    assert calculate_alora_offsets(cfg, "a", IDS) == peft_offsets(theirs_cfg, "a", IDS) == [4, 2, None, 3]
    names = ["a", "plain", "__base__", "a"]
    assert calculate_alora_offsets(cfg, "a", IDS, names) == peft_offsets(theirs_cfg, "a", IDS, names)
    assert calculate_alora_offsets(cfg, "a", IDS[:, :1]) == [None] * 4      # shorter than the sequence


def test_forward_equals_peft_and_is_the_base_before_the_invocation(pair):
    base, p, d = pair
    with torch.no_grad():
        want = p(input_ids=IDS, attention_mask=MASK).logits
        got = d(input_ids=IDS, attention_mask=MASK).logits
        plain = base(input_ids=IDS, attention_mask=MASK).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for row, start in enumerate(STARTS):
        before = slice(None) if start is None else slice(None, start)
        assert torch.equal(got[row, before], plain[row, before]), row        # exactly the base
        if start is not None:
            assert (got[row, start:] - plain[row, start:]).abs().amax(-1).min() > 1e-3, row


def test_greedy_generate_equals_peft(pair):
    _, p, d = pair
    kw = dict(input_ids=IDS, attention_mask=MASK, max_new_tokens=6, do_sample=False, pad_token_id=0)
    want, got = p.generate(**kw), d.generate(**kw)
    assert torch.equal(got, want)
    with d.disable_adapter():
        assert not torch.equal(d.generate(**kw), got)      # the adapter changes the greedy tokens


def test_explicit_offsets_and_embeddings_only(pair):
    base, p, d = pair
    with torch.no_grad():
        plain = base(input_ids=IDS).logits
        # peft's alora_offsets=: the delta on the last 2 positions of every row
        got = d(input_ids=IDS, alora_offsets=[2] * 4).logits
        want = p(input_ids=IDS, alora_offsets=[2] * 4).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(got[:, :-2], plain[:, :-2])
        with pytest.warns(UserWarning, match="no input_ids"):
            only = d(inputs_embeds=base.get_input_embeddings()(IDS)).logits
    torch.testing.assert_close(only, plain)                # no ids: not activated, as in peft


def test_gradients_equal_peft_and_vanish_before_the_invocation():
    base = tiny_llama()
    torch.manual_seed(0)
    p = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config_kwargs()))
    d = deltatune.get_peft_model(copy.deepcopy(base), deltatune.LoraConfig(**config_kwargs()))
    _copy_factors(p, d)
    for m in (p, d):
        m(input_ids=IDS, labels=IDS).loss.backward()
    theirs = {n: t.grad for n, t in p.named_parameters() if t.grad is not None}
    ours = {n: t.grad for n, t in d.named_parameters() if t.grad is not None}
    assert theirs.keys() == ours.keys() and theirs
    for n in theirs:
        torch.testing.assert_close(ours[n], theirs[n], rtol=1e-4, atol=1e-6)
    d.zero_grad()
    d(input_ids=IDS[2:3], labels=IDS[2:3]).loss.backward()        # the row without the invocation
    assert all(t.grad is None or not t.grad.any() for t in d.parameters())


def test_mixed_batch_rows_equal_each_adapter_alone(pair):
    _, _, d = pair
    d.add_adapter("plain", deltatune.LoraConfig(**{**config_kwargs(), "alora_invocation_tokens": None}))
    try:
        _copy_factors_between(d, "default", "plain", scale=0.5)
        names = ["default", "plain", "__base__", "default"]
        with torch.no_grad():
            mixed = d(input_ids=IDS, attention_mask=MASK, adapter_names=names).logits
            for row, name in enumerate(names):
                alone = d(input_ids=IDS[row:row + 1], attention_mask=MASK[row:row + 1], adapter_names=[name]).logits
                torch.testing.assert_close(mixed[row:row + 1], alone, rtol=1e-5, atol=1e-5)
        kw = dict(input_ids=IDS, attention_mask=MASK, max_new_tokens=4, do_sample=False, pad_token_id=0)
        gen = d.generate(adapter_names=names, **kw)
        for row, name in enumerate(names):
            one = {k: v[row:row + 1] if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
            assert torch.equal(gen[row:row + 1], d.generate(adapter_names=[name], **one)), row
    finally:
        d.delete_adapter("plain")


def _copy_factors_between(model, src: str, dst: str, scale: float) -> None:
    with torch.no_grad():
        for name, t in model.named_parameters():
            if f".{dst}." in name:
                t.copy_(dict(model.named_parameters())[name.replace(f".{dst}.", f".{src}.")] * scale)


@pytest.mark.parametrize("direction", ["deltatune->peft", "peft->deltatune"])
def test_files_cross_both_ways(pair, tmp_path, direction):
    base, p, d = pair
    writer, reader = (d, peft.PeftModel) if direction == "deltatune->peft" else (p, deltatune.PeftModel)
    writer.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["alora_invocation_tokens"] == INVOKE
    loaded = reader.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert loaded.peft_config["default"].alora_invocation_tokens == INVOKE
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, writer(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)
    from safetensors.torch import load_file

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    d.save_pretrained(ours)
    p.save_pretrained(theirs)
    a, b = load_file(ours / "adapter_model.safetensors"), load_file(theirs / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)


def test_refusals_name_the_cause(pair, tmp_path):
    _, _, d = pair
    with pytest.raises(NotImplementedError, match="aLoRA"):
        d.merge_and_unload()
    with pytest.raises(NotImplementedError, match="aLoRA"):
        d.merge_adapter()
    for bad in ([], [1.5], "3 4"):
        with pytest.raises(ConfigError, match="alora_invocation_tokens"):
            deltatune.LoraConfig(alora_invocation_tokens=bad)
    with pytest.raises(ConfigError, match="use_dora"):
        deltatune.LoraConfig(alora_invocation_tokens=INVOKE, use_dora=True)
    with pytest.raises(ConfigError, match="embed_tokens"):
        deltatune.get_peft_model(tiny_llama(), deltatune.LoraConfig(target_modules=["embed_tokens"],
                                                                    alora_invocation_tokens=INVOKE))
    from deltatune.serving.adapters import check_servable
    from deltatune.serving.errors import AdapterLoadError

    with pytest.raises(AdapterLoadError, match="aLoRA"):
        check_servable(deltatune.LoraConfig(alora_invocation_tokens=INVOKE), tmp_path)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_recomputes_with_the_calls_positions(reentrant):
    """Backward recomputes checkpointed layers outside the call: they must still mask as it did."""
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        d = deltatune.get_peft_model(tiny_llama(), deltatune.LoraConfig(**config_kwargs())).train()
        if checkpointing:
            d.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            d.base_model.model.enable_input_require_grads()
        d(input_ids=IDS, labels=IDS).loss.backward()
        grads.append({n: t.grad.clone() for n, t in d.named_parameters() if t.grad is not None})
    plain, checkpointed = grads
    assert plain.keys() == checkpointed.keys() and plain
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], rtol=1e-4, atol=1e-6)
    d(input_ids=IDS, labels=IDS)          # a second call before backward: its recomputation would be ambiguous
    with pytest.raises(ValueError, match="before .backward"):
        d(input_ids=IDS, labels=IDS)


def test_beam_search_keeps_each_prompts_positions(pair):
    """peft refuses beams with aLoRA; here each prompt's beams share its positions (batch == alone)."""
    _, _, d = pair
    kw = dict(max_new_tokens=4, num_beams=2, do_sample=False, pad_token_id=0)
    batch = d.generate(input_ids=IDS, attention_mask=MASK, **kw)
    for row in range(IDS.shape[0]):
        alone = d.generate(input_ids=IDS[row:row + 1], attention_mask=MASK[row:row + 1], **kw)
        assert torch.equal(batch[row:row + 1], alone), row
