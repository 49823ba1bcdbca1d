"""Each training-speed change on its own, interleaved in one process (robust to a busy machine).

One model (SmolLM2-135M-Instruct, LoRA r=16 on every linear layer), one batch order (batch 8 of
data/demo_train.jsonl). Each round runs one step under every configuration, in rotating order,
so drift in the machine's load hits all of them alike:

* ``before``: torch's default (unfused) AdamW and LoRA's input cast to fp32 under autocast, as
  deltatune trained before issue 13's work;
* ``+fused-adamw``: the fused AdamW kernel (``training.loop.make_optimizer``);
* ``+no-cast``: and LoRA's input left in the autocast dtype (the current default path);
* ``+compile``: and the decoder layers compiled (``compile=True``; rounds before ``--skip`` are
  not counted, so compilation is excluded here: ``train_throughput.py`` counts it).

Each configuration has its own optimizer state over the same adapter parameters, so the
trajectories differ slightly; only step times are compared. Tokens/s per configuration = its
tokens over its step time, from round ``--skip`` on.

    python benchmarks/train_ab.py --dtype bfloat16 --rounds 6
    python benchmarks/train_ab.py --dtype float32 --rounds 6

Writes benchmarks/results/train_ab_<dtype>.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
CONFIGS = ("before", "+fused-adamw", "+no-cast", "+compile")


@contextmanager
def lora_input_cast():
    """LoRA's training path as it was: the input cast to the factors' dtype even under autocast."""
    from deltatune.methods import lora

    current = lora.LoraLinear.delta

    def delta(self, name, x):
        A, B = self.lora_A[name], self.lora_B[name]
        return B(A(self.lora_dropout[name](x.to(A.weight.dtype))) * self.scaling[name])

    lora.LoraLinear.delta = delta
    try:
        yield
    finally:
        lora.LoraLinear.delta = current


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--skip", type=int, default=2, help="rounds not counted (compilation, warm-up)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    args = p.parse_args()

    import torch

    from deltatune.checkpoint.io import atomic_write_json
    from deltatune.training import TrainConfig, Trainer, load_dataset
    from deltatune.training.api import load_model
    from deltatune.training.compiling import LayerCompiler

    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(data=str(REPO / "data" / "demo_train.jsonl"), batch_size=8, max_steps=1000, lr=2e-4,
                          dtype=args.dtype, out=out, progress=False, r=16, alpha=32, target="all-linear")
        model, tok = load_model(cfg, torch.device("cpu"))
        train = load_dataset(cfg.data, tok)
        trainer = Trainer(model, tok, cfg, train, device="cpu")
        model.train()
        kw = dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
        optimizers = {c: torch.optim.AdamW(trainer.params, **kw) if c == "before" else
                      torch.optim.AdamW(trainer.params, fused=True, **kw) for c in args.configs}
        compiler = LayerCompiler(model) if "+compile" in args.configs else None
        batches = trainer._epoch_batches(0)
        stats = {c: {"tokens": 0, "seconds": 0.0, "steps": []} for c in args.configs}
        k = 0
        for rnd in range(args.rounds):
            order = args.configs[rnd % len(args.configs):] + args.configs[:rnd % len(args.configs)]
            for c in order:
                batch = batches[k % len(batches)]
                k += 1
                trainer.optimizer = optimizers[c]
                trainer.compiler = compiler if c == "+compile" else None
                cast = lora_input_cast() if c in ("before", "+fused-adamw") else nullcontext()
                t0 = time.perf_counter()
                with cast:
                    trainer._step(batch)
                dt = time.perf_counter() - t0
                tokens = sum(len(train[i]) for i in batch)
                stats[c]["steps"].append([round(dt, 3), tokens])
                if rnd >= args.skip:
                    stats[c]["tokens"] += tokens
                    stats[c]["seconds"] += dt
                print(f"round {rnd} {c}: {dt:.2f} s, {tokens / dt:,.0f} tokens/s (load {os.getloadavg()[0]:.1f})",
                      flush=True)
    base = stats[args.configs[0]]
    base_tps = base["tokens"] / base["seconds"]
    lines = [f"dtype {args.dtype}, {torch.get_num_threads()} threads, rounds {args.skip}-{args.rounds - 1} counted, "
             f"load average {os.getloadavg()[0]:.1f}", "",
             "| configuration | tokens/s | vs before |", "|---|---|---|"]
    for c in args.configs:
        tps = stats[c]["tokens"] / stats[c]["seconds"]
        stats[c]["tokens_per_s"] = tps
        lines.append(f"| {c} | {tps:,.1f} | {tps / base_tps:.2f}x |")
    md = "\n".join(lines)
    print(md)
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / f"train_ab_{args.dtype}.json",
                      {"dtype": args.dtype, "rounds": args.rounds, "skip": args.skip, "stats": stats,
                       "load_average": os.getloadavg(), "table": md})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
