"""FSDP2 sharded training (issue 17): two gloo processes on the CPU, a tiny Llama.

One ``torchrun`` launch (tests/fsdp_worker.py) trains FSDP and DDP LoRA (a tiny Llama with an
untied head) and QLoRA (tied: one matrix for the embedding and the head); the same runs in one
process here are the reference (same global batch, fp32): adapters agree within 1e-5. A kill -9 of one rank ends the launch within a timeout and ``--resume`` continues to the
uninterrupted run's adapter.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_training_helpers import REPO, chat_rows, cli_module, read_metrics, run_cli, save_tiny_model, write_jsonl

LAUNCH = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
STEPS = 24
ENV = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def options(world, out, **extra) -> dict:
    base = dict(model=world["model"], data=world["train"], eval_data=world["eval"], out=str(out), dtype="float32",
                progress=False, r=4, alpha=8, lr=1e-3, seed=3, batch_size=2, max_steps=STEPS,
                eval_exact_match=False, device="cpu")
    return {**base, **extra}


# LoRA; QLoRA with micro-batches cut by tokens, so ranks need different numbers of passes, on the
# tied model, with exact match (generation under FSDP).
QLORA = dict(quantize="nf4", grad_accum=2, max_batch_tokens=72, max_steps=6, eval_exact_match=True)
# Token ids on both sides of the 259-row vocabulary's split (130 + 129 rows), repeated.
PROBE = [[1, 5, 129, 130, 258, 5], [0, 200, 130, 3, 3, 100]]


def adapter(run_dir) -> dict:
    return load_file(str(Path(run_dir) / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(got: dict, want: dict, atol: float = 1e-5) -> None:
    assert got.keys() == want.keys() and want
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=atol, msg=lambda m: f"{k}: {m}")
    assert any(t.abs().max() > 1e-3 for k, t in want.items() if "lora_B" in k)  # it trained


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdp")
    return {"dir": d, "model": str(save_tiny_model(d / "model")),
            "tied_model": str(save_tiny_model(d / "tied_model", tied=True)),
            "train": str(write_jsonl(d / "train.jsonl", chat_rows(64, seed=0))),
            "eval": str(write_jsonl(d / "eval.jsonl", chat_rows(9, seed=1)))}


@pytest.fixture(scope="module")
def runs(world):
    """Two-process runs (one launch) and their one-process references (global batch 4 both ways)."""
    pytest.importorskip("bitsandbytes")
    from deltatune.training.api import train

    d = world["dir"]
    tied = dict(QLORA, model=world["tied_model"])
    spec = {"report": str(d / "report.json"), "probe_ids": PROBE, "runs": {
        "fsdp_lora": options(world, d / "fsdp_lora", fsdp=True),
        "fsdp_qlora": options(world, d / "fsdp_qlora", fsdp=True, **tied),
        "ddp_lora": options(world, d / "ddp_lora"),
        "ddp_qlora": options(world, d / "ddp_qlora", **tied)}}
    (d / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([*LAUNCH, str(REPO / "tests" / "fsdp_worker.py"), str(d / "spec.json")], cwd=REPO,
                          env=ENV, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    logits = {}
    try:
        for name, extra in (("one_lora", {}), ("one_qlora", dict(QLORA, model=world["tied_model"]))):
            result = train(options(world, d / name, batch_size=4, **extra))
            with torch.no_grad():
                logits[name] = result.model(input_ids=torch.tensor(PROBE)).logits
    finally:
        torch.set_num_threads(threads)
    return {"dir": d, "report": json.loads((d / "report.json").read_text()), "logits": logits}


def test_fsdp_lora_and_qlora_match_one_process_and_ddp(runs):
    d = runs["dir"]
    assert_same_adapter(adapter(d / "fsdp_lora"), adapter(d / "one_lora"))
    assert_same_adapter(adapter(d / "ddp_lora"), adapter(d / "one_lora"))
    assert_same_adapter(adapter(d / "fsdp_qlora"), adapter(d / "one_qlora"))
    assert_same_adapter(adapter(d / "ddp_qlora"), adapter(d / "one_qlora"))
    for two, one in (("fsdp_lora", "one_lora"), ("fsdp_qlora", "one_qlora")):
        losses = [[r["loss"] for r in read_metrics(d / run) if "loss" in r] for run in (two, one)]
        assert losses[0] == pytest.approx(losses[1], abs=1e-5)
        evals = [[r["eval_loss"] for r in read_metrics(d / run) if "eval_loss" in r] for run in (two, one)]
        assert evals[0] == pytest.approx(evals[1], abs=1e-5) and evals[0]  # 9 eval rows: uneven ranks
    # the trained model's own forward (embedding lookup and head hooks under FSDP) and generation
    for two, one in (("fsdp_lora", "one_lora"), ("fsdp_qlora", "one_qlora")):
        for rank in runs["report"][two]:
            torch.testing.assert_close(torch.tensor(rank["logits"]), runs["logits"][one], rtol=0, atol=1e-4)
    summaries = [json.loads((d / run / "summary.json").read_text()) for run in ("fsdp_qlora", "one_qlora")]
    assert summaries[0]["total"] == summaries[1]["total"] == 9
    assert summaries[0]["exact_match"] == summaries[1]["exact_match"]
    # the adapter is peft's file, written whole by rank 0 (no shards, no temporary leftovers)
    config = json.loads((d / "fsdp_qlora" / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert not list((d / "fsdp_lora").glob("**/*.tmp"))


def test_fsdp_shards_the_base_the_vocabulary_and_4bit_statistics_but_not_the_adapter(runs):
    report = runs["report"]
    for name, tied in (("fsdp_lora", False), ("fsdp_qlora", True)):
        ranks = report[name]
        assert len(ranks) == 2 and all(r["sharded"] for r in ranks)
        full, replicated = ranks[0]["full_base_bytes"], ranks[0]["replicated_base_bytes"]
        # only the final norm is replicated; the layers, the embedding and the head are split in two
        assert replicated == ranks[0]["norm_bytes"]
        for r in ranks:
            assert r["local_base_bytes"] == pytest.approx(full / 2, rel=0.02)
        # the vocabulary (259 rows) split torch.chunk's way: 130 + 129 rows, one matrix when tied
        for r, rows in zip(ranks, (130, 129)):
            assert r["vocab"]["tied"] is tied
            for matrix in ("embedding", "head"):
                assert r["vocab"][matrix] == {"global": [259, 32], "local": [rows, 32]}
        assert all(r["trainable_dtensors"] == 0 for r in ranks)   # adapter replicated
    ddp = report["ddp_lora"][0]
    assert not ddp["sharded"] and ddp["local_base_bytes"] == ddp["full_base_bytes"]
    # 4-bit codes and their statistics are sharded parameters: each rank holds half of each
    layer = report["fsdp_qlora"][0]["4bit"]
    assert {"weight", "absmax", "absmax2", "absmax_offset"} <= set(layer)
    for name in ("weight", "absmax"):
        assert layer[name]["local"][0] == layer[name]["global"][0] // 2
    # ranks' micro-batches were cut into different numbers of passes, and the run still matched
    assert sum(r["padding_passes"] for r in report["fsdp_qlora"]) > 0
    assert report["fsdp_qlora"][0]["full_base_bytes"] < 0.6 * report["fsdp_lora"][0]["full_base_bytes"]


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)


def test_kill_9_of_one_rank_stops_the_run_and_resume_continues(world, runs, tmp_path):
    out = tmp_path / "killed"
    flags = ["train", "--model", world["model"], "--data", world["train"], "--eval", world["eval"], "--out", str(out),
             "--dtype", "float32", "--no-progress", "--rank", "4", "--alpha", "8", "--lr", "1e-3", "--seed", "3",
             "--batch-size", "2", "--max-steps", str(STEPS), "--no-exact-match", "--device", "cpu", "--fsdp",
             "--save-every", "4"]
    launch = [*LAUNCH, "-m", cli_module(), *flags]
    proc = subprocess.Popen(launch, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if latest.is_file() and latest.read_text().strip() >= "step-00000008":
            break
        time.sleep(0.01)
    victims = [p for p in _children(proc.pid) if _rank_of(p) == 1]
    assert proc.poll() is None and victims, "the run ended before a rank could be killed"
    os.kill(victims[0], signal.SIGKILL)
    t0 = time.time()
    try:
        code = proc.wait(timeout=90)  # torchrun sees the dead rank and stops the other one
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the run hung after one rank was killed")
    assert code != 0 and time.time() - t0 < 90
    assert not (out / "adapter").exists()
    killed_at = int(latest.read_text().strip().split("-")[1])
    assert 8 <= killed_at < STEPS

    done = run_cli([*flags, "--resume"], launcher=[*LAUNCH, "-m", cli_module()], timeout=300)
    assert f"(step {killed_at}/{STEPS})" in done.stdout
    assert_same_adapter(adapter(out), adapter(runs["dir"] / "one_lora"))
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    want = [r["loss"] for r in read_metrics(runs["dir"] / "one_lora") if "loss" in r]
    assert losses == pytest.approx(want, abs=1e-5)


# -- in one process ------------------------------------------------------------------------------

def test_4bit_statistics_as_parameters_dequantize_the_same():
    pytest.importorskip("bitsandbytes")
    from deltatune.quant.nf4 import Linear4bit

    torch.manual_seed(0)
    layer = Linear4bit.from_linear(torch.nn.Linear(64, 48))
    before = layer.dequantize()
    layer.stats_as_parameters_()
    names = {n for n, _ in layer.named_parameters()}
    assert {"absmax", "absmax2", "absmax_offset"} <= names and not dict(layer.named_buffers())
    assert all(not p.requires_grad for p in layer.parameters())
    assert torch.equal(layer.dequantize(), before)
    layer.to(torch.bfloat16)  # the statistics keep their dtypes, as buffers do
    assert layer.absmax.dtype == torch.uint8 and layer.absmax2.dtype == torch.float32
    layer.quantize_(torch.randn(48, 64))  # re-quantizing keeps them parameters
    assert isinstance(layer.absmax2, torch.nn.Parameter)


def test_decoder_layers_and_refusals():
    from conftest import tiny_llama

    from deltatune.training.fsdp import FSDPError, decoder_layers, prepare_4bit_for_sharding

    model = tiny_llama()
    assert decoder_layers(model) == list(model.model.layers)
    with pytest.raises(FSDPError, match="no repeated decoder block"):
        decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    bnb = pytest.importorskip("bitsandbytes")
    holder = torch.nn.Sequential(bnb.nn.Linear4bit(64, 64))
    with pytest.raises(FSDPError, match="0: a bitsandbytes Linear4bit.*--quantize nf4"):
        prepare_4bit_for_sharding(holder)


def test_plan_devices_uses_the_fsdp_accounting():
    from deltatune.advisor import memory as M
    from deltatune.advisor.shapes import KNOWN

    shape = KNOWN["llama-2-70b"]
    one = M.estimate("qlora", shape, M.Setup())
    two, eight = (M.estimate("qlora", shape, M.Setup(devices=k, sharding="fsdp")) for k in (2, 8))
    block = sum(i * o for i, o in shape.block_linears().values()) * M.NF4_DQ_BITS / 8
    for k, e in ((2, two), (8, eight)):
        # 1/k of the base, the head too, plus two blocks gathered in full
        assert e.base_weights == pytest.approx(one.base_weights / k + 2 * block, rel=1e-3)
        # the adapter is replicated: its weights, gradients and AdamW state as on one device
        assert (e.adapter_weights, e.gradients, e.optimizer) == (one.adapter_weights, one.gradients, one.optimizer)
        assert e.activations == one.activations
    # the CLI's --devices N plans FSDP unless told --sharding ddp
    from deltatune.cli import main

    for extra, word in (([], "FSDP over 2 devices"), (["--sharding", "ddp"], "data parallel over 2 devices")):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            main(["plan", "--model", "70b", "--memory", "24GB", "--devices", "2", *extra])
        assert word in buf.getvalue()
