"""The ``--concurrent`` protocol of ``train_throughput.py``: two contenders trained at the same time.

On a shared machine, the noise between one run and the next is larger than the difference between
the contenders (issue 26: 0.92x in one sequential pair, 1.31x in the next). Started together, each
pinned to its own core with one thread, both see the same noise. Round r puts contender i on core
``cores[(i + r) % 2]``, so over an even number of rounds each contender has had each core equally
often, and the geometric mean of the per-round ratios cancels a faster core.

This module only launches, summarizes and draws: what a contender runs (its child process) is
``train_throughput.py``'s, given here as ``command_for(name, core, barrier) -> (argv, env)``.
"""
from __future__ import annotations

import math
import subprocess
import time
from pathlib import Path


def run_rounds(names: list[str], rounds: int, cores: list[int], command_for, parse, timeout: float,
               tmp: Path) -> list[dict]:
    """Run ``rounds`` rounds of all ``names`` at once; returns one ``{name: result}`` per round.

    Args:
        command_for: ``(name, core, barrier) -> (argv, env)`` of the child pinned to ``core``;
            ``barrier`` is a fresh directory per round where the children meet before their
            training clocks start (loading takes each a different time).
        parse: ``(name, returncode, stdout, stderr) -> dict`` (raises on a failed child).
        timeout: seconds for a whole round; on expiry every child of the round is killed.

    Each result gains ``core``, ``round`` and ``wall_s`` (process start to exit).
    """
    out = []
    for r in range(rounds):
        barrier = tmp / f"round{r}-barrier"
        barrier.mkdir()
        running = {}
        for i, name in enumerate(names):
            core = cores[(i + r) % len(cores)]
            argv, env = command_for(name, core, barrier)
            logs = (tmp / f"round{r}-{i}.out", tmp / f"round{r}-{i}.err")
            with open(logs[0], "w") as so, open(logs[1], "w") as se:  # files, not pipes: a full pipe would stall a child
                running[name] = (core, logs, time.perf_counter(), subprocess.Popen(argv, stdout=so, stderr=se, env=env))
        out.append(_collect(running, parse, r, time.monotonic() + timeout))
        print(f"round {r + 1}/{rounds}: " + ", ".join(
            f"{n} on core {res['core']}: {res['tokens_per_s']:,.0f} tokens/s" for n, res in out[-1].items()), flush=True)
    return out


def _collect(running: dict, parse, round_index: int, deadline: float) -> dict:
    """Wait for every child of a round, in whatever order they end; if one fails or the round
    overruns the deadline, kill the others (a partner waiting at the barrier would wait in vain)."""
    results, pending = {}, dict(running)
    try:
        while pending:
            for name, (core, logs, t0, proc) in list(pending.items()):
                if proc.poll() is None:
                    continue
                res = parse(name, proc.returncode, logs[0].read_text(), logs[1].read_text())
                res.update(core=core, round=round_index + 1, wall_s=time.perf_counter() - t0)
                results[name] = res
                del pending[name]
            if pending and time.monotonic() > deadline:
                raise RuntimeError(f"round {round_index + 1}: {', '.join(pending)} overran the timeout; killed")
            time.sleep(0.1 if pending else 0)
    except BaseException:
        for *_, proc in running.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        raise
    return {name: results[name] for name in running}


def overlap(a: dict, b: dict) -> float:
    """Share of the shorter training that the other contender spent training too (1.0: fully together)."""
    spans = [(r["train_end_unix"] - r["train_s"], r["train_end_unix"]) for r in (a, b)]
    common = min(s[1] for s in spans) - max(s[0] for s in spans)
    return max(0.0, common) / min(s[1] - s[0] for s in spans)


def cpu_ratio(base: dict, other: dict) -> float | None:
    """``other``'s tokens per CPU second of training over ``base``'s: with one thread each, the
    speed per unit of core time each got, which a third process that happens to sit on one of the
    two cores does not skew (wall-clock ratios assume both cores are equally busy). None where a
    child did not report its CPU time."""
    if not base.get("train_cpu_s") or not other.get("train_cpu_s"):
        return None
    return (other["tokens"] / other["train_cpu_s"]) / (base["tokens"] / base["train_cpu_s"])


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def summarize(names: list[str], rounds: list[dict]) -> dict:
    """Per-contender figures over the rounds, and ``names[1]`` against ``names[0]`` (the baseline)."""
    base, other = names
    per_round = [{"round": i + 1, "cores": {n: r[n]["core"] for n in names},
                  "speed_ratio": r[other]["tokens_per_s"] / r[base]["tokens_per_s"],
                  "rss_ratio": r[other]["peak_rss_mb"] / r[base]["peak_rss_mb"],
                  "cpu_speed_ratio": cpu_ratio(r[base], r[other]),
                  "training_overlap": overlap(r[base], r[other])} for i, r in enumerate(rounds)]
    contenders = {}
    for n in names:
        runs = [r[n] for r in rounds]
        contenders[n] = {key: [x[key] for x in runs] for key in
                         ("tokens_per_s", "train_s", "peak_rss_mb", "exact_match", "eval_loss", "core")}
        contenders[n]["tokens_per_s_geomean"] = _geomean(contenders[n]["tokens_per_s"])
        contenders[n]["peak_rss_mb_max"] = max(contenders[n]["peak_rss_mb"])
    return {"baseline": base, "contender": other, "per_round": per_round, "contenders": contenders,
            "speed_ratio_geomean": _geomean([p["speed_ratio"] for p in per_round]),
            "rss_ratio_geomean": _geomean([p["rss_ratio"] for p in per_round]),
            "cpu_speed_ratio_geomean": _geomean([p["cpu_speed_ratio"] for p in per_round])
            if all(p["cpu_speed_ratio"] for p in per_round) else None}


def table(names: list[str], rounds: list[dict], summary: dict, label) -> str:
    """Markdown: one row per contender and round, then the ratios per round and over the rounds."""
    lines = ["| round | contender | core | tokens/s | training s | peak RSS | exact match | eval loss |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rounds:
        for n in names:
            x = r[n]
            em = "-" if x.get("exact_match") is None else f"{x['exact_match']:.1%}"
            lines.append(f"| {x['round']} | {label(n)} | {x['core']} | {x['tokens_per_s']:,.0f} | {x['train_s']:.0f} | "
                         f"{x['peak_rss_mb']:,.0f} MB | {em} | {x['eval_loss']:.4f} |")
    lines += ["", f"| round | {names[1]} / {names[0]} tokens/s | tokens per CPU s | peak RSS ratio | training overlap |",
              "|---|---|---|---|---|"]

    def x_or_dash(v):
        return "-" if v is None else f"{v:.2f}x"

    for p in summary["per_round"]:
        lines.append(f"| {p['round']} | {p['speed_ratio']:.2f}x | {x_or_dash(p.get('cpu_speed_ratio'))} | "
                     f"{p['rss_ratio']:.2f}x | {p['training_overlap']:.0%} |")
    lines.append(f"| geometric mean (cores swapped between rounds) | **{summary['speed_ratio_geomean']:.2f}x** | "
                 f"{x_or_dash(summary.get('cpu_speed_ratio_geomean'))} | **{summary['rss_ratio_geomean']:.2f}x** | |")
    return "\n".join(lines)


def plot(names: list[str], rounds: list[dict], path: Path, title: str) -> None:
    """Bars per round (tokens/s, peak RSS, exact match) and each contender's loss curve in round 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {names[0]: "tab:gray", names[1]: "tab:blue"}
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8), dpi=110)
    width = 0.8 / len(names)
    for ax, key, heading, scale in zip(axes, ("tokens_per_s", "peak_rss_mb", "exact_match"),
                                       ("real tokens/s (higher is better)", "peak RSS, MB (lower is better)",
                                        "exact match, % (after training)"), (1, 1, 100)):
        for j, n in enumerate(names):
            xs = [i + j * width for i in range(len(rounds))]
            ax.bar(xs, [(r[n].get(key) or 0) * scale for r in rounds], width, color=colors[n], label=n)
        ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(rounds))],
                      [f"round {r[names[0]]['round']}\n(cores {'/'.join(str(r[n]['core']) for n in names)})"
                       for r in rounds], fontsize=8)
        ax.set_title(heading, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    for n in names:
        axes[3].plot(range(1, len(rounds[0][n]["losses"]) + 1), rounds[0][n]["losses"], color=colors[n], label=n)
    axes[3].set_title("training loss per step, round 1", fontsize=10)
    axes[3].set_xlabel("step")
    axes[3].grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
