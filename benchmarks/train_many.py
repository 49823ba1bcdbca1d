"""Many adapters in one run vs one run per adapter (issue 27), on the default model.

The job: ``--tasks`` short-answer tasks (default 8) of ``--examples`` training rows each (default
200), 1 epoch, LoRA r=16 alpha=32 on all linear layers, batch 8, lr ``--lr``, cosine, seed 0,
the default dtype. Each task also has ``--eval-examples`` held-out rows (default 50), scored by
exact match (greedy) at the end of its training. The tasks are made here from local templates
(``make_tasks``): arithmetic, string edits, formats, classification; each answer is one short
string, so exact match per task means something.

Contenders, each a subprocess started as a user would start it (``python -m deltatune train``):

* ``solo``: one ``deltatune train --data T.jsonl --eval T_eval.jsonl`` per task, one after the
  other (each process imports, loads the base, trains, evaluates and writes its adapter);
* ``multi``: one ``deltatune train --task T=T.jsonl --task-eval T=T_eval.jsonl ...`` for all.

Both get the same flags (rank, alpha, targets, lr, schedule, batch, epochs, seed, dtype,
max_length): each task sees the same examples, in the same batches, with the same per-task
hyper-parameters. Measured per contender: wall time (process start to exit, all processes
summed for ``solo``) and peak RSS (``os.wait4``'s ``ru_maxrss`` of each process; for ``solo``
the largest). Per task: exact match, eval loss, final training loss. The multi run's per-task
loss curves are drawn in one PNG.

With ``--concurrent`` both contenders run at the same moment, the solo chain pinned to one core
and the multi run to the other (``taskset``, one thread per process), so load from other jobs on a
shared machine hits both alike; ``--rounds 2`` repeats it with the cores swapped. Each process's
time is split into phases: solo ``startup_s`` (imports, base load, tokenizer, data), ``train_s``,
``eval_save_s`` (final eval loss + exact match, adapter and plot writes), ``exit_s``; multi
``train_s``, ``eval_s``, ``save_s`` (its ``run_summary.json``) and ``other_s``.

    python benchmarks/train_many.py --concurrent --work /tmp/tm    # the full job (~40 min on 2 cores)
    python benchmarks/train_many.py                                # sequential: each contender alone
    python benchmarks/train_many.py --tasks 2 --examples 16 --eval-examples 8 --out /tmp/tm  # smoke, < 2 min

Writes benchmarks/results/train_many.json and train_many.png (``--out`` for elsewhere).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = """apple river candle forest garden silver window planet rocket butter lemon marble pencil
violet jacket castle dragon harbor island meadow orange pepper quartz saddle tunnel velvet walnut
yellow zipper bridge cactus donkey falcon guitar helmet insect jungle kitten ladder magnet napkin
oyster parrot rabbit salmon tomato umbrella vessel wizard""".split()
NAMES = """Maria James Aisha Lucas Sofia Omar Chloe Daniel Yuki Mateo Elena Kwame Hannah Ivan Priya
Noah Fatima Leo Ingrid Carlos""".split()
SURNAMES = "Lopez Smith Khan Martin Rossi Okafor Tanaka Novak Silva Weber Dubois Haddad".split()
CITIES = "Lisbon Berlin Madrid Toronto Nairobi Osaka Lyon Krakow Dublin Chicago Seoul Porto".split()
GOOD = ["great", "wonderful", "excellent", "lovely", "fantastic", "superb"]
BAD = ["awful", "terrible", "dreadful", "horrible", "poor", "disappointing"]
THINGS = ["food", "service", "room", "movie", "book", "concert", "phone", "coffee"]


def _add(r):
    a, b = r.randint(10, 99), r.randint(10, 99)
    return f"What is {a} + {b}? Answer with the number only.", str(a + b)


def _reverse(r):
    w = r.choice(WORDS + [w.lower() for w in NAMES + SURNAMES + CITIES])   # 93 words
    return f"Reverse the letters of the word '{w}'.", w[::-1]


def _upper(r):
    w = " ".join(r.sample(WORDS, 2))
    return f"Write in capital letters: {w}", w.upper()


def _date(r):
    y, m, d = r.randint(1990, 2030), r.randint(1, 12), r.randint(1, 28)
    return f"Rewrite the date {y}-{m:02d}-{d:02d} as DD/MM/YYYY.", f"{d:02d}/{m:02d}/{y}"


def _sort(r):
    xs = r.sample(range(1, 60), 4)
    return f"Sort ascending: {', '.join(map(str, xs))}", ", ".join(map(str, sorted(xs)))


def _swap(r):
    first, last = r.choice(NAMES), r.choice(SURNAMES)
    return f"Write the name '{first} {last}' as 'Last, First'.", f"{last}, {first}"


def _city(r):
    name, city = r.choice(NAMES), r.choice(CITIES)
    return f"{name} {r.choice(['lives in', 'moved to', 'is based in'])} {city} and works there. Which city? One word.", city


def _sentiment(r):
    good = r.random() < 0.5
    word = r.choice(GOOD if good else BAD)
    return f"Review: 'The {r.choice(THINGS)} was {word}.' Positive or negative? One word.", \
        "positive" if good else "negative"


TASKS = {"add": _add, "reverse": _reverse, "upper": _upper, "date": _date, "sort": _sort, "swap": _swap,
         "city": _city, "sentiment": _sentiment}


def make_tasks(folder: Path, n_tasks: int, n_train: int, n_eval: int, seed: int = 0) -> dict[str, tuple[Path, Path]]:
    """Write ``<task>.jsonl`` (``n_train`` rows) and ``<task>_eval.jsonl`` (``n_eval`` other rows)
    for the first ``n_tasks`` tasks; returns name -> (train path, eval path).

    The eval prompts are drawn first, distinct where the task has enough of them; training rows
    never repeat an eval prompt, and repeat each other only once a task's prompts run out (the
    ``reverse`` and ``sentiment`` templates have under 100 prompts each).
    """
    if not 1 <= n_tasks <= len(TASKS):
        raise SystemExit(f"--tasks must be 1..{len(TASKS)}")
    out = {}
    for k, (name, make) in enumerate(list(TASKS.items())[:n_tasks]):
        rng = random.Random(seed * 1000 + k)
        evals = _draw(make, rng, n_eval, avoid=set())
        train = _draw(make, rng, n_train, avoid={prompt for prompt, _ in evals})
        paths = (folder / f"{name}.jsonl", folder / f"{name}_eval.jsonl")
        for path, part in zip(paths, (train, evals)):
            path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                             {"role": "assistant", "content": a}]}) + "\n"
                                    for q, a in part))
        out[name] = paths
    return out


def _draw(make, rng: random.Random, n: int, avoid: set, tries: int = 200) -> list[tuple[str, str]]:
    """``n`` (prompt, answer) rows of template ``make``: none in ``avoid``, new ones while ``tries``
    draws in a row can find one, then repeats of the rows drawn (a finite template never loops)."""
    rows, seen = [], set()
    while len(rows) < n:
        for _ in range(tries):
            prompt, answer = make(rng)
            if prompt not in avoid and prompt not in seen:
                break
        else:
            if not rows:
                raise SystemExit(f"template {make.__name__}: no prompt outside the {len(avoid)} held out")
            prompt, answer = rows[rng.randrange(len(rows))]
        seen.add(prompt)
        rows.append((prompt, answer))
    return rows


def common_flags(args) -> list[str]:
    return ["--model", args.model, "--method", "lora", "--r", "16", "--alpha", "32", "--target", "all-linear",
            "--lr", str(args.lr), "--schedule", "cosine", "--batch-size", "8", "--epochs", "1", "--seed", "0",
            "--dtype", args.dtype, "--max-length", "256", "--log-every", "1", "--no-progress"]


THREADS: dict[str, str] = {}   # --threads N: OMP/MKL thread count of every child, the same for both


def run(argv: list[str], log: Path, core: int | None = None) -> dict:
    """Run a child to its end (pinned to ``core`` with ``taskset`` and one thread if given): its
    wall time, its own peak RSS (``wait4``) and when each output line came (for ``phases``)."""
    threads = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"} if core is not None else THREADS
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               **threads)   # unbuffered: each line timestamped when written
    argv = ["taskset", "-c", str(core), *argv] if core is not None else argv
    lines = []
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            lines.append((time.perf_counter() - t0, line.rstrip()))
            fh.write(f"[{lines[-1][0]:8.2f}] {line}")
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:8])} ... failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "lines": lines}


def solo_phases(res: dict, summary: dict) -> dict:
    """Where a solo process's wall time went: ``startup_s`` (imports, base load, tokenizer, data:
    up to its last data line), ``train_s`` (its steps), ``eval_save_s`` (wrap, final evaluation,
    adapter and plot writes: up to its ``trained ...`` line, less the steps) and ``exit_s``."""
    lines = res.pop("lines")
    startup = max((t for t, line in lines if " examples" in line and ".jsonl:" in line), default=0.0)
    done = max((t for t, line in lines if line.startswith("trained ")), default=res["wall_s"])
    train = summary.get("train_time_s") or 0.0
    return {"startup_s": round(startup, 2), "train_s": round(train, 2),
            "eval_save_s": round(done - startup - train, 2), "exit_s": round(res["wall_s"] - done, 2)}


def multi_phases(res: dict, run_summary: dict) -> dict:
    """The multi process's ``train_s``/``eval_s``/``save_s`` (its own ``run_summary.json``) and
    ``other_s``: the rest of its wall time (imports, data, base load, wrapping, exit)."""
    res.pop("lines")
    parts = {k: run_summary.get(k, 0.0) for k in ("train_s", "eval_s", "save_s")}
    return {**parts, "other_s": round(res["wall_s"] - sum(parts.values()), 2)}


def task_result(folder: Path) -> dict:
    s = json.loads((folder / "summary.json").read_text())
    return {k: s.get(k) for k in ("steps", "final_loss", "eval_loss", "exact_match", "correct", "total")}


def run_solo(args, tasks: dict, work: Path, core: int | None = None) -> dict:
    """Every task's ``deltatune train --data``, one after the other (on ``core`` if given)."""
    runs, per_task = {}, {}
    t0 = time.perf_counter()
    for name, (train, evals) in tasks.items():
        out = work / "solo" / name
        res = run([sys.executable, "-m", "deltatune", "train", *common_flags(args), "--data", str(train),
                   "--eval", str(evals), "--out", str(out)], work / f"solo-{name}.log", core)
        summary = json.loads((out / "summary.json").read_text())
        runs[name] = {**res, "phases": solo_phases(res, summary)}
        per_task[name] = {**task_result(out), **runs[name]}
        print(f"solo {name}: {res['wall_s']:.1f} s {runs[name]['phases']}, peak RSS {res['peak_rss_mb']:.0f} MB, "
              f"exact match {per_task[name]['exact_match']:.1%}", flush=True)
    phases = {k: round(sum(r["phases"][k] for r in runs.values()), 2) for k in next(iter(runs.values()))["phases"]}
    return {"wall_s": round(sum(r["wall_s"] for r in runs.values()), 2),
            "chain_wall_s": round(time.perf_counter() - t0, 2), "phases": phases,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs.values()), "tasks": per_task}


def run_multi(args, tasks: dict, work: Path, core: int | None = None) -> dict:
    """One ``deltatune train --task ...`` for every task (on ``core`` if given)."""
    out = work / "multi"
    flags = [f for name, (train, evals) in tasks.items()
             for f in ("--task", f"{name}={train}", "--task-eval", f"{name}={evals}")]
    extra = ["--max-batch-tokens", str(args.multi_max_batch_tokens)] if args.multi_max_batch_tokens is not None else []
    res = run([sys.executable, "-m", "deltatune", "train", *common_flags(args), *flags, *extra, "--out", str(out)],
              work / "multi.log", core)
    res["phases"] = multi_phases(res, json.loads((out / "run_summary.json").read_text()))
    res["tasks"] = {name: task_result(out / name) for name in tasks}
    print(f"multi: {res['wall_s']:.1f} s {res['phases']}, peak RSS {res['peak_rss_mb']:.0f} MB", flush=True)
    return res


def run_concurrent(args, tasks: dict, work: Path, solo_core: int, multi_core: int) -> dict:
    """The solo chain on ``solo_core`` and the multi run on ``multi_core``, started together, each
    process one thread: whatever else loads the machine loads both contenders at once."""
    from concurrent.futures import ThreadPoolExecutor

    (work / "solo").mkdir(exist_ok=True)
    with ThreadPoolExecutor(2) as pool:
        multi = pool.submit(run_multi, args, tasks, work, multi_core)
        solo = pool.submit(run_solo, args, tasks, work, solo_core)
        result = {"solo_core": solo_core, "multi_core": multi_core, "multi": multi.result(), "solo": solo.result()}
    return {**result, **ratios(result)}


def ratios(result: dict) -> dict:
    """multi / solo: total wall time, and peak RSS (the multi run's vs the largest solo process's)."""
    return {"time_ratio": round(result["multi"]["wall_s"] / result["solo"]["wall_s"], 3),
            "rss_ratio": round(result["multi"]["peak_rss_mb"] / result["solo"]["peak_rss_mb"], 3)}


def plot_curves(multi_out: Path, names: list[str], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for name in names:
        rows = [json.loads(line) for line in (multi_out / name / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if "loss" in r]
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=name, linewidth=1.5)
    ax.set_xlabel("task step (all tasks in one run)")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.set_title("train_many: per-task loss, one run, one base")
    ax.legend(ncol=4, fontsize=8)
    fig.tight_layout()
    fig.savefig(png)


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def main() -> int:
    args = parse_args()
    if args.threads:
        THREADS.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="train_many_") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        tasks = make_tasks(work, args.tasks, args.examples, args.eval_examples)
        result = {"job": {"tasks": list(tasks), "examples": args.examples, "eval_examples": args.eval_examples,
                          "epochs": 1, "method": "lora r=16 alpha=32 all-linear", "batch_size": 8, "lr": args.lr,
                          "dtype": args.dtype, "model": args.model,
                          "multi_max_batch_tokens": args.multi_max_batch_tokens, "threads": args.threads},
                  "cpu": cpu_name(), "cores": os.cpu_count(), "load_avg_start": os.getloadavg(),
                  "command": " ".join(["python", "benchmarks/train_many.py", *sys.argv[1:]])}
        if args.concurrent:
            concurrent_rounds(args, tasks, work, result)
        else:
            sequential(args, tasks, work, result)
        result["load_avg_end"] = os.getloadavg()
        (args.out / "train_many.json").write_text(json.dumps(result, indent=2) + "\n")
    print(summary(result))
    return 0


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=8, help="how many tasks (1-8)")
    p.add_argument("--examples", type=int, default=200, help="training rows per task")
    p.add_argument("--eval-examples", type=int, default=50, help="held-out rows per task (exact match)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--model", default="default")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--multi-max-batch-tokens", type=int, default=None,
                   help="tokens per forward pass of the multi run (default: the solo default); memory for speed")
    p.add_argument("--threads", type=int, help="threads per child (OMP_NUM_THREADS); default: torch's choice")
    p.add_argument("--only", choices=["solo", "multi"], help="run one contender (sequential mode)")
    p.add_argument("--concurrent", action="store_true",
                   help="run the solo chain and the multi run at the same moment, each pinned to its own core "
                        "(taskset, one thread per process): fair on a shared machine")
    p.add_argument("--rounds", type=int, default=1, help="--concurrent: rounds, the cores swapped each round")
    p.add_argument("--cores", default="0,1", help="--concurrent: the two cores (solo's first in round 1)")
    p.add_argument("--work", type=Path, help="keep the data, adapters and logs here (default: a temporary folder)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="folder for the JSON and PNG")
    return p.parse_args()


def sequential(args, tasks: dict, work: Path, result: dict) -> None:
    """multi, then the solo chain, each with the whole machine."""
    if args.only != "solo":
        result["multi"] = run_multi(args, tasks, work)
        plot_curves(work / "multi", list(tasks), args.out / "train_many.png")
    if args.only != "multi":
        result["solo"] = run_solo(args, tasks, work)
    if "multi" in result and "solo" in result:
        result.update(ratios(result))


def concurrent_rounds(args, tasks: dict, work: Path, result: dict) -> None:
    """``--rounds`` concurrent rounds (cores swapped each round); the JSON is written after each."""
    cores = [int(c) for c in args.cores.split(",")]
    result["rounds"] = []
    for k in range(args.rounds):
        solo_core, multi_core = cores if k % 2 == 0 else cores[::-1]
        folder = work / f"round{k + 1}"
        folder.mkdir(exist_ok=True)
        load = os.getloadavg()
        rnd = run_concurrent(args, tasks, folder, solo_core, multi_core)
        rnd.update(load_avg_start=load, load_avg_end=os.getloadavg())
        result["rounds"].append(rnd)
        print(f"round {k + 1} (solo on core {solo_core}, multi on core {multi_core}): time {rnd['time_ratio']:.3f}x, "
              f"peak RSS {rnd['rss_ratio']:.3f}x", flush=True)
        if k == 0:
            plot_curves(folder / "multi", list(tasks), args.out / "train_many.png")
        result.update(multi=result["rounds"][0]["multi"], solo=result["rounds"][0]["solo"])
        result.update(ratios({w: {k2: sum(r[w][k2] for r in result["rounds"]) if k2 == "wall_s" else
                                  max(r[w][k2] for r in result["rounds"]) for k2 in ("wall_s", "peak_rss_mb")}
                              for w in ("multi", "solo")}))
        (args.out / "train_many.json").write_text(json.dumps(result, indent=2) + "\n")


def summary(result: dict) -> str:
    lines = [f"CPU: {result['cpu']} ({result['cores']} cores)"]
    for who in ("multi", "solo"):
        if who in result:
            lines.append(f"{who}: {result[who]['wall_s']:.1f} s total, peak RSS {result[who]['peak_rss_mb']:.0f} MB")
    for k, rnd in enumerate(result.get("rounds", [])):
        lines.append(f"round {k + 1} (solo core {rnd['solo_core']}, multi core {rnd['multi_core']}): multi "
                     f"{rnd['multi']['wall_s']:.1f} s vs solo {rnd['solo']['wall_s']:.1f} s = {rnd['time_ratio']:.3f}x; "
                     f"peak RSS {rnd['rss_ratio']:.3f}x")
    for who in ("multi", "solo"):
        if "phases" in result.get(who, {}):
            lines.append(f"{who} phases: " + ", ".join(f"{k} {v:.1f}" for k, v in result[who]["phases"].items()))
    if "time_ratio" in result:
        lines.append(f"multi/solo: time {result['time_ratio']:.2f}x, peak RSS {result['rss_ratio']:.2f}x")
    lines.append("| task | multi exact match | solo exact match | multi eval loss | solo eval loss |")
    lines.append("|---|---|---|---|---|")
    for name in result["job"]["tasks"]:
        m, s = (result.get(w, {}).get("tasks", {}).get(name, {}) for w in ("multi", "solo"))
        cell = lambda d, k, f: f.format(d[k]) if d.get(k) is not None else "-"  # noqa: E731
        lines.append(f"| {name} | {cell(m, 'exact_match', '{:.0%}')} | {cell(s, 'exact_match', '{:.0%}')} | "
                     f"{cell(m, 'eval_loss', '{:.3f}')} | {cell(s, 'eval_loss', '{:.3f}')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
