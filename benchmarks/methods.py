"""Adapter methods side by side: LoRA, DoRA, (IA)³, bottleneck adapters and the virtual-token
methods (prompt tuning, prefix tuning, P-tuning) on the demo task.

Each method is fine-tuned on the default model (SmolLM2-135M-Instruct) with the same data
(data/demo_train.jsonl), step budget, batch size and seed through ``deltatune.training.train``,
then scored by exact match on the first ``--eval-limit`` held-out examples (data/demo_eval.jsonl;
the base model scores 0/50 there, see data/README.md). Each method runs in its own process so
its peak memory is its own.

Per method: trainable parameters (and % of the base), adapter file size, median training-step
time (measured after the runs with the methods' steps interleaved, so machine load hits all
alike), peak memory while training (CPU: peak resident set size of the process, model weights
included; CUDA: peak allocated), final train loss, eval loss and exact-match accuracy. Writes
benchmarks/results/methods.json, methods.md (the table) and methods.png (the chart).

    .venv/bin/python benchmarks/methods.py [--steps 40] [--eval-limit 50] [--batch-size 8]
        [--methods lora,dora,ia3,adapter] [--dtype auto] [--device cpu] [--workdir DIR [--reuse]]
    .venv/bin/python benchmarks/methods.py --methods lora,qlora --results benchmarks/results/qlora_demo

``--reuse`` keeps the finished runs found in ``--workdir`` and trains only the missing methods.
A method written ``NAME@LR`` (e.g. ``prompt@3e-2``) runs NAME at that learning rate, so one
invocation sweeps learning rates side by side; ``--eval-examples N`` scores eval loss and exact
match on the first N held-out examples only (a cheaper run), ``--timing-steps 0`` skips the
interleaved timing (step time then comes from the training log).

Learning rates are per method (each method's usual range for a short run); everything else is
shared.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

# name -> deltatune.training.train options. LoRA and DoRA share rank and targets; (IA)³ uses the
# paper's targets (keys, values, feed-forward input); bottleneck adapters are Houlsby's layout.
METHODS = {
    "lora": dict(method="lora", r=16, alpha=32, target="all-linear", lr=1e-3),
    "dora": dict(method="dora", r=16, alpha=32, target="all-linear", lr=1e-3),
    "ia3": dict(method="ia3", lr=1e-2, method_args={"target_modules": ["k_proj", "v_proj", "down_proj"],
                                                    "feedforward_modules": ["down_proj"]}),
    "adapter": dict(method="adapter", lr=1e-3, method_args={"reduction_factor": 16}),
    # QLoRA: LoRA as above on an NF4 (double-quantized) base. Not in the default set: run
    # ``--methods lora,qlora --results benchmarks/results/qlora_demo`` to compare the two.
    "qlora": dict(method="lora", r=16, alpha=32, target="all-linear", lr=1e-3, quantize="nf4"),
    # Virtual-token methods at ``deltatune train``'s defaults (lr: the method's default, found by
    # the sweep in the README); prompt tuning starts from a description of the task (TEXT init).
    "prompt": dict(method="prompt", method_args={
        "num_virtual_tokens": 20, "prompt_tuning_init": "TEXT", "tokenizer_name_or_path": "default",
        "prompt_tuning_init_text": 'Reply with one line of JSON: {"name": "...", "age": 0, "city": "..."}'}),
    # Prefix tuning from zero prefixes: peft's default random start (N(0, 1) keys and values) took the
    # demo loss from 0.6 to 6.7 at step 1 and reached 0/20 at lr 1e-2 and 1e-3 (README).
    "prefix": dict(method="prefix", method_args={"num_virtual_tokens": 20, "init_weights": "zero"}),
    "prefix-random": dict(method="prefix", method_args={"num_virtual_tokens": 20}),
    "ptuning": dict(method="ptuning", method_args={"num_virtual_tokens": 20}),
}
DEFAULT_METHODS = ["lora", "dora", "ia3", "adapter", "prompt", "prefix", "ptuning"]


def options_of(name: str) -> dict:
    """``train`` options of a method spec: ``NAME`` or ``NAME@LR`` (that method at that lr)."""
    base, _, lr = name.partition("@")
    options = dict(METHODS[base])
    if lr:
        options["lr"] = float(lr)
    return options


def _training_api():
    from deltatune.training import api

    return api


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PeakMemory:
    """Peak memory while training: CUDA peak allocated, or on CPU the peak resident set size
    sampled every 10 ms (after handing freed heap pages back to the OS, so the model-loading
    peak does not mask it)."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.peak = 0.0
        self._stop = None

    def __enter__(self) -> "PeakMemory":
        import gc
        import threading

        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return self
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.baseline = self.peak = _rss_mib()
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(0.01):
                self.peak = max(self.peak, _rss_mib())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_mib())


def run_one(name: str, args) -> dict:
    """Train method ``name`` in this process and return its row of the table."""
    import torch

    api = _training_api()
    out = Path(args.workdir) / name
    options = options_of(name)
    eval_data = ROOT / "data" / "demo_eval.jsonl"
    if args.eval_examples:
        eval_data = Path(args.workdir) / f"eval_{args.eval_examples}.jsonl"
        lines = (ROOT / "data" / "demo_eval.jsonl").read_text().splitlines()[:args.eval_examples]
        eval_data.write_text("\n".join(lines) + "\n")
    cfg = api.make_config(data=str(ROOT / "data" / "demo_train.jsonl"), eval_data=str(eval_data),
                          max_steps=args.steps, batch_size=args.batch_size, seed=args.seed, warmup_steps=args.warmup,
                          eval_limit=args.eval_limit, out=str(out), progress=False, device=args.device,
                          log_every=1, dtype=args.dtype, **options)
    model, tokenizer = api.load_model(cfg, torch.device(args.device))
    load_before = os.getloadavg()[0]
    with PeakMemory(args.device) as memory:
        result = api.train(cfg, model=model, tokenizer=tokenizer)
    trainable, total = result.model.get_nb_trainable_parameters()
    _, elapsed = result.trainer.log.series("elapsed_s")
    steps = [b - a for a, b in zip([0.0] + elapsed[:-1], elapsed)][1:]  # first step is warm-up
    m = result.metrics
    adapter_file = Path(m["adapter"]) / "adapter_model.safetensors"
    return {
        "method": name,
        "options": {**options, "lr": cfg.lr},
        "trainable_params": trainable,
        "base_params": total - trainable,
        "trainable_pct": 100 * trainable / (total - trainable),
        "adapter_file_bytes": adapter_file.stat().st_size,
        "train_log_median_step_s": statistics.median(steps) if steps else m["train_time_s"] / max(m["steps"], 1),
        "peak_memory_mib": memory.peak,
        "memory_kind": "cuda max allocated" if memory.cuda else "peak RSS while training",
        "final_loss": m.get("final_loss"),
        "eval_loss": m.get("eval_loss"),
        "exact_match": m.get("exact_match"),
        "correct": m.get("correct"),
        "scored": m.get("total"),
        "steps": m["steps"],
        "tokens_per_s": m.get("tokens_per_s"),
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # 1-min, before/after
    }


def interleaved_step_times(names: list[str], args) -> dict[str, float]:
    """Median training-step time of each method, steps taken round-robin across the methods.

    Training runs one after another see different machine load; here every method takes its
    steps alternately on the same inputs (``--batch-size`` x ``--timing-length`` tokens, about a
    demo batch), so load changes hit all methods alike. On a shared CPU, multi-threaded kernels
    stall whenever another process takes a core (each op ends in a barrier), which penalises
    methods with more, smaller ops; ``--timing-threads 1`` (the default) avoids that.
    """
    import torch

    from deltatune import get_peft_model, models

    api = _training_api()
    if args.timing_threads:
        torch.set_num_threads(args.timing_threads)
    wrapped = {}
    for name in names:
        cfg = api.make_config(**options_of(name))
        torch.manual_seed(args.seed)
        base = models.load_default().to(args.device)
        if cfg.quantize:
            from deltatune.quant import quantize

            quantize(base, quant_type=cfg.quantize)
        model = get_peft_model(base, api.adapter_config(cfg))
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        wrapped[name] = (model, torch.optim.AdamW(params, lr=1e-4))
    g = torch.Generator().manual_seed(args.seed)
    vocab = next(iter(wrapped.values()))[0].config.vocab_size
    ids = torch.randint(0, vocab, (args.batch_size, args.timing_length), generator=g).to(args.device)
    cuda = args.device.startswith("cuda")
    times = {name: [] for name in names}
    for i in range(args.timing_steps + 1):
        for name, (model, opt) in wrapped.items():
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            if i:  # the first round warms up
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def table(rows: list[dict]) -> str:
    lines = ["| method | trainable params (% of base) | adapter file | step time | peak memory | "
             "final loss | eval loss | exact match |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['trainable_params']:,} ({r['trainable_pct']:.3f}%) | "
                     f"{r['adapter_file_bytes'] / 2**20:.2f} MiB | {1000 * r['median_step_s']:.0f} ms | "
                     f"{r['peak_memory_mib']:,.0f} MiB | {r['final_loss']:.3f} | {r['eval_loss']:.3f} | "
                     f"{r['correct']}/{r['scored']} ({100 * r['exact_match']:.0f}%) |")
    return "\n".join(lines)


def chart(rows: list[dict], path: Path, subtitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("trainable params (% of base)", lambda r: r["trainable_pct"]),
              ("adapter file (MiB)", lambda r: r["adapter_file_bytes"] / 2**20),
              ("median step time (ms)", lambda r: 1000 * r["median_step_s"]),
              ("peak memory (MiB)", lambda r: r["peak_memory_mib"]),
              ("held-out exact match (%)", lambda r: 100 * r["exact_match"])]
    names = [r["method"] for r in rows]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    for ax, (title, value) in zip(axes, panels):
        values = [value(r) for r in rows]
        bars = ax.bar(names, values, color=[plt.cm.tab10(i % 10) for i in range(len(rows))])
        ax.bar_label(bars, fmt="%.4g", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=9, labelrotation=35)
    fig.suptitle(f"deltatune methods on the demo task: {subtitle}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated, of {sorted(METHODS)}")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="training compute dtype")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--eval-limit", type=int, default=50)
    ap.add_argument("--eval-examples", type=int, default=0, help="use only the first N held-out examples (0: all)")
    ap.add_argument("--timing-steps", type=int, default=6, help="interleaved timed steps per method")
    ap.add_argument("--timing-length", type=int, default=96, help="tokens per sequence in the timing batch")
    ap.add_argument("--timing-threads", type=int, default=1, help="CPU threads while timing (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workdir", default=None, help="where runs go (default: a temporary directory)")
    ap.add_argument("--results", default=str(RESULTS), help="folder for methods.json/.md/.png")
    ap.add_argument("--reuse", action="store_true", help="reuse finished runs in --workdir")
    ap.add_argument("--run-one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--row-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.run_one:  # child process: one method
        row = run_one(args.run_one, args)
        Path(args.row_out).write_text(json.dumps(row))
        return

    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    unknown = [n for n in names if n.partition("@")[0] not in METHODS]
    if unknown:
        sys.exit(f"unknown method(s) {unknown}; known: {sorted(METHODS)}")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="deltatune-methods-"))
    rows, started = [], time.perf_counter()
    for name in names:
        row_out = workdir / f"{name}.row.json"
        if args.reuse and row_out.exists():
            row = json.loads(row_out.read_text())
            row.setdefault("train_log_median_step_s", row.get("median_step_s"))
            rows.append(row)
            print(f"[{name}] reused {row_out}", flush=True)
            continue
        cmd = [sys.executable, __file__, "--run-one", name, "--row-out", str(row_out), "--workdir", str(workdir),
               "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--warmup", str(args.warmup),
               "--eval-limit", str(args.eval_limit), "--eval-examples", str(args.eval_examples), "--seed", str(args.seed), "--device", args.device, "--dtype", args.dtype]
        t = time.perf_counter()
        subprocess.run(cmd, check=True)
        row = json.loads(row_out.read_text())
        row["run_wall_s"] = round(time.perf_counter() - t, 1)
        row_out.write_text(json.dumps(row))
        rows.append(row)
        print(f"[{name}] done in {row['run_wall_s']:.0f} s", flush=True)

    t = time.perf_counter()
    timed = interleaved_step_times(names, args) if args.timing_steps else {}
    for row in rows:
        row["median_step_s"] = timed.get(row["method"], row["train_log_median_step_s"])
    print(f"[timing] done in {time.perf_counter() - t:.0f} s", flush=True)

    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    import torch

    setup = {"model": "SmolLM2-135M-Instruct (deltatune.models.load_default)", "steps": args.steps,
             "batch_size": args.batch_size, "warmup_steps": args.warmup, "seed": args.seed,
             "eval_examples": args.eval_limit, "eval_set": args.eval_examples or 200, "device": args.device, "dtype": args.dtype, "torch": torch.__version__,
             "timing": f"median of {args.timing_steps} interleaved steps, batch {args.batch_size} x "
                       f"{args.timing_length} tokens, {args.timing_threads or torch.get_num_threads()} thread(s)",
             "cpu_count": os.cpu_count(), "total_runtime_s": round(time.perf_counter() - started, 1)}
    (results / "methods.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=2) + "\n")
    md = table(rows)
    subtitle = (f"{args.steps} steps x batch {args.batch_size}, seed {args.seed}, "
                f"{args.eval_limit} held-out examples, {args.device}")
    (results / "methods.md").write_text(
        f"Setup: {subtitle}; step time: {setup['timing']}; peak memory: "
        f"{rows[0]['memory_kind']}. `python benchmarks/methods.py`.\n\n{md}\n")
    chart(rows, results / "methods.png", subtitle)
    print(md)
    print(f"\nwrote {results / 'methods.json'}, methods.md, methods.png in {setup['total_runtime_s']:.0f} s")


if __name__ == "__main__":
    main()
