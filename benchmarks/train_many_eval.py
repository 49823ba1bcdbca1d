"""Shared evaluation of several adapters vs one task at a time (``train_many``'s final evaluation).

On the default model with ``--tasks`` LoRA r=16 all-linear adapters (random B, so each adapter
changes the output), the benchmark tasks' eval sets (``train_many.make_tasks``), one process,
``--threads`` threads. Interleaved ``--repeats`` times:

* ``per_task``: each task alone, as a solo run evaluates: ``eval_loss`` then ``exact_match`` in
  batches of 16 under ``applying(task)``;
* ``shared``: ``many_eval.eval_losses`` + ``exact_matches`` over every task at once (rows routed
  per row), passes of 4x the training pass tokens and ``generate`` calls of 64 rows.

Checks that both give each task the same exact match count and eval loss, and prints the times.

    taskset -c 1 python benchmarks/train_many_eval.py --tasks 8 --eval-examples 16   # ~2 min, 1 core
"""
from __future__ import annotations

import argparse
import json
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


def shared(peft, tok, sets, autocast):
    from deltatune.training.many_eval import EvalTask, eval_losses, exact_matches

    tasks = [EvalTask(name, data) for name, data in sets.items()]
    losses = eval_losses(peft, tasks, tok.pad_token_id, 4 * 512, autocast=autocast)
    ems = exact_matches(peft, tok, tasks, 64, autocast=autocast)
    return {name: {**losses[name], **ems[name]} for name in sets}


def main() -> int:
    from contextlib import nullcontext

    from deltatune.training import load_dataset

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--eval-examples", type=int, default=16)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    peft, tok = build(args.tasks)
    with tempfile.TemporaryDirectory() as tmp:
        files = make_tasks(Path(tmp), args.tasks, 1, args.eval_examples)
        sets = {f"t{k}": load_dataset(str(evals), tok) for k, (_, evals) in enumerate(files.values())}
    times = {"per_task": [], "shared": []}
    for _ in range(args.repeats):
        for how, fn in (("per_task", per_task), ("shared", shared)):
            t0 = time.perf_counter()
            results = fn(peft, tok, sets, nullcontext)
            times[how].append(round(time.perf_counter() - t0, 2))
            if how == "per_task":
                want = results
        for name in sets:
            assert results[name]["correct"] == want[name]["correct"], (name, results[name], want[name])
            assert abs(results[name]["eval_loss"] - want[name]["eval_loss"]) <= 1e-5 * want[name]["eval_loss"]
    report = {"cpu": cpu_name(), "threads": args.threads, "tasks": args.tasks, "eval_examples": args.eval_examples,
              "seconds": times, "per_task_results": want,
              "speedup": round(min(times["per_task"]) / min(times["shared"]), 2)}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
