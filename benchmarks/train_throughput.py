"""Training throughput: deltatune vs HF peft + transformers ``Trainer`` (its defaults), same job.

Same base (SmolLM2-135M-Instruct, fp32 weights from the same cached directory), same tokenized
data (the first ``steps * batch`` rows of data/demo_train.jsonl, labels on the assistant turn
only), same LoRA (r=16, alpha=32, all linear layers), same global batch, steps, lr, schedule
(linear, no warmup), clipping and seed. Each contender runs in its own subprocess, which reports:

* tokens/s: real (non-pad) tokens consumed by training divided by the training loop's wall time;
* peak RSS: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of the child at the end of training;
* final eval loss: mean per-token cross-entropy on ``--eval-n`` rows spread over the held-out
  file, computed by the same function for every contender;
* MFU: the model FLOPs the steps need (``deltatune.training.flops``: the same count for every
  contender, from the architecture, the examples' lengths and their label tokens) per second, over
  this machine's matmul peak in the contender's compute dtype, measured afresh at the start of the
  run (``peak_flops(refresh=True)``) with the children's thread count.

Contenders: ``hf`` (peft + Trainer, fp32, DataCollatorForSeq2Seq padding; ``hf-bf16``: the same
with Trainer's ``bf16=True``), ``deltatune`` with its default dtype (``auto``: bf16 matmuls where
the CPU has native bf16, else fp32),
``deltatune-fp32`` (forced fp32, the like-for-like numeric comparison), ``deltatune-bf16``
(forced bf16), and the same with ``compile=True`` (``deltatune-compile``, ``deltatune-fp32-compile``:
the decoder layers through ``torch.compile``; their time includes the compilation, reported too).
``--revs REV ...`` adds ``deltatune@REV``: the default contender with the package as it was at git
revision REV (``git archive``), so each step of the speed work is measured in the same run.

MFU is given against the peak of the contender's own dtype and against both measured peaks (a
contender's MFU is its model FLOPs per second; each child is given the parent's measured peak).
The children's code is in ``train_contenders.py``; ``--device cuda`` runs them on a GPU (as
``gpu_check.py`` does).

    python benchmarks/train_throughput.py            # ~6 min on 2 idle CPU cores
    python benchmarks/train_throughput.py --steps 10 --only hf deltatune
    python benchmarks/train_throughput.py --threads 1   # steadier ratios when the machine is shared

Writes benchmarks/results/train_throughput.json and .png, prints a markdown table.

``--concurrent`` (issue 26): on a shared machine, noise between one run and the next is larger than
the difference, so the two contenders (``hf`` and ``deltatune`` unless ``--only``/``--revs`` name
two others) train AT THE SAME TIME, each pinned to its own core (``taskset -c``) with one thread
(``OMP_NUM_THREADS=MKL_NUM_THREADS=1``, ``torch.set_num_threads(1)``), so both see the same noise.
Round r puts contender i on core ``--cores[(i + r) % 2]``: with ``--rounds 2`` (the default) each
contender runs once on each core and the core difference cancels in the geometric mean of the
per-round ratios. The children meet at a barrier once loaded, so their training clocks start
together (the JSON's ``training_overlap`` says how well the runs overlapped). Each child also reports the exact match of its trained model on the eval set
(greedy, ``deltatune.training.evaluate.exact_match``, the same function and rows for both), after its
training clock and peak RSS are taken. Writes train_throughput_concurrent.json and .png.

    python benchmarks/train_throughput.py --concurrent --steps 100 --batch 8 --eval-n 100
    python benchmarks/train_throughput.py --concurrent --steps 4 --eval-n 8     # a check of the plumbing
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
RESULTS = REPO / "benchmarks" / "results"
CONTENDERS = ("hf", "hf-bf16", "deltatune", "deltatune-fp32", "deltatune-bf16", "deltatune-compile", "deltatune-fp32-compile")
DEFAULT_CONTENDERS = ("hf", "deltatune", "deltatune-fp32")
LABELS = {"hf": "HF peft + Trainer (defaults, fp32)", "hf-bf16": "HF peft + Trainer (bf16=True)", "deltatune": "deltatune (default dtype)",
          "deltatune-fp32": "deltatune (fp32)", "deltatune-bf16": "deltatune (bf16)",
          "deltatune-compile": "deltatune (default dtype, compiled layers)",
          "deltatune-fp32-compile": "deltatune (fp32, compiled layers)"}
# contender -> (dtype option, compile)
DELTATUNE = {"deltatune": ("auto", False), "deltatune-fp32": ("float32", False), "deltatune-bf16": ("bfloat16", False),
             "deltatune-compile": ("auto", True), "deltatune-fp32-compile": ("float32", True)}


def label(name: str) -> str:
    """Table label of a contender (``deltatune@REV`` for a git revision)."""
    if "@" in name:
        return f"deltatune at {name.split('@', 1)[1]} (default dtype)"
    return LABELS[name]


# -- parent --------------------------------------------------------------------------------------

def write_subsets(args, tmp: Path) -> None:
    train = (REPO / "data" / "demo_train.jsonl").read_text().splitlines()[: args.steps * args.batch]
    held = (REPO / "data" / "demo_eval.jsonl").read_text().splitlines()
    held = held[:: max(1, len(held) // args.eval_n)][: args.eval_n]  # both halves: seen and unseen phrasings
    args.train_file, args.eval_file = str(tmp / "train.jsonl"), str(tmp / "eval.jsonl")
    Path(args.train_file).write_text("\n".join(train) + "\n")
    Path(args.eval_file).write_text("\n".join(held) + "\n")


def child_dtype(name: str) -> str:
    """The compute dtype a contender will use here (``auto`` resolved as the trainer resolves it)."""
    import torch

    from deltatune.training.precision import resolve_dtype

    if name.startswith("hf"):
        return "bfloat16" if name == "hf-bf16" else "float32"
    option = DELTATUNE.get(name.split("@")[0], ("auto", False))[0]
    return str(resolve_dtype(option, torch.device("cpu"))).removeprefix("torch.")


def package_at(rev: str, tmp: Path) -> Path:
    """A directory holding the ``deltatune`` package as it was at git revision ``rev``."""
    root = tmp / f"rev-{rev}"
    if root.exists():  # a later round of --concurrent
        return root
    root.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "deltatune"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout, check=True)
    return root


def child_command(name: str, args, peaks: dict, tmp: Path, core: int | None = None,
                  barrier: Path | None = None) -> tuple[list, dict]:
    """``(argv, env)`` of one contender's child; with ``core``, pinned there with one thread; with
    ``barrier``, it waits there for its partner before its training starts."""
    env = dict(os.environ, **({"DELTATUNE_PEAK_GFLOPS": str(peaks[child_dtype(name)])} if peaks else {}))
    extra = []
    if "@" in name:
        extra = ["--package-root", str(package_at(name.split("@", 1)[1], tmp))]
    cmd = [sys.executable, __file__, "--child", name.split("@")[0], *extra, "--threads", str(args.threads),
           "--steps", str(args.steps), "--batch", str(args.batch),
           "--lr", str(args.lr), "--seed", str(args.seed), "--train-file", args.train_file,
           "--eval-file", args.eval_file, "--device", args.device] + (["--exact-match"] if args.exact_match else []) \
        + (["--max-batch-tokens", str(args.max_batch_tokens)] if args.max_batch_tokens is not None else [])
    if barrier is not None:
        cmd += ["--barrier", str(barrier), "--barrier-n", "2"]
    if core is not None:
        cmd = ["taskset", "-c", str(core), *cmd]
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return cmd, env


def child_result(name: str, returncode: int, stdout: str, stderr: str) -> dict:
    """The JSON line a child printed last, or an error carrying the end of its stderr."""
    if returncode != 0:
        raise RuntimeError(f"{name} failed (exit {returncode}):\n{stderr[-4000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def run_child(name: str, args, peaks: dict, tmp: Path) -> dict:
    cmd, env = child_command(name, args, peaks, tmp)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    result = child_result(name, proc.returncode, proc.stdout, proc.stderr)
    result["wall_s"] = time.perf_counter() - t0
    return result


def add_mfu_vs_peaks(results: dict, peaks: dict) -> None:
    """``mfu_vs``: each contender's MFU against every measured peak (its own dtype's is ``mfu``)."""
    for r in results.values():
        own = peaks[r["dtype"]]
        r["mfu_vs"] = {d: r["mfu"] * own / p for d, p in peaks.items()}


def table(results: dict) -> str:
    hf = results.get("hf")
    lines = ["| contender | compute | tokens/s | tokens/s after step 2 | MFU (own dtype's peak) | MFU vs bf16 peak | MFU vs fp32 peak | peak RSS | "
             "final eval loss | speed vs HF | memory vs HF | eval loss vs HF |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        rel = ("1.00x", "1.00x", "+0.0%") if name == "hf" or hf is None else (
            f"{r['tokens_per_s'] / hf['tokens_per_s']:.2f}x", f"{r['peak_rss_mb'] / hf['peak_rss_mb']:.2f}x",
            f"{100 * (r['eval_loss'] / hf['eval_loss'] - 1):+.1f}%")
        compute = r["dtype"] + (f", compiled ({r['compile_s']:.0f} s compiling)" if r.get("compiled") else "")
        after = r.get("tokens_per_s_after_2")
        lines.append(f"| {label(name)} | {compute} | {r['tokens_per_s']:,.0f} | {f'{after:,.0f}' if after else '-'} | "
                     f"{r['mfu']:.1%} | "
                     f"{r['mfu_vs']['bfloat16']:.1%} | {r['mfu_vs']['float32']:.1%} | {r['peak_rss_mb']:,.0f} MB | "
                     f"{r['eval_loss']:.4f} | {rel[0]} | {rel[1]} | {rel[2]} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    colors = ["tab:gray" if n == "hf" else "tab:blue" for n in names]
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6), dpi=110)
    for ax, key, title in zip(axes, ("tokens_per_s", "mfu", "peak_rss_mb", "eval_loss"),
                              ("tokens/s (higher is better)", "MFU, % of this CPU's matmul peak",
                               "peak RSS, MB (lower is better)", "final eval loss")):
        scale = 100 if key == "mfu" else 1
        ax.bar(range(len(names)), [results[n][key] * scale for n in names], color=colors)
        ax.set_xticks(range(len(names)), [n.replace("deltatune", "dt").replace("-compile", "\n+compile")
                                          for n in names], fontsize=7)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("LoRA r=16 all-linear, SmolLM2-135M, same data/batch/steps/seed", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def measure_peaks(args) -> dict:
    """Measure (and cache, for the children) the matmul peak in fp32 and bf16 with the children's threads."""
    import torch

    from deltatune.training.flops import peak_flops

    if args.threads:
        torch.set_num_threads(args.threads)
    peaks = {str(d).removeprefix("torch."): round(peak_flops("cpu", d, refresh=True) / 1e9, 1)
             for d in (torch.float32, torch.bfloat16)}
    print("matmul peak, GFLOP/s:", peaks, flush=True)
    return peaks


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-n", type=int, default=100)
    p.add_argument("--only", nargs="+", choices=CONTENDERS,
                   help=f"contenders (default {' '.join(DEFAULT_CONTENDERS)}; with --concurrent: hf deltatune)")
    p.add_argument("--revs", nargs="+", default=[], metavar="REV",
                   help="also run the default deltatune contender at these git revisions (before the others)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per child (default 0 = all cores); 1 gives stable ratios on a busy machine")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per contender (per round with --concurrent)")
    p.add_argument("--exact-match", action="store_true",
                   help="also score each trained model's exact match on the eval rows (always on with --concurrent)")
    p.add_argument("--concurrent", action="store_true",
                   help="two contenders at once, each on its own core with one thread (see the notes above)")
    p.add_argument("--rounds", type=int, default=2, help="--concurrent: rounds, cores swapped between them")
    p.add_argument("--cores", type=int, nargs=2, default=[0, 1], metavar=("A", "B"),
                   help="--concurrent: the two cores (taskset -c)")
    p.add_argument("--max-batch-tokens", type=int, default=None,
                   help="deltatune contenders: TrainConfig.max_batch_tokens (default: deltatune's own)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda (benchmarks/gpu_check.py runs the children there)")
    p.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    p.add_argument("--package-root", help=argparse.SUPPRESS)
    p.add_argument("--barrier", help=argparse.SUPPRESS)
    p.add_argument("--barrier-n", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--train-file", help=argparse.SUPPRESS)
    p.add_argument("--eval-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.only is None:
        args.only = ["hf", "deltatune"] if args.concurrent else list(DEFAULT_CONTENDERS)
    if args.concurrent:
        args.threads, args.exact_match = 1, True
        if len(args.only) + len(args.revs) != 2:
            p.error(f"--concurrent runs exactly two contenders; got {args.only + args.revs}")
        missing = set(args.cores) - os.sched_getaffinity(0)
        if missing or args.cores[0] == args.cores[1]:
            p.error(f"--cores {args.cores}: need two distinct cores this process may use "
                    f"({sorted(os.sched_getaffinity(0))})")
    return args


def contender_order(args) -> list[str]:
    """HF's contenders first (the baseline), then deltatune at ``--revs``, then the other contenders."""
    return [n for n in args.only if n.startswith("hf")] + [f"deltatune@{rev}" for rev in args.revs] + \
        [n for n in args.only if not n.startswith("hf")]


def run_as_child(args) -> int:
    if args.package_root:  # a contender at another git revision: its package first on the path
        sys.path.insert(0, args.package_root)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    import train_contenders as contenders

    if args.child.startswith("hf"):
        result = contenders.child_hf(args, bf16=args.child == "hf-bf16")
    else:
        result = contenders.child_deltatune(args, *DELTATUNE[args.child])
    print(json.dumps(result))
    return 0


def setup_record(args, peaks: dict) -> dict:
    setup = {k: getattr(args, k) for k in ("steps", "batch", "lr", "seed", "eval_n")}
    setup.update(model="SmolLM2-135M-Instruct", lora="r=16 alpha=32 all-linear", cpu_cores=os.cpu_count(),
                 threads=args.threads or os.cpu_count(), load_average=os.getloadavg(), peak_gflops=peaks,
                 command="python benchmarks/train_throughput.py " + " ".join(sys.argv[1:]))
    return setup


def run_concurrent(names: list[str], args, peaks: dict, tmp: Path) -> int:
    """The --concurrent protocol (``train_concurrent.py``); writes train_throughput_concurrent.*."""
    import train_concurrent as conc
    from deltatune.checkpoint.io import atomic_path, atomic_write_json

    rounds = conc.run_rounds(names, args.rounds, args.cores,
                             lambda name, core, barrier: child_command(name, args, peaks, tmp, core, barrier),
                             child_result, args.timeout, tmp)
    summary = conc.summarize(names, rounds)
    md = conc.table(names, rounds, summary, label)
    print("\n" + md)
    setup = setup_record(args, peaks)
    setup.update(protocol="concurrent: both contenders started together, each pinned with taskset to its own core, "
                          "OMP_NUM_THREADS=MKL_NUM_THREADS=1 and torch.set_num_threads(1); cores swapped each round",
                 rounds=args.rounds, cores=args.cores)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "train_throughput_concurrent.json"
    atomic_write_json(out, {"setup": setup, "summary": summary, "rounds": rounds, "table": md})
    with atomic_path(out.with_suffix(".png")) as path:
        conc.plot(names, rounds, path, f"{label(names[1])} vs {label(names[0])}, at the same time on one core each: "
                                       f"LoRA r=16 all-linear, SmolLM2-135M, {args.steps} steps x batch {args.batch}")
    print(f"\nwrote {out} and {out.with_suffix('.png')}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return run_as_child(args)
    peaks = measure_peaks(args)
    names = contender_order(args)
    with tempfile.TemporaryDirectory() as tmp:
        write_subsets(args, Path(tmp))
        if args.concurrent:
            return run_concurrent(names, args, peaks, Path(tmp))
        results = {}
        for name in names:
            print(f"running {name} ...", flush=True)
            results[name] = run_child(name, args, peaks, Path(tmp))
            r = results[name]
            print(f"  {r['tokens_per_s']:,.0f} tokens/s, MFU {r['mfu']:.1%}, peak RSS {r['peak_rss_mb']:,.0f} MB, "
                  f"eval loss {r['eval_loss']:.4f} ({r['wall_s']:.0f}s)", flush=True)
    from deltatune.checkpoint.io import atomic_path, atomic_write_json

    add_mfu_vs_peaks(results, peaks)
    md = table(results)
    print("\n" + md)
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / "train_throughput.json", {"setup": setup_record(args, peaks), "results": results,
                                                          "table": md})
    with atomic_path(RESULTS / "train_throughput.png") as tmp:
        plot(results, tmp)
    print(f"\nwrote {RESULTS / 'train_throughput.json'} and {RESULTS / 'train_throughput.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
