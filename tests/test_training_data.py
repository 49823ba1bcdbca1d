"""Training data: the three JSONL shapes, loss masks, errors, truncation, batching and packing."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deltatune.training.batching import collate, count_label_tokens, epoch_batches, micro_batches, pack_rows
from deltatune.training.data import IGNORE, DataError, load_dataset
from deltatune.training.loss import linear_cross_entropy, lm_loss_sum
from test_training_helpers import one_thread  # noqa: F401  (autouse fixture)
from test_training_helpers import chat_rows, make_tokenizer, tiny_causal_lm, write_jsonl


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def labelled_text(tok, ex) -> str:
    return tok.decode([t for t in ex.labels if t != IGNORE])


def test_messages_only_assistant_tokens_carry_labels(tmp_path, tok):
    row = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ann is 42"},
                        {"role": "assistant", "content": "ann=42"}]}
    ex = load_dataset(write_jsonl(tmp_path / "d.jsonl", [row]), tok)[0]
    assert labelled_text(tok, ex) == "ann=42<|im_end|>\n"
    assert tok.decode(ex.input_ids[:ex.prompt_len]).endswith("<|im_start|>assistant\n")
    assert ex.reference == "ann=42"
    assert len(ex.labels) == len(ex.input_ids)
    # Every labelled token is the token itself: labels are aligned with input_ids.
    assert all(l in (IGNORE, i) for l, i in zip(ex.labels, ex.input_ids))


def test_multi_turn_labels_every_assistant_turn(tmp_path, tok):
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "one"},
                        {"role": "user", "content": "b"}, {"role": "assistant", "content": "two"}]}
    ex = load_dataset(write_jsonl(tmp_path / "d.jsonl", [row]), tok)[0]
    assert labelled_text(tok, ex) == "one<|im_end|>\ntwo<|im_end|>\n"
    assert ex.reference == "two"
    assert tok.decode(ex.generation_prompt()).endswith("b<|im_end|>\n<|im_start|>assistant\n")


def test_prompt_completion_and_text_shapes(tmp_path, tok):
    rows = [{"prompt": "Q: 2+2? A:", "completion": " 4"}, {"text": "hello"}]
    ds = load_dataset(write_jsonl(tmp_path / "d.jsonl", rows), tok)
    pc, txt = ds[0], ds[1]
    assert labelled_text(tok, pc) == " 4<|im_end|>"
    assert tok.decode(pc.generation_prompt()) == "Q: 2+2? A:" and pc.reference == " 4"
    assert labelled_text(tok, txt) == "hello<|im_end|>" and txt.reference is None
    assert ds.report.shapes == {"prompt_completion": 1, "text": 1}
    everything = load_dataset(tmp_path / "d.jsonl", tok, train_on_prompt=True)[0]
    assert all(l != IGNORE for l in everything.labels)


def test_malformed_line_names_file_and_line_or_is_skipped(tmp_path, tok):
    path = write_jsonl(tmp_path / "bad.jsonl", chat_rows(2) + ["{not json"] + chat_rows(1) + ["[1, 2]"])
    with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed JSON"):
        load_dataset(path, tok)
    ds = load_dataset(path, tok, skip_bad_lines=True)
    assert len(ds) == 3 and len(ds.report.skipped) == 2
    assert "skipped 2 malformed line(s)" in ds.report.summary()


@pytest.mark.parametrize("row, message", [
    ({"prompt": "only a prompt"}, r"m\.jsonl:2: missing field 'completion'"),
    ({"input": "x", "output": "y"}, r"m\.jsonl:2: missing field: expected 'messages'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, r"m\.jsonl:2: no assistant message"),
    ({"messages": [{"role": "user"}]}, r"m\.jsonl:2: messages\[0\] needs 'role' and 'content'"),
])
def test_missing_fields_are_clear_errors(tmp_path, tok, row, message):
    path = write_jsonl(tmp_path / "m.jsonl", chat_rows(1) + [row])
    with pytest.raises(DataError, match=message):
        load_dataset(path, tok)


def test_empty_and_missing_files(tmp_path, tok):
    with pytest.raises(DataError, match="empty"):
        load_dataset(write_jsonl(tmp_path / "e.jsonl", []), tok)
    with pytest.raises(DataError, match="not found"):
        load_dataset(tmp_path / "nope.jsonl", tok)
    with pytest.raises(DataError, match="empty"):  # everything skipped is empty too
        load_dataset(write_jsonl(tmp_path / "b.jsonl", ["{", "{"]), tok, skip_bad_lines=True)


def test_overlong_examples_truncated_and_reported_or_rejected(tmp_path, tok):
    long_answer = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y" * 80}]}
    long_prompt = {"messages": [{"role": "user", "content": "x" * 80}, {"role": "assistant", "content": "y"}]}
    path = write_jsonl(tmp_path / "l.jsonl", chat_rows(2) + [long_answer, long_prompt])
    ds = load_dataset(path, tok, max_length=48)
    assert max(ds.lengths) <= 48
    assert ds.report.truncated == 2 and ds.report.dropped == 1  # the long prompt left no label
    assert "truncated 2 example(s) longer than max_length=48" in ds.report.summary()
    kept = ds[2]
    assert len(kept.generation_prompt()) == kept.prompt_len  # prompt kept whole for generation
    with pytest.raises(DataError, match=r"l\.jsonl:3: example has \d+ tokens, more than max_length=48"):
        load_dataset(path, tok, max_length=48, overlong="error")


# -- batching ------------------------------------------------------------------------------------

def test_epoch_order_is_deterministic_grouped_and_complete():
    lengths = [(i * 37) % 50 + 5 for i in range(103)]
    a = epoch_batches(lengths, 8, seed=1, epoch=0)
    assert a == epoch_batches(lengths, 8, seed=1, epoch=0)
    assert a != epoch_batches(lengths, 8, seed=1, epoch=1)
    flat = [i for b in a for i in b]
    assert len(a) == 103 // 8 and len(set(flat)) == len(flat) == 96
    assert all(lengths[b[0]] >= lengths[b[-1]] for b in a)  # longest first inside a batch
    with pytest.raises(ValueError, match="fewer than one global batch"):
        epoch_batches(lengths[:3], 8, 0, 0)


def test_micro_batches_cover_the_global_batch_across_ranks():
    gb = list(range(12))
    parts = [micro_batches(gb, accum=3, world=2, rank=r) for r in range(2)]
    assert all(len(p) == 3 and all(len(m) == 2 for m in p) for p in parts)
    assert sorted(i for p in parts for m in p for i in m) == gb


def test_split_by_tokens_bounds_each_forward_pass():
    from deltatune.training.batching import split_by_tokens
    from deltatune.training.data import Example

    exs = [Example([1] * n, [1] * n) for n in (30, 20, 15, 10, 50)]
    groups = split_by_tokens(exs, 40)
    assert [[len(e) for e in g] for g in groups] == [[30], [20, 15], [10], [50]]
    assert split_by_tokens(exs, 0) == [exs]


def test_pack_rows_first_fit_decreasing():
    rows = pack_rows([10, 3, 4, 6, 2], capacity=10)
    assert rows == [[0], [3, 2], [1, 4]]


def test_packed_loss_equals_unpacked_and_reference(tok):
    from deltatune.training.data import Example

    model = tiny_causal_lm(len(tok))
    g = torch.Generator().manual_seed(0)
    exs = []
    for n in (20, 7, 9, 12, 3):
        ids = torch.randint(3, len(tok), (n,), generator=g).tolist()
        exs.append(Example(ids, [IGNORE] * (n // 2) + ids[n // 2:]))
    packed, plain = collate(exs, packing=True), collate(exs, packing=False)
    assert packed.input_ids.shape[0] < plain.input_ids.shape[0]
    assert packed.tokens == plain.tokens == 51
    assert packed.label_tokens == plain.label_tokens == count_label_tokens(exs)
    assert packed.position_ids[1].tolist()[:13] == list(range(12)) + [0]  # positions restart per sequence
    reference = sum(model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss
                    * sum(t != IGNORE for t in e.labels[1:]) for e in exs)
    with torch.no_grad():
        torch.testing.assert_close(lm_loss_sum(model, packed), reference, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lm_loss_sum(model, plain), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_chunked_linear_cross_entropy_matches_autograd(bias):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias)
    h = torch.randn(37, 16, requires_grad=True)
    t = torch.randint(0, 50, (37,))
    ours = linear_cross_entropy(h, head, t, chunk=8)
    (0.5 * ours).backward()
    got = [h.grad.clone(), head.weight.grad.clone()] + ([head.bias.grad.clone()] if bias else [])
    h.grad = None
    head.zero_grad()
    ref = F.cross_entropy(head(h), t, reduction="sum")
    (0.5 * ref).backward()
    want = [h.grad, head.weight.grad] + ([head.bias.grad] if bias else [])
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_bf16_cpu_uses_eager_attention_for_short_rows_only(tok):
    from deltatune.training.loss import cpu_bf16_attention

    model = tiny_causal_lm(len(tok))
    model.config._attn_implementation = "sdpa"
    short, long_ = torch.zeros(2, 16, dtype=torch.long), torch.zeros(1, 300, dtype=torch.long)
    with cpu_bf16_attention(model, short):
        assert model.config._attn_implementation == "sdpa"  # fp32: unchanged
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with cpu_bf16_attention(model, short):
            assert model.config._attn_implementation == "eager"
        with cpu_bf16_attention(model, long_):
            assert model.config._attn_implementation == "sdpa"
    assert model.config._attn_implementation == "sdpa"
