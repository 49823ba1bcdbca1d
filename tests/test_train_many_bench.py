"""``benchmarks/train_many.py`` end to end on a tiny model: both contenders run, train the same
adapters (equal losses per task), results written."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from test_training_helpers import save_tiny_model

REPO = Path(__file__).resolve().parents[1]


def test_benchmark_smoke(tmp_path):
    model = save_tiny_model(tmp_path / "model")
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "benchmarks/train_many.py", "--model", str(model), "--tasks", "2",
                           "--examples", "8", "--eval-examples", "2", "--dtype", "float32", "--threads", "1",
                           "--out", str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "out" / "train_many.json").read_text())
    assert result["job"]["tasks"] == ["add", "reverse"]
    for who in ("multi", "solo"):
        assert result[who]["wall_s"] > 0 and result[who]["peak_rss_mb"] > 0
        for name in ("add", "reverse"):
            task = result[who]["tasks"][name]
            assert task["steps"] == 1 and task["total"] == 2 and 0 <= task["exact_match"] <= 1
    for name in ("add", "reverse"):  # one run of both tasks trains each adapter as its own run does
        multi, solo = result["multi"]["tasks"][name], result["solo"]["tasks"][name]
        for key in ("final_loss", "eval_loss"):
            assert abs(multi[key] - solo[key]) <= 1e-4 * abs(solo[key]), (name, key, multi[key], solo[key])
    assert result["time_ratio"] > 0 and (tmp_path / "out" / "train_many.png").stat().st_size > 0


def test_benchmark_concurrent_rounds_swap_cores_and_report_phases(tmp_path):
    """``--concurrent``: the solo chain and the multi run at once, each pinned to one core, the
    cores swapped in round 2; each round's ratios and each contender's phases are reported."""
    model = save_tiny_model(tmp_path / "model")
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "benchmarks/train_many.py", "--model", str(model), "--tasks", "2",
                           "--examples", "8", "--eval-examples", "2", "--dtype", "float32", "--concurrent",
                           "--rounds", "2", "--cores", "0,0", "--out", str(tmp_path / "out")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "out" / "train_many.json").read_text())
    assert len(result["rounds"]) == 2
    for rnd in result["rounds"]:
        assert rnd["time_ratio"] == round(rnd["multi"]["wall_s"] / rnd["solo"]["wall_s"], 3)
        assert rnd["rss_ratio"] == round(rnd["multi"]["peak_rss_mb"] / rnd["solo"]["peak_rss_mb"], 3)
        assert set(rnd["solo"]["phases"]) == {"startup_s", "train_s", "eval_save_s", "exit_s"}
        assert set(rnd["multi"]["phases"]) == {"train_s", "eval_s", "save_s", "other_s"}
        assert rnd["solo"]["phases"]["startup_s"] > 0 and rnd["multi"]["phases"]["train_s"] > 0
        for name in ("add", "reverse"):
            multi, solo = rnd["multi"]["tasks"][name], rnd["solo"]["tasks"][name]
            assert abs(multi["eval_loss"] - solo["eval_loss"]) <= 1e-4 * abs(solo["eval_loss"])
    assert "round 2 (solo core 0, multi core 0)" in proc.stdout
