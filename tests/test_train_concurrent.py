"""train_throughput.py --concurrent: both contenders launched together, each pinned to its own core
with one thread, cores swapped between rounds, ratios as geometric means over the rounds."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import train_concurrent as conc  # noqa: E402
import train_throughput as tt  # noqa: E402

CORES = sorted(os.sched_getaffinity(0))[:2]
pytestmark = pytest.mark.skipif(len(CORES) < 2 or not Path("/usr/bin/taskset").exists(),
                                reason="needs two usable cores and taskset")

# A stand-in child: loads for a name-dependent time, meets its partner at the barrier, "trains",
# then reports the cores it may run on, its thread settings and when it trained.
FAKE = ("import argparse, json, os, sys, time; sys.path.insert(0, %r); import train_contenders; "
        "time.sleep({'a': 0.0, 'b': 1.0}[sys.argv[1]]); "
        "train_contenders.start_together(argparse.Namespace(barrier=sys.argv[2], barrier_n=2)); "
        "t0 = time.time(); time.sleep(0.3); "
        "speed = {'a': 100.0, 'b': 150.0}[sys.argv[1]] * (1.1 if os.sched_getaffinity(0) == {%d} else 1.0); "
        "print(json.dumps({'tokens_per_s': speed, 'train_s': time.time() - t0, 'train_end_unix': time.time(), "
        "'train_start_unix': t0, 'peak_rss_mb': {'a': 300.0, 'b': 200.0}[sys.argv[1]], 'exact_match': 0.5, "
        "'eval_loss': 1.0, 'losses': [2.0, 1.0], 'affinity': sorted(os.sched_getaffinity(0)), "
        "'omp': os.environ.get('OMP_NUM_THREADS')}))") % (str(REPO / "benchmarks"), CORES[0])


def test_rounds_pin_each_contender_to_its_own_core_and_swap_them(tmp_path):
    def command_for(name, core, barrier):
        return (["taskset", "-c", str(core), sys.executable, "-c", FAKE, name, str(barrier)],
                dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"))

    rounds = conc.run_rounds(["a", "b"], 2, CORES, command_for, tt.child_result, 60, tmp_path)
    assert [r["a"]["affinity"] for r in rounds] == [[CORES[0]], [CORES[1]]]
    assert [r["b"]["affinity"] for r in rounds] == [[CORES[1]], [CORES[0]]]
    assert all(r[n]["omp"] == "1" for r in rounds for n in "ab")
    summary = conc.summarize(["a", "b"], rounds)
    # core CORES[0] is 10% faster in the stand-in: the swap cancels it in the geometric mean
    assert math.isclose(summary["speed_ratio_geomean"], 1.5, rel_tol=1e-9)
    assert math.isclose(summary["rss_ratio_geomean"], 200 / 300)
    # b loads 1 s longer, but the barrier starts both trainings together
    assert all(abs(r["a"]["train_start_unix"] - r["b"]["train_start_unix"]) < 0.25 for r in rounds)
    assert all(p["training_overlap"] > 0.5 for p in summary["per_round"])
    md = conc.table(["a", "b"], rounds, summary, str)
    assert "**1.50x**" in md
    conc.plot(["a", "b"], rounds, tmp_path / "plot.png", "test")
    assert (tmp_path / "plot.png").stat().st_size > 1000


def test_a_failed_child_names_itself_with_its_stderr(tmp_path):
    def command_for(name, core, barrier):
        code = "import sys; sys.exit('boom in ' + sys.argv[1])" if name == "b" else FAKE
        return [sys.executable, "-c", code, name, str(barrier)], dict(os.environ)

    with pytest.raises(RuntimeError, match=r"(?s)b failed \(exit 1\).*boom in b"):
        conc.run_rounds(["a", "b"], 1, CORES, command_for, tt.child_result, 60, tmp_path)


def test_a_failed_child_stops_the_other(tmp_path):
    def command_for(name, core, barrier):  # b waits at the barrier for a partner that died
        code = "import sys; sys.exit('early')" if name == "b" else FAKE
        return [sys.executable, "-c", code, name, str(barrier)], dict(os.environ)

    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="b failed"):
        conc.run_rounds(["a", "b"], 1, CORES, command_for, tt.child_result, 120, tmp_path)
    assert time.perf_counter() - t0 < 30          # a, stuck at the barrier, was killed, not waited for


def test_concurrent_arguments_pin_one_thread_and_score_exact_match(tmp_path):
    args = tt.parse_args(["--concurrent", "--steps", "4", "--eval-n", "8", "--cores", *map(str, CORES)])
    assert args.only == ["hf", "deltatune"] and args.threads == 1 and args.exact_match and args.rounds == 2
    args.train_file, args.eval_file = "t.jsonl", "e.jsonl"
    argv, env = tt.child_command("deltatune", args, {"float32": 1.0, "bfloat16": 1.0}, tmp_path, core=CORES[1],
                                 barrier=tmp_path)
    assert argv[:3] == ["taskset", "-c", str(CORES[1])]
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "1"
    assert argv[argv.index("--threads") + 1] == "1" and "--exact-match" in argv
    child = tt.parse_args(argv[argv.index(tt.__file__) + 1:])      # the child's own parser accepts it
    assert child.child == "deltatune" and child.exact_match and child.barrier == str(tmp_path) and child.barrier_n == 2
    with pytest.raises(SystemExit):
        tt.parse_args(["--concurrent", "--only", "hf", "deltatune", "deltatune-fp32"])
    assert json.loads(json.dumps(tt.contender_order(args))) == ["hf", "deltatune"]


def test_cpu_time_ratio_is_reported_beside_the_wall_clock_ratio():
    """A third process on one core halves that contender's wall-clock speed, not its speed per
    CPU second: the summary gives both (``cpu_speed_ratio``; None where a child gave no CPU time)."""
    def res(tokens_per_s, cpu_s, core, rnd):
        return {"tokens_per_s": tokens_per_s, "tokens": 1000, "train_s": 1000 / tokens_per_s, "train_cpu_s": cpu_s,
                "train_end_unix": 100.0, "peak_rss_mb": 100.0, "exact_match": 0.5, "eval_loss": 1.0, "core": core,
                "round": rnd}

    rounds = [{"a": res(10, 100, 0, 1), "b": res(10, 50, 1, 1)}, {"a": res(10, 100, 1, 2), "b": res(20, 50, 0, 2)}]
    summary = conc.summarize(["a", "b"], rounds)
    assert [p["cpu_speed_ratio"] for p in summary["per_round"]] == [2.0, 2.0]
    assert math.isclose(summary["cpu_speed_ratio_geomean"], 2.0)
    assert math.isclose(summary["speed_ratio_geomean"], 2 ** 0.5)
    del rounds[0]["a"]["train_cpu_s"]
    summary = conc.summarize(["a", "b"], rounds)
    assert summary["per_round"][0]["cpu_speed_ratio"] is None and summary["cpu_speed_ratio_geomean"] is None
    assert "| 1 | 1.00x | - |" in conc.table(["a", "b"], rounds, summary, str)
