"""End to end in subprocesses on a tiny model saved as a transformers directory: CLI verbs,
SIGKILL + --resume ends where an uninterrupted run ends, DDP with two processes matches one."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from test_training_helpers import REPO, chat_rows, cli_module, read_metrics, run_cli, save_tiny_model, write_jsonl

COMMON = ["--dtype", "float32", "--no-progress", "--rank", "4", "--alpha", "8", "--lr", "5e-3", "--seed", "3"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    model = save_tiny_model(d / "model")
    train = write_jsonl(d / "train.jsonl", chat_rows(64, seed=0))
    held = write_jsonl(d / "eval.jsonl", chat_rows(8, seed=1))
    return {"model": str(model), "train": str(train), "eval": str(held), "module": cli_module()}


def train_args(world, out, *extra):
    return ["train", "--model", world["model"], "--data", world["train"], "--out", str(out), *COMMON, *extra]


def adapter(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_cli_train_eval_generate(world, tmp_path):
    m = world["module"]
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {world['model']}\ndata: {world['train']}\neval_data: {world['eval']}\n"
                   "max_steps: 4\nbatch_size: 4\neval_limit: 4\nmax_new_tokens: 8\n")
    out = tmp_path / "run"
    proc = run_cli(["train", "--config", str(cfg), "--out", str(out), *COMMON], module=m)
    assert "64 examples" in proc.stdout and "trained 4 steps" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and "exact_match" in summary and "eval_loss" in summary
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 4

    proc = run_cli(["eval", "--model", world["model"], "--adapter", str(out / "adapter"), "--data", world["eval"],
                    "--dtype", "float32", "--json", "--max-new-tokens", "6"], module=m)
    result = json.loads(proc.stdout)
    assert result["total"] == 8 and result["eval_loss"] == pytest.approx(summary["eval_loss"], rel=1e-4)

    proc = run_cli(["generate", "--model", world["model"], "--adapter", str(out / "adapter"), "--dtype", "float32",
                    "--prompt", "ann is 42", "--prompt", "bob is 7", "--max-new-tokens", "5"], module=m)
    assert len(proc.stdout.splitlines()) >= 1

    proc = subprocess.run([sys.executable, "-m", m, "chat", "--model", world["model"], "--dtype", "float32",
                           "--max-new-tokens", "3"], input="hi\n\n", capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]

    bad = write_jsonl(tmp_path / "bad.jsonl", chat_rows(3) + ["{oops"])
    proc = run_cli(["train", "--model", world["model"], "--data", str(bad), "--out", str(tmp_path / "x")],
                   module=m, check=False)
    assert proc.returncode == 2 and "bad.jsonl:4: malformed JSON" in proc.stderr


def test_sigkill_then_resume_matches_uninterrupted_run(world, tmp_path):
    m = world["module"]
    steps = ["--max-steps", "120", "--batch-size", "4", "--save-every", "10", "--log-every", "1"]
    reference = tmp_path / "reference"
    run_cli(train_args(world, reference, *steps), module=m)

    crashed = tmp_path / "crashed"
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", m, *train_args(world, crashed, *steps)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = crashed / "checkpoints" / "latest"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if latest.is_file() and latest.read_text().strip() >= "step-00000020":
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (crashed / "adapter").exists()
    killed_at = int(latest.read_text().strip().split("-")[1])
    assert 20 <= killed_at < 120

    proc = run_cli(train_args(world, crashed, *steps, "--resume"), module=m)
    assert "resumed from" in proc.stdout and f"(step {killed_at}/120)" in proc.stdout
    want, got = adapter(reference), adapter(crashed)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    ref_losses = [r["loss"] for r in read_metrics(reference) if "loss" in r]
    res_losses = [r["loss"] for r in read_metrics(crashed) if "loss" in r]
    assert res_losses == pytest.approx(ref_losses, rel=1e-5)


def test_ddp_two_processes_match_one_process(world, tmp_path):
    m = world["module"]
    common = ["--max-steps", "6", "--grad-accum", "1", "--eval", world["eval"], "--no-exact-match"]
    single = tmp_path / "single"
    run_cli(train_args(world, single, "--batch-size", "4", *common), module=m)
    ddp = tmp_path / "ddp"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", m]
    run_cli(train_args(world, ddp, "--batch-size", "2", "--device", "cpu", *common), launcher=launcher, timeout=300)
    one = [r["loss"] for r in read_metrics(single) if "loss" in r]
    two = [r["loss"] for r in read_metrics(ddp) if "loss" in r]
    assert len(one) == len(two) == 6
    assert two == pytest.approx(one, abs=1e-4)
    ev1 = [r["eval_loss"] for r in read_metrics(single) if "eval_loss" in r]
    ev2 = [r["eval_loss"] for r in read_metrics(ddp) if "eval_loss" in r]
    assert ev2 == pytest.approx(ev1, abs=1e-4)
    for k, v in adapter(single).items():
        torch.testing.assert_close(adapter(ddp)[k], v, rtol=1e-4, atol=1e-5)
    assert not list(ddp.glob("*.tmp"))  # only rank 0 wrote, and completely


def test_train_quantize_nf4_trains_on_a_4bit_base_and_saves_a_dense_loadable_adapter(world, tmp_path):
    pytest.importorskip("bitsandbytes")
    from deltatune import PeftModel
    from deltatune.quant import Linear4bit
    from deltatune.training.api import make_config, load_model
    from transformers import AutoModelForCausalLM

    cfg = make_config(model=world["model"], data=world["train"], dtype="float32", quantize="nf4", r=4)
    model, _ = load_model(cfg, torch.device("cpu"))
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 2 * 7 and all(m.double_quant and m.quant_type == "nf4" for m in layers)
    # checkpointing follows peft's QLoRA recipe unless asked otherwise
    assert cfg.use_grad_checkpointing and not make_config(quantize="nf4", grad_checkpointing=False).use_grad_checkpointing
    assert not make_config().use_grad_checkpointing

    out = tmp_path / "qlora"
    run_cli(train_args(world, out, "--quantize", "nf4", "--max-steps", "8", "--batch-size", "8",
                       "--no-exact-match"), module=world["module"])
    losses = [row["loss"] for row in read_metrics(out) if "loss" in row]
    assert len(losses) == 8 and sum(losses[-2:]) < sum(losses[:2])
    # the adapter is an ordinary peft file: it loads strictly onto the dense base
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world["model"]), out / "adapter")
    assert sum(1 for n, _ in loaded.named_parameters() if "lora_B" in n) == 2 * 7
    assert any(t.abs().sum() > 0 for k, t in adapter(out).items() if "lora_B" in k)


def test_train_quantize_rejects_unknown_kind(world, tmp_path):
    proc = run_cli(train_args(world, tmp_path / "x", "--quantize", "int3"), module=world["module"], check=False)
    assert proc.returncode == 2 and "--quantize" in proc.stderr and "int3" in proc.stderr
