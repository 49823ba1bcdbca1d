"""Serving engine throughput: deltatune's continuously batched ``Engine`` against HF peft's
``generate(adapter_names=...)`` on the same batch, one run (issue 14, "Figures to reach").

The same N LoRA adapters (r=16, alpha=32 on q/k/v/o_proj, random factors from fixed seeds, made
by ``benchmarks/mixed_adapters.py``'s ``make_adapters``) are loaded into the engine (all of them
ready: ``max_loras=N``) and into peft on a copy of the default model (SmolLM2-135M-Instruct,
fp32 on CPU). For each k in ``--adapters`` the 32 chat prompts (row j uses adapter ``a{j % k}``)
are completed with exactly ``--new-tokens`` greedy tokens:

- deltatune: ``engine.generate(prompt_ids, adapter=[...], SamplingParams(temperature=0,
  max_tokens=N, min_tokens=N))`` (eos masked until N tokens, as peft's ``min_new_tokens``): all requests are queued at once, prefilled in one forward
  (unpadded prompts, left-padded inside the engine) and decoded together over the slot KV cache;
- peft: ``model.generate(**left_padded_batch, adapter_names=[...], max_new_tokens=N,
  min_new_tokens=N, do_sample=False)``.

Also the base model alone through the engine and through HF ``generate``, for scale. Timing: a
2-token warm-up of every configuration and library, then ``--reps`` rounds, libraries alternating
within a round; the figure is the median; tokens/s = prompts x new tokens / seconds. Each row's engine
tokens are compared with peft's (``rows_matching``; fp32 differs only in summation order, so
rows may part only at a near-tie).

Writes benchmarks/results/serve_engine.json (figures, ratios against the targets, the command,
machine info) and prints a markdown table.

    .venv/bin/python benchmarks/serve.py [--reps 3] [--adapters 1,8,32] [--new-tokens 32] [--threads N]
    .venv/bin/python benchmarks/serve.py --quick     # tiny random Llama, seconds
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import mixed_adapters as mixed  # noqa: E402  (adapters, prompts and peft's side are shared with that benchmark)
from deltatune.serving import Engine, SamplingParams  # noqa: E402

RESULTS = HERE / "results"
PEFT_EARLIER = {"1": 145.5, "8": 96.5, "32": 46.6}   # the figures for peft on this machine


def save_base(base, tokenizer, workdir: Path) -> Path:
    path = workdir / "base"
    base.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--adapters", default="1,8,32")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="tiny random Llama (checks the script, not a figure)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/serve_engine.json)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.adapters.split(",")]
    base, tokenizer = mixed.load_base(args.quick, torch.float32)
    batch = mixed.make_batch(tokenizer, args.prompts)
    pad = tokenizer.pad_token_id
    prompt_ids = [[t for t, m in zip(row.tolist(), mask.tolist()) if m] for row, mask in
                  zip(batch["input_ids"], batch["attention_mask"])]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        dirs = mixed.make_adapters(base, max(ks), args.rank, workdir, mixed.B_STD["quick" if args.quick else "default"])
        base_path = "default" if not args.quick else str(save_base(base, tokenizer, workdir))
        engine = Engine(base_path, max_loras=max(ks), max_num_seqs=args.prompts, dtype=torch.float32,
                        device="cpu", max_model_len=512)
        for i, d in enumerate(dirs):
            engine.add_adapter(f"a{i}", d)
        peft_model = mixed.load_models(base, dirs, ["peft"])["peft"]
        sampling = SamplingParams(temperature=0, max_tokens=args.new_tokens, min_tokens=args.new_tokens)

        def ours(names, new_tokens):
            outs = engine.generate(prompt_ids, adapter=names,
                                   sampling=dataclasses.replace(sampling, max_tokens=new_tokens, min_tokens=new_tokens))
            return torch.tensor([o.outputs[0].token_ids for o in outs])

        calls = {("base", "deltatune"): lambda t: ours(None, t),
                 ("base", "peft"): lambda t: mixed.generate(base, batch, t, None, pad)}
        for k in ks:
            names = mixed.row_names(k, args.prompts)
            calls[(str(k), "deltatune")] = lambda t, n=names: ours(n, t)
            calls[(str(k), "peft")] = lambda t, n=names: mixed.generate(peft_model, batch, t, n, pad)
        for call in calls.values():                          # warm-up: every path once, 2 tokens
            call(2)
        tokens, times = {}, {key: [] for key in calls}
        for rep in range(args.reps):
            for key, call in calls.items():
                start = time.perf_counter()
                tokens[key] = call(args.new_tokens)
                times[key].append(time.perf_counter() - start)
            print(f"[rep {rep + 1}/{args.reps}] " + ", ".join(f"{k[0]}/{k[1]} {times[k][-1]:.2f}s" for k in calls),
                  flush=True)
    n_tokens = args.prompts * args.new_tokens
    seconds = {f"{k}|{lib}": statistics.median(v) for (k, lib), v in times.items()}
    tps = {key: n_tokens / s for key, s in seconds.items()}
    match = {k: int((tokens[(k, "deltatune")] == tokens[(k, "peft")]).all(dim=1).sum())
             for k in ["base"] + [str(k) for k in ks]}
    top = str(max(ks))
    ratios = {
        f"engine {top}-adapter / engine 1-adapter": (tps[f"{top}|deltatune"] / tps["1|deltatune"], 0.8),
        f"engine {top}-adapter / peft {top}-adapter (same run)": (tps[f"{top}|deltatune"] / tps[f"{top}|peft"], 3.0),
        "engine base / HF generate base": (tps["base|deltatune"] / tps["base|peft"], None),
    }
    result = {
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, HERE.parent)] + sys.argv[1:]),
        "setup": {"model": "tiny random Llama (--quick)" if args.quick else "SmolLM2-135M-Instruct (default)",
                  "prompts": args.prompts, "new_tokens": args.new_tokens, "rank": args.rank, "reps": args.reps,
                  "dtype": "float32", "device": "cpu", "threads": torch.get_num_threads(),
                  "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared)",
                  "torch": torch.__version__},
        "seconds": seconds, "tokens_per_s": tps, "rows_matching_peft": match,
        "ratios": {name: {"value": v, "target": t, "met": None if t is None else v >= t}
                   for name, (v, t) in ratios.items()},
        "peft_reported_in_issue": PEFT_EARLIER,
        "engine_stats": engine.stats(),
    }
    out = Path(args.out) if args.out else RESULTS / ("serve_engine_quick.json" if args.quick else "serve_engine.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result, ks))
    print(f"wrote {out}")
    return 0


def table(result: dict, ks: list[int]) -> str:
    tps, sec, match, rows = result["tokens_per_s"], result["seconds"], result["rows_matching_peft"], result["setup"]["prompts"]
    lines = ["| distinct adapters | engine tokens/s (s) | peft generate tokens/s (s) | engine / peft | rows equal |",
             "|---|---|---|---|---|"]
    for k in ["base"] + [str(k) for k in ks]:
        label = "base (no adapter)" if k == "base" else k
        lines.append(f"| {label} | {tps[k + '|deltatune']:.1f} ({sec[k + '|deltatune']:.2f}) | "
                     f"{tps[k + '|peft']:.1f} ({sec[k + '|peft']:.2f}) | "
                     f"{tps[k + '|deltatune'] / tps[k + '|peft']:.2f}x | {match[k]}/{rows} |")
    lines += ["", "| ratio | value | target | met |", "|---|---|---|---|"]
    for name, r in result["ratios"].items():
        met = "" if r["met"] is None else ("yes" if r["met"] else "NO")
        lines.append(f"| {name} | {r['value']:.2f} | {'' if r['target'] is None else '>= ' + str(r['target'])} | {met} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
