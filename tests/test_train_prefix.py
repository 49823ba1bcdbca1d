"""Shared-prompt-prefix training (``training.prefix``, issue 26): the examples' common unlabelled
prefix runs once per forward pass, with the same loss and gradients as running it in every row."""
from __future__ import annotations

import pytest
import torch

from deltatune import LoraConfig, get_peft_model
from deltatune.training import TrainConfig, Trainer, load_dataset, prefix
from deltatune.training.batching import collate, split_by_tokens
from deltatune.training.data import IGNORE, Example
from deltatune.training.loss import label_only_parts, lm_loss_sum
from test_training_helpers import one_thread  # noqa: F401  (autouse fixture)
from test_training_helpers import chat_rows, make_tokenizer, tiny_causal_lm, write_jsonl

SYSTEM = "You answer with name=age only."


def system_rows(n: int, seed: int = 0) -> list[dict]:
    """``chat_rows`` with one system turn in front of each: a common prefix of ~45 tokens."""
    return [{"messages": [{"role": "system", "content": SYSTEM}] + r["messages"]} for r in chat_rows(n, seed)]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def data(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("prefix")
    return load_dataset(write_jsonl(d / "train.jsonl", system_rows(12, seed=1)), tok)


def lora_model(tok, dropout: float = 0.0):
    torch.manual_seed(0)
    model = get_peft_model(tiny_causal_lm(len(tok)), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                  lora_dropout=dropout))
    for name, p in model.named_parameters():  # B starts at zero: make the adapter act in the forward
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model.train()


def test_common_prefix_stops_before_labels_and_leaves_each_example_a_token():
    a = Example([5, 6, 7, 8, 9], [IGNORE, IGNORE, IGNORE, 8, 9])
    b = Example([5, 6, 7, 8, 4], [IGNORE, IGNORE, IGNORE, IGNORE, 4])
    # tokens agree up to 4, but position 2 already predicts a's first label (8)
    assert prefix.common_prefix([a, b]) == 2
    c = Example([5, 6], [IGNORE, IGNORE])
    d = Example([5, 6, 1], [IGNORE, IGNORE, 1])
    assert prefix.common_prefix([c, d]) == 1                                       # c keeps one token
    assert prefix.common_prefix([a]) == 0


def test_shared_batch_holds_every_example_exactly(data):
    examples = [data[i] for i in range(5)]
    batch = collate(examples, packing=True, share_prefix=True)
    p = batch.prefix.shape[0]
    assert p >= prefix.MIN_PREFIX and batch.input_ids.shape[0] == 5
    for r, ex in enumerate(examples):
        n = len(ex) - p
        assert batch.prefix.tolist() + batch.input_ids[r, :n].tolist() == ex.input_ids
        assert batch.position_ids[r, :n].tolist() == list(range(p, len(ex)))
        assert batch.targets[r, :n].tolist() == (ex.labels[1:] + [IGNORE])[p:]
        assert (batch.targets[r, n:] == IGNORE).all()
    assert batch.tokens == sum(len(e) for e in examples)
    assert batch.label_tokens == collate(examples, packing=True).label_tokens


def test_no_shared_prefix_falls_back_to_packed_rows(tok, tmp_path):
    ds = load_dataset(write_jsonl(tmp_path / "t.jsonl", chat_rows(6, seed=0)), tok)    # no system turn
    batch = collate([ds[i] for i in range(6)], packing=True, share_prefix=True)
    assert batch.prefix is None


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = lm_loss_sum(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_shared_prefix_gives_the_same_loss_and_gradients(tok, data):
    model = lora_model(tok)
    examples = [data[i] for i in range(6)]
    shared = collate(examples, packing=True, share_prefix=True)
    assert shared.prefix is not None
    loss_s, grads_s = loss_and_grads(model, shared)
    loss_p, grads_p = loss_and_grads(model, collate(examples, packing=True))
    torch.testing.assert_close(loss_s, loss_p, rtol=1e-5, atol=1e-5)
    assert set(grads_s) == set(grads_p) and len(grads_s) > 0
    for name in grads_p:
        torch.testing.assert_close(grads_s[name], grads_p[name], rtol=1e-4, atol=1e-6, msg=name)


def test_rows_must_attend_to_the_prefix(tok, data):
    """The check above fails if the rows do not see the prefix (here: a cache of the wrong prefix)."""
    model = lora_model(tok)
    examples = [data[i] for i in range(4)]
    shared = collate(examples, packing=True, share_prefix=True)
    wrong = collate(examples, packing=True, share_prefix=True)
    wrong.prefix = wrong.prefix.flip(0)
    with torch.no_grad():
        assert not torch.allclose(lm_loss_sum(model, shared), lm_loss_sum(model, wrong))


def test_why_not(tok):
    def why(model, packing=True, compiled=False):
        return prefix.why_not(model, label_only_parts(model)[0], packing, 1, False, compiled, False)

    assert why(lora_model(tok)) is None
    assert "dropout" in why(lora_model(tok, dropout=0.1))
    assert "packing" in why(lora_model(tok), packing=False)
    assert "compiled" in why(lora_model(tok), compiled=True)
    assert "KV cache" in prefix.why_not(lora_model(tok), None, True, 1, False, False, False)


def test_trainer_shares_prefixes_with_the_same_result(tmp_path, tok, data, monkeypatch):
    def run(name):
        cfg = TrainConfig(out=str(tmp_path / name), batch_size=4, lr=5e-3, max_steps=3, dtype="float32",
                          progress=False, eval_exact_match=False, seed=0)
        trainer = Trainer(lora_model(tok), tok, cfg, data)
        return trainer, trainer.fit()

    on_trainer, on = run("on")
    assert on_trainer.prefix_off is None and on["prefix_sharing"] == "on"
    monkeypatch.setenv(prefix.ENV, "0")
    off_trainer, off = run("off")
    assert off_trainer.prefix_off is not None
    assert on["final_loss"] == pytest.approx(off["final_loss"], rel=1e-4)
    assert on["tokens"] == off["tokens"]


def test_split_by_tokens_counts_a_shared_prefix_once():
    head = list(range(10, 20))                                             # 10 unlabelled tokens in common
    exs = [Example(head + [30 + i] * 10, [IGNORE] * 10 + [30 + i] * 10) for i in range(4)]   # 20 tokens each
    p = prefix.common_prefix(exs)
    assert p == 9                                                          # position 9 predicts a label
    assert [len(g) for g in split_by_tokens(exs, 42)] == [2, 2]            # 20 + 20 (+ 20 > 42)
    assert [len(g) for g in split_by_tokens(exs, 42, share_prefix=True)] == [3, 1]   # 9 + 3 x 11 = 42
