"""A 60-second soak of `deltatune serve` (``benchmarks/soak.py``; ``--seconds 600`` is the full run):
mixed streaming and non-streaming load on 8 adapters plus the base while adapters are loaded,
reloaded in place and unloaded, clients are killed mid-stream and hostile requests (every failure
case of issue 25) come in between.

Must hold: 0 requests lost, 0 mixed answers (every greedy answer equals the same prompt decoded
alone by PeftModel, for one of the versions its adapter had), no 5xx, RSS growth after the warm-up
under 5 %, p99 ``/health`` latency under 100 ms. The latency bound is a statement about the server's
event loop, not about a starved machine: when the 1-minute load average is above twice the cores
(other jobs own the CPUs), the p99 is held to 1 s instead, and the test says so.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import soak  # noqa: E402

SECONDS = float(os.environ.get("DELTATUNE_SOAK_SECONDS", "60"))


def test_soak_loses_nothing_mixes_nothing_and_stays_small(tmp_path, capsys):
    figures = soak.run(SECONDS, "tiny", clients=12, seed=0, root=tmp_path, png=tmp_path / "soak.png")
    examples = figures["examples"]
    assert figures["lost"] == 0, examples["lost"]
    assert figures["mixed"] == 0, examples["mixed"]
    assert figures["server_errors_5xx"] == 0, figures["statuses"]
    assert figures["unexpected_statuses"] == 0, examples["unexpected"]
    assert figures["greedy_checked"] >= 50 and figures["killed_clients"] >= 10, figures
    churned = figures["statuses"]
    assert churned["load"].get("200", 0) >= 3 and churned["unload"].get("200", 0) >= 2, churned
    assert figures["probe_answers_distinct"] == 1  # outside the root, missing: one answer
    assert figures["pass"]["answers_after"], figures["after_run"]
    assert figures["rss_growth"] < soak.BOUNDS["rss_growth"], figures["rss_mib"]
    p99 = figures["health"]["p99_ms"] / 1000
    starved = os.getloadavg()[0] > 2 * (os.cpu_count() or 1)
    if starved:
        with capsys.disabled():
            print(f"\nsoak: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: /health p99 "
                  f"{p99 * 1000:.0f} ms held to 1 s instead of 100 ms")
    assert p99 < (1.0 if starved else soak.BOUNDS["health_p99_s"]), figures["health"]
