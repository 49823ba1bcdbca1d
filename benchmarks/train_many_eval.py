"""Evaluating several adapters together vs one task at a time (``train_many``'s final evaluation).

On the default model with ``--tasks`` LoRA r=16 all-linear adapters (small random B, so each
adapter changes the output) and the benchmark tasks' eval sets (``train_many.make_tasks``), in
one process of ``--threads`` threads, ``--how``:

* ``per_task``: each task alone, as a solo run evaluates: ``eval_loss`` then ``exact_match`` in
  batches of 16 under ``applying(task)``;
* ``grouped``: ``many_eval`` (what ``train_many`` does): passes of 4x the training pass tokens and
  ``generate`` calls of up to 64 rows, each holding one task's rows;
* ``mixed``: ``many_eval`` with ``mix_tasks``: passes and calls hold several tasks' rows, each
  routed to its own adapter (``generate(adapter_names=...)``).

Prints the seconds, the process's peak RSS and each task's results (equal across ``--how``).

    for how in per_task grouped mixed; do
        taskset -c 1 python benchmarks/train_many_eval.py --how $how --tasks 8 --eval-examples 16
    done
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_many import cpu_name, make_tasks  # noqa: E402


def build(n_tasks: int):
    from deltatune import get_peft_model, models
    from deltatune.registry import make_config

    tok = models.load_tokenizer("default")
    model = models.load("default", dtype=torch.float32)
    peft = None
    for k in range(n_tasks):
        torch.manual_seed(k)
        cfg = make_config("lora", r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
        peft = get_peft_model(model, cfg, adapter_name=f"t{k}") if peft is None else peft.add_adapter(f"t{k}", cfg) or peft
        with torch.no_grad():   # small random B: each adapter nudges the output (init False is too strong)
            for name, p in peft.named_parameters():
                if f".t{k}." in name and "lora_B" in name:
                    p.mul_(0.02)
    return peft.eval(), tok


def per_task(peft, tok, sets, autocast):
    from deltatune.training.evaluate import eval_loss, exact_match

    out = {}
    for name, data in sets.items():
        with peft.applying(name):
            out[name] = {**eval_loss(peft, data, 16, autocast=autocast),
                         **exact_match(peft, tok, data, batch_size=16, autocast=autocast)}
    return out


def together(peft, tok, sets, autocast, mix_tasks: bool, rows: int):
    from deltatune.training.many_eval import EvalTask, eval_losses, exact_matches

    tasks = [EvalTask(name, data) for name, data in sets.items()]
    losses = eval_losses(peft, tasks, tok.pad_token_id, 4 * 512, autocast=autocast, mix_tasks=mix_tasks)
    ems = exact_matches(peft, tok, tasks, rows, autocast=autocast, mix_tasks=mix_tasks)
    return {name: {**losses[name], **ems[name]} for name in sets}


def main() -> int:
    from contextlib import nullcontext

    from deltatune.training import load_dataset

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--eval-examples", type=int, default=16)
    p.add_argument("--how", choices=["per_task", "grouped", "mixed"], default="grouped")
    p.add_argument("--rows", type=int, default=64, help="grouped/mixed: rows per generate call")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    peft, tok = build(args.tasks)
    with tempfile.TemporaryDirectory() as tmp:
        files = make_tasks(Path(tmp), args.tasks, 1, args.eval_examples)
        sets = {f"t{k}": load_dataset(str(evals), tok) for k, (_, evals) in enumerate(files.values())}
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    if args.how == "per_task":
        results = per_task(peft, tok, sets, nullcontext)
    else:
        results = together(peft, tok, sets, nullcontext, mix_tasks=args.how == "mixed", rows=args.rows)
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"cpu": cpu_name(), "threads": args.threads, "tasks": args.tasks, "how": args.how, "rows": args.rows,
                      "eval_examples": args.eval_examples, "seconds": round(seconds, 2),
                      "peak_rss_mb_before": round(rss0), "peak_rss_mb": round(rss),
                      "results": {k: {m: round(v, 5) if isinstance(v, float) else v for m, v in r.items()}
                                  for k, r in results.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
