"""``train_many`` killed with SIGKILL, then resumed, ends bit-identical to a run never killed.

The child process kills itself at an exact point (after one task's optimizer step, before the
others'; or while a checkpoint is half written), so the test is deterministic. Three tasks: LoRA
with dropout (the masks must be drawn again as before), IA3 that finishes before the kill, and
DoRA with a held-out eval set and early stopping (its best copy and patience count live in the
checkpoint; with ``min_delta`` 10 every eval after the first is "no better", so it stops at its
step 6).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deltatune.checkpoint.io import load_tensors
from test_training_helpers import chat_rows, write_jsonl

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
NAMES = ("lora", "ia3", "dora")

CHILD = r'''
import os, signal, sys
import torch
torch.set_num_threads(1)
from test_training_helpers import make_tokenizer, tiny_causal_lm
from deltatune.registry import make_config
from deltatune.training import TaskSpec, train_many
from deltatune.training import many_loop, checkpoints

out, data, kill, resume = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
if kill == "mid-step":            # run step 7: the first task has stepped, the others not yet
    update = many_loop.ManyTrainer._update
    def _update(self, run, *a):
        update(self, run, *a)
        if self.step == 6 and run.name == "lora":
            os.kill(os.getpid(), signal.SIGKILL)
    many_loop.ManyTrainer._update = _update
elif kill == "mid-save":          # the step-6 checkpoint: adapters written, optimizer not yet
    save = checkpoints.atomic_save_tensors
    def _save(tensors, path):
        if "step-00000006" in str(path.parent) and path.name == "optimizer.safetensors":
            os.kill(os.getpid(), signal.SIGKILL)
        return save(tensors, path)
    checkpoints.atomic_save_tensors = _save
tok = make_tokenizer()
tasks = [
    TaskSpec("lora", f"{data}/lora.jsonl", make_config("lora", r=4, lora_alpha=8, lora_dropout=0.1,
             target_modules=["q_proj", "v_proj"]), lr=5e-3, options={"max_steps": 9}),
    TaskSpec("ia3", f"{data}/ia3.jsonl", make_config("ia3", target_modules=["gate_proj", "up_proj"],
             feedforward_modules=["up_proj"]), lr=2e-2, options={"max_steps": 4}),
    TaskSpec("dora", f"{data}/dora.jsonl", make_config("dora", r=2, lora_alpha=4, target_modules=["k_proj", "o_proj"]),
             lr=2e-3, eval_data=0.25, eval_every=2, patience=2, min_delta=10.0, options={"max_steps": 20}),
]
train_many(tiny_causal_lm(len(tok)), tasks, tokenizer=tok, out=out, batch_size=4, dtype="float32",
           progress=False, eval_exact_match=False, seed=3, warmup_steps=1, save_every=3, resume=resume)
'''


def run_child(tmp_path: Path, out: Path, data: Path, kill: str = "none", resume: bool = False):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(TESTS)]), HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, str(script), str(out), str(data), kill, "1" if resume else "0"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("many_resume_data")
    for seed, name in enumerate(NAMES):
        write_jsonl(d / f"{name}.jsonl", chat_rows(16, seed=seed))
    return d


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("many_reference")
    proc = run_child(tmp, tmp / "run", data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run"


def adapter_tensors(run: Path, name: str) -> dict[str, torch.Tensor]:
    return load_tensors(run / name / "adapter" / "adapter_model.safetensors")


@pytest.mark.parametrize("kill,resumed_at", [("mid-step", 6), ("mid-save", 3)])
def test_sigkill_then_resume_is_bit_identical(tmp_path, data, reference, kill, resumed_at):
    out = tmp_path / "run"
    proc = run_child(tmp_path, out, data, kill=kill)
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed: {proc.stderr[-2000:]}"
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{resumed_at:08d}"
    assert not (out / "lora" / "adapter").exists(), "killed before the lora task could finish"

    proc = run_child(tmp_path, out, data, resume=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / f'step-{resumed_at:08d}'} (run step {resumed_at}" in proc.stdout
    for name in NAMES:
        want, got = adapter_tensors(reference, name), adapter_tensors(out, name)
        assert want.keys() == got.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), f"{name}: {key} differs after the resume"
        ref = json.loads((reference / name / "summary.json").read_text())
        res = json.loads((out / name / "summary.json").read_text())
        for key in ("steps", "final_loss", "eval_loss", "stopped_early", "best_step", "tokens"):
            assert res.get(key) == ref.get(key), f"{name}: summary {key} {res.get(key)} != {ref.get(key)}"
        ref_log = (reference / name / "metrics.jsonl").read_text().splitlines()
        res_log = (out / name / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(r).get("loss") for r in res_log] == [json.loads(r).get("loss") for r in ref_log]
    dora = json.loads((reference / "dora" / "summary.json").read_text())
    assert dora["stopped_early"] and dora["steps"] == 6 and dora["best_step"] == 2


def test_resume_refuses_a_checkpoint_of_other_tasks(tmp_path, data, reference):
    import shutil

    from deltatune.checkpoint.io import CheckpointError
    from deltatune.training import TaskSpec, train_many
    from deltatune.registry import make_config
    from test_training_helpers import make_tokenizer, tiny_causal_lm

    out = tmp_path / "other"
    shutil.copytree(reference / "checkpoints", out / "checkpoints")
    tok = make_tokenizer()
    tasks = [TaskSpec("lora", data / "lora.jsonl", make_config("lora", r=4, target_modules=["q_proj"])),
             TaskSpec("new", data / "ia3.jsonl", make_config("lora", r=4, target_modules=["q_proj"]))]
    with pytest.raises(CheckpointError, match=r"holds tasks \['dora', 'ia3', 'lora'\], this run has \['lora', 'new'\]"):
        train_many(tiny_causal_lm(len(tok)), tasks, tokenizer=tok, out=str(out), dtype="float32", progress=False,
                   resume=True, max_steps=2)
