"""``train_many``'s passes as a solo run's: a task's shared prompt prefix runs once per pass (a pass
of its own), and a mixed pass routes each task's run of rows through that task's own factors."""
from __future__ import annotations

import json

import pytest
import torch

from deltatune import LoraConfig, get_peft_model
from deltatune.adapter_set import row_runs
from deltatune.methods.lora import LoraLinear
from deltatune.registry import make_config as make_method_config
from deltatune.training import TaskSpec, load_dataset, prefix, train_many
from deltatune.training import tasks as tasks_module
from deltatune.training.loss import lm_loss_sum
from deltatune.training.tasks import mixed_batches
from test_train_prefix import system_rows
from test_training_helpers import one_thread  # noqa: F401  (autouse fixture)
from test_training_helpers import chat_rows, make_tokenizer, tiny_causal_lm, write_jsonl

SHARED = dict(batch_size=4, dtype="float32", progress=False, eval_exact_match=False, seed=0, warmup_steps=1,
              max_steps=3)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("many_prefix")
    return {"sys_a": write_jsonl(d / "a.jsonl", system_rows(12, seed=1)),
            "sys_b": write_jsonl(d / "b.jsonl", system_rows(12, seed=2)),
            "plain": write_jsonl(d / "c.jsonl", chat_rows(12, seed=3))}


def test_row_runs_are_consecutive_slots_and_follow_repeats():
    slots = torch.tensor([2, 2, 1, 1, 1, 0, 2])
    assert row_runs(slots, 7) == [(0, 2, 2), (2, 5, 1), (5, 6, 0), (6, 7, 2)]
    assert row_runs(slots, 14)[:2] == [(0, 4, 2), (4, 10, 1)]   # each row's tokens flattened: repeated


def test_a_task_sharing_a_prefix_gets_a_pass_of_its_own(tok, files):
    data = {n: load_dataset(p, tok) for n, p in files.items()}
    parts = [(n, [data[n][i] for i in range(4)], True) for n in ("plain", "sys_a", "sys_b")]
    shared = mixed_batches(parts, 0, 10_000, share_prefix=True)
    assert [(list(p.rows), p.batch.prefix is not None) for p in shared] == \
        [(["plain"], False), (["sys_a"], True), (["sys_b"], True)]
    unshared = mixed_batches(parts, 0, 10_000)
    assert len(unshared) == 1 and unshared[0].batch.prefix is None    # all three tasks in one pass
    p = shared[1].batch.prefix.shape[0]
    assert p >= prefix.MIN_PREFIX
    assert shared[1].batch.tokens == unshared[0].tokens["sys_a"]     # every real token is still counted
    # two plain tasks still share a pass next to a prefix task
    parts = [("plain", parts[0][1], True), ("plain2", parts[0][1], True), ("sys_a", parts[1][1], True)]
    assert [list(p.rows) for p in mixed_batches(parts, 0, 10_000, share_prefix=True)] == \
        [["plain", "plain2"], ["sys_a"]]


def _lora(r, init=True):
    """LoRA on every linear layer; ``init=False``: B random too, so the delta acts from the start."""
    return make_method_config("lora", r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=init)


def _run(tmp_path, tok, files, monkeypatch, share: bool):
    monkeypatch.setenv(prefix.ENV, "1" if share else "0")
    seen = []

    def spy(*args, **kwargs):
        passes = original(*args, **kwargs)
        seen.extend(p.batch.prefix is not None for p in passes)
        return passes

    original = tasks_module.mixed_batches
    monkeypatch.setattr("deltatune.training.many_loop.mixed_batches", spy)
    specs = [TaskSpec(n, files[n], _lora(r), lr=lr) for n, r, lr in
             (("sys_a", 4, 5e-3), ("sys_b", 8, 1e-2), ("plain", 4, 2e-3))]
    result = train_many(tiny_causal_lm(len(tok)), specs, tokenizer=tok, out=str(tmp_path / f"share{share}"),
                        **SHARED)
    return result, seen


def test_sharing_a_prefix_trains_the_same_adapters(tmp_path, tok, files, monkeypatch):
    shared, seen_on = _run(tmp_path, tok, files, monkeypatch, True)
    unshared, seen_off = _run(tmp_path, tok, files, monkeypatch, False)
    assert any(seen_on) and not any(seen_off)
    summary = json.loads((shared.out / "run_summary.json").read_text())
    assert summary["prefix_sharing"] == "on"
    assert json.loads((unshared.out / "run_summary.json").read_text())["prefix_sharing"].startswith("off")
    for name in ("sys_a", "sys_b", "plain"):
        ours = shared.model.base_model.adapter_state(name)
        ref = unshared.model.base_model.adapter_state(name)
        for key, expected in ref.items():
            err = float((ours[key] - expected).norm() / expected.norm().clamp_min(1e-12))
            assert err <= 1e-5, f"{name}: {key} differs by {err:.2e} with the prefix shared"


def test_training_segments_match_the_gathered_rows(tok, monkeypatch):
    """A mixed batch in training (each adapter on its run of rows) gives the outputs inference's
    gathered path gives, and each adapter the gradient of its own rows alone."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_causal_lm(len(tok)), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                init_lora_weights=False), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=2, target_modules="all-linear", init_lora_weights=False))
    ids = torch.randint(5, len(tok), (5, 9))
    names = ["a", "a", "b", "__base__", "b"]
    model.eval()
    with torch.no_grad():
        gathered = model(input_ids=ids, adapter_names=names).logits
    model.train()

    def no_bank(self):
        raise AssertionError("a training pass stacked a bank: rows were gathered, not run by run")
    monkeypatch.setattr(LoraLinear, "build_bank", no_bank)
    segmented = model(input_ids=ids, adapter_names=names).logits
    torch.testing.assert_close(segmented, gathered, rtol=1e-5, atol=1e-5)
    segmented[:2].sum().backward()             # only adapter a's rows: b gets no gradient
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".a." in n)
    assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if ".b." in n)


def test_a_pass_with_a_prefix_and_token_weights_sums_like_its_rows(tok, files):
    data = load_dataset(files["sys_a"], tok)
    model = get_peft_model(tiny_causal_lm(len(tok)), _lora(4, init=False), adapter_name="sys_a").train()
    parts = [("sys_a", [data[i] for i in range(4)], True)]
    shared, = mixed_batches(parts, 0, 10_000, share_prefix=True)
    unshared, = mixed_batches(parts, 0, 10_000)
    sums = []
    for mixed in (shared, unshared):
        losses = torch.zeros(mixed.batch.targets.shape)
        with model.applying(mixed.names):
            total = lm_loss_sum(model, mixed.batch, mixed.weights, losses)
        sums.append((float(total.detach()), float(losses.sum())))
    assert sums[0] == pytest.approx(sums[1], rel=1e-5)
