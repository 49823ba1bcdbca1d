"""``train_many``'s shared evaluation: every task's eval rows in one set of passes and ``generate``
calls, each row through its own adapter, give each task what evaluating it alone gives."""
from __future__ import annotations

import json

import pytest
import torch

from deltatune import get_peft_model
from deltatune.peft_model import PeftModel
from deltatune.registry import make_config as make_method_config
from deltatune.training import TaskSpec, load_dataset, train_many
from deltatune.training.evaluate import eval_loss, exact_match, greedy_generate
from deltatune.training.many_eval import EvalTask, eval_losses, exact_matches
from test_training_helpers import one_thread  # noqa: F401  (autouse fixture)
from test_training_helpers import chat_rows, make_tokenizer, tiny_causal_lm, write_jsonl

NAMES = ("a", "b", "c")
BUDGETS = {"a": 3, "b": 7, "c": 5}     # each task its own token budget: rows must stop at their own


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def peft(tok):
    """Three LoRA adapters with random B (each changes the output: a wrongly routed row shows)."""
    torch.manual_seed(0)
    model = None
    for name in NAMES:
        cfg = make_method_config("lora", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                 init_lora_weights=False)
        model = get_peft_model(tiny_causal_lm(len(tok)), cfg, adapter_name=name) if model is None \
            else model.add_adapter(name, cfg) or model
    return model.eval()


def eval_sets(tmp_path, tok, peft):
    """Per task: a chat eval set whose references are the task's own greedy answers (at its budget)
    on even rows and a wrong answer on odd rows, so exact match per task is exactly 50%."""
    sets = {}
    for k, name in enumerate(NAMES):
        rows = chat_rows(10, seed=10 + k)
        data = load_dataset(write_jsonl(tmp_path / f"{name}.jsonl", rows), tok)
        with peft.applying(name):
            preds = greedy_generate(peft, tok, [e.generation_prompt() for e in data.examples], BUDGETS[name], 16)
        for i, (row, pred) in enumerate(zip(rows, preds)):
            row["messages"][1]["content"] = pred if i % 2 == 0 else pred + "#wrong"
        sets[name] = load_dataset(write_jsonl(tmp_path / f"{name}-ref.jsonl", rows), tok)
    return sets


@pytest.mark.parametrize("mix_tasks", [True, False])
def test_shared_eval_loss_equals_each_task_alone(tmp_path, tok, peft, mix_tasks):
    sets = eval_sets(tmp_path, tok, peft)
    tasks = [EvalTask(name, sets[name]) for name in NAMES]
    for max_tokens in (0, 64):                       # one pass (per task, or for all), and several
        got = eval_losses(peft, tasks, tok.pad_token_id, max_tokens, mix_tasks=mix_tasks)
        for name in NAMES:
            with peft.applying(name):
                want = eval_loss(peft, sets[name], batch_size=4)
            assert got[name]["eval_tokens"] == want["eval_tokens"]
            assert got[name]["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-5), (name, max_tokens)
    losses = {got[name]["eval_loss"] for name in NAMES}
    assert len(losses) == len(NAMES)                 # the adapters differ: routing per row matters


@pytest.mark.parametrize("mix_tasks", [True, False])
def test_shared_exact_match_equals_each_task_alone(tmp_path, tok, peft, mix_tasks):
    sets = eval_sets(tmp_path, tok, peft)
    tasks = [EvalTask(name, sets[name], max_new_tokens=BUDGETS[name]) for name in NAMES]
    for rows in (4, 30):                             # with mix_tasks: batches mixing tasks and budgets
        got = exact_matches(peft, tok, tasks, rows, mix_tasks=mix_tasks)
        for name in NAMES:
            with peft.applying(name):
                want = exact_match(peft, tok, sets[name], max_new_tokens=BUDGETS[name], batch_size=4)
            assert got[name] == want, (name, rows)
            assert want["correct"] == 5 and want["total"] == 10


def test_shared_exact_match_limit_and_default_budget(tmp_path, tok, peft):
    sets = eval_sets(tmp_path, tok, peft)
    got = exact_matches(peft, tok, [EvalTask(name, sets[name], limit=4) for name in NAMES], 8, mix_tasks=True)
    for name in NAMES:
        with peft.applying(name):
            want = exact_match(peft, tok, sets[name], limit=4, batch_size=16)
        assert got[name] == want and want["total"] == 4


def test_train_many_scores_each_task_as_its_adapter_alone(tmp_path, tok):
    """End to end: each task's summary (eval loss, exact match) is what its saved adapter gives
    when evaluated alone, as a solo run would evaluate it."""
    files = {}
    for k, name in enumerate(NAMES):
        files[name] = write_jsonl(tmp_path / f"{name}.jsonl", chat_rows(12, seed=k))
        files[name + "_eval"] = write_jsonl(tmp_path / f"{name}_eval.jsonl", chat_rows(6, seed=20 + k))
    specs = [TaskSpec(name, files[name], make_method_config("lora", r=4, lora_alpha=8, target_modules=["q_proj"]),
                      lr=1e-2, eval_data=files[name + "_eval"]) for name in NAMES]
    result = train_many(tiny_causal_lm(len(tok)), specs, tokenizer=tok, out=str(tmp_path / "run"), batch_size=4,
                        dtype="float32", progress=False, seed=0, max_new_tokens=4)
    for name in NAMES:
        summary = json.loads((tmp_path / "run" / name / "summary.json").read_text())
        model = PeftModel.from_pretrained(tiny_causal_lm(len(tok)), str(result.adapter_dir(name))).eval()
        data = load_dataset(files[name + "_eval"], tok)
        assert summary["eval_loss"] == pytest.approx(eval_loss(model, data)["eval_loss"], rel=1e-5)
        em = exact_match(model, tok, data, max_new_tokens=4)
        assert (summary["correct"], summary["total"]) == (em["correct"], em["total"])
