"""Prompt tuning, prefix tuning and P-tuning: peft parity both ways, padding, generation, files, errors.

Parity: an adapter saved by peft 0.21.2 gives the same logits in deltatune and the reverse, on a
tiny Llama (grouped-query attention), GPT-2 and a BERT classifier (prefix tuning excepted: BERT
takes no KV cache in transformers 5, and peft refuses it too). deltatune's outputs cover the real
tokens only; peft's prompt/P-tuning logits also hold the virtual positions, which are cut off for
the comparison.
"""
from __future__ import annotations

import json
import re
import warnings

import pytest
import torch

import deltatune
from deltatune import PeftModel, registry
from deltatune.adapter_set import MixingError
from deltatune.config import ConfigError
from tests.conftest import perturb_trainable, tiny_bert, tiny_gpt2, tiny_llama, token_batch

peft = pytest.importorskip("peft")

N = 3  # virtual tokens


def _ours(kind: str, task: str = "CAUSAL_LM", **kw):
    return {"prompt": deltatune.PromptTuningConfig, "prefix": deltatune.PrefixTuningConfig,
            "ptuning": deltatune.PromptEncoderConfig, "ptuning-lstm": deltatune.PromptEncoderConfig,
            "prefix-proj": deltatune.PrefixTuningConfig}[kind](task_type=task, num_virtual_tokens=N,
                                                               **_extra(kind), **kw)


def _theirs(kind: str, task: str = "CAUSAL_LM"):
    cls = {"prompt": peft.PromptTuningConfig, "prefix": peft.PrefixTuningConfig,
           "ptuning": peft.PromptEncoderConfig, "ptuning-lstm": peft.PromptEncoderConfig,
           "prefix-proj": peft.PrefixTuningConfig}[kind]
    return cls(task_type=task, num_virtual_tokens=N, **_extra(kind))


def _extra(kind: str) -> dict:
    return {"ptuning": dict(encoder_hidden_size=16), "ptuning-lstm": dict(encoder_hidden_size=16,
            encoder_reparameterization_type="LSTM"), "prefix-proj": dict(prefix_projection=True,
            encoder_hidden_size=16)}.get(kind, {})


CASES = [(b, k) for b in (tiny_llama, tiny_gpt2) for k in ("prompt", "prefix", "ptuning")] + \
        [(tiny_llama, "prefix-proj"), (tiny_llama, "ptuning-lstm"), (tiny_bert, "prompt"), (tiny_bert, "ptuning")]


def _logits(model, ids, virtual: int = 0):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    logits = out.logits
    return logits[:, virtual:] if logits.dim() == 3 else logits


def _peft_virtual(kind: str, build) -> int:
    return N if kind in ("prompt", "ptuning", "ptuning-lstm") and build is not tiny_bert else 0


@pytest.mark.parametrize("build, kind", CASES, ids=[f"{b.__name__}-{k}" for b, k in CASES])
def test_peft_parity_both_ways(build, kind, tmp_path):
    task = "SEQ_CLS" if build is tiny_bert else "CAUSAL_LM"
    ids = token_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(build(), _theirs(kind, task)).eval()
        perturb_trainable(theirs, seed=5, scale=0.3)
        theirs.save_pretrained(tmp_path / "peft")
        expected = _logits(theirs, ids)  # with the virtual positions, which ours return too (peft's shape)
        ours = PeftModel.from_pretrained(build(), tmp_path / "peft").eval()
        torch.testing.assert_close(_logits(ours, ids), expected, rtol=0, atol=1e-5)

        fresh = deltatune.get_peft_model(build(), _ours(kind, task)).eval()
        perturb_trainable(fresh, seed=7, scale=0.3)
        fresh.save_pretrained(tmp_path / "ours")
        mine = _logits(fresh, ids)
        back = peft.PeftModel.from_pretrained(build(), tmp_path / "ours").eval()
        torch.testing.assert_close(_logits(back, ids), mine, rtol=0, atol=1e-5)
        assert mine.dim() == 2 or mine.shape[1] == ids.shape[1] + _peft_virtual(kind, build)
    ours_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(peft_cfg) - {"peft_version"} <= set(ours_cfg), "a field peft writes is missing"
    for key in ("peft_type", "token_dim", "num_layers", "num_attention_heads", "num_virtual_tokens"):
        assert ours_cfg[key] == peft_cfg[key], key


def test_prefix_gqa_sizes():
    model = deltatune.get_peft_model(tiny_llama(), deltatune.PrefixTuningConfig(num_virtual_tokens=N))
    cfg = model.peft_config["default"]
    assert (cfg.num_attention_heads, cfg.token_dim) == (2, 16)    # 2 KV heads x head_dim 8, not 4 x 8
    table = model.base_model.components["default"].embedding.weight
    assert tuple(table.shape) == (N, 2 * 2 * 16)


@pytest.mark.parametrize("kind", ["prompt", "prefix", "ptuning"])
@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_equal_rows_alone(kind, build, side):
    model = deltatune.get_peft_model(build(), _ours(kind)).eval()
    perturb_trainable(model, scale=0.3)
    rows = [token_batch(batch=1, length=7, seed=2)[0], token_batch(batch=1, length=4, seed=3)[0]]
    ids = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    for r, row in enumerate(rows):
        cut = slice(7 - len(row), 7) if side == "left" else slice(0, len(row))
        ids[r, cut], mask[r, cut] = row, 1
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask).logits[:, -7:]     # the real positions
        for r, row in enumerate(rows):
            alone = model(input_ids=row[None]).logits[0, -len(row):]
            got = batch[r][mask[r].bool()]
            torch.testing.assert_close(got, alone, rtol=0, atol=1e-5)
        # generation: each prompt's greedy continuation is the same in the batch and alone
        if side == "left":
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
            for r, row in enumerate(rows):
                single = model.generate(input_ids=row[None], max_new_tokens=5, do_sample=False)
                assert out[r, 7:].tolist() == single[0, len(row):].tolist()


@pytest.mark.parametrize("kind", ["prompt", "prefix", "ptuning"])
def test_generate_greedy_matches_forward_and_peft(kind, tmp_path):
    """Cached generation gives the tokens of greedy decoding by full forwards, ours and peft's.

    (peft 0.21.2's own ``generate`` on transformers 5.24 departs from its forward after a few
    tokens, for prompt and prefix tuning alike, so peft's forward is the reference here.)
    """
    model = deltatune.get_peft_model(tiny_llama(), _ours(kind)).eval()
    perturb_trainable(model, scale=0.3)
    ids = token_batch(length=5)
    out = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    assert out.shape == (2, 11) and torch.equal(out[:, :5], ids)
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
        for reference in (model, theirs):
            seq = ids
            with torch.no_grad():   # greedy by hand with full forwards, no cache
                for _ in range(6):
                    logits = reference(input_ids=seq, attention_mask=torch.ones_like(seq)).logits
                    seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
            assert torch.equal(out, seq)


def test_generate_sampled_and_beams():
    model = deltatune.get_peft_model(tiny_llama(), _ours("prompt")).eval()
    ids = token_batch(length=5)
    torch.manual_seed(0)
    a = model.generate(input_ids=ids, max_new_tokens=4, do_sample=True, top_k=0, num_return_sequences=3)
    torch.manual_seed(0)
    b = model.generate(input_ids=ids, max_new_tokens=4, do_sample=True, top_k=0, num_return_sequences=3)
    assert a.shape == (6, 9) and torch.equal(a, b)
    beams = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, num_beams=2)
    assert beams.shape == (2, 9)


def test_labels_ignore_virtual_positions():
    model = deltatune.get_peft_model(tiny_llama(), _ours("prompt"))
    ids = token_batch(length=8)
    out = model(input_ids=ids, labels=ids)
    labels = torch.cat([torch.full((2, N), -100), ids], 1)  # peft's: the last virtual token predicts ids[:, 0]
    manual = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 128), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, manual)
    out.loss.backward()
    assert model.base_model.components["default"].embedding.weight.grad.abs().sum() > 0



def test_forward_runs_the_virtual_tokens_once():
    """peft's logits have the virtual positions first; they come from the prefix's own forward,
    not a second forward of the virtual tokens (two decoder runs per call: prefix, real tokens)."""
    model = deltatune.get_peft_model(tiny_llama(), _ours("prompt")).eval()
    runs = []
    model.base_model.model.model.register_forward_hook(lambda *_: runs.append(1))
    ids = token_batch(length=8)
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    assert len(runs) == 2 and out.logits.shape[:2] == (2, N + 8)
    assert not hasattr(out.past_key_values, "prefix_logits")  # nothing of ours left on the user's cache

def test_text_init_from_default_tokenizer_and_directory(tmp_path):
    from deltatune import models

    tok = models.load_tokenizer("default")
    tok.save_pretrained(tmp_path)
    base = models.load("default")
    text = "Classify the sentiment:"
    cfg = deltatune.PromptTuningConfig(num_virtual_tokens=12, prompt_tuning_init="TEXT",
                                       prompt_tuning_init_text=text, tokenizer_name_or_path=str(tmp_path))
    model = deltatune.get_peft_model(base, cfg)
    text_ids = tok(text)["input_ids"]
    want = (text_ids * 12)[:12]       # repeated to length, as peft does
    table = model.base_model.components["default"].embedding.weight
    torch.testing.assert_close(table, base.get_input_embeddings().weight[want].float())
    cut = deltatune.PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT",
                                       prompt_tuning_init_text=text, tokenizer_name_or_path="default")
    model.add_adapter("cut", cut)
    torch.testing.assert_close(model.base_model.components["cut"].embedding.weight,
                               base.get_input_embeddings().weight[text_ids[:2]].float())


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt_tuning_init="TEXT"), "tokenizer_name_or_path"),
    (dict(prompt_tuning_init="TEXT", tokenizer_name_or_path="default"), "prompt_tuning_init_text"),
    (dict(prompt_tuning_init="WORDS"), "prompt_tuning_init"),
    (dict(num_virtual_tokens=0), "num_virtual_tokens"),
    (dict(tokenizer_kwargs={"x": 1}), "tokenizer_kwargs"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        deltatune.PromptTuningConfig(**kwargs)


def test_cannot_merge_or_mix_and_says_why():
    model = deltatune.get_peft_model(tiny_llama(), _ours("prompt"))
    model.add_adapter("lora", deltatune.LoraConfig(r=2, target_modules=["q_proj"]))
    for call in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(NotImplementedError, match=r"'default' \(PROMPT_TUNING\) cannot be merged"):
            call()
    with pytest.raises(MixingError, match="PROMPT_TUNING adapter, which cannot share a batch"):
        model(input_ids=token_batch(), adapter_names=["default", "lora"])
    assert not registry.method_for("PREFIX_TUNING").packable and registry.method_for("LORA").packable


def test_gradient_checkpointing_refused_with_a_reason():
    base = tiny_llama()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = deltatune.get_peft_model(base, _ours("prefix")).train()
    with pytest.raises(ConfigError, match="cannot train with gradient checkpointing"):
        model(input_ids=token_batch())


def test_prefix_refused_on_bert():
    with pytest.raises(ConfigError, match="PREFIX_TUNING needs a model whose forward takes a KV cache"):
        deltatune.get_peft_model(tiny_bert(), deltatune.PrefixTuningConfig(task_type="SEQ_CLS"))


def test_component_lifecycle_beside_lora(tmp_path):
    """A virtual-token adapter next to a LoRA one: switch, disable, delete, save both, load both."""
    ids = token_batch()
    base_logits = tiny_llama()(input_ids=ids).logits
    model = deltatune.get_peft_model(tiny_llama(), _ours("ptuning"))
    model.add_adapter("lora", deltatune.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    prompt_out = model(input_ids=ids).logits
    assert prompt_out.shape[1] == N + ids.shape[1]  # peft's shape: virtual positions first
    with model.disable_adapter():
        torch.testing.assert_close(model(input_ids=ids).logits, base_logits, rtol=0, atol=0)
    model.set_adapter("lora")
    assert all(not p.requires_grad for p in model.base_model.components.parameters())
    lora_out = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    loaded.load_adapter(tmp_path / "lora", "lora")
    torch.testing.assert_close(loaded(input_ids=ids).logits, prompt_out, rtol=0, atol=1e-6)
    assert loaded.base_model.components["default"].encoder is None   # loaded as its resolved table
    loaded.set_adapter("lora")
    torch.testing.assert_close(loaded(input_ids=ids).logits, lora_out, rtol=0, atol=1e-6)
    model.delete_adapter("default")
    assert "default" not in model.base_model.components


# -- training and the CLI ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from test_training_helpers import chat_rows, save_tiny_model, write_jsonl

    d = tmp_path_factory.mktemp("vt")
    return {"model": str(save_tiny_model(d / "model")),
            "train": str(write_jsonl(d / "train.jsonl", chat_rows(32, seed=0))),
            "eval": str(write_jsonl(d / "eval.jsonl", chat_rows(4, seed=1)))}


def _train(world, out, *extra, launcher=None):
    from test_training_helpers import run_cli

    args = ["train", "--model", world["model"], "--data", world["train"], "--out", str(out), "--method", "prefix",
            "--method-arg", "num_virtual_tokens=4", "--dtype", "float32", "--no-progress", "--seed", "3",
            "--schedule", "constant", "--log-every", "1", *extra]
    return run_cli(args, launcher=launcher, timeout=300)


def test_cli_train_resume_ddp_eval_generate_info(world, tmp_path):
    """``deltatune train --method prefix``: packing off (said so), the method's default lr, loss
    going down; resume from a checkpoint ends where the uninterrupted run ends; two DDP processes
    match one; eval, generate and info read the adapter."""
    import sys

    from test_training_helpers import read_metrics, run_cli

    full = tmp_path / "full"
    proc = _train(world, full, "--max-steps", "6", "--batch-size", "4", "--eval", world["eval"], "--eval-limit", "2",
                  "--max-new-tokens", "4")
    assert "packing: off" in proc.stdout
    rows = [r for r in read_metrics(full) if "loss" in r]
    assert rows[0]["lr"] == pytest.approx(registry.default_lr("prefix")) and rows[-1]["loss"] < rows[0]["loss"]
    part = tmp_path / "part"
    _train(world, part, "--max-steps", "3", "--batch-size", "4", "--save-every", "2")
    _train(world, part, "--max-steps", "6", "--batch-size", "4", "--resume")
    resumed = [r["loss"] for r in read_metrics(part) if "loss" in r]
    assert resumed[-3:] == pytest.approx([r["loss"] for r in rows][-3:], rel=1e-5)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                "deltatune"]
    ddp = tmp_path / "ddp"
    _train(world, ddp, "--max-steps", "6", "--batch-size", "2", "--device", "cpu", launcher=launcher)
    assert [r["loss"] for r in read_metrics(ddp) if "loss" in r] == pytest.approx([r["loss"] for r in rows], abs=1e-4)

    adapter = str(full / "adapter")
    result = json.loads(run_cli(["eval", "--model", world["model"], "--adapter", adapter, "--data", world["eval"],
                                 "--dtype", "float32", "--json", "--max-new-tokens", "4"]).stdout)
    assert result["total"] == 4
    out = json.loads(run_cli(["generate", "--model", world["model"], "--adapter", adapter, "--dtype", "float32",
                              "--prompt", "ann is 42", "--prompt", "bob is 7 ok ok", "--max-new-tokens", "3",
                              "--json"]).stdout)
    assert len(out) == 2
    info = run_cli(["info", adapter]).stdout
    assert "PREFIX_TUNING" in info and re.search(r"virtual tokens\s+4 \(no layer wrapped", info)


def test_train_help_states_each_methods_default_lr():
    """``deltatune train --help`` gives the registry's default rate of every method (it once said
    2e-4 for all, while prompt tuning trains at 3e-2)."""
    import argparse

    from deltatune.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    text = " ".join(sub.choices["train"].format_help().split())
    for method in ("lora", "ia3", "prompt", "prefix", "ptuning"):
        assert f"{method} {registry.default_lr(method):g}" in text, method
    assert registry.default_lr("prefix") == 3e-2 and registry.default_lr("ptuning") == 3e-3
