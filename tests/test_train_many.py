"""``train_many``: several adapters in one run on a tiny Llama.

The equality test is the contract: a task whose batches are those of a solo run ends with the
adapter the solo ``Trainer`` gives (fp32, dropout 0), though its rows shared every step with other
tasks' rows (LoRA, DoRA and IA3 in one batch, gathered per row) and it stopped earlier than them.
"""
from __future__ import annotations

import json

import pytest
import torch

from deltatune import get_peft_model
from deltatune.adapter_set import MixingError
from deltatune.peft_model import PeftModel
from deltatune.registry import make_config as make_method_config
from deltatune.training import DataError, TaskSpec, TrainConfig, Trainer, load_dataset, train_many
from test_training_helpers import one_thread  # noqa: F401  (autouse fixture)
from test_training_helpers import chat_rows, make_tokenizer, tiny_causal_lm, write_jsonl

SHARED = dict(batch_size=4, dtype="float32", progress=False, eval_exact_match=False, seed=0, warmup_steps=1)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("many_data")
    return {name: write_jsonl(d / f"{name}.jsonl", chat_rows(16, seed=seed))
            for seed, name in enumerate(NAMES)}


def configs():
    """Two LoRA ranks and a DoRA adapter sharing q_proj (one layer class holds both kinds; rows
    gathered per row there); IA3 on other layers (a layer holds adapters of one method)."""
    return {"lora": make_method_config("lora", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
            "lora8": make_method_config("lora", r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
            "dora": make_method_config("dora", r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "o_proj"]),
            "ia3": make_method_config("ia3", target_modules=["gate_proj", "up_proj"], feedforward_modules=["up_proj"])}


NAMES = ("lora", "lora8", "dora", "ia3")
# each task its own lr and length: the shortest finishes (and is saved) while the others go on
PLAN = {"lora": dict(lr=5e-3, max_steps=5), "lora8": dict(lr=1e-2, max_steps=4),
        "dora": dict(lr=2e-3, max_steps=3), "ia3": dict(lr=2e-2, max_steps=6)}


def solo_adapter(tmp_path, tok, name, path):
    """The adapter a solo ``Trainer`` run of task ``name`` ends with (as ``train`` builds it)."""
    base = tiny_causal_lm(len(tok))
    torch.manual_seed(0)
    model = get_peft_model(base, configs()[name])
    cfg = TrainConfig(**SHARED, **PLAN[name], out=str(tmp_path / f"solo-{name}"))
    Trainer(model, tok, cfg, load_dataset(path, tok)).fit()
    return {k: v.detach().clone() for k, v in model.base_model.adapter_state("default").items()}


def run_many(tmp_path, tok, files, names=NAMES):
    tasks = [TaskSpec(n, files[n], configs()[n], lr=PLAN[n]["lr"], options={"max_steps": PLAN[n]["max_steps"]})
             for n in names]
    return train_many(tiny_causal_lm(len(tok)), tasks, tokenizer=tok, out=str(tmp_path / "many"), **SHARED)


@pytest.fixture(scope="module")
def many(tmp_path_factory, tok, files):
    return run_many(tmp_path_factory.mktemp("many_run"), tok, files)


@pytest.mark.parametrize("name", NAMES)
def test_each_adapter_equals_its_solo_run(tmp_path, tok, files, many, name):
    solo = solo_adapter(tmp_path, tok, name, files[name])
    ours = many.model.base_model.adapter_state(name)
    assert sorted(ours) == sorted(solo)
    init = get_peft_model(tiny_causal_lm(len(tok)), configs()[name]).base_model.adapter_state("default")
    assert any(not torch.allclose(solo[k], init[k]) for k in solo), "the solo run did not train"
    for key, expected in solo.items():
        err = float((ours[key].detach() - expected).norm() / expected.norm().clamp_min(1e-12))
        assert err <= 1e-5, f"{name}: {key} differs from the solo run by {err:.2e} (relative)"
    assert many.tasks[name]["steps"] == PLAN[name]["max_steps"]


def test_adapters_are_peft_directories(tok, many):
    base_logits_ids = torch.tensor([[5, 9, 40, 41, 60, 3]])
    for name in NAMES:
        directory = many.adapter_dir(name)
        assert directory == many.out / name / "adapter"
        assert {p.name for p in directory.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
        assert json.loads((directory / "adapter_config.json").read_text())["peft_type"] in ("LORA", "IA3")
        loaded = PeftModel.from_pretrained(tiny_causal_lm(len(tok)), directory)
        with torch.no_grad(), many.model.applying(name):
            expected = many.model(input_ids=base_logits_ids).logits
        torch.testing.assert_close(loaded(input_ids=base_logits_ids).logits, expected, rtol=1e-5, atol=1e-5)
        summary = json.loads((many.out / name / "summary.json").read_text())
        assert summary["steps"] == PLAN[name]["max_steps"] and summary["adapter"] == str(directory)
        metrics = [json.loads(line) for line in (many.out / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in metrics] == list(range(1, PLAN[name]["max_steps"] + 1))


def test_a_bad_line_in_one_task_stops_the_start(tmp_path, tok, files):
    bad = write_jsonl(tmp_path / "bad.jsonl", chat_rows(2) + ['{"messages": [}'] + chat_rows(5))
    tasks = [TaskSpec("good", files["lora"], configs()["lora"]), TaskSpec("bad", bad, configs()["lora"])]
    with pytest.raises(DataError, match=r"task 'bad': .*bad\.jsonl:3: malformed JSON"):
        train_many(tiny_causal_lm(len(tok)), tasks, tokenizer=tok, out=str(tmp_path / "out"), **SHARED)
    assert not (tmp_path / "out").exists(), "nothing may be trained or written before the data is good"


def test_prefix_next_to_lora_is_refused_naming_the_pair(tmp_path, tok, files):
    tasks = [TaskSpec("chat", files["lora"], configs()["lora"]),
             TaskSpec("pre", files["dora"], make_method_config("prefix", num_virtual_tokens=4))]
    with pytest.raises(MixingError, match=r"tasks 'pre' \(prefix_tuning\) and 'chat' \(lora\)"):
        train_many(tiny_causal_lm(len(tok)), tasks, tokenizer=tok, out=str(tmp_path / "out"), **SHARED)
    assert not (tmp_path / "out").exists()


def test_names_must_be_unique(tmp_path, tok, files):
    tasks = [TaskSpec("x", files["lora"], configs()["lora"]), TaskSpec("x", files["ia3"], configs()["ia3"])]
    with pytest.raises(ValueError, match="'x' given twice"):
        train_many(tiny_causal_lm(len(tok)), tasks, tokenizer=tok, out=str(tmp_path / "out"), **SHARED)


def test_cli_task_flags_train_one_adapter_per_task(tmp_path, files):
    from deltatune.cli import main
    from test_training_helpers import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "model")
    out = tmp_path / "multi"
    code = main(["train", "--model", str(model_dir), "--task", f"a={files['lora']}", "--task", f"b={files['ia3']}",
                 "--out", str(out), "--max-steps", "2", "--batch-size", "4", "--r", "4", "--target", "q_proj,v_proj",
                 "--dtype", "float32", "--no-progress"])
    assert code in (0, None)
    for name in ("a", "b"):
        config = json.loads((out / name / "adapter" / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["r"] == 4
        assert json.loads((out / name / "summary.json").read_text())["steps"] == 2


def test_weighted_loss_sum_and_token_losses_match_cross_entropy(tmp_path, tok):
    """``lm_loss_sum``'s per-position weights and per-token output (what train_many's loss uses)."""
    import torch.nn.functional as F

    from deltatune.training.batching import collate
    from deltatune.training.data import IGNORE
    from deltatune.training.loss import lm_loss_sum

    model = tiny_causal_lm(len(tok))
    rows = load_dataset(write_jsonl(tmp_path / "rows.jsonl", chat_rows(3, seed=5)), tok).examples
    batch = collate(rows, packing=False)
    weights = torch.rand(batch.targets.shape)
    token_losses = torch.zeros(batch.targets.shape)
    total = lm_loss_sum(model, batch, weights, token_losses)
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits
    sel = batch.targets != IGNORE
    ce = F.cross_entropy(logits[sel], batch.targets[sel], reduction="none")
    torch.testing.assert_close(token_losses[sel], ce.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(total, (ce * weights[sel]).sum(), rtol=1e-5, atol=1e-5)
    assert bool((token_losses[~sel] == 0).all())



def test_a_task_without_lr_gets_its_methods_default_unless_the_run_sets_one():
    from deltatune import registry
    from deltatune.training.api import make_config
    from deltatune.training.many import _task_config

    ia3, lora = configs()["ia3"], configs()["lora"]
    unset = make_config(None, out="x")
    assert _task_config(TaskSpec("a", "a.jsonl"), unset, ia3).lr == registry.method_of(ia3).default_lr
    assert _task_config(TaskSpec("a", "a.jsonl"), unset, lora).lr == registry.method_of(lora).default_lr
    shared = make_config(None, out="x", lr=1e-3)
    assert _task_config(TaskSpec("a", "a.jsonl"), shared, ia3).lr == 1e-3
    assert _task_config(TaskSpec("a", "a.jsonl", lr=3e-2), shared, ia3).lr == 3e-2
    assert _task_config(TaskSpec("a", "a.jsonl", epochs=3), shared, ia3).out == "x/a"
