"""``train_many``'s per-task evaluation and early stopping, its passes of ``max_batch_tokens``,
its checkpoint flags on the CLI, and the options it refuses (each named, none silently ignored)."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from deltatune.registry import make_config as method_config
from deltatune.training import TaskSpec, TrainConfig, train_many
from deltatune.training.many import HONOURED, UNSUPPORTED
from test_training_helpers import one_thread  # noqa: F401  (autouse fixture)
from test_training_helpers import chat_rows, make_tokenizer, save_tiny_model, tiny_causal_lm, write_jsonl

SHARED = dict(batch_size=4, dtype="float32", progress=False, eval_exact_match=False, seed=0, schedule="constant")


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("many_opts")
    return {"a": write_jsonl(d / "a.jsonl", chat_rows(16, seed=1)), "b": write_jsonl(d / "b.jsonl", chat_rows(16, seed=2)),
            "a_eval": write_jsonl(d / "a_eval.jsonl", chat_rows(6, seed=9))}


def lora(**kw):
    return method_config("lora", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **kw)


def close(got: dict, want: dict, tol: float = 1e-5) -> None:
    """Each tensor within ``tol`` of ``want``'s, relative to its norm (fp32 sums in another order)."""
    assert got.keys() == want.keys()
    for key, expected in want.items():
        err = float((got[key] - expected).norm() / expected.norm().clamp_min(1e-12))
        assert err <= tol, f"{key} differs by {err:.2e} (relative)"


def adapter(result, name):
    return {k: v.detach().clone() for k, v in result.model.base_model.adapter_state(name).items()}


def test_a_task_that_stops_early_writes_its_best_adapter_and_leaves_the_mix(tmp_path, tok, files):
    """``min_delta`` 10: no eval after the first counts as better, so "a" stops at its step 3
    (evals at 1 = best, 2, 3) with the adapter of step 1, while "b" trains on to step 7 alone."""
    tasks = [TaskSpec("a", files["a"], lora(), lr=1e-2, eval_data=files["a_eval"], eval_every=1, patience=2,
                      min_delta=10.0, options={"max_steps": 50}),
             TaskSpec("b", files["b"], lora(), lr=1e-2, options={"max_steps": 7})]
    result = train_many(tiny_causal_lm(len(tok)), tasks, tokenizer=tok, out=str(tmp_path / "run"), **SHARED)
    a = result.tasks["a"]
    assert a["stopped_early"] and a["steps"] == 3 and a["best_step"] == 1
    assert result.tasks["b"]["steps"] == 7 and not result.tasks["b"]["stopped_early"]
    b_steps = [r["run_step"] for r in map(json.loads, (result.out / "b" / "metrics.jsonl").read_text().splitlines())]
    assert b_steps == list(range(1, 8))
    # a's written adapter is its step-1 state: what a run of "a" stopped at step 1 ends with
    short = train_many(tiny_causal_lm(len(tok)), [TaskSpec("a", files["a"], lora(), lr=1e-2, options={"max_steps": 1})],
                       tokenizer=tok, out=str(tmp_path / "short"), **SHARED)
    close(adapter(result, "a"), adapter(short, "a"))
    evals = [r for r in map(json.loads, (result.out / "a" / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [1, 2, 3, 3]  # three during training, then the written adapter's
    assert evals[-1]["eval_loss"] == pytest.approx(evals[0]["eval_loss"], rel=1e-6) == a["eval_loss"]


def test_eval_fraction_is_held_out_of_training_and_scored_with_exact_match(tmp_path, tok, files):
    tasks = [TaskSpec("a", files["a"], lora(), eval_data=0.25, options={"max_steps": 2}),
             TaskSpec("b", files["b"], lora(), eval_data=str(files["a_eval"]), options={"max_steps": 1})]
    result = train_many(tiny_causal_lm(len(tok)), tasks, tokenizer=tok, out=str(tmp_path / "run"),
                        **{**SHARED, "eval_exact_match": True, "max_new_tokens": 4})
    a, b = result.tasks["a"], result.tasks["b"]
    assert a["total"] == 4 and b["total"] == 6     # 16 rows: 4 held out; b: its own file of 6
    assert 0 <= a["exact_match"] <= 1 and a["eval_tokens"] > 0 and "best_step" not in a
    from deltatune.training.data import load_dataset
    from deltatune.training.many import hold_out

    train, held = hold_out(load_dataset(files["a"], tok), 0.25, 0, "a")
    assert len(train) == 12 and len(held) == 4
    assert not {tuple(e.input_ids) for e in held.examples} & {tuple(e.input_ids) for e in train.examples}


def test_passes_of_max_batch_tokens_give_the_step_of_one_pass(tmp_path, tok, files):
    def run(max_batch_tokens, out):
        tasks = [TaskSpec("a", files["a"], lora(), options={"max_steps": 3}),
                 TaskSpec("b", files["b"], method_config("ia3", target_modules=["up_proj"], feedforward_modules=["up_proj"]),
                          options={"max_steps": 3})]
        return train_many(tiny_causal_lm(len(tok)), tasks, tokenizer=tok, out=str(tmp_path / out),
                          **{**SHARED, "max_batch_tokens": max_batch_tokens})

    one, many = run(0, "one"), run(40, "pieces")
    for name in ("a", "b"):
        close(adapter(many, name), adapter(one, name))


def test_every_train_option_is_honoured_or_refused():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert fields == HONOURED | set(UNSUPPORTED), "decide for each new TrainConfig field: honour it or refuse it"
    assert not HONOURED & set(UNSUPPORTED)


REFUSED = {"quantize": "nf4", "init": "gaussian", "fsdp": True, "compile": True, "grad_checkpointing": True,
           "data": "x.jsonl", "eval_data": "y.jsonl"}


@pytest.mark.parametrize("option", sorted(UNSUPPORTED))
def test_unsupported_options_are_refused_by_name(tmp_path, tok, files, option):
    tasks = [TaskSpec("a", files["a"], lora())]
    with pytest.raises(ValueError, match=rf"train_many does not support {option}="):
        train_many(tiny_causal_lm(len(tok)), tasks, tokenizer=tok, out=str(tmp_path / "x"),
                   **{**SHARED, option: REFUSED[option]})
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("options,message", [
    ({"compile": True}, "task 'a': train_many does not support compile=True"),
    ({"save_every": 2}, "task 'a': options['save_every'] is one setting for the whole run"),
    ({"dtype": "bfloat16"}, "task 'a': options['dtype'] is one setting for the whole run"),
    ({"r": 8}, "task 'a': options['r'] would be ignored next to its config="),
])
def test_task_options_the_run_would_ignore_are_refused(tmp_path, tok, files, options, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        train_many(tiny_causal_lm(len(tok)), [TaskSpec("a", files["a"], lora(), options=options)], tokenizer=tok,
                   out=str(tmp_path / "x"), **SHARED)


def test_torchrun_is_refused(tmp_path, tok, files, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="torchrun"):
        train_many(tiny_causal_lm(len(tok)), [TaskSpec("a", files["a"], lora())], tokenizer=tok,
                   out=str(tmp_path / "x"), **SHARED)


def test_patience_needs_an_eval_set_and_eval_every(tmp_path, tok, files):
    with pytest.raises(ValueError, match="task 'a': patience=2 needs .* an eval set"):
        train_many(tiny_causal_lm(len(tok)), [TaskSpec("a", files["a"], lora(), patience=2)], tokenizer=tok,
                   out=str(tmp_path / "x"), **SHARED)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("many_cli") / "model")


def cli(model_dir, out, *extra):
    from deltatune.training.commands import main

    return main(["train", "--model", str(model_dir), "--out", str(out), "--batch-size", "4", "--r", "4",
                 "--target", "q_proj,v_proj", "--dtype", "float32", "--no-progress", *extra])


@pytest.mark.parametrize("flags,message", [
    (["--quantize", "nf4"], "does not support quantize='nf4'"),
    (["--compile"], "does not support compile=True"),
    (["--fsdp"], "does not support fsdp=True"),
    (["--init", "pissa"], "does not support init='pissa'"),
    (["--grad-checkpointing"], "does not support grad_checkpointing=True"),
    (["--eval", "e.jsonl"], "--eval with --task"),
    (["--task-eval", "zz=0.1"], "no --task named 'zz'"),
    (["--task", "a=b.jsonl"], "task name 'a' given twice"),
])
def test_cli_refuses_options_it_would_ignore(tmp_path, model_dir, files, capsys, flags, message):
    code = cli(model_dir, tmp_path / "x", "--task", f"a={files['a']}", *flags)
    assert code == 2 and message in capsys.readouterr().err


def test_cli_many_task_flags_are_refused_without_task(tmp_path, model_dir, files, capsys):
    code = cli(model_dir, tmp_path / "x", "--data", str(files["a"]), "--patience", "2", "--max-steps", "1")
    assert code == 2 and "--patience: only for runs of several tasks" in capsys.readouterr().err


def test_cli_save_every_and_resume(tmp_path, model_dir, files, capsys):
    out = tmp_path / "run"
    args = ["--task", f"a={files['a']}", "--task", f"b={files['b']}", "--task-eval", "a=0.25",
            "--eval-every", "1", "--patience", "5", "--no-exact-match", "--max-steps", "3", "--save-every", "1"]
    assert cli(model_dir, out, *args) in (0, None)
    state = json.loads((out / "checkpoints" / "step-00000002" / "state.json").read_text())
    assert state["kind"] == "train_many" and sorted(state["tasks"]) == ["a", "b"]
    assert state["tasks"]["a"]["progress"]["best_loss"] is not None
    first = {n: (out / n / "adapter" / "adapter_model.safetensors").read_bytes() for n in "ab"}
    capsys.readouterr()
    assert cli(model_dir, out, *args, "--resume") in (0, None)
    assert "resumed from" in capsys.readouterr().out
    assert first == {n: (out / n / "adapter" / "adapter_model.safetensors").read_bytes() for n in "ab"}
