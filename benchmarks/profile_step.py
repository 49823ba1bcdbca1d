"""Where a training step's time goes: ``torch.profiler`` over deltatune training steps, by op.

The demo job (SmolLM2-135M-Instruct, LoRA r=16 on every linear layer, batch 8 of
data/demo_train.jsonl) through ``deltatune.training.Trainer``: ``--warmup`` steps first (kernel
selection, allocator), then ``--steps`` profiled steps. Ops are ranked by self CPU time (time in
the op itself, not in the ops it calls), each with its share of the profiled steps' wall time;
the table also sums the time by kind (matmul, attention, elementwise, ...).

    python benchmarks/profile_step.py --dtype bfloat16
    python benchmarks/profile_step.py --dtype float32 --top 15
    taskset -c 1 python benchmarks/profile_step.py --dtype float32 --threads 1   # as --concurrent trains
    taskset -c 1 python benchmarks/profile_step.py --dtype float32 --threads 1 --by-source [--contender hf]

On a shared machine profile with ``--threads 1`` on a pinned core: with two threads, every small
op waits for a thread the other processes hold, and elementwise ops looked like 45% of an fp32
step (load ~5) where one pinned thread shows 8% (``aten::mm`` 77%).

Writes benchmarks/results/profile_step_<dtype>.json and prints a markdown table.
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
sys.path.insert(0, str(REPO / "benchmarks"))
RESULTS = REPO / "benchmarks" / "results"

from profile_sources import by_source, tag_modules  # noqa: E402

# Op name -> kind, for the summary (first match wins; names are aten's).
KINDS = (
    ("matmul", ("mm", "addmm", "bmm", "matmul", "linear", "baddbmm", "_linear_pointwise")),
    ("attention", ("scaled_dot_product", "flash_attention", "_softmax", "softmax")),
    ("copy / dtype conversion", ("copy_", "to", "_to_copy", "clone", "contiguous")),
    ("optimizer", ("_foreach", "adamw", "_fused_adamw")),
)
# Op namespaces counted as ops (oneDNN's linear is ``mkldnn::_linear_pointwise``; ``training.cpu_linear``).
OPS = ("aten::", "mkldnn::")


def kind_of(name: str) -> str:
    """The summary kind of an aten op name (``aten::mm`` -> ``matmul``); ``other`` if none fits."""
    base = name.removeprefix("aten::").removeprefix("mkldnn::")
    for kind, names in KINDS:
        if base in names or any(base.startswith(n) for n in names if n.startswith("_")):
            return kind
    if base in ("mul", "add", "sub", "div", "silu", "silu_backward", "pow", "rsqrt", "mean", "neg", "cat",
                "mul_", "add_", "sum", "exp", "exp_", "sub_", "where", "masked_fill", "index", "gather",
                "index_put_", "logsumexp", "embedding_dense_backward", "fill_", "zero_", "sigmoid"):
        return "elementwise / reductions"
    return "other"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="train with compile=True")
    p.add_argument("--by-source", action="store_true",
                   help="also sum op time by the part of the model that ran it (profile_sources.py)")
    p.add_argument("--contender", default="deltatune", choices=["deltatune", "hf"],
                   help="hf: peft + a transformers training step (padded batch, full logits) instead")
    args = p.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from deltatune.checkpoint.io import atomic_write_json
    from deltatune.training import TrainConfig, Trainer, load_dataset
    from deltatune.training.api import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    total = args.warmup + args.steps
    if args.contender == "hf":
        prof, wall, tokens, n_steps = profile_hf(args)
        return report(args, prof, wall, tokens, n_steps)
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(data=str(REPO / "data" / "demo_train.jsonl"), batch_size=args.batch, max_steps=total,
                          lr=2e-4, dtype=args.dtype, out=out, progress=False, r=16, alpha=32, target="all-linear",
                          **({"compile": True} if args.compile else {}))
        device = torch.device("cpu")
        model, tok = load_model(cfg, device)
        train = load_dataset(cfg.data, tok)
        trainer = Trainer(model, tok, cfg, train, device=device)
        trainer.total_steps = args.warmup
        trainer.fit()  # warm-up steps (and writes nothing we keep)
        trainer.total_steps = total
        model.train()
        batches = trainer._epoch_batches(0)[args.warmup:total]
        tokens = sum(len(train[i]) for b in batches for i in b)
        if args.by_source:
            tag_modules(model)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for b in batches:
                trainer._step(b)
            wall = time.perf_counter() - t0
    return report(args, prof, wall, tokens, len(batches))


def profile_hf(args):
    """peft + transformers: the step transformers' ``Trainer`` runs (padded batch through
    ``DataCollatorForSeq2Seq``, ``model(**batch).loss``, backward, clipping, AdamW), profiled."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq

    from deltatune import models
    from deltatune.training import load_dataset

    tok = models.load_default_tokenizer()
    train = load_dataset(str(REPO / "data" / "demo_train.jsonl"), tok)
    model = AutoModelForCausalLM.from_pretrained(str(models.default_model_path()), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, fused=True)
    collate = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    rows = [{"input_ids": e.input_ids, "labels": e.labels, "attention_mask": [1] * len(e)} for e in train]
    batches = [collate(rows[i * args.batch:(i + 1) * args.batch]) for i in range(args.warmup + args.steps)]

    def step(batch):
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for b in batches[:args.warmup]:
        step(b)
    if args.by_source:
        tag_modules(model)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches[args.warmup:])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for b in batches[args.warmup:]:
            step(b)
        wall = time.perf_counter() - t0
    return prof, wall, tokens, args.steps


def report(args, prof, wall: float, tokens: int, n_steps: int) -> int:
    """Print and write the by-op table of a profile of ``n_steps`` steps that took ``wall`` s."""
    import torch

    from deltatune.checkpoint.io import atomic_write_json

    rows = []
    for ev in prof.key_averages():
        if ev.key.startswith(OPS) or ev.key.startswith("LinearCrossEntropy") or "Optimizer" in ev.key:
            rows.append({"op": ev.key, "self_s": ev.self_cpu_time_total / 1e6, "calls": ev.count})
    rows.sort(key=lambda r: -r["self_s"])
    for r in rows:
        r["share"] = r["self_s"] / wall
        r["kind"] = kind_of(r["op"])
    kinds: dict[str, float] = {}
    for r in rows:
        if r["op"].startswith(OPS):
            kinds[r["kind"]] = kinds.get(r["kind"], 0.0) + r["self_s"] / wall
    step_s = wall / n_steps
    lines = [f"{args.contender}, dtype {args.dtype}, {torch.get_num_threads()} threads, {n_steps} profiled steps: "
             f"{step_s:.2f} s/step, {tokens / wall:,.0f} tokens/s (under the profiler)", "",
             "| op | kind | calls/step | self time/step | share of step |", "|---|---|---|---|---|"]
    for r in rows[: args.top]:
        lines.append(f"| `{r['op']}` | {r['kind']} | {r['calls'] / n_steps:.0f} | "
                     f"{1000 * r['self_s'] / n_steps:,.0f} ms | {r['share']:.1%} |")
    lines += ["", "| kind | share of step |", "|---|---|"]
    for kind, share in sorted(kinds.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {kind} | {share:.1%} |")
    sources = by_source(prof) if args.by_source else {}
    if sources:
        lines += ["", "| source (forward / backward) | time/step | share of step |", "|---|---|---|"]
        lines += [f"| {src} | {1000 * s / n_steps:,.0f} ms | {s / wall:.1%} |" for src, s in sources.items()]
    md = "\n".join(lines)
    print(md)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"profile_step_{'sources_' if args.by_source else ''}{'hf_' if args.contender == 'hf' else ''}{args.dtype}{'_compiled' if args.compile else ''}.json"
    atomic_write_json(RESULTS / name, {"dtype": args.dtype, "threads": torch.get_num_threads(),
                                       "steps": n_steps, "step_s": step_s, "tokens": tokens,
                                       "load_average": os.getloadavg(), "ops": rows[:40], "kinds": kinds,
                                       "sources_s_per_step": {k: v / n_steps for k, v in sources.items()},
                                       "table": md})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
