"""Each fp32 training-kernel change of issue 26 on its own, A/B interleaved in one process.

One ``Trainer`` (SmolLM2-135M-Instruct, LoRA r=16 on every linear layer, batch 8 of
data/demo_train.jsonl, fp32, one thread by default). Each round takes the next batch and runs one
step with the change off and one with it on, in alternating order, so the machine's load drifts
over both alike. Steps are timed in wall time and in this process's CPU time
(``time.process_time``: with one thread, the time the core actually spent on the step, which
other processes on a shared core do not inflate). Both arms update the same adapter; only times
are compared.

Changes (``--change``): ``onednn`` (``training.cpu_linear``: frozen linears and the head's
logits through oneDNN instead of MKL; toggled by ``DELTATUNE_ONEDNN_LINEAR``); ``prefix``
(``training.prefix``: the prompt prefix every example of a forward pass shares, run once);
``budget`` (fp32 ``max_batch_tokens`` 640 against 512: with shared prefixes, a demo step's 8
examples fit one pass); ``swiglu`` (``training.fused``: SwiGLU MLPs keeping 2 activations, not 3).

    python benchmarks/train_kernels_ab.py --change onednn --rounds 6
    taskset -c 1 python benchmarks/train_kernels_ab.py --change prefix --rounds 8

Prints a markdown table and writes benchmarks/results/train_kernels_ab_<change>.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"


def _env_toggle(name: str):
    def toggle(trainer, on: bool) -> None:
        os.environ[name] = "1" if on else "0"
    return toggle


def _prefix_toggle(trainer, on: bool) -> None:
    """``training.prefix``: the shared prompt prefix once per forward pass, or in every row."""
    trainer.prefix_off = None if on else "off for the A/B run"


def _budget_toggle(trainer, on: bool) -> None:
    """fp32 ``max_batch_tokens`` 640 (on) against the former default 512 (off)."""
    trainer.max_batch_tokens = 640 if on else 512


def _swiglu_toggle(trainer, on: bool) -> None:
    """``training.fused.SwiGLU`` MLPs (on) against eager ``silu(gate) * up`` (off)."""
    from deltatune.training.fused import FusedMLPs

    trainer.fused_mlps = FusedMLPs(trainer.model) if on else None


# change -> toggle(trainer, on): switch the change on or off between steps.
CHANGES = {"swiglu": _swiglu_toggle, "onednn": _env_toggle("DELTATUNE_ONEDNN_LINEAR"), "prefix": _prefix_toggle, "budget": _budget_toggle}


def timed_step(trainer, batch) -> tuple[float, float, float]:
    """(wall s, CPU s, loss) of one training step on ``batch``."""
    w0, c0 = time.perf_counter(), time.process_time()
    loss = trainer._step(batch)[0]
    return time.perf_counter() - w0, time.process_time() - c0, loss


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--change", default="onednn", choices=sorted(CHANGES))
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--skip", type=int, default=1, help="rounds not counted (warm-up)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    import torch

    from deltatune.checkpoint.io import atomic_write_json
    from deltatune.training import TrainConfig, Trainer, load_dataset
    from deltatune.training.api import load_model

    torch.set_num_threads(args.threads)
    toggle = CHANGES[args.change]
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(data=str(REPO / "data" / "demo_train.jsonl"), batch_size=args.batch,
                          max_steps=2 * args.rounds, lr=2e-4, dtype="float32", out=out, progress=False,
                          r=16, alpha=32, target="all-linear")
        model, tok = load_model(cfg, torch.device("cpu"))
        trainer = Trainer(model, tok, cfg, load_dataset(cfg.data, tok), device="cpu")
        model.train()
        batches = trainer._epoch_batches(0)
        times = {False: [], True: []}
        for r in range(args.rounds):
            tokens = sum(len(trainer.train_data[i]) for i in batches[r])
            for on in ((False, True) if r % 2 == 0 else (True, False)):
                toggle(trainer, on)
                wall, cpu, loss = timed_step(trainer, batches[r])
                print(f"round {r + 1} {'on ' if on else 'off'}: {wall:.2f} s wall, {cpu:.2f} s CPU, "
                      f"{tokens} tokens, loss {loss:.4f}", flush=True)
                if r >= args.skip:
                    times[on].append((wall, cpu, tokens))
    rows = {}
    for on, ts in times.items():
        tok_sum = sum(t[2] for t in ts)
        rows["on" if on else "off"] = {"wall_s": sum(t[0] for t in ts), "cpu_s": sum(t[1] for t in ts),
                                       "tokens": tok_sum, "tokens_per_cpu_s": tok_sum / sum(t[1] for t in ts),
                                       "tokens_per_wall_s": tok_sum / sum(t[0] for t in ts)}
    gain_cpu = rows["on"]["tokens_per_cpu_s"] / rows["off"]["tokens_per_cpu_s"]
    gain_wall = rows["on"]["tokens_per_wall_s"] / rows["off"]["tokens_per_wall_s"]
    md = "\n".join([f"change `{args.change}`, fp32, {args.threads} thread(s), {len(times[True])} counted rounds",
                    "", "| arm | tokens / CPU s | tokens / wall s |", "|---|---|---|",
                    *(f"| {k} | {v['tokens_per_cpu_s']:.1f} | {v['tokens_per_wall_s']:.1f} |" for k, v in rows.items()),
                    f"| on / off | **{gain_cpu:.3f}x** | {gain_wall:.3f}x |"])
    print(md)
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / f"train_kernels_ab_{args.change}.json",
                      {"change": args.change, "threads": args.threads, "rounds": args.rounds, "skip": args.skip,
                       "arms": rows, "gain_cpu": gain_cpu, "gain_wall": gain_wall,
                       "load_average": os.getloadavg(), "table": md})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
