"""Planned vs measured: `deltatune plan`'s peak for the default model against the peak RSS of a
short `deltatune train` run with the same settings (LoRA and QLoRA), each in a fresh process."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from deltatune.advisor import memory as M
from deltatune.advisor.plan import plan, train_settings

BATCH, STEPS = 8, 3
_MAXRSS = ("import resource, sys; from deltatune.cli import main; rc = main(sys.argv[1:]); "
           "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")


def _default_model_available() -> bool:
    try:
        from deltatune import models

        models.default_gguf_path()
        return True
    except FileNotFoundError:
        return False


pytestmark = pytest.mark.skipif(not _default_model_available(), reason="default model package not installed")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Examples of one length, so every micro-batch is BATCH rows of ``seq_len`` tokens."""
    from deltatune import models

    text = "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat. " * 7
    path = tmp_path_factory.mktemp("advisor") / "train.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for _ in range(BATCH * STEPS)))
    from deltatune.training.data import load_dataset

    lengths = load_dataset(str(path), models.load_tokenizer("default"), max_length=1024).lengths
    assert len(set(lengths)) == 1
    return path, lengths[0]


def _measured_peak(tmp_path, data_path, *extra) -> tuple[int, str]:
    args = ["train", "--data", str(data_path), "--max-steps", str(STEPS), "--batch-size", str(BATCH),
            "--no-exact-match", "--no-progress", "--out", str(tmp_path / "run"), *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", _MAXRSS, *args], capture_output=True, text=True, env=env, timeout=900)  # a hang guard, not a speed check: a loaded machine takes minutes
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("MAXRSS_KB"))
    return int(line.split()[1]) * 1024, proc.stdout


@pytest.mark.parametrize("method,extra", [("lora", ()), ("qlora", ("--quantize", "nf4"))])
def test_planned_peak_within_15_percent_of_measured_rss(tmp_path, data, method, extra):
    data_path, seq_len = data
    p = plan("default", "64GB", seq_len=seq_len, batch=BATCH, rank=16, target="all-linear",
             **train_settings(None, seq_len))
    planned = p.estimate(method).peak
    measured, _ = _measured_peak(tmp_path, data_path, *extra)
    ratio = planned / measured
    print(f"{method}: planned {planned / M.MiB:.0f} MiB, measured {measured / M.MiB:.0f} MiB (ratio {ratio:.2f})")
    assert 0.85 <= ratio <= 1.15, f"{method}: planned {M.gib(planned)} vs measured peak RSS {M.gib(measured)}"
