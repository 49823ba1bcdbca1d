"""benchmarks/gpu_check.py's dry run (what `make gpu-check` does on a machine without CUDA): every
part is skipped with a reason, each part's plumbing still runs, the JSON says so, exit status 0."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARTS = ["cuda_tests", "train", "engine", "vllm", "qlora", "fsdp"]


def test_dry_run_skips_every_part_with_a_reason(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=240,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] is True
    assert report["order"] == PARTS and set(report["parts"]) == set(PARTS)
    for name, part in report["parts"].items():
        assert part["status"] == "skipped", (name, part)
        assert "--dry-run" in part["reason"] or "CUDA" in part["reason"], (name, part["reason"])
        assert part["dry_run"], name                      # what the part checked instead
    assert report["parts"]["cuda_tests"]["dry_run"]["collected_cuda_tests"] >= 5
    engine = report["parts"]["engine"]["dry_run"]["cpu_tiny_model"]
    assert set(engine["rows_equal_hf"]) == {"base", "2"}
    assert report["parts"]["qlora"]["dry_run"]["cpu_tiny"]["steps"]["bits_per_param"] < 5
    assert "| part | status |" in proc.stdout and "skipped" in proc.stdout


def test_parts_not_started_within_the_budget_are_skipped(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run", "--budget", "0",
                           "--only", "train", "fsdp", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    parts = json.loads(out.read_text())["parts"]
    assert set(parts) == {"train", "fsdp"}
    assert all(p["status"] == "skipped" and "time budget spent" in p["reason"] for p in parts.values())
