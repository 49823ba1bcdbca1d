"""`make demo`: a small real model learns a task it could not do, in minutes, on CPU.

SmolLM2-135M-Instruct is asked to turn a free-text message ("Hi, this is Maria Lopez, I'm 34 and
I live in Lisbon.") into one compact JSON record. Out of the box it answers in prose or pretty-
printed JSON with other keys, so it scores ~0% exact match. A rank-16 LoRA on every linear layer,
trained for a few dozen steps on data/demo_train.jsonl, gets most held-out records exactly right.

    python examples/demo.py                 # what `make demo` runs
    python examples/demo.py --steps 60 --eval-n 200

The same run from the command line:

    deltatune train --data data/demo_train.jsonl --eval data/demo_eval.jsonl \\
        --method lora --r 16 --alpha 32 --target all-linear --lr 1e-3 --max-steps 40 --out runs/demo
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from deltatune.training import TrainConfig, Trainer, load_dataset  # noqa: E402
from deltatune.training.api import load_model  # noqa: E402
from deltatune.training.data import Dataset  # noqa: E402
from deltatune.training.evaluate import exact_match  # noqa: E402
from deltatune.training.precision import autocast_for  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40, help="optimizer steps (default 40, ~1/4 epoch)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-n", type=int, default=100, help="held-out examples scored (default 100 of 200)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--quantize", choices=["nf4", "fp4"], default=None,
                   help="QLoRA: a 4-bit base under the adapter (default: dense)")
    p.add_argument("--out", default=str(REPO / "runs" / "demo"))
    p.add_argument("--examples", type=int, default=4, help="before/after examples to show")
    return p.parse_args()


def subset(ds: Dataset, n: int) -> Dataset:
    """Every k-th example, so both halves of the eval file (seen and unseen phrasings) are in."""
    step = max(1, len(ds) // n)
    return Dataset(ds.examples[::step][:n], ds.report)


def score(model, tokenizer, ds, trainer, samples):
    return exact_match(model, tokenizer, ds, batch_size=32, max_new_tokens=48, device=trainer.device,
                       autocast=autocast_for(trainer.dtype, trainer.device), samples=samples)


def user_text(prompt: str) -> str:
    """The user turn of a rendered ChatML prompt, for display."""
    part = prompt.split("<|im_start|>user\n")[-1]
    return part.split("<|im_end|>")[0]


def main() -> int:
    args = parse_args()
    t_start = time.perf_counter()
    cfg = TrainConfig(data=str(REPO / "data" / "demo_train.jsonl"), eval_data=str(REPO / "data" / "demo_eval.jsonl"),
                      method="lora", r=16, alpha=32, target="all-linear", lr=args.lr, max_steps=args.steps,
                      batch_size=args.batch_size, warmup_steps=3, schedule="cosine", dtype=args.dtype,
                      quantize=args.quantize, out=args.out, eval_exact_match=False, seed=0, save_every=0, eval_every=10)
    base_kind = f"{args.quantize.upper()} 4-bit " if args.quantize else ""
    print(f"deltatune demo: LoRA r=16 (all linear layers) on {base_kind}SmolLM2-135M-Instruct, "
          f"{torch.get_num_threads()} CPU threads")
    device = torch.device("cpu")
    model, tokenizer = load_model(cfg, device)
    train = load_dataset(cfg.data, tokenizer, max_length=cfg.max_length)
    held_out = subset(load_dataset(cfg.eval_data, tokenizer, max_length=cfg.max_length), args.eval_n)
    trainer = Trainer(model, tokenizer, cfg, train, held_out, device=device)
    trainable, total = model.get_nb_trainable_parameters()
    print(f"  {len(train)} training examples, {len(held_out)} held-out examples scored; "
          f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%), "
          f"compute {str(trainer.dtype).replace('torch.', '')}")
    print(f"  setup {time.perf_counter() - t_start:.0f}s\n")

    t0 = time.perf_counter()
    print("1/3 exact match of the base model (adapter disabled) ...", flush=True)
    with model.disable_adapter():
        base = score(model, tokenizer, held_out, trainer, args.examples)
    t_base = time.perf_counter() - t0
    print(f"    base: {100 * base['exact_match']:.0f}% ({base['correct']}/{base['total']}) in {t_base:.0f}s\n")

    print(f"2/3 training {args.steps} steps x {args.batch_size} sequences ...", flush=True)
    t0 = time.perf_counter()
    result = trainer.fit()
    t_train = time.perf_counter() - t0

    print("\n3/3 exact match of the tuned model ...", flush=True)
    t0 = time.perf_counter()
    tuned = score(model, tokenizer, held_out, trainer, args.examples)
    t_tuned = time.perf_counter() - t0
    gain = 100 * (tuned["exact_match"] - base["exact_match"])

    print("\nbefore / after on held-out messages:")
    for b, a in zip(base["samples"], tuned["samples"]):
        print(f"  message : {user_text(b['prompt']).splitlines()[-1]}")
        print(f"  base    : {b['prediction'][:110]!r}")
        print(f"  tuned   : {a['prediction']!r}  {'(exact)' if a['correct'] else '(miss)'}")
        print()
    out = Path(cfg.out)
    print("| model | exact match (held-out) |\n|---|---|")
    print(f"| SmolLM2-135M-Instruct | {100 * base['exact_match']:.1f}% ({base['correct']}/{base['total']}) |")
    print(f"| + {'QLoRA' if args.quantize else 'LoRA'} r=16, {args.steps} steps | {100 * tuned['exact_match']:.1f}% ({tuned['correct']}/{tuned['total']}) |")
    print(f"\ngain: {gain:+.1f} points; eval loss {result['eval_loss']:.4f}")
    print(f"adapter:    {out / 'adapter'}  ({(out / 'adapter' / 'adapter_model.safetensors').stat().st_size / 2**20:.1f} MB)")
    print(f"loss curve: {out / 'loss_curve.png'}\nmetrics:    {out / 'metrics.csv'}")
    print(f"time: base eval {t_base:.0f}s, training {t_train:.0f}s ({result['tokens_per_s']:,.0f} tokens/s), "
          f"tuned eval {t_tuned:.0f}s, total {time.perf_counter() - t_start:.0f}s")
    if gain < 40:
        print(f"demo target missed: gain {gain:.1f} < 40 points", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
